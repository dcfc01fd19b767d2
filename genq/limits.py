"""Per-tenant admission limits, checked inside the submit transaction: requests per minute,
tokens per minute (prompt tokens + max_tokens), queued jobs, and max_tokens per job.

Why the database and not Redis: the broker may be RabbitMQ, the DB is always there, and the jobs
table already records every admitted request with its time and tokens. `admit` locks the
tenant's row (SELECT … FOR UPDATE on PostgreSQL; on SQLite every write transaction holds the
database lock from BEGIN IMMEDIATE) and counts the tenant's jobs of the last minute; the caller
inserts the new jobs in the same transaction. So one tenant's admissions are serialized across
all API processes and hosts, concurrent submits never exceed a limit, and a rejection rolls
back with nothing written. A submit over a limit is refused before that, on a read
(`refuse_early`), so refusals never hold the lock that every writer needs. A bulk submit is
admitted as a whole: N requests, the sum of their tokens, N more queued jobs. The window
slides: it holds the jobs admitted in the last 60 s.

Batch lines go through the same function when the batch feeder moves them into its window
(`admit(..., pace=True)`): they count against the same minute and the same queue, and when the
tenant is at a limit the feeder enqueues fewer lines (or none) this round instead of failing
the batch. A line over a per-job limit (`check_job_size`) is an error line, found at ingest.
A job counts from its `admitted_at`: at submit for single and bulk jobs, at window entry for
batch lines (an ingested line that waits for the window is not queued for the tenant yet).
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
_TENANT_LIMITS = select(
    Tenant.requests_per_minute, Tenant.tokens_per_minute, Tenant.max_queued_jobs,
    Tenant.max_tokens_per_job,
).where(Tenant.id == bindparam("tenant_id"))
_LOCK_TENANT_LIMITS = _TENANT_LIMITS.with_for_update()
_COUNT_QUEUED = select(func.count()).select_from(Job).where(
    Job.tenant_id == bindparam("tenant_id"), Job.status == JobStatus.QUEUED.value,
    Job.admitted_at.is_not(None))
_RECENT_JOBS = select(Job.admitted_at, func.coalesce(Job.admitted_tokens, 0)).where(
    Job.tenant_id == bindparam("tenant_id"), Job.admitted_at > bindparam("since"),
    ).order_by(Job.admitted_at)


@dataclass(frozen=True)
class JobCost:
    """What one new job asks of its tenant's limits."""

    admitted_tokens: int  # prompt tokens + max_tokens
    max_tokens: int
    name: str | None = None  # the job's place in a bulk request (`jobs.3`), for its errors


def admit(connection: Connection, tenant_id: str, costs: Sequence[JobCost], *,
          pace: bool = False) -> int:
    """How many of the jobs of `costs` are admitted now; call in the transaction that then
    inserts (or enqueues) them, and stamps their `admitted_at`.

    Submits (pace=False): all of them, or raise GenqError (429, or 422 for a request no wait
    can admit): a bulk submit is admitted whole or not at all.
    The batch feeder (pace=True, sizes already checked at ingest): the longest prefix of
    `costs` that fits the tenant's minute and queue now, maybe 0; never raises."""
    row = connection.execute(_LOCK_TENANT_LIMITS, {"tenant_id": tenant_id}).first()
    if row is None:
        return len(costs)
    limits = TenantLimits(*row)
    if pace:
        return _fitting_prefix(connection, tenant_id, limits, costs, utcnow())
    _check_submit(connection, tenant_id, limits, costs)
    return len(costs)


def refuse_early(connection: Connection, tenant_id: str,
                 costs: Sequence[JobCost]) -> TenantLimits:
    """`admit`'s checks of a submit on a read connection, before its write transaction.

    A tenant over a limit is refused here without taking the write lock (on SQLite the whole
    database's, on PostgreSQL its tenant row's). A burst of refused calls (an abusive client's
    threads waking together after their Retry-After) then queues neither other tenants'
    submits nor the workers' commits behind it: under `admit` each refusal held that lock
    while it counted the minute's jobs. `admit` still decides, under the lock. Returns the
    tenant's limits as read."""
    limits = tenant_limits(connection, tenant_id)
    if limits != TenantLimits():
        _check_submit(connection, tenant_id, limits, costs)
    return limits


def _check_submit(connection: Connection, tenant_id: str, limits: TenantLimits,
                  costs: Sequence[JobCost]) -> None:
    for cost in costs:
        try:
            check_job_size(limits, cost.admitted_tokens, cost.max_tokens)
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


def lock_tenant(connection: Connection, tenant_id: str) -> None:
    """Serialize this tenant's admissions with the caller's transaction (its caps on files and
    batches are counted, then written, under this lock)."""
    connection.execute(_LOCK_TENANT_LIMITS, {"tenant_id": tenant_id})


def check_cap(used: int, adding: int, cap: int, what: str, advice: str) -> None:
    """429 when `adding` more would take the tenant past `cap` of `what`."""
    if used + adding > cap:
        raise GenqError(ErrorCode.RATE_LIMITED,
                        f"this tenant has {used} {what} (limit {cap}); {advice}")


def tenant_limits(connection: Connection, tenant_id: str) -> TenantLimits:
    row = connection.execute(_TENANT_LIMITS, {"tenant_id": tenant_id}).first()
    return TenantLimits() if row is None else TenantLimits(*row)


def check_job_size(limits: TenantLimits, admitted_tokens: int, max_tokens: int) -> None:
    """422 for one job over a per-job limit: retrying cannot help it, so it is no 429."""
    if limits.max_tokens_per_job is not None and max_tokens > limits.max_tokens_per_job:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        f"max_tokens is {max_tokens}; this tenant may ask for at most "
                        f"{limits.max_tokens_per_job}", param="max_tokens")
    if limits.tokens_per_minute is not None and admitted_tokens > limits.tokens_per_minute:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        f"this request counts {admitted_tokens} tokens (prompt + max_tokens), "
                        f"over the tenant's {limits.tokens_per_minute} tokens per minute",
                        param="max_tokens")


def _fitting_prefix(connection: Connection, tenant_id: str, limits: TenantLimits,
                    costs: Sequence[JobCost], now: datetime) -> int:
    requests_left = tokens_left = queue_left = math.inf
    if limits.requests_per_minute is not None or limits.tokens_per_minute is not None:
        recent = connection.execute(_RECENT_JOBS,
                                    {"tenant_id": tenant_id, "since": now - WINDOW}).all()
        if limits.requests_per_minute is not None:
            requests_left = limits.requests_per_minute - len(recent)
        if limits.tokens_per_minute is not None:
            tokens_left = limits.tokens_per_minute - sum(tokens for _, tokens in recent)
    if limits.max_queued_jobs is not None:
        queue_left = limits.max_queued_jobs - connection.scalar(_COUNT_QUEUED,
                                                                {"tenant_id": tenant_id})
    admitted = 0
    for cost in costs:
        tokens_left -= cost.admitted_tokens
        if admitted + 1 > min(requests_left, queue_left) or tokens_left < 0:
            break
        admitted += 1
    return admitted


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
