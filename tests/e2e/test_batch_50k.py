"""A 50,000-line batch on a real stack: the upload streams and the ingest stays within bounded
memory, counts are exact, and an interactive call made during the batch is not stuck behind it.

Running all 50,000 lines through even the tiny model would take minutes on a CI runner, so the
test lets the batch run for a while, then cancels it: every line must still be accounted for.
"""

from __future__ import annotations

import json
import threading
import time

import psutil
import pytest
from sqlalchemy import func, select

from genq import db
from genq.models import Job
from tests.conftest import TINY_MODEL
from tests.e2e.batch_support import (
    batch_env,  # noqa: F401 (fixture)
    batch_redis,
    openai_client,
    wait_for_batch,
)
from tests.processes import wait_for

pytestmark = pytest.mark.usefixtures("batch_env")

LINES = 50_000
MAX_RSS_GROWTH_BYTES = 200 * 1024 * 1024


class PeakRss:
    """Samples a process tree's resident memory in a thread; `growth` is peak minus start."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        tree = [self.process, *self.process.children(recursive=True)]
        return sum(process.memory_info().rss for process in tree)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.start


def write_big_file(path) -> None:
    with path.open("w") as handle:
        for number in range(LINES):
            handle.write(json.dumps({
                "custom_id": f"line-{number}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": TINY_MODEL, "max_tokens": 2, "temperature": 0,
                         "messages": [{"role": "user", "content": f"Summarize item {number}"}]},
            }) + "\n")


def test_fifty_thousand_lines_ingest_in_bounded_memory_and_interactive_calls_stay_fast(
        stack_factory, sqlite_url, redis_url, tmp_path):
    # given a running stack and a 50,000-line file
    stack = stack_factory(sqlite_url, batch_redis(redis_url))
    client = openai_client(stack)
    path = tmp_path / "big.jsonl"
    write_big_file(path)
    api, worker = stack.group.processes[0], stack.group.processes[1]

    # when it is uploaded and ingested
    api_rss = PeakRss(api.popen.pid)
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    api_growth = api_rss.stop()
    worker_rss = PeakRss(worker.popen.pid)
    started = time.monotonic()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).status == "in_progress", 120,
             "the ingest to finish")
    ingest_seconds = time.monotonic() - started
    worker_growth = worker_rss.stop()

    # then memory stayed bounded and every line became exactly one job
    print(f"\ningest of {LINES} lines: {ingest_seconds:.1f} s "
          f"({LINES / ingest_seconds:.0f} lines/s); RSS growth: API "
          f"{api_growth / 2**20:.0f} MiB, worker {worker_growth / 2**20:.0f} MiB")
    assert uploaded.bytes == path.stat().st_size
    assert api_growth < MAX_RSS_GROWTH_BYTES
    assert worker_growth < MAX_RSS_GROWTH_BYTES
    assert client.batches.retrieve(batch.id).request_counts.total == LINES
    with db.session_factory(stack.database_url)() as session:
        assert session.scalar(select(func.count()).where(Job.batch_id == batch.id)) == LINES

    # and an interactive call made while the batch runs is served ahead of it
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 50, 60,
             "the batch to be running")
    chat = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with db.session_factory(stack.database_url)() as session:
        interactive = session.get(Job, chat.id.removeprefix("chatcmpl-"))
        batch_starts_in_between = session.scalar(select(func.count()).where(
            Job.batch_id == batch.id, Job.started_at > interactive.created_at,
            Job.started_at < interactive.started_at))
    queue_wait = (interactive.started_at - interactive.created_at).total_seconds()
    print(f"interactive job waited {queue_wait * 1000:.0f} ms; "
          f"{batch_starts_in_between} batch line(s) started meanwhile")
    assert queue_wait < 2.0
    # Not behind the window: FIFO, it would wait for the 256 batch lines already on the broker.
    # Only lines the worker had already taken (a few engine steps' worth) start before it.
    assert batch_starts_in_between < 64

    # and cancelling stops the rest while accounting for every line
    client.batches.cancel(batch.id)
    final = wait_for_batch(client, batch.id, timeout=120)
    counts = final.request_counts
    assert final.status == "cancelled"
    assert counts.total == LINES and counts.completed + counts.failed == LINES
    assert 50 <= counts.completed < LINES
    assert client.files.retrieve(final.error_file_id).line_count == counts.failed
    assert client.files.retrieve(final.output_file_id).line_count == counts.completed
