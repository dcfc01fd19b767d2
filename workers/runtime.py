"""The per-process worker runtime: the engine (in a process of its own, workers.engine_process),
the lease renewal thread, and the housekeeping thread that aborts canceled jobs and reaps.
Built once, warmed up before taking jobs."""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache

from engine.sampling_params import SamplingParams
from genq import db
from genq.job_events import JobEventLog
from genq.queues import is_amqp
from genq.settings import Settings, get_settings
from workers import heartbeat
from workers.engine_loop import EngineRequest
from workers.engine_process import EngineProcess
from workers.job_runner import JobRunner
from workers.job_streams import JobStreams
from workers.leases import LeaseRenewer
from workers.metrics import JobTimingMiddleware, start_metrics_server
from workers.micro_batch import MicroBatcher
from workers.reaper import (
    expire_overdue_queued,
    reap_expired_leases,
    republish_orphaned_queued,
)

log = logging.getLogger(__name__)

# After the drain deadline, the aborted jobs' hand-backs still need a commit and an ack.
DRAIN_GRACE_SECONDS = 5.0


def engine_options(settings: Settings) -> dict:
    """The worker's engine, sized by its settings, as EngineConfig's arguments (the engine
    process builds it; benchmarks build the same engine offline with `LLM(**options)`)."""
    return {
        "model": settings.model,
        "dtype": settings.engine_dtype,
        "device": settings.engine_device,
        "max_num_seqs": settings.worker_concurrency,
        "max_num_batched_tokens": settings.engine_max_num_batched_tokens,
        "cache_dir": str(settings.model_cache_dir_resolved),
        "num_threads": settings.engine_threads_resolved,
        "quantization": settings.engine_quantization,
        **({"kv_cache_tokens": settings.engine_kv_cache_tokens}
           if settings.engine_kv_cache_tokens else {}),
    }


class WorkerRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        db.ensure_schema_current(settings.database_url_resolved)
        started = time.monotonic()
        # Token streams need the broker's Redis; on RabbitMQ the API streams status and the
        # final output from the DB.
        broker_url = settings.broker_url_resolved
        streams = (JobStreams(JobEventLog(broker_url))
                   if settings.stream_events and broker_url.startswith("redis") else None)
        self.loop = EngineProcess(engine_options(settings), settings.worker_batch_wait_ms / 1000,
                                  on_deltas=streams.add_deltas if streams else None)
        self.loop.start()
        self.runner = JobRunner(settings, self.loop, streams=streams)
        self.runner.middleware.append(JobTimingMiddleware())
        # RabbitMQ's consumer hands messages over one by one, to be gathered into micro-batches;
        # on Redis each round of the fetcher is one already (workers.tasks.JobIntake).
        self.batcher = MicroBatcher(self.runner) if is_amqp(settings.broker_url) else None
        if settings.worker_metrics_port:
            start_metrics_server(settings.worker_metrics_port, self.loop, settings.model)
        self._warm_up()
        log.info("engine for %s ready in %.1f s", settings.model, time.monotonic() - started)
        self._stop = threading.Event()
        self.leases = LeaseRenewer(self.runner.renew_leases, settings.job_lease_seconds / 3)
        self.leases.start()
        self._housekeeping = threading.Thread(
            target=self._housekeep, args=(settings,), name="genq-housekeeping", daemon=True
        )
        self._housekeeping.start()

    def _warm_up(self) -> None:
        params = SamplingParams(max_tokens=2, temperature=0.0)
        self.loop.submit(EngineRequest("warmup", "Hello", params, priority=0)).result()

    def _housekeep(self, settings: Settings) -> None:
        """Abort canceled and overdue jobs every tick; reap dead workers' jobs and beat less
        often. (Lease renewal has a thread of its own: a slow chore here never delays it.)"""
        chores = [
            (0.0, self.runner.abort_canceled),
            (0.0, self.runner.enforce_deadlines),
            (settings.reaper_interval_seconds, lambda: reap_expired_leases(settings)),
            (settings.reaper_interval_seconds, lambda: expire_overdue_queued(settings)),
            (settings.reaper_interval_seconds, lambda: republish_orphaned_queued(settings)),
            (settings.worker_heartbeat_seconds, lambda: heartbeat.beat(
                settings, self.runner.worker_id, len(self.loop.in_flight()))),
        ]
        last_run = [0.0] * len(chores)
        while not self._stop.wait(settings.cancel_poll_seconds):
            for index, (interval, chore) in enumerate(chores):
                if time.monotonic() - last_run[index] < interval:
                    continue
                # A failed chore (DB or broker hiccup) waits its interval like a successful one,
                # and never keeps the others from running.
                last_run[index] = time.monotonic()
                try:
                    chore()
                except Exception:
                    log.exception("housekeeping chore %s failed", getattr(chore, "__name__", chore))

    def drain(self, seconds: float) -> None:
        """Warm shutdown, once Celery stopped consuming: in-flight jobs get `seconds` to
        finish, then go back to the queue; returns when every delivery is acked."""
        self.runner.begin_drain(seconds)
        deadline = time.monotonic() + seconds + DRAIN_GRACE_SECONDS
        while not ((self.batcher is None or self.batcher.is_idle()) and self.runner.is_idle()):
            if time.monotonic() > deadline:
                log.warning("drain: jobs still in flight after %.0f s; their messages are "
                            "redelivered", seconds)
                return
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self.leases.stop()
        self.loop.stop(timeout=5)
        heartbeat.leave(self.settings, self.runner.worker_id)


@lru_cache(maxsize=1)
def get_runtime() -> WorkerRuntime:
    return WorkerRuntime(get_settings())
