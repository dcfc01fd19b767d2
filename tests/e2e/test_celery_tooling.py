"""Celery's own tooling sees genq workers (issue 21): `celery inspect ping` and `inspect active`
answer, and with GENQ_WORKER_SEND_EVENTS each job is a task in Celery's event stream, which
Flower shows: received and started when claimed, succeeded once its result is committed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import requests

from genq.settings import Settings
from producer.client import GenqClient
from tests.conftest import free_port
from tests.e2e.conftest import redis_db
from tests.processes import http_ok, wait_for
from workers.celery_app import make_celery

SLOW_MODEL = "dummy:smollm2-135m"


def _celery(broker_url: str, *args: str) -> str:
    env = {**os.environ, "GENQ_BROKER_URL": broker_url, "GENQ_MODEL": "echo",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "celery", "-A", "workers.celery_app", *args],
                          env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout


def test_celery_inspect_and_task_events_see_a_genq_worker(redis_url, sqlite_url,
                                                          stack_factory):
    # Given a genq worker sending events, and a receiver of Celery's event stream
    broker_url = redis_db(redis_url)
    stack = stack_factory(sqlite_url, broker_url, model="echo", worker=False,
                          extra_env={"GENQ_WORKER_SEND_EVENTS": "true"})
    app = make_celery(Settings(broker_url=broker_url, model="echo"))
    events: list[dict] = []
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        listening = threading.Thread(target=receiver.capture,
                                     kwargs={"limit": None, "timeout": None}, daemon=True)
        listening.start()
        try:
            stack.start_worker(name="worker-1", concurrency=4, model="echo")

            # When Celery's tools ask, and a job runs
            pong = _celery(broker_url, "inspect", "ping", "-t", "10")
            active = _celery(broker_url, "inspect", "active", "-t", "10")
            job_id = GenqClient(stack.api_url, stack.key).submit(
                prompt="hello events", max_tokens=4, temperature=0)["id"]

            # Then the worker answers, and the job's task events arrive, in order
            def job_events() -> list[str]:
                return [event["type"] for event in list(events)
                        if event.get("uuid") == job_id]

            wait_for(lambda: "task-succeeded" in job_events(), 30, "the job's events")
        finally:
            receiver.should_stop = True
            listening.join(10)
    assert "worker-1" in pong and "pong" in pong, pong
    assert "worker-1" in active and "OK" in active, active
    assert job_events() == ["task-received", "task-started", "task-succeeded"]
    received = next(e for e in events if e["type"] == "task-received" and e["uuid"] == job_id)
    assert received["name"] == "genq.run_job" and job_id in received["args"]
    assert any(event["type"] == "worker-heartbeat" for event in events)  # Flower lists it


def test_celery_inspect_active_lists_the_jobs_a_worker_runs(redis_url, sqlite_url,
                                                            stack_factory):
    # Regression (issue 21): genq's jobs skip Celery's pool, and `inspect active` listed none.
    # Given a worker on random weights in SmolLM2's shapes (a long job runs for seconds)
    broker_url = redis_db(redis_url)
    stack = stack_factory(sqlite_url, broker_url, model=SLOW_MODEL, worker=False)
    stack.start_worker(name="worker-1", concurrency=4, model=SLOW_MODEL)
    client = GenqClient(stack.api_url, stack.key)

    # When a long job runs and Celery's inspect asks
    job_id = client.submit(prompt="Count forever:", max_tokens=1900, temperature=0)["id"]
    wait_for(lambda: client.get(job_id)["status"] == "running", 60, "the job to run")
    active = _celery(broker_url, "inspect", "active", "-t", "10")

    # Then the job is listed as the worker's active genq.run_job task, until it ends
    assert job_id in active and "genq.run_job" in active and "worker-1" in active, active
    client.cancel(job_id)
    wait_for(lambda: client.get(job_id)["status"] == "canceled", 30, "the cancel")
    wait_for(lambda: job_id not in _celery(broker_url, "inspect", "active", "-t", "10"), 30,
             "the job to leave the active list")


def test_flower_lists_a_genq_worker_and_shows_its_jobs_as_tasks(redis_url, sqlite_url,
                                                                stack_factory):
    # Given a genq worker sending events, watched by Flower (its API without auth, as a local
    # operator runs it)
    broker_url = redis_db(redis_url)
    stack = stack_factory(sqlite_url, broker_url, model="echo", worker=False,
                          extra_env={"GENQ_WORKER_SEND_EVENTS": "true"})
    port = free_port()
    flower = stack.group.start("flower", [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "flower",
        f"--port={port}", "--address=127.0.0.1"], env={"FLOWER_UNAUTHENTICATED_API": "true"})
    api = f"http://127.0.0.1:{port}/api"
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthcheck"), 60, "Flower", flower)
    stack.start_worker(name="worker-1", concurrency=4, model="echo")

    # When a job runs
    job_id = GenqClient(stack.api_url, stack.key).submit(
        prompt="hello flower", max_tokens=4, temperature=0)["id"]

    # Then Flower lists the worker, and shows the job as a succeeded genq.run_job task
    def task() -> dict:
        return requests.get(f"{api}/tasks", timeout=5).json().get(job_id, {})

    wait_for(lambda: task().get("state") == "SUCCESS", 60, "Flower to see the job")
    assert task()["name"] == "genq.run_job" and "worker-1" in task()["worker"]
    wait_for(lambda: any("worker-1" in name for name in requests.get(
        f"{api}/workers", params={"refresh": "1"}, timeout=15).json()), 30,
        "Flower to list the worker")
