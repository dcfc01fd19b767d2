"""Load test: other tenants submit and poll while one tenant abuses the API (issue 18).

The abuser keeps `--abuser-waits` `Prefer: wait=60` calls open, runs `--abuser-completions`
synchronous completions, registers a webhook endpoint on a receiver that trickles its answer a
byte a second, and uploads a batch whose lines are over its limits. Meanwhile `--tenants`
other tenants each submit a job, poll it to its end, and receive its webhook on a healthy local
receiver. Prints the figures and writes them as JSON.

Run against a running genq whose webhooks may call this host, e.g.:

    GENQ_WEBHOOK_ALLOW_PRIVATE=true genq up &
    python -m benchmarks.load --api http://127.0.0.1:8000 --seconds 60

Keys are made with `genq keys create` in the same project directory (the same database).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.metrics_scrape import cpu_name

TARGETS = {"healthz_p99_ms": 100, "submit_p99_ms": 250, "webhook_p99_s": 5.0,
           "responses_5xx": 0, "jobs_lost": 0}


@dataclass
class Figures:
    healthz_ms: list[float] = field(default_factory=list)
    control_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    webhook_s: list[float] = field(default_factory=list)
    responses_5xx: int = 0
    submitted: dict[str, str] = field(default_factory=dict)  # job id → its tenant's key
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, response: requests.Response) -> None:
        if response.status_code >= 500:
            with self.lock:
                self.responses_5xx += 1


def create_key(tenant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "cli", "keys", "create", tenant],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return out.strip().splitlines()[-1]


def p99(values: list[float]) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100)[98]


def receiver(on_event, get: bool = False) -> tuple[ThreadingHTTPServer, str]:
    """A healthy webhook receiver on this host: 200 at once; calls on_event(body). With
    `get`, it answers GETs too (the control server)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not get:
                self.send_error(405)
                return
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            on_event(json.loads(body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/hook"


def trickling_receiver(stop: ProcessEvent) -> str:
    """Answers every webhook one byte a second, for as long as the sender stays."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)

    def trickle(conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000:
                if stop.is_set():
                    break
                conn.sendall(bytes([byte]))
                time.sleep(1)
        except OSError:
            pass
        conn.close()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/hook"


def abuse(api: str, key: str, stop: ProcessEvent, responses_5xx: Synchronized, waits: int,
          completions: int) -> None:
    """The abusive tenant, in a process of its own: its 80 client threads must not hold the
    GIL of the threads that time /healthz and the other tenants (they did: p99s of 0.7-2 s
    that were the load generator's own queueing, not the API's)."""
    auth = {"Authorization": f"Bearer {key}"}

    def count(response: requests.Response) -> None:
        if response.status_code >= 500:
            with responses_5xx.get_lock():
                responses_5xx.value += 1

    requests.post(f"{api}/v1/webhook-secret", headers=auth, timeout=30)
    requests.post(f"{api}/v1/webhook-endpoints", headers=auth, timeout=30,
                  json={"url": trickling_receiver(stop)})
    lines = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": "x " * 20, "max_tokens": 8000}}) + "\n"
                    for i in range(200))
    upload = requests.post(f"{api}/v1/files", headers=auth, timeout=60,
                           files={"file": ("over.jsonl", io.BytesIO(lines.encode()))},
                           data={"purpose": "batch"}).json()
    requests.post(f"{api}/v1/batches", headers=auth, timeout=30,
                  json={"input_file_id": upload["id"], "endpoint": "/v1/completions"})

    # Each call is made again as soon as it ends; an answer that did not wait (a 202 past the
    # tenant's wait slots, a 429) is made again after its Retry-After (1 s if none), as the
    # openai client and well-behaved HTTP clients do.
    def wait_call() -> None:
        while not stop.is_set():
            response = requests.post(f"{api}/v1/jobs", timeout=90, json={
                "prompt": "Tell a long story.", "max_tokens": 64},
                headers=auth | {"Prefer": "wait=60"})
            count(response)
            if "Preference-Applied" not in response.headers:
                time.sleep(float(response.headers.get("Retry-After", 1)))

    # The OpenAI route needs a model (without one every call was a 422 at once, and the 16
    # callers a tight loop of 100+ invalid requests a second instead of 16 held completions).
    model = requests.get(f"{api}/v1/models", headers=auth, timeout=30).json()["data"][0]["id"]

    def completion_call() -> None:
        while not stop.is_set():
            response = requests.post(f"{api}/v1/completions", headers=auth, timeout=700,
                                     json={"model": model, "prompt": "Once upon a time",
                                           "max_tokens": 64})
            count(response)
            if response.status_code == 429:
                time.sleep(float(response.headers.get("Retry-After", 1)))
            elif response.status_code != 200:
                raise RuntimeError(f"completion refused: {response.status_code} "
                                   f"{response.text[:200]}")

    with ThreadPoolExecutor(max(1, waits + completions)) as pool:
        for _ in range(waits):
            pool.submit(wait_call)
        for _ in range(completions):
            pool.submit(completion_call)


FINISHED = ("succeeded", "failed", "canceled", "expired")


def other_tenant(api: str, key: str, stop: threading.Event, figures: Figures) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    while not stop.is_set():
        started = time.perf_counter()
        response = requests.post(f"{api}/v1/jobs", headers=auth, timeout=60,
                                 json={"prompt": "Say hi.", "max_tokens": 4})
        figures.count(response)
        if response.status_code != 202:
            time.sleep(0.5)
            continue
        job_id = response.json()["id"]
        with figures.lock:
            figures.submit_ms.append((time.perf_counter() - started) * 1000)
            figures.submitted[job_id] = key
        while not stop.is_set():
            polled = requests.get(f"{api}/v1/jobs/{job_id}", headers=auth, timeout=60)
            figures.count(polled)
            if polled.ok and polled.json()["status"] in FINISHED:
                break
            time.sleep(0.2)


def serve_control(port: Synchronized) -> None:
    """The control: a bare threaded HTTP server answering 200 at once, in a process of its own
    at this script's nice level (as genq's). Its latency under the same machine load is what
    the host alone costs, which the API's /healthz cannot beat."""
    server, _ = receiver(lambda _body: None, get=True)
    port.value = server.server_address[1]
    threading.Event().wait()


def probe_health(api: str, control: str, stop: threading.Event, figures: Figures) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            response = requests.get(f"{api}/healthz", timeout=30)
            figures.count(response)
        except requests.RequestException:
            figures.responses_5xx += 1
        figures.healthz_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        requests.get(control, timeout=30)
        figures.control_ms.append((time.perf_counter() - started) * 1000)
        time.sleep(0.1)


def api_requests(api: str) -> dict[str, dict]:
    """The API's own count and mean handling time of each route and status (its /metrics):
    time in the handler, without the time a request waited for a thread or a CPU."""
    text = requests.get(f"{api}/metrics", timeout=60).text
    routes: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            route = f"{sample.labels.get('method')} {sample.labels.get('route')}"
            if sample.name == "genq_http_requests_total":
                counts = routes.setdefault(route, {}).setdefault("responses", {})
                counts[sample.labels["status"]] = int(sample.value)
            elif sample.name in ("genq_http_request_duration_seconds_sum",
                                 "genq_http_request_duration_seconds_count"):
                routes.setdefault(route, {})[sample.name.rsplit("_", 1)[1]] = sample.value
    for figures in routes.values():
        if figures.get("count"):
            figures["mean_handler_ms"] = round(1000 * figures.pop("sum") / figures.pop("count"),
                                               1)
    return routes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--abuser-waits", type=int, default=64)
    parser.add_argument("--abuser-completions", type=int, default=16)
    parser.add_argument("--drain-seconds", type=float, default=60,
                        help="after the load, how long the others' jobs may take to finish")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/load.json"))
    args = parser.parse_args()

    figures, stop = Figures(), threading.Event()
    abuser_key = create_key("load-abuser")
    subprocess.run([sys.executable, "-m", "cli", "tenants", "set-limits", "load-abuser",
                    "--max-tokens-per-job", "256", "--rpm", "600"], check=True, timeout=120,
                   capture_output=True)
    keys = [create_key(f"load-tenant-{n}") for n in range(args.tenants)]

    def on_event(event: dict) -> None:
        # From the job's end (whole seconds in the payload) to its webhook's arrival.
        with figures.lock:
            figures.webhook_s.append(time.time() - event["data"]["finished_at"])

    server, hook_url = receiver(on_event)
    for n, key in enumerate(keys):
        auth = {"Authorization": f"Bearer {key}"}
        requests.post(f"{args.api}/v1/webhook-secret", headers=auth, timeout=30)
        # An endpoint of its own, as tenants have: the per-URL cap (a slow receiver holds at
        # most webhook_max_in_flight_per_url threads) must not pace every tenant at once.
        requests.post(f"{args.api}/v1/webhook-endpoints", headers=auth, timeout=30,
                      json={"url": f"{hook_url}/{n}"})
    spawn = multiprocessing.get_context("spawn")
    abuser_stop, abuser_5xx = spawn.Event(), spawn.Value("i", 0)
    abuser = spawn.Process(target=abuse, args=(
        args.api, abuser_key, abuser_stop, abuser_5xx, args.abuser_waits,
        args.abuser_completions))
    abuser.start()
    control_port = spawn.Value("i", 0)
    control = spawn.Process(target=serve_control, args=(control_port,), daemon=True)
    control.start()
    while not control_port.value:
        time.sleep(0.05)
    control_url = f"http://127.0.0.1:{control_port.value}/healthz"
    load_before = os.getloadavg()
    with ThreadPoolExecutor(args.tenants + 1) as pool:
        pool.submit(probe_health, args.api, control_url, stop, figures)
        for key in keys:
            pool.submit(other_tenant, args.api, key, stop, figures)
        time.sleep(args.seconds)
        stop.set()
        abuser_stop.set()
    abuser.join(timeout=120)
    if abuser.is_alive():  # a call still in flight past its timeout: the figures are taken
        abuser.kill()
    figures.responses_5xx += abuser_5xx.value
    load_after = os.getloadavg()
    control.kill()
    unfinished = dict(figures.submitted)
    deadline = time.monotonic() + args.drain_seconds
    while unfinished and time.monotonic() < deadline:
        for job_id, key in list(unfinished.items()):
            polled = requests.get(f"{args.api}/v1/jobs/{job_id}", timeout=60,
                                  headers={"Authorization": f"Bearer {key}"})
            if polled.ok and polled.json()["status"] in FINISHED:
                del unfinished[job_id]
        time.sleep(0.5)
    time.sleep(5)  # the last webhooks
    server.shutdown()

    result = {
        "healthz_p99_ms": p99(figures.healthz_ms),
        "submit_p99_ms": p99(figures.submit_ms),
        "webhook_p99_s": p99(figures.webhook_s),
        "responses_5xx": figures.responses_5xx,
        "jobs_submitted": len(figures.submitted),
        "jobs_lost": len(unfinished),
        "targets": TARGETS,
        "control_p99_ms": p99(figures.control_ms),
        "healthz_p50_ms": statistics.median(figures.healthz_ms),
        "submit_p50_ms": statistics.median(figures.submit_ms) if figures.submit_ms else None,
        "api_requests": api_requests(args.api),
        "cpu": cpu_name(),
        "load_average_1min": [round(load_before[0], 1), round(load_after[0], 1)],
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    for name, target in TARGETS.items():
        print(f"{name:16} {result[name]!s:>12}   target {target}")
    print(f"jobs submitted   {result['jobs_submitted']:>12}")
    print(f"control p99 ms   {result['control_p99_ms']:>12.1f}   (a bare HTTP server, same host)")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
