"""Group commit: the DB writes of many threads (a worker's jobs, an API process's single
submits) in one transaction at a time, one writer lock wait and one disk flush for them all."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from genq import db

log = logging.getLogger(__name__)

T = TypeVar("T")
# What a write is applied to: an ORM Session, or a Core Connection in a `core` committer.
Transaction = Session | Connection
MAX_WRITES_PER_COMMIT = 256


@dataclass(frozen=True, eq=False)
class BatchedWrite:
    """A kind of write applied to all its waiting arguments at once: `apply_all(session,
    arguments)` returns one result per argument, in their order."""

    apply_all: Callable[[Transaction, list[Any]], list[Any]]
    # `after_commit(arguments, results)`: once the writes are committed, before their callers
    # return; what it raises is logged, never handed to them (their writes are committed).
    after_commit: Callable[[list[Any], list[Any]], None] | None = None


@dataclass
class _Write:
    apply: Callable[[Transaction], Any] | None = None
    kind: BatchedWrite | None = None
    argument: Any = None
    lazy: bool = False
    due: float = 0.0  # time.monotonic() by which it commits, with other writes or alone
    future: Future = field(default_factory=Future)

    def apply_alone(self, session: Transaction) -> Any:
        if self.kind is not None:
            return self.kind.apply_all(session, [self.argument])[0]
        return self.apply(session)


class GroupCommitter:
    """A worker runs up to `worker_concurrency` jobs at once, and each job writes twice (claim,
    result). Thirty-two threads each opening their own write transaction spend their time queuing
    for the database's write lock (SQLite's busy handler sleeps for milliseconds between tries), and
    every commit pays its own round trip. Here one writer thread takes every write that is waiting
    and commits them together, so N jobs that finish in one engine step cost one commit. An idle
    worker pays nothing extra: a lone write is committed as soon as it arrives.

    A write is a function of the session, or an argument of a `BatchedWrite`: the writes of one kind
    waiting together are applied by one call (the outputs of jobs that finished together are one
    UPDATE), so a group's SQL cost grows with its kinds of writes, not its number of jobs. If one
    write of a group raises, the group rolls back and each write is retried in a transaction of its
    own, so only the bad one sees its exception. A group of lazy writes alone (claims) commits
    without a disk flush (genq.db.LAZY_OPTION); one durable write makes its group durable. A kind's
    `after_commit` runs once per committed group, before its callers return and while the next group
    commits (the submit path publishes the group's jobs there, in one pipelined round trip).
    """

    def __init__(self, database_url: str, *, core: bool = False) -> None:
        """`core`: writes get a bare Core Connection, not an ORM Session (db.core_transaction:
        half the CPU of a transaction, for writes that are Core statements alone)."""
        self.url = database_url
        self._transaction = db.core_transaction if core else db.transaction
        self._waiting: deque[_Write] = deque()
        self._deferred: deque[_Write] = deque()  # join the next group, or go alone when due
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._sleeps_until = float("inf")  # when the writer thread's wait times out
        self._committing = threading.Lock()  # held by whoever commits a group
        self._thread = threading.Thread(target=self._run, name="genq-group-commit", daemon=True)
        self._thread.start()

    def write(self, apply: Callable[[Transaction], T], *, lazy: bool = False) -> T:
        """Run `apply(session)` in a committed transaction (shared with other writes) and
        return its result; raise what it raised, or the commit's error. `lazy`: its loss in a
        power failure is harmless, so it needs no disk flush of its own. Committed in the
        caller's thread while no group is being committed (see `write_batched`)."""
        return self._write_here(_Write(apply=apply, lazy=lazy))

    def submit(self, apply: Callable[[Transaction], T], *, lazy: bool = False) -> Future[T]:
        """`write` without waiting: the Future resolves once the write is committed."""
        return self._enqueue(_Write(apply=apply, lazy=lazy))

    def submit_batched(self, kind: BatchedWrite, argument: Any, *, lazy: bool = False,
                       within: float = 0.0) -> Future:
        """Apply `kind` to `argument`, together with the other waiting arguments of that kind;
        the Future resolves with this argument's result once committed (or its error).
        `within`: it may wait up to this many seconds for another write to share its commit
        (a worker's start marks ride with its results: one transaction per job, not two)."""
        if within <= 0:
            return self._enqueue(_Write(kind=kind, argument=argument, lazy=lazy))
        item = _Write(kind=kind, argument=argument, lazy=lazy, due=time.monotonic() + within)
        with self._lock:
            self._deferred.append(item)
            wake = item.due < self._sleeps_until
            if wake:
                self._sleeps_until = item.due
        if wake:  # the writer thread would sleep past its due time: it sets a new timeout
            self._wakeup.set()
        return item.future

    def write_batched(self, kind: BatchedWrite, argument: Any) -> Any:
        """`submit_batched` and wait for its result. While no group is being committed the
        caller commits its group itself: a lone write pays no hand-off to the writer thread
        and back (two thread wake-ups, each a scheduler wait on a busy machine)."""
        return self._write_here(_Write(kind=kind, argument=argument))

    def _write_here(self, item: _Write) -> Any:
        with self._lock:
            self._waiting.append(item)
        while not item.future.done() and self._commit_next_group(blocking=False):
            pass
        with self._lock:
            left_waiting = bool(self._waiting)
        if left_waiting:  # writes queued meanwhile (this one too, if it lost) go to the thread
            self._wakeup.set()
        return item.future.result()

    def _enqueue(self, item: _Write) -> Future:
        with self._lock:
            self._waiting.append(item)
        self._wakeup.set()
        return item.future

    def _run(self) -> None:
        while True:
            with self._lock:
                due = min((item.due for item in self._deferred), default=None)
                self._sleeps_until = float("inf") if due is None else due
            self._wakeup.wait(None if due is None else max(0.0, due - time.monotonic()))
            self._wakeup.clear()
            while self._commit_next_group():
                pass

    def _commit_next_group(self, *, blocking: bool = True) -> bool:
        """Commit the waiting writes as one group under the commit lock, then run their
        after-commit steps and answer their callers outside it, so that the next group commits
        meanwhile. False when none waited (or, not `blocking`, another commit was running)."""
        if not self._committing.acquire(blocking=blocking):
            return False
        try:
            with self._lock:
                group = self._next_group()
            outcomes = self._commit_group(group) if group else []
        finally:
            self._committing.release()
        _settle(group, outcomes)
        return bool(group)

    def _next_group(self) -> list[_Write]:
        """The waiting writes, after the deferred ones: those join any group, and go alone
        once one is due."""
        if not self._waiting and not any(item.due <= time.monotonic()
                                         for item in self._deferred):
            return []
        group = []
        for queue in (self._deferred, self._waiting):
            while queue and len(group) < MAX_WRITES_PER_COMMIT:
                group.append(queue.popleft())
        return group

    def _commit_group(self, group: list[_Write]) -> list[tuple[BaseException | None, Any]]:
        """Each write's (error, result): the group in one transaction, or each alone if that
        failed."""
        if len(group) > 1:
            try:
                with self._transaction(self.url,
                                       lazy=all(item.lazy for item in group)) as session:
                    results = _apply_group(session, group)
            except Exception as exc:
                # No traceback: the failing write's own caller gets its error, and on the submit
                # path this is routine (a tenant at its limit, an idempotency key taken).
                log.info("a group of %d writes failed (%s: %s); retrying each alone",
                         len(group), type(exc).__name__, exc)
            else:
                return [(None, result) for result in results]
        return [self._commit_alone(item) for item in group]

    def _commit_alone(self, item: _Write) -> tuple[BaseException | None, Any]:
        try:
            with self._transaction(self.url, lazy=item.lazy) as session:
                result = item.apply_alone(session)
        except BaseException as exc:  # handed to the waiting thread, which decides
            return exc, None
        return None, result


def _settle(group: list[_Write], outcomes: list[tuple[BaseException | None, Any]]) -> None:
    """Run each kind's `after_commit` once for its committed writes, then answer the callers."""
    committed: dict[BatchedWrite, tuple[list[Any], list[Any]]] = {}
    for item, (error, result) in zip(group, outcomes, strict=True):
        if error is None and item.kind is not None and item.kind.after_commit is not None:
            arguments, results = committed.setdefault(item.kind, ([], []))
            arguments.append(item.argument)
            results.append(result)
    for kind, (arguments, results) in committed.items():
        try:
            kind.after_commit(arguments, results)
        except Exception:  # the writes are committed; their callers must learn that
            log.exception("after-commit step of %d write(s) failed", len(arguments))
    for item, (error, result) in zip(group, outcomes, strict=True):
        if error is None:
            item.future.set_result(result)
        else:
            item.future.set_exception(error)


def _apply_group(session: Transaction, group: list[_Write]) -> list[Any]:
    """Apply each plain write, then each batched kind once for all its arguments; the results
    in the group's order."""
    results: list[Any] = [None] * len(group)
    batches: dict[BatchedWrite, list[int]] = {}
    for index, item in enumerate(group):
        if item.kind is None:
            results[index] = item.apply(session)
        else:
            batches.setdefault(item.kind, []).append(index)
    for kind, indexes in batches.items():
        batch_results = kind.apply_all(session, [group[index].argument for index in indexes])
        for index, result in zip(indexes, batch_results, strict=True):
            results[index] = result
    return results
