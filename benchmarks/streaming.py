"""What streaming costs: time to first token through the whole system against the engine's own,
and tokens/s of concurrent streamed jobs against the same jobs unstreamed, in one run.

    python -m benchmarks.streaming [--model smollm2-135m] [--broker-url redis://…/14]
        [--streams 32] [--max-tokens 64] [--ttft-samples 7] [--rounds 2] [--json PATH]

- engine TTFT: the engine alone in this process, configured as the worker's, idle: from
  `add_request(stream=True)` to its first delta.
- system TTFT: `POST /v1/chat/completions` with `stream: true` to a real API and worker,
  idle: from sending the request to the first chunk with text.
- throughput: `--streams` jobs at once, streamed (one SSE client each) or unstreamed (submitted
  to /v1/jobs, counted when their rows are committed), in alternating rounds; then the
  unstreamed rounds again with a worker that publishes no token deltas (GENQ_STREAM_EVENTS=
  false), the system as it was before streaming.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import redis
import requests
from sqlalchemy import func, select

from cli.services import API_WORKER_CLASS
from genq import db
from genq.api_keys import create_api_key
from genq.models import Job
from genq.settings import Settings
from genq.states import TERMINAL_STATES
from producer.schemas import JobRequest

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper."


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    amx = any(line.startswith("flags") and " amx_tile" in line for line in lines)
    name = names[0] if names else platform.processor() or "unknown CPU"
    return f"{name}{', AMX' if amx else ''} ({os.cpu_count()} CPUs)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(argv: list[str], env: dict[str, str], log_path: Path, ready) -> subprocess.Popen:
    process = subprocess.Popen(argv, env=env, stdout=log_path.open("wb"),
                               stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 600
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{argv[2]} did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Stack:
    """The API as `genq api` runs it (one process) and one worker."""

    def __init__(self, settings: Settings, workdir: Path, streams: int) -> None:
        self.settings, self.workdir = settings, workdir
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1",
                    "GENQ_DATABASE_URL": settings.database_url_resolved,
                    "GENQ_BROKER_URL": settings.broker_url, "GENQ_MODEL": settings.model,
                    "GENQ_MODEL_CACHE_DIR": str(settings.model_cache_dir_resolved),
                    "GENQ_DATA_DIR": str(workdir)}
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = start([sys.executable, "-m", "gunicorn", "--worker-class", API_WORKER_CLASS,
                          "--bind", f"127.0.0.1:{port}", "--config",
                          "python:results_api.gunicorn_config",
                          "results_api.asgi:create_asgi_app()"], self.env, workdir / "api.log",
                         self._api_ready)
        self.worker: subprocess.Popen | None = None
        with db.transaction(settings.database_url_resolved) as session:
            self.key = create_api_key(session, "bench")
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def _api_ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).ok
        except requests.RequestException:
            return False

    def start_worker(self, streams: int, stream_events: bool) -> None:
        if self.worker is not None:
            stop(self.worker)
        log_path = self.workdir / f"worker-{stream_events}.log"
        env = {**self.env, "GENQ_STREAM_EVENTS": str(stream_events).lower()}
        self.worker = start([sys.executable, "-m", "cli", "worker", "--concurrency",
                             str(streams)], env, log_path,
                            lambda: " ready." in log_path.read_text(errors="replace"))

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds so far of the API, the worker with its engine process,
        and this process (the clients)."""
        def of(process: subprocess.Popen) -> float:
            parent = psutil.Process(process.pid)
            return sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(True)])

        return {"api": of(self.api), "worker": of(self.worker),
                "clients": sum(psutil.Process().cpu_times()[:2])}

    def measure(self, name: str, run, *args) -> dict:
        before = self.cpu_seconds()
        result = run(*args)
        after = self.cpu_seconds()
        cpu = {key: round(after[key] - before[key], 2) for key in after}
        return {"name": name, **result, "cpu_seconds": cpu}

    def close(self) -> None:
        for process in (self.worker, self.api):
            if process is not None:
                stop(process)

    def first_token_seconds(self, max_tokens: int) -> float:
        body = {"model": self.settings.model, "messages": chat(PROMPT),
                "max_tokens": max_tokens, "temperature": 0, "stream": True}
        started = time.perf_counter()
        first = None
        with requests.post(f"{self.url}/v1/chat/completions", json=body, headers=self.headers,
                           stream=True, timeout=120) as response:
            for line in response.iter_lines(decode_unicode=True):
                if first is None and line.startswith("data: {"):
                    if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - started
        return first

    def streamed(self, prompts: list[str], max_tokens: int) -> dict:
        tokens = [0] * len(prompts)

        def stream_one(index: int) -> None:
            body = {"model": self.settings.model, "messages": chat(prompts[index]),
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            with requests.post(f"{self.url}/v1/chat/completions", json=body,
                               headers=self.headers, stream=True, timeout=600) as response:
                response.raise_for_status()
                # Read as it comes, parse once at the end: the client's CPU is not the system's
                # (the 2 cores are shared), so it does as little per chunk as it can.
                body = b"".join(response.iter_content(chunk_size=None))
            usage = body.rsplit(b"data: {", 1)[1].split(b"\n", 1)[0]
            tokens[index] = json.loads(b"{" + usage)["usage"]["completion_tokens"]

        threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(len(prompts))]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self._result(sum(tokens), time.perf_counter() - started)

    def unstreamed(self, prompts: list[str], max_tokens: int) -> dict:
        started = time.perf_counter()
        ids = [requests.post(f"{self.url}/v1/jobs", headers=self.headers, timeout=30, json={
            "messages": chat(prompt), "max_tokens": max_tokens, "temperature": 0}).json()["id"]
            for prompt in prompts]
        finished = [state.value for state in TERMINAL_STATES]
        sessions = db.session_factory(self.settings.database_url_resolved)
        while True:
            with sessions() as session:  # a new one per poll: SQLite's reads are snapshots
                if not session.scalar(select(func.count()).select_from(Job).where(
                        Job.id.in_(ids), Job.status.not_in(finished))):
                    seconds = time.perf_counter() - started
                    tokens = session.scalar(select(func.sum(Job.completion_tokens))
                                            .where(Job.id.in_(ids)))
                    return self._result(tokens, seconds)
            time.sleep(0.02)

    @staticmethod
    def _result(tokens: int, seconds: float) -> dict:
        return {"output_tokens": tokens, "seconds": round(seconds, 3),
                "output_tok_s": round(tokens / seconds, 1)}


