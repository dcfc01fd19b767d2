"""A poison job (it kills every worker that starts it) on the echo engine, on both brokers: it
fails as `worker_lost` after GENQ_JOB_MAX_ATTEMPTS deliveries, its neighbours all succeed after
being lost with it once, and fresh jobs submitted during its quarantine are never held back for
it (issue 21)."""

from __future__ import annotations

import time

from genq.settings import Settings
from producer.schemas import JobRequest
from producer.submit import submit_jobs
from tests.chaos.conftest import WorkerSupervisor, tenant_id, wait_until_all_finished, worker_env
from tests.chaos.poison import POISON_PROMPT
from tests.conftest import MODEL_CACHE_DIR
from tests.processes import wait_for

MAX_ATTEMPTS = 3  # CHAOS_ENV
NUM_NEIGHBOURS = 8
NUM_FRESH = 16
# Four worker starts (three deaths and the one that fails the poison job) on a loaded 2-core
# machine take about 10 s each; the echo engine runs the jobs themselves in milliseconds.
FINISHED_BOUND_SECONDS = 90.0


def test_poison_job_fails_after_its_attempts_and_holds_back_no_other_job(
        broker, sqlite_url, stack_factory, tmp_path):
    # Given a poison job and 8 neighbours queued together (one micro-batch: all are lost at
    # the first crash) and a supervisor that restarts the worker whenever it dies
    env = worker_env(GENQ_WORKER_MIDDLEWARE="tests.chaos.poison:PoisonMiddleware")
    stack = stack_factory(sqlite_url, broker.url, model="echo", worker=False, extra_env=env)
    settings = Settings(database_url=sqlite_url, broker_url=broker.url, model="echo",
                        model_cache_dir=MODEL_CACHE_DIR, data_dir=tmp_path / "data")
    tenant = tenant_id(sqlite_url)
    requests = [JobRequest(prompt=f"Neighbour {index}", max_tokens=4, temperature=0)
                for index in range(NUM_NEIGHBOURS)]
    requests.insert(NUM_NEIGHBOURS // 2, JobRequest(prompt=POISON_PROMPT, max_tokens=4))
    job_ids = [result.job.id for result in submit_jobs(settings, tenant, requests)]
    poison = job_ids.pop(NUM_NEIGHBOURS // 2)
    neighbours = job_ids
    started = time.monotonic()
    stack.start_worker(name="worker-1", concurrency=8)
    supervisor = WorkerSupervisor(stack, env, concurrency=8)
    supervisor.start()
    try:
        # When fresh jobs (one interactive) arrive after its second crash: while it (or a
        # neighbour) is held or runs as the only suspect
        wait_for(lambda: supervisor.deaths >= 2 or supervisor.errors, 120, "a second crash")
        fresh = [result.job.id for result in submit_jobs(settings, tenant, [
            JobRequest(prompt=f"Fresh {index}", max_tokens=4, temperature=0,
                       priority="interactive" if index == 0 else "batch")
            for index in range(NUM_FRESH)])]
        jobs = wait_until_all_finished(sqlite_url, [poison, *neighbours, *fresh], timeout=180,
                                       abort=lambda: supervisor.errors)
        finished_after = time.monotonic() - started
    finally:
        supervisor.stop()
    assert not supervisor.errors

    attempts = {job_id: jobs[job_id].attempts for job_id in [*neighbours, *fresh]}
    print(f"\n{broker.kind}: deaths {supervisor.deaths}, poison attempts "
          f"{jobs[poison].attempts}, neighbours' attempts "
          f"{[attempts[i] for i in neighbours]}, fresh jobs' attempts "
          f"{[attempts[i] for i in fresh]}, all finished after {finished_after:.1f} s")
    # Then the poison job failed as worker_lost, having killed exactly MAX_ATTEMPTS workers
    assert (jobs[poison].status, jobs[poison].error_code) == ("failed", "worker_lost")
    assert supervisor.deaths == MAX_ATTEMPTS
    # And every other job succeeded: each neighbour was lost with the poison job at its first
    # crash only (the worker died starting their micro-batch, so all of it became suspects,
    # and a suspect never starts beside another), each fresh job at most once
    assert all(jobs[i].status == "succeeded" for i in [*neighbours, *fresh]), attempts
    assert all(attempts[i] <= 2 for i in neighbours), attempts
    assert all(attempts[i] <= 2 for i in fresh), attempts
    assert finished_after < FINISHED_BOUND_SECONDS, finished_after
