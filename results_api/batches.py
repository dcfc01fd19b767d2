"""The /v1/batches routes (OpenAI shapes): create, get, list (cursor), cancel, and genq's
retry of a finished batch's failed or expired lines."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from genq.errors import ErrorCode, GenqError
from producer.batch_schemas import (
    BatchCreateRequest,
    BatchList,
    BatchObject,
    BatchRetryRequest,
)
from producer.batches import (
    DEFAULT_LIST_LIMIT,
    cancel_batch,
    create_batch,
    get_batch,
    list_batches,
    retry_batch,
)
from results_api.context import authenticate, current_settings, current_tenant_id, limit_arg
from results_api.openai_errors import register_openai_errors

bp = Blueprint("batches", __name__, url_prefix="/v1")
register_openai_errors(bp)
bp.before_request(authenticate)


@bp.post("/batches")
def create() -> Response:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise GenqError(ErrorCode.INVALID_JSON, "send a JSON object with "
                        "`Content-Type: application/json`")
    batch_request = BatchCreateRequest.model_validate(body)
    return _batch(create_batch(current_settings(), current_tenant_id(), batch_request))


@bp.get("/batches/<batch_id>")
def read(batch_id: str) -> Response:
    return _batch(get_batch(current_settings(), current_tenant_id(), batch_id))


@bp.get("/batches")
def read_list() -> Response:
    page = list_batches(current_settings(), current_tenant_id(),
                        limit=limit_arg(DEFAULT_LIST_LIMIT),
                        after=request.args.get("after") or None)
    return jsonify(BatchList(
        data=page.batches, has_more=page.has_more,
        first_id=page.batches[0].id if page.batches else None,
        last_id=page.batches[-1].id if page.batches else None,
    ).model_dump(mode="json"))


@bp.post("/batches/<batch_id>/cancel")
def cancel(batch_id: str) -> Response:
    return _batch(cancel_batch(current_settings(), current_tenant_id(), batch_id))


@bp.post("/batches/<batch_id>/retry")
def retry(batch_id: str) -> Response:
    body = BatchRetryRequest.model_validate(request.get_json(silent=True) or {})
    return _batch(retry_batch(current_settings(), current_tenant_id(), batch_id,
                              body.completion_window))


def _batch(batch: BatchObject) -> Response:
    return jsonify(batch.model_dump(mode="json"))
