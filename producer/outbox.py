"""The outbox relay: publishes outbox rows that were not marked sent (the broker was down at
submit, or the API process died between commit and publish). Runs inside the worker process."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import select

from genq import db
from genq.job_store import RUN_JOB_OUTBOX_KIND
from genq.models import Outbox, utcnow
from genq.settings import Settings
from producer.job_rows import OutboxMessage
from producer.publisher import RunMessage
from producer.sent_marks import mark_outbox_sent
from producer.submit import publish_outbox_rows

log = logging.getLogger(__name__)


def relay_pending(settings: Settings, limit: int = 500) -> int:
    """Publish up to `limit` unsent rows older than `outbox_stale_seconds`; return how many.

    The age threshold leaves fresh rows to the API's own publish right after its commit. The
    first failed publish ends the round: the broker is down, the next round tries again.
    """
    cutoff = utcnow() - timedelta(seconds=settings.outbox_stale_seconds)
    with db.session_factory(settings.database_url_resolved)() as session:
        pending = [
            OutboxMessage(outbox_id, RunMessage(job_id, queue, share_level))
            for outbox_id, job_id, queue, share_level in session.execute(
                select(Outbox.id, Outbox.job_id, Outbox.queue, Outbox.share_level)
                .where(Outbox.kind == RUN_JOB_OUTBOX_KIND, Outbox.sent_at.is_(None),
                       Outbox.created_at <= cutoff)
                .order_by(Outbox.id)
                .limit(limit)
            )
        ]
    published = []
    for row in pending:
        if not publish_outbox_rows(settings, [row]):
            break
        published.append(row.outbox_id)
    if published:
        mark_outbox_sent(settings.database_url_resolved, published)
        log.info("outbox relay published %d job message(s)", len(published))
    return len(published)


def run_relay(settings: Settings, stop: threading.Event) -> None:
    """Relay every `outbox_relay_interval_seconds` until `stop` is set; never raises."""
    while not stop.is_set():
        try:
            relay_pending(settings)
        except Exception:  # a DB hiccup must not end the relay; the next round retries
            log.exception("outbox relay round failed")
        stop.wait(settings.outbox_relay_interval_seconds)
