"""What one `/metrics` scrape costs in the database, with and without a long history.

    python -m benchmarks.metrics_scrape [--finished 0 100000] [--postgres ADMIN_URL] [--json PATH]

Seeds a fresh database (SQLite in a temporary directory, or one created through the PostgreSQL
server of --postgres and dropped after) with a few queued and running jobs, then N finished jobs
(finished a day ago, as a long-running deployment's history), and times
`DatabaseCollector.collect()`, the part of a scrape that reads the database: the median of
--repeats scrapes after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert

from genq import db
from genq.metrics import DatabaseCollector
from genq.models import Job, Tenant, new_id, utcnow

STATUSES = ("succeeded", "failed", "canceled", "expired")
PRIORITIES = ("interactive", "default", "batch")


def seed_jobs(url: str, tenant_id: str, num_finished: int, *, live: int = 20,
              finished_ago: timedelta = timedelta(days=1)) -> None:
    """`live` queued and as many running jobs, and `num_finished` finished `finished_ago`."""
    finished_at = utcnow() - finished_ago
    rows = [dict(id=new_id("job"), tenant_id=tenant_id, status=status, model="m",
                 priority=PRIORITIES[n % 3], admitted_tokens=10, created_at=utcnow())
            for n in range(live) for status in ("queued", "running")]
    rows += [dict(id=f"job_seed{n:09d}", tenant_id=tenant_id, status=STATUSES[n % 4],
                  model=("m", "n")[n % 2], priority=PRIORITIES[n % 3], admitted_tokens=10,
                  completion_tokens=5, created_at=finished_at - timedelta(seconds=1),
                  finished_at=finished_at)
             for n in range(num_finished)]
    with db.core_transaction(url) as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(insert(Job), rows[start:start + 5000])
        if url.startswith("postgresql"):
            conn.exec_driver_sql("ANALYZE")  # as autovacuum does after such a load


@contextmanager
def fresh_database(postgres: str | None, sqlite_url: str) -> Iterator[str]:
    if not postgres:
        yield sqlite_url
        db.get_engine(sqlite_url).dispose()
        return
    name = f"genq_bench_{uuid.uuid4().hex[:12]}"
    admin = db.make_engine(postgres).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = postgres.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        db.get_engine(url).dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def time_scrape(url: str, repeats: int) -> float:
    collector = DatabaseCollector(url, 30, target_backlog_seconds=60,
                                  throughput_window_seconds=300, default_worker_slots=32)
    list(collector.collect())  # warm-up: connections, statement cache
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        list(collector.collect())
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, nargs="+", default=[0, 100_000])
    parser.add_argument("--postgres", help="URL of an existing PostgreSQL database, used to "
                        "create and drop a fresh one per run (default: SQLite)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    backend = "postgresql" if args.postgres else "sqlite"
    for count in args.finished:
        with tempfile.TemporaryDirectory() as directory, fresh_database(
                args.postgres, f"sqlite:///{directory}/genq.db") as url:
            db.upgrade(url)
            with db.transaction(url) as session:
                tenant = Tenant(name=f"bench-{new_id('t')}")
                session.add(tenant)
                session.flush()
                tenant_id = tenant.id
            seed_jobs(url, tenant_id, count)
            results[count] = time_scrape(url, args.repeats)
        print(f"{backend} {count:>8} finished jobs: scrape {results[count]:8.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "database": backend,
                                          "scrape_ms": results}, indent=2))


if __name__ == "__main__":
    main()
