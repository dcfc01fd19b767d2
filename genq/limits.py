"""Per-tenant admission limits, checked inside the submit transaction: requests per minute,
tokens per minute (prompt tokens + max_tokens), queued jobs, and max_tokens per job.

Why the database and not Redis: the broker may be RabbitMQ, the DB is always there, and the jobs
table already records every admitted request with its time and tokens. `admit` locks the
tenant's row (SELECT … FOR UPDATE on PostgreSQL; on SQLite every write transaction holds the
database lock from BEGIN IMMEDIATE) and counts the tenant's jobs of the last minute; the caller
inserts the new jobs in the same transaction. So one tenant's admissions are serialized across
all API processes and hosts, concurrent submits never exceed a limit, and a rejection rolls
back with nothing written. A bulk submit is admitted as a whole: N requests, the sum of their
tokens, N more queued jobs. The window slides: it holds the jobs created in the last 60 s.
Jobs of batch lines (batch_id set) are paced by the batch feeder's window and not counted here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.orm import Session

from genq.errors import ErrorCode, GenqError
from genq.models import Job, Tenant, utcnow
from genq.states import JobStatus

WINDOW = timedelta(minutes=1)
QUEUE_FULL_RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class TenantLimits:
    """None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_queued_jobs: int | None = None
    max_tokens_per_job: int | None = None


@dataclass(frozen=True)
class WindowCheck:
    """One windowed limit: `reset_seconds` is how long until this request would fit."""

    name: str  # "requests" or "tokens", as in the x-ratelimit-*-<name> headers
    limit: int
    remaining: int
    reset_seconds: float
    exceeded: bool


def limits_of(tenant: Tenant) -> TenantLimits:
    return TenantLimits(tenant.requests_per_minute, tenant.tokens_per_minute,
                        tenant.max_queued_jobs, tenant.max_tokens_per_job)


def set_limits(session: Session, tenant_name: str, limits: TenantLimits) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        raise LookupError(f"no tenant named {tenant_name!r}")
    tenant.requests_per_minute = limits.requests_per_minute
    tenant.tokens_per_minute = limits.tokens_per_minute
    tenant.max_queued_jobs = limits.max_queued_jobs
    tenant.max_tokens_per_job = limits.max_tokens_per_job
    return tenant


# Built once: they run on submits, and on SQLite building one costs more than running it.
_LOCK_TENANT_LIMITS = select(
    Tenant.requests_per_minute, Tenant.tokens_per_minute, Tenant.max_queued_jobs,
    Tenant.max_tokens_per_job,
).where(Tenant.id == bindparam("tenant_id")).with_for_update()
_COUNT_QUEUED = select(func.count()).select_from(Job).where(
    Job.tenant_id == bindparam("tenant_id"), Job.status == JobStatus.QUEUED.value,
    Job.batch_id.is_(None))
_RECENT_JOBS = select(Job.created_at, func.coalesce(Job.admitted_tokens, 0)).where(
    Job.tenant_id == bindparam("tenant_id"), Job.created_at > bindparam("since"),
    Job.batch_id.is_(None)).order_by(Job.created_at)


@dataclass(frozen=True)
class JobCost:
    """What one new job asks of its tenant's limits."""

    admitted_tokens: int  # prompt tokens + max_tokens
    max_tokens: int
    name: str | None = None  # the job's place in a bulk request (`jobs.3`), for its errors


def admit(connection: Connection, tenant_id: str, costs: Sequence[JobCost]) -> None:
    """Raise GenqError (429, or 422 for a request no wait can admit) unless all the jobs of
    `costs` may be added now: a bulk submit is admitted whole or not at all. Call in the
    transaction that then inserts the jobs."""
    row = connection.execute(_LOCK_TENANT_LIMITS, {"tenant_id": tenant_id}).first()
    if row is None:
        return
    limits = TenantLimits(*row)
    for cost in costs:
        try:
            _check_request_size(limits, cost.admitted_tokens, cost.max_tokens)
        except GenqError as error:
            if cost.name is None:
                raise
            raise error.about_item(cost.name) from None
    num_jobs, tokens = len(costs), sum(cost.admitted_tokens for cost in costs)
    if num_jobs > 1:
        _check_bulk_size(limits, num_jobs, tokens)
    if limits.requests_per_minute is not None or limits.tokens_per_minute is not None:
        _check_window(connection, tenant_id, limits, num_jobs, tokens, utcnow())
    if limits.max_queued_jobs is not None:
        _check_queue(connection, tenant_id, limits.max_queued_jobs, num_jobs)


