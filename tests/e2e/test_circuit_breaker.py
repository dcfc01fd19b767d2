"""The API's circuit breakers, against real outages.

Broker stopped: submits do not hang on it (each answers within a second, the job waits in the
outbox for the relay; or, with GENQ_SUBMIT_WHEN_BROKER_DOWN=reject, a 503 that writes nothing),
/readyz answers 503 at once, and both recover when it returns.
Database gone: requests answer 503 with Retry-After at once instead of waiting on connects,
and the API recovers when the database is back.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis
import requests
from sqlalchemy import func, select, text

from genq import db
from genq.models import Job, Outbox
from tests.conftest import POSTGRES_URL, free_port
from tests.e2e.conftest import redis_db
from tests.processes import wait_for

BREAKER_REDIS_DB = 9


def _start_redis(port: int, directory) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _redis_answers(port), 10, "redis-server")
    return process


def _redis_answers(port: int) -> bool:
    try:
        return redis.Redis(port=port, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own, so it can be stopped and started again."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing")
    port = free_port()
    servers = [_start_redis(port, tmp_path)]
    yield port, servers
    for server in servers:
        server.terminate()
        server.wait(10)


def _timed(call) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


class Api:
    def __init__(self, stack) -> None:
        self.stack = stack

    def submit(self, idempotency_key: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.stack.key}"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return requests.post(f"{self.stack.api_url}/v1/jobs", timeout=30,
                             json={"prompt": "hi", "max_tokens": 2}, headers=headers)

    def ready(self) -> requests.Response:
        return requests.get(f"{self.stack.api_url}/readyz", timeout=30)


def _outbox_sent(database_url: str, job_id: str) -> bool:
    with db.session_factory(database_url)() as session:
        return session.scalar(select(Outbox.sent_at).where(Outbox.job_id == job_id)) is not None


def test_broker_down_never_hangs_the_api_and_it_recovers(
    stack_factory, sqlite_url, own_redis, tmp_path, monkeypatch
):
    port, servers = own_redis
    monkeypatch.setenv("GENQ_BREAKER_RESET_SECONDS", "1")
    api = Api(stack_factory(sqlite_url, f"redis://127.0.0.1:{port}/0", worker=False))
    assert api.submit().status_code == 202
    servers[0].terminate()
    servers[0].wait(10)
    # The first call to notice the outage pays one bounded timeout and opens the breaker.
    assert api.ready().status_code == 503

    accepted, submit_seconds = _timed(api.submit)
    not_ready, ready_seconds = _timed(api.ready)

    assert accepted.status_code == 202 and submit_seconds < 1.0
    assert not _outbox_sent(sqlite_url, accepted.json()["id"])  # waiting for the relay
    assert not_ready.status_code == 503 and ready_seconds < 1.0
    assert not_ready.json()["checks"]["broker"].startswith("circuit open")

    servers.append(_start_redis(port, tmp_path))
    wait_for(lambda: api.ready().status_code == 200, 15, "/readyz to recover")
    job_id = api.submit().json()["id"]
    # Published by the submit itself; the row is marked sent in the background within 50 ms.
    wait_for(lambda: _outbox_sent(sqlite_url, job_id), 5, "the outbox row to be marked sent")


def test_broker_down_with_reject_mode_answers_503_fast_and_writes_nothing(
    stack_factory, sqlite_url, own_redis, tmp_path, monkeypatch
):
    port, servers = own_redis
    monkeypatch.setenv("GENQ_BREAKER_RESET_SECONDS", "1")
    monkeypatch.setenv("GENQ_SUBMIT_WHEN_BROKER_DOWN", "reject")
    api = Api(stack_factory(sqlite_url, f"redis://127.0.0.1:{port}/0", worker=False))
    first = api.submit(idempotency_key="before-the-outage")
    assert first.status_code == 202
    servers[0].terminate()
    servers[0].wait(10)
    assert api.ready().status_code == 503  # notices the outage, opens the breaker
    jobs_before = _job_count(sqlite_url)

    refused, seconds = _timed(api.submit)
    replay = api.submit(idempotency_key="before-the-outage")

    # A replay needs no broker: it answers with the job it already made.
    assert (replay.status_code, replay.json()["id"]) == (200, first.json()["id"])
    assert refused.status_code == 503 and seconds < 1.0
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert int(refused.headers["Retry-After"]) >= 1
    assert _job_count(sqlite_url) == jobs_before
    servers.append(_start_redis(port, tmp_path))
    wait_for(lambda: api.submit().status_code == 202, 15, "submits to be accepted again")


def _job_count(database_url: str) -> int:
    with db.session_factory(database_url)() as session:
        return session.scalar(select(func.count()).select_from(Job))


def test_database_down_gives_fast_503_and_recovers(stack_factory, postgres_url, redis_url,
                                                   monkeypatch):
    monkeypatch.setenv("GENQ_BREAKER_RESET_SECONDS", "1")
    api = Api(stack_factory(postgres_url, redis_db(redis_url, BREAKER_REDIS_DB), worker=False))
    assert api.submit().status_code == 202
    name = postgres_url.rsplit("/", 1)[1]
    admin = db.make_engine(POSTGRES_URL).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    db.get_engine(postgres_url).dispose()
    assert api.submit().status_code == 503  # notices the outage, opens the breaker

    refused, seconds = _timed(api.submit)
    not_ready, ready_seconds = _timed(api.ready)

    assert refused.status_code == 503 and seconds < 1.0
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert int(refused.headers["Retry-After"]) >= 1
    assert not_ready.status_code == 503 and ready_seconds < 1.0

    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    db.upgrade(postgres_url)
    # The database came back empty: the key is gone, so recovery shows as 401, not 503.
    wait_for(lambda: api.submit().status_code == 401, 15, "the API to recover")
    assert api.ready().status_code == 200
