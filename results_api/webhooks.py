"""The webhook routes: the tenant's job-webhook secret, endpoints, the delivery log, replays."""

from __future__ import annotations

from typing import TypeVar

from flask import Blueprint, Response, jsonify, request
from pydantic import BaseModel, ValidationError

from genq.errors import ErrorCode, GenqError
from producer import webhooks
from producer.webhook_schemas import (
    MAX_LIST_LIMIT,
    EndpointList,
    EndpointRequest,
    EndpointUpdate,
)
from results_api.context import authenticate, current_settings, current_tenant_id, limit_arg

bp = Blueprint("webhooks", __name__, url_prefix="/v1")
Model = TypeVar("Model", bound=BaseModel)


@bp.before_request
def _authenticate() -> None:
    authenticate()


@bp.post("/webhook-secret")
def rotate_secret() -> tuple[Response, int]:
    return _json(webhooks.rotate_tenant_secret(current_settings(), current_tenant_id()), 201)


@bp.post("/webhook-endpoints")
def create_endpoint() -> tuple[Response, int]:
    body = _body(EndpointRequest)
    return _json(webhooks.create_endpoint(current_settings(), current_tenant_id(), body), 201)


@bp.get("/webhook-endpoints")
def list_endpoints() -> tuple[Response, int]:
    endpoints = webhooks.list_endpoints(current_settings(), current_tenant_id())
    return _json(EndpointList(data=endpoints))


@bp.get("/webhook-endpoints/<endpoint_id>")
def read_endpoint(endpoint_id: str) -> tuple[Response, int]:
    return _json(webhooks.get_endpoint(current_settings(), current_tenant_id(), endpoint_id))


@bp.patch("/webhook-endpoints/<endpoint_id>")
def update_endpoint(endpoint_id: str) -> tuple[Response, int]:
    body = _body(EndpointUpdate)
    return _json(webhooks.set_endpoint_enabled(current_settings(), current_tenant_id(),
                                               endpoint_id, body.enabled))


@bp.post("/webhook-endpoints/<endpoint_id>/rotate-secret")
def rotate_endpoint_secret(endpoint_id: str) -> tuple[Response, int]:
    return _json(webhooks.rotate_endpoint_secret(current_settings(), current_tenant_id(),
                                                 endpoint_id))


@bp.delete("/webhook-endpoints/<endpoint_id>")
def delete_endpoint(endpoint_id: str) -> tuple[Response, int]:
    webhooks.delete_endpoint(current_settings(), current_tenant_id(), endpoint_id)
    return jsonify({"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}), 200


@bp.get("/webhook-endpoints/<endpoint_id>/deliveries")
def endpoint_deliveries(endpoint_id: str) -> tuple[Response, int]:
    return _json(webhooks.endpoint_deliveries(current_settings(), current_tenant_id(),
                                              endpoint_id, limit_arg(MAX_LIST_LIMIT)))


@bp.get("/jobs/<job_id>/deliveries")
def job_deliveries(job_id: str) -> tuple[Response, int]:
    return _json(webhooks.job_deliveries(current_settings(), current_tenant_id(), job_id,
                                         limit_arg(MAX_LIST_LIMIT)))


@bp.get("/deliveries/<delivery_id>")
def read_delivery(delivery_id: str) -> tuple[Response, int]:
    return _json(webhooks.get_delivery(current_settings(), current_tenant_id(), delivery_id))


@bp.post("/deliveries/<delivery_id>/replay")
def replay_delivery(delivery_id: str) -> tuple[Response, int]:
    return _json(webhooks.replay_delivery(current_settings(), current_tenant_id(), delivery_id),
                 202)


def _json(model: BaseModel, status: int = 200) -> tuple[Response, int]:
    return jsonify(model.model_dump(mode="json")), status


def _body(model: type[Model]) -> Model:
    if request.mimetype != "application/json":
        raise GenqError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                        "send the body as JSON with `Content-Type: application/json`")
    try:
        return model.model_validate_json(request.get_data(cache=False), strict=True)
    except ValidationError as exc:
        if exc.errors()[0]["type"] != "json_invalid":
            raise
        raise GenqError(ErrorCode.INVALID_JSON,
                        f"the body is not valid JSON: {exc.errors()[0]['msg']}") from None

