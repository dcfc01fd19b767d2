"""The webhook API's operations: per-job URL checks at submit, the tenant's signing secret,
endpoints (create, list, enable/disable, rotate, delete), the delivery log and replays.
Another tenant's endpoint or delivery does not exist (404)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from genq import db
from genq.errors import ErrorCode, GenqError
from genq.limits import check_cap, lock_tenant
from genq.models import (
    Job,
    SigningSecrets,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    WebhookSecret,
    utcnow,
)
from genq.settings import Settings
from genq.webhook_events import DEFAULT_EVENTS
from genq.webhook_signing import new_secret
from genq.webhook_urls import WebhookUrlError, parse_webhook_url
from producer.schemas import JobRequest
from producer.webhook_schemas import (
    MAX_LIST_LIMIT,
    DeliveryList,
    DeliveryResponse,
    EndpointRequest,
    EndpointResponse,
    SecretResponse,
)


def check_job_webhook(settings: Settings, tenant_id: str, request: JobRequest) -> None:
    """422 on `webhook_url` when it is refused or the tenant has no signing secret yet."""
    if request.webhook_url is None:
        if request.webhook_events is not None:
            raise GenqError(ErrorCode.INVALID_REQUEST, "webhook_events needs a webhook_url",
                            param="webhook_events")
        return
    check_url(settings, request.webhook_url, param="webhook_url")
    with db.session_factory(settings.database_url_resolved)() as session:
        has_secret = session.get(WebhookSecret, tenant_id) is not None
    if not has_secret:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        "create the signing secret for job webhooks first: "
                        "POST /v1/webhook-secret", param="webhook_url")


def check_url(settings: Settings, url: str, param: str) -> None:
    try:
        parse_webhook_url(url, settings.webhook_allow_private)
    except WebhookUrlError as exc:
        raise GenqError(ErrorCode.INVALID_REQUEST, f"{param}: {exc}", param=param) from None


def rotate_tenant_secret(settings: Settings, tenant_id: str) -> SecretResponse:
    """Create the tenant's job-webhook secret, or replace it keeping the old one in grace."""
    with db.transaction(settings.database_url_resolved) as session:
        current = session.get(WebhookSecret, tenant_id)
        if current is None:
            current = WebhookSecret(tenant_id=tenant_id, secret=new_secret())
            session.add(current)
        else:
            _rotate(settings, current)
    return SecretResponse.from_secret(current)


def create_endpoint(settings: Settings, tenant_id: str,
                    request: EndpointRequest) -> EndpointResponse:
    check_url(settings, request.url, param="url")
    endpoint = WebhookEndpoint(tenant_id=tenant_id, url=request.url,
                               events=request.events or DEFAULT_EVENTS,
                               description=request.description, enabled=True,
                               secret=new_secret())
    with db.transaction(settings.database_url_resolved) as session:
        lock_tenant(session.connection(), tenant_id)
        count = session.scalar(select(func.count()).select_from(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.deleted_at.is_(None)))
        check_cap(count, 1, settings.max_webhook_endpoints_per_tenant, "webhook endpoints",
                  "delete one you no longer need")
        session.add(endpoint)
    return EndpointResponse.from_endpoint(endpoint, show_secret=True)


def list_endpoints(settings: Settings, tenant_id: str) -> list[EndpointResponse]:
    with db.session_factory(settings.database_url_resolved)() as session:
        endpoints = session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.deleted_at.is_(None))
            .order_by(WebhookEndpoint.id)
        ).all()
    return [EndpointResponse.from_endpoint(endpoint) for endpoint in endpoints]


def get_endpoint(settings: Settings, tenant_id: str, endpoint_id: str) -> EndpointResponse:
    with db.session_factory(settings.database_url_resolved)() as session:
        return EndpointResponse.from_endpoint(_endpoint(session, tenant_id, endpoint_id))


def set_endpoint_enabled(settings: Settings, tenant_id: str, endpoint_id: str,
                         enabled: bool) -> EndpointResponse:
    with db.transaction(settings.database_url_resolved) as session:
        endpoint = _endpoint(session, tenant_id, endpoint_id)
        endpoint.enabled = enabled
        endpoint.disabled_reason = None if enabled else "disabled through the API"
    return EndpointResponse.from_endpoint(endpoint)


def rotate_endpoint_secret(settings: Settings, tenant_id: str,
                           endpoint_id: str) -> EndpointResponse:
    with db.transaction(settings.database_url_resolved) as session:
        endpoint = _endpoint(session, tenant_id, endpoint_id)
        _rotate(settings, endpoint)
    return EndpointResponse.from_endpoint(endpoint, show_secret=True)


