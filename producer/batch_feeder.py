"""The batch feeder: ingests a batch's input file into job rows, feeds them to the broker in a
window, and finalizes batches (done, cancelled or past their completion window).

Where it runs, and why: a thread in every worker process, next to the outbox relay (`genq
worker` starts both). It needs no extra process or queue to deploy, scales with the workers, and
several feeders are safe together: ingest is claimed with a conditional UPDATE, the window
cursor moves by compare-and-set, and batch transitions are conditional (genq.batch_store).
`run_batch_feeder` takes only settings and a stop event, so it can move to its own process.

Why a window: all 50,000 lines become `queued` job rows at once (bulk inserts, bounded memory),
but only `batch_window_jobs` of them per batch have a run message on the broker at any time.
Interactive jobs therefore never queue behind a wall of batch messages, and a cancel only has
to flip rows in the database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from genq import db
from genq.batch_states import BatchStatus
from genq.batch_store import transition_batch, transition_batch_jobs
from genq.errors import ErrorCode, GenqError
from genq.job_store import RUN_JOB_OUTBOX_KIND
from genq.limits import JobCost, TenantLimits, admit, check_job_size, tenant_limits
from genq.model_catalog import resolve_model, resolve_version
from genq.models import Batch, File, Job, Outbox, new_id, utcnow
from genq.queues import queue_for
from genq.routing import split_pinned
from genq.settings import Settings
from genq.states import JobStatus, Priority
from producer.batch_lines import ParsedLine, parse_batch_file
from producer.batch_results import write_result_files
from producer.files import files_dir
from producer.publisher import publish_job
from producer.submit import check_context_length, count_prompt_tokens, count_tokens

log = logging.getLogger(__name__)

INGEST_CHUNK_LINES = 1000
# An ingest claimed longer ago than this is presumed dead (its process died) and redone.
INGEST_CLAIM_STALE = timedelta(minutes=5)
MAX_REPORTED_ERRORS = 100
ACTIVE_STATES = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.FINALIZING)


def run_batch_feeder(settings: Settings, stop: threading.Event) -> None:
    """Feed every `batch_feeder_interval_seconds` until `stop` is set; never raises."""
    while not stop.is_set():
        try:
            feed_batches(settings)
        except Exception:  # a DB or broker hiccup must not end the feeder; next round retries
            log.exception("batch feeder round failed")
        stop.wait(settings.batch_feeder_interval_seconds)


def feed_batches(settings: Settings) -> None:
    """One round: ingest validating batches, then advance every running one."""
    with db.session_factory(settings.database_url_resolved)() as session:
        validating = session.scalars(select(Batch.id).where(
            Batch.status == BatchStatus.VALIDATING.value).order_by(Batch.id)).all()
        active = session.scalars(select(Batch).where(
            Batch.status.in_([state.value for state in ACTIVE_STATES])).order_by(Batch.id)).all()
    for batch_id in validating:
        _for_one_batch(f"ingesting batch {batch_id}", ingest_batch, settings, batch_id)
    for batch in active:
        _for_one_batch(f"advancing batch {batch.id}", advance_batch, settings, batch)


def _for_one_batch(what: str, step, *args) -> None:
    """Run one batch's step; if it raises, log it and go on with the other batches (the next
    round tries this one again). Without this, one batch that failed every round (a file that
    crashes the ingest, a result file that cannot be written) stalled every batch after it."""
    try:
        step(*args)
    except Exception:
        log.exception("batch feeder: %s failed; the next round tries it again", what)


def ingest_batch(settings: Settings, batch_id: str) -> bool:
    """Turn a validating batch's lines into job rows; False if another feeder holds it."""
    url = settings.database_url_resolved
    now = utcnow()
    with db.transaction(url) as session:
        claimed = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == BatchStatus.VALIDATING.value,
                   (Batch.ingest_claimed_at.is_(None))
                   | (Batch.ingest_claimed_at < now - INGEST_CLAIM_STALE))
            .values(ingest_claimed_at=now)
        ).rowcount == 1
        if not claimed:
            return False
        # Rows of an ingest that died half-way: not enqueued yet (that needs in_progress).
        session.execute(delete(Job).where(Job.batch_id == batch_id))
        batch = session.get(Batch, batch_id)
        input_file = session.get(File, batch.input_file_id)
    if batch.retried_from_batch_id is not None:
        total = _copy_retried_lines(settings, batch)
    else:
        path = files_dir(settings) / (input_file.path or "")
        if input_file.deleted_at is not None or not path.is_file():
            return _fail_batch(url, batch_id, [{"code": "file_not_found",
                                                "message": "the input file was deleted"}])
        if (batch.metadata_ or {}).get("strict", "").lower() == "true":
            errors = _strict_errors(path, batch.endpoint)
            if errors:
                return _fail_batch(url, batch_id, errors)
        total = _insert_lines(settings, batch, parse_batch_file(path, batch.endpoint))
    with db.transaction(url) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(total_lines=total))
        started = transition_batch(session, batch_id, BatchStatus.IN_PROGRESS)
    log.info("batch %s: %d lines ingested%s", batch_id, total,
             "" if started else " (cancelled while validating)")
    return True


