"""Conditional state transitions on batch rows, and on all the unfinished jobs of a batch at
once: each is one UPDATE that only moves rows in an allowed source state (as genq.job_store)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from genq.batch_states import BATCH_ALLOWED_SOURCES, BatchStatus
from genq.models import Batch, Job, utcnow
from genq.states import ALLOWED_SOURCES, TERMINAL_STATES, JobStatus


def transition_batch(session: Session, batch_id: str, target: BatchStatus,
                     extra_where: tuple = (), **values: Any) -> bool:
    """Move a batch to `target` if it is in an allowed source state, stamping `<target>_at`;
    True if this call moved it."""
    sources = [source.value for source in BATCH_ALLOWED_SOURCES[target]]
    if target.timestamp_column is not None:
        values.setdefault(target.timestamp_column, utcnow())
    statement = (
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(sources), *extra_where)
        .values(status=target.value, **values)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount == 1


def transition_batch_jobs(session: Session, batch_id: str, target: JobStatus,
                          only_from: set[JobStatus] | None = None) -> int:
    """Move every job of the batch that may go to `target` (job rules of genq.states); returns
    how many moved. Used for cancel (queued/running → canceled) and expiry (→ expired).

    Bulk on purpose: a 50,000-line batch is cancelled in one statement, not 50,000.
    """
    sources = ALLOWED_SOURCES[target] if only_from is None else ALLOWED_SOURCES[target] & only_from
    values: dict[str, Any] = {"status": target.value}
    if target in TERMINAL_STATES:
        values.update(finished_at=utcnow(), lease_expires_at=None)
    statement = (
        update(Job)
        .where(Job.batch_id == batch_id, Job.status.in_([source.value for source in sources]))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount
