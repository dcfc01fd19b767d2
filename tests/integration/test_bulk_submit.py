"""Bulk submit (`submit_jobs`, `POST /v1/jobs/bulk`) on real SQLite and PostgreSQL and real
Redis and RabbitMQ: all jobs or none, limits on the whole call, share levels along the call."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import kombu
import pytest
import redis
from sqlalchemy import func, select

from genq import db
from genq.errors import ErrorCode, GenqError
from genq.limits import TenantLimits, set_limits
from genq.models import Job, Outbox, Tenant
from genq.queues import job_queues, queue_for
from genq.settings import Settings
from genq.states import JobStatus, Priority
from producer.schemas import MAX_JOBS_PER_BULK, JobRequest
from producer.submit import load_tokenizer_cached, submit_job, submit_jobs
from results_api.app import create_app
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, make_key, redis_queue_messages
from tests.e2e.conftest import redis_db

pytestmark = pytest.mark.integration

BULK_REDIS_DB = 3
DEFAULT_QUEUE = queue_for(TINY_MODEL, Priority.DEFAULT)


@pytest.fixture
def broker_url(redis_url) -> str:
    url = redis_db(redis_url, BULK_REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


def make_settings(database_url: str, broker_url: str, model: str = TINY_MODEL) -> Settings:
    load_tokenizer_cached(model, Path(MODEL_CACHE_DIR))
    return Settings(database_url=database_url, broker_url=broker_url, model=model,
                    model_cache_dir=MODEL_CACHE_DIR, max_model_len=64)


@pytest.fixture
def settings(database_url, broker_url) -> Settings:
    return make_settings(database_url, broker_url)


@pytest.fixture
def tenant_id(settings) -> str:
    make_key(settings.database_url, "acme")
    with db.session_factory(settings.database_url)() as session:
        return session.scalar(select(Tenant.id).where(Tenant.name == "acme"))


def requests_(count: int, max_tokens: int = 4) -> list[JobRequest]:
    return [JobRequest(prompt=f"Hello {index}", max_tokens=max_tokens,
                       metadata={"index": str(index)}) for index in range(count)]


def count_rows(settings: Settings, model: type[Job] | type[Outbox]) -> int:
    with db.session_factory(settings.database_url)() as session:
        return session.scalar(select(func.count()).select_from(model))


def outbox_rows(settings: Settings, job_ids: list[str]) -> list[Outbox]:
    with db.session_factory(settings.database_url)() as session:
        by_job = {row.job_id: row for row in session.scalars(select(Outbox))}
    return [by_job[job_id] for job_id in job_ids]


def wait_until_marked_sent(settings: Settings, job_ids: list[str], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while any(row.sent_at is None for row in outbox_rows(settings, job_ids)):
        assert time.monotonic() < deadline, "the outbox rows were never marked sent"
        time.sleep(0.02)


def set_tenant_limits(settings: Settings, **limits: int) -> None:
    with db.transaction(settings.database_url) as session:
        set_limits(session, "acme", TenantLimits(**limits))


# --- submit_jobs ------------------------------------------------------------------------


def test_bulk_writes_every_job_and_outbox_row_and_publishes_them(settings, tenant_id,
                                                                 broker_url):
    results = submit_jobs(settings, tenant_id, requests_(25))

    job_ids = [result.job.id for result in results]
    assert [result.job.metadata_["index"] for result in results] == [str(i) for i in range(25)]
    assert all(result.created and result.job.status == JobStatus.QUEUED.value
               for result in results)
    assert count_rows(settings, Job) == 25 and count_rows(settings, Outbox) == 25
    with db.session_factory(settings.database_url)() as session:
        stored = session.get(Job, job_ids[3])
    assert (stored.prompt, stored.prompt_tokens, stored.metadata_) == (
        "Hello 3", results[3].job.prompt_tokens, {"index": "3"})
    wait_until_marked_sent(settings, job_ids)
    messages = redis_queue_messages(broker_url, DEFAULT_QUEUE)
    assert len(messages) == 25
    assert {job_id for job_id in job_ids if any(job_id.encode() in m for m in messages)} == set(
        job_ids)


def test_an_invalid_job_in_a_bulk_writes_nothing(settings, tenant_id):
    bulk = requests_(5)
    bulk[3] = JobRequest(prompt="word " * 100, max_tokens=4)  # over max_model_len (64)

    with pytest.raises(GenqError) as refused:
        submit_jobs(settings, tenant_id, bulk)

    assert refused.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert refused.value.param == "jobs.3.prompt"
    assert refused.value.message.startswith("jobs.3: ")
    assert count_rows(settings, Job) == 0 and count_rows(settings, Outbox) == 0


def test_a_bulk_over_the_limit_is_refused_whole(settings, tenant_id):
    # given a tenant allowed 5 requests per minute that has used 3
    set_tenant_limits(settings, requests_per_minute=5)
    submit_jobs(settings, tenant_id, requests_(3))

    # when it submits 3 more at once, then none of them is queued
    with pytest.raises(GenqError) as refused:
        submit_jobs(settings, tenant_id, requests_(3))
    assert refused.value.http_status == 429
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "2"
    assert count_rows(settings, Job) == 3

    # and the 2 that fit are admitted
    assert len(submit_jobs(settings, tenant_id, requests_(2))) == 2
    assert count_rows(settings, Job) == 5


def test_a_bulk_is_counted_whole_against_the_queue_and_the_token_limits(settings, tenant_id):
    set_tenant_limits(settings, max_queued_jobs=4, tokens_per_minute=1000)
    submit_jobs(settings, tenant_id, requests_(3))

    with pytest.raises(GenqError) as queue_full:
        submit_jobs(settings, tenant_id, requests_(2))
    with pytest.raises(GenqError) as too_many_tokens:
        submit_jobs(settings, tenant_id, requests_(3, max_tokens=400))
    with pytest.raises(GenqError) as never_fits:
        submit_jobs(settings, tenant_id, requests_(5))

    assert queue_full.value.http_status == 429
    assert too_many_tokens.value.http_status == 422  # 1200 tokens at once: never within 1000
    assert (never_fits.value.http_status, never_fits.value.param) == (422, "jobs")
    assert count_rows(settings, Job) == 3


def test_a_job_over_the_tenants_max_tokens_is_named(settings, tenant_id):
    set_tenant_limits(settings, max_tokens_per_job=8)
    bulk = requests_(3)
    bulk[1] = JobRequest(prompt="Hello", max_tokens=9)

    with pytest.raises(GenqError) as refused:
        submit_jobs(settings, tenant_id, bulk)

    assert (refused.value.http_status, refused.value.param) == (422, "jobs.1.max_tokens")
    assert count_rows(settings, Job) == 0


def test_share_levels_increase_along_the_bulk(settings, tenant_id):
    # given a tenant with 8 queued default jobs
    submit_jobs(settings, tenant_id, requests_(8))

    # when it submits 5 default jobs and an interactive one at once
    bulk = requests_(5)
    bulk.insert(2, JobRequest(prompt="Now", max_tokens=4, priority=Priority.INTERACTIVE))
    results = submit_jobs(settings, tenant_id, bulk)

    # then each default job counts the ones before it (backlog 8, 9, 10, 11, 12; level 1
    # from 10 on), and the interactive one has its own, empty backlog
    levels = [row.share_level for row in outbox_rows(settings, [r.job.id for r in results])]
    assert levels == [0, 0, 0, 1, 1, 1]
    assert outbox_rows(settings, [results[2].job.id])[0].queue == queue_for(
        TINY_MODEL, Priority.INTERACTIVE)
    # and a single submit after it continues from the same backlog (13)
    single = submit_job(settings, tenant_id, requests_(1)[0])
    assert outbox_rows(settings, [single.job.id])[0].share_level == 1


def test_too_many_or_no_jobs_are_refused(settings, tenant_id):
    with pytest.raises(GenqError) as too_many:
        submit_jobs(settings, tenant_id, requests_(MAX_JOBS_PER_BULK + 1))
    with pytest.raises(GenqError) as none:
        submit_jobs(settings, tenant_id, [])

    assert (too_many.value.http_status, none.value.http_status) == (413, 422)
    assert count_rows(settings, Job) == 0


def test_a_bulk_reaches_the_rabbitmq_priority_queue(database_url, rabbitmq_url):
    model = f"dummy:bulk-{uuid.uuid4().hex[:8]}"  # a queue of this test alone
    settings = make_settings(database_url, rabbitmq_url, model)
    make_key(database_url, "acme")
    with db.session_factory(database_url)() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == "acme"))

    results = submit_jobs(settings, tenant_id, requests_(12))

    with kombu.Connection(rabbitmq_url) as connection:
        queue = job_queues(rabbitmq_url, model)[-1](connection.channel())  # default's
        received = []
        while (message := queue.get(no_ack=True)) is not None:
            received.append(message.headers["argsrepr"])
        queue.delete()
    assert sorted(received) == sorted(repr([result.job.id]) for result in results)


# --- POST /v1/jobs/bulk -----------------------------------------------------------------


@pytest.fixture
def client(settings, tenant_id):
    api = create_app({"GENQ_SETTINGS": settings}).test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(settings.database_url, 'acme')}"
    return api


def test_bulk_route_answers_202_with_the_jobs_in_the_shape_of_single_submits(client):
    single = client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 4}).get_json()

    response = client.post("/v1/jobs/bulk", json={"jobs": [
        {"prompt": "Hi", "max_tokens": 4, "metadata": {"n": "0"}},
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "priority": "batch"},
    ]})

    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert body["object"] == "list" and len(body["data"]) == 2
    first, second = body["data"]
    assert set(first) == set(single)
    assert (first["status"], first["metadata"], second["priority"]) == ("queued", {"n": "0"},
                                                                       "batch")
    assert client.get(f"/v1/jobs/{second['id']}").get_json()["id"] == second["id"]


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"jobs": [{"prompt": "Hi"}] * (MAX_JOBS_PER_BULK + 1)}, 413, "payload_too_large", "jobs"),
    ({"jobs": []}, 422, "invalid_request", "jobs"),
    ({"jobs": [{"prompt": "Hi"}, {"prompt": "Hi", "max_tokens": 0}]}, 422, "invalid_request",
     "jobs.1.max_tokens"),
    ({"jobs": [{"prompt": "Hi", "temprature": 1}]}, 422, "invalid_request",
     "jobs.0.temprature"),
    ({"jobs": [{"prompt": "Hi", "model": "nope"}]}, 422, "invalid_request", "jobs.0.model"),
    ({"job": []}, 422, "invalid_request", "jobs"),
])
def test_bulk_route_errors_name_the_job(client, settings, body, status, code, param):
    response = client.post("/v1/jobs/bulk", json=body)

    assert response.status_code == status, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == code
    assert response.get_json()["error"]["param"] == param
    assert count_rows(settings, Job) == 0


def test_bulk_route_bad_json_is_400(client):
    response = client.post("/v1/jobs/bulk", data="{not json", content_type="application/json")

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_json"


@contextmanager
def write_lock_held(settings: Settings, tenant_id: str) -> Iterator[None]:
    """Another writer in a long transaction: SQLite's database lock (BEGIN IMMEDIATE), or the
    tenant's row lock on PostgreSQL (as another submit of the tenant holds while it admits)."""
    with db.get_engine(settings.database_url).connect() as connection:
        if settings.database_url.startswith("sqlite"):
            connection.connection.dbapi_connection.execute("BEGIN IMMEDIATE")
        else:
            connection.execute(select(Tenant.id).where(Tenant.id == tenant_id)
                               .with_for_update())
        try:
            yield
        finally:
            if settings.database_url.startswith("sqlite"):
                connection.connection.dbapi_connection.execute("ROLLBACK")
            else:
                connection.rollback()


def test_a_tenant_over_its_limit_is_refused_without_waiting_for_the_write_lock(settings,
                                                                               tenant_id):
    # given a tenant whose minute is used up, while another transaction holds the write lock
    set_tenant_limits(settings, requests_per_minute=2)
    submit_jobs(settings, tenant_id, requests_(2))
    # (the pool is left after the lock: a submit still waiting for it can then finish)
    with ThreadPoolExecutor(1) as pool, write_lock_held(settings, tenant_id):
        # when it submits again
        started = time.monotonic()
        done, _ = wait([pool.submit(submit_job, settings, tenant_id, requests_(1)[0])],
                       timeout=5)
        elapsed = time.monotonic() - started

    # then it is refused at once, not once the lock is free (a burst of refused calls used
    # to queue every writer behind them, one at a time)
    assert done, "the refusal waited for the write lock"
    refused = next(iter(done)).exception()
    assert isinstance(refused, GenqError) and refused.http_status == 429, refused
    assert elapsed < 2
    # and a submit that fits still goes through the locked admission
    set_tenant_limits(settings, requests_per_minute=3)
    assert submit_job(settings, tenant_id, requests_(1)[0]).created
    assert count_rows(settings, Job) == 3