def advance_batch(settings: Settings, batch: Batch) -> None:
    """Expire, cancel, top up or finalize one batch, whichever its state calls for."""
    url = settings.database_url_resolved
    status = BatchStatus(batch.status)
    if status is BatchStatus.IN_PROGRESS and utcnow() >= batch.expires_at:
        with db.transaction(url) as session:
            expired = transition_batch_jobs(session, batch.id, JobStatus.EXPIRED)
            transition_batch(session, batch.id, BatchStatus.FINALIZING)
        log.info("batch %s: completion window over, %d line(s) expired", batch.id, expired)
    elif status is BatchStatus.CANCELLING:
        with db.transaction(url) as session:
            # Again here: lines ingested after the cancel are still queued.
            transition_batch_jobs(session, batch.id, JobStatus.CANCELED)
            transition_batch(session, batch.id, BatchStatus.FINALIZING)
    elif status is BatchStatus.IN_PROGRESS:
        if top_up_window(settings, batch) == 0 and not _has_unfinished_jobs(url, batch.id):
            with db.transaction(url) as session:
                transition_batch(session, batch.id, BatchStatus.FINALIZING)
    with db.session_factory(url)() as session:
        current = session.get(Batch, batch.id)
    if current.status == BatchStatus.FINALIZING.value:
        finalize_batch(settings, current)


def top_up_window(settings: Settings, batch: Batch) -> int:
    """Enqueue the next lines so that at most `batch_window_jobs` lines of the tenant's batches
    are queued on the broker or running, and no more than the tenant's limits admit now (they
    pace the window: a tenant at its limit gets fewer lines, or none, this round); returns how
    many were enqueued. The window is the tenant's, not the batch's: N open batches of one
    tenant do not put N windows ahead of other tenants' lines."""
    url = settings.database_url_resolved
    with db.transaction(url) as session:
        cursor = session.scalar(select(Batch.enqueued_through_line).where(Batch.id == batch.id))
        in_flight = session.scalar(
            select(func.count()).select_from(Job).join(Batch, Job.batch_id == Batch.id).where(
                Batch.tenant_id == batch.tenant_id,
                Batch.status == BatchStatus.IN_PROGRESS.value, Job.admitted_at.is_not(None),
                Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])))
        room = settings.batch_window_jobs - in_flight
        if room <= 0:
            return 0
        lines = session.execute(
            select(Job.id, Job.batch_line, Job.model, Job.model_version, Job.admitted_tokens,
                   Job.sampling_params)
            .where(Job.batch_id == batch.id, Job.batch_line > cursor,
                   Job.status == JobStatus.QUEUED.value)
            .order_by(Job.batch_line).limit(room)
        ).all()
        costs = [JobCost(line.admitted_tokens or 0, _max_tokens(line.sampling_params))
                 for line in lines]
        lines = lines[:admit(session.connection(), batch.tenant_id, costs, pace=True)]
        if not lines:
            return 0
        # Compare-and-set on the cursor: of two feeders topping up at once, one wins.
        moved = session.execute(
            update(Batch)
            .where(Batch.id == batch.id, Batch.enqueued_through_line == cursor,
                   Batch.status == BatchStatus.IN_PROGRESS.value)
            .values(enqueued_through_line=lines[-1].batch_line)
        ).rowcount == 1
        if not moved:
            return 0
        now = utcnow()
        session.execute(update(Job).where(Job.id.in_([line.id for line in lines]))
                        .values(admitted_at=now))
        # Share level 0 (the default) for every line: the window already shares the batch
        # class among tenants, since each has at most `batch_window_jobs` messages waiting.
        messages = [(line.id, queue_for(line.model, Priority.BATCH, line.model_version))
                    for line in lines]
        session.execute(insert(Outbox), [
            {"kind": RUN_JOB_OUTBOX_KIND, "job_id": job_id, "queue": queue,
             "created_at": now, "publish_attempts": 0}
            for job_id, queue in messages
        ])
    _publish(settings, messages)
    return len(lines)


