"""Celery task events for genq jobs, so that Flower and `celery events` show what a worker does
although its jobs skip Celery's pool: each job is a `genq.run_job` task whose id is the job's
id; received and started when it is claimed, succeeded or failed once its outcome is
committed. On only with `GENQ_WORKER_SEND_EVENTS` (as Celery's `-E`): each event is a broker
publish, about three per job."""

from __future__ import annotations

import logging
import time

from celery import Celery

from genq.queues import RUN_JOB_TASK

log = logging.getLogger(__name__)


class TaskEventsMiddleware:
    """Worker middleware (workers.middleware) that sends the events. Never raises into the
    worker: an event that cannot be sent is dropped (Celery's dispatcher buffers while the
    broker is away)."""

    def __init__(self, app: Celery, hostname: str) -> None:
        self._dispatcher = app.events.Dispatcher(app.connection_for_write(), hostname=hostname,
                                                 enabled=True)

    def before_job(self, job) -> None:
        self._send("task-received", uuid=job.id, name=RUN_JOB_TASK, args=repr([job.id]),
                   kwargs="{}", root_id=job.id, parent_id=None, retries=job.attempts - 1,
                   eta=None, expires=None)
        self._send("task-started", uuid=job.id)

    def job_ended(self, job, status: str) -> None:
        if status in ("failed", "unwritten"):
            self._send("task-failed", uuid=job.id, exception=f"job {status}", traceback="")
        else:  # the worker is done with it; the job's own state is in `result`
            self._send("task-succeeded", uuid=job.id, result=repr(status),
                       runtime=time.time() - job.started_at.timestamp()
                       if job.started_at is not None else 0.0)

    def close(self) -> None:
        self._dispatcher.close()

    def _send(self, event_type: str, **fields) -> None:
        try:
            self._dispatcher.send(event_type, timestamp=time.time(), **fields)
        except Exception:
            log.debug("could not send the %s event", event_type, exc_info=True)
