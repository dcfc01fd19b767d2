"""Fair share inside a priority class: a tenant's backlog in one model and class sets the share
level of its next job (both DBs), and on both real brokers a worker's consumer takes the classes
strictly in order and, inside a class, the lower levels first."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
from kombu import Connection, Consumer
from sqlalchemy import insert, select

from genq import db
from genq.fair_share import level_for_backlog, share_level
from genq.models import Job, Outbox, Tenant
from genq.queues import job_queues, queue_for
from genq.settings import Settings
from genq.states import JobStatus, Priority
from producer.publisher import publish_job
from producer.submit import load_tokenizer_cached
from results_api.app import create_app
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, make_key
from tests.e2e.conftest import parametrized_broker_url, redis_db
from workers.celery_app import make_celery

pytestmark = pytest.mark.integration

FAIR_SHARE_REDIS_DB = 4
OTHER_MODEL = "dummy:tiny-qwen2"


def _tenant(database_url: str, name: str) -> str:
    with db.transaction(database_url) as session:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
        return tenant.id


def _add_jobs(database_url: str, tenant_id: str, count: int, *, model: str = TINY_MODEL,
              priority: Priority = Priority.DEFAULT,
              status: JobStatus = JobStatus.QUEUED) -> None:
    with db.transaction(database_url) as session:
        session.execute(insert(Job), [
            {"id": f"job_{uuid.uuid4().hex}", "tenant_id": tenant_id, "status": status.value,
             "priority": priority.value, "model": model, "prompt": "x"} for _ in range(count)])


def _level(database_url: str, tenant_id: str, model: str = TINY_MODEL,
           priority: Priority = Priority.DEFAULT) -> int:
    with db.get_engine(database_url).connect() as connection:
        return share_level(connection, tenant_id, model, priority)


def test_a_tenants_backlog_maps_to_its_share_level():
    assert [level_for_backlog(n) for n in (0, 9, 10, 99, 100, 50_000)] == [0, 0, 1, 1, 2, 2]


def test_the_backlog_is_the_tenants_queued_jobs_of_that_model_and_class(database_url):
    # given a tenant with 15 queued default jobs, and much more that must not count: its
    # running jobs, its jobs of another model or class, another tenant's jobs
    noisy, quiet = _tenant(database_url, "noisy"), _tenant(database_url, "quiet")
    _add_jobs(database_url, noisy, 15)
    _add_jobs(database_url, noisy, 150, status=JobStatus.RUNNING)
    _add_jobs(database_url, noisy, 150, model=OTHER_MODEL)
    _add_jobs(database_url, noisy, 150, priority=Priority.INTERACTIVE)
    _add_jobs(database_url, quiet, 150)

    # then each (tenant, model, class) has the level of its own queued backlog
    assert _level(database_url, noisy) == 1
    assert _level(database_url, noisy, priority=Priority.INTERACTIVE) == 2
    assert _level(database_url, noisy, model=OTHER_MODEL) == 2
    assert _level(database_url, noisy, priority=Priority.BATCH) == 0
    assert _level(database_url, quiet) == 2
    assert _level(database_url, _tenant(database_url, "new")) == 0


def test_submit_stores_the_tenants_level_on_the_outbox_row(database_url, redis_url):
    # given a tenant with 10 queued default jobs
    broker_url = redis_db(redis_url, FAIR_SHARE_REDIS_DB)
    redis.Redis.from_url(broker_url).flushdb()
    load_tokenizer_cached(TINY_MODEL, Path(MODEL_CACHE_DIR))
    settings = Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL,
                        model_cache_dir=MODEL_CACHE_DIR)
    api = create_app({"GENQ_SETTINGS": settings}).test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(database_url, 'acme')}"
    with db.session_factory(database_url)() as session:
        acme = session.scalar(select(Tenant.id).where(Tenant.name == "acme"))
    _add_jobs(database_url, acme, 10)

    # when it submits one more, then its run message is at level 1 in that class
    job_id = api.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 4}).get_json()["id"]
    with db.session_factory(database_url)() as session:
        outbox = session.scalar(select(Outbox).where(Outbox.job_id == job_id))
    assert (outbox.queue, outbox.share_level) == (queue_for(TINY_MODEL, Priority.DEFAULT), 1)
    redis.Redis.from_url(broker_url).flushdb()


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request) -> str:
    return parametrized_broker_url(request, FAIR_SHARE_REDIS_DB)


def test_a_worker_takes_classes_strictly_in_order_and_lower_levels_first(broker_url):
    # given messages of every class at the least and the most favoured level, published in
    # the reverse of their serving order, for a model of this test alone
    model = f"fair-share-{uuid.uuid4().hex[:8]}"
    serving_order = [(priority, level) for priority in Priority for level in (0, 2)]
    for priority, level in reversed(serving_order):
        publish_job(broker_url, f"{priority.value}-{level}", queue_for(model, priority), level)

    # when a consumer configured as a worker of that model takes them one at a time
    app = make_celery(Settings(broker_url=broker_url, model=model))
    taken: list[str] = []

    def take(body, message) -> None:
        taken.append(body[0][0])  # Celery's message body: (args, kwargs, embed)
        message.ack()

    with Connection(broker_url, transport_options=app.conf.broker_transport_options) as conn:
        queues = job_queues(broker_url, model)
        if broker_url.startswith("redis"):  # one consumer polls the class lists in order
            rounds = [(queues, len(serving_order))]
        else:  # RabbitMQ: interactive has a queue of its own (a worker's reserve takes it
            # beyond a full window); each queue in turn, interactive first, in priority order
            interactive = sum(1 for priority, _ in serving_order
                              if priority is Priority.INTERACTIVE)
            rounds = [([queues[0]], interactive), ([queues[1]], len(serving_order) - interactive)]
        for consumed, count in rounds:
            goal = len(taken) + count
            with Consumer(conn, consumed, callbacks=[take], accept=["json"], prefetch_count=1):
                while len(taken) < goal:
                    conn.drain_events(timeout=5)
        for queue in queues:
            queue(conn.channel()).delete()

    # then an interactive job of the most favoured level comes before any default job
    assert taken == [f"{priority.value}-{level}" for priority, level in serving_order]
