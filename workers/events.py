"""Celery's tooling for genq jobs, although they skip Celery's pool: each job is a
`genq.run_job` task whose id is the job's id. `celery inspect active` lists the jobs a worker
runs (ActiveJobsMiddleware, always on). Task events, so that Flower and `celery events` show
what a worker does: received and started when a job is claimed, succeeded or failed once its
outcome is committed; on only with `GENQ_WORKER_SEND_EVENTS` (as Celery's `-E`): each event is
a broker publish, about three per job."""

from __future__ import annotations

import logging
import os
import threading
import time

from celery import Celery
from celery.worker import state as worker_state

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


class _ActiveJob:
    """What `celery inspect active` reports of a request (celery.worker.request.Request.info)."""

    def __init__(self, job, hostname: str) -> None:
        self.id = job.id
        self._info = {"id": job.id, "name": RUN_JOB_TASK, "args": [job.id], "kwargs": {},
                      "type": RUN_JOB_TASK, "hostname": hostname, "time_start": time.time(),
                      "acknowledged": False, "delivery_info": {}, "worker_pid": os.getpid()}

    def info(self, safe: bool = False) -> dict:
        return dict(self._info, args=repr(self._info["args"]) if safe else self._info["args"])

    def terminate(self, pool, signal=None) -> None:  # `celery control revoke --terminate`
        log.warning("job %s: revoke does not stop genq jobs; cancel it (genq cancel)", self.id)


class ActiveJobsMiddleware:
    """Worker middleware that lists each job in Celery's active requests while it runs, for
    `celery inspect active` (Celery keeps them in a WeakSet: this holds the references)."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self._active: dict[str, _ActiveJob] = {}
        self._lock = threading.Lock()

    def before_job(self, job) -> None:
        active = _ActiveJob(job, self.hostname)
        with self._lock:
            self._active[job.id] = active
        worker_state.active_requests.add(active)

    def after_job(self, job) -> None:
        with self._lock:
            active = self._active.pop(job.id, None)
        if active is not None:
            worker_state.active_requests.discard(active)
