"""Shared fixtures: real services (Redis, RabbitMQ, PostgreSQL), fresh databases, tenants/keys.

A missing service skips its tests on a laptop; with CI=true it fails them instead, so CI can
never go green by skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from sqlalchemy import text

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REDIS_URL = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("GENQ_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get("GENQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TINY_MODEL = "dummy:tiny-llama"
# Converted SmolLM2 weights are cached across tests and runs (the GGUF dequantizes in ~15 s).
MODEL_CACHE_DIR = os.environ.get(
    "GENQ_TEST_MODEL_CACHE", str(Path(__file__).parents[1] / ".genq" / "test-models")
)


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=2):
            return True
    except OSError:
        return False


def require_service(name: str, url: str) -> None:
    if _reachable(url):
        return
    message = f"{name} is not reachable at {url}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: a missing service is a failure, not a skip)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def empty_redis_db(redis_url: str, number: int) -> Iterator[str]:
    """A fixture's body: the URL of database `number` of the test Redis, empty before the test
    and after it."""
    import redis

    url = urlparse(redis_url)._replace(path=f"/{number}").geturl()
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", REDIS_URL)
    return REDIS_URL


@pytest.fixture
def rabbitmq_url() -> str:
    require_service("RabbitMQ", RABBITMQ_URL)
    return RABBITMQ_URL


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    from genq import db

    url = f"sqlite:///{tmp_path / 'genq.db'}"
    db.upgrade(url)
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database per test (created from the `test` database, then dropped)."""
    require_service("PostgreSQL", POSTGRES_URL)
    from genq import db

    name = f"genq_test_{uuid.uuid4().hex[:12]}"
    admin = db.make_engine(POSTGRES_URL).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    db.upgrade(url)
    yield url
    db.get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    """Run a test on both supported databases."""
    return request.getfixturevalue(f"{request.param}_url")


def make_key(database_url: str, tenant: str = "acme") -> str:
    from genq import db
    from genq.api_keys import create_api_key

    with db.transaction(database_url) as session:
        return create_api_key(session, tenant)


def redis_queue_keys(queue: str) -> list[str]:
    """The Redis lists of a job queue: kombu keeps one per message priority step, the queue's
    own name for step 0 and `<queue><sep><step>` for the others (genq.queues)."""
    from kombu.transport.redis import Channel

    from genq.queues import REDIS_TRANSPORT_OPTIONS

    steps = REDIS_TRANSPORT_OPTIONS["priority_steps"]
    return [queue] + [f"{queue}{Channel.sep}{step}" for step in steps if step]


def redis_queue_messages(broker_url: str, queue: str) -> list[bytes]:
    """Every message waiting in a Redis job queue, whatever its share level."""
    import redis

    client = redis.Redis.from_url(broker_url)
    return [message for key in redis_queue_keys(queue) for message in client.lrange(key, 0, -1)]