def _max_tokens(sampling_params: dict[str, Any]) -> int:
    return int(sampling_params.get("max_tokens") or 0)


def finalize_batch(settings: Settings, batch: Batch) -> None:
    """Write the result files, then move to the final state the batch's history implies."""
    url = settings.database_url_resolved
    write_result_files(settings, batch)
    with db.transaction(url) as session:
        if batch.cancelling_at is not None:
            target = BatchStatus.CANCELLED
        elif session.scalar(select(func.count()).where(
                Job.batch_id == batch.id, Job.status == JobStatus.EXPIRED.value)):
            target = BatchStatus.EXPIRED
        else:
            target = BatchStatus.COMPLETED
        if transition_batch(session, batch.id, target):
            log.info("batch %s %s", batch.id, target.value)


def _publish(settings: Settings, messages: list[tuple[str, str]]) -> None:
    """Publish run messages (job id, queue) and mark their outbox rows sent. The first failure
    stops: the outbox relay publishes the rest once the broker is back."""
    published = []
    for job_id, queue in messages:
        try:
            publish_job(settings.broker_url, job_id, queue)
        except Exception as exc:  # any broker failure: the relay retries the unsent rows
            log.warning("batch feeder: publishing failed, the outbox relay will retry: %s", exc)
            break
        published.append(job_id)
    if published:
        with db.transaction(settings.database_url_resolved) as session:
            session.execute(
                update(Outbox)
                .where(Outbox.job_id.in_(published), Outbox.sent_at.is_(None))
                .values(sent_at=utcnow(), publish_attempts=Outbox.publish_attempts + 1)
            )


def _insert_lines(settings: Settings, batch: Batch, lines: Iterable[ParsedLine]) -> int:
    """Bulk-insert one job row per line, INGEST_CHUNK_LINES per transaction; a bad line becomes
    a `failed` row whose error the error file reports. Returns the number of lines."""
    with db.session_factory(settings.database_url_resolved)() as session:
        limits = tenant_limits(session.connection(), batch.tenant_id)
    total = 0
    rows: list[dict[str, Any]] = []
    for parsed in lines:
        rows.append(_job_row(settings, batch, parsed, limits))
        total += 1
        if len(rows) == INGEST_CHUNK_LINES:
            _insert_rows(settings, rows)
            rows = []
    _insert_rows(settings, rows)
    return total


def _job_row(settings: Settings, batch: Batch, parsed: ParsedLine,
             limits: TenantLimits) -> dict[str, Any]:
    now = utcnow()
    row: dict[str, Any] = {
        "id": new_id("job"), "tenant_id": batch.tenant_id, "priority": Priority.BATCH.value,
        "model": settings.model, "model_version": None, "batch_id": batch.id,
        "custom_id": parsed.custom_id,
        "batch_line": parsed.number, "created_at": now, "attempts": 0, "metadata_": {},
        "sampling_params": {},
    }
    request, error = parsed.request, parsed.error
    if request is not None:
        try:
            model, pinned = split_pinned(request.model or settings.model)
            row["model"] = resolve_model(settings, model)
            row["model_version"] = resolve_version(
                settings, row["model"], pinned, job_id=row["id"], tenant_id=batch.tenant_id,
                metadata=request.metadata)
        except GenqError as exc:
            request, error = None, f"invalid body: {exc.message}"
    if request is None:
        return row | _failed(now, ErrorCode.INVALID_REQUEST, f"line {parsed.number}: {error}")
    row |= {
        "status": JobStatus.QUEUED.value, "prompt": request.prompt,
        "messages": None if request.messages is None
        else [message.model_dump() for message in request.messages],
        "sampling_params": request.sampling_params(), "metadata_": request.metadata,
        "deadline_at": batch.expires_at,
    }
    # The checks of a single submit, line by line: a line over a per-job limit is an error
    # line with its reason (its request is kept, so a retry after the limit is raised runs it).
    try:
        prompt_tokens = count_prompt_tokens(settings, row["model"], request)
        check_context_length(settings, request, prompt_tokens)
        check_job_size(limits, prompt_tokens + request.max_tokens, request.max_tokens)
    except GenqError as exc:
        return row | _failed(now, exc.code, f"line {parsed.number}: {exc.message}")
    return row | {"prompt_tokens": prompt_tokens,
                  "admitted_tokens": prompt_tokens + request.max_tokens}


