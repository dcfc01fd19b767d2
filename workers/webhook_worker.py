"""The webhook worker: an I/O-only Celery worker (threads pool, no model) on its own queue,
`genq.webhooks`, which GPU workers never consume; plus the dispatcher thread that feeds it.

Why retries are scheduled in the database, not with Celery countdown/eta: a delivery's next
attempt is `next_attempt_at` on its row. Retries up to 10 h away would sit in the broker as
unacked eta messages, which Redis redelivers after its visibility timeout and which die with a
purged queue; a row cannot be lost. The dispatcher polls due rows every `webhook_poll_seconds`,
leases each one with a fresh token and publishes it; the task acts only if its token is still
the current one, so a duplicate message never sends twice. If a webhook worker dies mid-attempt,
the lease runs out and the next dispatcher round sends the delivery again (same webhook-id:
receivers deduplicate on it, as Standard Webhooks asks).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import Counter
from datetime import timedelta

from celery import Celery
from celery.signals import after_setup_logger
from kombu import Queue
from sqlalchemy import func, or_, select, update

from genq import db
from genq.models import WebhookDelivery, utcnow
from genq.retention import prune
from genq.settings import Settings, get_settings
from genq.webhook_events import DeliveryStatus
from workers.webhook_delivery import deliver, retry_delays

log = logging.getLogger(__name__)

WEBHOOK_QUEUE = "genq.webhooks"
DELIVER_WEBHOOK_TASK = "genq.deliver_webhook"
DISPATCH_BATCH = 200
MIN_ROUND_GAP_SECONDS = 0.01


def make_webhook_celery(settings: Settings) -> Celery:
    app = Celery("genq-webhooks", broker=settings.broker_url or None)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_queues=[Queue(WEBHOOK_QUEUE)],
        task_default_queue=WEBHOOK_QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


app = make_webhook_celery(get_settings())


@after_setup_logger.connect
def _quiet_task_lines(**_) -> None:
    """Celery logs two INFO lines per task (received, succeeded): thousands an hour that no
    operator acts on. Failed deliveries are logged once, as warnings (webhook_delivery)."""
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)


# Set when an attempt ends, so the dispatcher's next round starts at once: the per-URL cap
# then bounds a receiver's deliveries in flight, not its rate (a round a poll let a URL have
# at most webhook_max_in_flight_per_url deliveries a second).
_attempt_ended = threading.Event()


@app.task(name=DELIVER_WEBHOOK_TASK)
def deliver_webhook(delivery_id: str, token: str) -> None:
    try:
        deliver(get_settings(), delivery_id, token)
    finally:
        _attempt_ended.set()


def dispatch_due(settings: Settings, limit: int = DISPATCH_BATCH,
                 celery_app: Celery | None = None) -> int:
    """Lease and publish the deliveries whose next attempt is due; return how many. A URL
    with `webhook_max_in_flight_per_url` attempts leased already gets no more this round: a
    slow receiver holds that many webhook threads at most, never all of them.

    One write transaction leases the whole round, without a disk flush: a lease lost in a
    power failure only leaves its delivery due again. A transaction per delivery queued behind
    the workers' and the API's writes for SQLite's one write lock, a round at a time."""
    now = utcnow()
    # A published delivery not started within this long (worker died, queue backed up) is
    # published again under a new token; the old message then does nothing.
    lease = timedelta(seconds=4 * settings.webhook_timeout_seconds + 60)
    due = (WebhookDelivery.status == DeliveryStatus.PENDING.value,
           WebhookDelivery.next_attempt_at <= now,
           or_(WebhookDelivery.lease_expires_at.is_(None),
               WebhookDelivery.lease_expires_at < now))
    cap = settings.webhook_max_in_flight_per_url
    leased = []
    with db.transaction(settings.database_url_resolved, lazy=True) as session:
        in_flight = Counter(dict(session.execute(
            select(WebhookDelivery.url, func.count()).where(
                WebhookDelivery.status == DeliveryStatus.PENDING.value,
                WebhookDelivery.lease_expires_at >= now)
            .group_by(WebhookDelivery.url)).all()))
        # At most `cap` rows a URL, none of a URL at its cap: a receiver with a backlog of due
        # deliveries (a slow one, retried) must not fill the round and starve the others.
        ranked = select(WebhookDelivery.id, WebhookDelivery.url, WebhookDelivery.next_attempt_at,
                        func.row_number().over(partition_by=WebhookDelivery.url,
                                               order_by=WebhookDelivery.next_attempt_at)
                        .label("rank")).where(*due)
        saturated = [url for url, count in in_flight.items() if count >= cap]
        if saturated:
            ranked = ranked.where(WebhookDelivery.url.not_in(saturated))
        ranked = ranked.subquery()
        due_rows = session.execute(select(ranked.c.id, ranked.c.url).where(ranked.c.rank <= cap)
                                   .order_by(ranked.c.next_attempt_at).limit(limit)).all()
        for delivery_id, url in due_rows:
            if in_flight[url] >= cap:
                continue
            token = secrets.token_hex(16)
            # Another dispatcher (one per webhook worker) may have leased it since the select.
            if session.execute(
                    update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, *due)
                    .values(lease_token=token, lease_expires_at=now + lease)).rowcount == 1:
                leased.append((delivery_id, token))
                in_flight[url] += 1
    for delivery_id, token in leased:  # after the commit: a task finds its token current
        (celery_app or app).send_task(DELIVER_WEBHOOK_TASK, args=[delivery_id, token],
                                      queue=WEBHOOK_QUEUE)
    return len(leased)


