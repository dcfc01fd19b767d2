"""JobRunner against a real SQLite DB and the echo engine behind a real EngineLoop."""

from __future__ import annotations

from datetime import timedelta

from genq import db
from genq.models import Job, Tenant, utcnow
from genq.settings import Settings
from genq.states import JobStatus
from tests.conftest import MODEL_CACHE_DIR


def _echo_settings(url: str) -> Settings:
    return Settings(database_url=url, broker_url="redis://unused", model="echo")


def _queued_job(url: str, **values) -> str:
    with db.transaction(url) as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, model="echo", prompt="hello there",
                  sampling_params={"max_tokens": 4, "temperature": 0}, **values)
        session.add(job)
        session.flush()
        return job.id


def test_deadline_passing_before_the_engine_admits_the_job_expires_it(sqlite_url):
    # Regression: a request aborted before admission used to leave its job `running` forever.
    from engine.echo import EchoEngine
    from workers.engine_loop import EngineLoop
    from workers.job_runner import JobRunner

    job_id = _queued_job(sqlite_url, deadline_at=utcnow() + timedelta(seconds=1))
    loop = EngineLoop(lambda: EchoEngine(cache_dir=MODEL_CACHE_DIR))  # never started: nothing runs
    runner = JobRunner(_echo_settings(sqlite_url), loop)

    runner.run(job_id)

    with db.session_factory(sqlite_url)() as session:
        job = session.get(Job, job_id)
    assert job.status == JobStatus.EXPIRED
    assert job.finished_at is not None and job.output_text is None


def test_a_job_runs_once_and_a_second_delivery_is_a_no_op(sqlite_url):
    from engine.echo import EchoEngine
    from workers.engine_loop import EngineLoop
    from workers.job_runner import JobRunner

    job_id = _queued_job(sqlite_url)
    loop = EngineLoop(lambda: EchoEngine(cache_dir=MODEL_CACHE_DIR))
    loop.start()
    runner = JobRunner(_echo_settings(sqlite_url), loop)
    try:
        runner.run(job_id)
        runner.run(job_id)
    finally:
        loop.stop(timeout=5)

    with db.session_factory(sqlite_url)() as session:
        job = session.get(Job, job_id)
    assert (job.status, job.attempts, job.output_text) == (JobStatus.SUCCEEDED, 1, "hello there")
