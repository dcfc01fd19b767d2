"""Run jobs: claim a micro-batch of deliveries in the DB, generate in the shared engine, commit
exactly one result per job, then report each delivery done (its message is acked then).

Nothing here blocks per job: a claimed job goes to the engine with a callback, its outcome goes
to the group committer, and the commit's callback acks. So one worker needs no thread per job.

Every write is a conditional transition (genq.job_store), so a duplicate delivery, a stale
worker or a cancel that raced us cannot produce a second result or overwrite a finished job.
A job handed back (drain) goes through the outbox, so it is republished even if this process's
broker connection is already gone, and gets its attempt back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from functools import partial

from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from genq import db
from genq.errors import ErrorCode
from genq.job_store import (
    Claimed,
    claim_deliveries,
    count_attempt,
    enqueue_run_message,
    extend_leases,
    hand_back,
    store_results,
    transition,
)
from genq.models import Job, utcnow
from genq.settings import Settings
from genq.states import JobStatus, Priority
from workers.engine_loop import EngineLoop, EngineRequest, RequestAborted
from workers.engine_process import EngineProcess
from workers.group_commit import BatchedWrite, GroupCommitter
from workers.job_streams import JobStreams
from workers.leases import WORKER_ID, is_dead_local_worker
from workers.middleware import load_middleware, run_hook

log = logging.getLogger(__name__)

WAIT_TICK_SECONDS = 0.25
# A redelivered job runs in the micro-batch like any other: one lost delivery is what any job
# of a worker that died (a deploy, the OOM killer, a lost host) has. Lost this often, the job
# itself is the suspect: it is held, without spending an attempt, until its worker holds no
# other job, and then starts alone.
LOST_DELIVERIES_BEFORE_ISOLATION = 2


class StopReason(Enum):
    DEADLINE = "deadline"
    DRAIN = "drain"


@dataclass(frozen=True)
class Delivery:
    """One broker message for a job; `done()` acks it, called once the job's outcome (or its
    hand-back) is committed; `not_done()` is called instead when that write failed."""

    job_id: str
    done: Callable[[], None]
    not_done: Callable[[], None] = lambda: None


@dataclass
class _Running:
    job: Row  # the jobs table's row as the claim left it
    delivery: Delivery
    deadline: float | None  # time.monotonic() at which the job expires
    stop_reason: StopReason | None = None
    outcome: JobStatus = JobStatus.SUCCEEDED  # the state its outcome write moves it to


class JobRunner:
    def __init__(self, settings: Settings, loop: EngineLoop | EngineProcess,
                 worker_id: str = WORKER_ID, streams: JobStreams | None = None) -> None:
        """`streams`: where running jobs' token deltas go (None: nowhere, none are made)."""
        self.settings = settings
        self.streams = streams
        self.loop = loop
        self.worker_id = worker_id
        self.url = settings.database_url_resolved
        self.writes = GroupCommitter(self.url)
        self._outputs = BatchedWrite(self._store_outputs)
        self.middleware = load_middleware(settings.worker_middleware)
        self._drain_deadline: float | None = None
        self._running: dict[str, _Running] = {}
        self._unsettled = 0  # deliveries neither acked nor given up on yet
        # Held jobs lost twice (claimed, no attempt spent): each waits for an idle worker.
        self._suspects: deque[tuple[Row, Delivery]] = deque()
        self._lock = threading.Lock()

    def begin_drain(self, seconds: float) -> None:
        """No more claims; the jobs in flight get `seconds`, then go back (enforce_deadlines)."""
        self._drain_deadline = time.monotonic() + seconds
        with self._lock:
            waiting, self._suspects = list(self._suspects), deque()
        for job, delivery in waiting:  # never started: back, still without a spent attempt
            self._then(self.writes.submit(self._requeue(job.id, attempt_spent=False)), job.id,
                       partial(self._settle, delivery))

    def is_idle(self) -> bool:
        """True when every delivery handed to `deliver` is settled (its outcome committed and
        its message acked, or its write given up on)."""
        with self._lock:
            return self._unsettled == 0

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Start a micro-batch of delivered jobs, claimed in one UPDATE, first deliveries and
        redeliveries alike; while draining, none is claimed and all stay unacked."""
        if not deliveries:
            return
        with self._lock:
            self._unsettled += len(deliveries)
        if self._drain_deadline is not None:
            # Left unacked, the broker delivers them again (Redis: the fetcher hands them back
            # when it closes; RabbitMQ: when the channel closes). Their jobs stay queued.
            for delivery in deliveries:
                self._settle(delivery, acked=False)
            return
        try:
            claimed = self.writes.write(lambda session: self._claim(
                session, [d.job_id for d in deliveries]))
        except Exception:
            # The jobs stay as they were in the DB: the reaper republishes a queued job whose
            # message is gone and requeues a running one whose holder is gone, so acking here
            # loses nothing and keeps the prefetch window open.
            log.exception("claiming %d delivered jobs failed; acking them for the reaper",
                          len(deliveries))
            for delivery in deliveries:
                self._settle(delivery, acked=True)
            return
        jobs = {job.id: job for job in claimed.jobs}
        held = {job.id: job for job in claimed.held}
        runnable = []
        for delivery in deliveries:
            if (job := jobs.pop(delivery.job_id, None)) is not None:
                runnable.append((job, delivery))
            elif (job := held.pop(delivery.job_id, None)) is not None:
                with self._lock:
                    self._suspects.append((job, delivery))
            else:  # finished, canceled, running elsewhere, or a duplicate
                self._settle(delivery, acked=True)
        self._start(runnable)
        self._start_next_suspect()

    def run(self, job_id: str) -> None:
        """Deliver one job and wait until its outcome is committed (a direct call of the
        Celery task, and tests)."""
        finished, failed = threading.Event(), threading.Event()
        self.deliver([Delivery(job_id, finished.set, failed.set)])
        while not finished.wait(WAIT_TICK_SECONDS):
            if failed.is_set():
                raise RuntimeError(f"job {job_id}: its outcome could not be written")
            self.enforce_deadlines()

    def _start(self, claimed: list[tuple[Row, Delivery]]) -> None:
        """Hand claimed jobs to the engine (one message for all); each job's outcome is
        written when the engine is done with it."""
        requests, runs = [], []
        for job, delivery in claimed:
            deadline = (time.monotonic() + (job.deadline_at - utcnow()).total_seconds()
                        if job.deadline_at is not None else None)
            running = _Running(job, delivery, deadline)
            if job.attempts > self.settings.job_max_attempts:
                self._end_before_engine(running, JobStatus.FAILED, self._fail(
                    job.id, ErrorCode.WORKER_LOST,
                    f"gave up after {job.attempts - 1} deliveries that did not finish"))
                continue
            try:
                run_hook(self.middleware, "before_job", job)
            except Exception as exc:  # a broken hook fails its job, not the micro-batch
                log.exception("job %s: a before_job hook raised; the job fails", job.id)
                self._end_before_engine(running, JobStatus.FAILED, self._fail(
                    job.id, ErrorCode.INTERNAL,
                    f"worker middleware before_job: {type(exc).__name__}: {exc}"))
                continue
            if deadline is not None and deadline <= time.monotonic():
                self._end_before_engine(running, JobStatus.EXPIRED,
                                        self._finish(job.id, JobStatus.EXPIRED))
                continue
            requests.append(EngineRequest(
                request_id=job.id,
                prompt=job.messages if job.messages is not None else job.prompt or "",
                params=SamplingParams(**job.sampling_params),
                priority=Priority(job.priority).rank,
                stream=self.streams is not None,
            ))
            runs.append(running)
        if not requests:
            return
        with self._lock:
            self._running.update((running.job.id, running) for running in runs)
        if self.streams is not None:
            self.streams.started([(running.job.id, running.job.attempts) for running in runs])
        try:
            futures = self.loop.submit_many(requests)
        except Exception:
            # The engine is unreachable (its process is gone; this worker exits soon): hand
            # the jobs back without spending an attempt, so every delivery settles.
            log.exception("handing %d jobs to the engine failed; handing them back", len(runs))
            for running in runs:
                with self._lock:
                    self._running.pop(running.job.id, None)
                self._end_before_engine(running, JobStatus.QUEUED, self._requeue(running.job.id))
            return
        for running, future in zip(runs, futures, strict=True):
            future.add_done_callback(partial(self._on_engine_done, running))

    def _end_before_engine(self, running: _Running, outcome: JobStatus,
                           write: Callable[[Session], object]) -> None:
        """The job never reaches the engine: write its `outcome`, then settle its delivery."""
        running.outcome = outcome
        self._then(self.writes.submit(write), running.job.id, partial(self._ended, running))

    def _on_engine_done(self, running: _Running, future: Future[RequestOutput]) -> None:
        """Called when the engine is done with the job (by the engine loop's thread, or the
        engine process's outcome reader): pick the job's outcome and queue its write."""
        job_id = running.job.id
        with self._lock:
            self._running.pop(job_id, None)
        write = self._outcome_write(running, future)
        if write is None:  # canceled before it reached the engine: the cancel wrote the outcome
            running.outcome = JobStatus.CANCELED
            self._ended(running, committed=True)
        else:
            self._then(write, job_id, partial(self._ended, running))

    def _outcome_write(self, running: _Running, future: Future[RequestOutput]) -> Future | None:
        job_id = running.job.id
        output: RequestOutput | None = None
        try:
            output = future.result()
        except RequestAborted:  # aborted (cancel, deadline, drain) before it ever ran
            pass
        except ValueError as exc:  # refused by the engine: the request itself is bad
            running.outcome = JobStatus.FAILED
            return self.writes.submit(self._fail(job_id, ErrorCode.INVALID_REQUEST, str(exc)))
        except Exception as exc:
            running.outcome = JobStatus.FAILED
            return self.writes.submit(self._fail(job_id, ErrorCode.ENGINE_ERROR,
                                                 f"{type(exc).__name__}: {exc}"))
        if running.stop_reason is StopReason.DRAIN:
            running.outcome = JobStatus.QUEUED
            return self.writes.submit(self._requeue(job_id))
        if running.stop_reason is StopReason.DEADLINE:
            running.outcome = JobStatus.EXPIRED
            return self.writes.submit(self._finish(job_id, JobStatus.EXPIRED, output))
        if output is not None and output.outputs[0].finish_reason == "abort":
            running.outcome = JobStatus.CANCELED  # canceled while running
        if output is not None:
            return self.writes.submit_batched(self._outputs, (job_id, _result_values(
                output, running.job.sampling_params.get("logprobs"))))
        return None

    def _then(self, write: Future, job_id: str, on_end: Callable[[bool], None]) -> None:
        """Call `on_end(committed)` once `write` is done. A write that failed (DB down) leaves
        the job's message unacked and its lease unrenewed: the reaper re-queues the job when
        the lease expires, and a redelivery of the message is harmless."""
        def after_commit(future: Future) -> None:
            committed = future.exception() is None
            if not committed:
                log.error("job %s: its outcome could not be written", job_id,
                          exc_info=future.exception())
            on_end(committed)

        write.add_done_callback(after_commit)

    def _ended(self, running: _Running, committed: bool) -> None:
        if self.streams is not None:
            self.streams.ended(running.job.id)
        try:
            run_hook(self.middleware, "after_job", running.job)
            run_hook(self.middleware, "job_ended", running.job,
                     running.outcome.value if committed else "unwritten")
        finally:
            self._settle(running.delivery, acked=committed)

    def _settle(self, delivery: Delivery, acked: bool) -> None:
        """Done with a delivery: ack its message once its outcome is committed; without a
        committed outcome it stays unacked, for the broker to deliver again."""
        try:
            (delivery.done if acked else delivery.not_done)()
        finally:
            with self._lock:
                self._unsettled -= 1
        self._start_next_suspect()

    def enforce_deadlines(self) -> None:
        """Abort in the engine the jobs past their deadline, and every job once the drain
        deadline has passed (called every housekeeping tick)."""
        now = time.monotonic()
        draining = self._drain_deadline is not None and now >= self._drain_deadline
        with self._lock:
            running = list(self._running.values())
        for item in running:
            if item.stop_reason is not None:
                continue
            if item.deadline is not None and now >= item.deadline:
                item.stop_reason = StopReason.DEADLINE
            elif draining:
                item.stop_reason = StopReason.DRAIN
            if item.stop_reason is not None:
                self.loop.abort(item.job.id)

    def _start_next_suspect(self) -> None:
        """Start the oldest held suspect once this worker holds no other job: if it is what
        kills workers, it takes down only the jobs delivered after it started (each then lost
        once), never the same neighbours again. Its attempt is spent only now: a suspect that
        waited in a worker that died comes back as it was."""
        with self._lock:
            if (not self._suspects or self._drain_deadline is not None
                    or self._unsettled != len(self._suspects)):
                return
            job, delivery = self._suspects.popleft()
        log.warning("job %s was lost with its worker %d times: it starts alone", job.id,
                    job.attempts)
        counted = self.writes.submit(
            lambda session: count_attempt(session, job.id, worker_id=self.worker_id))
        counted.add_done_callback(partial(self._on_suspect_counted, delivery))

    def _on_suspect_counted(self, delivery: Delivery, counted: Future) -> None:
        try:
            job = counted.result()
        except Exception:
            log.exception("job %s: starting it failed; its message stays unacked",
                          delivery.job_id)
            self._settle(delivery, acked=False)
            return
        if job is None:  # canceled while it waited
            self._settle(delivery, acked=True)
            return
        self._start([(job, delivery)])

    def _claim(self, session: Session, job_ids: list[str]) -> Claimed:
        """Claim a micro-batch of delivered jobs (see job_store.claim_deliveries)."""
        return claim_deliveries(
            session, list(dict.fromkeys(job_ids)), model=self.settings.model,
            model_version=self.settings.model_version or None, worker_id=self.worker_id,
            lease_expires_at=self._lease_expiry(),
            is_holder_dead=is_dead_local_worker,
            suspect_after=LOST_DELIVERIES_BEFORE_ISOLATION)

    def _lease_expiry(self) -> datetime:
        return utcnow() + timedelta(seconds=self.settings.job_lease_seconds)

    def _store_outputs(self, session: Session, outputs: list[tuple[str, dict]]) -> list[None]:
        """Store a micro-batch of finished jobs' outputs in one UPDATE."""
        finished = {job_id: values for job_id, values in outputs
                    if values["finish_reason"] != "abort"}
        succeeded = store_results(session, finished, worker_id=self.worker_id)
        for job_id, values in outputs:
            if job_id in succeeded:
                continue
            # Canceled while running: keep the partial output on the canceled row, once.
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.CANCELED.value,
                       Job.output_text.is_(None))
                .values(**values)
            )
        return [None] * len(outputs)

    def _finish(self, job_id: str, status: JobStatus, output: RequestOutput | None = None
                ) -> Callable[[Session], bool]:
        values = _result_values(output) if output is not None else {}
        return lambda session: transition(session, job_id, status, extra_where=self._ours(),
                                          **values)

    def _fail(self, job_id: str, code: ErrorCode, message: str) -> Callable[[Session], bool]:
        return lambda session: transition(
            session, job_id, JobStatus.FAILED, extra_where=self._ours(),
            error_code=code.value, error_message=message[:2000])

    def _requeue(self, job_id: str, attempt_spent: bool = True) -> Callable[[Session], None]:
        """Hand a claimed job back to its queue through the outbox (so it is republished even
        if this process's broker connection is gone), with its attempt given back: a clean
        stop loses no delivery."""

        def requeue(session: Session) -> None:
            if hand_back(session, job_id, worker_id=self.worker_id,
                         attempt_spent=attempt_spent):
                model, priority, version = session.execute(
                    select(Job.model, Job.priority, Job.model_version)
                    .where(Job.id == job_id)).one()
                enqueue_run_message(session, job_id, model, Priority(priority),
                                    model_version=version)

        return requeue

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
        """Extend the leases of the jobs this worker is running or holding (a job whose outcome
        could not be written is no longer among them: its lease runs out and the reaper takes
        it)."""
        with self._lock:
            held = [*self._running, *(job.id for job, _delivery in self._suspects)]
        if held:
            with db.transaction(self.url) as session:
                extend_leases(session, held, worker_id=self.worker_id,
                              lease_expires_at=self._lease_expiry())

    def _ours(self) -> tuple:
        return (Job.worker_id == self.worker_id,)