def run_dispatcher(settings: Settings, stop: threading.Event,
                   wake: threading.Event = _attempt_ended) -> None:
    """Dispatch due deliveries every `webhook_poll_seconds`, and after an attempt ends (`wake`),
    until `stop` (which sets `wake` too); never raises."""
    while not stop.is_set():
        wake.clear()
        try:
            dispatch_due(settings)
        except Exception:  # DB or broker hiccup: the leases run out, the next round retries
            log.exception("webhook dispatch round failed")
        wake.wait(settings.webhook_poll_seconds)
        stop.wait(MIN_ROUND_GAP_SECONDS)  # attempts ending together share one round


def run_retention_sweep(settings: Settings, stop: threading.Event) -> None:
    """genq.retention.prune every `retention_sweep_seconds` until `stop`; never raises. Here
    because the webhook worker is the one I/O-only process every deployment runs."""
    while not stop.wait(settings.retention_sweep_seconds):
        try:
            prune(settings)
        except Exception:  # a DB hiccup: the next sweep does it
            log.exception("retention sweep failed")


def run_webhook_worker(settings: Settings, concurrency: int | None = None,
                       hostname: str | None = None) -> None:
    """Run the dispatcher thread and the Celery consumer of `genq.webhooks` (blocks)."""
    db.ensure_schema_current(settings.database_url_resolved)
    if not retry_delays(settings):  # a malformed schedule fails here, not at the first retry
        raise ValueError("GENQ_WEBHOOK_RETRY_SCHEDULE needs at least one delay")
    stop = threading.Event()
    threading.Thread(target=run_dispatcher, args=(settings, stop), daemon=True,
                     name="genq-webhook-dispatcher").start()
    threading.Thread(target=run_retention_sweep, args=(settings, stop), daemon=True,
                     name="genq-retention-sweep").start()
    argv = ["worker", "--pool", "threads",
            "--concurrency", str(concurrency or settings.webhook_concurrency),
            "--queues", WEBHOOK_QUEUE, "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    argv += ["--hostname", hostname or "webhooks@%h"]
    try:
        app.worker_main(argv)
    finally:
        stop.set()
        _attempt_ended.set()
