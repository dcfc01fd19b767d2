"""OpenAI's error shape for the OpenAI-compatible blueprints (files, batches, completions):
`{"error": {"message", "type", "param", "code"}}`, genq's own fields plus OpenAI's `type`,
so the official `openai` client raises its matching exception class with genq's message."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from genq.errors import ErrorCode, GenqError
from results_api.errors import HTTP_ERROR_CODES, validation_error

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               409: "conflict_error", 429: "rate_limit_error"}


def register_openai_errors(bp: Blueprint) -> None:
    """Blueprint-level handlers win over the app's, for errors raised in this blueprint."""
    bp.register_error_handler(GenqError, openai_error_response)
    bp.register_error_handler(ValidationError, _validation_error)
    bp.register_error_handler(HTTPException, _http_error)


def _validation_error(exc: ValidationError) -> tuple[Response, int]:
    """An OpenAI parameter genq does not implement gets OpenAI's own answer for one: 400,
    `invalid_request_error`, code `unsupported_parameter`, `param` naming it."""
    first = exc.errors()[0]
    if first["type"] != "unsupported_parameter":
        return openai_error_response(validation_error(exc))
    body = {"error": {"message": first["msg"], "type": "invalid_request_error",
                      "param": first["ctx"]["param"], "code": "unsupported_parameter"}}
    return jsonify(body), 400


def openai_error_response(error: GenqError) -> tuple[Response, int]:
    status = error.http_status
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500
                                 else "invalid_request_error")
    body = {"error": {"message": error.message, "type": error_type, "param": error.param,
                      "code": error.code.value}}
    response = jsonify(body)
    response.headers.update(error.headers)
    return response, status


def _http_error(exc: HTTPException) -> tuple[Response, int]:
    code = HTTP_ERROR_CODES.get(exc.code or 500, ErrorCode.INVALID_REQUEST)
    response, _ = openai_error_response(GenqError(code, exc.description or exc.name))
    return response, exc.code or 500
