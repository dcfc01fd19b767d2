"""Celery tasks, how job messages reach the job runner in micro-batches (on Redis the fetcher's
rounds, on RabbitMQ the run_job strategy's micro-batcher) and the intake step that starts and
drains them. The model loads (and warms up) when the worker starts, before the first message
is taken."""

from __future__ import annotations

import logging
from functools import partial

from celery import bootsteps
from celery.signals import worker_init, worker_shutdown

from genq.queues import RUN_JOB_TASK, is_amqp, job_queues
from workers.amqp_reserve import InteractiveReserve
from workers.celery_app import app
from workers.events import ActiveJobsMiddleware, TaskEventsMiddleware
from workers.micro_batch import JobMessage, deliver_now
from workers.redis_fetcher import RedisJobFetcher
from workers.runtime import get_runtime

log = logging.getLogger(__name__)

URGENT_RESERVE = 4  # interactive jobs a worker takes beyond its full window


@worker_init.connect
def _load_engine(**_kwargs) -> None:
    get_runtime()


@worker_shutdown.connect
def _stop_engine(**_kwargs) -> None:
    if get_runtime.cache_info().currsize:
        get_runtime().close()


def job_message_strategy(task, app, consumer, **_kwargs):
    """Celery's hook for how a task's messages are handled (RabbitMQ): run_job messages skip
    the pool and go to the micro-batcher (workers.micro_batch), which acks each once its job
    is done. A Redis worker has no micro-batcher (its fetcher takes the job queues): a message
    that reaches Celery's consumer there anyway goes straight to the runner."""
    runtime = get_runtime()
    connection_errors = consumer.connection_errors

    def on_message(message, body, ack, reject, callbacks, **_kw) -> None:
        # `ack` schedules Message.ack_log_error on the consumer's thread (thread-safe).
        job_message = JobMessage(message.payload, partial(ack, log, connection_errors))
        if runtime.batcher is None:  # Redis, where Celery's consumer takes no job queue
            deliver_now(runtime.runner, [job_message])
        else:
            runtime.batcher.receive(job_message)

    return on_message


@app.task(name=RUN_JOB_TASK, Strategy=f"{__name__}:job_message_strategy")
def run_job(job_id: str) -> None:
    """What a direct call does (the worker's messages take the strategy above instead)."""
    get_runtime().runner.run(job_id)


class JobIntake(bootsteps.StartStopStep):
    """On Redis, starts the batch fetcher (Celery's consumer takes no job queue there; `genq
    worker` excludes them); on RabbitMQ, the interactive reserve beside Celery's consumer.
    Warm shutdown (SIGTERM): no more messages (Celery's consumer stops
    first; the fetcher here), then in-flight jobs get `worker_drain_seconds` to finish and the
    rest are handed back, while the broker connection is still open to ack them."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.fetcher: RedisJobFetcher | InteractiveReserve | None = None

    def start(self, worker) -> None:
        runtime = get_runtime()
        settings = runtime.settings
        runtime.runner.middleware.append(ActiveJobsMiddleware(worker.hostname))
        if app.conf.worker_send_task_events:  # Flower and `celery events` see every job
            runtime.runner.middleware.append(TaskEventsMiddleware(app, worker.hostname))
        # The interactive queue (polled first) may take a few slots beyond a full window.
        queues = job_queues(settings.broker_url, settings.model, settings.model_version or None)
        if is_amqp(settings.broker_url):
            self.fetcher = InteractiveReserve(settings.broker_url, queues[0], URGENT_RESERVE,
                                              runtime.batcher.receive)
        else:  # refill once half the standby jobs have started: the engine never runs short
            self.fetcher = RedisJobFetcher(app, queues, settings.worker_window,
                                           partial(deliver_now, runtime.runner),
                                           refill_at=settings.worker_standby_jobs // 2,
                                           urgent_queue=queues[0].name,
                                           urgent_reserve=URGENT_RESERVE)
        self.fetcher.start()

    def stop(self, worker) -> None:
        if self.fetcher is not None:
            self.fetcher.stop()
        if get_runtime.cache_info().currsize:
            runtime = get_runtime()
            runtime.drain(runtime.settings.worker_drain_seconds)
        if self.fetcher is not None:
            self.fetcher.close()


app.steps["worker"].add(JobIntake)
