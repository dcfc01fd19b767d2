"""Run one job: claim it in the DB, generate in the shared engine, commit exactly one result.

Every write is a conditional transition (genq.job_store), so a duplicate delivery, a stale
worker or a cancel that raced us cannot produce a second result or overwrite a finished job.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

from sqlalchemy import func, select, update

from engine import RequestOutput, SamplingParams
from genq import db
from genq.errors import ErrorCode
from genq.job_store import transition
from genq.models import Job, utcnow
from genq.settings import Settings
from genq.states import JobStatus, Priority
from workers.engine_loop import EngineLoop, EngineRequest

log = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class JobRunner:
    def __init__(self, settings: Settings, loop: EngineLoop, worker_id: str = WORKER_ID) -> None:
        self.settings = settings
        self.loop = loop
        self.worker_id = worker_id
        self.url = settings.database_url_resolved

    def run(self, job_id: str) -> None:
        job = self.claim(job_id)
        if job is None:
            return
        request = EngineRequest(
            request_id=job.id,
            prompt=job.messages if job.messages is not None else job.prompt or "",
            params=SamplingParams(**job.sampling_params),
            priority=Priority(job.priority).rank,
        )
        try:
            output = self.loop.submit(request).result()
        except ValueError as exc:  # refused by the engine: the request itself is bad
            self.fail(job.id, ErrorCode.INVALID_REQUEST, str(exc))
            return
        except Exception as exc:
            self.fail(job.id, ErrorCode.ENGINE_ERROR, f"{type(exc).__name__}: {exc}")
            return
        self.record_output(job.id, output)

    def claim(self, job_id: str) -> Job | None:
        """Take the job for this worker, or return None when it is not ours to run."""
        now = utcnow()
        lease = {
            "worker_id": self.worker_id,
            "lease_expires_at": now + timedelta(seconds=self.settings.job_lease_seconds),
            "attempts": Job.attempts + 1,
            "started_at": func.coalesce(Job.started_at, now),
        }
        with db.transaction(self.url) as session:
            claimed = transition(
                session, job_id, JobStatus.RUNNING, only_from={JobStatus.QUEUED}, **lease
            ) or transition(
                session,
                job_id,
                JobStatus.RUNNING,
                only_from={JobStatus.RUNNING},
                extra_where=(Job.lease_expires_at < now,),
                **lease,
            )
            job = session.get(Job, job_id) if claimed else None
        if job is None:
            log.info("job %s not claimed: finished, canceled, unknown or running elsewhere", job_id)
            return None
        if job.attempts > self.settings.job_max_attempts:
            self.fail(job_id, ErrorCode.WORKER_LOST,
                      f"gave up after {job.attempts - 1} deliveries that did not finish")
            return None
        return job

    def record_output(self, job_id: str, output: RequestOutput) -> None:
        completion = output.outputs[0]
        result = {
            "output_text": completion.text,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": len(output.prompt_token_ids),
            "completion_tokens": len(completion.token_ids),
        }
        with db.transaction(self.url) as session:
            if completion.finish_reason != "abort" and transition(
                session, job_id, JobStatus.SUCCEEDED, extra_where=self._ours(), **result
            ):
                return
            # Canceled while running: keep the partial output on the canceled row, once.
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.CANCELED.value,
                       Job.output_text.is_(None))
                .values(**result)
            )

    def fail(self, job_id: str, code: ErrorCode, message: str) -> None:
        with db.transaction(self.url) as session:
            transition(session, job_id, JobStatus.FAILED, extra_where=self._ours(),
                       error_code=code.value, error_message=message[:2000])

    def abort_canceled(self) -> None:
        """Abort in the engine every in-flight job that was canceled through the API."""
        in_flight = self.loop.in_flight()
        if not in_flight:
            return
        with db.session_factory(self.url)() as session:
            canceled = session.scalars(
                select(Job.id).where(Job.id.in_(in_flight),
                                     Job.status == JobStatus.CANCELED.value)
            ).all()
        for job_id in canceled:
            self.loop.abort(job_id)

    def renew_leases(self) -> None:
        expires = utcnow() + timedelta(seconds=self.settings.job_lease_seconds)
        with db.transaction(self.url) as session:
            session.execute(
                update(Job)
                .where(Job.worker_id == self.worker_id, Job.status == JobStatus.RUNNING.value)
                .values(lease_expires_at=expires)
            )

    def _ours(self) -> tuple:
        return (Job.worker_id == self.worker_id,)
