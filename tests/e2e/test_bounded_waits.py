"""Waits cannot take the API's request threads: with no worker running (no job ever finishes),
one tenant's many `Prefer: wait` calls leave /healthz, /readyz and other tenants answering."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import make_key
from tests.e2e.conftest import redis_db

WAITS_REDIS_DB = 10
WAIT_SECONDS = 15


def _submit(stack, key: str, prefer: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} | ({"Prefer": prefer} if prefer else {})
    return requests.post(f"{stack.api_url}/v1/jobs", timeout=60, headers=headers,
                         json={"prompt": "Hello there", "max_tokens": 4})


def _timed_submit(stack, key: str, prefer: str) -> tuple[requests.Response, float]:
    began = time.monotonic()
    return _submit(stack, key, prefer), time.monotonic() - began


def test_one_tenants_waits_leave_health_and_other_tenants_answering(stack_factory, sqlite_url,
                                                                    redis_url):
    # given the test API (8 request threads) and no worker, a tenant may hold 2 waits
    stack = stack_factory(sqlite_url, redis_db(redis_url, WAITS_REDIS_DB), worker=False,
                          extra_env={"GENQ_MAX_WAITS_PER_TENANT": "2"})
    other_key = make_key(sqlite_url, "other-team")
    assert _submit(stack, other_key).status_code == 202  # the tokenizer is loaded

    # when one tenant opens 12 calls that would each wait 15 s
    with ThreadPoolExecutor(12) as pool:
        waits = [pool.submit(_timed_submit, stack, stack.key, f"wait={WAIT_SECONDS}")
                 for _ in range(12)]
        time.sleep(1.0)
        # then health, readiness and another tenant's submit answer at once
        for path in ("/healthz", "/readyz"):
            began = time.monotonic()
            assert requests.get(stack.api_url + path, timeout=3).status_code == 200
            assert time.monotonic() - began < 1.0, path
        began = time.monotonic()
        assert _submit(stack, other_key).status_code == 202
        assert time.monotonic() - began < 2.0
        answers = [future.result() for future in waits]

    # and only 2 of the tenant's calls waited; the others got their 202 at once, unwaited
    waited = [r for r, _ in answers if r.headers.get("Preference-Applied")]
    unwaited = [seconds for r, seconds in answers if not r.headers.get("Preference-Applied")]
    assert [r.status_code for r, _ in answers] == [202] * 12
    assert len(waited) == 2
    assert len(unwaited) == 10 and max(unwaited) < WAIT_SECONDS - 5
