"""What a worker holds between claim and ack: its running jobs (and why one was stopped) and its
suspects (see Suspects), which start one at a time beside the others."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from functools import partial

from sqlalchemy import Row

from genq.group_commit import GroupCommitter
from genq.job_store import count_attempt
from genq.states import JobStatus, Priority
from workers.intake import Delivery

log = logging.getLogger(__name__)

# A redelivered job runs in the micro-batch like any other: one lost delivery is what any job of
# a worker that died has. Two kinds are suspects instead (genq.job_store.is_suspect):
# - the jobs of a micro-batch the worker was starting when it died (claimed, not yet handed
#   to its engine: a poison job kills its worker there, in before_job or the hand-off), from
#   their first loss: all of them, since which one was to blame is unknown;
# - a job lost this often, wherever it was (e.g. one that kills its worker mid-decode).
LOST_DELIVERIES_BEFORE_ISOLATION = 2


class StopReason(Enum):
    DEADLINE = "deadline"
    DRAIN = "drain"


@dataclass
class RunningJob:
    job: Row  # the jobs table's row as the claim left it
    delivery: Delivery
    deadline: float | None  # time.monotonic() at which the job expires
    stop_reason: StopReason | None = None
    outcome: JobStatus = JobStatus.SUCCEEDED  # the state its outcome write moves it to
    # Its micro-batch's start mark (the job ids it clears), while it may not be written yet.
    start_mark: list[str] | None = None


class Suspects:
    """Suspects (see LOST_DELIVERIES_BEFORE_ISOLATION), held (claimed without spending an
    attempt) and started one at a time, interactive ones first, then oldest first, beside the
    worker's other jobs, each once the one before has settled: never two suspects together, so
    a poison job among them takes down no other suspect, and nothing else ever waits for them
    (fresh and interactive jobs keep their micro-batches). Not thread-safe: the worker calls
    it under its lock."""

    def __init__(self) -> None:
        self._held: deque[tuple[Row, Delivery]] = deque()
        self._started: str | None = None  # the job id of the suspect running, if any

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, job: Row, delivery: Delivery) -> None:
        if job.priority == Priority.INTERACTIVE.value:
            self._held.appendleft((job, delivery))
        else:
            self._held.append((job, delivery))

    def next_to_start(self) -> tuple[Row, Delivery] | None:
        """The oldest held suspect, when no suspect runs (it is then the one running)."""
        if self._started is not None or not self._held:
            return None
        job, delivery = self._held.popleft()
        self._started = job.id
        return job, delivery

    def settled(self, job_id: str) -> bool:
        """A delivery settled: True if it was the running suspect's (the next may start)."""
        if job_id != self._started:
            return False
        self._started = None
        return True

    def release_all(self) -> list[tuple[Row, Delivery]]:
        """Every held suspect, no longer held (a drain hands them back)."""
        held, self._held = list(self._held), deque()
        return held

    def held_ids(self) -> list[str]:
        return [job.id for job, _delivery in self._held]


def start_suspect(job: Row, delivery: Delivery, writes: GroupCommitter, worker_id: str, *,
                  generate: Callable[[list[tuple[Row, Delivery]]], None],
                  settle: Callable[[Delivery, bool], None]) -> None:
    """Spend the suspect's attempt, then `generate` it beside the worker's other jobs. Its
    attempt is spent only now: a suspect that waited in a worker that died comes back as it
    was. If it is what kills workers, it takes down no other suspect, and no job that had been
    lost with it before."""
    log.warning("job %s was lost with a worker %s: it starts as the only suspect", job.id,
                "that died starting it" if job.is_starting else f"{job.attempts} times")

    def counted(future: Future) -> None:
        try:
            started = future.result()
        except Exception:
            log.exception("job %s: starting it failed; its message goes back", job.id)
            settle(delivery, False)
            return
        if started is None:  # canceled while it waited
            settle(delivery, True)
        else:
            generate([(started, delivery)])

    writes.submit(partial(count_attempt, job_id=job.id, worker_id=worker_id),
                  lazy=True).add_done_callback(counted)
