"""Batch states (OpenAI's names) and the transitions allowed between them, defined once.

validating → in_progress → finalizing → completed; validating → failed (strict mode, unreadable
file); in_progress → finalizing → expired (completion window over); validating | in_progress →
cancelling → cancelled. Each state has a `<state>_at` timestamp column on the batches table.
"""

from __future__ import annotations

from enum import Enum


class BatchStatus(str, Enum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in BATCH_TERMINAL_STATES

    @property
    def timestamp_column(self) -> str | None:
        """The batches column that records when a batch entered this state."""
        return None if self is BatchStatus.VALIDATING else f"{self.value}_at"


BATCH_TERMINAL_STATES = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)

# target state -> the states a batch may move to it from. FINALIZING is entered from
# IN_PROGRESS (all lines done, or the window ended) and from CANCELLING (nothing left running).
BATCH_ALLOWED_SOURCES: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset(),
    BatchStatus.FAILED: frozenset({BatchStatus.VALIDATING}),
    BatchStatus.IN_PROGRESS: frozenset({BatchStatus.VALIDATING}),
    BatchStatus.FINALIZING: frozenset({BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING}),
    BatchStatus.COMPLETED: frozenset({BatchStatus.FINALIZING}),
    BatchStatus.EXPIRED: frozenset({BatchStatus.FINALIZING}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS}),
    BatchStatus.CANCELLED: frozenset({BatchStatus.FINALIZING}),
}


def can_transition_batch(source: BatchStatus, target: BatchStatus) -> bool:
    return source in BATCH_ALLOWED_SOURCES[target]
