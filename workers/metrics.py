"""A worker's own Prometheus metrics, served on GENQ_WORKER_METRICS_PORT by a small HTTP thread.

Why a port per worker and not the multiprocess mode: a worker is one process (Celery's threads
pool), its engine numbers are live gauges of that process, and workers run on other hosts than
the API, so each is its own scrape target (the heartbeat row records the port). Job timings are
observed through the worker middleware hooks; engine numbers are read from `engine.stats` at
scrape time, so scraping costs the engine nothing between scrapes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from genq.models import Job, utcnow

# Seconds from 10 ms to 30 min: interactive jobs wait milliseconds, batch lines wait minutes.
TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

JOB_QUEUE_WAIT_SECONDS = Histogram(
    "genq_job_queue_wait_seconds", "From submit to the worker's claim of the job.",
    ["priority", "model"], buckets=TIME_BUCKETS)
JOB_RUN_SECONDS = Histogram(
    "genq_job_run_seconds", "From the worker's claim of the job to its result.",
    ["priority", "model"], buckets=TIME_BUCKETS)
JOBS_RUN = Counter("genq_worker_jobs_run", "Jobs this worker ran to an end (any outcome).",
                   ["priority", "model"])


class JobTimingMiddleware:
    """Worker middleware (workers.middleware): queue wait at `before_job`, run time at
    `after_job`."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def before_job(self, job: Job) -> None:
        JOB_QUEUE_WAIT_SECONDS.labels(job.priority, job.model).observe(
            max(0.0, (utcnow() - job.created_at).total_seconds()))
        with self._lock:
            self._started[job.id] = time.monotonic()

    def after_job(self, job: Job) -> None:
        with self._lock:
            started = self._started.pop(job.id, None)
        if started is not None:
            JOB_RUN_SECONDS.labels(job.priority, job.model).observe(time.monotonic() - started)
        JOBS_RUN.labels(job.priority, job.model).inc()


class EngineCollector(Collector):
    """The engine's EngineStats as metrics; an engine without stats (echo) exports none."""

    def __init__(self, engine, model: str) -> None:
        self.engine = engine
        self.model = model

    def collect(self) -> Iterator[Metric]:
        stats = getattr(self.engine, "stats", None)
        if stats is None:
            return
        labels = ["model"]
        metrics = [
            (CounterMetricFamily, "genq_engine_prompt_tokens", "Prompt tokens taken in.",
             stats.num_prompt_tokens),
            (CounterMetricFamily, "genq_engine_generation_tokens", "Tokens generated.",
             stats.num_generated_tokens),
            (CounterMetricFamily, "genq_engine_steps", "Engine steps (forward passes) run.",
             stats.num_steps),
            (CounterMetricFamily, "genq_engine_preemptions", "Sequences preempted (KV full).",
             stats.num_preemptions),
            (CounterMetricFamily, "genq_engine_prefix_cache_queried_tokens",
             "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queried_tokens),
            (CounterMetricFamily, "genq_engine_prefix_cache_hit_tokens",
             "Prompt tokens found in the prefix cache.", stats.prefix_cache_hit_tokens),
            (GaugeMetricFamily, "genq_engine_running_requests",
             "Requests in the running batch.", stats.num_running),
            (GaugeMetricFamily, "genq_engine_waiting_requests",
             "Requests waiting for the batch.", stats.num_waiting),
            (GaugeMetricFamily, "genq_engine_kv_cache_usage_ratio",
             "Fraction of KV-cache blocks in use.", stats.kv_cache_usage),
        ]
        for family, name, documentation, value in metrics:
            metric = family(name, documentation, labels=labels)
            metric.add_metric([self.model], value)
            yield metric


def start_metrics_server(port: int, engine, model: str) -> None:
    """Serve this worker's metrics on `port` (all interfaces: Prometheus scrapes from afar)."""
    REGISTRY.register(EngineCollector(engine, model))
    start_http_server(port)
