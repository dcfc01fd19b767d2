"""Concurrent single submits of one process share a group commit, on real SQLite and
PostgreSQL and a real Redis: each caller returns with its own row durable and published, and a
job that fails (a limit, a taken idempotency key, a broker down) fails alone."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from genq import db
from genq.errors import ErrorCode, GenqError
from genq.models import Job, Outbox, Tenant
from genq.settings import Settings
from producer.outbox import relay_pending
from producer.schemas import JobRequest
from producer.submit import SubmitResult, _single_submits, submit_job
from tests.conftest import (
    MODEL_CACHE_DIR,
    TINY_MODEL,
    empty_redis_db,
    free_port,
    make_key,
    redis_queue_messages,
)
from tests.integration.test_bulk_submit import (
    DEFAULT_QUEUE,
    make_settings,
    outbox_rows,
    set_tenant_limits,
    wait_until_marked_sent,
)

pytestmark = pytest.mark.integration

GROUP_REDIS_DB = 15


@pytest.fixture
def broker_url(redis_url) -> str:
    yield from empty_redis_db(redis_url, GROUP_REDIS_DB)


@pytest.fixture
def settings(database_url, broker_url):
    return make_settings(database_url, broker_url)


@pytest.fixture
def tenant_id(database_url) -> str:
    make_key(database_url, "acme")
    with db.session_factory(database_url)() as session:
        return session.scalar(select(Tenant.id).where(Tenant.name == "acme"))


def submit_together(settings, tenant_id, calls: list[tuple[JobRequest, str | None]]
                    ) -> list[SubmitResult | Exception]:
    """Submit from one thread per call while the process's committer is held busy, so that
    all of them wait for it and commit as one group."""
    release = threading.Event()
    held = _single_submits(settings.database_url_resolved).submit(lambda session: release.wait(10))
    outcomes: list[SubmitResult | Exception | None] = [None] * len(calls)

    def call(index: int, request: JobRequest, key: str | None) -> None:
        try:
            outcomes[index] = submit_job(settings, tenant_id, request, idempotency_key=key)
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=call, args=(index, request, key))
               for index, (request, key) in enumerate(calls)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # every call has validated its job and waits for the committer
    release.set()
    held.result(10)
    for thread in threads:
        thread.join(20)
    return outcomes


def stored_jobs(settings) -> dict[str, Job]:
    with db.session_factory(settings.database_url)() as session:
        return {job.id: job for job in session.scalars(select(Job))}


def test_a_taken_idempotency_key_in_a_group_fails_alone(settings, tenant_id,
                                                        broker_url):
    same = JobRequest(prompt="twice", max_tokens=4)
    calls = [(JobRequest(prompt=f"Hello {index}", max_tokens=4), None) for index in range(6)]
    calls += [(same, "key-1"), (same, "key-1")]

    outcomes = submit_together(settings, tenant_id, calls)

    assert all(isinstance(outcome, SubmitResult) for outcome in outcomes), outcomes
    keyed = outcomes[6:]
    assert keyed[0].job.id == keyed[1].job.id
    assert sorted(outcome.created for outcome in keyed) == [False, True]
    job_ids = sorted({outcome.job.id for outcome in outcomes})
    assert sorted(stored_jobs(settings)) == job_ids  # 7 jobs, each durable once
    wait_until_marked_sent(settings, job_ids)
    messages = redis_queue_messages(broker_url, DEFAULT_QUEUE)
    assert len(messages) == 7
    assert all(any(job_id.encode() in message for message in messages) for job_id in job_ids)


def test_a_group_over_the_tenants_queue_limit_admits_the_jobs_that_fit(
        settings, tenant_id):
    set_tenant_limits(settings, max_queued_jobs=5)

    outcomes = submit_together(
        settings, tenant_id, [(JobRequest(prompt=f"Hello {index}", max_tokens=4), None)
                              for index in range(8)])

    admitted = [outcome for outcome in outcomes if isinstance(outcome, SubmitResult)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, GenqError)]
    assert len(admitted) == 5 and len(refused) == 3
    assert {error.code for error in refused} == {ErrorCode.RATE_LIMITED}
    assert sorted(stored_jobs(settings)) == sorted(result.job.id for result in admitted)


def test_a_group_submitted_with_the_broker_down_is_committed_and_relayed_later(
        database_url, broker_url, tenant_id):
    down = make_settings(database_url, f"redis://127.0.0.1:{free_port()}/0")

    outcomes = submit_together(down, tenant_id, [
        (JobRequest(prompt=f"Hello {index}", max_tokens=4), None) for index in range(4)])

    job_ids = [outcome.job.id for outcome in outcomes]
    assert sorted(stored_jobs(down)) == sorted(job_ids)
    assert all(row.sent_at is None and row.publish_attempts == 1
               for row in outbox_rows(down, job_ids))
    up = Settings(database_url=database_url, broker_url=broker_url, model=TINY_MODEL,
                  model_cache_dir=MODEL_CACHE_DIR, outbox_stale_seconds=0.01)
    time.sleep(0.05)
    assert relay_pending(up) == 4
    messages = redis_queue_messages(broker_url, DEFAULT_QUEUE)
    assert all(any(job_id.encode() in message for message in messages) for job_id in job_ids)
    with db.session_factory(database_url)() as session:
        assert all(row.sent_at is not None for row in session.scalars(select(Outbox)))


def test_limits_set_just_after_a_submit_apply_to_the_next_one(settings, tenant_id):
    # given a tenant without limits that just submitted (its early refusal's read is skipped
    # for a second after)
    assert submit_job(settings, tenant_id, JobRequest(prompt="first", max_tokens=4)).created
    # when its queue is capped at the one job it has
    set_tenant_limits(settings, max_queued_jobs=1)

    # then its next submit is refused at once, under the lock
    with pytest.raises(GenqError) as refused:
        submit_job(settings, tenant_id, JobRequest(prompt="second", max_tokens=4))
    assert refused.value.code == ErrorCode.RATE_LIMITED
    assert len(stored_jobs(settings)) == 1


def test_a_lone_submit_returns_its_job_as_stored_and_commits_in_the_callers_thread(
        settings, tenant_id, broker_url):
    # (a lone submit pays no hand-off to the committer's thread; its Job is built from the
    # row inserted, not read back)
    request = JobRequest(prompt="alone", max_tokens=4, metadata={"team": "a"},
                         webhook_url=None, timeout_s=60)
    committer = _single_submits(settings.database_url_resolved)
    threads: list[str] = []
    committed_by = committer._commit_group

    def recording(group):
        threads.append(threading.current_thread().name)
        return committed_by(group)

    committer._commit_group = recording
    try:
        job = submit_job(settings, tenant_id, request).job
    finally:
        del committer._commit_group

    assert threads == [threading.current_thread().name]
    stored = stored_jobs(settings)[job.id]
    for column in ("id", "tenant_id", "status", "priority", "model", "prompt", "messages",
                   "sampling_params", "metadata_", "prompt_tokens", "admitted_tokens",
                   "attempts", "idempotency_key", "webhook_url", "output_text"):
        assert getattr(job, column) == getattr(stored, column), column
    assert job.deadline_at.replace(tzinfo=None) == stored.deadline_at.replace(tzinfo=None)
    wait_until_marked_sent(settings, [job.id])
    assert len(redis_queue_messages(broker_url, DEFAULT_QUEUE)) == 1
