"""What the system is doing now, read from the database: jobs by status, live workers, recent
jobs and batches, per-minute throughput and latency. The one source for `/metrics` (so the
numbers match the DB exactly) and for the `/dashboard` page."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from genq.autoscaling import ClassLoad, FleetThroughput
from genq.models import Batch, Job, JobTotal, WebhookDelivery, WebhookDeliveryTotal, Worker, utcnow
from genq.states import TERMINAL_STATES, JobStatus
from genq.webhook_events import DeliveryStatus

MAX_SERIES_JOBS = 50_000  # finished jobs of the last hour read for the charts; beyond, sampled
# The window of the per-version figures (canary comparison): recent enough to show a bad
# version within minutes, long enough to hold a few jobs of a 10% canary.
VERSION_WINDOW_SECONDS = 300
LIVE_STATES = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
TERMINAL_VALUES = sorted(status.value for status in TERMINAL_STATES)


@dataclass(frozen=True)
class JobCount:
    status: str
    priority: str
    model: str
    count: int


@dataclass(frozen=True)
class MinutePoint:
    minute: datetime
    jobs_finished: int
    generated_tokens_per_second: float
    latency_p50_seconds: float | None
    latency_p95_seconds: float | None


@dataclass(frozen=True)
class VersionStats:
    """A model version's jobs finished in the last `VERSION_WINDOW_SECONDS`."""

    model: str
    version: str
    succeeded: int
    failed: int  # failed or expired: the errors to compare between versions
    latency_p50_seconds: float | None  # submit to finish, of the succeeded ones
    latency_p95_seconds: float | None
    generated_tokens_per_second: float  # over the window


@dataclass(frozen=True)
class BatchProgress:
    batch: Batch
    done: int  # lines whose job reached a terminal state


def job_counts(session: Session) -> list[JobCount]:
    """Queued and running jobs now (an index read: live jobs only), and for each terminal
    status the jobs that ever reached it (trigger-kept totals): no read grows with history."""
    live = session.execute(
        select(Job.status, Job.priority, Job.model, func.count())
        .where(Job.status.in_(LIVE_STATES))
        .group_by(Job.status, Job.priority, Job.model)
    )
    totals = session.execute(select(JobTotal.status, JobTotal.priority, JobTotal.model,
                                    JobTotal.count))
    return [JobCount(*row) for row in (*live, *totals)]


def webhook_delivery_counts(session: Session) -> dict[str, int]:
    """Pending deliveries now (index read) and the delivered / failed totals, ever."""
    pending = session.scalar(select(func.count()).select_from(WebhookDelivery)
                             .where(WebhookDelivery.status == DeliveryStatus.PENDING.value))
    totals = session.execute(select(WebhookDeliveryTotal.status, WebhookDeliveryTotal.count))
    return {DeliveryStatus.PENDING.value: pending} | dict(totals.all())


def live_workers(session: Session, live_seconds: float) -> list[Worker]:
    since = utcnow() - timedelta(seconds=live_seconds)
    return list(session.scalars(
        select(Worker).where(Worker.last_heartbeat_at >= since).order_by(Worker.id)))


def live_worker_versions(session: Session, live_seconds: float) -> set[tuple[str, str | None]]:
    """(model, version) of every live worker; version None for an unversioned one."""
    since = utcnow() - timedelta(seconds=live_seconds)
    rows = session.execute(select(Worker.model, Worker.model_version)
                           .where(Worker.last_heartbeat_at >= since).distinct())
    return {(model, version) for model, version in rows}


def queued_by_version(session: Session) -> dict[tuple[str, str], int]:
    """Queued jobs per (model, version), versioned jobs only: a version's workers may stop
    once its count is 0 and no weight sends it more."""
    rows = session.execute(
        select(Job.model, Job.model_version, func.count())
        .where(Job.status == JobStatus.QUEUED.value, Job.model_version.is_not(None))
        .group_by(Job.model, Job.model_version))
    return {(model, version): count for model, version, count in rows}


def class_loads(session: Session) -> dict[tuple[str, str], ClassLoad]:
    """(model, priority) -> queued jobs, their admitted tokens, running jobs: one aggregate."""
    rows = session.execute(
        select(Job.model, Job.priority, Job.status, func.count(),
               func.coalesce(func.sum(Job.admitted_tokens), 0))
        .where(Job.status.in_(LIVE_STATES))
        .group_by(Job.model, Job.priority, Job.status)
    )
    loads: dict[tuple[str, str], ClassLoad] = {}
    for model, priority, status, count, tokens in rows:
        load = loads.get((model, priority), ClassLoad(0, 0, 0))
        if status == JobStatus.QUEUED.value:
            load = ClassLoad(count, int(tokens), load.running_jobs)
        else:
            load = ClassLoad(load.queued_jobs, load.queued_tokens, count)
        loads[model, priority] = load
    return loads


