"""One webhook attempt: claim the delivery, check and resolve its URL, sign, POST (15 s in all,
no redirects) to the address that was checked, log the attempt, then decide what comes next.

The 15 s (`webhook_timeout_seconds`) is a wall-clock deadline for the whole attempt: urllib3's
timeouts bound each socket read, so a receiver trickling a byte a second would hold the thread
for ever; at the deadline the socket is shut down under the read.

2xx: delivered. 410 Gone: failed, and a registered endpoint is disabled. 429/503 with
Retry-After: retried after that long. Any other answer, a timeout or a refused connection:
retried on the settings' schedule (with jitter) until it runs out. A refused address fails.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from sqlalchemy import update
from sqlalchemy.orm import Session
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, Timeout
from urllib3.connection import HTTPConnection, HTTPSConnection

from genq import db
from genq.models import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    WebhookSecret,
    utcnow,
)
from genq.settings import Settings
from genq.webhook_events import DeliveryStatus
from genq.webhook_signing import signed_headers
from genq.webhook_urls import WebhookTarget, WebhookUrlError, resolve

log = logging.getLogger(__name__)

RESPONSE_EXCERPT_BYTES = 1024
MAX_ERROR_CHARS = 500
# A Retry-After beyond this is treated as this: a typo on the receiver must not park an event.
MAX_RETRY_AFTER_SECONDS = 36000
# A claimed attempt is presumed dead (its worker died) after twice the HTTP timeout plus this;
# the dispatcher then sends the delivery again, with the same webhook-id.
CLAIM_MARGIN_SECONDS = 5
USER_AGENT = "genq-webhooks/1"


@dataclass(frozen=True)
class Outcome:
    """What one attempt got back. `status_code` is None when no HTTP answer came."""

    status_code: int | None
    latency_ms: int
    error: str | None = None
    response_excerpt: str | None = None
    retry_after: float | None = None
    refused: bool = False  # the SSRF guard refused the address: retrying will not help

    @property
    def is_delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def retry_delays(settings: Settings) -> list[float]:
    """Seconds to wait before each attempt; its length is the number of attempts."""
    return [float(part) for part in settings.webhook_retry_schedule.split(",") if part.strip()]


def next_delay(settings: Settings, attempts_made: int, retry_after: float | None) -> float | None:
    """Seconds until the next attempt after `attempts_made` failed ones; None: give up."""
    delays = retry_delays(settings)
    if attempts_made >= len(delays):
        return None
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_SECONDS)
    jitter = settings.webhook_retry_jitter
    return delays[attempts_made] * random.uniform(1 - jitter, 1 + jitter)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """RFC 9110 Retry-After: delay-seconds or an HTTP-date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now).total_seconds())


class _Deadline:
    """Shuts a connection's socket down at a wall-clock deadline, whatever it is doing."""

    def __init__(self, seconds: float) -> None:
        self.connection: HTTPConnection | None = None
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()

    def _cut(self) -> None:
        sock = getattr(self.connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass


def _pool_with_deadline(pool_class: type[HTTPConnectionPool], deadline: _Deadline):
    """A pool class whose connections register with `deadline` as they are made."""
    base = HTTPSConnection if pool_class is HTTPSConnectionPool else HTTPConnection

    class Connection(base):
        def connect(self) -> None:
            deadline.connection = self
            super().connect()

    return type("DeadlinePool", (pool_class,), {"ConnectionCls": Connection})


def post(target: WebhookTarget, headers: dict[str, str], body: bytes,
         timeout_seconds: float) -> Outcome:
    """POST to the checked address with the URL's host in `Host` (and SNI and certificate
    checks for https), done within `timeout_seconds` of wall-clock time. Never follows
    redirects, never raises."""
    pool_class, tls = ((HTTPSConnectionPool, {"server_hostname": target.host,
                                              "assert_hostname": target.host})
                       if target.scheme == "https" else (HTTPConnectionPool, {}))
    started = time.monotonic()
    try:
        with _Deadline(timeout_seconds) as deadline, _pool_with_deadline(pool_class, deadline)(
                target.address, target.port, maxsize=1, retries=False,
                timeout=Timeout(total=timeout_seconds), **tls) as pool:
            response = pool.urlopen(
                "POST", target.path, body=body, redirect=False, retries=False,
                assert_same_host=False, preload_content=False,
                headers={**headers, "Host": target.host_header, "User-Agent": USER_AGENT,
                         "Content-Type": "application/json"},
            )
            excerpt = response.read(RESPONSE_EXCERPT_BYTES)
            response.release_conn()
        if time.monotonic() - started >= timeout_seconds:  # cut short by the deadline
            raise TimeoutError(f"no full answer within {timeout_seconds:g} s")
    except Exception as exc:  # every transport failure is an attempt that may be retried
        return Outcome(None, _elapsed_ms(started), error=f"{type(exc).__name__}: {exc}"
                       [:MAX_ERROR_CHARS])
    retry_after = None
    if response.status in (429, 503):
        retry_after = parse_retry_after(response.headers.get("Retry-After"), utcnow())
    return Outcome(response.status, _elapsed_ms(started),
                   error=None if 200 <= response.status < 300 else f"HTTP {response.status}",
                   response_excerpt=excerpt.decode("utf-8", errors="replace"),
                   retry_after=retry_after)


def deliver(settings: Settings, delivery_id: str, token: str) -> None:
    """Make the next attempt of a delivery dispatched with `token` (a stale dispatch, whose
    token was replaced by a newer one, does nothing)."""
    url = settings.database_url_resolved
    now = utcnow()
    # Unflushed: a claim lost in a power failure only lets the lease run out and the delivery
    # be sent again (same webhook-id, which receivers deduplicate on).
    with db.transaction(url, lazy=True) as session:
        claimed = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_token == token,
                   WebhookDelivery.status == DeliveryStatus.PENDING.value)
            .values(lease_expires_at=now + timedelta(
                seconds=2 * settings.webhook_timeout_seconds + CLAIM_MARGIN_SECONDS))
        ).rowcount == 1
        if not claimed:
            return
        delivery = session.get(WebhookDelivery, delivery_id)
        event = session.get(WebhookEvent, delivery.event_id)
        if delivery.endpoint_id is not None:
            endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
            if not endpoint.enabled:
                _finish(session, delivery, token, DeliveryStatus.FAILED,
                        f"endpoint disabled: {endpoint.disabled_reason}")
                return
            secrets = endpoint.active_secrets(now)
        else:
            # Submit refuses a webhook_url without it, and a secret is never deleted.
            secrets = session.get(WebhookSecret, delivery.tenant_id).active_secrets(now)

    outcome = attempt(settings, delivery.url, event, secrets)
    record(settings, delivery, token, now, outcome)


