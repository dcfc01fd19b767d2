"""A 202 is never lost, on SQLite too: every connection commits with synchronous=FULL."""

from sqlalchemy import text

from genq import db


def test_every_sqlite_connection_syncs_each_commit_to_disk(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'genq.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
