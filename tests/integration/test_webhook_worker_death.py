"""A webhook worker killed in the middle of an attempt loses no delivery: the attempt's lease
runs out and another webhook worker sends the event again, with the same webhook-id."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

from genq import db
from genq.job_store import transition
from genq.settings import Settings
from genq.states import JobStatus
from producer.submit import load_tokenizer_cached
from results_api.app import create_app
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, make_key
from tests.processes import ProcessGroup, wait_for
from tests.webhook_receiver import Reply, receiving, webhook_test_broker_url

pytestmark = pytest.mark.integration


def test_killed_webhook_worker_loses_no_delivery(tmp_path, postgres_url, rabbitmq_url):
    # On RabbitMQ and PostgreSQL: the other delivery tests run on Redis and SQLite. A message
    # left over from another run names a delivery this database lacks, and does nothing.
    database_url, broker_url = postgres_url, rabbitmq_url
    load_tokenizer_cached(TINY_MODEL, Path(MODEL_CACHE_DIR))
    # The job's own run message goes where no job worker listens: only its webhook matters.
    settings = Settings(database_url=database_url, broker_url=webhook_test_broker_url(),
                        model=TINY_MODEL, model_cache_dir=Path(MODEL_CACHE_DIR),
                        webhook_allow_private=True)
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    auth = {"Authorization": f"Bearer {make_key(database_url)}"}
    secret = client.post("/v1/webhook-secret", headers=auth).json["secret"]
    group = ProcessGroup(tmp_path, {
        **os.environ, "GENQ_DATABASE_URL": database_url, "GENQ_BROKER_URL": broker_url,
        # The first attempt hangs past this timeout (30 s); the second must fit in it, on a
        # loaded 2-core CI machine too (with 3 s, a fresh worker's first request timed out).
        "GENQ_WEBHOOK_ALLOW_PRIVATE": "true", "GENQ_WEBHOOK_TIMEOUT_SECONDS": "10",
        "GENQ_WEBHOOK_POLL_SECONDS": "0.2", "PYTHONUNBUFFERED": "1",
    })

    def start_webhook_worker(name: str):
        process = group.start(name, [sys.executable, "-m", "cli", "webhook-worker",
                                     "--hostname", f"{name}-{uuid.uuid4().hex[:6]}@%h"])
        wait_for(lambda: " ready." in process.log(), 60, name, process)
        return process

    try:
        first = start_webhook_worker("webhooks-1")
        with receiving([Reply(hang_seconds=30), Reply(200)]) as receiver:
            job = client.post("/v1/jobs", json={"prompt": "Hi", "webhook_url": receiver.url},
                              headers=auth).json
            with db.transaction(database_url) as session:
                transition(session, job["id"], JobStatus.FAILED)
            wait_for(lambda: receiver.requests, 10, "the first attempt to start")

            first.stop(signal.SIGKILL)
            start_webhook_worker("webhooks-2")
            wait_for(lambda: len(receiver.requests) == 2, 30, "the delivery to be sent again")

            first_try, second_try = receiver.requests
            assert first_try.headers["webhook-id"] == second_try.headers["webhook-id"]
            assert receiver.verified(secret)[1]["type"] == "job.failed"
        wait_for(lambda: client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth)
                 .json["data"][0]["status"] == "delivered", 10, "the delivery to be logged")
    except AssertionError:
        print(group.logs())
        raise
    finally:
        group.stop_all()
