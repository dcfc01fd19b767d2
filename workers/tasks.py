"""genq's Celery glue: the bootstep that runs a Worker (workers.worker) inside `celery worker`,
started with it and drained at its warm shutdown, and the run_job task, under whose name
Celery's tooling lists each job (the Worker takes job messages itself, never Celery's pool)."""

from __future__ import annotations

import logging

from celery import Celery, bootsteps
from celery.signals import worker_ready

from genq.queues import RUN_JOB_TASK

log = logging.getLogger(__name__)

_running_worker = None  # the Worker of this process, once started (for direct task calls)


def build_worker(settings, app: Celery):
    """The Worker `genq worker` runs: its engine in a process of its own."""
    from genq import db
    from genq.job_events import JobEventLog
    from workers.engine_process import EngineProcess, engine_options
    from workers.intake import open_intake
    from workers.job_streams import JobStreams
    from workers.metrics import JobTimingMiddleware
    from workers.worker import Worker

    db.ensure_schema_current(settings.database_url_resolved)
    # Token streams need the broker's Redis; on RabbitMQ the API streams status and the final
    # output from the DB.
    broker_url = settings.broker_url_resolved
    streams = (JobStreams(JobEventLog(broker_url))
               if settings.stream_events and broker_url.startswith("redis") else None)
    engine = EngineProcess(engine_options(settings), settings.worker_batch_wait_ms / 1000,
                           on_deltas=streams.add_deltas if streams else None)
    worker = Worker(settings, open_intake(app, settings, settings.worker_window), engine,
                    streams=streams)
    worker.middleware.append(JobTimingMiddleware())
    return worker


class GenqWorker(bootsteps.StartStopStep):
    """Starts the Worker (its engine loaded) before Celery's consumer, which takes no job queue
    (`genq worker` excludes them); the Worker takes jobs once Celery's worker is ready (so a
    job that kills the process never kills it before it says "ready"). Stops it after the
    consumer: warm shutdown (SIGTERM, Ctrl-C) drains it while the broker connection is still
    open to ack its jobs' messages."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.worker = None

    def start(self, parent) -> None:
        global _running_worker
        from workers.events import ActiveJobsMiddleware, TaskEventsMiddleware

        app = parent.app
        worker = build_worker(app.genq_settings, app)
        worker.middleware.append(ActiveJobsMiddleware(parent.hostname))
        if app.conf.worker_send_task_events:  # Flower and `celery events` see every job
            worker.middleware.append(TaskEventsMiddleware(app, parent.hostname))
        worker.start(take_jobs=False)
        self.worker = _running_worker = worker

    def stop(self, parent) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.stop()

    def terminate(self, parent) -> None:
        """Cold shutdown: no drain; the messages not acked are redelivered."""
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.engine.stop(timeout=5)


@worker_ready.connect
def _take_jobs_once_ready(**_kwargs) -> None:
    if _running_worker is not None:
        _running_worker.start_taking()


def run_job(job_id: str) -> None:
    """A run_job message that reached Celery's pool (a plain `celery worker` consuming a job
    queue): run it on this process's Worker; Celery acks it once this returns."""
    if _running_worker is None:
        raise RuntimeError("no genq Worker runs in this process")
    _running_worker.run(job_id)


def install(app: Celery) -> None:
    app.task(name=RUN_JOB_TASK)(run_job)
    app.steps["worker"].add(GenqWorker)