def engine_first_token_seconds(settings: Settings, samples: int, max_tokens: int) -> list[float]:
    """The engine alone (configured as the worker's), idle: add_request → first delta."""
    from engine import LLM, SamplingParams
    from workers.engine_process import engine_options

    engine = LLM(**engine_options(settings)).engine
    params = SamplingParams(**JobRequest(prompt="-", max_tokens=max_tokens,
                                         temperature=0).sampling_params())
    seconds = []
    for index in range(samples):
        started = time.perf_counter()
        engine.add_request(f"ttft-{index}", chat(PROMPT), params, stream=True)
        first = None
        while engine.has_unfinished_requests():
            for output in engine.step():
                if first is None and output.outputs[0].text:
                    first = time.perf_counter() - started
        seconds.append(first)
    del engine
    return seconds


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--model-cache-dir", default=str(REPO / ".genq" / "models"))
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ttft-samples", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompts = [f"Write a short story about item {i}." for i in range(args.streams)]
    report: dict = {"cpu": cpu_name(), "model": args.model, "streams": args.streams,
                    "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory(prefix="genq-bench-stream-") as tmp:
        workdir = Path(tmp)
        settings = Settings(database_url=f"sqlite:///{workdir / 'bench.db'}",
                            broker_url=args.broker_url, model=args.model, data_dir=workdir,
                            model_cache_dir=Path(args.model_cache_dir),
                            worker_concurrency=args.streams)
        db.upgrade(settings.database_url_resolved)
        redis.Redis.from_url(args.broker_url).flushdb()
        report["engine_ttft_s"] = engine_first_token_seconds(settings, args.ttft_samples,
                                                             args.max_tokens)
        progress(f"engine TTFT {report['engine_ttft_s']}")
        stack = Stack(settings, workdir, args.streams)
        try:
            stack.start_worker(args.streams, stream_events=True)
            stack.first_token_seconds(4)  # the first request warms the API's imports
            progress("system TTFT")
            report["system_ttft_s"] = [stack.first_token_seconds(args.max_tokens)
                                       for _ in range(args.ttft_samples)]
            runs = []
            for _ in range(args.rounds):
                runs.append(stack.measure("unstreamed", stack.unstreamed, prompts,
                                          args.max_tokens))
                runs.append(stack.measure("streamed", stack.streamed, prompts, args.max_tokens))
                progress(f"runs {runs[-2:]}")
            stack.start_worker(args.streams, stream_events=False)
            for _ in range(args.rounds):
                runs.append(stack.measure("unstreamed_no_events", stack.unstreamed, prompts,
                                          args.max_tokens))
            report["runs"] = runs
        finally:
            stack.close()
    summarize(report)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report


def summarize(report: dict) -> None:
    report["engine_ttft_median_s"] = round(statistics.median(report["engine_ttft_s"]), 4)
    report["system_ttft_median_s"] = round(statistics.median(report["system_ttft_s"]), 4)
    report["ttft_overhead_ms"] = round(
        (report["system_ttft_median_s"] - report["engine_ttft_median_s"]) * 1000, 1)
    speed = {name: statistics.median(run["output_tok_s"] for run in report["runs"]
                                     if run["name"] == name)
             for name in ("unstreamed", "streamed", "unstreamed_no_events")}
    report["tok_s_median"] = speed
    report["cpu_seconds_mean"] = {
        name: {key: round(statistics.mean(run["cpu_seconds"][key] for run in report["runs"]
                                          if run["name"] == name), 2)
               for key in ("api", "worker", "clients")} for name in speed}
    report["streamed_vs_unstreamed"] = round(speed["streamed"] / speed["unstreamed"], 3)
    report["streamed_vs_no_events"] = round(
        speed["streamed"] / speed["unstreamed_no_events"], 3)


def print_table(report: dict) -> None:
    print(f"genq streaming, {report['model']} on {report['cpu']}")
    print(f"{'time to first token (idle, median)':<44}{'ms':>10}")
    print(f"{'  engine alone':<44}{report['engine_ttft_median_s'] * 1000:>10.1f}")
    print(f"{'  through API + worker, stream: true':<44}"
          f"{report['system_ttft_median_s'] * 1000:>10.1f}")
    print(f"{'  difference (target <= 30)':<44}{report['ttft_overhead_ms']:>10.1f}")
    print(f"{report['streams']} jobs of {report['max_tokens']} tokens at once{'tok/s':>19}"
          f"   CPU s per run: api  worker  clients")
    for name, label in (("unstreamed", "  unstreamed (polled)"),
                        ("streamed", "  streamed (SSE)"),
                        ("unstreamed_no_events", "  unstreamed, worker without deltas")):
        cpu = report["cpu_seconds_mean"][name]
        print(f"{label:<44}{report['tok_s_median'][name]:>10.1f}{cpu['api']:>21.2f}"
              f"{cpu['worker']:>8.2f}{cpu['clients']:>9.2f}")
    print(f"{'  streamed / unstreamed (target >= 0.9)':<44}"
          f"{report['streamed_vs_unstreamed']:>10.3f}")
    print(f"{'  streamed / worker without deltas':<44}{report['streamed_vs_no_events']:>10.3f}")


if __name__ == "__main__":
    main()
