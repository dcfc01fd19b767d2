"""Conditional state transitions on job rows: a transition happens only from an allowed source
state, in one UPDATE, so a stale or duplicate worker can never overwrite a finished job."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from genq.models import Job, Outbox, utcnow
from genq.queues import queue_for
from genq.states import ALLOWED_SOURCES, TERMINAL_STATES, JobStatus, Priority
from genq.webhook_events import Listeners, record_job_event

RUN_JOB_OUTBOX_KIND = "run_job"


def transition(
    session: Session,
    job_id: str,
    target: JobStatus,
    *,
    only_from: set[JobStatus] | None = None,
    extra_where: tuple = (),
    **values: Any,
) -> bool:
    """Move a job to `target` if it is in an allowed source state; True if this call moved it.

    `only_from` narrows the allowed sources (it may not widen them); `extra_where` adds
    conditions such as "this worker still holds the lease".
    """
    statement = _conditional_update(job_id, target, only_from, extra_where, values)
    moved = session.execute(
        statement.returning(Job.tenant_id, Job.webhook_url, Job.webhook_events)
        .execution_options(synchronize_session=False)
    ).first()
    if moved is not None:
        _announce(session, job_id, target, only_from, Listeners(*moved))
    return moved is not None


def transition_returning(
    session: Session,
    job_id: str,
    target: JobStatus,
    *,
    only_from: set[JobStatus] | None = None,
    extra_where: tuple = (),
    **values: Any,
) -> Job | None:
    """`transition`, returning the job as the UPDATE left it (a claim needs the row: one
    statement instead of an UPDATE and a SELECT)."""
    statement = _conditional_update(job_id, target, only_from, extra_where, values)
    job = session.scalars(
        statement.returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    ).first()
    if job is not None:
        _announce(session, job_id, target, only_from,
                  Listeners(job.tenant_id, job.webhook_url, job.webhook_events))
    return job


def _conditional_update(job_id: str, target: JobStatus, only_from: set[JobStatus] | None,
                        extra_where: tuple, values: dict[str, Any]):
    if target in TERMINAL_STATES:
        values.setdefault("finished_at", utcnow())
        values.setdefault("lease_expires_at", None)
    return (
        update(Job)
        .where(Job.id == job_id,
               Job.status.in_([s.value for s in _sources(target, only_from)]), *extra_where)
        .values(status=target.value, **values)
    )


def _sources(target: JobStatus, only_from: set[JobStatus] | None) -> frozenset[JobStatus]:
    sources = ALLOWED_SOURCES[target]
    if only_from is None:
        return sources
    if not only_from <= sources:
        raise ValueError(f"{sorted(only_from - sources)} -> {target.value} is not allowed")
    return frozenset(only_from)


def _announce(session: Session, job_id: str, target: JobStatus,
              only_from: set[JobStatus] | None, listeners: Listeners) -> None:
    # Webhook events commit or roll back with the state change they announce (issue 6). A
    # re-claim (RUNNING only from RUNNING) changes no state, so it announces nothing.
    if _sources(target, only_from) != {target}:
        record_job_event(session, job_id, target, listeners)


def enqueue_run_message(session: Session, job_id: str, model: str, priority: Priority,
                        share_level: int = 0) -> Outbox:
    """Add the outbox row that (re)publishes a job's run message, in the caller's transaction.
    `share_level`: the job's fair-share level in its class (genq.fair_share)."""
    outbox = Outbox(kind=RUN_JOB_OUTBOX_KIND, job_id=job_id, queue=queue_for(model, priority),
                    share_level=share_level)
    session.add(outbox)
    return outbox
