"""Celery tasks, the run_job message strategy and the drain step. The model loads (and warms
up) when the worker starts, before the consumer takes its first message."""

from __future__ import annotations

import logging
from functools import partial

from celery import bootsteps
from celery.signals import worker_init, worker_shutdown

from genq.queues import RUN_JOB_TASK
from workers.celery_app import app
from workers.micro_batch import JobMessage
from workers.runtime import get_runtime

log = logging.getLogger(__name__)


@worker_init.connect
def _load_engine(**_kwargs) -> None:
    get_runtime()


@worker_shutdown.connect
def _stop_engine(**_kwargs) -> None:
    if get_runtime.cache_info().currsize:
        get_runtime().close()


def job_message_strategy(task, app, consumer, **_kwargs):
    """Celery's hook for how a task's messages are handled: run_job messages skip the pool and
    go to the micro-batcher (workers.micro_batch), which acks each once its job is done."""
    batcher = get_runtime().batcher
    connection_errors = consumer.connection_errors

    def on_message(message, body, ack, reject, callbacks, **_kw) -> None:
        # `ack` schedules Message.ack_log_error on the consumer's thread (thread-safe).
        batcher.receive(JobMessage(message.payload, partial(ack, log, connection_errors)))

    return on_message


@app.task(name=RUN_JOB_TASK, Strategy=f"{__name__}:job_message_strategy")
def run_job(job_id: str) -> None:
    """What a direct call does (the worker's messages take the strategy above instead)."""
    get_runtime().runner.run(job_id)


class DrainJobs(bootsteps.StartStopStep):
    """Warm shutdown (SIGTERM): Celery's consumer stops first (no more messages), then this
    step gives in-flight jobs `worker_drain_seconds` to finish and hands the rest back, while
    the broker connection is still open to ack them."""

    requires = ("celery.worker.components:Pool",)

    def stop(self, worker) -> None:
        if get_runtime.cache_info().currsize:
            runtime = get_runtime()
            runtime.drain(runtime.settings.worker_drain_seconds)


app.steps["worker"].add(DrainJobs)
