"""Read and cancel a tenant's jobs. Another tenant's job does not exist (404, never 403)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select

from genq import db
from genq.errors import ErrorCode, GenqError
from genq.job_store import transition
from genq.models import Job
from genq.settings import Settings
from genq.states import JobStatus

MAX_LIST_LIMIT = 100
# A canceled running job's partial output is awaited this many worker cancel polls (+1 s).
PARTIAL_OUTPUT_POLLS = 3
PARTIAL_OUTPUT_CHECK_SECONDS = 0.05
DEFAULT_LIST_LIMIT = 20


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    has_more: bool


def get_job(settings: Settings, tenant_id: str, job_id: str) -> Job:
    with db.session_factory(settings.database_url_resolved)() as session:
        job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise GenqError(ErrorCode.NOT_FOUND, f"no job with id {job_id!r}", param="id")
    return job


def list_jobs(
    settings: Settings,
    tenant_id: str,
    status: JobStatus | None = None,
    limit: int = DEFAULT_LIST_LIMIT,
    after: str | None = None,
) -> JobPage:
    """Newest first. Ids are time-ordered, so `after=<id>` continues with the older jobs."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        f"limit must be between 1 and {MAX_LIST_LIMIT}", param="limit")
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status.value)
    if after is not None:
        query = query.where(Job.id < after)
    query = query.order_by(Job.id.desc()).limit(limit + 1)
    with db.session_factory(settings.database_url_resolved)() as session:
        jobs = list(session.scalars(query))
    return JobPage(jobs=jobs[:limit], has_more=len(jobs) > limit)


def cancel_job(settings: Settings, tenant_id: str, job_id: str) -> Job:
    """A queued job is canceled at once. A running one is marked canceled here; its worker sees
    that on its next cancel poll, aborts it in the engine and stores the partial output. The
    answer waits for that (a few cancel polls at most), so it is the job as it stays; if the
    worker is gone meanwhile, `output` stays null."""
    was_running = get_job(settings, tenant_id, job_id).status == JobStatus.RUNNING.value
    with db.transaction(settings.database_url_resolved) as session:
        canceled = transition(session, job_id, JobStatus.CANCELED)
    job = get_job(settings, tenant_id, job_id)
    if not canceled:
        raise GenqError(ErrorCode.CONFLICT,
                        f"job {job_id!r} is already {job.status} and cannot be canceled",
                        param="id")
    deadline = time.monotonic() + PARTIAL_OUTPUT_POLLS * settings.cancel_poll_seconds + 1.0
    while was_running and job.output_text is None and time.monotonic() < deadline:
        time.sleep(PARTIAL_OUTPUT_CHECK_SECONDS)
        job = get_job(settings, tenant_id, job_id)
    return job
