"""Priorities end to end: an interactive job overtakes a backlog of batch jobs, in the broker
(Redis: strictly ordered queues; RabbitMQ: message priority) and in the engine."""

from __future__ import annotations

from datetime import timedelta

from genq.models import utcnow
from genq.settings import Settings
from producer.client import GenqClient
from producer.schemas import JobRequest
from producer.submit import submit_job
from tests.chaos.conftest import count_by_status, jobs_by_id, tenant_id, worker_env
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL
from tests.processes import wait_for

BACKLOG = 1000
CONCURRENCY = 16
HANDED_TO_WORKER_GRACE = timedelta(milliseconds=100)


def test_interactive_job_overtakes_1000_batch_jobs(broker, sqlite_url, stack_factory, tmp_path):
    # Given 1,000 batch jobs queued and a worker busy with them
    stack = stack_factory(sqlite_url, broker.url, worker=False)
    settings = Settings(database_url=sqlite_url, broker_url=broker.url, model=TINY_MODEL,
                        model_cache_dir=MODEL_CACHE_DIR, data_dir=tmp_path / "data")
    tenant = tenant_id(sqlite_url)
    request = JobRequest(prompt="Batch line:", max_tokens=16, temperature=0, priority="batch")
    batch_ids = [submit_job(settings, tenant, request).job.id for _ in range(BACKLOG)]
    stack.start_worker(name="worker-1", concurrency=CONCURRENCY, env=worker_env())
    wait_for(lambda: count_by_status(sqlite_url, batch_ids).get("succeeded", 0) >= 2 * CONCURRENCY,
             120, "the worker to be busy with the batch backlog")

    # When one interactive job is submitted
    client = GenqClient(stack.api_url, stack.key)
    interactive_id = client.submit(prompt="Urgent:", max_tokens=4, temperature=0,
                                   priority="interactive")["id"]
    submitted_at = utcnow()  # the 202 came back: its message is in the broker
    done = client.wait(interactive_id, timeout=60, poll=0.1)

    # Then it starts before every batch job that was still waiting
    assert done["status"] == "succeeded", done
    jobs = jobs_by_id(sqlite_url)
    interactive = jobs[interactive_id]
    batch = [jobs[job_id] for job_id in batch_ids]
    # A batch message the worker had already taken off the queue when the interactive one was
    # published starts a few ms later: it was not waiting any more.
    waiting_since = submitted_at + HANDED_TO_WORKER_GRACE
    jumped_ahead = [job.id for job in batch
                    if job.started_at and waiting_since < job.started_at < interactive.started_at]
    timeline = {
        "started_after_202_s": (interactive.started_at - submitted_at).total_seconds(),
        "created_to_started_s": (interactive.started_at - interactive.created_at).total_seconds(),
        "run_s": (interactive.finished_at - interactive.started_at).total_seconds(),
        "jumped_ahead_started_after_202_s": [
            (job.started_at - submitted_at).total_seconds() for job in batch
            if job.id in jumped_ahead],
    }
    assert jumped_ahead == [], f"{len(jumped_ahead)} waiting batch jobs started first: {timeline}"
    # And runs within a few engine steps once started (it takes a batch job's seat in the engine
    # at once): sooner than a 16-token batch job runs
    batch_runs = sorted(job.finished_at - job.started_at for job in batch if job.finished_at)
    median_batch_run = batch_runs[len(batch_runs) // 2]
    run = interactive.finished_at - interactive.started_at
    assert run < median_batch_run, (run, median_batch_run, timeline)
    # Having waited in the broker at most until one running job ended and freed a seat of the
    # worker's prefetch window (the worker's batch jobs finish together, a wave at a time)
    waited = interactive.started_at - submitted_at
    assert waited < batch_runs[-1] + HANDED_TO_WORKER_GRACE, (waited, batch_runs[-1], timeline)
    # While most of the backlog is still waiting
    not_started = [job for job in batch
                   if job.started_at is None or job.started_at > interactive.finished_at]
    assert len(not_started) > BACKLOG // 2
