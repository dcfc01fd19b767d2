"""Publish running jobs' events (token deltas, ended) to their logs on the broker's
Redis (genq.job_events), for the API's SSE streams. One thread sends whatever is pending in one
pipelined round trip, so a step's deltas for every running job cost one, never one per token."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from engine.outputs import RequestOutput
from genq.job_events import END_OFFSET, EventId, EventKind, JobEvent, JobEventLog

log = logging.getLogger(__name__)

# After a failed send (Redis down), events are dropped for this long: streams then fall back on
# the job row (status and final output), and the engine's pass is never held up.
PAUSE_AFTER_FAILURE_SECONDS = 5.0


@dataclass
class _Progress:
    attempt: int
    num_tokens: int = 0
    num_chars: int = 0


class JobStreams:
    def __init__(self, event_log: JobEventLog) -> None:
        self.event_log = event_log
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._jobs: dict[str, _Progress] = {}
        self._pending: list[tuple[str, JobEvent]] = []
        self._paused_until = 0.0
        self._thread = threading.Thread(target=self._run, name="genq-job-streams", daemon=True)
        self._thread.start()

    def started(self, jobs: list[tuple[str, int]]) -> None:
        """(job id, attempt) of jobs handed to the engine: their deltas count from 0."""
        with self._lock:
            for job_id, attempt in jobs:
                self._jobs[job_id] = _Progress(attempt)

    def add_deltas(self, deltas: list[RequestOutput]) -> None:
        """One engine step's deltas (called by the engine's outcome reader)."""
        with self._lock:
            for delta in deltas:
                progress = self._jobs.get(delta.request_id)
                if progress is None:
                    continue
                completion = delta.outputs[0]
                progress.num_tokens += len(completion.token_ids)
                # As the job row stores it (workers.job_writes.result_values).
                text = completion.text.replace("\x00", "\ufffd")
                progress.num_chars += len(text)
                self._pending.append((delta.request_id, JobEvent(
                    EventId(progress.attempt, progress.num_tokens), EventKind.DELTA, text,
                    tuple(completion.token_ids), progress.num_chars)))
        self._wakeup.set()

    def ended(self, job_id: str) -> None:
        """The job's outcome is committed: readers take the rest from its row."""
        with self._lock:
            progress = self._jobs.pop(job_id, None)
            if progress is not None:
                self._pending.append((job_id, JobEvent(
                    EventId(progress.attempt, END_OFFSET), EventKind.ENDED,
                    chars=progress.num_chars)))
        self._wakeup.set()

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            with self._lock:
                pending, self._pending = self._pending, []
            if not pending or time.monotonic() < self._paused_until:
                continue
            try:
                self.event_log.append(pending)
            except Exception:
                self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_SECONDS
                log.warning("sending %d job events failed; streams fall back on the job rows "
                            "for %.0f s", len(pending), PAUSE_AFTER_FAILURE_SECONDS,
                            exc_info=True)
