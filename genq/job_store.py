"""Conditional state transitions on job rows: a transition happens only from an allowed source
state, in one UPDATE, so a stale or duplicate worker can never overwrite a finished job."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, update
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
    return job_id in transition_each(session, {job_id: values}, target, only_from=only_from,
                                     extra_where=extra_where)


def transition_each(
    session: Session,
    values_by_job: dict[str, dict[str, Any]],
    target: JobStatus,
    *,
    only_from: set[JobStatus] | None = None,
    extra_where: tuple = (),
) -> set[str]:
    """`transition` for many jobs in one UPDATE, each with its own values (every job must set
    the same columns); returns the ids this call moved. A worker stores a micro-batch of
    results this way: one statement instead of one per job."""
    if not values_by_job:
        return set()
    job_ids = list(values_by_job)
    columns = values_by_job[job_ids[0]].keys()
    values = {column: _value_per_job(values_by_job, column) for column in columns}
    statement = _conditional_update(job_ids, target, only_from, extra_where, values)
    moved = session.execute(
        statement.returning(Job.id, Job.tenant_id, Job.webhook_url, Job.webhook_events)
        .execution_options(synchronize_session=False)
    ).all()
    for job_id, *listeners in moved:
        _announce(session, job_id, target, only_from, Listeners(*listeners))
    return {row.id for row in moved}


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
    jobs = transition_many_returning(session, [job_id], target, only_from=only_from,
                                     extra_where=extra_where, **values)
    return jobs[0] if jobs else None


def transition_many_returning(
    session: Session,
    job_ids: list[str],
    target: JobStatus,
    *,
    only_from: set[JobStatus] | None = None,
    extra_where: tuple = (),
    **values: Any,
) -> list[Job]:
    """`transition_returning` for many jobs given the same values, in one UPDATE (a worker's
    micro-batch of claims); returns the jobs moved, in no particular order."""
    statement = _conditional_update(job_ids, target, only_from, extra_where, values)
    jobs = session.scalars(
        statement.returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    ).all()
    for job in jobs:
        _announce(session, job.id, target, only_from,
                  Listeners(job.tenant_id, job.webhook_url, job.webhook_events))
    return list(jobs)


def _conditional_update(job_ids: list[str], target: JobStatus,
                        only_from: set[JobStatus] | None, extra_where: tuple,
                        values: dict[str, Any]):
    if target in TERMINAL_STATES:
        values.setdefault("finished_at", utcnow())
        values.setdefault("lease_expires_at", None)
    return (
        update(Job)
        .where(Job.id.in_(job_ids),
               Job.status.in_([s.value for s in _sources(target, only_from)]), *extra_where)
        .values(status=target.value, **values)
    )


def _value_per_job(values_by_job: dict[str, dict[str, Any]], column: str) -> Any:
    """One value when all jobs agree on it, else a CASE on the job id."""
    per_job = {job_id: values[column] for job_id, values in values_by_job.items()}
    distinct = set(map(repr, per_job.values()))
    if len(distinct) == 1:
        return next(iter(per_job.values()))
    return case(per_job, value=Job.id)


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
