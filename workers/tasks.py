"""Celery tasks and worker signals. The model loads (and warms up) when the worker starts,
before the consumer takes its first message."""

from __future__ import annotations

from celery.signals import worker_init, worker_shutdown, worker_shutting_down

from genq.queues import RUN_JOB_TASK
from workers.celery_app import app
from workers.runtime import get_runtime


@worker_init.connect
def _load_engine(**_kwargs) -> None:
    get_runtime()


@worker_shutting_down.connect
def _drain(**_kwargs) -> None:
    """Warm shutdown (SIGTERM): Celery stops taking messages; in-flight jobs get
    `worker_drain_seconds` to finish, then go back to the queue."""
    if get_runtime.cache_info().currsize:
        runtime = get_runtime()
        runtime.runner.begin_drain(runtime.settings.worker_drain_seconds)


@worker_shutdown.connect
def _stop_engine(**_kwargs) -> None:
    if get_runtime.cache_info().currsize:
        get_runtime().close()


@app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> None:
    get_runtime().runner.run(job_id)