def _failed(now: datetime, code: ErrorCode, message: str) -> dict[str, Any]:
    return {"status": JobStatus.FAILED.value, "finished_at": now, "error_code": code.value,
            "error_message": message}


def _insert_rows(settings: Settings, rows: list[dict[str, Any]]) -> None:
    if rows:
        with db.transaction(settings.database_url_resolved) as session:
            session.execute(insert(Job), rows)


def _copy_retried_lines(settings: Settings, batch: Batch) -> int:
    """Copy the source batch's failed or expired lines that carry a request, page by page."""
    url, after, total = settings.database_url_resolved, 0, 0
    with db.session_factory(url)() as session:
        limits = tenant_limits(session.connection(), batch.tenant_id)
    runnable = (Job.prompt.is_not(None)) | (Job.messages.is_not(None))
    while True:
        with db.session_factory(url)() as session:
            jobs = session.scalars(
                select(Job)
                .where(Job.batch_id == batch.retried_from_batch_id, Job.batch_line > after,
                       Job.status.in_([JobStatus.FAILED.value, JobStatus.EXPIRED.value]),
                       runnable)
                .order_by(Job.batch_line).limit(INGEST_CHUNK_LINES)
            ).all()
        if not jobs:
            return total
        _insert_rows(settings, [_retry_row(settings, batch, job, limits) for job in jobs])
        total += len(jobs)
        after = jobs[-1].batch_line


def _retry_row(settings: Settings, batch: Batch, job: Job,
               limits: TenantLimits) -> dict[str, Any]:
    now, job_id = utcnow(), new_id("job")
    row = {
        "id": job_id, "tenant_id": batch.tenant_id, "status": JobStatus.QUEUED.value,
        "priority": Priority.BATCH.value, "model": job.model, "prompt": job.prompt,
        # Routed again, as a new job: the old line's version may be rolled back since.
        "model_version": resolve_version(settings, job.model, None, job_id=job_id,
                                         tenant_id=batch.tenant_id, metadata=job.metadata_),
        "messages": job.messages, "sampling_params": job.sampling_params,
        "metadata_": job.metadata_, "batch_id": batch.id, "custom_id": job.custom_id,
        "batch_line": job.batch_line, "created_at": now, "attempts": 0,
        "deadline_at": batch.expires_at,
    }
    # Checked again: the line may have failed for a limit since raised (or lowered).
    max_tokens = _max_tokens(job.sampling_params)
    prompt_tokens = job.prompt_tokens
    if prompt_tokens is None:
        prompt_tokens = count_tokens(settings, job.model, job.prompt, job.messages)
    try:
        check_job_size(limits, prompt_tokens + max_tokens, max_tokens)
    except GenqError as exc:
        return row | _failed(now, exc.code, f"line {job.batch_line}: {exc.message}")
    return row | {"prompt_tokens": prompt_tokens, "admitted_tokens": prompt_tokens + max_tokens}


def _strict_errors(path: Path, endpoint: str) -> list[dict[str, Any]]:
    """OpenAI's all-or-nothing validation: the first MAX_REPORTED_ERRORS bad lines."""
    errors: list[dict[str, Any]] = []
    for parsed in parse_batch_file(path, endpoint):
        if parsed.error is not None:
            errors.append({"code": "invalid_request", "message": parsed.error,
                           "param": None, "line": parsed.number})
            if len(errors) == MAX_REPORTED_ERRORS:
                break
    return errors


def _fail_batch(url: str, batch_id: str, errors: list[dict[str, Any]]) -> bool:
    with db.transaction(url) as session:
        transition_batch(session, batch_id, BatchStatus.FAILED, errors=errors)
    log.info("batch %s failed validation: %s", batch_id, errors[0]["message"])
    return True


def _has_unfinished_jobs(url: str, batch_id: str) -> bool:
    with db.session_factory(url)() as session:
        return session.scalar(select(func.count()).where(
            Job.batch_id == batch_id,
            Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))) > 0

