"""A worker dies (kill -9, a poison job) or is stopped (SIGTERM) with jobs in flight: every job
still ends with exactly one result, from the DB lease, the reaper, the outbox and the drain."""

from __future__ import annotations

import signal
import time

from producer.client import GenqClient
from tests.chaos.conftest import (
    WorkerSupervisor,
    count_by_status,
    jobs_by_id,
    wait_until_all_finished,
    worker_env,
)
from tests.chaos.poison import POISON_PROMPT
from tests.processes import wait_for

MAX_ATTEMPTS = 3


def _submit(client: GenqClient, count: int, max_tokens: int, label: str) -> list[str]:
    return [client.submit(prompt=f"{label} {index}:", max_tokens=max_tokens, temperature=0)["id"]
            for index in range(count)]


def test_killed_worker_loses_no_job(broker, postgres_url, stack_factory):
    # Given a worker in the middle of a batch of 64 jobs (queued before it starts, so the
    # batch does not trickle in at the pace of HTTP submits)
    stack = stack_factory(postgres_url, broker.url, worker=False)
    client = GenqClient(stack.api_url, stack.key)
    job_ids = _submit(client, 64, max_tokens=64, label="Story")
    stack.start_worker(name="worker-1", concurrency=16, env=worker_env())
    wait_for(lambda: _mid_batch(count_by_status(postgres_url, job_ids)), 60,
             "some jobs succeeded and some running")
    # When it is killed with -9 (no drain, no ack) and a new worker starts
    stack.group.processes[-1].stop(signal.SIGKILL)
    finished_before_kill = {job.id: job for job in jobs_by_id(postgres_url).values()
                            if job.status == "succeeded"}
    stack.start_worker(name="worker-2", concurrency=16, env=worker_env())

    # Then all 64 succeed, each with one complete result, and none ran to the end twice
    jobs = wait_until_all_finished(postgres_url, job_ids, timeout=120)
    assert count_by_status(postgres_url, job_ids) == {"succeeded": 64}
    assert all(jobs[i].output_text and jobs[i].completion_tokens == 64 for i in job_ids)
    assert all(jobs[i].finish_reason == "length" for i in job_ids)
    assert all(1 <= jobs[i].attempts <= MAX_ATTEMPTS for i in job_ids)
    for job_id, before in finished_before_kill.items():
        after = jobs[job_id]
        assert (after.finished_at, after.output_text, after.attempts, after.worker_id) == (
            before.finished_at, before.output_text, before.attempts, before.worker_id
        ), f"{job_id} finished before the kill and was run again"
    # The jobs in flight at the kill were delivered again: recovery really happened.
    assert any(jobs[i].attempts >= 2 for i in job_ids)


def _mid_batch(counts: dict[str, int]) -> bool:
    return counts.get("succeeded", 0) >= 4 and counts.get("running", 0) >= 4


def test_sigterm_with_jobs_in_flight_loses_none(broker, sqlite_url, stack_factory):
    # Given a worker with 8 long jobs in flight and 8 more waiting; leases are long, so only
    # the drain (not the reaper) can bring the unfinished jobs back in time
    drain_seconds = 2
    env = worker_env(GENQ_WORKER_DRAIN_SECONDS=str(drain_seconds), GENQ_JOB_LEASE_SECONDS="300")
    stack = stack_factory(sqlite_url, broker.url, worker=False)
    client = GenqClient(stack.api_url, stack.key)
    job_ids = _submit(client, 16, max_tokens=192, label="Essay")
    stack.start_worker(name="worker-1", concurrency=8, env=env)
    wait_for(lambda: count_by_status(sqlite_url, job_ids).get("running", 0) >= 8, 60,
             "8 jobs running")

    # When the worker gets SIGTERM
    worker = stack.group.processes[-1]
    started = time.monotonic()
    worker.stop(signal.SIGTERM, timeout=60)
    stopped_after = time.monotonic() - started

    # Then it stops within its drain window and hands the unfinished jobs back to the queue
    assert stopped_after < drain_seconds + 15, f"the drain took {stopped_after:.1f} s"
    assert "running" not in count_by_status(sqlite_url, job_ids), (
        "a job stayed `running` after its worker stopped: the drain did not requeue it"
    )
    # And a new worker finishes every job exactly once
    stack.start_worker(name="worker-2", concurrency=8, env=env)
    jobs = wait_until_all_finished(sqlite_url, job_ids, timeout=150)
    assert count_by_status(sqlite_url, job_ids) == {"succeeded": 16}
    assert all(jobs[i].completion_tokens == 192 and jobs[i].finish_reason == "length"
               for i in job_ids)
    # A clean stop is not a lost delivery: a handed-back job got its attempt back (issue 20)
    assert [jobs[i].attempts for i in job_ids] == [1] * 16


def test_poison_job_fails_after_max_attempts_and_its_batch_neighbours_succeed(
    broker, sqlite_url, stack_factory
):
    # Given a worker whose middleware kills the process when it claims the poison job, and
    # 4 jobs running in its engine when the poison job arrives
    env = worker_env(GENQ_WORKER_MIDDLEWARE="tests.chaos.poison:PoisonMiddleware")
    stack = stack_factory(sqlite_url, broker.url, name="worker-1", concurrency=8, env=env)
    client = GenqClient(stack.api_url, stack.key)
    neighbours = _submit(client, 4, max_tokens=256, label="Neighbour")
    wait_for(lambda: all(job.started_at for job in _jobs(sqlite_url, neighbours)), 60,
             "the neighbours to start")
    assert count_by_status(sqlite_url, neighbours) == {"running": 4}, (
        "precondition: the neighbours finished before the poison job came; make them longer"
    )
    supervisor = WorkerSupervisor(stack, env, concurrency=8)
    supervisor.start()
    try:
        # When the poison job is submitted (and kills every worker that claims it)
        poison = client.submit(prompt=POISON_PROMPT, max_tokens=8, temperature=0)["id"]
        jobs = wait_until_all_finished(sqlite_url, [poison, *neighbours], timeout=240,
                                       abort=lambda: supervisor.errors)
    finally:
        supervisor.stop()
    assert not supervisor.errors

    # Then the poison job failed as `worker_lost` after max_attempts deliveries
    summary = {i: (jobs[i].status, jobs[i].attempts, jobs[i].error_code)
               for i in [poison, *neighbours]}
    assert (jobs[poison].status, jobs[poison].error_code) == ("failed", "worker_lost"), summary
    # It ran (and killed its worker) exactly max_attempts times; `attempts` counts deliveries,
    # so a last delivery that only marks it failed may add one.
    assert supervisor.deaths == MAX_ATTEMPTS, summary
    assert jobs[poison].attempts >= MAX_ATTEMPTS, summary
    # And every neighbour it took down succeeded, with its full output
    assert [jobs[i].status for i in neighbours] == ["succeeded"] * 4, summary
    assert all(jobs[i].completion_tokens == 256 for i in neighbours), summary
    assert all(jobs[i].attempts >= 2 for i in neighbours), "the neighbours never died with it"


def _jobs(database_url: str, job_ids: list[str]) -> list:
    jobs = jobs_by_id(database_url)
    return [jobs[job_id] for job_id in job_ids]
