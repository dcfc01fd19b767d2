"""genq's Celery glue: the bootstep that runs a Worker (workers.worker) inside `celery worker`,
started with it and drained at its warm shutdown, and the run_job task, under whose name
Celery's tooling lists each job (the Worker takes job messages itself, never Celery's pool)."""

from __future__ import annotations

import logging

from celery import Celery, bootsteps

from genq.queues import RUN_JOB_TASK

log = logging.getLogger(__name__)

_running_worker = None  # the Worker of this process, once started (for direct task calls)


class GenqWorker(bootsteps.StartStopStep):
    """Starts the Worker before Celery's consumer (which then takes no job queue: `genq worker`
    excludes them) and stops it after: warm shutdown (SIGTERM, Ctrl-C) drains it while the
    broker connection is still open to ack its jobs' messages."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.worker = None

    def start(self, parent) -> None:
        global _running_worker
        from workers.events import ActiveJobsMiddleware, TaskEventsMiddleware
        from workers.worker import Worker

        app = parent.app
        worker = Worker.for_settings(app.genq_settings, app)
        worker.middleware.append(ActiveJobsMiddleware(parent.hostname))
        if app.conf.worker_send_task_events:  # Flower and `celery events` see every job
            worker.middleware.append(TaskEventsMiddleware(app, parent.hostname))
        worker.start()
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


def run_job(job_id: str) -> None:
    """A run_job message that reached Celery's pool (a plain `celery worker` consuming a job
    queue): run it on this process's Worker; Celery acks it once this returns."""
    if _running_worker is None:
        raise RuntimeError("no genq Worker runs in this process")
    _running_worker.run(job_id)


def install(app: Celery) -> None:
    app.task(name=RUN_JOB_TASK)(run_job)
    app.steps["worker"].add(GenqWorker)
