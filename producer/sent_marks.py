"""Mark published outbox rows sent, in batches, off the submit path.

Why deferred: marking the row is one more write transaction per submit, as costly as the
submit's own insert, and nothing waits for it. A background thread per process marks every row
published in the last `FLUSH_SECONDS` with one UPDATE. If the process dies before a flush, its
rows stay unsent and the outbox relay publishes them again after `outbox_stale_seconds`: a
duplicate message, which is harmless (claims are conditional, genq.job_store).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Iterable

from sqlalchemy import bindparam, update

from genq import db
from genq.models import Outbox, utcnow

log = logging.getLogger(__name__)

# Far below outbox_stale_seconds (5 s by default): the relay does not republish a row that only
# waits for its mark. At 50 ms a one-thread submitter paid a flush every ten submits or so.
FLUSH_SECONDS = 0.2
MAX_IDS_PER_UPDATE = 500


# Conditional: a relay that published the row too has marked it already. Built once, run on a
# bare connection: a flush through a Session cost a third of a sequential submit's CPU again.
_MARK_SENT = update(Outbox).where(
    Outbox.id.in_(bindparam("outbox_ids", expanding=True)), Outbox.sent_at.is_(None),
).values(sent_at=bindparam("sent_at"), publish_attempts=Outbox.publish_attempts + 1)


def mark_outbox_sent(database_url: str, outbox_ids: list[int]) -> None:
    """Mark published rows sent now, MAX_IDS_PER_UPDATE per statement."""
    for start in range(0, len(outbox_ids), MAX_IDS_PER_UPDATE):
        chunk = outbox_ids[start:start + MAX_IDS_PER_UPDATE]
        # Lazy: a mark lost in a power failure only republishes its row (a harmless duplicate).
        with db.core_transaction(database_url, lazy=True) as connection:
            connection.execute(_MARK_SENT, {"outbox_ids": chunk, "sent_at": utcnow()})


class SentMarker:
    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self._published: list[int] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genq-outbox-marks", daemon=True)
        self._thread.start()
        atexit.register(self._flush_at_exit)

    def mark_sent(self, outbox_id: int) -> None:
        self.mark_all_sent([outbox_id])

    def mark_all_sent(self, outbox_ids: Iterable[int]) -> None:
        with self._lock:
            self._published.extend(outbox_ids)
        self._wakeup.set()

    def flush(self) -> None:
        with self._lock:
            ids, self._published = self._published, []
        mark_outbox_sent(self.url, ids)

    def _flush_at_exit(self) -> None:
        try:
            self.flush()
        except Exception:  # the DB may be gone at exit; the relay republishes what is unmarked
            log.warning("could not mark published outbox rows sent at exit", exc_info=True)

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            time.sleep(FLUSH_SECONDS)  # gather the rows of the next few submits
            try:
                self.flush()
            except Exception:  # the rows stay unsent; the relay republishes them later
                log.exception("could not mark published outbox rows sent")


_markers: dict[tuple[int, str], SentMarker] = {}
_markers_lock = threading.Lock()


def sent_marker(database_url: str) -> SentMarker:
    """One marker per process and database (keyed by pid: a forked child starts its own)."""
    key = (os.getpid(), database_url)
    with _markers_lock:
        if key not in _markers:
            _markers[key] = SentMarker(database_url)
        return _markers[key]