def attempt(settings: Settings, url: str, event: WebhookEvent, secrets: list[str]) -> Outcome:
    try:
        target = resolve(url, settings.webhook_allow_private)
    except WebhookUrlError as exc:
        return Outcome(None, 0, error=f"refused: {exc}", refused=True)
    headers = signed_headers(event.id, utcnow(), event.payload, secrets)
    return post(target, headers, event.payload.encode(), settings.webhook_timeout_seconds)


def record(settings: Settings, delivery: WebhookDelivery, token: str, started_at: datetime,
           outcome: Outcome) -> None:
    """Log the attempt and move the delivery on, in one transaction."""
    attempts_made = delivery.attempts + 1
    with db.transaction(settings.database_url_resolved) as session:
        session.add(WebhookAttempt(
            delivery_id=delivery.id, number=attempts_made, started_at=started_at,
            status_code=outcome.status_code, latency_ms=outcome.latency_ms, error=outcome.error,
            response_excerpt=outcome.response_excerpt,
        ))
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery.id)
                        .values(attempts=attempts_made))
        failure = None  # why the delivery failed for good: the one line an operator sees
        if outcome.is_delivered:
            _finish(session, delivery, token, DeliveryStatus.DELIVERED, None)
        elif outcome.refused:
            failure = outcome.error
        elif outcome.status_code == 410:
            failure = "410 Gone: stopped"
            if delivery.endpoint_id is not None:
                disable_endpoint(session, delivery.endpoint_id, "the receiver answered 410 Gone")
        else:
            delay = next_delay(settings, attempts_made, outcome.retry_after)
            if delay is None:
                failure = f"gave up after {attempts_made} attempts: {outcome.error}"
            else:
                _release(session, delivery, token, delay, outcome.error)
        if failure is not None:
            _finish(session, delivery, token, DeliveryStatus.FAILED, failure)
    log.debug("webhook %s attempt %d to %s: %s", delivery.id, attempts_made, delivery.url,
              outcome.status_code or outcome.error)
    if failure is not None:
        log.warning("webhook delivery %s to %s failed: %s", delivery.id, delivery.url, failure)


def disable_endpoint(session: Session, endpoint_id: str, reason: str) -> None:
    """Disable an endpoint and end its pending deliveries (they stay in the log)."""
    session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id)
                    .values(enabled=False, disabled_reason=reason))
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id,
               WebhookDelivery.status == DeliveryStatus.PENDING.value)
        .values(status=DeliveryStatus.FAILED.value, last_error=f"endpoint disabled: {reason}",
                finished_at=utcnow(), lease_token=None, lease_expires_at=None)
    )


def _finish(session: Session, delivery: WebhookDelivery, token: str, status: DeliveryStatus,
            error: str | None) -> None:
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.lease_token == token)
        .values(status=status.value, last_error=error, finished_at=utcnow(), lease_token=None,
                lease_expires_at=None)
    )


def _release(session: Session, delivery: WebhookDelivery, token: str, delay: float,
             error: str | None) -> None:
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.lease_token == token)
        .values(next_attempt_at=utcnow() + timedelta(seconds=delay), last_error=error,
                lease_token=None, lease_expires_at=None)
    )


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