def _result_values(output: RequestOutput, num_top_logprobs: int | None = None) -> dict:
    completion = output.outputs[0]
    values = {
        # A model can generate a NUL, which PostgreSQL text cannot hold: the result's UPDATE
        # would fail on every delivery. U+FFFD, as for any undecodable byte.
        "output_text": completion.text.replace("\x00", "\ufffd"),
        "finish_reason": completion.finish_reason,
        "prompt_tokens": len(output.prompt_token_ids),
        "completion_tokens": len(completion.token_ids),
    }
    if completion.logprobs is not None and num_top_logprobs is not None:
        values["output_logprobs"] = _stored_logprobs(completion, num_top_logprobs)
    return values


def _stored_logprobs(completion, num_top: int) -> list:
    """Per token [text, logprob, top]: the engine's entry names the token first, then its top
    alternatives (the token itself among them when it is one), so the top `num_top` by
    logprob are those alternatives."""
    def text(token_id: int) -> str:
        return (completion.token_texts or {}).get(token_id, "").replace("\x00", "\ufffd")

    stored = []
    for entry in completion.logprobs:
        (token_id, logprob), *_ = entry.items()
        top = sorted(entry.items(), key=lambda item: -item[1])[:num_top]
        stored.append([text(token_id), logprob, [[text(i), value] for i, value in top]])
    return stored
