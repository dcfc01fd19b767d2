"""Per-tenant limits through the real API (gunicorn) and the real `genq tenants set-limits`:
over a limit → 429 with OpenAI-style headers and no job row; other tenants unaffected;
concurrent submits never exceed the limit."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import requests
from sqlalchemy import func, select

from genq import db
from genq.models import Job, Tenant
from tests.conftest import make_key
from tests.e2e.conftest import redis_db

LIMITS_REDIS_DB = 11


def _set_limits(stack, tenant: str, *options: str) -> None:
    subprocess.run([sys.executable, "-m", "cli", "tenants", "set-limits", tenant, *options],
                   env=stack.group.env, check=True, capture_output=True, timeout=60)


def _submit(stack, key: str, max_tokens: int = 8) -> requests.Response:
    return requests.post(f"{stack.api_url}/v1/jobs", timeout=30,
                         json={"prompt": "Hello there", "max_tokens": max_tokens},
                         headers={"Authorization": f"Bearer {key}"})


def _job_rows(database_url: str, tenant: str) -> int:
    with db.session_factory(database_url)() as session:
        return session.scalar(select(func.count()).select_from(Job).join(Tenant)
                              .where(Tenant.name == tenant))


def test_tenant_over_its_rpm_gets_429_with_headers_and_no_job_row(
    stack_factory, postgres_url, redis_url
):
    stack = stack_factory(postgres_url, redis_db(redis_url, LIMITS_REDIS_DB), worker=False)
    other_key = make_key(postgres_url, "other-team")
    _set_limits(stack, "acme", "--rpm", "2")

    accepted = [_submit(stack, stack.key).status_code for _ in range(2)]
    refused = _submit(stack, stack.key)

    assert accepted == [202, 202]
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert _job_rows(postgres_url, "acme") == 2
    assert [_submit(stack, other_key).status_code for _ in range(3)] == [202, 202, 202]


def test_tokens_queue_and_max_tokens_limits(stack_factory, sqlite_url, redis_url):
    stack = stack_factory(sqlite_url, redis_db(redis_url, LIMITS_REDIS_DB), worker=False)
    queue_key = make_key(sqlite_url, "small-queue")
    _set_limits(stack, "acme", "--tpm", "150", "--max-tokens-per-job", "100")
    _set_limits(stack, "small-queue", "--max-queued-jobs", "1")

    first, second = _submit(stack, stack.key, 100), _submit(stack, stack.key, 100)
    too_long = _submit(stack, stack.key, 101)
    queued, over_queue = _submit(stack, queue_key), _submit(stack, queue_key)

    assert (first.status_code, second.status_code) == (202, 429), second.text
    assert second.headers["x-ratelimit-limit-tokens"] == "150"
    assert 0 < int(second.headers["x-ratelimit-remaining-tokens"]) < 50
    assert "Retry-After" in second.headers
    assert too_long.status_code == 422 and too_long.json()["error"]["param"] == "max_tokens"
    assert (queued.status_code, over_queue.status_code) == (202, 429)
    assert _job_rows(sqlite_url, "acme") == 1
    assert _job_rows(sqlite_url, "small-queue") == 1


def test_concurrent_submits_never_exceed_the_limit(stack_factory, database_url, redis_url):
    stack = stack_factory(database_url, redis_db(redis_url, LIMITS_REDIS_DB), worker=False)
    _set_limits(stack, "acme", "--rpm", "5")
    _submit(stack, make_key(database_url, "warm-up"))  # the tokenizer loads once, first

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(lambda _: _submit(stack, stack.key).status_code, range(24)))

    assert sorted(codes) == [202] * 5 + [429] * 19
    assert _job_rows(database_url, "acme") == 5
