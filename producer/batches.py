"""Batches, the API side: create (status `validating`; the batch feeder ingests the file),
read, list, cancel, and retry the failed or expired lines of a finished batch as a new batch."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from genq import db
from genq.batch_states import BatchStatus
from genq.batch_store import transition_batch, transition_batch_jobs
from genq.errors import ErrorCode, GenqError
from genq.limits import check_cap, lock_tenant
from genq.models import Batch, utcnow
from genq.settings import Settings
from genq.states import JobStatus
from producer.batch_results import batch_progress
from producer.batch_schemas import BatchCreateRequest, BatchObject, window_of
from producer.files import PURPOSE_BATCH, get_file, new_generated_file

MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20


@dataclass(frozen=True)
class BatchPage:
    batches: list[BatchObject]
    has_more: bool


def create_batch(settings: Settings, tenant_id: str, request: BatchCreateRequest) -> BatchObject:
    input_file = get_file(settings, tenant_id, request.input_file_id)
    if input_file.purpose != PURPOSE_BATCH:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        f"file {input_file.id!r} has purpose {input_file.purpose!r}, not "
                        f"{PURPOSE_BATCH!r}", param="input_file_id")
    return _insert_batch(settings, tenant_id, request.endpoint, input_file.id,
                         request.completion_window, request.metadata or {})


def get_batch(settings: Settings, tenant_id: str, batch_id: str) -> BatchObject:
    with db.session_factory(settings.database_url_resolved)() as session:
        batch = _tenant_batch(session, tenant_id, batch_id)
        return BatchObject.from_batch(batch, batch_progress(session, batch))


def list_batches(settings: Settings, tenant_id: str, limit: int = DEFAULT_LIST_LIMIT,
                 after: str | None = None) -> BatchPage:
    """Newest first; `after=<id>` continues with older batches (ids are time-ordered)."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        f"limit must be between 1 and {MAX_LIST_LIMIT}", param="limit")
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if after:
        query = query.where(Batch.id < after)
    with db.session_factory(settings.database_url_resolved)() as session:
        batches = list(session.scalars(query.order_by(Batch.id.desc()).limit(limit + 1)))
        objects = [BatchObject.from_batch(batch, batch_progress(session, batch))
                   for batch in batches[:limit]]
    return BatchPage(objects, has_more=len(batches) > limit)


def cancel_batch(settings: Settings, tenant_id: str, batch_id: str) -> BatchObject:
    """Stop the batch: its queued lines are cancelled at once, running ones are aborted by
    their workers (partial output kept); finished lines stay. The feeder then finalizes it."""
    with db.transaction(settings.database_url_resolved) as session:
        batch = _tenant_batch(session, tenant_id, batch_id)
        if not transition_batch(session, batch_id, BatchStatus.CANCELLING):
            raise GenqError(ErrorCode.CONFLICT,
                            f"batch {batch_id!r} is {batch.status} and cannot be cancelled",
                            param="batch_id")
        transition_batch_jobs(session, batch_id, JobStatus.CANCELED)
    return get_batch(settings, tenant_id, batch_id)


def retry_batch(settings: Settings, tenant_id: str, batch_id: str,
                completion_window: str | None = None) -> BatchObject:
    """A new batch of the finished batch's failed and expired lines that have a request to run
    (a malformed line has none); the feeder copies those lines, keeping their line numbers.
    The new batch has the old one's completion window unless another is given."""
    with db.session_factory(settings.database_url_resolved)() as session:
        source = _tenant_batch(session, tenant_id, batch_id)
    if not BatchStatus(source.status).is_terminal:
        raise GenqError(ErrorCode.CONFLICT,
                        f"batch {batch_id!r} is still {source.status}; retry it once it has "
                        f"finished", param="batch_id")
    return _insert_batch(settings, tenant_id, source.endpoint, source.input_file_id,
                         completion_window or source.completion_window, source.metadata_ or {},
                         retried_from=source.id)


def _insert_batch(settings: Settings, tenant_id: str, endpoint: str, input_file_id: str,
                  completion_window: str, metadata: dict[str, str],
                  retried_from: str | None = None) -> BatchObject:
    output_file = new_generated_file(tenant_id, "batch_output.jsonl")
    error_file = new_generated_file(tenant_id, "batch_errors.jsonl")
    now = utcnow()
    with db.transaction(settings.database_url_resolved) as session:
        lock_tenant(session.connection(), tenant_id)
        open_batches = session.scalar(select(func.count()).select_from(Batch).where(
            Batch.tenant_id == tenant_id,
            Batch.status.in_([status.value for status in BatchStatus
                              if not status.is_terminal])))
        check_cap(open_batches, 1, settings.max_open_batches_per_tenant, "open batches",
                  "wait for one to finish or cancel one")
        session.add_all([output_file, error_file])
        session.flush()
        batch = Batch(
            tenant_id=tenant_id, status=BatchStatus.VALIDATING.value, endpoint=endpoint,
            input_file_id=input_file_id, output_file_id=output_file.id,
            error_file_id=error_file.id, completion_window=completion_window,
            metadata_=metadata, created_at=now, expires_at=now + window_of(completion_window),
            retried_from_batch_id=retried_from,
        )
        session.add(batch)
        session.flush()
        return BatchObject.from_batch(batch, batch_progress(session, batch))


def _tenant_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant_id != tenant_id:
        raise GenqError(ErrorCode.NOT_FOUND, f"no batch with id {batch_id!r}", param="batch_id")
    return batch

