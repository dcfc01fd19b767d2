"""Broker names shared by the submit side (producer) and the consume side (workers)."""

from __future__ import annotations

from genq.states import Priority

RUN_JOB_TASK = "genq.run_job"


def queue_for(priority: Priority, model: str | None = None) -> str:
    """One queue per priority class. Workers consume them in strict priority order."""
    return f"genq.{priority.value}"


ALL_QUEUES = [queue_for(p) for p in Priority]  # highest priority first
