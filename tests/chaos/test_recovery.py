"""Crash recovery at full speed (issue 21): a replacement worker runs a killed worker's jobs in
its normal micro-batches as soon as it is up (not a lease later, not one at a time), and an
interactive job submitted meanwhile starts at once. Echo engine here (every CI run); the same
with SmolLM2 and a full window in test_recovery_smollm2.py."""

from __future__ import annotations

import time

from genq.settings import Settings
from producer.client import GenqClient
from producer.schemas import JobRequest
from producer.submit import submit_jobs
from tests.chaos.conftest import count_by_status, jobs_by_id, tenant_id, wait_until_all_finished
from tests.chaos.poison import CRASH_ONCE_PROMPT
from tests.conftest import MODEL_CACHE_DIR
from tests.processes import wait_for

NUM_JOBS = 48
CONCURRENCY = 32  # with 16 standby jobs, a window of 48
# The default lease (60 s) on purpose: only seeing that the holder is dead brings the jobs
# back sooner. Fresh, the echo engine runs 48 jobs in well under a second.
RECOVERY_BOUND_SECONDS = 10.0
INTERACTIVE_START_BOUND_SECONDS = 2.0
ENV = {"GENQ_WORKER_MIDDLEWARE": "tests.chaos.poison:PoisonMiddleware",
       "GENQ_REAPER_INTERVAL_SECONDS": "1"}


def test_a_replacement_runs_a_killed_workers_jobs_at_once(broker, sqlite_url, stack_factory,
                                                          tmp_path):
    # Given an echo worker that dies (SIGKILL) while claiming a micro-batch of 48 jobs
    stack = stack_factory(sqlite_url, broker.url, model="echo", worker=False, extra_env=ENV)
    worker = stack.start_worker(name="worker-1", concurrency=CONCURRENCY)
    settings = Settings(database_url=sqlite_url, broker_url=broker.url, model="echo",
                        model_cache_dir=MODEL_CACHE_DIR, data_dir=tmp_path / "data")
    requests = [JobRequest(prompt=f"Job {index}", max_tokens=8, temperature=0)
                for index in range(NUM_JOBS - 1)]
    requests.append(JobRequest(prompt=CRASH_ONCE_PROMPT, max_tokens=8, temperature=0))
    job_ids = [result.job.id for result in submit_jobs(settings, tenant_id(sqlite_url), requests)]
    wait_for(lambda: worker.popen.poll() is not None, 60, "worker-1 to die")
    lost = [job.id for job in jobs_by_id(sqlite_url).values() if job.status == "running"]
    assert lost, count_by_status(sqlite_url, job_ids)

    # When a replacement starts (the jobs' leases still have about a minute to run)
    stack.start_worker(name="worker-2", concurrency=CONCURRENCY)
    ready = time.monotonic()
    client = GenqClient(stack.api_url, stack.key)
    interactive = client.submit(prompt="Urgent", max_tokens=4, temperature=0,
                                priority="interactive")["id"]
    jobs = wait_until_all_finished(sqlite_url, [*job_ids, interactive], timeout=120)
    recovered_after = time.monotonic() - ready

    # Then every job succeeded within seconds, the lost ones after one more delivery
    assert count_by_status(sqlite_url, [*job_ids, interactive]) == {"succeeded": NUM_JOBS + 1}
    assert recovered_after < RECOVERY_BOUND_SECONDS, (recovered_after, len(lost))
    assert all(jobs[job_id].attempts == 2 for job_id in lost)
    # And the interactive job started at once
    started = (jobs[interactive].started_at - jobs[interactive].created_at).total_seconds()
    assert started < INTERACTIVE_START_BOUND_SECONDS, started
