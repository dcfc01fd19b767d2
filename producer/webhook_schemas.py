"""Request and response models of the webhook API (endpoints, secrets, delivery log)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from genq.job_view import unix_seconds
from genq.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookSecret
from genq.webhook_events import WebhookEventName
from producer.schemas import WebhookUrl, stored_text

MAX_LIST_LIMIT = 100


class EndpointRequest(BaseModel):
    """Body of `POST /v1/webhook-endpoints`."""

    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl
    events: Annotated[list[WebhookEventName], Field(min_length=1)] | None = Field(
        None, description="Default: the terminal states (succeeded, failed, canceled, expired).")
    description: stored_text(max_length=500) | None = None


class EndpointUpdate(BaseModel):
    """Body of `PATCH /v1/webhook-endpoints/{id}`: enable or disable it."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool


class EndpointResponse(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    disabled_reason: str | None
    created_at: int
    secret: str | None = Field(None, description="Only in the answer that created or rotated it.")

    @classmethod
    def from_endpoint(cls, endpoint: WebhookEndpoint, show_secret: bool = False
                      ) -> EndpointResponse:
        return cls(id=endpoint.id, url=endpoint.url, events=endpoint.events,
                   description=endpoint.description, enabled=endpoint.enabled,
                   disabled_reason=endpoint.disabled_reason,
                   created_at=unix_seconds(endpoint.created_at),
                   secret=endpoint.secret if show_secret else None)


class EndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EndpointResponse]


class SecretResponse(BaseModel):
    """The tenant's secret for per-job `webhook_url` callbacks, shown once."""

    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str
    previous_secret_expires_at: int | None

    @classmethod
    def from_secret(cls, secret: WebhookSecret) -> SecretResponse:
        return cls(secret=secret.secret,
                   previous_secret_expires_at=unix_seconds(secret.previous_secret_expires_at))


class AttemptResponse(BaseModel):
    number: int
    started_at: int
    status_code: int | None
    latency_ms: int
    error: str | None
    response_excerpt: str | None

    @classmethod
    def from_attempt(cls, attempt: WebhookAttempt) -> AttemptResponse:
        return cls(number=attempt.number, started_at=unix_seconds(attempt.started_at),
                   status_code=attempt.status_code, latency_ms=attempt.latency_ms,
                   error=attempt.error, response_excerpt=attempt.response_excerpt)


class DeliveryResponse(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_id: str = Field(description="The `webhook-id` header: the same on retries and replays.")
    event_type: str
    job_id: str
    endpoint_id: str | None
    url: str
    status: Literal["pending", "delivered", "failed"]
    next_attempt_at: int | None
    last_error: str | None
    replay_of: str | None
    created_at: int
    finished_at: int | None
    attempts: list[AttemptResponse]

    @classmethod
    def from_delivery(cls, delivery: WebhookDelivery, event_type: str,
                      attempts: list[WebhookAttempt]) -> DeliveryResponse:
        return cls(
            id=delivery.id, event_id=delivery.event_id, event_type=event_type,
            job_id=delivery.job_id, endpoint_id=delivery.endpoint_id, url=delivery.url,
            status=delivery.status,
            next_attempt_at=unix_seconds(delivery.next_attempt_at) if delivery.status == "pending"
            else None,
            last_error=delivery.last_error, replay_of=delivery.replay_of,
            created_at=unix_seconds(delivery.created_at),
            finished_at=unix_seconds(delivery.finished_at),
            attempts=[AttemptResponse.from_attempt(attempt) for attempt in attempts],
        )


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryResponse]
    has_more: bool
