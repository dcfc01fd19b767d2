"""How many open waits the API holds: N `GET /v1/jobs/{id}/events` streams and M
`Prefer: wait` calls on jobs that never finish, while /healthz is timed.

    python -m benchmarks.open_waits --api http://127.0.0.1:8000 --streams 64 --waits 64

Run against a genq API with no worker (so the jobs stay queued and every wait lasts), in the
project directory of its database (keys come from `genq keys create`). Reports how many streams
and waits were held open, how many were turned away (429, or 202 without waiting), and the
/healthz p50/p99 meanwhile (timed from a process of its own, so the clients' threads do not
hold its GIL).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks.metrics_scrape import cpu_name


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


def hold_stream(api: str, key: str, seconds: float, outcomes: Counter, lock) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    job = requests.post(f"{api}/v1/jobs", headers=auth, timeout=60,
                        json={"prompt": "x", "max_tokens": 4}).json()
    deadline = time.monotonic() + seconds
    with requests.get(f"{api}/v1/jobs/{job['id']}/events", headers=auth, stream=True,
                      timeout=30) as response:
        with lock:
            outcomes[f"stream {response.status_code}"] += 1
        if response.status_code == 200:
            for _ in response.iter_lines():
                if time.monotonic() > deadline:
                    break


def hold_wait(api: str, key: str, seconds: float, outcomes: Counter, lock) -> None:
    response = requests.post(f"{api}/v1/jobs", timeout=90, json={"prompt": "x", "max_tokens": 4},
                             headers={"Authorization": f"Bearer {key}",
                                      "Prefer": f"wait={min(60, int(seconds))}"})
    waited = "waited" if "Preference-Applied" in response.headers else "not waited"
    with lock:
        outcomes[f"wait {response.status_code} {waited}"] += 1


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--waits", type=int, default=64)
    parser.add_argument("--tenants", type=int, default=16, help="the calls spread over these")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    keys = [create_key(f"waits-{n}") for n in range(args.tenants)]
    outcomes, lock = Counter(), threading.Lock()
    spawn = multiprocessing.get_context("spawn")
    timings_queue = spawn.Queue()
    calls = args.streams + args.waits
    with ThreadPoolExecutor(max(calls, 1)) as pool:
        for n in range(args.streams):
            pool.submit(hold_stream, args.api, keys[n % len(keys)], args.seconds + 10,
                        outcomes, lock)
        for n in range(args.waits):
            pool.submit(hold_wait, args.api, keys[n % len(keys)], args.seconds + 10, outcomes,
                        lock)
        time.sleep(5)  # every call is in
        prober = spawn.Process(target=probe, args=(args.api, args.seconds, timings_queue))
        prober.start()
        timings = timings_queue.get()
        prober.join()
        print("outcomes so far:", dict(outcomes), flush=True)
    result = {"streams": args.streams, "waits": args.waits, "outcomes": dict(outcomes),
              "healthz_p50_ms": statistics.median(timings), "healthz_p99_ms": p99(timings),
              "cpu": cpu_name()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
