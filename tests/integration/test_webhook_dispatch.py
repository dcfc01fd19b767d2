"""The webhook dispatcher on real SQLite, PostgreSQL and Redis: one write transaction a round,
and a per-URL cap that bounds deliveries in flight, never a rate or the other receivers."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import event, select

from genq import db
from genq.job_store import transition
from genq.models import WebhookDelivery
from genq.settings import Settings
from genq.states import JobStatus
from producer.submit import load_tokenizer_cached
from results_api.app import create_app
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, make_key
from tests.processes import ProcessGroup, wait_for
from tests.webhook_receiver import receiving, webhook_test_broker_url
from workers.webhook_worker import WEBHOOK_QUEUE, dispatch_due, make_webhook_celery

pytestmark = pytest.mark.integration

NUM_DELIVERIES = 40
NUM_TO_ONE_RECEIVER = 30


@pytest.fixture
def broker_url():
    url = webhook_test_broker_url()
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


def succeeded_jobs_with_webhooks(database_url: str, broker_url: str, urls: list[str]) -> Settings:
    """One succeeded job per URL in a fresh database, each with a due delivery."""
    load_tokenizer_cached(TINY_MODEL, Path(MODEL_CACHE_DIR))
    settings = Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL,
                        model_cache_dir=Path(MODEL_CACHE_DIR), webhook_allow_private=True)
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    auth = {"Authorization": f"Bearer {make_key(database_url)}"}
    assert client.post("/v1/webhook-secret", headers=auth).status_code == 201
    for url in urls:
        response = client.post("/v1/jobs", headers=auth, json={
            "prompt": "Hi", "max_tokens": 2, "webhook_url": url,
            "webhook_events": ["succeeded"]})
        assert response.status_code == 202, response.json
        for state in (JobStatus.RUNNING, JobStatus.SUCCEEDED):
            with db.transaction(database_url) as session:
                assert transition(session, response.json["id"], state)
    return settings


def test_a_round_leases_every_due_delivery_in_one_transaction(sqlite_url, broker_url):
    # Given 40 jobs that succeeded, each with a webhook to its own URL (no per-URL cap applies)
    settings = succeeded_jobs_with_webhooks(
        sqlite_url, broker_url, [f"http://127.0.0.1:9/hook/{i}" for i in range(NUM_DELIVERIES)])
    database_url = settings.database_url

    # When the dispatcher runs one round, counting the transactions it begins
    begun = []

    def count(connection) -> None:
        if threading.current_thread() is this_thread:  # not the producer's sent-marks thread
            begun.append(connection)

    this_thread = threading.current_thread()
    engine = db.get_engine(database_url)
    event.listen(engine, "begin", count)
    try:
        dispatched = dispatch_due(settings, celery_app=make_webhook_celery(settings))
    finally:
        event.remove(engine, "begin", count)

    # Then every delivery was leased in one transaction and published once with its token
    assert dispatched == NUM_DELIVERIES
    assert len(begun) == 1
    with db.session_factory(database_url)() as session:
        tokens = dict(session.execute(
            select(WebhookDelivery.id, WebhookDelivery.lease_token)).tuples().all())
    messages = redis.Redis.from_url(broker_url).lrange(WEBHOOK_QUEUE, 0, -1)
    assert sorted(map(_task_args, messages)) == sorted(
        [delivery_id, token] for delivery_id, token in tokens.items())
    # And a second round finds nothing due (each is leased until its attempt)
    assert dispatch_due(settings, celery_app=make_webhook_celery(settings)) == 0


def _task_args(message: bytes) -> list:
    """A task's args from its kombu message on Redis (Celery protocol 2: a base64 JSON body)."""
    args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(message)["body"]))
    return args


def test_a_capped_receiver_gets_its_next_delivery_as_soon_as_one_ends(tmp_path, sqlite_url,
                                                                      broker_url):
    # Given 30 deliveries due to one receiver, and a webhook worker that polls every 5 s and
    # keeps at most 2 deliveries in flight per URL
    with receiving() as receiver:
        settings = succeeded_jobs_with_webhooks(sqlite_url, broker_url,
                                                [receiver.url] * NUM_TO_ONE_RECEIVER)
        group = ProcessGroup(tmp_path, {
            **os.environ, "GENQ_DATABASE_URL": settings.database_url,
            "GENQ_BROKER_URL": broker_url, "GENQ_WEBHOOK_ALLOW_PRIVATE": "true",
            "GENQ_WEBHOOK_POLL_SECONDS": "5", "GENQ_WEBHOOK_MAX_IN_FLIGHT_PER_URL": "2"})
        try:
            # When the worker starts
            worker = group.start("webhook-worker", [
                sys.executable, "-m", "cli", "webhook-worker",
                "--hostname", f"webhooks-dispatch-{uuid.uuid4().hex[:6]}@%h"])
            wait_for(lambda: " ready." in worker.log(), 60, "the webhook worker", worker)
            ready = time.monotonic()

            # Then each delivery that ends lets the next one go: all 30 arrive well within
            # two polls (at 2 a poll, they took 15 polls, 70 s)
            wait_for(lambda: len(receiver.requests) >= NUM_TO_ONE_RECEIVER, 60,
                     "every delivery", worker)
            assert receiver.requests[-1].at - ready < 10, receiver.requests[-1].at - ready
        finally:
            group.stop_all()
    assert len(receiver.requests) == NUM_TO_ONE_RECEIVER


def test_a_receiver_with_a_backlog_does_not_starve_the_others(database_url, broker_url):
    # Given 30 deliveries due to one receiver, then one to each of 5 others, and rounds of 10
    backlogged = "http://127.0.0.1:9/slow"
    others = [f"http://127.0.0.1:9/hook/{index}" for index in range(5)]
    settings = succeeded_jobs_with_webhooks(database_url, broker_url, [backlogged] * 30 + others)
    settings = settings.model_copy(update={"webhook_max_in_flight_per_url": 2})
    celery_app = make_webhook_celery(settings)

    # When the dispatcher runs two rounds
    first = dispatch_due(settings, limit=10, celery_app=celery_app)
    second = dispatch_due(settings, limit=10, celery_app=celery_app)

    # Then the first leased 2 to the backlogged receiver (its cap) and one to each other one;
    # the second, none (the backlogged receiver is at its cap; its rows do not fill the round)
    assert (first, second) == (2 + 5, 0)
    with db.session_factory(settings.database_url)() as session:
        leased = session.execute(select(WebhookDelivery.url).where(
            WebhookDelivery.lease_token.is_not(None))).scalars().all()
    assert sorted(leased) == sorted([backlogged] * 2 + others)
