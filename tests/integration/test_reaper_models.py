"""The reaper's republish of queued jobs whose broker message was lost looks at each model's own
queue: a lost message of one model is republished, a waiting one of another model is left be.
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
from producer.submit import load_tokenizer_cached
from results_api.app import create_app
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, make_key
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
    assert broker.delete(lost_queue) == 1

    republished = republish_orphaned_queued(settings)

    # then that job gets a new run message for its own queue, the other job none
    assert republished == 1
    assert _outbox_queues(settings, job_ids[TINY_MODEL]) == [lost_queue, lost_queue]
    assert _outbox_queues(settings, job_ids[OTHER_MODEL]) == [
        queue_for(OTHER_MODEL, Priority.DEFAULT)]
