"""What the job system costs: genq end to end with the echo engine against plain Celery.

    python -m benchmarks.queue_overhead [--num-jobs 1000] [--broker-url redis://…/14]
        [--database-url sqlite:///…] [--latency-samples 50] [--concurrency 32]
        [--producers 8] [--engine-model smollm2-135m --engine-prompts 64 --engine-rounds 3]
        [--json PATH]

- genq: jobs submitted through the producer (validate, job row + outbox row, publish), run by
  a real `genq worker` with the echo engine, counted when their result row is committed; with
  one `submit_job` call per job from --producers threads at once (an API process's request
  threads, GENQ_API_THREADS=8 by default: their submits share group commits) and from one
  thread (`_sequential`: each submit waits for its own disk flush), and with `submit_jobs`
  (the bulk API, --bulk-size jobs per call: one transaction and one broker round trip per call).
- plain Celery: a no-op task with acks_late, `delay()`ed from the same threads (--producers,
  and one), drained by one default worker.
- idle submit→start latency: one job at a time, `started_at - created_at` from the DB.
- with --engine-model: the same prompts through the whole system vs the engine's own
  `LLM.generate` in this process (the job system's share of end-to-end time), with the worker
  up: --engine-rounds rounds of single submits and bulk submits, with an offline run before
  and after each system run (offline, single, offline, bulk, offline, single, ...). A VM's
  speed drifts by 10-25% over minutes, so each system run is compared with the mean of the
  two offline runs around it (which cancels a steady drift; comparing with the run before
  only did not), and the ratios are the medians over the rounds. Beside each run: the engine
  steps it took (the batches the engine ran: equal counts mean the system fed it as well as
  `generate` does) and the CPU seconds of each process (worker, engine process, this one: the
  producer and the polling; during offline runs, the idle worker's), which on a machine with
  few cores is where the difference goes.
Everything runs in one invocation so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from genq import db
from genq.api_keys import create_api_key
from genq.models import Job
from genq.settings import Settings
from genq.states import JobStatus
from producer.schemas import JobRequest
from producer.submit import count_prompt_tokens, submit_job, submit_jobs
from workers.engine_process import STATS_SECONDS

REPO = Path(__file__).resolve().parents[1]


def _start_worker(settings: Settings, concurrency: int, log_path: Path,
                  metrics_port: int = 0) -> subprocess.Popen:
    env = {**os.environ, "GENQ_DATABASE_URL": settings.database_url_resolved,
           "GENQ_BROKER_URL": settings.broker_url, "GENQ_MODEL": settings.model,
           "GENQ_MODEL_CACHE_DIR": str(settings.model_cache_dir_resolved),
           "GENQ_DATA_DIR": str(settings.data_dir), "HF_HUB_OFFLINE": "1",
           "GENQ_WORKER_METRICS_PORT": str(metrics_port)}
    log = log_path.open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli", "worker", "--concurrency", str(concurrency)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 600
    while " ready." not in log_path.read_text(errors="replace"):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return worker


class RunMeter:
    """What a run cost beside its wall time: CPU seconds per process (the worker, its engine
    process, this process) and, read from the worker's metrics, the engine steps it took."""

    def __init__(self, worker: subprocess.Popen, metrics_port: int) -> None:
        parent = psutil.Process(worker.pid)
        self.processes = {"worker": [parent], "engine_process": parent.children(),
                          "harness": [psutil.Process()]}
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/"

    def snapshot(self) -> dict:
        cpu = {name: sum(sum(p.cpu_times()[:2]) for p in processes)  # user + system
               for name, processes in self.processes.items()}
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        steps = sum(sample.value for family in text_string_to_metric_families(text)
                    for sample in family.samples if sample.name == "genq_engine_steps_total")
        return {"cpu": cpu, "steps": steps}

    def measure(self, run, *args, **kwargs) -> dict:
        """`run(*args, **kwargs)`'s result dict with the CPU seconds and worker engine steps
        spent meanwhile (an offline run's own steps stay in its result)."""
        before = self.snapshot()
        result = run(*args, **kwargs)
        after = self.snapshot()
        time.sleep(2 * STATS_SECONDS)  # the engine process's last stats reach the worker
        worker_steps = int(self.snapshot()["steps"] - before["steps"])
        cpu = {name: round(after["cpu"][name] - before["cpu"][name], 2) for name in after["cpu"]}
        return {"engine_steps": worker_steps, **result, "cpu_seconds": cpu}