def delete_endpoint(settings: Settings, tenant_id: str, endpoint_id: str) -> None:
    """Soft delete: the endpoint stops receiving and disappears from the API at once."""
    with db.transaction(settings.database_url_resolved) as session:
        endpoint = _endpoint(session, tenant_id, endpoint_id)
        endpoint.deleted_at = utcnow()
        endpoint.enabled = False
        endpoint.disabled_reason = "deleted"


def job_deliveries(settings: Settings, tenant_id: str, job_id: str,
                   limit: int = MAX_LIST_LIMIT) -> DeliveryList:
    with db.session_factory(settings.database_url_resolved)() as session:
        job = session.get(Job, job_id)
        if job is None or job.tenant_id != tenant_id:
            raise GenqError(ErrorCode.NOT_FOUND, f"no job with id {job_id!r}", param="id")
        return _deliveries(session, WebhookDelivery.job_id == job_id, limit)


def endpoint_deliveries(settings: Settings, tenant_id: str, endpoint_id: str,
                        limit: int = MAX_LIST_LIMIT) -> DeliveryList:
    with db.session_factory(settings.database_url_resolved)() as session:
        _endpoint(session, tenant_id, endpoint_id)
        return _deliveries(session, WebhookDelivery.endpoint_id == endpoint_id, limit)


def get_delivery(settings: Settings, tenant_id: str, delivery_id: str) -> DeliveryResponse:
    with db.session_factory(settings.database_url_resolved)() as session:
        return _delivery_response(session, _delivery(session, tenant_id, delivery_id))


def replay_delivery(settings: Settings, tenant_id: str, delivery_id: str) -> DeliveryResponse:
    """Send a delivery's event to its target again: a new delivery, the same `webhook-id`."""
    with db.transaction(settings.database_url_resolved) as session:
        lock_tenant(session.connection(), tenant_id)
        replays = session.scalar(select(func.count()).select_from(WebhookDelivery).where(
            WebhookDelivery.tenant_id == tenant_id, WebhookDelivery.replay_of.is_not(None),
            WebhookDelivery.created_at > utcnow() - timedelta(minutes=1)))
        check_cap(replays, 1, settings.webhook_replays_per_minute, "replays in the last minute",
                  "retry in a minute")
        original = _delivery(session, tenant_id, delivery_id)
        if original.endpoint_id is not None:
            endpoint = session.get(WebhookEndpoint, original.endpoint_id)
            if endpoint is None or not endpoint.enabled:
                raise GenqError(ErrorCode.CONFLICT,
                                f"endpoint {original.endpoint_id!r} is disabled or deleted; "
                                "enable it before replaying", param="id")
        replay = WebhookDelivery(event_id=original.event_id, tenant_id=tenant_id,
                                 job_id=original.job_id, endpoint_id=original.endpoint_id,
                                 url=original.url, replay_of=original.id,
                                 next_attempt_at=utcnow())
        session.add(replay)
        session.flush()
        return _delivery_response(session, replay)


def _rotate(settings: Settings, holder: SigningSecrets) -> None:
    holder.previous_secret = holder.secret
    holder.previous_secret_expires_at = utcnow() + timedelta(
        seconds=settings.webhook_secret_grace_seconds)
    holder.secret = new_secret()


def _endpoint(session: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.tenant_id != tenant_id or endpoint.deleted_at is not None:
        raise GenqError(ErrorCode.NOT_FOUND, f"no webhook endpoint with id {endpoint_id!r}",
                        param="id")
    return endpoint


def _delivery(session: Session, tenant_id: str, delivery_id: str) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.tenant_id != tenant_id:
        raise GenqError(ErrorCode.NOT_FOUND, f"no delivery with id {delivery_id!r}", param="id")
    return delivery


def _deliveries(session: Session, condition, limit: int) -> DeliveryList:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise GenqError(ErrorCode.INVALID_REQUEST,
                        f"limit must be between 1 and {MAX_LIST_LIMIT}", param="limit")
    deliveries = session.scalars(
        select(WebhookDelivery).where(condition).order_by(WebhookDelivery.id.desc())
        .limit(limit + 1)
    ).all()
    return DeliveryList(data=[_delivery_response(session, d) for d in deliveries[:limit]],
                        has_more=len(deliveries) > limit)


def _delivery_response(session: Session, delivery: WebhookDelivery) -> DeliveryResponse:
    event_type = session.scalar(select(WebhookEvent.type)
                                .where(WebhookEvent.id == delivery.event_id))
    attempts = session.scalars(
        select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery.id)
        .order_by(WebhookAttempt.number)
    ).all()
    return DeliveryResponse.from_delivery(delivery, event_type, list(attempts))
