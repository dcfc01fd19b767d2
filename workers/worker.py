"""One genq worker. Its methods follow a job in order: intake (workers.intake) → claim (one
UPDATE per micro-batch) → generate (the engine process) → commit (exactly one outcome per job,
group-committed) → ack. It owns its threads and their start, drain and stop order.

Nothing blocks per job: a claimed job goes to the engine with a callback, its outcome goes to
the group committer, and the commit's callback acks. So one worker needs no thread per job.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from functools import partial

from sqlalchemy import Row

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from genq.errors import ErrorCode
from genq.group_commit import BatchedWrite, GroupCommitter
from genq.job_store import Claimed, claim_deliveries
from genq.models import utcnow
from genq.settings import Settings
from genq.states import JobStatus, Priority
from workers import heartbeat, job_writes
from workers.chores import Chores, lease_expiry
from workers.engine_loop import EngineLoop, EngineRequest, RequestAborted
from workers.engine_process import EngineProcess
from workers.in_flight import (
    LOST_DELIVERIES_BEFORE_ISOLATION,
    RunningJob,
    StopReason,
    Suspects,
    start_suspect,
)
from workers.intake import INTERACTIVE_RESERVE, Delivery, Intake
from workers.job_streams import JobStreams
from workers.leases import WORKER_ID, is_dead_local_worker
from workers.metrics import start_metrics_server
from workers.middleware import load_middleware, run_hook

log = logging.getLogger(__name__)

TAKE_WAIT_SECONDS = 1.0  # longest wait in the broker for a message; stop is seen this often
# A full window is polled this often for interactive jobs, taken into a few slots beyond it.
INTERACTIVE_POLL_SECONDS = 0.25
RETRY_SECONDS = (0.1, 2.0)  # backoff while the broker is unreachable
DRAIN_GRACE_SECONDS = 5.0  # after the drain deadline, the aborted jobs' hand-backs commit
# A micro-batch's start mark waits this long for another write to share its commit (its jobs'
# results, when they are short; the next claim): one transaction per micro-batch instead of
# two. A worker that dies meanwhile leaves those jobs suspects (workers.in_flight).
START_MARK_WAIT_SECONDS = 0.05


class _DirectCall:
    """The handle of a delivery made by `Worker.run`, not by the intake: settled here."""

    def __init__(self) -> None:
        self.done, self.failed = threading.Event(), threading.Event()


class Worker:
    def __init__(self, settings: Settings, intake: Intake, engine: EngineLoop | EngineProcess,
                 *, streams: JobStreams | None = None, worker_id: str = WORKER_ID) -> None:
        """`streams`: where running jobs' token deltas go (None: nowhere, none are made)."""
        self.settings = settings
        self.intake = intake
        self.engine = engine
        self.streams = streams
        self.worker_id = worker_id
        self.url = settings.database_url_resolved
        self.writes = GroupCommitter(self.url)
        self._outputs = BatchedWrite(job_writes.store_outputs(worker_id))
        self._started = BatchedWrite(job_writes.mark_micro_batches_started(worker_id))
        self.middleware = load_middleware(settings.worker_middleware)
        # The engine's batch plus standby jobs; refilled once half the standby jobs started
        # (fewer, larger rounds: on few cores each wake-up of a thread preempts the engine).
        self.window = settings.worker_window
        self.refill_at = max(1, min(settings.worker_standby_jobs // 2, self.window))
        self._lock = threading.Lock()
        self._running: dict[str, RunningJob] = {}
        self._unsettled = 0  # deliveries neither acked nor handed back yet
        self._suspects = Suspects()  # lost twice: held (no attempt), started one at a time
        self._slot_freed = threading.Event()
        self._stopping = threading.Event()
        self.drain_deadline: float | None = None
        self._intake_thread = threading.Thread(target=self._take_jobs, name="genq-intake",
                                               daemon=True)
        self.chores = Chores(self)  # lease renewal, deadlines, cancels, reaper, heartbeat
        self.enforce_deadlines = self.chores.enforce_deadlines

    # Start, drain, stop ---------------------------------------------------------------------

    def start(self, take_jobs: bool = True) -> None:
        """Load and warm up the engine, start the chores, then (unless `take_jobs` is False:
        the Celery bootstep waits for Celery's worker to be ready) take jobs."""
        started = time.monotonic()
        self.engine.start()
        if self.settings.worker_metrics_port:
            start_metrics_server(self.settings.worker_metrics_port, self.engine,
                                 self.settings.model)
        params = SamplingParams(max_tokens=2, temperature=0.0)
        self.engine.submit(EngineRequest("warmup", "Hello", params, priority=0)).result()
        log.info("engine for %s ready in %.1f s", self.settings.model,
                 time.monotonic() - started)
        self.chores.start()
        if take_jobs:
            self.start_taking()

    def start_taking(self) -> None:
        """Start the intake thread (once)."""
        if self._intake_thread.ident is None and not self._stopping.is_set():
            self._intake_thread.start()

    def stop(self) -> None:
        """Warm shutdown: take no more jobs; the jobs in flight get `worker_drain_seconds` to
        finish, then go back to their queue; then the acks are sent and every message not
        acked is handed back, while leases are still renewed; the engine stops last."""
        self.stop_taking()
        self.drain(self.settings.worker_drain_seconds)
        self.intake.close()
        self.chores.stop()
        self.engine.stop(timeout=5)
        heartbeat.leave(self.settings, self.worker_id)

    def stop_taking(self) -> None:
        """Stop the intake thread (within TAKE_WAIT_SECONDS): no more messages are taken."""
        self._stopping.set()
        if self._intake_thread.is_alive():
            self._intake_thread.join(TAKE_WAIT_SECONDS + 5)

    def drain(self, seconds: float) -> None:
        """Stop claiming; the jobs in flight get `seconds`, then go back to their queue;
        returns when every delivery is settled (or `seconds` plus a grace have passed)."""
        self.begin_drain(seconds)
        deadline = time.monotonic() + seconds + DRAIN_GRACE_SECONDS
        while not self.is_idle():
            if time.monotonic() > deadline:
                log.warning("drain: jobs still in flight after %.0f s; their messages are "
                            "redelivered", seconds)
                return
            time.sleep(0.05)

    def begin_drain(self, seconds: float) -> None:
        """No more claims; enforce_deadlines aborts the jobs in flight after `seconds` and they
        are handed back. Held suspects go back at once, without a spent attempt."""
        self.drain_deadline = time.monotonic() + seconds
        with self._lock:
            waiting = self._suspects.release_all()
        for job, delivery in waiting:
            self._after_commit(self.writes.submit(job_writes.requeue(
                job.id, self.worker_id, attempt_spent=False)), job.id,
                partial(self._settle, delivery))

    def is_idle(self) -> bool:
        """True when every delivery is settled (its outcome committed and acked, or handed
        back)."""
        with self._lock:
            return self._unsettled == 0

    # 1. Intake ------------------------------------------------------------------------------

    def _take_jobs(self) -> None:
        """The intake thread: take micro-batches of deliveries and claim them, until stop."""
        backoff = RETRY_SECONDS[0]
        while not self._stopping.is_set():
            try:
                deliveries = self._take()
            except Exception:  # the broker is away: the intake reconnects at the next take
                log.warning("taking jobs from the broker failed; retrying in %.1f s", backoff,
                            exc_info=True)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, RETRY_SECONDS[1])
                continue
            backoff = RETRY_SECONDS[0]
            if self._stopping.is_set():  # taken while stopping: back to the broker
                for delivery in deliveries:
                    self.intake.give_up(delivery)
            else:
                self.deliver(deliveries)

    def _take(self) -> list[Delivery]:
        """A micro-batch, waiting in the broker, once `refill_at` slots of the window are free;
        until then, every 0.25 s, what the broker has at once for the free slots (interactive
        jobs first) or, with the window full, interactive jobs into a reserve beyond it (they
        never wait for long jobs)."""
        with self._lock:
            free = self.window - self._unsettled
        if free < self.refill_at:
            self._slot_freed.wait(INTERACTIVE_POLL_SECONDS)  # set by the settle that frees it
            with self._lock:
                free = self.window - self._unsettled
        self._slot_freed.clear()
        if free >= self.refill_at:
            return self.intake.take(free, TAKE_WAIT_SECONDS)
        if free > 0:
            return self.intake.take(free, 0)
        if free + INTERACTIVE_RESERVE <= 0:
            return self.intake.take(0, 0)  # sends the acks asked for meanwhile
        return self.intake.take(free + INTERACTIVE_RESERVE, 0, interactive_only=True)

    # 2. Claim -------------------------------------------------------------------------------

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Claim a micro-batch of delivered jobs in one UPDATE, first deliveries and
        redeliveries alike, and start them; while draining, all are handed back."""
        if not deliveries:
            return
        with self._lock:
            self._unsettled += len(deliveries)
        if self.drain_deadline is not None:
            for delivery in deliveries:  # their jobs stay queued
                self._settle(delivery, committed=False)
            return
        try:
            claimed = self.writes.write(lambda session: self._claim(
                session, [d.job_id for d in deliveries]), lazy=True)
        except Exception:
            # The jobs stay as they were in the DB: the reaper republishes a queued job whose
            # message is gone and requeues a running one whose holder is gone, so acking here
            # loses nothing and keeps the window open.
            log.exception("claiming %d delivered jobs failed; acking them for the reaper",
                          len(deliveries))
            for delivery in deliveries:
                self._settle(delivery, committed=True)
            return
        jobs = {job.id: job for job in claimed.jobs}
        held = {job.id: job for job in claimed.held}
        runnable = []
        for delivery in deliveries:
            if (job := jobs.pop(delivery.job_id, None)) is not None:
                runnable.append((job, delivery))
            elif (job := held.pop(delivery.job_id, None)) is not None:
                with self._lock:
                    self._suspects.hold(job, delivery)
            else:  # finished, canceled, running elsewhere, or a duplicate
                self._settle(delivery, committed=True)
        self._generate(runnable)
        self._start_next_suspect()

    def _claim(self, session, job_ids: list[str]) -> Claimed:
        return claim_deliveries(
            session, list(dict.fromkeys(job_ids)), model=self.settings.model,
            model_version=self.settings.model_version or None, worker_id=self.worker_id,
            lease_expires_at=lease_expiry(self.settings), is_holder_dead=is_dead_local_worker,
            suspect_after=LOST_DELIVERIES_BEFORE_ISOLATION)

    # 3. Generate ----------------------------------------------------------------------------

    def _generate(self, claimed: list[tuple[Row, Delivery]]) -> None:
        """Hand claimed jobs to the engine (one message for all); `_commit` runs for each when
        the engine is done with it. A job that cannot start is written as it ends here."""
        requests, runs = [], []
        for job, delivery in claimed:
            deadline = (time.monotonic() + (job.deadline_at - utcnow()).total_seconds()
                        if job.deadline_at is not None else None)
            running = RunningJob(job, delivery, deadline)
            if job.attempts > self.settings.job_max_attempts:
                self._end_before_engine(running, JobStatus.FAILED, job_writes.fail(
                    job.id, ErrorCode.WORKER_LOST,
                    f"gave up after {job.attempts - 1} deliveries that did not finish",
                    self.worker_id))
                continue
            try:
                run_hook(self.middleware, "before_job", job)
            except Exception as exc:  # a broken hook fails its job, not the micro-batch
                log.exception("job %s: a before_job hook raised; the job fails", job.id)
                self._end_before_engine(running, JobStatus.FAILED, job_writes.fail(
                    job.id, ErrorCode.INTERNAL,
                    f"worker middleware before_job: {type(exc).__name__}: {exc}",
                    self.worker_id))
                continue
            if deadline is not None and deadline <= time.monotonic():
                self._end_before_engine(running, JobStatus.EXPIRED, job_writes.finish(
                    job.id, JobStatus.EXPIRED, self.worker_id))
                continue
            requests.append(EngineRequest(
                request_id=job.id,
                prompt=job.messages if job.messages is not None else job.prompt or "",
                params=SamplingParams(**job.sampling_params),
                priority=Priority(job.priority).rank, stream=self.streams is not None))
            runs.append(running)
        if not requests:
            return
        with self._lock:
            self._running.update((running.job.id, running) for running in runs)
        if self.streams is not None:
            self.streams.started([(running.job.id, running.job.attempts) for running in runs])
        try:
            futures = self.engine.submit_many(requests)
        except Exception:
            # The engine is unreachable (its process is gone; this worker exits soon): hand
            # the jobs back without spending an attempt, so every delivery settles.
            log.exception("handing %d jobs to the engine failed; handing them back", len(runs))
            with self._lock:
                for running in runs:
                    self._running.pop(running.job.id, None)
            for running in runs:
                self._end_before_engine(running, JobStatus.QUEUED,
                                        job_writes.requeue(running.job.id, self.worker_id))
            return
        # Past its start now (claim, before_job, hand-off): if this worker dies from here on,
        # its jobs are not taken for suspects at their first redelivery (workers.in_flight).
        start_mark = [running.job.id for running in runs]
        for running in runs:
            running.start_mark = start_mark
        self.writes.submit_batched(self._started, start_mark, lazy=True,
                                   within=START_MARK_WAIT_SECONDS)
        for running, future in zip(runs, futures, strict=True):
            future.add_done_callback(partial(self._commit, running))

    # 4. Commit ------------------------------------------------------------------------------

    def _commit(self, running: RunningJob, future: Future[RequestOutput]) -> None:
        """The engine is done with the job (called by the engine process's outcome reader):
        queue its outcome's write; `_ended` runs once it is committed."""
        with self._lock:
            self._running.pop(running.job.id, None)
        if running.start_mark is not None:
            # Its outcome's write makes the mark moot for it: a short job's mark, not written
            # yet, costs no statement (list.remove is atomic, as is the mark's copy of it).
            running.start_mark.remove(running.job.id)
            running.start_mark = None
        write = self._outcome_write(running, future)
        if write is None:  # canceled before it reached the engine: the cancel wrote the outcome
            running.outcome = JobStatus.CANCELED
            self._ended(running, committed=True)
        else:
            self._after_commit(write, running.job.id, partial(self._ended, running))

    def _outcome_write(self, running: RunningJob, future: Future[RequestOutput]) -> Future | None:
        job_id, output = running.job.id, None
        try:
            output = future.result()
        except RequestAborted:  # aborted (cancel, deadline, drain) before it ever ran
            pass
        except ValueError as exc:  # refused by the engine: the request itself is bad
            running.outcome = JobStatus.FAILED
            return self.writes.submit(job_writes.fail(job_id, ErrorCode.INVALID_REQUEST,
                                                      str(exc), self.worker_id))
        except Exception as exc:
            running.outcome = JobStatus.FAILED
            return self.writes.submit(job_writes.fail(
                job_id, ErrorCode.ENGINE_ERROR, f"{type(exc).__name__}: {exc}", self.worker_id))
        if running.stop_reason is StopReason.DRAIN:
            running.outcome = JobStatus.QUEUED
            return self.writes.submit(job_writes.requeue(job_id, self.worker_id))
        if running.stop_reason is StopReason.DEADLINE:
            running.outcome = JobStatus.EXPIRED
            return self.writes.submit(job_writes.finish(job_id, JobStatus.EXPIRED,
                                                        self.worker_id, output))
        if output is None:
            return None
        if output.outputs[0].finish_reason == "abort":
            running.outcome = JobStatus.CANCELED  # canceled while running
        return self.writes.submit_batched(self._outputs, (job_id, job_writes.result_values(
            output, running.job.sampling_params.get("logprobs"))))

    def _end_before_engine(self, running: RunningJob, outcome: JobStatus,
                           write: job_writes.Write) -> None:
        running.outcome = outcome
        self._after_commit(self.writes.submit(write), running.job.id,
                           partial(self._ended, running))

    def _after_commit(self, write: Future, job_id: str, then) -> None:
        """Call `then(committed)` once `write` is done. A write that failed (DB down) hands the
        message back and leaves the job's lease unrenewed: the reaper re-queues the job when
        the lease expires, and the redelivery meanwhile is harmless."""
        def on_done(future: Future) -> None:
            committed = future.exception() is None
            if not committed:
                log.error("job %s: its outcome could not be written", job_id,
                          exc_info=future.exception())
            then(committed)

        write.add_done_callback(on_done)

    def _ended(self, running: RunningJob, committed: bool) -> None:
        if self.streams is not None:
            self.streams.ended(running.job.id)
        try:
            run_hook(self.middleware, "after_job", running.job)
            run_hook(self.middleware, "job_ended", running.job,
                     running.outcome.value if committed else "unwritten")
        finally:
            self._settle(running.delivery, committed)

    # 5. Ack ---------------------------------------------------------------------------------

    def _settle(self, delivery: Delivery, committed: bool) -> None:
        """Ack the message once its job's outcome is committed; without one, hand it back for
        the broker to deliver again. Its window slot is free either way."""
        try:
            if isinstance(delivery.handle, _DirectCall):
                (delivery.handle.done if committed else delivery.handle.failed).set()
            elif committed:
                self.intake.ack(delivery)
            else:
                self.intake.give_up(delivery)
        finally:
            with self._lock:
                self._unsettled -= 1
                free = self.window - self._unsettled
                suspect_done = self._suspects.settled(delivery.job_id)
                waiting_suspects = len(self._suspects) > 0
            if free >= self.refill_at:
                self._slot_freed.set()
        if suspect_done or waiting_suspects:
            self._start_next_suspect()

    # Beside the path: a direct call, suspects, the worker's state for its chores ----------

    def run(self, job_id: str) -> None:
        """Run one job and wait until its outcome is committed (a direct call of the Celery
        task, and tests)."""
        call = _DirectCall()
        self.deliver([Delivery(job_id, call)])
        while not call.done.wait(INTERACTIVE_POLL_SECONDS):
            if call.failed.is_set():
                raise RuntimeError(f"job {job_id}: its outcome could not be written")
            self.enforce_deadlines()

    def _start_next_suspect(self) -> None:
        """Start the next held suspect if no other suspect runs (workers.in_flight), and no
        redelivered job: lost once with a worker already, it is not to die with a poison
        job a second time."""
        with self._lock:
            suspect = None
            if self.drain_deadline is None and not any(
                    running.job.attempts > 1 for running in self._running.values()):
                suspect = self._suspects.next_to_start()
        if suspect is not None:
            start_suspect(*suspect, self.writes, self.worker_id, generate=self._generate,
                          settle=self._settle)

    def running_jobs(self) -> list[RunningJob]:
        with self._lock:
            return list(self._running.values())

    def held_job_ids(self) -> list[str]:
        """The jobs whose leases this worker renews: those it runs and its held suspects."""
        with self._lock:
            return [*self._running, *self._suspects.held_ids()]
