"""Webhook events, recorded in the transaction of the job state change they announce: one event
row (the exact body, its `webhook-id`) and one delivery row per interested target.

Cheap when nobody listens: the job's own `webhook_url`/`webhook_events` come back from the
transition's UPDATE … RETURNING, and the tenant's endpoints cost one indexed query.

The payload's `data` is the job exactly as the API shows it (genq.job_view.JobResponse).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator
from sqlalchemy import bindparam, exists, literal_column, select
from sqlalchemy.orm import Session

from genq.job_view import JobResponse
from genq.models import Job, WebhookDelivery, WebhookEndpoint, WebhookEvent, new_id, utcnow
from genq.states import TERMINAL_STATES, JobStatus

# The job states a webhook can announce (`queued` is the submit's own answer, not an event).
EVENT_STATES = (JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED,
                JobStatus.EXPIRED)
DEFAULT_EVENTS = [state.value for state in EVENT_STATES if state in TERMINAL_STATES]
EVENT_PREFIX = "job."


def _short_event_name(name: Any) -> Any:
    """`job.succeeded` (the name in the payload's `type`) means `succeeded`."""
    return name.removeprefix(EVENT_PREFIX) if isinstance(name, str) else name


# An event a webhook asks for, by its short name or as the payload names it; stored short.
WebhookEventName = Annotated[Literal["running", "succeeded", "failed", "canceled", "expired"],
                             BeforeValidator(_short_event_name)]


class DeliveryStatus(str, Enum):
    PENDING = "pending"  # waiting for its next attempt (or in flight)
    DELIVERED = "delivered"  # a 2xx answer
    FAILED = "failed"  # retries exhausted, 410 Gone, a refused address or a disabled endpoint


@dataclass(frozen=True)
class Listeners:
    """What the transition's UPDATE … RETURNING tells about who may want this change."""

    tenant_id: str
    webhook_url: str | None
    webhook_events: list[str] | None
    # Whether the tenant has an enabled endpoint, where the UPDATE returned it (a worker's
    # claims and results: TENANT_HAS_ENDPOINTS); None: looked up here.
    has_endpoints: bool | None = None


def event_type(state: JobStatus) -> str:
    return f"{EVENT_PREFIX}{state.value}"


def record_job_event(session: Session, job_id: str, state: JobStatus,
                     listeners: Listeners) -> WebhookEvent | None:
    """Add the event and its deliveries for a job that just moved to `state`, if anyone listens."""
    if state not in EVENT_STATES:
        return None
    targets: list[tuple[str, str | None]] = []  # (url, endpoint id)
    if listeners.webhook_url and state.value in (listeners.webhook_events or DEFAULT_EVENTS):
        targets.append((listeners.webhook_url, None))
    endpoints = (_enabled_endpoints(session, listeners.tenant_id)
                 if listeners.has_endpoints is not False else [])
    targets += [(url, endpoint_id) for endpoint_id, url, events in endpoints
                if state.value in events]
    if not targets:
        return None

    job = session.get(Job, job_id, populate_existing=True)
    now = utcnow()
    event = WebhookEvent(id=new_id("msg"), tenant_id=listeners.tenant_id, job_id=job_id,
                         type=event_type(state), created_at=now)
    event.payload = json.dumps({
        "type": event.type,
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "data": JobResponse.from_job(job).model_dump(mode="json"),
    }, separators=(",", ":"), ensure_ascii=False)
    session.add(event)
    session.flush()  # the deliveries reference the event; no ORM relationship orders them
    session.add_all(
        WebhookDelivery(event_id=event.id, tenant_id=listeners.tenant_id, job_id=job_id,
                        endpoint_id=endpoint_id, url=url, next_attempt_at=now)
        for url, endpoint_id in targets
    )
    return event


def _enabled_endpoints(session: Session, tenant_id: str) -> list:
    """The tenant's enabled endpoints, read once per transaction: a worker's group commit
    (genq/group_commit.py) records events for many jobs of one tenant in one transaction."""
    cache = session.info.setdefault("genq_webhook_endpoints", {})
    if tenant_id not in cache:
        cache[tenant_id] = session.execute(_ENABLED_ENDPOINTS, {"tenant_id": tenant_id}).all()
    return cache[tenant_id]


# For the RETURNING of an UPDATE of jobs: its tenant's endpoints then cost a query only when
# there are some (a worker's claim and result each saved one per micro-batch). The job's
# column is named in full: SQLite's RETURNING names columns bare, and a bare `tenant_id` in
# the subquery would be the endpoint's own.
TENANT_HAS_ENDPOINTS = (
    exists().where(WebhookEndpoint.tenant_id == literal_column("jobs.tenant_id"),
                   WebhookEndpoint.enabled).label("has_endpoints"))

# Prebuilt: a worker runs it in every transaction that moves a job.
_ENABLED_ENDPOINTS = (
    select(WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.events)
    .where(WebhookEndpoint.tenant_id == bindparam("tenant_id"), WebhookEndpoint.enabled)
)
