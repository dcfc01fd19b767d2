"""Autoscaling by genq's signals on a bursty trace, simulated: an autoscaled fleet against a fixed
fleet sized for the peak (interactive queue wait and worker-minutes).

    python -m benchmarks.autoscale_sim [--minutes 60] [--spike-start-minute 20]
        [--spike-minutes 10] [--interactive-per-second 2] [--bulk-per-second 30]
        [--worker-tokens-per-second N | --engine-results PATH] [--startup-seconds 60]
        [--poll-seconds 15] [--json PATH]

- Trace: interactive jobs (Poisson, the whole time) plus a spike of `batch`-priority bulk jobs
  (Poisson, --spike-minutes long); prompt U[16,256] and max_tokens U[16,128] tokens, the
  W-CPU workload of benchmarks/engine_throughput.py, every job running to max_tokens.
- Fleet: discrete events, no processes. A worker has `--slots` batch slots (genq's default
  worker_concurrency) and makes the measured tokens/s at a full batch: genq's output_tok_s in
  --engine-results (default: the 2-core Zen 4 run of the same workload, at up to 64 sequences),
  unless --worker-tokens-per-second is given.
  Each running job decodes at tokens/s / slots (linear in the batch: pessimistic for small
  batches). A new worker serves after --startup-seconds (pod start + model load) and is billed
  from its request; a worker scaled down drains (takes no new job, leaves when empty).
- Scaler: every --poll-seconds, `genq.autoscaling.scaling_signal` on the same inputs /metrics
  reads (queued and running jobs per class, admitted tokens succeeded in the window, live
  workers' up-time), replicas = ceil(sum of desired workers over classes), as KEDA / the HPA
  do with an AverageValue target of 1. Scale-up is immediate but at most doubles (or adds 4)
  per poll, scale-down takes the highest recommendation of the last
  --scale-down-window-seconds: the HPA behaviour of deploy/autoscaling/*.yaml. It starts,
  and never goes below, --min-workers (1, the HPA's minReplicas; 0 shows a cold start).
- Fixed fleet: ceil(peak demand / tokens/s per worker), the peak demand being the interactive
  plus the bulk arrival rate of decode tokens.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from genq.autoscaling import ClassLoad, FleetThroughput, scaling_signal
from genq.states import Priority

ENGINE_RESULTS = Path(__file__).parent / "results-engine-throughput-zen4.json"
RESULTS = Path(__file__).parent / "results-autoscale-sim.json"
PROMPT_TOKENS = (16, 256)
MAX_TOKENS = (16, 128)


@dataclass
class SimJob:
    priority: Priority
    arrived_at: float
    prompt_tokens: int
    max_tokens: int
    started_at: float | None = None

    @property
    def admitted_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass
class SimWorker:
    requested_at: float
    ready_at: float
    running: int = 0
    draining: bool = False
    left_at: float | None = None

    def is_ready(self, now: float) -> bool:
        return self.ready_at <= now and self.left_at is None


@dataclass(frozen=True)
class ScalerConfig:
    target_backlog_seconds: float
    window_seconds: float
    poll_seconds: float
    scale_down_window_seconds: float
    min_workers: int
    max_workers: int


@dataclass
class FleetReport:
    name: str
    worker_minutes: float
    max_workers: int
    interactive_wait_p50_s: float
    interactive_wait_p95_s: float
    bulk_wait_p95_s: float
    bulk_done_minutes_after_spike_start: float
    jobs: int
    workers_by_minute: list[int] = field(default_factory=list)


def make_trace(minutes: float, spike_start_minute: float, spike_minutes: float,
               interactive_per_second: float, bulk_per_second: float,
               seed: int = 0) -> list[SimJob]:
    rng = random.Random(seed)

    def arrivals(priority: Priority, rate: float, start: float, end: float) -> list[SimJob]:
        jobs, now = [], start
        while rate > 0:
            now += rng.expovariate(rate)
            if now >= end:
                return jobs
            jobs.append(SimJob(priority, now, rng.randint(*PROMPT_TOKENS),
                               rng.randint(*MAX_TOKENS)))
        return jobs

    spike_start = spike_start_minute * 60
    trace = (arrivals(Priority.INTERACTIVE, interactive_per_second, 0, minutes * 60)
             + arrivals(Priority.BATCH, bulk_per_second, spike_start,
                        spike_start + spike_minutes * 60))
    return sorted(trace, key=lambda job: job.arrived_at)


class FleetSim:
    """One run of a trace; `scaler` None is a fixed fleet of `initial_workers`."""

    def __init__(self, trace: list[SimJob], tokens_per_second: float, slots: int,
                 startup_seconds: float, initial_workers: int,
                 scaler: ScalerConfig | None) -> None:
        self.trace = [SimJob(j.priority, j.arrived_at, j.prompt_tokens, j.max_tokens)
                      for j in trace]
        self.job_rate = tokens_per_second / slots  # decode tokens/s of one running job
        self.slots, self.startup_seconds, self.scaler = slots, startup_seconds, scaler
        self.workers = [SimWorker(0.0, 0.0) for _ in range(initial_workers)]
        self.queues: dict[Priority, deque[SimJob]] = {p: deque() for p in Priority}
        self.queued_tokens = dict.fromkeys(Priority, 0)
        self.running = dict.fromkeys(Priority, 0)
        self.finished: deque[tuple[float, int]] = deque()  # (time, admitted tokens)
        self.recommendations: deque[tuple[float, int]] = deque()
        self.events: list[tuple[float, int, str, object]] = []
        self.sequence = itertools.count()

    def run(self, horizon: float) -> float:
        """Play every event; returns when the last job finished, or `horizon` if later (both
        fleets are billed at least for the trace's length)."""
        for job in self.trace:
            self._at(job.arrived_at, "arrive", job)
        if self.scaler is not None:
            self._at(0.0, "poll", None)
        trace_end, now, left = max(j.arrived_at for j in self.trace), 0.0, len(self.trace)
        while self.events and (left or now < trace_end):
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self.queues[payload.priority].append(payload)
                self.queued_tokens[payload.priority] += payload.admitted_tokens
            elif kind == "finish":
                job, worker = payload
                worker.running -= 1
                self.running[job.priority] -= 1
                self.finished.append((now, job.admitted_tokens))
                left -= 1
                if worker.draining and worker.running == 0:
                    worker.left_at = now
            elif kind == "poll":
                self._scale(now)
                self._at(now + self.scaler.poll_seconds, "poll", None)
            self._dispatch(now)  # after every event, a "ready" worker's included
        end = max(now, horizon)
        for worker in self.workers:
            worker.left_at = end if worker.left_at is None else worker.left_at
        return end

    def _at(self, time: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (time, next(self.sequence), kind, payload))

    def _dispatch(self, now: float) -> None:
        open_workers = [w for w in self.workers
                        if w.is_ready(now) and not w.draining and w.running < self.slots]
        for priority in Priority:  # highest class first, FIFO within it
            queue = self.queues[priority]
            while queue and open_workers:
                worker = min(open_workers, key=lambda w: w.running)
                job = queue.popleft()
                self.queued_tokens[priority] -= job.admitted_tokens
                self.running[priority] += 1
                job.started_at = now
                worker.running += 1
                if worker.running == self.slots:
                    open_workers.remove(worker)
                self._at(now + job.max_tokens / self.job_rate, "finish", (job, worker))

    def _scale(self, now: float) -> None:
        config = self.scaler
        while self.finished and self.finished[0][0] < now - config.window_seconds:
            self.finished.popleft()
        live = [w for w in self.workers if w.is_ready(now) and not w.draining]
        fleet = FleetThroughput(
            len(live), self.slots, sum(tokens for _, tokens in self.finished),
            sum(min(config.window_seconds, now - w.ready_at) for w in live))
        desired = sum(scaling_signal(
            ClassLoad(len(self.queues[p]), self.queued_tokens[p], self.running[p]), fleet,
            config.target_backlog_seconds).desired_workers for p in Priority)
        wanted = min(config.max_workers, max(config.min_workers, math.ceil(desired - 1e-9)))
        self.recommendations.append((now, wanted))
        while self.recommendations[0][0] < now - config.scale_down_window_seconds:
            self.recommendations.popleft()
        active = [w for w in self.workers if w.left_at is None and not w.draining]
        if wanted >= len(active):  # the HPA's default scale-up limit per 15 s
            target = min(wanted, max(2 * len(active), len(active) + 4))
        else:
            target = max(r for _, r in self.recommendations)
        for _ in range(target - len(active)):
            ready_at = now + self.startup_seconds
            self.workers.append(SimWorker(now, ready_at))
            self._at(ready_at, "ready", None)
        # Scale down: workers still starting first, then the least busy.
        for worker in sorted(active, key=lambda w: (w.is_ready(now), w.running))[
                :max(len(active) - target, 0)]:
            worker.draining = True
            if worker.running == 0:
                worker.left_at = now

    def report(self, name: str, end: float, spike_start: float) -> FleetReport:
        def waits(priority: Priority) -> list[float]:
            return sorted(j.started_at - j.arrived_at for j in self.trace
                          if j.priority == priority)

        interactive, bulk = waits(Priority.INTERACTIVE), waits(Priority.BATCH)
        bulk_done = max((j.started_at + j.max_tokens / self.job_rate for j in self.trace
                         if j.priority == Priority.BATCH), default=spike_start)
        by_minute = [sum(1 for w in self.workers if w.requested_at <= minute * 60 < w.left_at)
                     for minute in range(int(end // 60) + 1)]
        return FleetReport(
            name=name,
            worker_minutes=round(sum(w.left_at - w.requested_at for w in self.workers) / 60, 1),
            max_workers=max(by_minute),
            interactive_wait_p50_s=round(_percentile(interactive, 0.50), 2),
            interactive_wait_p95_s=round(_percentile(interactive, 0.95), 2),
            bulk_wait_p95_s=round(_percentile(bulk, 0.95), 2),
            bulk_done_minutes_after_spike_start=round((bulk_done - spike_start) / 60, 1),
            jobs=len(self.trace), workers_by_minute=by_minute)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def worker_tokens_per_second(args: argparse.Namespace) -> tuple[float, str]:
    if args.worker_tokens_per_second:
        return args.worker_tokens_per_second, "--worker-tokens-per-second"
    results = json.loads(Path(args.engine_results).read_text())
    return results["results"]["genq"]["output_tok_s"], f"{Path(args.engine_results).name} (genq)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--spike-start-minute", type=float, default=20)
    parser.add_argument("--spike-minutes", type=float, default=10)
    parser.add_argument("--interactive-per-second", type=float, default=2.0)
    parser.add_argument("--bulk-per-second", type=float, default=30.0)
    parser.add_argument("--worker-tokens-per-second", type=float, default=0.0)
    parser.add_argument("--engine-results", default=str(ENGINE_RESULTS))
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--startup-seconds", type=float, default=60)
    parser.add_argument("--target-backlog-seconds", type=float, default=30)
    parser.add_argument("--window-seconds", type=float, default=60)
    parser.add_argument("--poll-seconds", type=float, default=15)
    parser.add_argument("--scale-down-window-seconds", type=float, default=120)
    parser.add_argument("--min-workers", type=int, default=1)
    parser.add_argument("--max-workers", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args(argv)

    tokens_per_second, source = worker_tokens_per_second(args)
    trace = make_trace(args.minutes, args.spike_start_minute, args.spike_minutes,
                       args.interactive_per_second, args.bulk_per_second, args.seed)
    mean_decode = sum(j.max_tokens for j in trace) / len(trace)
    peak_demand = (args.interactive_per_second + args.bulk_per_second) * mean_decode
    fixed_workers = math.ceil(peak_demand / tokens_per_second)
    spike_start = args.spike_start_minute * 60
    scaler = ScalerConfig(args.target_backlog_seconds, args.window_seconds, args.poll_seconds,
                          args.scale_down_window_seconds, args.min_workers, args.max_workers)
    fleets = []
    for name, initial, config in (("autoscaled", args.min_workers, scaler),
                                  ("fixed (peak)", fixed_workers, None)):
        sim = FleetSim(trace, tokens_per_second, args.slots, args.startup_seconds, initial,
                       config)
        fleets.append(sim.report(name, sim.run(args.minutes * 60), spike_start))
    report = {
        "config": {**{k: v for k, v in vars(args).items() if k not in ("json", "engine_results")},
                   "worker_tokens_per_second": tokens_per_second,
                   "worker_tokens_per_second_source": source,
                   "fixed_workers": fixed_workers},
        "fleets": [asdict(fleet) for fleet in fleets],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    return report


def _print_table(report: dict) -> None:
    config = report["config"]
    print(f"{config['worker_tokens_per_second']:.1f} tokens/s per worker "
          f"({config['worker_tokens_per_second_source']}), start-up "
          f"{config['startup_seconds']:.0f} s, fixed fleet {config['fixed_workers']} workers")
    print(f"{'fleet':<14}{'worker-min':>11}{'max':>5}{'inter p50 s':>12}{'inter p95 s':>12}"
          f"{'bulk p95 s':>11}{'bulk done min':>14}")
    for fleet in report["fleets"]:
        print(f"{fleet['name']:<14}{fleet['worker_minutes']:>11.1f}{fleet['max_workers']:>5}"
              f"{fleet['interactive_wait_p50_s']:>12.2f}{fleet['interactive_wait_p95_s']:>12.2f}"
              f"{fleet['bulk_wait_p95_s']:>11.1f}"
              f"{fleet['bulk_done_minutes_after_spike_start']:>14.1f}")


if __name__ == "__main__":
    main()
