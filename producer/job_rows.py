"""The rows a submit writes in its one transaction: each new job's row and the outbox row that
publishes it. Inserted with SQLAlchemy Core, one statement per table for any number of jobs:
the ORM's flush of the same two objects cost more than all the rest of a submit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, insert, inspect
from sqlalchemy.orm.instrumentation import manager_of_class

from genq.job_store import RUN_JOB_OUTBOX_KIND
from genq.limits import JobCost
from genq.models import Job, Outbox, new_id
from genq.queues import queue_for
from genq.states import JobStatus, Priority
from genq.webhook_events import DEFAULT_EVENTS
from producer.publisher import RunMessage
from producer.schemas import JobRequest

# Every column of a job row, None unless the new job sets it (executemany needs the same keys
# in every row).
_EMPTY_JOB_ROW = dict.fromkeys(Job.__table__.columns.keys())
# The Job attribute of each column (the `metadata` column is `Job.metadata_`).
_JOB_ATTRIBUTES = {column.key: inspect(Job).get_property_by_column(column).key
                   for column in Job.__table__.columns}
_JOB_MANAGER = manager_of_class(Job)
_INSERT_JOBS = insert(Job.__table__)
_INSERT_OUTBOX_ROW = insert(Outbox.__table__)
_INSERT_OUTBOX = _INSERT_OUTBOX_ROW.returning(Outbox.id, sort_by_parameter_order=True)


@dataclass(frozen=True)
class NewJob:
    """A validated job, not written yet."""

    row: dict[str, Any]  # its jobs row, by column name
    model: str
    priority: Priority
    cost: JobCost


class OutboxMessage(NamedTuple):
    """An outbox row's id and the run message it publishes."""

    outbox_id: int
    message: RunMessage


@dataclass(frozen=True)
class WrittenJob:
    job: Job
    outbox: OutboxMessage


def new_job(tenant_id: str, request: JobRequest, model: str, prompt_tokens: int,
            now: datetime, *, name: str | None = None, idempotency_key: str | None = None,
            request_hash: str | None = None, job_id: str | None = None,
            model_version: str | None = None) -> NewJob:
    """The job of a validated request. `name`: its place in a bulk request, for its errors;
    `model_version`: the version routed (genq.routing), None for an unversioned model."""
    admitted_tokens = prompt_tokens + request.max_tokens
    row = _EMPTY_JOB_ROW | {
        "id": job_id or new_id("job"),
        "tenant_id": tenant_id,
        "status": JobStatus.QUEUED.value,
        "priority": request.priority.value,
        "model": model,
        "model_version": model_version,
        "prompt": request.prompt,
        "messages": None if request.messages is None
        else [message.model_dump() for message in request.messages],
        "sampling_params": request.sampling_params(),
        "metadata": request.metadata,
        "prompt_tokens": prompt_tokens,
        "admitted_tokens": admitted_tokens,
        "attempts": 0,
        "is_starting": False,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "deadline_at": None if request.timeout_s is None
        else now + timedelta(seconds=request.timeout_s),
        "webhook_url": request.webhook_url,
        "webhook_events": request.webhook_events
        or (None if request.webhook_url is None else DEFAULT_EVENTS),
        "created_at": now,
        "admitted_at": now,
    }
    return NewJob(row, model, request.priority,
                  JobCost(admitted_tokens, request.max_tokens, name))


def insert_jobs(connection: Connection, new_jobs: Sequence[NewJob],
                share_levels: Sequence[int]) -> list[WrittenJob]:
    """Insert the jobs' rows and their outbox rows, in the caller's transaction."""
    connection.execute(_INSERT_JOBS, [job.row for job in new_jobs])
    messages = [RunMessage(job.row["id"],
                           queue_for(job.model, job.priority, job.row["model_version"]), level)
                for job, level in zip(new_jobs, share_levels, strict=True)]
    outbox_rows = [
        {"kind": RUN_JOB_OUTBOX_KIND, "job_id": message.job_id, "queue": message.queue,
         "share_level": message.share_level, "created_at": job.row["created_at"],
         "sent_at": None, "publish_attempts": 0}
        for job, message in zip(new_jobs, messages, strict=True)
    ]
    # One row (a single submit's): its id from the cursor (SQLite) or an implicit RETURNING
    # (PostgreSQL), a third less CPU than executemany's sorted RETURNING.
    if len(outbox_rows) == 1:
        outbox_ids = connection.execute(_INSERT_OUTBOX_ROW, outbox_rows[0]).inserted_primary_key
    else:
        outbox_ids = connection.scalars(_INSERT_OUTBOX, outbox_rows).all()
    return [WrittenJob(_job_of(job.row), OutboxMessage(outbox_id, message))
            for job, outbox_id, message in zip(new_jobs, outbox_ids, messages, strict=True)]


def _job_of(row: dict[str, Any]) -> Job:
    """The Job handed back to the caller (transient, to read), holding the row's values: put
    in its __dict__ as a query's load does, without Job()'s attribute events (a sixth of the
    CPU of the insert of a single submit). The None ones are left unset (a new Job reads None
    there)."""
    job = _JOB_MANAGER.new_instance()
    job.__dict__.update({_JOB_ATTRIBUTES[column]: value for column, value in row.items()
                         if value is not None})
    return job
