"""The webhook dispatcher's round on real SQLite and Redis: every due delivery is leased in
one write transaction (one wait for SQLite's write lock, not one per delivery), and each is
published once, after the commit, under the token its row holds."""

from __future__ import annotations

import base64
import json
import threading
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
from tests.webhook_receiver import webhook_test_broker_url
from workers.webhook_worker import WEBHOOK_QUEUE, dispatch_due, make_webhook_celery

pytestmark = pytest.mark.integration

NUM_DELIVERIES = 40


@pytest.fixture
def broker_url():
    url = webhook_test_broker_url()
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


def test_a_round_leases_every_due_delivery_in_one_transaction(tmp_path, broker_url):
    # Given 40 jobs that succeeded, each with a webhook to its own URL (no per-URL cap applies)
    database_url = f"sqlite:///{tmp_path / 'genq.db'}"
    db.upgrade(database_url)
    load_tokenizer_cached(TINY_MODEL, Path(MODEL_CACHE_DIR))
    settings = Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL,
                        model_cache_dir=Path(MODEL_CACHE_DIR), webhook_allow_private=True)
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    auth = {"Authorization": f"Bearer {make_key(database_url)}"}
    assert client.post("/v1/webhook-secret", headers=auth).status_code == 201
    for index in range(NUM_DELIVERIES):
        response = client.post("/v1/jobs", headers=auth, json={
            "prompt": "Hi", "max_tokens": 2, "webhook_url": f"http://127.0.0.1:9/hook/{index}",
            "webhook_events": ["succeeded"]})
        assert response.status_code == 202, response.json
        for state in (JobStatus.RUNNING, JobStatus.SUCCEEDED):
            with db.transaction(database_url) as session:
                assert transition(session, response.json["id"], state)

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