def _count_unfinished(url: str, tenant_id: str) -> int:
    # Unfinished, by tenant: the count walks ix_jobs_tenant_status_model_priority over this
    # run's queued and running jobs only (counting the finished ones walked every earlier
    # run's too, ~11,000 entries per poll by the fifth round), so the harness's polling costs
    # the machine (and the worker beside it) little.
    with db.session_factory(url)() as session:
        return session.scalar(select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant_id,
            Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])))


def _completion_tokens(url: str) -> int:
    with db.session_factory(url)() as session:
        return session.scalar(select(func.coalesce(func.sum(Job.completion_tokens), 0)))


def _wait_finished(url: str, tenant_id: str, timeout: float, poll: float) -> None:
    """Wait until every job the tenant submitted has finished."""
    deadline = time.monotonic() + timeout
    while (unfinished := _count_unfinished(url, tenant_id)) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{unfinished} jobs still unfinished after {timeout} s")
        time.sleep(poll)


def in_threads(count: int, items: list, send) -> None:
    """`send(item)` for every item, in order within each of `count` threads (item i goes to
    thread i % count), like `count` clients each sending one request at a time."""
    threads = [threading.Thread(target=lambda share: [send(item) for item in share],
                                args=(items[first::count],)) for first in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_genq(settings: Settings, tenant_id: str, prompts: list[str], max_tokens: int,
             bulk_size: int = 1, producers: int = 1) -> dict:
    """Submit `prompts` (one call per job from `producers` threads, or `bulk_size` per
    submit_jobs call) and wait until all have finished."""
    url = settings.database_url_resolved
    tokens_before = _completion_tokens(url)
    requests = [JobRequest(prompt=prompt, max_tokens=max_tokens, temperature=0)
                for prompt in prompts]
    # Warm up the producer as the worker and the offline engine are warmed up: an API process
    # has its model's tokenizer loaded (the first load takes ~1.5 s).
    count_prompt_tokens(settings, settings.model, requests[0])
    started = time.perf_counter()
    if bulk_size == 1:
        in_threads(producers, requests, lambda request: submit_job(settings, tenant_id, request))
    else:
        for first in range(0, len(requests), bulk_size):
            submit_jobs(settings, tenant_id, requests[first:first + bulk_size])
    enqueued = time.perf_counter() - started
    # Poll often enough to time a run of seconds within 1%, rarely enough to cost little.
    _wait_finished(url, tenant_id, timeout=3600, poll=0.01 if settings.model == "echo" else 0.1)
    seconds = time.perf_counter() - started
    return {"jobs": len(prompts), "bulk_size": bulk_size,
            "producers": producers if bulk_size == 1 else 1, "seconds": seconds,
            "jobs_per_s": len(prompts) / seconds, "enqueued_per_s": len(prompts) / enqueued,
            "output_tokens": _completion_tokens(url) - tokens_before}


def idle_latency(settings: Settings, tenant_id: str, samples: int) -> dict:
    url = settings.database_url_resolved
    latencies = []
    for index in range(samples):
        job = submit_job(settings, tenant_id, JobRequest(prompt=f"ping {index}", max_tokens=1,
                                                         temperature=0)).job
        while True:
            with db.session_factory(url)() as session:
                started_at, created_at = session.execute(
                    select(Job.started_at, Job.created_at).where(Job.id == job.id)).one()
            if started_at is not None:
                break
            time.sleep(0.002)
        latencies.append((started_at - created_at).total_seconds() * 1000)
        time.sleep(0.05)  # idle between jobs
    latencies.sort()
    return {"samples": samples, "p50_ms": statistics.median(latencies),
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


def run_plain_celery(broker_url: str, num_tasks: int, log_path: Path,
                     producers: int = 1) -> dict:
    from benchmarks import celery_noop

    counter = redis.Redis.from_url(broker_url)
    counter.flushdb()
    env = {**os.environ, "NOOP_BROKER_URL": broker_url}
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.celery_noop", "worker",
             "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        while " ready." not in log_path.read_text(errors="replace"):
            time.sleep(0.2)
        celery_noop.app.conf.broker_url = broker_url
        started = time.perf_counter()
        in_threads(producers, list(range(num_tasks)), celery_noop.noop.delay)
        enqueued = time.perf_counter() - started
        while int(counter.get(celery_noop.COUNTER_KEY) or 0) < num_tasks:
            time.sleep(0.005)
        seconds = time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(30)
    return {"jobs": num_tasks, "producers": producers, "seconds": seconds,
            "jobs_per_s": num_tasks / seconds, "enqueued_per_s": num_tasks / enqueued}


class OfflineEngine:
    """The engine alone, configured as the worker configures it, with the jobs' own sampling
    parameters (so both stop at the same tokens)."""

    def __init__(self, settings: Settings, max_tokens: int) -> None:
        from engine import LLM, SamplingParams
        from workers.engine_process import engine_options

        self.llm = LLM(**engine_options(settings))
        self.params = SamplingParams(**JobRequest(prompt="-", max_tokens=max_tokens,
                                                  temperature=0).sampling_params())
        self.llm.generate(["warm", "up"], self.params, use_tqdm=False)  # as the worker does

    def run(self, prompts: list[str]) -> dict:
        steps = self.llm.engine.stats.num_steps
        started = time.perf_counter()
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        seconds = time.perf_counter() - started
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds,
                "engine_steps": self.llm.engine.stats.num_steps - steps}


def engine_runs(meter: RunMeter, offline: OfflineEngine, settings: Settings, tenant_id: str,
                prompts: list[str], args) -> list[dict]:
    """Offline and system runs in turn, offline first and last: offline, single submits,
    offline, bulk submits, offline, ... (--engine-rounds of single and bulk), each with its
    "name"."""
    def offline_run() -> dict:
        return {"name": "offline", **meter.measure(offline.run, prompts)}

    runs = [offline_run()]
    for _ in range(args.engine_rounds):
        for name, bulk_size in (("system", 1), ("system_bulk", args.bulk_size)):
            runs.append({"name": name, **meter.measure(
                run_genq, settings, tenant_id, prompts, args.engine_max_tokens,
                bulk_size=bulk_size)})
            runs.append(offline_run())
    return runs


def ratios_to_offline(runs: list[dict], name: str) -> list[float]:
    """Each `name` run's speed relative to the mean of the offline runs on either side of it
    (above 1: the system was faster)."""
    return [(runs[index - 1]["seconds"] + runs[index + 1]["seconds"]) / 2 / run["seconds"]
            for index, run in enumerate(runs) if run["name"] == name]


def make_settings(args, workdir: Path, model: str) -> Settings:
    url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
    return Settings(database_url=url, broker_url=args.broker_url, model=model,
                    data_dir=workdir, model_cache_dir=Path(args.model_cache_dir),
                    outbox_stale_seconds=5, worker_concurrency=args.concurrency)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-jobs", type=int, default=1000)
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--producers", type=int, default=8,
                        help="threads submitting single jobs at once (default: an API "
                             "process's request threads, GENQ_API_THREADS)")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--model-cache-dir", default=str(REPO / ".genq" / "models"))
    parser.add_argument("--engine-model", default="")
    parser.add_argument("--engine-prompts", type=int, default=64)
    parser.add_argument("--engine-max-tokens", type=int, default=32)
    parser.add_argument("--engine-rounds", type=int, default=3)
    parser.add_argument("--bulk-size", type=int, default=100)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results: dict = {}
    engine_prompts = [f"Write a short story about item {i}." for i in range(args.engine_prompts)]
    with tempfile.TemporaryDirectory(prefix="genq-bench-") as tmp:
        workdir = Path(tmp)
        for name, producers in (("plain_celery", args.producers),
                                ("plain_celery_sequential", 1)):
            results[name] = run_plain_celery(args.broker_url, args.num_jobs,
                                             workdir / f"{name}.log", producers)
        if args.engine_model:
            offline = OfflineEngine(make_settings(args, workdir, args.engine_model),
                                    args.engine_max_tokens)
        for model, label in [("echo", "genq_echo")] + (
                [(args.engine_model, "genq_engine")] if args.engine_model else []):
            settings = make_settings(args, workdir / label, model)
            settings.data_dir.mkdir(parents=True)
            db.upgrade(settings.database_url_resolved)
            redis.Redis.from_url(args.broker_url).flushdb()
            with db.transaction(settings.database_url_resolved) as session:
                tenant_id = _tenant_of(session)
            metrics_port = _free_port()
            worker = _start_worker(settings, args.concurrency, workdir / f"{label}.log",
                                   metrics_port)
            meter = RunMeter(worker, metrics_port)
            try:
                if model == "echo":
                    results["idle_submit_to_start"] = idle_latency(settings, tenant_id,
                                                                   args.latency_samples)
                    prompts = [f"job {i}: echo these words back" for i in range(args.num_jobs)]
                    for name, bulk_size, producers in (
                            (label, 1, args.producers), (f"{label}_sequential", 1, 1),
                            (f"{label}_bulk", args.bulk_size, 1)):
                        results[name] = meter.measure(run_genq, settings, tenant_id, prompts,
                                                      8, bulk_size=bulk_size,
                                                      producers=producers)
                        results[name]["cpu_ms_per_job"] = {
                            process: round(1000 * seconds / len(prompts), 3)
                            for process, seconds in results[name]["cpu_seconds"].items()}
                    continue
                results["engine_runs"] = engine_runs(
                    meter, offline, settings, tenant_id, engine_prompts, args)
            finally:
                worker.terminate()
                worker.wait(60)

    def speed(name: str) -> float:
        return results[name]["jobs_per_s"]

    ratios = {"genq_echo_vs_plain_celery": speed("genq_echo") / speed("plain_celery"),
              "genq_echo_sequential_vs_plain_celery_sequential":
              speed("genq_echo_sequential") / speed("plain_celery_sequential"),
              "genq_echo_bulk_vs_plain_celery": speed("genq_echo_bulk") / speed("plain_celery"),
              "genq_echo_bulk_vs_plain_celery_sequential":
              speed("genq_echo_bulk") / speed("plain_celery_sequential")}
    for name in ("system", "system_bulk") if args.engine_model else ():
        per_round = ratios_to_offline(results["engine_runs"], name)
        ratios[f"{name}_vs_engine_offline"] = statistics.median(per_round)
        ratios[f"{name}_vs_engine_offline_per_round"] = per_round
    report = {"num_jobs": args.num_jobs, "producers": args.producers,
              "broker": args.broker_url, "results": results,
              "ratios": ratios}
    _print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tenant_of(session) -> str:
    from genq.api_keys import tenant_id_for_key

    return tenant_id_for_key(session, create_api_key(session, "bench"))


