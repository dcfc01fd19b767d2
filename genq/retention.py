"""Retention: delete what genq no longer needs, oldest first, in chunks.

- jobs finished more than `retention_job_days` ago (with their outbox rows and webhook events,
  deliveries and attempts); a batch's lines go with their batch, once it is finished and old;
- outbox rows sent more than `retention_outbox_sent_hours` ago (unsent ones are always kept:
  they are how a job reaches the broker);
- finished batches older than the job retention, and their output and error files;
- uploaded files older than the job retention that no remaining batch reads, and deleted
  files' rows; their content on disk too.

`prune(settings, dry_run=True)` only counts. The webhook worker sweeps every
`retention_sweep_seconds`; `genq prune [--dry-run]` runs one sweep by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Select, delete, func, or_, select
from sqlalchemy.orm import Session

from genq import db
from genq.batch_states import BatchStatus
from genq.models import (
    Batch,
    File,
    Job,
    Outbox,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEvent,
    utcnow,
)
from genq.settings import Settings
from genq.states import TERMINAL_STATES

log = logging.getLogger(__name__)

CHUNK = 500
_FINISHED_JOBS = [state.value for state in TERMINAL_STATES]
_FINISHED_BATCHES = [state.value for state in BatchStatus if state.is_terminal]


@dataclass
class PruneReport:
    """How many rows were deleted (or, on a dry run, would be)."""

    jobs: int = 0
    outbox_rows: int = 0
    webhook_events: int = 0
    webhook_deliveries: int = 0
    webhook_attempts: int = 0
    batches: int = 0
    files: int = 0

    def __str__(self) -> str:
        return ", ".join(f"{field.name.replace('_', ' ')}: {getattr(self, field.name)}"
                         for field in fields(self))


def files_dir(settings: Settings) -> Path:
    """Where uploaded files' content lives."""
    directory = (settings.data_dir / "files").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def prune(settings: Settings, *, dry_run: bool = False, now: datetime | None = None
          ) -> PruneReport:
    """Delete (or with dry_run, count) what the retention settings no longer keep."""
    now = now or utcnow()
    report = PruneReport()
    url = settings.database_url_resolved
    job_cutoff = now - timedelta(days=settings.retention_job_days)
    outbox_cutoff = now - timedelta(hours=settings.retention_outbox_sent_hours)
    old_batches = select(Batch.id).where(Batch.status.in_(_FINISHED_BATCHES),
                                         Batch.created_at < job_cutoff)
    old_jobs = select(Job.id).where(
        Job.status.in_(_FINISHED_JOBS), Job.finished_at < job_cutoff,
        or_(Job.batch_id.is_(None), Job.batch_id.in_(old_batches)))
    sent_outbox = select(Outbox.id).where(Outbox.sent_at < outbox_cutoff)
    with db.session_factory(url)() as session:
        if dry_run:
            report.outbox_rows = _count(session, select(Outbox.id).where(
                or_(Outbox.sent_at < outbox_cutoff, Outbox.job_id.in_(old_jobs))))
            _count_jobs(session, old_jobs, report)
            report.batches = _count(session, old_batches)
            report.files = _count(session, _old_files(
                job_cutoff, select(Batch.id).where(Batch.id.not_in(old_batches))))
            return report
    report.outbox_rows = _delete_in_chunks(url, sent_outbox, Outbox)
    while True:
        with db.transaction(url) as session:
            job_ids = session.scalars(old_jobs.limit(CHUNK)).all()
            if not job_ids:
                break
            _delete_jobs(session, job_ids, report)
    report.files = _delete_batches_and_files(settings, job_cutoff, old_batches, report)
    if any(getattr(report, field.name) for field in fields(report)):
        log.info("retention: deleted %s", report)
    return report


def _count(session: Session, query: Select) -> int:
    return session.scalar(select(func.count()).select_from(query.subquery()))


def _count_jobs(session: Session, old_jobs: Select, report: PruneReport) -> None:
    report.jobs = _count(session, old_jobs)
    deliveries = select(WebhookDelivery.id).where(WebhookDelivery.job_id.in_(old_jobs))
    report.webhook_events = _count(session, select(WebhookEvent.id).where(
        WebhookEvent.job_id.in_(old_jobs)))
    report.webhook_deliveries = _count(session, deliveries)
    report.webhook_attempts = _count(session, select(WebhookAttempt.id).where(
        WebhookAttempt.delivery_id.in_(deliveries)))


def _delete_jobs(session: Session, job_ids: list[str], report: PruneReport) -> None:
    """Children first: attempts, deliveries, events, outbox rows, then the jobs."""
    deliveries = select(WebhookDelivery.id).where(WebhookDelivery.job_id.in_(job_ids))
    report.webhook_attempts += session.execute(
        delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(deliveries))).rowcount
    report.webhook_deliveries += session.execute(
        delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(job_ids))).rowcount
    report.webhook_events += session.execute(
        delete(WebhookEvent).where(WebhookEvent.job_id.in_(job_ids))).rowcount
    report.outbox_rows += session.execute(
        delete(Outbox).where(Outbox.job_id.in_(job_ids))).rowcount
    report.jobs += session.execute(delete(Job).where(Job.id.in_(job_ids))).rowcount


def _delete_in_chunks(url: str, ids: Select, table) -> int:
    deleted = 0
    while True:
        with db.transaction(url) as session:
            chunk = session.scalars(ids.limit(CHUNK)).all()
            if not chunk:
                return deleted
            deleted += session.execute(delete(table).where(table.id.in_(chunk))).rowcount


def _old_files(cutoff: datetime, kept_batches: Select) -> Select:
    """Deleted files, and files older than the cutoff, that no kept batch uses."""
    in_use = select(File.id).where(or_(*(
        File.id.in_(select(column).where(Batch.id.in_(kept_batches)))
        for column in (Batch.input_file_id, Batch.output_file_id, Batch.error_file_id))))
    return select(File.id, File.path).where(
        or_(File.deleted_at < cutoff, File.created_at < cutoff), File.id.not_in(in_use))


def _delete_batches_and_files(settings: Settings, cutoff: datetime, old_batches: Select,
                              report: PruneReport) -> int:
    url = settings.database_url_resolved
    with db.transaction(url) as session:
        # A batch goes once no job of it is left (its old lines were deleted above).
        empty = old_batches.where(~select(Job.id).where(Job.batch_id == Batch.id).exists())
        batch_ids = session.scalars(empty).all()
        report.batches = session.execute(
            delete(Batch).where(Batch.id.in_(batch_ids))).rowcount if batch_ids else 0
        files = session.execute(_old_files(cutoff, select(Batch.id))).all()
        file_ids = [file_id for file_id, _ in files]
        if file_ids:
            session.execute(delete(File).where(File.id.in_(file_ids)))
    directory = files_dir(settings)
    for _, path in files:
        if path:
            (directory / path).unlink(missing_ok=True)
    return len(files)
