"""Multi-model routing through real processes: each worker serves one model and consumes only
that model's queues; a job for a known model with no live worker waits queued until one starts.
Both on Redis + SQLite and on RabbitMQ + PostgreSQL."""

from __future__ import annotations

import json
import time

import pytest
import requests
from sqlalchemy import select

from genq import db
from genq.model_catalog import LIVE_MODELS_TTL_SECONDS
from genq.models import Job, Worker
from producer.client import GenqClient
from tests.conftest import TINY_MODEL
from tests.e2e.conftest import redis_db
from tests.processes import wait_for

MODELS_REDIS_DB = 15
JOBS_PER_MODEL = 4


@pytest.fixture(params=["redis+sqlite", "rabbitmq+postgres"])
def backend(request) -> tuple[str, str]:
    """(database URL, broker URL) of one supported deployment."""
    if request.param == "redis+sqlite":
        return (request.getfixturevalue("sqlite_url"),
                redis_db(request.getfixturevalue("redis_url"), MODELS_REDIS_DB))
    return request.getfixturevalue("postgres_url"), request.getfixturevalue("rabbitmq_url")


@pytest.fixture
def other_model(tmp_path) -> str:
    """A second tiny model, different from TINY_MODEL (another architecture and size). Its name
    has ':' and '/' in it, as a real model path would, and is unique to the test, so its broker
    queues are too."""
    config = {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
              "max_position_embeddings": 2048, "tie_word_embeddings": True}
    path = tmp_path / "other-tiny-model.json"
    path.write_text(json.dumps(config))
    return f"dummy:{path}"


def _models(stack) -> dict[str, dict]:
    response = requests.get(f"{stack.api_url}/v1/models", timeout=10,
                            headers={"Authorization": f"Bearer {stack.key}"})
    assert response.status_code == 200, response.text
    return {model["id"]: model for model in response.json()["data"]}


def _workers_by_id(database_url: str) -> dict[str, str]:
    """Worker id -> the model its heartbeat row says it serves."""
    with db.session_factory(database_url)() as session:
        return {w.id: w.model for w in session.scalars(select(Worker))}


def _jobs(database_url: str, job_ids: list[str]) -> list[Job]:
    with db.session_factory(database_url)() as session:
        return list(session.scalars(select(Job).where(Job.id.in_(job_ids))))


def test_each_job_runs_on_a_worker_of_its_model(backend, other_model, stack_factory):
    # given one worker for the default model and one started with --model for another
    database_url, broker_url = backend
    stack = stack_factory(database_url, broker_url, name="worker-default")
    stack.start_worker(name="worker-other", model=other_model)
    wait_for(lambda: _models(stack).get(other_model, {}).get("status") == "available", 30,
             "the second worker's heartbeat")
    time.sleep(LIVE_MODELS_TTL_SECONDS)  # the API's cached view of live models catches up
    client = GenqClient(stack.api_url, stack.key, timeout=30)

    # when jobs for both models are submitted, interleaved
    submitted = [client.submit(prompt=f"Story {i}", max_tokens=8, temperature=0, model=model)
                 for i in range(JOBS_PER_MODEL) for model in (TINY_MODEL, other_model)]
    done = [client.wait(job["id"], timeout=90, poll=0.2) for job in submitted]

    # then each ran on the worker that serves its model, and both workers took part
    assert [job["status"] for job in done] == ["succeeded"] * len(done), done
    workers = _workers_by_id(database_url)
    jobs = _jobs(database_url, [job["id"] for job in submitted])
    assert all(workers[job.worker_id] == job.model for job in jobs), [
        (job.model, job.worker_id, workers.get(job.worker_id)) for job in jobs]
    assert {workers[job.worker_id] for job in jobs} == {TINY_MODEL, other_model}
    assert {m: (info["live_workers"], info["status"]) for m, info in _models(stack).items()} == {
        TINY_MODEL: (1, "available"), other_model: (1, "available")}


def test_job_for_a_model_without_worker_waits_until_one_starts(
    backend, other_model, stack_factory
):
    # given a deployment that accepts a second model (GENQ_MODELS) but runs no worker for it
    database_url, broker_url = backend
    stack = stack_factory(database_url, broker_url, worker=False,
                          extra_env={"GENQ_MODELS": other_model})
    client = GenqClient(stack.api_url, stack.key, timeout=30)

    # when a job for it is submitted
    job = client.submit(prompt="Once upon a time", max_tokens=8, temperature=0, model=other_model)
    time.sleep(3)

    # then it is accepted and waits queued, and /v1/models says why
    assert client.get(job["id"])["status"] == "queued"
    assert _models(stack)[other_model]["status"] == "no_live_worker"

    # when a worker for that model starts, it runs the job
    stack.start_worker(name="worker-other", model=other_model)
    done = client.wait(job["id"], timeout=90, poll=0.2)
    assert done["status"] == "succeeded", done
    wait_for(lambda: _models(stack)[other_model]["status"] == "available", 30,
             "the worker's first heartbeat")
    (ran,) = _jobs(database_url, [job["id"]])
    assert _workers_by_id(database_url)[ran.worker_id] == other_model
