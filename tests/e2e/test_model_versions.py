"""Canary routing on a real stack: an API under gunicorn, a v1 and a v2 worker (real Celery
processes, tiny Llama), Redis and PostgreSQL. A 50/50 rule splits jobs between the versions, a
rollback sends the next jobs all to v1, and the swap (rollback, v2 drains on SIGTERM) loses
no job and runs none twice. On RabbitMQ too, a version's worker takes only its own jobs."""

from __future__ import annotations

import signal
import time
from uuid import uuid4

import pytest
import requests
from kombu import Connection
from sqlalchemy import select

from genq import db, routing
from genq.models import Job, Worker
from genq.queues import job_queues
from genq.routing import RoutingRule
from genq.states import JobStatus
from tests.conftest import TINY_MODEL
from tests.e2e.conftest import redis_db
from tests.processes import wait_for

pytestmark = pytest.mark.integration


def _route(database_url: str, *weights: str, **options) -> None:
    with db.transaction(database_url) as session:
        routing.set_rule(session, RoutingRule(TINY_MODEL, routing.parse_weights(list(weights)),
                                              **options))


def _submit(stack, count: int, max_tokens: int = 8) -> list[str]:
    response = requests.post(f"{stack.api_url}/v1/jobs/bulk", timeout=30,
                             headers={"Authorization": f"Bearer {stack.key}"},
                             json={"jobs": [{"prompt": f"job {n}", "max_tokens": max_tokens,
                                             "temperature": 0} for n in range(count)]})
    assert response.status_code == 202, response.text
    return [job["id"] for job in response.json()["data"]]


def _jobs(database_url: str, ids: list[str]) -> list[Job]:
    with db.session_factory(database_url)() as session:
        return list(session.scalars(select(Job).where(Job.id.in_(ids))))


def _all_finished(database_url: str, ids: list[str]) -> bool:
    return all(job.finished_at is not None for job in _jobs(database_url, ids))


def _versions(stack) -> dict[str, dict]:
    models = requests.get(f"{stack.api_url}/v1/models", timeout=5,
                          headers={"Authorization": f"Bearer {stack.key}"}).json()["data"]
    model = next(m for m in models if m["id"] == TINY_MODEL)
    return {v["version"]: v for v in model.get("versions", [])}


def test_canary_split_rollback_and_swap_lose_no_job(stack_factory, postgres_url, redis_url):
    stack = stack_factory(postgres_url, redis_db(redis_url), worker=False,
                          extra_env={"GENQ_WORKER_HEARTBEAT_SECONDS": "1"})
    url = stack.database_url
    _route(url, "v1=100")
    _route(url, "v1=50", "v2=50")
    v1 = stack.start_worker(name="worker-v1", env={"GENQ_MODEL_VERSION": "v1"})
    v2 = stack.start_worker(name="worker-v2", env={"GENQ_MODEL_VERSION": "v2"})
    wait_for(lambda: all(v["live_workers"] == 1 for v in _versions(stack).values()), 30,
             "both versions' heartbeats")
    with db.session_factory(url)() as session:  # worker id -> version, while both are live
        version_of = {worker_id: version for worker_id, version in
                      session.execute(select(Worker.id, Worker.model_version))}

    # When: 200 jobs under the 50/50 rule. Then: each version gets 40-60% of them.
    split = _submit(stack, 200)
    wait_for(lambda: _all_finished(url, split), 180, "the 200 jobs of the split")
    per_version = [job.model_version for job in _jobs(url, split)]
    assert 80 <= per_version.count("v1") <= 120, per_version.count("v1")

    # When: the swap back to v1 under load: longer jobs still going to both, a rollback, then
    # v2's worker stops (SIGTERM: it drains its running jobs) once its queue is empty.
    during = _submit(stack, 60, max_tokens=128)
    with db.transaction(url) as session:
        routing.rollback(session, TINY_MODEL)
    wait_for(lambda: _versions(stack)["v2"]["queued"] == 0, 120, "v2's queue to empty")
    # Claimed jobs are running now (17-20 of v2's ~30 in trials): the drain has work to do.
    assert any(j.status == JobStatus.RUNNING.value and j.model_version == "v2"
               for j in _jobs(url, during))
    assert v2.stop(signal.SIGTERM, timeout=60) == 0, v2.log()[-3000:]
    time.sleep(routing.RULES_TTL_SECONDS)  # the API's view of the rules is this fresh at worst
    after = _submit(stack, 50)
    wait_for(lambda: _all_finished(url, during + after), 180, "the jobs of the swap")

    # Then: the next 50 all go to v1, and every job ran once, on a worker of its version.
    assert {job.model_version for job in _jobs(url, during)} == {"v1", "v2"}
    assert {job.model_version for job in _jobs(url, after)} == {"v1"}
    jobs = _jobs(url, split + during + after)
    assert len(jobs) == 310
    assert [(j.id, j.status, j.attempts) for j in jobs
            if (j.status, j.attempts) != (JobStatus.SUCCEEDED.value, 1)] == []
    assert all(version_of[job.worker_id] == job.model_version for job in jobs)
    assert v1.popen.poll() is None


def test_a_versions_worker_on_rabbitmq_takes_only_its_versions_jobs(stack_factory, sqlite_url,
                                                                     rabbitmq_url):
    # Versions unique to the run: their queues on the shared vhost hold nothing of another run.
    canary, main = f"v2-{uuid4().hex[:8]}", f"v1-{uuid4().hex[:8]}"
    stack = stack_factory(sqlite_url, rabbitmq_url, worker=False)
    _route(stack.database_url, f"{main}=50", f"{canary}=50", when_unserved=routing.WAIT)
    stack.start_worker(name="worker-canary", env={"GENQ_MODEL_VERSION": canary})

    ids = _submit(stack, 20)

    def canary_done() -> bool:
        return all(j.finished_at for j in _jobs(stack.database_url, ids)
                   if j.model_version == canary)

    wait_for(canary_done, 120, "the canary's jobs")
    time.sleep(2)  # long enough for a worker that took the main version's jobs to run them
    outcome = {(j.model_version, j.status) for j in _jobs(stack.database_url, ids)}
    assert outcome == {(canary, JobStatus.SUCCEEDED.value), (main, JobStatus.QUEUED.value)}
    with Connection(rabbitmq_url, connect_timeout=5) as connection:  # the run's own queues
        for version in (main, canary):
            connection.channel().queue_delete(job_queues(rabbitmq_url, TINY_MODEL, version)[0].name)
