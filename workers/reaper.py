"""The reaper: jobs whose worker died (lease expired) go back to the queue, or fail for good
after `job_max_attempts` deliveries. Every worker runs it; conditional updates make that safe."""

from __future__ import annotations

import logging

from sqlalchemy import select

from genq import db
from genq.errors import ErrorCode
from genq.job_store import enqueue_run_message, transition
from genq.models import Job, utcnow
from genq.settings import Settings
from genq.states import JobStatus, Priority

log = logging.getLogger(__name__)


def reap_expired_leases(settings: Settings, limit: int = 200) -> int:
    """Requeue (through the outbox) or fail running jobs whose lease ran out; return how many."""
    now = utcnow()
    expired = (Job.lease_expires_at < now,)
    reaped = 0
    with db.transaction(settings.database_url_resolved) as session:
        stale = session.execute(
            select(Job.id, Job.attempts, Job.priority)
            .where(Job.status == JobStatus.RUNNING.value, *expired)
            .limit(limit)
        ).all()
        for job_id, attempts, priority in stale:
            if attempts >= settings.job_max_attempts:
                moved = transition(
                    session, job_id, JobStatus.FAILED, only_from={JobStatus.RUNNING},
                    extra_where=expired, error_code=ErrorCode.WORKER_LOST.value,
                    error_message=f"the worker running it was lost {attempts} times",
                )
            else:
                moved = transition(session, job_id, JobStatus.QUEUED, extra_where=expired,
                                   worker_id=None, lease_expires_at=None)
                if moved:
                    enqueue_run_message(session, job_id, Priority(priority))
            reaped += moved
    if reaped:
        log.warning("reaper: %d job(s) with an expired lease requeued or failed", reaped)
    return reaped


def expire_overdue_queued(settings: Settings, limit: int = 200) -> int:
    """Queued jobs past their deadline never start: they become `expired` right away."""
    overdue = (Job.deadline_at < utcnow(),)
    with db.transaction(settings.database_url_resolved) as session:
        job_ids = session.scalars(
            select(Job.id).where(Job.status == JobStatus.QUEUED.value, *overdue).limit(limit)
        ).all()
        expired = sum(transition(session, job_id, JobStatus.EXPIRED, extra_where=overdue)
                      for job_id in job_ids)
    return expired
