"""A batch's results from its jobs: request counts, progress (tokens/s, ETA), and the OpenAI
output and error files, generated page by page from the jobs table (partial while running) and
written to disk once when the batch finishes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from genq import db
from genq.models import Batch, File, Job
from genq.settings import Settings
from genq.states import JobStatus
from producer.files import files_dir
from producer.openai_compat import completion_object

PAGE_SIZE = 1000
ERROR_LINE_STATES = (JobStatus.FAILED, JobStatus.EXPIRED, JobStatus.CANCELED)
OUTPUT_LINE_STATES = (JobStatus.SUCCEEDED,)
BATCH_ERROR_CODES = {JobStatus.EXPIRED: "batch_expired", JobStatus.CANCELED: "batch_cancelled"}
BATCH_ERROR_MESSAGES = {
    JobStatus.EXPIRED: "the batch's completion window ended before this line finished",
    JobStatus.CANCELED: "the batch was cancelled before this line finished",
}


@dataclass(frozen=True)
class BatchProgress:
    total: int
    completed: int  # succeeded lines
    failed: int  # failed, expired and cancelled lines: each has an error-file line
    unfinished: int  # lines whose job is queued or running
    completion_tokens: int

    def tokens_per_second(self, batch: Batch, now: datetime) -> float | None:
        elapsed = _elapsed_seconds(batch, now)
        return None if not elapsed else round(self.completion_tokens / elapsed, 2)

    def eta_seconds(self, batch: Batch, now: datetime) -> float | None:
        """Remaining lines at the rate lines have finished so far; None until one finished."""
        elapsed, done = _elapsed_seconds(batch, now), self.completed + self.failed
        if not elapsed or not done or batch.finalizing_at is not None:
            return None
        return round((self.total - done) * elapsed / done, 1)


def batch_progress(session: Session, batch: Batch) -> BatchProgress:
    rows = session.execute(
        select(Job.status, func.count(), func.coalesce(func.sum(Job.completion_tokens), 0))
        .where(Job.batch_id == batch.id)
        .group_by(Job.status)
    ).all()
    counts = {JobStatus(status): count for status, count, _ in rows}
    return BatchProgress(
        total=batch.total_lines,
        completed=counts.get(JobStatus.SUCCEEDED, 0),
        failed=sum(counts.get(status, 0) for status in ERROR_LINE_STATES),
        unfinished=counts.get(JobStatus.QUEUED, 0) + counts.get(JobStatus.RUNNING, 0),
        completion_tokens=sum(tokens for status, _, tokens in rows
                              if status == JobStatus.SUCCEEDED.value),
    )


def output_line(job: Job) -> dict[str, Any]:
    return {
        "id": f"batch_req_{job.id}",
        "custom_id": job.custom_id,
        "response": {"status_code": 200, "request_id": job.id,
                     "body": completion_object(job).model_dump(mode="json")},
        "error": None,
    }


def error_line(job: Job) -> dict[str, Any]:
    """A line that did not succeed. `line` (genq extension) is its line in the input file."""
    status = JobStatus(job.status)
    code = BATCH_ERROR_CODES.get(status, job.error_code or "failed")
    message = job.error_message or BATCH_ERROR_MESSAGES.get(status, "the line failed")
    return {"id": f"batch_req_{job.id}", "custom_id": job.custom_id, "response": None,
            "error": {"code": code, "message": message, "line": job.batch_line}}


def iter_lines(settings: Settings, batch_id: str, states: tuple[JobStatus, ...]
               ) -> Iterator[bytes]:
    """The batch's jobs in `states` as JSONL, in input-line order, one short query per page
    (keyset on the line number), so neither the process nor a DB cursor holds the whole file."""
    render = output_line if states == OUTPUT_LINE_STATES else error_line
    after = 0
    while True:
        with db.session_factory(settings.database_url_resolved)() as session:
            jobs = session.scalars(
                select(Job)
                .where(Job.batch_id == batch_id, Job.batch_line > after,
                       Job.status.in_([state.value for state in states]))
                .order_by(Job.batch_line)
                .limit(PAGE_SIZE)
            ).all()
        if not jobs:
            return
        yield b"".join(json.dumps(render(job), ensure_ascii=False).encode() + b"\n"
                       for job in jobs)
        after = jobs[-1].batch_line


def iter_generated_file(settings: Settings, file_id: str) -> Iterator[bytes]:
    """Content of a batch's output or error file that is not yet written to disk."""
    with db.session_factory(settings.database_url_resolved)() as session:
        batch = session.scalar(select(Batch).where(
            or_(Batch.output_file_id == file_id, Batch.error_file_id == file_id)))
    if batch is None:
        return
    states = OUTPUT_LINE_STATES if batch.output_file_id == file_id else ERROR_LINE_STATES
    yield from iter_lines(settings, batch.id, states)


def write_result_files(settings: Settings, batch: Batch) -> None:
    """Write the finished batch's output and error files to disk (atomically, by rename) and
    record their sizes; downloads are then plain file reads."""
    for file_id, states in ((batch.output_file_id, OUTPUT_LINE_STATES),
                            (batch.error_file_id, ERROR_LINE_STATES)):
        path = files_dir(settings) / f"{file_id}.jsonl"
        partial = path.with_suffix(".partial")
        size = lines = 0
        with partial.open("wb") as handle:
            for chunk in iter_lines(settings, batch.id, states):
                handle.write(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
        os.replace(partial, path)
        with db.transaction(settings.database_url_resolved) as session:
            session.execute(update(File).where(File.id == file_id)
                            .values(path=path.name, bytes=size, line_count=lines))


def _elapsed_seconds(batch: Batch, now: datetime) -> float | None:
    if batch.in_progress_at is None:
        return None
    end = batch.finalizing_at or now
    return max((end - batch.in_progress_at).total_seconds(), 1e-3)