def fleet_throughputs(session: Session, workers: list[Worker], window_seconds: float,
                      default_slots: int) -> dict[str, FleetThroughput]:
    """model -> its live `workers` and the admitted tokens of its jobs that succeeded in the
    last `window_seconds` (one aggregate over the window, not over history)."""
    now = utcnow()
    finished = dict(session.execute(
        select(Job.model, func.coalesce(func.sum(Job.admitted_tokens), 0))
        .where(Job.finished_at >= now - timedelta(seconds=window_seconds),
               Job.status == JobStatus.SUCCEEDED.value)
        .group_by(Job.model)
    ).tuples().all())
    by_model: dict[str, list[Worker]] = {}
    for worker in workers:
        by_model.setdefault(worker.model, []).append(worker)
    fleets = {}
    for model in set(finished) | set(by_model):
        live = by_model.get(model, [])
        slots = round(sum(w.max_batch_size for w in live) / len(live)) if live else default_slots
        seconds = sum(min(window_seconds, max((now - w.started_at).total_seconds(), 0.0))
                      for w in live)
        fleets[model] = FleetThroughput(len(live), slots, int(finished.get(model, 0)), seconds)
    return fleets


def recent_jobs(session: Session, tenant_id: str, limit: int = 20) -> list[Job]:
    return list(session.scalars(
        select(Job).where(Job.tenant_id == tenant_id).order_by(Job.id.desc()).limit(limit)))


def recent_batches(session: Session, tenant_id: str, limit: int = 10) -> list[BatchProgress]:
    batches = list(session.scalars(
        select(Batch).where(Batch.tenant_id == tenant_id).order_by(Batch.id.desc()).limit(limit)))
    if not batches:
        return []
    done = dict(session.execute(
        select(Job.batch_id, func.count())
        .where(Job.batch_id.in_([b.id for b in batches]),
               Job.status.in_([s.value for s in TERMINAL_STATES]))
        .group_by(Job.batch_id)
    ).tuples().all())
    return [BatchProgress(batch, done.get(batch.id, 0)) for batch in batches]


def minute_series(session: Session, minutes: int = 60) -> list[MinutePoint]:
    """One point per minute of the last `minutes`: jobs finished, generated tokens/s, and the
    p50/p95 of submit-to-finish latency of the jobs that succeeded in that minute."""
    now = utcnow().replace(second=0, microsecond=0)
    start = now - timedelta(minutes=minutes - 1)
    rows = session.execute(
        select(Job.created_at, Job.finished_at, Job.status, Job.completion_tokens)
        .where(Job.finished_at >= start).limit(MAX_SERIES_JOBS)
    ).all()
    buckets: dict[int, list] = {index: [] for index in range(minutes)}
    for created_at, finished_at, status, completion_tokens in rows:
        index = int((finished_at - start).total_seconds() // 60)
        if 0 <= index < minutes:
            buckets[index].append((created_at, finished_at, status, completion_tokens or 0))
    points = []
    for index, jobs in buckets.items():
        latencies = sorted((f - c).total_seconds() for c, f, status, _ in jobs
                           if status == JobStatus.SUCCEEDED.value)
        points.append(MinutePoint(
            minute=start + timedelta(minutes=index),
            jobs_finished=len(jobs),
            generated_tokens_per_second=sum(tokens for *_, tokens in jobs) / 60,
            latency_p50_seconds=_percentile(latencies, 0.50),
            latency_p95_seconds=_percentile(latencies, 0.95),
        ))
    return points


def version_stats(session: Session, window_seconds: float = VERSION_WINDOW_SECONDS
                  ) -> list[VersionStats]:
    """Per (model, version) figures of the jobs that finished in the window, versioned only."""
    rows = session.execute(
        select(Job.model, Job.model_version, Job.status, Job.created_at, Job.finished_at,
               Job.completion_tokens)
        .where(Job.status.in_(TERMINAL_VALUES),  # with finished_at: an index range
               Job.finished_at >= utcnow() - timedelta(seconds=window_seconds),
               Job.model_version.is_not(None))
        .limit(MAX_SERIES_JOBS)
    ).all()
    groups: dict[tuple[str, str], list] = {}
    for model, version, *job in rows:
        groups.setdefault((model, version), []).append(job)
    stats = []
    for (model, version), jobs in sorted(groups.items()):
        latencies = sorted((f - c).total_seconds() for status, c, f, _ in jobs
                           if status == JobStatus.SUCCEEDED.value)
        errors = sum(status in (JobStatus.FAILED.value, JobStatus.EXPIRED.value)
                     for status, *_ in jobs)
        stats.append(VersionStats(
            model, version, len(latencies), errors, _percentile(latencies, 0.50),
            _percentile(latencies, 0.95),
            sum(tokens or 0 for *_, tokens in jobs) / window_seconds))
    return stats


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]
