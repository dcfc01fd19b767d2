"""Submit jobs: validate them, write their job rows and outbox rows in one transaction, then
publish. A broker outage delays a job (the outbox relay publishes it) but never loses it.

Single submits of one process that arrive together (API request threads) share a group
commit (genq.group_commit): one transaction and one disk flush, then one pipelined publish,
before each caller returns. A group that fails (one job over a limit, an idempotency key
taken) is retried job by job, so only the failing job sees its error."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from genq import db
from genq.errors import ErrorCode, GenqError
from genq.fair_share import share_levels
from genq.group_commit import BatchedWrite, GroupCommitter
from genq.limits import TenantLimits, admit, refuse_early
from genq.model_catalog import resolve_model, resolve_version
from genq.models import Job, Outbox, new_id, utcnow
from genq.routing import split_pinned
from genq.settings import Settings
from producer.breakers import broker_breaker, require
from producer.job_rows import NewJob, OutboxMessage, WrittenJob, insert_jobs, new_job
from producer.prompt_tokens import PromptTokenizer, load_prompt_tokenizer
from producer.publisher import publish_jobs
from producer.schemas import MAX_JOBS_PER_BULK, JobRequest
from producer.sent_marks import sent_marker
from producer.webhooks import check_job_webhook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmitResult:
    job: Job
    created: bool


def submit_job(
    settings: Settings, tenant_id: str, request: JobRequest, idempotency_key: str | None = None
) -> SubmitResult:
    """Persist and publish a job. With an idempotency key, a replay returns the first job."""
    model, pinned = split_pinned(request.model or settings.model)
    model = resolve_model(settings, model)
    url = settings.database_url_resolved
    request_hash = None
    if idempotency_key is not None:
        request_hash = _request_hash(request, model if pinned is None else f"{model}@{pinned}")
        existing = _replayed_job(url, tenant_id, idempotency_key, request_hash)
        if existing is not None:  # a replay needs no broker: answered even in reject mode
            return SubmitResult(existing, created=False)
    if settings.submit_when_broker_down == "reject":
        require(broker_breaker(settings))  # 503 with Retry-After while the broker is down

    job = _validated_job(settings, tenant_id, request, model, pinned,
                         idempotency_key=idempotency_key, request_hash=request_hash)
    try:
        written = _write_single(settings, tenant_id, job)
    except IntegrityError:
        if idempotency_key is None:
            raise
        # A concurrent submit with the same key won the unique constraint: answer with its job.
        existing = _replayed_job(url, tenant_id, idempotency_key, request_hash)
        if existing is None:
            raise
        return SubmitResult(existing, created=False)
    return SubmitResult(written.job, created=True)


def submit_jobs(settings: Settings, tenant_id: str,
                requests: Sequence[JobRequest]) -> list[SubmitResult]:
    """Persist and publish up to MAX_JOBS_PER_BULK jobs of one tenant, all or none, in order:
    one transaction for all their rows, one broker connection for all their messages.

    Every request is validated before anything is written; a bad one raises GenqError with a
    param naming it (`jobs.3.prompt`). The tenant's limits admit the whole list or refuse it.
    No idempotency keys: a retried call submits its jobs again (a client that must not
    duplicate jobs on a retry submits them one by one, each with its key).
    """
    if not requests:
        raise GenqError(ErrorCode.INVALID_REQUEST, "submit at least one job", param="jobs")
    if len(requests) > MAX_JOBS_PER_BULK:
        raise GenqError(ErrorCode.PAYLOAD_TOO_LARGE, f"{len(requests)} jobs in one call; submit "
                        f"at most {MAX_JOBS_PER_BULK} per call", param="jobs")
    if settings.submit_when_broker_down == "reject":
        require(broker_breaker(settings))
    jobs = []
    for index, request in enumerate(requests):
        name = f"jobs.{index}"
        try:
            model, pinned = split_pinned(request.model or settings.model)
            model = resolve_model(settings, model)
            jobs.append(_validated_job(settings, tenant_id, request, model, pinned, name=name))
        except GenqError as error:
            raise error.about_item(name) from None
    written = _write_jobs(settings.database_url_resolved, tenant_id, jobs)
    _publish_after_commit(settings, written)
    return [SubmitResult(written_job.job, created=True) for written_job in written]


def _validated_job(settings: Settings, tenant_id: str, request: JobRequest, model: str,
                   pinned: str | None, *, name: str | None = None,
                   idempotency_key: str | None = None,
                   request_hash: str | None = None) -> NewJob:
    job_id = new_id("job")
    version = resolve_version(settings, model, pinned, job_id=job_id, tenant_id=tenant_id,
                              metadata=request.metadata)
    prompt_tokens = count_prompt_tokens(settings, model, request)
    check_context_length(settings, request, prompt_tokens)
    check_job_webhook(settings, tenant_id, request)
    return new_job(tenant_id, request, model, prompt_tokens, utcnow(), name=name,
                   idempotency_key=idempotency_key, request_hash=request_hash,
                   job_id=job_id, model_version=version)


def _write_jobs(url: str, tenant_id: str, jobs: Sequence[NewJob]) -> list[WrittenJob]:
    with db.get_engine(url).connect() as connection:
        refuse_early(connection, tenant_id, [job.cost for job in jobs])
    with db.core_transaction(url) as connection:
        # Tenant limits: raises (rolling back, nothing written) when over one.
        admit(connection, tenant_id, [job.cost for job in jobs])
        # Measured after `admit` locked the tenant row: one tenant's submits count in turn.
        levels = share_levels(connection, tenant_id,
                              [(job.model, job.priority) for job in jobs])
        return insert_jobs(connection, jobs, levels)


# A tenant read without limits skips the early refusal's read (a connection and a query, a
# fifth of a single submit's CPU) for this long: `admit` still checks the current limits under
# the lock, so limits set meanwhile are enforced at once, only refused later in the submit.
UNLIMITED_CACHE_SECONDS = 1.0
_unlimited_until: dict[tuple[str, str], float] = {}


def _unlimited_recently(url: str, tenant_id: str) -> bool:
    return _unlimited_until.get((url, tenant_id), 0.0) > time.monotonic()


@dataclass(frozen=True)
class _SingleSubmit:
    settings: Settings
    tenant_id: str
    job: NewJob


def _write_single(settings: Settings, tenant_id: str, job: NewJob) -> WrittenJob:
    """Commit the job with the single submits of this process waiting now, publish them, and
    return it; raise what its own write raised (GenqError, IntegrityError)."""
    url = settings.database_url_resolved
    if not _unlimited_recently(url, tenant_id):
        with db.get_engine(url).connect() as connection:
            limits = refuse_early(connection, tenant_id, [job.cost])
        if limits == TenantLimits():
            _unlimited_until[(url, tenant_id)] = time.monotonic() + UNLIMITED_CACHE_SECONDS
    return _single_submits(url).write_batched(_SINGLE_SUBMIT,
                                              _SingleSubmit(settings, tenant_id, job))


def _insert_single_submits(connection: Connection,
                           submits: list[_SingleSubmit]) -> list[WrittenJob]:
    """The group's jobs, admitted per tenant (GenqError fails the group: each is then retried
    alone) and inserted in one statement per table."""
    by_tenant: dict[str, list[int]] = {}
    for index, submit in enumerate(submits):
        by_tenant.setdefault(submit.tenant_id, []).append(index)
    levels = [0] * len(submits)
    for tenant_id, indexes in by_tenant.items():
        jobs = [submits[index].job for index in indexes]
        admit(connection, tenant_id, [job.cost for job in jobs])
        tenant_levels = share_levels(connection, tenant_id,
                                     [(job.model, job.priority) for job in jobs])
        for index, level in zip(indexes, tenant_levels, strict=True):
            levels[index] = level
    return insert_jobs(connection, [submit.job for submit in submits], levels)


def _publish_single_submits(submits: list[_SingleSubmit], written: list[WrittenJob]) -> None:
    by_broker: dict[str, tuple[Settings, list[WrittenJob]]] = {}
    for submit, written_job in zip(submits, written, strict=True):
        by_broker.setdefault(submit.settings.broker_url, (submit.settings, []))[1].append(
            written_job)
    for settings, jobs in by_broker.values():
        _publish_after_commit(settings, jobs)


_SINGLE_SUBMIT = BatchedWrite(_insert_single_submits, after_commit=_publish_single_submits)
_committers: dict[tuple[int, str], GroupCommitter] = {}
_committers_lock = threading.Lock()


def _single_submits(database_url: str) -> GroupCommitter:
    """One committer per process and database (keyed by pid: a forked child starts its own)."""
    key = (os.getpid(), database_url)
    with _committers_lock:
        if key not in _committers:
            _committers[key] = GroupCommitter(database_url, core=True)
        return _committers[key]


def _publish_after_commit(settings: Settings, written: Sequence[WrittenJob]) -> None:
    # While the broker is known to be down, do not wait on it: the jobs and their outbox rows
    # are committed, and the outbox relay publishes them when the broker is back.
    outbox = [written_job.outbox for written_job in written]
    if broker_breaker(settings).allow() and publish_outbox_rows(settings, outbox):
        sent_marker(settings.database_url_resolved).mark_all_sent(
            row.outbox_id for row in outbox)


def publish_outbox_rows(settings: Settings, rows: Sequence[OutboxMessage]) -> bool:
    """Publish outbox rows' messages over one broker connection; False (logged, attempt
    counted) when the broker refused them. The caller marks the rows sent
    (producer.sent_marks)."""
    breaker = broker_breaker(settings)
    try:
        publish_jobs(settings.broker_url, [row.message for row in rows])
    except Exception as exc:  # any broker failure: the relay retries these rows later
        breaker.record_failure(exc)
        log.warning("publishing %d job message(s) (job %s first) failed, the outbox relay "
                    "will retry: %s", len(rows), rows[0].message.job_id, exc)
        with db.transaction(settings.database_url_resolved) as session:
            session.execute(
                update(Outbox).where(Outbox.id.in_([row.outbox_id for row in rows]))
                .values(publish_attempts=Outbox.publish_attempts + 1)
            )
        return False
    breaker.record_success()
    return True


def count_prompt_tokens(settings: Settings, model: str, request: JobRequest) -> int:
    """Tokens of the prompt as the engine will see it (chat rendered with the model's template)."""
    messages = None if request.messages is None else [m.model_dump() for m in request.messages]
    return count_tokens(settings, model, request.prompt, messages)


def count_tokens(settings: Settings, model: str, prompt: str | None,
                 messages: list[dict[str, Any]] | None) -> int:
    """Tokens of a prompt, or of chat messages rendered with the model's template."""
    tokenizer = load_tokenizer_cached(model, settings.model_cache_dir_resolved)
    if messages is not None:
        return tokenizer.count_chat(messages)
    return tokenizer.count(prompt)


def load_tokenizer_cached(model: str, cache_dir: Path) -> PromptTokenizer:
    """The model's prompt tokenizer, loaded once per process (`tokenizers`, no torch)."""
    return load_prompt_tokenizer(model, cache_dir)


def check_context_length(settings: Settings, request: JobRequest, prompt_tokens: int) -> None:
    if prompt_tokens + request.max_tokens > settings.max_model_len:
        raise GenqError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"this model's context is {settings.max_model_len} tokens; the request needs "
            f"{prompt_tokens + request.max_tokens} ({prompt_tokens} in the prompt + "
            f"{request.max_tokens} in max_tokens). Shorten the prompt or lower max_tokens.",
            param="prompt" if request.prompt is not None else "messages",
        )


def _request_hash(request: JobRequest, model: str) -> str:
    """sha256 of the canonical request (defaults filled in), to tell a replay from a reuse."""
    body = request.model_dump(mode="json") | {"model": model}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replayed_job(url: str, tenant_id: str, idempotency_key: str, request_hash: str) -> Job | None:
    with db.session_factory(url)() as session:
        job = session.scalar(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
        )
    if job is not None and job.request_hash != request_hash:
        raise GenqError(
            ErrorCode.IDEMPOTENCY_KEY_REUSED,
            "this Idempotency-Key was already used with a different request body",
            param="Idempotency-Key",
        )
    return job
