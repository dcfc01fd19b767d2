"""Start real genq processes (API under gunicorn, Celery worker, `genq up`) for tests, with
their output in log files that a failing test prints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from cli.services import API_WORKER_CLASS


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@dataclass
class ProcessGroup:
    """Everything a test started; stopped at teardown, logs shown when a test fails."""

    directory: Path
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        log_path = self.directory / f"{name}.log"
        handle = log_path.open("ab")
        popen = subprocess.Popen(
            argv, env={**self.env, **(env or {})}, stdout=handle, stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[1], start_new_session=True,
        )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log()[-6000:]}" for p in self.processes)


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             process: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.popen.poll() is not None:
            raise AssertionError(f"{process.name} exited while waiting for {what}:\n"
                                 f"{process.log()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def start_api(group: ProcessGroup, port: int) -> Process:
    process = group.start("api", [  # as `genq api` runs it, with one process
        sys.executable, "-m", "gunicorn", "--worker-class", API_WORKER_CLASS, "--workers", "1",
        "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5",
        "--config", "python:results_api.gunicorn_config", "results_api.asgi:create_asgi_app()",
    ])
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 60, "the API", process)
    return process


def start_worker(group: ProcessGroup, name: str = "worker", concurrency: int = 8,
                 env: dict[str, str] | None = None, ready_timeout: float = 240,
                 model: str | None = None) -> Process:
    """A `genq worker` serving `model` (default: the group's GENQ_MODEL), once it is ready."""
    process = group.start(name, [
        sys.executable, "-m", "cli", "worker", "--concurrency", str(concurrency),
        "--hostname", f"{name}-{os.getpid()}@%h", *(["--model", model] if model else []),
    ], env)
    wait_for(lambda: " ready." in process.log(), ready_timeout, f"{name} to be ready", process)
    return process
