"""Group commit and SQLite write transactions, on a real SQLite database file."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, insert, select

from genq import db
from genq.group_commit import GroupCommitter
from genq.models import Tenant


def _tenant_count(url: str) -> int:
    with db.session_factory(url)() as session:
        return session.scalar(select(func.count()).select_from(Tenant))


def test_writes_waiting_together_commit_together_and_a_bad_one_fails_alone(sqlite_url):
    committer = GroupCommitter(sqlite_url)
    gate = threading.Event()
    results: dict[str, object] = {}

    def blocked(session):  # holds the writer so that the next writes queue up as one group
        gate.wait(5)
        session.add(Tenant(name="first"))
        return "first"

    def add(name: str):
        def write(session):
            if name == "bad":
                raise ValueError("this write is broken")
            session.add(Tenant(name=name))
            return name
        return write

    def call(name, write):
        try:
            results[name] = committer.write(write)
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=call, args=("first", blocked))]
    threads[0].start()
    time.sleep(0.1)
    threads += [threading.Thread(target=call, args=(n, add(n))) for n in ("a", "bad", "b")]
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(10)

    assert results["first"] == "first" and results["a"] == "a" and results["b"] == "b"
    assert isinstance(results["bad"], ValueError)
    assert _tenant_count(sqlite_url) == 3


def test_concurrent_sqlite_writers_queue_instead_of_failing_and_readers_do_not_wait(sqlite_url):
    holding = threading.Event()

    def hold_the_write_lock():
        with db.transaction(sqlite_url) as session:
            session.add(Tenant(name="holder"))
            session.flush()
            holding.set()
            time.sleep(0.5)

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    assert holding.wait(5)

    started = time.monotonic()
    assert _tenant_count(sqlite_url) == 0  # a reader sees the last commit, at once
    read_seconds = time.monotonic() - started
    errors: list[Exception] = []

    def write(index: int):
        try:
            with db.transaction(sqlite_url) as session:
                session.add(Tenant(name=f"writer-{index}"))
        except Exception as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for writer in writers:
        writer.start()
    for thread in [holder, *writers]:
        thread.join(30)

    assert read_seconds < 0.25
    assert errors == []
    assert _tenant_count(sqlite_url) == 9


def test_a_core_transaction_holds_the_write_lock_from_its_start_and_commits_whole(sqlite_url):
    # Given a Core transaction (the submit's) that has begun and not written yet
    order: list[str] = []
    begun = threading.Event()

    def core_writer():
        with db.core_transaction(sqlite_url) as connection:
            begun.set()
            time.sleep(0.3)
            connection.execute(insert(Tenant), {"name": "core"})
            order.append("core")

    def orm_writer():
        with db.transaction(sqlite_url) as session:
            session.add(Tenant(name="orm"))
        order.append("orm")

    core = threading.Thread(target=core_writer)
    core.start()
    assert begun.wait(5)

    # When another writer writes meanwhile
    orm = threading.Thread(target=orm_writer)
    orm.start()
    for thread in (core, orm):
        thread.join(30)

    # Then it waited for the Core transaction to commit (both rows are there)
    assert order == ["core", "orm"]
    assert _tenant_count(sqlite_url) == 2


def test_a_core_transaction_rolls_back_whole_on_an_error(sqlite_url):
    with pytest.raises(ValueError), db.core_transaction(sqlite_url) as connection:
        connection.execute(insert(Tenant), {"name": "lost"})
        raise ValueError("the write fails after its first statement")

    assert _tenant_count(sqlite_url) == 0


@pytest.mark.parametrize("count", [1, 600])
def test_published_outbox_rows_are_marked_sent_in_the_background(sqlite_url, count):
    from genq.job_store import enqueue_run_message
    from genq.models import Job, Outbox
    from genq.states import Priority
    from producer.sent_marks import sent_marker

    with db.transaction(sqlite_url) as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        jobs = [Job(tenant_id=tenant.id, model="echo", prompt="x", sampling_params={})
                for _ in range(count)]
        session.add_all(jobs)
        session.flush()
        outbox_ids = []
        for job in jobs:
            row = enqueue_run_message(session, job.id, "echo", Priority.DEFAULT)
            session.flush()
            outbox_ids.append(row.id)

    marker = sent_marker(sqlite_url)
    for outbox_id in outbox_ids:
        marker.mark_sent(outbox_id)

    deadline = time.monotonic() + 5
    while True:
        with db.session_factory(sqlite_url)() as session:
            unsent = session.scalar(select(func.count()).select_from(Outbox)
                                    .where(Outbox.sent_at.is_(None)))
        if unsent == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert unsent == 0


def test_batched_writes_waiting_together_are_applied_in_one_call(sqlite_url):
    from genq.group_commit import BatchedWrite

    committer = GroupCommitter(sqlite_url)
    gate = threading.Event()
    calls: list[list[str]] = []

    def add_all(session, names):
        calls.append(list(names))
        session.add_all(Tenant(name=name) for name in names)
        return [f"added {name}" for name in names]

    kind = BatchedWrite(add_all)
    blocker = committer.submit(lambda session: gate.wait(5))  # queue the rest behind it
    time.sleep(0.1)
    futures = [committer.submit_batched(kind, name) for name in ("a", "b", "c")]
    gate.set()

    assert blocker.result(10) is True
    assert [future.result(10) for future in futures] == ["added a", "added b", "added c"]
    assert calls == [["a", "b", "c"]]
    assert _tenant_count(sqlite_url) == 3


def test_a_failing_batched_write_fails_only_its_own_argument(sqlite_url):
    from genq.group_commit import BatchedWrite

    committer = GroupCommitter(sqlite_url)
    gate = threading.Event()

    def add_all(session, names):
        if "bad" in names:
            raise ValueError("a bad name")
        session.add_all(Tenant(name=name) for name in names)
        return [None] * len(names)

    kind = BatchedWrite(add_all)
    committer.submit(lambda session: gate.wait(5))
    time.sleep(0.1)
    futures = {name: committer.submit_batched(kind, name) for name in ("a", "bad", "b")}
    gate.set()

    assert futures["a"].result(10) is None and futures["b"].result(10) is None
    with pytest.raises(ValueError):
        futures["bad"].result(10)
    assert _tenant_count(sqlite_url) == 2


def test_after_commit_runs_once_per_group_before_its_callers_return(sqlite_url):
    from genq.group_commit import BatchedWrite

    committer = GroupCommitter(sqlite_url)
    gate = threading.Event()
    seen: list[tuple[list[str], list[str], int]] = []

    def add_all(session, names):
        session.add_all(Tenant(name=name) for name in names)
        return [f"added {name}" for name in names]

    def after_commit(names, results):
        seen.append((names, results, _tenant_count(sqlite_url)))  # committed by now
        if "c" in names:
            raise RuntimeError("the broker is down")  # logged: the writes stay committed

    kind = BatchedWrite(add_all, after_commit=after_commit)
    committer.submit(lambda session: gate.wait(5))
    time.sleep(0.1)
    futures = [committer.submit_batched(kind, name) for name in ("a", "b")]
    gate.set()
    assert [future.result(10) for future in futures] == ["added a", "added b"]
    assert seen == [(["a", "b"], ["added a", "added b"], 2)]

    assert committer.submit_batched(kind, "c").result(10) == "added c"
    assert seen[-1] == (["c"], ["added c"], 3)


def test_a_lone_write_batched_commits_in_its_callers_thread(sqlite_url):
    from genq.group_commit import BatchedWrite

    committer = GroupCommitter(sqlite_url)
    threads: list[list[str]] = []

    def add_all(session, names):
        threads.append([threading.current_thread().name, *names])
        session.add_all(Tenant(name=name) for name in names)
        return names

    kind = BatchedWrite(add_all)
    assert committer.write_batched(kind, "alone") == "alone"
    assert threads == [[threading.current_thread().name, "alone"]]

    # while a group commits, the next callers wait for the writer thread, as one group
    gate = threading.Event()
    committer.submit(lambda session: gate.wait(5))
    time.sleep(0.1)
    results: dict[str, str] = {}
    callers = [threading.Thread(target=lambda n=name: results.update(
        {n: committer.write_batched(kind, n)})) for name in ("a", "b", "c")]
    for caller in callers:
        caller.start()
    time.sleep(0.2)
    gate.set()
    for caller in callers:
        caller.join(10)
    assert results == {"a": "a", "b": "b", "c": "c"}
    assert threads[1][0] == "genq-group-commit" and sorted(threads[1][1:]) == ["a", "b", "c"]
    assert _tenant_count(sqlite_url) == 4


def test_a_slow_after_commit_step_does_not_hold_back_the_next_group(sqlite_url):
    # (a submit's publish waiting on a broker that is going down must not stop other submits
    # from committing)
    from genq.group_commit import BatchedWrite

    committer = GroupCommitter(sqlite_url)
    broker_back = threading.Event()

    def add_all(session, names):
        session.add_all(Tenant(name=name) for name in names)
        return names

    def publish(names, _results):
        if "slow" in names:
            broker_back.wait(10)

    kind = BatchedWrite(add_all, after_commit=publish)
    slow = threading.Thread(target=committer.write_batched, args=(kind, "slow"))
    slow.start()
    time.sleep(0.2)  # "slow" is committed, its after-commit step waits

    started = time.monotonic()
    assert committer.write_batched(kind, "fast") == "fast"
    assert time.monotonic() - started < 2 and slow.is_alive()
    broker_back.set()
    slow.join(10)
    assert _tenant_count(sqlite_url) == 2


def test_a_failed_group_is_no_warning(sqlite_url, caplog):
    # (on the submit path a group fails routinely: a tenant at its limit, a key taken)
    from genq.group_commit import BatchedWrite

    committer = GroupCommitter(sqlite_url)
    gate = threading.Event()

    def add_all(session, names):
        if "bad" in names:
            raise ValueError("a bad name")
        session.add_all(Tenant(name=name) for name in names)
        return names

    kind = BatchedWrite(add_all)
    committer.submit(lambda session: gate.wait(5))
    time.sleep(0.1)
    futures = [committer.submit_batched(kind, name) for name in ("a", "bad")]
    with caplog.at_level("INFO", logger="genq.group_commit"):
        gate.set()
        assert futures[0].result(10) == "a"
        with pytest.raises(ValueError):
            futures[1].result(10)
    assert [record.levelname for record in caplog.records] == ["INFO"]
    assert "retrying each alone" in caplog.records[0].getMessage()


def test_a_lone_write_batched_leaves_the_writer_thread_asleep(sqlite_url):
    # (waking it for an empty queue cost a thread switch per submit, and the woken thread
    # could hold the commit lock just as the next submit of the same caller came)
    from genq.group_commit import BatchedWrite

    committer = GroupCommitter(sqlite_url)
    kind = BatchedWrite(lambda session, names: names)
    for name in ("a", "b", "c"):
        assert committer.write_batched(kind, name) == name
        assert not committer._wakeup.is_set()


def test_a_core_committer_writes_on_a_bare_connection_and_a_bad_write_fails_alone(sqlite_url):
    from sqlalchemy import Connection

    from genq.group_commit import BatchedWrite

    committer = GroupCommitter(sqlite_url, core=True)
    seen: list[type] = []

    def add_all(connection, names):
        seen.append(type(connection))
        if "bad" in names:
            raise ValueError("a bad name")
        connection.execute(insert(Tenant), [{"name": name} for name in names])
        return names

    kind = BatchedWrite(add_all)
    gate = threading.Event()
    committer.submit(lambda connection: gate.wait(5))
    time.sleep(0.1)
    futures = {name: committer.submit_batched(kind, name) for name in ("a", "bad", "b")}
    gate.set()

    assert futures["a"].result(10) == "a" and futures["b"].result(10) == "b"
    with pytest.raises(ValueError):
        futures["bad"].result(10)
    assert set(seen) == {Connection}
    assert _tenant_count(sqlite_url) == 2


def test_a_lone_write_commits_in_its_callers_thread(sqlite_url):
    # (a worker's claim: no hand-off to the writer thread and back per micro-batch)
    committer = GroupCommitter(sqlite_url)

    assert committer.write(lambda session: threading.current_thread().name) == (
        threading.current_thread().name)


def test_a_deferred_write_rides_with_the_next_commit_or_goes_alone_when_due(sqlite_url):
    from genq.group_commit import BatchedWrite

    committer = GroupCommitter(sqlite_url)
    sessions: dict[str, int] = {}

    def add_all(session, names):
        sessions.update((name, id(session)) for name in names)
        session.add_all(Tenant(name=name) for name in names)
        return names

    kind = BatchedWrite(add_all)

    # given a write that may wait 5 s for company
    deferred = committer.submit_batched(kind, "deferred", within=5)
    time.sleep(0.2)
    assert not deferred.done()

    # when another write commits, then the deferred one is committed in its transaction
    assert committer.write_batched(kind, "next") == "next"
    assert deferred.result(1) == "deferred" and sessions["deferred"] == sessions["next"]

    # and a deferred write that meets none commits alone once due
    started = time.monotonic()
    assert committer.submit_batched(kind, "alone", within=0.2).result(5) == "alone"
    assert 0.15 < time.monotonic() - started < 2
    assert _tenant_count(sqlite_url) == 3