def _print_table(report: dict) -> None:
    print(f"{'contender':<26}{'jobs':>8}{'seconds':>10}{'jobs/s':>10}{'enqueued/s':>12}")
    for name in ("plain_celery", "plain_celery_sequential", "genq_echo", "genq_echo_sequential",
                 "genq_echo_bulk"):
        row = report["results"].get(name)
        if row:
            print(f"{name:<26}{row['jobs']:>8}{row['seconds']:>10.2f}{row['jobs_per_s']:>10.1f}"
                  f"{row['enqueued_per_s']:>12.1f}")
            if "cpu_ms_per_job" in row:
                print("  CPU ms per job: " + ", ".join(
                    f"{process} {ms:.2f}" for process, ms in row["cpu_ms_per_job"].items()))
    latency = report["results"]["idle_submit_to_start"]
    print(f"idle submit->start: p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms")
    for row in report["results"].get("engine_runs", []):
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in row["cpu_seconds"].items())
        print(f"{row['name']:<12} {row['seconds']:7.2f} s, {row['output_tokens']} tokens, "
              f"{row['engine_steps']} steps; CPU s: {cpu}")
    for name, value in report["ratios"].items():
        shown = ", ".join(f"{v:.2f}" for v in value) if isinstance(value, list) else f"{value:.2f}"
        print(f"{name}: {shown}x")


if __name__ == "__main__":
    main()
