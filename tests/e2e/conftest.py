"""A whole genq stack per test: real DB, real broker, API under gunicorn, Celery worker."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pytest
import redis
from kombu import Connection

from genq.queues import job_queues
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, free_port, make_key
from tests.processes import ProcessGroup, start_api, start_worker

# The e2e tests use their own Redis database so a leftover message never leaks between runs.
E2E_REDIS_DB = 13


@dataclass
class Stack:
    group: ProcessGroup
    api_url: str
    key: str
    database_url: str
    broker_url: str

    def start_worker(self, **kwargs):
        return start_worker(self.group, **kwargs)


def purge_broker(broker_url: str, models: Iterable[str]) -> None:
    """Empty the job queues of `models` (on Redis, the whole test database)."""
    if broker_url.startswith("redis"):
        redis.Redis.from_url(broker_url).flushdb()
        return
    with Connection(broker_url, connect_timeout=5) as conn:
        channel = conn.channel()
        for queue in (queue for model in models for queue in job_queues(broker_url, model)):
            try:
                channel.queue_purge(queue.name)
            except Exception:  # not declared yet: nothing to purge
                channel = conn.channel()


def build_stack(tmp_path, database_url: str, broker_url: str, model: str,
                worker: bool = True, extra_env: dict[str, str] | None = None,
                **worker_kwargs) -> Stack:
    """API (+ a worker): `extra_env` reaches every process of the stack."""
    purge_broker(broker_url, [model])
    env = {
        **os.environ,
        "GENQ_DATABASE_URL": database_url,
        "GENQ_BROKER_URL": broker_url,
        "GENQ_MODEL": model,
        "GENQ_DATA_DIR": str(tmp_path / "data"),
        "GENQ_MODEL_CACHE_DIR": MODEL_CACHE_DIR,
        "GENQ_OUTBOX_STALE_SECONDS": "1",
        "GENQ_OUTBOX_RELAY_INTERVAL_SECONDS": "0.5",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    group = ProcessGroup(tmp_path, env)
    port = free_port()
    start_api(group, port)
    stack = Stack(group, f"http://127.0.0.1:{port}", make_key(database_url), database_url,
                  broker_url)
    if worker:
        stack.start_worker(**worker_kwargs)
    return stack


@pytest.fixture
def stack_factory(tmp_path, request) -> Iterator:
    stacks: list[Stack] = []

    def make(database_url: str, broker_url: str, model: str = TINY_MODEL, **kwargs) -> Stack:
        stack = build_stack(tmp_path, database_url, broker_url, model, **kwargs)
        stacks.append(stack)
        return stack

    yield make
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else True
    for stack in stacks:
        stack.group.stop_all()
        if failed:
            print(stack.group.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def redis_db(redis_url: str, number: int = E2E_REDIS_DB) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{number}"


def parametrized_broker_url(request, redis_db_number: int) -> str:
    """A test's broker by its `redis` / `rabbitmq` parameter: on Redis a database of its own,
    emptied first."""
    if request.param == "redis":
        import redis

        url = redis_db(request.getfixturevalue("redis_url"), redis_db_number)
        redis.Redis.from_url(url).flushdb()
        return url
    return request.getfixturevalue("rabbitmq_url")
