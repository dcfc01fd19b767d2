"""A 202 is never lost, on SQLite too: every connection commits with synchronous=FULL; only the
writes whose loss in a power failure is harmless (a worker's claims, lease renewals, sent
marks) commit lazily, and a group commit is lazy only when all its writes are."""

import time

from sqlalchemy import text

from genq import db
from genq.group_commit import GroupCommitter


def _synchronous(session) -> int:
    return session.execute(text("PRAGMA synchronous")).scalar()


def test_every_sqlite_connection_syncs_each_commit_to_disk(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'genq.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_only_a_lazy_write_skips_the_flush_and_the_next_write_flushes_again(sqlite_url):
    # when a lazy write, then a durable one, run on the same pooled connection
    with db.transaction(sqlite_url, lazy=True) as session:
        lazy = _synchronous(session)
    with db.transaction(sqlite_url) as session:
        durable = _synchronous(session)
    with db.core_transaction(sqlite_url) as connection:  # a submit
        submit = connection.execute(text("PRAGMA synchronous")).scalar()

    # then only the lazy one ran with NORMAL
    assert (lazy, durable, submit) == (1, 2, 2)


def test_a_group_commit_is_lazy_only_when_all_its_writes_are(sqlite_url):
    writes = GroupCommitter(sqlite_url)
    assert writes.write(_synchronous, lazy=True) == 1
    assert writes.write(_synchronous) == 2
    # a lazy write (a claim) waiting together with a durable one (a result) is flushed too
    gate = writes.submit(lambda session: time.sleep(0.3))
    together = [writes.submit(_synchronous, lazy=True), writes.submit(_synchronous)]
    gate.result()
    assert [future.result() for future in together] == [2, 2]


def test_a_lazy_postgres_write_commits_without_waiting_for_the_flush(postgres_url):
    with db.transaction(postgres_url, lazy=True) as session:
        lazy = session.execute(text("SHOW synchronous_commit")).scalar()
    with db.transaction(postgres_url) as session:
        durable = session.execute(text("SHOW synchronous_commit")).scalar()
    assert (lazy, durable) == ("off", "on")
