"""Bounded waits and streams (`Prefer: wait`, completions, SSE), per API process: each needs a
slot, at most `max_waits_per_tenant` per tenant and `max_open_waits` in all. Without one
`Prefer: wait` is ignored (202 at once, as RFC 7240 allows) and a completion or stream is a 429.

Under the ASGI server a wait holds no thread (results_api.stream_hub waits); under a plain WSGI
server it holds its request thread, and JobWatcher's one thread polls all waited jobs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from flask import current_app
from sqlalchemy import select

from genq import db
from genq.errors import ErrorCode, GenqError
from genq.models import Job
from genq.settings import Settings
from genq.states import TERMINAL_STATES

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
    app.extensions["genq_wait_slots"] = WaitSlots(settings.max_waits_per_tenant,
                                                  settings.max_open_waits)
    app.extensions["genq_job_watcher"] = JobWatcher(settings.database_url_resolved)


def take_wait_slot(tenant_id: str) -> Callable[[], None] | None:
    """One of the tenant's wait slots: its release, or None when none is free."""
    slots: WaitSlots = current_app.extensions["genq_wait_slots"]
    if not slots.try_take(tenant_id):
        return None
    released: list[bool] = []

    def release() -> None:
        if not released:  # once, however many paths end the wait
            released.append(True)
            slots.give_back(tenant_id)

    return release


def take_required_wait_slot(tenant_id: str, what: str = "waits") -> Callable[[], None]:
    """As take_wait_slot, for a call that cannot answer without waiting: 429 without a slot."""
    release = take_wait_slot(tenant_id)
    if release is None:
        raise GenqError(ErrorCode.RATE_LIMITED,
                        f"too many {what} of this tenant are open; retry later, or submit to "
                        "/v1/jobs and poll", headers={"Retry-After": "1"})
    return release
