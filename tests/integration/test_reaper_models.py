"""The reaper's republish of queued jobs whose broker message was lost looks at each model's own
queue: a lost message of one model is republished, a waiting one of another model is left be.
It sees messages at every fair-share level, and a republished job keeps its level.
Real Redis and both DBs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis
from sqlalchemy import select, update

from genq import db
from genq.models import Outbox, utcnow
from genq.queues import queue_for
from genq.settings import Settings
from genq.states import Priority
from producer.publisher import publish_job
from producer.submit import load_tokenizer_cached
from results_api.app import create_app
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, make_key, redis_queue_keys
from workers.reaper import republish_orphaned_queued

pytestmark = pytest.mark.integration

REAPER_REDIS_DB = 5
OTHER_MODEL = "dummy:tiny-qwen2"


@pytest.fixture
def settings(database_url, redis_url) -> Settings:
    broker_url = urlparse(redis_url)._replace(path=f"/{REAPER_REDIS_DB}").geturl()
    redis.Redis.from_url(broker_url).flushdb()
    load_tokenizer_cached(TINY_MODEL, Path(MODEL_CACHE_DIR))
    yield Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL,
                   models=OTHER_MODEL, model_cache_dir=MODEL_CACHE_DIR)
    redis.Redis.from_url(broker_url).flushdb()


def _outbox_queues(settings: Settings, job_id: str) -> list[str]:
    with db.session_factory(settings.database_url)() as session:
        return list(session.scalars(
            select(Outbox.queue).where(Outbox.job_id == job_id).order_by(Outbox.id)))


def test_a_lost_message_is_republished_to_its_models_queue_only(settings):
    # given one published job per model, both last published long ago
    api = create_app({"GENQ_SETTINGS": settings}).test_client()
    auth = {"Authorization": f"Bearer {make_key(settings.database_url)}"}
    job_ids = {model: api.post("/v1/jobs", headers=auth, json={
        "prompt": "Hello", "max_tokens": 4, "model": model}).get_json()["id"]
        for model in (TINY_MODEL, OTHER_MODEL)}
    long_ago = utcnow() - timedelta(seconds=settings.job_republish_after_seconds + 1)
    with db.transaction(settings.database_url) as session:
        session.execute(update(Outbox).values(sent_at=long_ago))
    # when the broker loses the default model's message only
    broker = redis.Redis.from_url(settings.broker_url)
    lost_queue = queue_for(TINY_MODEL, Priority.DEFAULT)
    assert broker.delete(*redis_queue_keys(lost_queue)) == 1

    republished = republish_orphaned_queued(settings)

    # then that job gets a new run message for its own queue, the other job none
    assert republished == 1
    assert _outbox_queues(settings, job_ids[TINY_MODEL]) == [lost_queue, lost_queue]
    assert _outbox_queues(settings, job_ids[OTHER_MODEL]) == [
        queue_for(OTHER_MODEL, Priority.DEFAULT)]


def _submit_published_long_ago(settings: Settings, share_level: int) -> str:
    """One job of TINY_MODEL whose message went out long ago at `share_level`."""
    api = create_app({"GENQ_SETTINGS": settings}).test_client()
    auth = {"Authorization": f"Bearer {make_key(settings.database_url)}"}
    job_id = api.post("/v1/jobs", headers=auth, json={"prompt": "Hi", "max_tokens": 4}
                      ).get_json()["id"]
    long_ago = utcnow() - timedelta(seconds=settings.job_republish_after_seconds + 1)
    with db.transaction(settings.database_url) as session:
        session.execute(update(Outbox).values(sent_at=long_ago, share_level=share_level))
    return job_id


def _outbox_levels(settings: Settings, job_id: str) -> list[int]:
    with db.session_factory(settings.database_url)() as session:
        return list(session.scalars(
            select(Outbox.share_level).where(Outbox.job_id == job_id).order_by(Outbox.id)))


def test_a_lost_message_is_republished_at_its_share_level(settings):
    # given a job whose level-2 message the broker lost
    job_id = _submit_published_long_ago(settings, share_level=2)
    queue = queue_for(TINY_MODEL, Priority.DEFAULT)
    redis.Redis.from_url(settings.broker_url).delete(*redis_queue_keys(queue))

    # when the reaper republishes it, then at the same level: the loss moves it no place ahead
    assert republish_orphaned_queued(settings) == 1
    assert _outbox_levels(settings, job_id) == [2, 2]


def test_a_message_waiting_at_any_share_level_keeps_its_queue_from_looking_empty(settings):
    # given an old queued job and, in its model's default queue, a message at level 2 only
    job_id = _submit_published_long_ago(settings, share_level=0)
    queue = queue_for(TINY_MODEL, Priority.DEFAULT)
    redis.Redis.from_url(settings.broker_url).delete(*redis_queue_keys(queue))
    publish_job(settings.broker_url, "job_waiting_at_level_2", queue, share_level=2)

    # then the reaper does not take the job's message for lost
    assert republish_orphaned_queued(settings) == 0
    assert _outbox_levels(settings, job_id) == [0]
