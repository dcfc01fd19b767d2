"""The Worker's window on a real Redis: it holds at most its window of jobs, takes interactive
jobs into a reserve beyond a full window, and a drain hands everything back."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from sqlalchemy import func, select

from genq import db
from genq.models import Job, Tenant
from genq.queues import queue_for
from genq.settings import Settings
from genq.states import JobStatus, Priority
from producer.publisher import publish_job
from tests.conftest import MODEL_CACHE_DIR
from tests.e2e.conftest import redis_db
from workers.celery_app import make_celery
from workers.intake import INTERACTIVE_RESERVE, open_intake

pytestmark = pytest.mark.integration

WORKER_REDIS_DB = 3


def _queue_jobs(settings: Settings, priority: Priority, count: int) -> list[str]:
    """Job rows and their messages, as the producer leaves them."""
    with db.transaction(settings.database_url) as session:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
        session.add(tenant)
        session.flush()
        jobs = [Job(tenant_id=tenant.id, model=settings.model, prompt="hi",
                    priority=priority.value, sampling_params={"max_tokens": 2})
                for _ in range(count)]
        session.add_all(jobs)
        session.flush()
        job_ids = [job.id for job in jobs]
    for job_id in job_ids:
        publish_job(settings.broker_url, job_id, queue_for(settings.model, priority))
    return job_ids


def _count(settings: Settings, status: JobStatus, priority: Priority) -> int:
    with db.session_factory(settings.database_url)() as session:
        return session.scalar(select(func.count()).select_from(Job).where(
            Job.status == status.value, Job.priority == priority.value))


def _eventually(condition, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_full_window_still_takes_interactive_jobs_and_a_drain_hands_all_back(
        redis_url, sqlite_url):
    from engine.echo import EchoEngine
    from workers.engine_loop import EngineLoop
    from workers.worker import Worker

    # given a worker with a window of 4 whose engine never runs (its jobs hold their slots)
    broker_url = redis_db(redis_url, WORKER_REDIS_DB)
    redis.Redis.from_url(broker_url).flushdb()
    settings = Settings(database_url=sqlite_url, broker_url=broker_url,
                        model=f"window-{uuid.uuid4().hex[:6]}", worker_concurrency=2,
                        worker_standby_jobs=2)
    batch = _queue_jobs(settings, Priority.BATCH, 6)
    engine = EngineLoop(lambda: EchoEngine(cache_dir=MODEL_CACHE_DIR))
    worker = Worker(settings, open_intake(make_celery(settings), settings, 4), engine)
    worker.start_taking()

    # then it claims 4 batch jobs, and no more
    assert _eventually(lambda: _count(settings, JobStatus.RUNNING, Priority.BATCH) == 4)
    time.sleep(0.5)
    assert _count(settings, JobStatus.RUNNING, Priority.BATCH) == 4

    # when interactive jobs arrive while no slot is free, the reserve takes them at once
    _queue_jobs(settings, Priority.INTERACTIVE, INTERACTIVE_RESERVE + 1)
    assert _eventually(lambda: _count(settings, JobStatus.RUNNING, Priority.INTERACTIVE)
                       == INTERACTIVE_RESERVE, timeout=2)
    time.sleep(0.5)
    assert _count(settings, JobStatus.RUNNING, Priority.BATCH) == 4

    # when it drains, every job goes back to the queue and every message is settled
    worker.stop_taking()
    worker.begin_drain(0)
    worker.enforce_deadlines()
    assert _eventually(worker.is_idle)
    worker.intake.close()
    assert _count(settings, JobStatus.RUNNING, Priority.BATCH) == 0
    assert _count(settings, JobStatus.QUEUED, Priority.BATCH) == len(batch)
    client = redis.Redis.from_url(broker_url)
    assert (client.hlen("unacked"), client.zcard("unacked_index")) == (0, 0)
