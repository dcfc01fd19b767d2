"""Fair share end to end: a tenant with a few jobs is not stuck behind a noisy tenant's backlog
of the same class and model, on Redis and on RabbitMQ, with a real worker."""

from __future__ import annotations

from datetime import timedelta

from genq.models import utcnow
from genq.settings import Settings
from producer.client import GenqClient
from producer.schemas import JobRequest
from producer.submit import submit_job
from tests.chaos.conftest import count_by_status, jobs_by_id, tenant_id, worker_env
from tests.conftest import MODEL_CACHE_DIR, TINY_MODEL, make_key
from tests.processes import wait_for

NOISY_BACKLOG = 300
QUIET_JOBS = 3
CONCURRENCY = 4
# A message the worker had already reserved when a quiet job was published starts a few ms
# later: it was not waiting any more (as in test_priorities).
HANDED_TO_WORKER_GRACE = timedelta(milliseconds=100)


def test_a_quiet_tenant_overtakes_a_noisy_tenants_backlog_in_the_same_class(
        broker, sqlite_url, stack_factory, tmp_path):
    # Given a noisy tenant with 300 default jobs queued and a worker busy with them
    stack = stack_factory(sqlite_url, broker.url, worker=False)
    settings = Settings(database_url=sqlite_url, broker_url=broker.url, model=TINY_MODEL,
                        model_cache_dir=MODEL_CACHE_DIR, data_dir=tmp_path / "data")
    request = JobRequest(prompt="Noisy tenant:", max_tokens=16, temperature=0)
    noisy = tenant_id(sqlite_url)
    noisy_ids = [submit_job(settings, noisy, request).job.id for _ in range(NOISY_BACKLOG)]
    stack.start_worker(name="worker-1", concurrency=CONCURRENCY, env=worker_env())
    wait_for(lambda: count_by_status(sqlite_url, noisy_ids).get("succeeded", 0) >= 2 * CONCURRENCY,
             120, "the worker to be busy with the noisy backlog")

    # When a quiet tenant submits 3 default jobs
    quiet = GenqClient(stack.api_url, make_key(sqlite_url, "quiet"))
    published_at = {}
    for _ in range(QUIET_JOBS):
        job_id = quiet.submit(prompt="Quiet tenant:", max_tokens=16, temperature=0)["id"]
        published_at[job_id] = utcnow()  # the 202 came back: its message is in the broker
    finished = [quiet.wait(job_id, timeout=120, poll=0.1) for job_id in published_at]

    # Then each started before most of the noisy jobs that were waiting when it was submitted
    assert [job["status"] for job in finished] == ["succeeded"] * QUIET_JOBS, finished
    jobs = jobs_by_id(sqlite_url)
    noisy_jobs = [jobs[job_id] for job_id in noisy_ids]
    for job_id, published in published_at.items():
        started = jobs[job_id].started_at
        waiting = [job for job in noisy_jobs if job.started_at is None
                   or job.started_at > published + HANDED_TO_WORKER_GRACE]
        overtaken = [job for job in waiting if job.started_at is None or job.started_at > started]
        assert len(waiting) > NOISY_BACKLOG // 2, "the noisy backlog drained too early to tell"
        assert len(overtaken) >= len(waiting) / 2, (
            f"{job_id} started {(started - published).total_seconds():.2f} s after its 202, "
            f"behind {len(waiting) - len(overtaken)} of the {len(waiting)} noisy jobs waiting")
