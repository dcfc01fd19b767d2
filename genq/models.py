"""SQLAlchemy 2.0 typed models. The schema changes only through Alembic (migrations/)."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from genq.batch_states import BatchStatus
from genq.states import JobStatus, Priority


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Time-ordered ids (`job_0193a…`): sorting by id is sorting by creation, for cursors."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class UTCDateTime(TypeDecorator):
    """Timezone-aware datetimes on every backend (SQLite drops the zone; we restore UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Admission limits (genq.limits), None = unlimited; set with `genq tenants set-limits`.
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    max_tokens_per_job: Mapped[int | None] = mapped_column(Integer, default=None)


class ApiKey(Base):
    """Only the sha256 of a key is stored, plus a short visible prefix to tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        # Also serves the fair-share backlog count (genq.fair_share) from the index alone.
        Index("ix_jobs_tenant_status_model_priority", "tenant_id", "status", "model", "priority",
              "created_at"),
        Index("ix_jobs_batch_line", "batch_id", "batch_line"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_tenant_admitted", "tenant_id", "admitted_at"),
        # /metrics reads live jobs and recently finished ones through these, never history.
        Index("ix_jobs_status_model_priority", "status", "model", "priority", "admitted_tokens"),
        Index("ix_jobs_status_finished", "status", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    status: Mapped[JobStatus] = mapped_column(String(16), default=JobStatus.QUEUED)
    priority: Mapped[Priority] = mapped_column(String(16), default=Priority.DEFAULT)
    model: Mapped[str] = mapped_column(String(200))
    # The version routed at submit (genq.routing), and so the one whose worker runs it; None
    # for a model without a routing rule.
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    prompt: Mapped[str | None] = mapped_column(Text, default=None)
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    sampling_params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    output_text: Mapped[str | None] = mapped_column(Text, default=None)
    # With `logprobs` asked: per generated token [text, logprob, [[text, logprob], ...]] (its
    # top alternatives, most likely first), as the worker stored them.
    output_logprobs: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    finish_reason: Mapped[str | None] = mapped_column(String(16), default=None)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    # prompt_tokens + max_tokens at submit: what the tenant's tokens-per-minute window counts.
    admitted_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    # When the tenant's limits admitted it (genq.limits): at submit, or for a batch line when
    # the batch feeder moves it into the window. None: a batch line still waiting outside it.
    admitted_at: Mapped[datetime | None] = mapped_column(default=None)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set by the claim, cleared once the job's micro-batch is in the engine: still set after
    # its worker died means it died starting the micro-batch (workers.in_flight: suspects).
    is_starting: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # From the optional `timeout_s` at submit: past it the job is `expired`, partial output kept.
    deadline_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set on the jobs of a batch's lines (issue 7): the line's custom_id and 1-based number.
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), default=None)
    custom_id: Mapped[str | None] = mapped_column(String(512), default=None)
    batch_line: Mapped[int | None] = mapped_column(Integer, default=None)
    # Optional per-job callback (issue 6): the URL and the job states it is told about.
    webhook_url: Mapped[str | None] = mapped_column(String(2048), default=None)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobTotal(Base):
    """Jobs that reached a terminal status, ever: counted by database triggers on `jobs`
    (migration 0010), so /metrics reads a few rows instead of the history. Deleting old jobs
    (retention) does not lower them."""

    __tablename__ = "job_totals"

    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    priority: Mapped[str] = mapped_column(String(16), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class Worker(Base):
    """A live job worker process, upserted by its heartbeat (dashboard, `GET /v1/models`)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid
    hostname: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    max_batch_size: Mapped[int] = mapped_column(Integer)
    num_running: Mapped[int] = mapped_column(Integer, default=0)
    metrics_port: Mapped[int | None] = mapped_column(Integer, default=None)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ModelRoute(Base):
    """A model's routing rule: version -> weight (genq.routing). The latest row of a model is
    in force; earlier ones stay as its history (`genq models rollback` reads them)."""

    __tablename__ = "model_routes"
    __table_args__ = (Index("ix_model_routes_model_id", "model", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    weights: Mapped[dict[str, Any]] = mapped_column()  # {"v1": 90, "v2": 10}, in order
    sticky: Mapped[str | None] = mapped_column(String(80), default=None)  # tenant | field:NAME
    when_unserved: Mapped[str] = mapped_column(String(16), default="reroute",
                                               server_default="reroute")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Outbox(Base):
    """Messages written in the same transaction as the state they announce; a relay publishes
    the ones not yet sent, so a broker outage at submit delays a job but never loses it."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_unsent", "sent_at", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # e.g. "run_job"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    queue: Mapped[str] = mapped_column(String(100))
    # The job's fair-share level in its class (genq.fair_share); every publish of this row
    # sends it, so a relay or a retry does not change the job's place.
    share_level: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)
    publish_attempts: Mapped[int] = mapped_column(Integer, default=0)


class File(Base):
    """An uploaded JSONL file (content on disk under data_dir/files) or a batch's output or
    error file (`path` is None while it is generated from the jobs table on each download)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Batch(Base):
    """An OpenAI-style batch: one input file whose lines run as `batch`-priority jobs."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("batch"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    status: Mapped[BatchStatus] = mapped_column(String(16), default=BatchStatus.VALIDATING,
                                                index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    output_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    error_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    completion_window: Mapped[str] = mapped_column(String(16))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    total_lines: Mapped[int] = mapped_column(Integer, default=0)
    # The feeder's window cursor: lines up to here have had their run message enqueued.
    enqueued_through_line: Mapped[int] = mapped_column(Integer, default=0)
    retried_from_batch_id: Mapped[str | None] = mapped_column(String(40), default=None)
    ingest_claimed_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    in_progress_at: Mapped[datetime | None] = mapped_column(default=None)
    finalizing_at: Mapped[datetime | None] = mapped_column(default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    failed_at: Mapped[datetime | None] = mapped_column(default=None)
    expired_at: Mapped[datetime | None] = mapped_column(default=None)
    cancelling_at: Mapped[datetime | None] = mapped_column(default=None)
    cancelled_at: Mapped[datetime | None] = mapped_column(default=None)


class SigningSecrets:
    """A Standard Webhooks secret plus the one it replaced, still signed with until
    `previous_secret_expires_at` so receivers can roll over without dropping a delivery."""

    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100), default=None)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(default=None)

    def active_secrets(self, now: datetime) -> list[str]:
        expires = self.previous_secret_expires_at
        if self.previous_secret is None or expires is None or expires <= now:
            return [self.secret]
        return [self.secret, self.previous_secret]


class WebhookSecret(SigningSecrets, Base):
    """The tenant's secret for per-job `webhook_url` callbacks (endpoints have their own)."""

    __tablename__ = "webhook_secrets"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEndpoint(SigningSecrets, Base):
    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_tenant_enabled", "tenant_id", "enabled"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whe"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSON)
    description: Mapped[str | None] = mapped_column(String(500), default=None)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Deleted endpoints are kept (disabled) so their delivery log stays readable internally.
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookEvent(Base):
    """One event, written in the transaction of the state change it announces. `id` is the
    `webhook-id` header, the same on every retry and replay; `payload` is the exact body."""

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("msg"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event to one target. The webhook worker sends it when `next_attempt_at` is due and
    no live lease holds it; `lease_token` makes sure only the latest dispatch of it runs."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
                      # the replays-per-minute cap (producer.webhooks)
                      Index("ix_webhook_deliveries_tenant_created", "tenant_id", "created_at"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("dlv"))
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    endpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("webhook_endpoints.id"), index=True, default=None)
    url: Mapped[str] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    lease_token: Mapped[str | None] = mapped_column(String(32), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    replay_of: Mapped[str | None] = mapped_column(String(40), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookDeliveryTotal(Base):
    """Webhook deliveries that ended delivered or failed, ever: counted like JobTotal."""

    __tablename__ = "webhook_delivery_totals"

    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class WebhookAttempt(Base):
    """The delivery log: one row per HTTP attempt, successful or not."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    latency_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    response_excerpt: Mapped[str | None] = mapped_column(Text, default=None)
