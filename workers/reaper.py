"""The reaper: jobs whose worker died (lease expired, or a dead process of this host) go back
to the queue, or fail for good after `job_max_attempts` deliveries; queued jobs whose message
the broker lost are published again; overdue queued jobs expire. Every worker runs it;
conditional updates make that safe."""

from __future__ import annotations

import logging
from datetime import timedelta

from amqp.exceptions import ChannelError
from kombu import Connection, Queue
from sqlalchemy import exists, or_, select

from genq import db
from genq.errors import ErrorCode
from genq.job_store import enqueue_run_message, transition
from genq.models import Job, Outbox, utcnow
from genq.queues import REDIS_TRANSPORT_OPTIONS, queue_for, route
from genq.settings import Settings
from genq.states import JobStatus, Priority
from workers.leases import HOSTNAME, is_dead_local_worker

log = logging.getLogger(__name__)


def reap_expired_leases(settings: Settings, limit: int = 200) -> int:
    """Requeue (through the outbox) or fail running jobs whose holder is gone: their lease ran
    out, or their worker is a dead process of this host (workers.leases); return how many."""
    now = utcnow()
    reaped = 0
    with db.transaction(settings.database_url_resolved) as session:
        local_holders = session.scalars(
            select(Job.worker_id).distinct()
            .where(Job.status == JobStatus.RUNNING.value,
                   Job.worker_id.startswith(f"{HOSTNAME}:", autoescape=True))
        ).all()
        dead = [holder for holder in local_holders if is_dead_local_worker(holder)]
        expired = (or_(Job.lease_expires_at < now, Job.worker_id.in_(dead)),)
        stale = session.execute(
            select(Job.id, Job.attempts, Job.model, Job.priority, Job.model_version)
            .where(Job.status == JobStatus.RUNNING.value, *expired)
            .limit(limit)
        ).all()
        for job_id, attempts, model, priority, version in stale:
            if attempts >= settings.job_max_attempts:
                moved = transition(
                    session, job_id, JobStatus.FAILED, only_from={JobStatus.RUNNING},
                    extra_where=expired, error_code=ErrorCode.WORKER_LOST.value,
                    error_message=f"the worker running it was lost {attempts} times",
                )
            else:
                moved = transition(session, job_id, JobStatus.QUEUED, extra_where=expired,
                                   worker_id=None, lease_expires_at=None)
                if moved:  # share level 0: the job had already waited its turn once
                    enqueue_run_message(session, job_id, model, Priority(priority),
                                        model_version=version)
            reaped += moved
    if reaped:
        log.warning("reaper: %d job(s) whose worker is gone requeued or failed", reaped)
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
    and the broker queue of its model and class is empty: then no message can be waiting for
    it. (A message a worker reserved but has not started yet may still exist; the duplicate is
    harmless, claims are conditional.) Jobs never published (a batch's rows outside its
    window) are not touched. A job goes back at the share level of its last message, so a
    broker that lost every message does not hand a noisy tenant's backlog the front of the line.
    """
    cutoff = utcnow() - timedelta(seconds=settings.job_republish_after_seconds)
    published = exists().where(Outbox.job_id == Job.id, Outbox.sent_at.is_not(None))
    recent = exists().where(Outbox.job_id == Job.id,
                            Outbox.sent_at.is_(None) | (Outbox.sent_at > cutoff))
    last_level = (select(Outbox.share_level).where(Outbox.job_id == Job.id)
                  .order_by(Outbox.id.desc()).limit(1).scalar_subquery())
    with db.transaction(settings.database_url_resolved) as session:
        candidates = session.execute(
            select(Job.id, Job.model, Job.model_version, Job.priority, last_level)
            .where(Job.status == JobStatus.QUEUED.value, published, ~recent)
            .limit(limit)
        ).all()
        if not candidates:  # the usual case: no broker round trip at all
            return 0
        empty = _empty_queues(settings.broker_url,
                              {(model, version) for _, model, version, _, _ in candidates})
        orphans = [(job_id, model, version, Priority(p), level)
                   for job_id, model, version, p, level in candidates
                   if (model, version, Priority(p)) in empty]
        for job_id, model, version, priority, level in orphans:
            enqueue_run_message(session, job_id, model, priority, level, version)
    if orphans:
        log.warning("reaper: %d queued job(s) had lost their broker message; republishing",
                    len(orphans))
    return len(orphans)


def _empty_queues(broker_url: str, models: set[tuple[str, str | None]]
                  ) -> set[tuple[str, str | None, Priority]]:
    """The (model, version, class) with no message waiting on the broker. On RabbitMQ a model's
    classes share one priority queue, so they are all empty or none is. On Redis a class's
    messages sit in one list per level; kombu counts them all with the transport's steps."""
    empty, sizes = set(), {}
    with Connection(broker_url, connect_timeout=2,
                    transport_options=REDIS_TRANSPORT_OPTIONS) as connection:
        for model, version in models:
            for priority in Priority:
                queue, _ = route(queue_for(model, priority, version), broker_url)
                if queue.name not in sizes:
                    sizes[queue.name] = _message_count(connection, queue)
                if not sizes[queue.name]:
                    empty.add((model, version, priority))
    return empty


def _message_count(connection: Connection, queue: Queue) -> int:
    try:
        return queue(connection.channel()).queue_declare(passive=True).message_count
    except ChannelError:  # not declared (yet, or since a broker restart): no message
        return 0
