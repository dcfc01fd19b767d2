"""Run one job: claim it in the DB, generate in the shared engine, commit exactly one result.

Every write is a conditional transition (genq.job_store), so a duplicate delivery, a stale
worker or a cancel that raced us cannot produce a second result or overwrite a finished job.
A job handed back (drain, quarantine busy) goes through the outbox, so it is republished even
if this process's broker connection is already gone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from enum import Enum

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from engine import RequestOutput, SamplingParams
from genq import db
from genq.errors import ErrorCode
from genq.job_store import enqueue_run_message, transition, transition_returning
from genq.models import Job, utcnow
from genq.settings import Settings
from genq.states import JobStatus, Priority
from workers.engine_loop import EngineLoop, EngineRequest, RequestAborted
from workers.group_commit import GroupCommitter
from workers.middleware import load_middleware, run_hook

log = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
WAIT_TICK_SECONDS = 0.25


class StopReason(Enum):
    DEADLINE = "deadline"
    DRAIN = "drain"


class JobRunner:
    def __init__(self, settings: Settings, loop: EngineLoop, worker_id: str = WORKER_ID) -> None:
        self.settings = settings
        self.loop = loop
        self.worker_id = worker_id
        self.url = settings.database_url_resolved
        self.writes = GroupCommitter(self.url)
        self.middleware = load_middleware(settings.worker_middleware)
        # Jobs that were delivered before (their worker died) run one at a time per process,
        # so a job that kills its process cannot take the same neighbours down twice.
        self._quarantine = threading.Lock()
        self._drain_deadline: float | None = None

    def begin_drain(self, seconds: float) -> None:
        self._drain_deadline = time.monotonic() + seconds

    def run(self, job_id: str) -> None:
        if self._drain_deadline is not None:
            self.hand_back(job_id, claimed=False)
            return
        job = self.claim(job_id, first_delivery=True)
        if job is not None:
            self._run(job, isolated=False)
            return
        # Not a first delivery (or not claimable at all): the quarantine path.
        if not self._quarantine.acquire(blocking=False):
            self.hand_back(job_id, claimed=False)
            return
        try:
            job = self.claim(job_id)
            if job is not None:
                self._run(job, isolated=True)
        finally:
            self._quarantine.release()

    def _run(self, job: Job, isolated: bool) -> None:
        run_hook(self.middleware, "before_job", job)
        try:
            self._execute(job, isolated)
        finally:
            run_hook(self.middleware, "after_job", job)

    def _execute(self, job: Job, isolated: bool) -> None:
        if job.deadline_at is not None and job.deadline_at <= utcnow():
            self._finish(job.id, JobStatus.EXPIRED)
            return
        request = EngineRequest(
            request_id=job.id,
            prompt=job.messages if job.messages is not None else job.prompt or "",
            params=SamplingParams(**job.sampling_params),
            priority=Priority(job.priority).rank,
            isolated=isolated,
        )
        try:
            output, stop_reason = self._wait(job, self.loop.submit(request))
        except ValueError as exc:  # refused by the engine: the request itself is bad
            self.fail(job.id, ErrorCode.INVALID_REQUEST, str(exc))
            return
        except Exception as exc:
            self.fail(job.id, ErrorCode.ENGINE_ERROR, f"{type(exc).__name__}: {exc}")
            return
        if stop_reason is StopReason.DRAIN:
            self.hand_back(job.id, claimed=True)
        elif stop_reason is StopReason.DEADLINE:
            self._finish(job.id, JobStatus.EXPIRED, output=output)
        elif output is not None:
            self.record_output(job.id, output)

    def _wait(self, job: Job, future: Future[RequestOutput]
              ) -> tuple[RequestOutput | None, StopReason | None]:
        """Wait for the engine, aborting the request at the job's deadline or the drain's."""
        deadline = (time.monotonic() + (job.deadline_at - utcnow()).total_seconds()
                    if job.deadline_at is not None else None)
        reason: StopReason | None = None
        while True:
            try:
                return future.result(timeout=WAIT_TICK_SECONDS), reason
            except RequestAborted:  # aborted (cancel, deadline, drain) before it ever ran
                return None, reason
            except FutureTimeout:
                pass
            if reason is not None:
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                reason = StopReason.DEADLINE
            elif self._drain_deadline is not None and now >= self._drain_deadline:
                reason = StopReason.DRAIN
            if reason is not None:
                self.loop.abort(job.id)

    def claim(self, job_id: str, first_delivery: bool = False) -> Job | None:
        """Take the job for this worker, or return None when it is not ours to run.

        `first_delivery`: claim only a job that never ran (the fast path, one UPDATE).
        """
        now = utcnow()
        lease = {
            "worker_id": self.worker_id,
            "lease_expires_at": now + timedelta(seconds=self.settings.job_lease_seconds),
            "attempts": Job.attempts + 1,
            "started_at": func.coalesce(Job.started_at, now),
        }

        ours = (Job.model == self.settings.model,)  # a stray message of another model

        def take(session: Session) -> Job | None:
            return transition_returning(
                session, job_id, JobStatus.RUNNING, only_from={JobStatus.QUEUED},
                extra_where=(*ours, Job.attempts == 0) if first_delivery else ours, **lease
            ) or (None if first_delivery else transition_returning(
                session,
                job_id,
                JobStatus.RUNNING,
                only_from={JobStatus.RUNNING},
                extra_where=(*ours, Job.lease_expires_at < now),
                **lease,
            ))

        job = self.writes.write(take)
        if job is None:
            if not first_delivery:
                log.info("job %s not claimed: finished, canceled, unknown or running elsewhere",
                         job_id)
            return None
        if job.attempts > self.settings.job_max_attempts:
            self.fail(job_id, ErrorCode.WORKER_LOST,
                      f"gave up after {job.attempts - 1} deliveries that did not finish")
            return None
        return job

    def record_output(self, job_id: str, output: RequestOutput) -> None:
        result = _result_values(output)

        def store(session: Session) -> None:
            if result["finish_reason"] != "abort" and transition(
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

        self.writes.write(store)

    def _finish(self, job_id: str, status: JobStatus, output: RequestOutput | None = None
                ) -> None:
        values = _result_values(output) if output is not None else {}
        self.writes.write(lambda session: transition(
            session, job_id, status, extra_where=self._ours(), **values))

    def fail(self, job_id: str, code: ErrorCode, message: str) -> None:
        self.writes.write(lambda session: transition(
            session, job_id, JobStatus.FAILED, extra_where=self._ours(),
            error_code=code.value, error_message=message[:2000]))

    def hand_back(self, job_id: str, claimed: bool) -> None:
        """Put the job back in its queue through the outbox (this worker will not run it)."""

        def requeue(session: Session) -> None:
            if claimed:
                moved = transition(session, job_id, JobStatus.QUEUED, extra_where=self._ours(),
                                   worker_id=None, lease_expires_at=None)
            else:
                moved = session.scalar(select(Job.status).where(Job.id == job_id)) == "queued"
            if moved:
                model, priority = session.execute(
                    select(Job.model, Job.priority).where(Job.id == job_id)).one()
                enqueue_run_message(session, job_id, model, Priority(priority))

        self.writes.write(requeue)

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


def _result_values(output: RequestOutput) -> dict:
    completion = output.outputs[0]
    return {
        "output_text": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": len(output.prompt_token_ids),
        "completion_tokens": len(completion.token_ids),
    }
