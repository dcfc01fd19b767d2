"""One job through the whole system: HTTP API → broker → Celery worker → engine → DB → poll."""

from __future__ import annotations

import time

import pytest
import requests

from producer.client import GenqClient
from tests.e2e.conftest import redis_db
from tests.processes import wait_for

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _client(stack) -> GenqClient:
    return GenqClient(stack.api_url, stack.key, timeout=70)


def test_job_runs_to_succeeded_with_tiny_model(stack_factory, sqlite_url, redis_url):
    stack = stack_factory(sqlite_url, redis_db(redis_url))
    client = _client(stack)

    job = client.submit(prompt="Once upon a time", max_tokens=12, temperature=0)
    done = client.wait(job["id"], timeout=60)

    assert done["status"] == "succeeded", done
    assert done["usage"]["completion_tokens"] == 12
    assert done["output"]["finish_reason"] == "length"
    assert done["output"]["text"]
    assert done["started_at"] <= done["finished_at"]


def test_prefer_wait_answers_200_with_the_finished_job(stack_factory, sqlite_url, redis_url):
    stack = stack_factory(sqlite_url, redis_db(redis_url))

    response = requests.post(
        f"{stack.api_url}/v1/jobs",
        json={"prompt": "Hello", "max_tokens": 4, "temperature": 0},
        headers={"Authorization": f"Bearer {stack.key}", "Prefer": "wait=30"},
        timeout=40,
    )

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"


def test_cancel_of_a_running_job_stops_it_and_keeps_partial_output(
    stack_factory, sqlite_url, redis_url
):
    stack = stack_factory(sqlite_url, redis_db(redis_url))
    client = _client(stack)
    job = client.submit(prompt="Count forever:", max_tokens=1900, temperature=0)
    wait_for(lambda: client.get(job["id"])["status"] == "running", 30, "the job to run")
    time.sleep(0.3)

    canceled = client.cancel(job["id"])

    # the cancel's answer is the final job: its partial output is stored, not pending
    assert canceled["status"] == "canceled"
    assert canceled["output"] is not None and canceled["output"]["finish_reason"] == "abort"
    assert 0 < canceled["usage"]["completion_tokens"] < 1900
    time.sleep(1.0)
    assert client.get(job["id"]) == canceled


@pytest.mark.slow
def test_chat_job_answers_paris_on_redis_and_sqlite(stack_factory, sqlite_url, redis_url):
    stack = stack_factory(sqlite_url, redis_db(redis_url), model="smollm2-135m")
    client = _client(stack)

    job = client.submit(messages=FRANCE, max_tokens=32, temperature=0)
    done = client.wait(job["id"], timeout=120)

    assert done["status"] == "succeeded", done
    assert "Paris" in done["output"]["text"]


@pytest.mark.slow
def test_chat_job_answers_paris_on_rabbitmq_and_postgres(stack_factory, postgres_url,
                                                          rabbitmq_url):
    stack = stack_factory(postgres_url, rabbitmq_url, model="smollm2-135m")
    client = _client(stack)

    job = client.submit(messages=FRANCE, max_tokens=32, temperature=0)
    done = client.wait(job["id"], timeout=120)

    assert done["status"] == "succeeded", done
    assert "Paris" in done["output"]["text"]


@pytest.mark.parametrize("database, broker", [("sqlite", "redis"), ("postgres", "rabbitmq")])
def test_a_bulk_of_jobs_runs_to_succeeded_on_a_celery_worker(stack_factory, request, database,
                                                              broker):
    broker_url = request.getfixturevalue(f"{broker}_url")
    stack = stack_factory(request.getfixturevalue(f"{database}_url"),
                          redis_db(broker_url) if broker == "redis" else broker_url)
    client = _client(stack)

    jobs = client.submit_many([{"prompt": f"Story {n}:", "max_tokens": 4, "temperature": 0}
                               for n in range(20)])

    assert [job["status"] for job in jobs] == ["queued"] * 20
    done = [client.wait(job["id"], timeout=60, poll=0.2) for job in jobs]
    assert {job["status"] for job in done} == {"succeeded"}
    assert [job["id"] for job in done] == [job["id"] for job in jobs]
