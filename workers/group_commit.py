"""Group commit: the DB writes of all of a worker's job threads, in one transaction at a time.

Why: a worker runs up to `worker_concurrency` jobs at once, and each job writes twice (claim,
result). Thirty-two threads each opening their own write transaction spend their time queuing
for the database's write lock (SQLite's busy handler sleeps for milliseconds between tries),
and every commit pays its own round trip. Here one writer thread takes every write that is
waiting and commits them together, so N jobs that finish in one engine step cost one commit.
An idle worker pays nothing extra: a lone write is committed as soon as it arrives.

A write is a function of the session. If one write of a group raises, the group rolls back and
each write is retried in a transaction of its own, so only the bad one sees its exception.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from genq import db

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_WRITES_PER_COMMIT = 256


@dataclass
class _Write:
    apply: Callable[[Session], Any]
    future: Future = field(default_factory=Future)


class GroupCommitter:
    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self._waiting: deque[_Write] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genq-group-commit", daemon=True)
        self._thread.start()

    def write(self, apply: Callable[[Session], T]) -> T:
        """Run `apply(session)` in a committed transaction (shared with other writes) and
        return its result; raise what it raised, or the commit's error."""
        item = _Write(apply)
        with self._lock:
            self._waiting.append(item)
        self._wakeup.set()
        return item.future.result()

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            while group := self._take_group():
                self._commit_group(group)

    def _take_group(self) -> list[_Write]:
        with self._lock:
            count = min(len(self._waiting), MAX_WRITES_PER_COMMIT)
            return [self._waiting.popleft() for _ in range(count)]

    def _commit_group(self, group: list[_Write]) -> None:
        if len(group) > 1:
            try:
                with db.transaction(self.url) as session:
                    results = [item.apply(session) for item in group]
            except Exception:
                log.warning("a group of %d writes failed; retrying each alone", len(group),
                            exc_info=True)
            else:
                for item, result in zip(group, results, strict=True):
                    item.future.set_result(result)
                return
        for item in group:
            self._commit_alone(item)

    def _commit_alone(self, item: _Write) -> None:
        try:
            with db.transaction(self.url) as session:
                result = item.apply(session)
        except BaseException as exc:  # handed to the waiting job thread, which decides
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)
