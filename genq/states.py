"""Job states and the transitions allowed between them, defined once for the whole project."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


class Priority(str, Enum):
    """Priority classes, highest first. `rank` is the engine's request priority (lower first)."""

    INTERACTIVE = "interactive"
    DEFAULT = "default"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        return list(Priority).index(self)


TERMINAL_STATES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.EXPIRED}
)

# target state -> the states a job may move to it from. A worker re-claims a RUNNING job whose
# lease expired (its previous worker died), hence RUNNING -> RUNNING; QUEUED -> QUEUED is a
# requeue by the reaper or a drain.
ALLOWED_SOURCES: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING}),
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
    JobStatus.SUCCEEDED: frozenset({JobStatus.RUNNING}),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
    JobStatus.CANCELED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
    JobStatus.EXPIRED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
}


def can_transition(source: JobStatus, target: JobStatus) -> bool:
    return source in ALLOWED_SOURCES[target]
