"""Which models the API accepts (GENQ_MODEL, GENQ_MODELS, models of live workers), the 422 for
any other, `GET /v1/models`, and the queue each model's job lands in. Real Redis and both DBs;
workers are stood in for by their heartbeat rows (the e2e tests run real ones)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from genq import db
from genq.model_catalog import LIVE_MODELS_TTL_SECONDS
from genq.models import Job, Outbox, Worker, utcnow
from genq.queues import queue_for
from genq.settings import Settings
from genq.states import Priority
from producer.submit import load_tokenizer_cached
from results_api.app import create_app
from tests.conftest import (
    MODEL_CACHE_DIR,
    TINY_MODEL,
    empty_redis_db,
    make_key,
    redis_queue_messages,
)
from workers import heartbeat

pytestmark = pytest.mark.integration

CATALOG_REDIS_DB = 6
CONFIGURED_MODEL = "dummy:tiny-qwen2"
WORKER_MODEL = "dummy:tiny-qwen3"


@pytest.fixture
def broker_url(redis_url) -> Iterator[str]:
    yield from empty_redis_db(redis_url, CATALOG_REDIS_DB)


@pytest.fixture
def settings(database_url, broker_url) -> Settings:
    load_tokenizer_cached(TINY_MODEL, Path(MODEL_CACHE_DIR))
    return Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL,
                    models=f" {CONFIGURED_MODEL} ,{TINY_MODEL}", model_cache_dir=MODEL_CACHE_DIR)


@pytest.fixture
def api(settings):
    client = create_app({"GENQ_SETTINGS": settings}).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(settings.database_url)}"
    return client


def _submit(api, model: str | None):
    body = {"prompt": "Hello", "max_tokens": 4} | ({"model": model} if model else {})
    return api.post("/v1/jobs", json=body)


def _job_count(settings: Settings) -> int:
    with db.session_factory(settings.database_url)() as session:
        return session.scalar(select(func.count()).select_from(Job))


def _start_worker_heartbeat(settings: Settings, model: str, worker_id: str) -> None:
    heartbeat.beat(settings.model_copy(update={"model": model}), worker_id, num_running=0)


def test_unknown_model_is_422_listing_the_available_models(api, settings):
    _start_worker_heartbeat(settings, WORKER_MODEL, "gpu-host:1")

    response = _submit(api, "gpt-5")

    assert response.status_code == 422
    error = response.get_json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "model")
    for model in (TINY_MODEL, CONFIGURED_MODEL, WORKER_MODEL):
        assert repr(model) in error["message"]
    assert _job_count(settings) == 0


@pytest.mark.parametrize("model", [None, TINY_MODEL, CONFIGURED_MODEL])
def test_a_configured_model_is_accepted_into_its_own_queue(api, settings, broker_url, model):
    response = _submit(api, model)

    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert job["model"] == (model or TINY_MODEL)
    with db.session_factory(settings.database_url)() as session:
        outbox = session.scalar(select(Outbox).where(Outbox.job_id == job["id"]))
    assert outbox.queue == queue_for(job["model"], Priority.DEFAULT)
    assert len(redis_queue_messages(broker_url, outbox.queue)) == 1
    other = CONFIGURED_MODEL if job["model"] == TINY_MODEL else TINY_MODEL
    assert redis_queue_messages(broker_url, queue_for(other, Priority.DEFAULT)) == []


def test_a_live_workers_model_is_accepted_and_a_gone_workers_is_not(api, settings):
    _start_worker_heartbeat(settings, WORKER_MODEL, "gpu-host:1")
    assert _submit(api, WORKER_MODEL).status_code == 202

    # when its worker falls silent for longer than worker_live_seconds
    silent_since = utcnow() - timedelta(seconds=settings.worker_live_seconds + 1)
    with db.transaction(settings.database_url) as session:
        session.execute(update(Worker).values(last_heartbeat_at=silent_since))
    time.sleep(LIVE_MODELS_TTL_SECONDS)  # the API trusts its view of live models this long

    assert _submit(api, WORKER_MODEL).status_code == 422


def test_models_lists_known_models_with_their_live_workers(api, settings):
    _start_worker_heartbeat(settings, WORKER_MODEL, "gpu-host:1")
    _start_worker_heartbeat(settings, WORKER_MODEL, "gpu-host:2")
    _start_worker_heartbeat(settings, TINY_MODEL, "cpu-host:1")

    listed = api.get("/v1/models").get_json()

    assert listed["object"] == "list"
    assert [(m["id"], m["object"], m["live_workers"], m["status"]) for m in listed["data"]] == [
        (TINY_MODEL, "model", 1, "available"),
        (CONFIGURED_MODEL, "model", 0, "no_live_worker"),
        (WORKER_MODEL, "model", 2, "available"),
    ]
    assert all(m["created"] > 0 for m in listed["data"] if m["live_workers"])
