"""Broker down → the API answers 503 in well under a second (no hanging on timeouts) and
/readyz says so; broker back → the API recovers on its own."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import requests

from tests.conftest import free_port
from tests.processes import wait_for


def _start_redis(port: int, directory) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _redis_answers(port), 10, "redis-server")
    return process


def _redis_answers(port: int) -> bool:
    import redis

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


def test_broker_down_gives_fast_503_and_recovers(stack_factory, sqlite_url, own_redis,
                                                 tmp_path, monkeypatch):
    port, servers = own_redis
    monkeypatch.setenv("GENQ_BREAKER_RESET_SECONDS", "1")
    stack = stack_factory(sqlite_url, f"redis://127.0.0.1:{port}/0", worker=False)
    headers = {"Authorization": f"Bearer {stack.key}"}

    def submit() -> requests.Response:
        return requests.post(f"{stack.api_url}/v1/jobs", json={"prompt": "hi", "max_tokens": 2},
                             headers=headers, timeout=30)

    def ready() -> requests.Response:
        return requests.get(f"{stack.api_url}/readyz", timeout=30)

    assert submit().status_code == 202
    servers[0].terminate()
    servers[0].wait(10)
    # The first call to notice the outage pays one bounded timeout and trips the breaker.
    assert ready().status_code == 503

    refused, seconds = _timed(submit)
    not_ready, ready_seconds = _timed(ready)

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert int(refused.headers["Retry-After"]) >= 1
    assert seconds < 1.0
    assert not_ready.status_code == 503 and ready_seconds < 1.0
    assert not_ready.json()["checks"]["broker"].startswith(("circuit open", "error"))

    servers.append(_start_redis(port, tmp_path))
    wait_for(lambda: submit().status_code == 202, 15, "the API to recover")
    assert ready().status_code == 200
