"""Waits cannot take the API's request threads: with no worker running (no job ever finishes),
one tenant's many `Prefer: wait` calls leave /healthz, /readyz and other tenants answering."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import TINY_MODEL, make_key
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


def test_beyond_its_slots_a_tenants_completions_and_streams_answer_429(stack_factory,
                                                                       sqlite_url, redis_url):
    # given a tenant with 2 wait slots, both held by waits (no worker: no job finishes)
    stack = stack_factory(sqlite_url, redis_db(redis_url, WAITS_REDIS_DB), worker=False,
                          extra_env={"GENQ_MAX_WAITS_PER_TENANT": "2"})
    auth = {"Authorization": f"Bearer {stack.key}"}
    job_id = _submit(stack, stack.key).json()["id"]
    with ThreadPoolExecutor(2) as pool:
        waits = [pool.submit(_submit, stack, stack.key, "wait=4") for _ in range(2)]
        time.sleep(1.5)

        # when it asks for a completion, a streamed completion and a job's events
        body = {"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 4}
        url = f"{stack.api_url}/v1/completions"
        refused = [requests.post(url, json=body, headers=auth, timeout=10),
                   requests.post(url, json=body | {"stream": True}, headers=auth, timeout=10),
                   requests.get(f"{stack.api_url}/v1/jobs/{job_id}/events", headers=auth,
                                timeout=10)]

        # then each is refused with 429 and Retry-After, before any job is queued for it
        assert [(r.status_code, r.headers.get("Retry-After")) for r in refused] == [
            (429, "1")] * 3
        assert refused[0].json()["error"]["type"] == "rate_limit_error"
        assert refused[2].json()["error"]["code"] == "rate_limited"
        # and the waits still wait, then answer 202 (their jobs never finished)
        answers = [wait.result() for wait in waits]
    assert [(r.status_code, r.headers.get("Preference-Applied")) for r in answers] == [
        (202, "wait=4")] * 2
    listed = requests.get(f"{stack.api_url}/v1/jobs", headers=auth, timeout=10).json()["data"]
    assert len(listed) == 3


def test_a_wait_whose_client_went_away_frees_its_slot(stack_factory, sqlite_url, redis_url):
    # given a tenant with one wait slot, held by a call whose client gives up after 1 s
    stack = stack_factory(sqlite_url, redis_db(redis_url, WAITS_REDIS_DB), worker=False,
                          extra_env={"GENQ_MAX_WAITS_PER_TENANT": "1"})
    with pytest.raises(requests.ReadTimeout):
        requests.post(f"{stack.api_url}/v1/jobs", timeout=(10, 1), json={"prompt": "Hi"},
                      headers={"Authorization": f"Bearer {stack.key}", "Prefer": "wait=30"})
    time.sleep(0.5)

    # when the tenant asks for another wait
    response, seconds = _timed_submit(stack, stack.key, "wait=2")

    # then it waits: the slot was freed when the first client went away, not 30 s later
    assert response.headers.get("Preference-Applied") == "wait=2"
    assert 1.5 < seconds < 10
