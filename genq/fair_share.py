"""Fair share among tenants inside a priority class: a job's share level grows with its tenant's
backlog in that class and model, and the broker serves lower levels first (genq.queues).

Measured once, at submit, in the transaction that inserts the job, and stored on the outbox row,
so every (re)publish of that message carries the same level.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, bindparam, func, literal_column, select

from genq.models import Job
from genq.states import JobStatus, Priority

# Backlog (jobs already queued) from which a tenant's next job drops one level. Three levels for
# each of three classes fit the brokers' ten message priorities (genq.queues). Below 10 queued a
# tenant never yields; from 100 on it is a bulk submitter, and a tenant with a handful of jobs
# should not wait behind its whole backlog.
BACKLOG_THRESHOLDS = (10, 100)
NUM_SHARE_LEVELS = len(BACKLOG_THRESHOLDS) + 1
# The count stops here: enough to pick the last level, so a tenant with 50,000 queued jobs costs
# a 100-entry index scan per submit, not a 50,000-entry one.
BACKLOG_COUNT_LIMIT = BACKLOG_THRESHOLDS[-1]


def level_for_backlog(backlog: int) -> int:
    """0 for a tenant with little queued, up to NUM_SHARE_LEVELS - 1 for a large backlog."""
    return sum(backlog >= threshold for threshold in BACKLOG_THRESHOLDS)


# The ORDER BY is for PostgreSQL's planner: with a LIMIT and many matching rows it would rather
# scan the table for the first 100, which finds the backlog, the newest rows, last. Ordered by
# the last column of ix_jobs_tenant_status_model_priority, only that index gives the rows
# without a sort, so the planner takes it (an index-only scan of 100 rows). Built once: it runs
# on every submit, and on SQLite building it costs more than running it.
_COUNT_BACKLOG = select(func.count()).select_from(
    select(literal_column("1")).where(
        Job.tenant_id == bindparam("tenant_id"), Job.status == JobStatus.QUEUED.value,
        Job.model == bindparam("model"), Job.priority == bindparam("priority"),
    ).order_by(Job.created_at.desc()).limit(BACKLOG_COUNT_LIMIT).subquery())


def share_level(connection: Connection, tenant_id: str, model: str, priority: Priority) -> int:
    """The share level of a new job: from the tenant's queued jobs of the same model and class
    (batch lines included: they are that tenant's backlog in the batch class too)."""
    return share_levels(connection, tenant_id, [(model, priority)])[0]


def share_levels(connection: Connection, tenant_id: str,
                 new_jobs: Sequence[tuple[str, Priority]]) -> list[int]:
    """The share levels of new jobs (model, class) submitted together, in order: each backlog
    is counted once, and each job adds one to its backlog for the jobs after it."""
    backlogs: dict[tuple[str, Priority], int] = {}
    levels = []
    for model, priority in new_jobs:
        key = (model, priority)
        if key not in backlogs:
            backlogs[key] = connection.scalar(
                _COUNT_BACKLOG,
                {"tenant_id": tenant_id, "model": model, "priority": priority.value})
        levels.append(level_for_backlog(backlogs[key]))
        backlogs[key] += 1
    return levels
