"""Micro-batches of job messages. On RabbitMQ, messages are dropped here one by one as Celery's
consumer thread receives them, and one thread hands everything that arrived meanwhile to the
JobRunner as one batch (one claim UPDATE for all of them). On Redis each round of the fetcher
(workers.redis_fetcher) is a micro-batch already: `deliver_now` hands it to the JobRunner on
the fetcher's thread, one thread hop less on every job's way to the engine.

Why not Celery's pool: a task per job would hold a thread for the whole generation, and each
message would pay Celery's request, pool and tracing machinery. On RabbitMQ genq's run_job
task has a custom strategy (workers.tasks) that passes the raw message here; Celery still
reserves messages up to the prefetch window, redelivers unacked ones, and acks on its consumer
thread when `ack` is called.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from workers.job_runner import Delivery, JobRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobMessage:
    """A job message: its decoded payload, its ack, and what to do instead when its job's
    outcome could not be written (nothing, by default: it stays unacked)."""

    payload: object
    ack: Callable[[], None]
    give_up: Callable[[], None] = lambda: None


class MicroBatcher:
    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self._received: deque[JobMessage] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="genq-micro-batch", daemon=True)
        self._thread.start()

    def receive(self, message: JobMessage) -> None:
        """Called on Celery's consumer thread: only queues the message."""
        with self._lock:
            self._received.append(message)
        self._wakeup.set()

    def is_idle(self) -> bool:
        with self._lock:
            return not self._received and not self._busy

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            while batch := self._take():
                try:
                    deliver_now(self.runner, batch)
                finally:
                    with self._lock:
                        self._busy = False

    def _take(self) -> list[JobMessage]:
        with self._lock:
            batch, self._received = list(self._received), deque()
            self._busy = bool(batch)
        return batch


def deliver_now(runner: JobRunner, messages: list[JobMessage]) -> None:
    """Hand a micro-batch of messages to the runner on this thread; never raises (the calling
    thread must live on for later messages)."""
    try:
        runner.deliver([d for d in map(_delivery, messages) if d is not None])
    except Exception:
        log.exception("handing %d messages to the runner failed", len(messages))


def _delivery(message: JobMessage) -> Delivery | None:
    """The job id from a Celery protocol-2 body `[args, kwargs, embed]`; a message that is not
    a run_job call is acked and dropped (it would fail the same way on any worker)."""
    try:
        args, _kwargs, _embed = message.payload
        job_id = args[0]
        if not isinstance(job_id, str):
            raise TypeError(f"job id {job_id!r} is not a string")
    except (TypeError, ValueError, IndexError) as exc:
        log.error("dropping a malformed run_job message %r: %s", message.payload, exc)
        message.ack()
        return None
    return Delivery(job_id, message.ack, message.give_up)
