"""The worker's heartbeat row (genq.models.Worker): who serves which model, how busy, how
recently heard from. Read by the dashboard and /metrics; a silent worker's row just goes stale."""

from __future__ import annotations

import logging
import socket

from sqlalchemy import delete, update

from genq import db
from genq.models import Worker, utcnow
from genq.settings import Settings

log = logging.getLogger(__name__)


def beat(settings: Settings, worker_id: str, num_running: int) -> None:
    url, now = settings.database_url_resolved, utcnow()
    with db.transaction(url) as session:
        updated = session.execute(
            update(Worker).where(Worker.id == worker_id)
            .values(num_running=num_running, last_heartbeat_at=now)
        ).rowcount
        if not updated:  # first beat of this process (worker ids are host:pid, never shared)
            session.add(Worker(
                id=worker_id, hostname=socket.gethostname(), model=settings.model,
                model_version=settings.model_version or None,
                max_batch_size=settings.worker_concurrency, num_running=num_running,
                metrics_port=settings.worker_metrics_port or None, started_at=now,
                last_heartbeat_at=now,
            ))


def leave(settings: Settings, worker_id: str) -> None:
    """Remove the row at a clean stop; a failure only leaves it to go stale."""
    try:
        with db.transaction(settings.database_url_resolved) as session:
            session.execute(delete(Worker).where(Worker.id == worker_id))
    except Exception:  # shutting down: the row expires on its own after worker_live_seconds
        log.warning("could not remove the heartbeat row of %s", worker_id, exc_info=True)
