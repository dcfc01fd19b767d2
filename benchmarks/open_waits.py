"""How many open waits the API holds: N `GET /v1/jobs/{id}/events` streams and M
`Prefer: wait` calls on jobs that never finish, while /healthz is timed.

    python -m benchmarks.open_waits --api http://127.0.0.1:8000 --streams 64 --waits 64

Run against a genq API with no worker (so the jobs stay queued and every wait lasts), in the
project directory of its database (keys come from `genq keys create`), with
GENQ_MAX_QUEUED_CALLS_PER_KEY at least the calls per tenant (they are all sent at once). Reports
how many streams and waits were held open, how many were turned away (429, or 202 without
waiting), and the /healthz p50/p99 meanwhile (timed from a process of its own; the calls are
held by one asyncio client thread). A wait is held while it has no answer: with --seconds 30
every one of them should still be open at the end (Prefer: wait=60).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import requests

from benchmarks.metrics_scrape import cpu_name
from results_api.gunicorn_config import raise_open_files_limit

JOB = {"prompt": "x", "max_tokens": 4}
MAX_WAIT_SECONDS = 60
OPEN_SECONDS = 5.0  # after the calls started, before /healthz is timed


def create_key(tenant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "cli", "keys", "create", tenant],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return out.strip().splitlines()[-1]


def probe(api: str, seconds: float, results: multiprocessing.Queue) -> None:
    timings, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        requests.get(f"{api}/healthz", timeout=30)
        timings.append((time.perf_counter() - started) * 1000)
        time.sleep(0.05)
    results.put(timings)


async def hold_stream(client: httpx.AsyncClient, key: str, job_id: str,
                      outcomes: Counter) -> None:
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=_auth(key)) as response:
        outcomes[f"stream {response.status_code}"] += 1
        async for _ in response.aiter_lines():
            pass


async def hold_wait(client: httpx.AsyncClient, key: str, outcomes: Counter) -> None:
    response = await client.post("/v1/jobs", json=JOB,
                                 headers=_auth(key) | {"Prefer": f"wait={MAX_WAIT_SECONDS}"})
    # Answered before the end (the jobs never finish): turned away, or a wait that timed out.
    waited = "waited" if "Preference-Applied" in response.headers else "not waited"
    outcomes[f"wait {response.status_code} {waited} (answered)"] += 1


async def hold_all(args: argparse.Namespace, keys: list[str], outcomes: Counter,
                   started: threading.Event, probed: threading.Event) -> dict[str, int]:
    """Open every stream and wait, hold them for the probe's time, then close them."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=args.api, limits=limits,
                                 timeout=httpx.Timeout(MAX_WAIT_SECONDS + 30)) as client:
        stream_jobs = []  # the streams' jobs, submitted in bulk per tenant
        for n, key in enumerate(keys):
            count = len(range(n, args.streams, len(keys)))
            if count:
                bulk = await client.post("/v1/jobs/bulk", headers=_auth(key),
                                         json={"jobs": [JOB] * count})
                bulk.raise_for_status()
                stream_jobs += [(key, job["id"]) for job in bulk.json()["data"]]
        tasks = [asyncio.ensure_future(hold_stream(client, key, job_id, outcomes))
                 for key, job_id in stream_jobs]
        tasks += [asyncio.ensure_future(hold_wait(client, keys[n % len(keys)], outcomes))
                  for n in range(args.waits)]
        started.set()
        await asyncio.to_thread(probed.wait)
        still_open = sum(not task.done() for task in tasks)
        waits_open = sum(not task.done() for task in tasks[len(stream_jobs):])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"open_at_end": still_open, "waits_open_at_end": waits_open}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--waits", type=int, default=64)
    parser.add_argument("--tenants", type=int, default=16, help="the calls spread over these")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--settle", type=float, default=OPEN_SECONDS,
                        help="seconds from the first call to the first /healthz timed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    keys = [create_key(f"waits-{n}") for n in range(args.tenants)]
    raise_open_files_limit(2 * (args.streams + args.waits) + 1024)
    outcomes: Counter = Counter()
    spawn = multiprocessing.get_context("spawn")
    timings_queue = spawn.Queue()
    started, probed = threading.Event(), threading.Event()
    holder: dict = {}
    thread = threading.Thread(target=lambda: holder.update(
        asyncio.run(hold_all(args, keys, outcomes, started, probed))))
    thread.start()
    started.wait()
    time.sleep(args.settle)  # by default many calls are still opening: the busiest part
    prober = spawn.Process(target=probe, args=(args.api, args.seconds, timings_queue))
    prober.start()
    timings = timings_queue.get()
    prober.join()
    probed.set()
    thread.join()
    print("outcomes:", dict(outcomes), holder, flush=True)
    held = outcomes["stream 200"] + holder["waits_open_at_end"]
    result = {"streams": args.streams, "waits": args.waits, "settle_seconds": args.settle,
              "held": held,
              "outcomes": dict(outcomes) | holder,
              "healthz_p50_ms": statistics.median(timings), "healthz_p99_ms": p99(timings),
              "cpu": cpu_name()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
