"""Submit a job: validate its length, write the job row and its outbox row in one transaction,
then publish. A broker outage delays a job (the outbox relay publishes it) but never loses it."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from genq import db
from genq.errors import ErrorCode, GenqError
from genq.fair_share import share_level
from genq.job_store import enqueue_run_message
from genq.limits import admit
from genq.model_catalog import resolve_model
from genq.models import Job, Outbox, utcnow
from genq.settings import Settings
from genq.states import JobStatus
from genq.webhook_events import DEFAULT_EVENTS
from producer.breakers import broker_breaker, require
from producer.publisher import publish_job
from producer.schemas import JobRequest
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
    model = resolve_model(settings, request.model)
    request_hash = _request_hash(request, model)
    url = settings.database_url_resolved
    if idempotency_key is not None:
        existing = _replayed_job(url, tenant_id, idempotency_key, request_hash)
        if existing is not None:  # a replay needs no broker: answered even in reject mode
            return SubmitResult(existing, created=False)
    if settings.submit_when_broker_down == "reject":
        require(broker_breaker(settings))  # 503 with Retry-After while the broker is down

    prompt_tokens = count_prompt_tokens(settings, model, request)
    _check_context_length(settings, request, prompt_tokens)
    check_job_webhook(settings, tenant_id, request)
    job = Job(
        tenant_id=tenant_id,
        status=JobStatus.QUEUED.value,
        priority=request.priority.value,
        model=model,
        prompt=request.prompt,
        deadline_at=None if request.timeout_s is None
        else utcnow() + timedelta(seconds=request.timeout_s),
        messages=None if request.messages is None
        else [message.model_dump() for message in request.messages],
        sampling_params=request.sampling_params(),
        metadata_=request.metadata,
        prompt_tokens=prompt_tokens,
        admitted_tokens=prompt_tokens + request.max_tokens,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        webhook_url=request.webhook_url,
        webhook_events=request.webhook_events
        or (None if request.webhook_url is None else DEFAULT_EVENTS),
    )
    try:
        with db.transaction(url) as session:
            # Tenant limits: raises (rolling back, nothing written) when over one.
            admit(session, tenant_id, job.admitted_tokens, request.max_tokens)
            # Measured after `admit` locked the tenant row: one tenant's submits count in turn.
            level = share_level(session, tenant_id, model, request.priority)
            session.add(job)
            session.flush()
            outbox = enqueue_run_message(session, job.id, model, request.priority, level)
    except IntegrityError:
        if idempotency_key is None:
            raise
        # A concurrent submit with the same key won the unique constraint: answer with its job.
        existing = _replayed_job(url, tenant_id, idempotency_key, request_hash)
        if existing is None:
            raise
        return SubmitResult(existing, created=False)

    # While the broker is known to be down, do not wait on it: the job and its outbox row are
    # committed, and the outbox relay publishes it when the broker is back.
    if broker_breaker(settings).allow() and publish_outbox_row(settings, outbox):
        sent_marker(settings.database_url_resolved).mark_sent(outbox.id)
    return SubmitResult(job, created=True)


def publish_outbox_row(settings: Settings, outbox: Outbox) -> bool:
    """Publish one outbox row; False (logged, attempt counted) when the broker refused it.
    The caller marks the row sent (producer.sent_marks)."""
    breaker = broker_breaker(settings)
    try:
        publish_job(settings.broker_url, outbox.job_id, outbox.queue, outbox.share_level)
    except Exception as exc:  # any broker failure: the relay retries this row later
        breaker.record_failure(exc)
        log.warning("publishing job %s failed, the outbox relay will retry: %s",
                    outbox.job_id, exc)
        with db.transaction(settings.database_url_resolved) as session:
            session.execute(
                update(Outbox).where(Outbox.id == outbox.id)
                .values(publish_attempts=Outbox.publish_attempts + 1)
            )
        return False
    breaker.record_success()
    return True


def count_prompt_tokens(settings: Settings, model: str, request: JobRequest) -> int:
    """Tokens of the prompt as the engine will see it (chat rendered with the model's template)."""
    tokenizer = load_tokenizer_cached(model, settings.model_cache_dir_resolved)
    if request.messages is not None:
        text = tokenizer.apply_chat_template(
            [message.model_dump() for message in request.messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return len(tokenizer.encode(text, add_special_tokens=False))
    return len(tokenizer.encode(request.prompt))


@cache
def load_tokenizer_cached(model: str, cache_dir: Path) -> Any:
    """One tokenizer per model, cache dir and process. No lock: two first requests racing may
    both load it (harmless, the cache write is atomic); a lock would serialize every model."""
    from engine import load_tokenizer

    return load_tokenizer(model, cache_dir=cache_dir)


def _check_context_length(settings: Settings, request: JobRequest, prompt_tokens: int) -> None:
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
