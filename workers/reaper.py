"""The reaper: jobs whose worker died (lease expired) go back to the queue, or fail for good
after `job_max_attempts` deliveries; queued jobs whose message the broker lost are published
again; overdue queued jobs expire. Every worker runs it; conditional updates make that safe."""

from __future__ import annotations

import logging
from datetime import timedelta

from amqp.exceptions import ChannelError
from kombu import Connection
from sqlalchemy import exists, select

from genq import db
from genq.errors import ErrorCode
from genq.job_store import enqueue_run_message, transition
from genq.models import Job, Outbox, utcnow
from genq.queues import job_queues, queue_for
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


def republish_orphaned_queued(settings: Settings, limit: int = 500) -> int:
    """Publish again the queued jobs whose message is gone.

    A job counts as orphaned when its last publish is older than `job_republish_after_seconds`
    and its class's broker queue is empty: then no message can be waiting for it. (A message a
    worker reserved but has not started yet may still exist; the duplicate is harmless, claims
    are conditional.) Jobs never published (a batch's rows outside its window) are not touched.
    """
    cutoff = utcnow() - timedelta(seconds=settings.job_republish_after_seconds)
    published = exists().where(Outbox.job_id == Job.id, Outbox.sent_at.is_not(None))
    recent = exists().where(Outbox.job_id == Job.id,
                            Outbox.sent_at.is_(None) | (Outbox.sent_at > cutoff))
    with db.transaction(settings.database_url_resolved) as session:
        candidates = session.execute(
            select(Job.id, Job.priority)
            .where(Job.status == JobStatus.QUEUED.value, published, ~recent)
            .limit(limit)
        ).all()
        if not candidates:  # the usual case: no broker round trip at all
            return 0
        empty_classes = _empty_priority_classes(settings.broker_url)
        orphans = [(job_id, Priority(p)) for job_id, p in candidates
                   if Priority(p) in empty_classes]
        for job_id, priority in orphans:
            enqueue_run_message(session, job_id, priority)
    if orphans:
        log.warning("reaper: %d queued job(s) had lost their broker message; republishing",
                    len(orphans))
    return len(orphans)


def _empty_priority_classes(broker_url: str) -> set[Priority]:
    """The priority classes with no message waiting on the broker (all of them when RabbitMQ's
    single priority queue is empty)."""
    sizes = {}
    with Connection(broker_url, connect_timeout=2) as connection:
        for queue in job_queues(broker_url):
            try:
                sizes[queue.name] = queue(connection.channel()).queue_declare(
                    passive=True).message_count
            except ChannelError:  # not declared (yet, or since a broker restart): no message
                sizes[queue.name] = 0
    if len(sizes) == 1:
        return set(Priority) if not next(iter(sizes.values())) else set()
    return {p for p in Priority if not sizes.get(queue_for(p))}
