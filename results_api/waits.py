"""Bounded waits for a job to finish (`Prefer: wait`, synchronous completions), per API process.

A wait holds one of gunicorn's request threads. So that waits can never take them all (and
`/healthz`, `/readyz` and every other tenant with them), each wait needs a slot: at most
`max_waits_per_tenant` per tenant and `api_threads - api_threads_kept_free` in all. Without a
slot `Prefer: wait` is ignored (202 at once, as RFC 7240 allows) and a completion is a 429.

Waiting is cheap for the database: one watcher thread polls every waited job in one query per
tick and wakes the waiters whose job finished, instead of each waiter polling on its own.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from flask import current_app
from sqlalchemy import select

from genq import db
from genq.errors import ErrorCode, GenqError
from genq.models import Job
from genq.settings import Settings
from genq.states import TERMINAL_STATES
from producer.jobs import get_job

WAIT_POLL_SECONDS = 0.1
_FINISHED = [state.value for state in TERMINAL_STATES]


class WaitSlots:
    """Counts of the waits in progress, per tenant and in all (one object per API process)."""

    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant, self.total = per_tenant, max(1, total)
        self._lock = threading.Lock()
        self._by_tenant: Counter[str] = Counter()

    def try_take(self, tenant_id: str) -> bool:
        with self._lock:
            if (self._by_tenant[tenant_id] >= self.per_tenant
                    or sum(self._by_tenant.values()) >= self.total):
                return False
            self._by_tenant[tenant_id] += 1
            return True

    def give_back(self, tenant_id: str) -> None:
        with self._lock:
            self._by_tenant[tenant_id] -= 1
            if not self._by_tenant[tenant_id]:
                del self._by_tenant[tenant_id]


class JobWatcher:
    """One thread that tells waiters when their job reached a terminal state."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._lock = threading.Lock()
        self._waiters: dict[str, list[threading.Event]] = {}
        self._thread: threading.Thread | None = None

    def wait(self, job_id: str, seconds: float) -> None:
        """Return once the job is finished or `seconds` have passed."""
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(job_id, []).append(event)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="genq-job-watcher")
                self._thread.start()
        try:
            event.wait(seconds)
        finally:
            with self._lock:
                events = self._waiters.get(job_id, [])
                if event in events:
                    events.remove(event)
                if not events:
                    self._waiters.pop(job_id, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                job_ids = list(self._waiters)
                if not job_ids:
                    self._thread = None
                    return
            try:
                with db.session_factory(self.database_url)() as session:
                    finished = session.scalars(select(Job.id).where(
                        Job.id.in_(job_ids), Job.status.in_(_FINISHED))).all()
            except Exception:  # a DB hiccup: the waiters time out or the next tick sees it
                finished = []
            with self._lock:
                for job_id in finished:
                    for event in self._waiters.get(job_id, []):
                        event.set()
            time.sleep(WAIT_POLL_SECONDS)


def init_app(app, settings: Settings) -> None:
    app.extensions["genq_wait_slots"] = WaitSlots(
        settings.max_waits_per_tenant, settings.api_threads - settings.api_threads_kept_free)
    app.extensions["genq_job_watcher"] = JobWatcher(settings.database_url_resolved)


@contextmanager
def wait_slot(tenant_id: str) -> Iterator[bool]:
    """A slot for one wait of this tenant: yields False when none is free (do not wait)."""
    slots: WaitSlots = current_app.extensions["genq_wait_slots"]
    taken = slots.try_take(tenant_id)
    try:
        yield taken
    finally:
        if taken:
            slots.give_back(tenant_id)


@contextmanager
def required_wait_slot(tenant_id: str) -> Iterator[None]:
    """As wait_slot, for a call that cannot answer without waiting: 429 without a slot."""
    with wait_slot(tenant_id) as taken:
        if not taken:
            raise GenqError(ErrorCode.RATE_LIMITED,
                            "too many calls of this tenant are waiting for their jobs; retry "
                            "later, or submit to /v1/jobs and poll",
                            headers={"Retry-After": "1"})
        yield


def wait_for_job(settings: Settings, tenant_id: str, job: Job, seconds: float) -> Job:
    """The job once finished, or as it is after `seconds`. Call inside a wait slot."""
    if job.status in _FINISHED:
        return job
    current_app.extensions["genq_job_watcher"].wait(job.id, seconds)
    return get_job(settings, tenant_id, job.id)