def _check_request_size(limits: TenantLimits, admitted_tokens: int, max_tokens: int) -> None:
    # Retrying cannot help these requests, so they are 422s, not 429s.
    if limits.max_tokens_per_job is not None and max_tokens > limits.max_tokens_per_job:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        f"max_tokens is {max_tokens}; this tenant may ask for at most "
                        f"{limits.max_tokens_per_job}", param="max_tokens")
    if limits.tokens_per_minute is not None and admitted_tokens > limits.tokens_per_minute:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        f"this request counts {admitted_tokens} tokens (prompt + max_tokens), "
                        f"over the tenant's {limits.tokens_per_minute} tokens per minute",
                        param="max_tokens")


def _check_bulk_size(limits: TenantLimits, num_jobs: int, tokens: int) -> None:
    # A bulk over a whole minute's allowance (or the whole queue) never fits: a 422 tells the
    # client to send fewer jobs per call, where a 429 would have it retry forever.
    allowances = [(num_jobs, limits.requests_per_minute, "requests per minute"),
                  (tokens, limits.tokens_per_minute, "tokens per minute"),
                  (num_jobs, limits.max_queued_jobs, "queued jobs")]
    for amount, limit, name in allowances:
        if limit is not None and amount > limit:
            raise GenqError(ErrorCode.INVALID_REQUEST,
                            f"these {num_jobs} jobs need {amount} {name} at once, over the "
                            f"tenant's limit of {limit}; send fewer jobs per call", param="jobs")


def _check_queue(connection: Connection, tenant_id: str, max_queued_jobs: int,
                 num_jobs: int) -> None:
    queued = connection.scalar(_COUNT_QUEUED, {"tenant_id": tenant_id})
    if queued + num_jobs > max_queued_jobs:
        more = "" if num_jobs == 1 else f" and {num_jobs} more do not fit"
        raise GenqError(
            ErrorCode.RATE_LIMITED,
            f"{queued} jobs are already queued for this tenant (limit {max_queued_jobs})"
            f"{more}; retry when some have started",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_SECONDS)})


def _check_window(connection: Connection, tenant_id: str, limits: TenantLimits, num_jobs: int,
                  tokens: int, now: datetime) -> None:
    recent = connection.execute(_RECENT_JOBS,
                                {"tenant_id": tenant_id, "since": now - WINDOW}).all()
    checks = []
    if limits.requests_per_minute is not None:
        checks.append(_window_check("requests", limits.requests_per_minute,
                                    [(created, 1) for created, _ in recent], num_jobs, now))
    if limits.tokens_per_minute is not None:
        checks.append(_window_check("tokens", limits.tokens_per_minute, recent, tokens, now))
    exceeded = [check for check in checks if check.exceeded]
    if not exceeded:
        return
    headers = {"Retry-After": str(max(1, math.ceil(max(c.reset_seconds for c in exceeded))))}
    for check in checks:
        headers[f"x-ratelimit-limit-{check.name}"] = str(check.limit)
        headers[f"x-ratelimit-remaining-{check.name}"] = str(check.remaining)
        headers[f"x-ratelimit-reset-{check.name}"] = _duration(check.reset_seconds)
    names = " and ".join(f"{c.name} per minute (limit {c.limit})" for c in exceeded)
    raise GenqError(ErrorCode.RATE_LIMITED,
                    f"rate limit reached for {names}; retry after {headers['Retry-After']} s",
                    headers=headers)


def _window_check(name: str, limit: int, recent: list[tuple[datetime, int]], cost: int,
                  now: datetime) -> WindowCheck:
    """Whether `cost` more fits under `limit`, given the window's (created_at, cost) rows,
    oldest first; if not, when enough of them will have slid out of the window."""
    used = sum(amount for _, amount in recent)
    reset = 0.0
    freed = 0
    for created, amount in recent:
        if used - freed + cost <= limit:
            break
        freed += amount
        reset = (created + WINDOW - now).total_seconds()
    return WindowCheck(name, limit, max(0, limit - used), max(0.0, reset),
                       exceeded=used + cost > limit)


def _duration(seconds: float) -> str:
    """OpenAI's style for x-ratelimit-reset-*: "20ms", "1.5s", "59s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
