"""A worker's chores beside the job's path, each on a thread of its own (workers.periodic):
lease renewal, deadlines, cancels, the reaper and the heartbeat."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select

from genq import db
from genq.job_store import extend_leases
from genq.models import Job, utcnow
from genq.states import JobStatus
from workers import heartbeat
from workers.in_flight import StopReason
from workers.periodic import Periodic
from workers.reaper import expire_overdue_queued, reap_expired_leases, republish_orphaned_queued

if TYPE_CHECKING:
    from workers.worker import Worker

log = logging.getLogger(__name__)


class Chores:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        settings = worker.settings
        tick = settings.cancel_poll_seconds
        self.periodic = [
            Periodic("genq-lease-renewal", settings.job_lease_seconds / 3, self.renew_leases),
            Periodic("genq-deadlines", tick, self.enforce_deadlines),
            Periodic("genq-cancels", tick, self.abort_canceled),
            Periodic("genq-reaper", settings.reaper_interval_seconds, self.reap, tick),
            Periodic("genq-heartbeat", settings.worker_heartbeat_seconds, self.beat, tick),
        ]

    def start(self) -> None:
        for chore in self.periodic:
            chore.start()

    def stop(self) -> None:
        for chore in self.periodic:
            chore.stop()

    def enforce_deadlines(self) -> None:
        """Abort in the engine the jobs past their deadline, and every job once the drain
        deadline has passed."""
        worker, now = self.worker, time.monotonic()
        draining = worker.drain_deadline is not None and now >= worker.drain_deadline
        for item in worker.running_jobs():
            if item.stop_reason is not None:
                continue
            if item.deadline is not None and now >= item.deadline:
                item.stop_reason = StopReason.DEADLINE
            elif draining:
                item.stop_reason = StopReason.DRAIN
            if item.stop_reason is not None:
                worker.engine.abort(item.job.id)

    def abort_canceled(self) -> None:
        """Abort in the engine every in-flight job that was canceled through the API."""
        in_flight = self.worker.engine.in_flight()
        if not in_flight:
            return
        with db.session_factory(self.worker.url)() as session:
            canceled = session.scalars(select(Job.id).where(
                Job.id.in_(in_flight), Job.status == JobStatus.CANCELED.value)).all()
        for job_id in canceled:
            self.worker.engine.abort(job_id)

    def renew_leases(self) -> None:
        """Extend the leases of the jobs this worker runs or holds (a job whose outcome could
        not be written is no longer among them: its lease runs out and the reaper takes it)."""
        held = self.worker.held_job_ids()
        if held:
            with db.transaction(self.worker.url, lazy=True) as session:
                extend_leases(session, held, worker_id=self.worker.worker_id,
                              lease_expires_at=lease_expiry(self.worker.settings))

    def reap(self) -> None:
        for chore in (reap_expired_leases, expire_overdue_queued, republish_orphaned_queued):
            try:
                chore(self.worker.settings)
            except Exception:  # a failed chore never keeps the others from running
                log.exception("reaper chore %s failed", chore.__name__)

    def beat(self) -> None:
        heartbeat.beat(self.worker.settings, self.worker.worker_id,
                       len(self.worker.engine.in_flight()))


def lease_expiry(settings) -> datetime:
    return utcnow() + timedelta(seconds=settings.job_lease_seconds)
