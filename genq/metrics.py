"""Prometheus metrics computed from the database at scrape time, shared by the API's /metrics.

Why from the DB: queue depth, jobs by state and webhook outcomes are facts about rows, not about
one process. Reading them at scrape makes them exact (they match the DB) and the same whichever
gunicorn process or API host answers; counters kept in memory would each see a slice. A scrape
reads only live rows, a recent window and trigger-kept totals (genq.fleet), so its cost does
not grow with the history of finished jobs.
Per-process numbers (HTTP requests in the API, engine and job timings in a worker) are kept by
prometheus_client in those processes: see results_api/metrics.py and workers/metrics.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from genq import db, fleet, routing
from genq.autoscaling import ClassLoad, FleetThroughput, scaling_signal
from genq.states import TERMINAL_STATES, JobStatus, Priority
from genq.webhook_events import DeliveryStatus

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class DatabaseCollector(Collector):
    def __init__(self, database_url: str, worker_live_seconds: float, *,
                 target_backlog_seconds: float, throughput_window_seconds: float,
                 default_worker_slots: int) -> None:
        self.database_url = database_url
        self.worker_live_seconds = worker_live_seconds
        self.target_backlog_seconds = target_backlog_seconds
        self.throughput_window_seconds = throughput_window_seconds
        self.default_worker_slots = default_worker_slots

    def collect(self) -> Iterator[Metric]:
        with db.session_factory(self.database_url)() as session:
            counts = fleet.job_counts(session)
            deliveries = fleet.webhook_delivery_counts(session)
            workers = fleet.live_workers(session, self.worker_live_seconds)
            loads = fleet.class_loads(session)
            fleets = fleet.fleet_throughputs(session, workers, self.throughput_window_seconds,
                                             self.default_worker_slots)
            versions = fleet.version_stats(session)
            rules = routing.current_rules(session)

        depth = GaugeMetricFamily("genq_queue_depth", "Jobs waiting in the queue (status queued).",
                                  labels=["priority", "model"])
        jobs = GaugeMetricFamily("genq_jobs", "Jobs by status: queued and running now; a "
                                 "terminal status counts the jobs that ever reached it.",
                                 labels=["status", "priority", "model"])
        finished = CounterMetricFamily("genq_jobs_finished", "Jobs that reached a terminal state.",
                                       labels=["status", "model"])
        queued = {(p.value, c.model): 0 for c in counts for p in Priority}
        terminal: dict[tuple[str, str], int] = {}
        for count in counts:
            jobs.add_metric([count.status, count.priority, count.model], count.count)
            if count.status == JobStatus.QUEUED.value:
                queued[count.priority, count.model] += count.count
            elif JobStatus(count.status) in TERMINAL_STATES:
                key = (count.status, count.model)
                terminal[key] = terminal.get(key, 0) + count.count
        for (priority, model), value in sorted(queued.items()):
            depth.add_metric([priority, model], value)
        for (status, model), value in sorted(terminal.items()):
            finished.add_metric([status, model], value)

        webhooks = GaugeMetricFamily("genq_webhook_deliveries",
                                     "Webhook deliveries pending now, and delivered or failed "
                                     "ever.", labels=["status"])
        # Every status has a series, zero included, so rates and alerts work from the start.
        deliveries = {status.value: 0 for status in DeliveryStatus} | deliveries
        for status, value in sorted(deliveries.items()):
            webhooks.add_metric([status], value)

        live = GaugeMetricFamily("genq_workers_live", "Job workers with a recent heartbeat.",
                                 labels=["model"])
        batch = GaugeMetricFamily("genq_worker_running_requests",
                                  "Requests in each live worker's engine batch (heartbeat).",
                                  labels=["worker", "model"])
        by_model: dict[str, int] = {}
        for worker in workers:
            by_model[worker.model] = by_model.get(worker.model, 0) + 1
            batch.add_metric([worker.id, worker.model], worker.num_running)
        for model, value in sorted(by_model.items()):
            live.add_metric([model], value)
        yield from (depth, jobs, finished, webhooks, live, batch)
        yield from self._autoscaling(loads, fleets, {c.model for c in counts})
        yield from _version_metrics(versions, rules, workers)

    def _autoscaling(self, loads: dict[tuple[str, str], ClassLoad],
                     fleets: dict[str, FleetThroughput],
                     models: set[str]) -> Iterator[Metric]:
        """The two signals of docs/autoscaling.md, for every priority of every model that has
        jobs or live workers (zero included, so a scaler's query never finds no series)."""
        backlog = GaugeMetricFamily(
            "genq_queue_backlog_seconds",
            "Queued work (prompt + max tokens) over the model's recent tokens/s (+Inf: no "
            "recent throughput).", labels=["model", "priority"])
        desired = GaugeMetricFamily(
            "genq_desired_workers",
            "Workers wanted for GENQ_TARGET_BACKLOG_SECONDS: running jobs' batch slots plus "
            "the queue's drain; a fraction, sum over priorities and round up.",
            labels=["model", "priority"])
        idle = FleetThroughput(0, self.default_worker_slots, 0, 0.0)
        for model in sorted(models | set(fleets)):
            for priority in Priority:
                signal = scaling_signal(loads.get((model, priority.value), ClassLoad(0, 0, 0)),
                                        fleets.get(model, idle), self.target_backlog_seconds)
                backlog.add_metric([model, priority.value], signal.backlog_seconds)
                desired.add_metric([model, priority.value], signal.desired_workers)
        yield from (backlog, desired)


def _version_metrics(versions: list[fleet.VersionStats], rules: dict[str, routing.RoutingRule],
                     workers: list) -> Iterator[Metric]:
    """Model versions side by side (canary): the weights in force, live workers, and the
    outcome, latency and throughput of the jobs each version finished recently."""
    window = f"in the last {fleet.VERSION_WINDOW_SECONDS} s"
    labels = ["model", "version"]
    weight = GaugeMetricFamily("genq_version_weight", "Routing weight of each model version.",
                               labels=labels)
    live = GaugeMetricFamily("genq_version_workers_live", "Live workers of each model version.",
                             labels=labels)
    outcome = GaugeMetricFamily("genq_version_jobs", f"Jobs of each model version finished "
                                f"{window}, by outcome (failed: failed or expired).",
                                labels=[*labels, "outcome"])
    latency = GaugeMetricFamily("genq_version_latency_seconds", f"Submit-to-finish latency of "
                                f"the jobs each model version finished {window}.",
                                labels=[*labels, "quantile"])
    tokens = GaugeMetricFamily("genq_version_generated_tokens_per_second",
                               f"Tokens each model version generated per second {window}.",
                               labels=labels)
    for rule in rules.values():
        for version, value in rule.weights:
            weight.add_metric([rule.model, version], value)
    counts: dict[tuple[str, str], int] = {}
    for worker in workers:
        if worker.model_version:
            key = (worker.model, worker.model_version)
            counts[key] = counts.get(key, 0) + 1
    for (model, version), value in sorted(counts.items()):
        live.add_metric([model, version], value)
    for stats in versions:
        key = [stats.model, stats.version]
        outcome.add_metric([*key, "succeeded"], stats.succeeded)
        outcome.add_metric([*key, "failed"], stats.failed)
        for quantile, value in (("0.5", stats.latency_p50_seconds),
                                ("0.95", stats.latency_p95_seconds)):
            if value is not None:
                latency.add_metric([*key, quantile], value)
        tokens.add_metric(key, stats.generated_tokens_per_second)
    yield from (weight, live, outcome, latency, tokens)


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """An empty directory for prometheus_client's multiprocess mode, for the gunicorn processes
    of one API (set in the environment before they start; stale files from a previous run would
    add old counts)."""
    directory = (data_dir / "prometheus-api").resolve()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROCESS_ENV))
