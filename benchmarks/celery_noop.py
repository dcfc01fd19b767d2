"""The baseline of benchmarks.queue_overhead: a plain Celery no-op task with acks_late that
counts itself in Redis (so the benchmark knows when the worker has drained the queue)."""

import os

import redis
from celery import Celery

BROKER_URL = os.environ.get("NOOP_BROKER_URL", "redis://127.0.0.1:6379/14")
COUNTER_KEY = "genq-bench:noop-done"

app = Celery("noop", broker=BROKER_URL)
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_ignore_result=True)
_counter = redis.Redis.from_url(BROKER_URL)


@app.task(name="bench.noop")
def noop(index: int) -> None:
    _counter.incr(COUNTER_KEY)
