"""The autoscaling formulas: backlog seconds and desired workers for one model's priority class.

Pure functions of plain numbers, so `/metrics` (genq.metrics) and the simulation
(benchmarks/autoscale_sim.py) scale by the very same rule. The inputs are read by genq.fleet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ClassLoad:
    """One (model, priority) class now. Work is counted in admitted tokens (prompt + max_tokens),
    the figure admission stores per job, so no tokenizer runs at scrape."""

    queued_jobs: int
    queued_tokens: int
    running_jobs: int


@dataclass(frozen=True)
class FleetThroughput:
    """One model's live workers, and what they finished in the recent window.

    `finished_tokens` are the admitted tokens of the jobs that succeeded in the window;
    `worker_seconds` how long the live workers were up in it (a worker started 10 s ago counts
    10 s), so a fleet that just grew is not mistaken for a slow one."""

    live_workers: int
    slots_per_worker: int  # the engine's batch size, from the heartbeats
    finished_tokens: int
    worker_seconds: float

    @property
    def tokens_per_second_per_worker(self) -> float:
        if self.worker_seconds <= 0:
            return 0.0
        return self.finished_tokens / self.worker_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_second_per_worker * self.live_workers


@dataclass(frozen=True)
class ScalingSignal:
    backlog_seconds: float
    desired_workers: float


def scaling_signal(load: ClassLoad, fleet: FleetThroughput,
                   target_backlog_seconds: float) -> ScalingSignal:
    """Backlog = queued work / the fleet's recent tokens/s (+Inf while work waits on a fleet of
    unknown speed). Desired workers = the batch slots the running jobs fill, plus the workers
    that would drain the queue in `target_backlog_seconds`. A fraction, so that the classes of a
    model add up exactly; KEDA and the HPA round the sum up. Jobs waiting on no workers or on no
    recent throughput (scale from zero) ask for at least one."""
    busy = load.running_jobs / max(fleet.slots_per_worker, 1)
    per_worker = fleet.tokens_per_second_per_worker
    if fleet.live_workers == 0 or per_worker <= 0:
        if load.queued_jobs == 0:
            return ScalingSignal(0.0, busy)
        return ScalingSignal(math.inf, max(busy, 1.0))
    backlog = load.queued_tokens / fleet.tokens_per_second
    draining = load.queued_tokens / (target_backlog_seconds * per_worker)
    return ScalingSignal(backlog, busy + draining)
