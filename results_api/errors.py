"""JSON errors for every failure, registered once: `{"error": {"code", "message", "param"}}`.

Client mistakes get their 4xx; an unreachable database is a 503; anything unexpected is a logged
500 — always JSON, never an HTML page.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, current_app, jsonify
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from genq.errors import ErrorCode, GenqError
from producer.breakers import database_breaker

log = logging.getLogger(__name__)

HTTP_ERROR_CODES = {
    400: ErrorCode.INVALID_JSON,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(GenqError, _genq_error)
    app.register_error_handler(ValidationError, _validation_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(DBAPIError, _database_error)
    app.register_error_handler(PoolTimeoutError, _database_error)
    app.register_error_handler(Exception, _unexpected_error)


def error_response(error: GenqError) -> tuple[Response, int]:
    response = jsonify(error.to_dict())
    response.headers.update(error.headers)
    return response, error.http_status


def validation_error(exc: ValidationError) -> GenqError:
    """The first pydantic error as a 422, `param` = its location joined with dots."""
    first = exc.errors()[0]
    context = first.get("ctx") or {}
    param = context.get("param") or ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        message = f"unknown field {param!r}"
    else:
        message = f"{param}: {first['msg']}" if param else first["msg"]
    return GenqError(ErrorCode.INVALID_REQUEST, message, param=param)


def _genq_error(error: GenqError) -> tuple[Response, int]:
    return error_response(error)


def _validation_error(exc: ValidationError) -> tuple[Response, int]:
    return error_response(validation_error(exc))


def _http_error(exc: HTTPException) -> tuple[Response, int]:
    code = HTTP_ERROR_CODES.get(exc.code or 500, ErrorCode.INVALID_REQUEST)
    response, _ = error_response(GenqError(code, exc.description or exc.name))
    if exc.code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response, exc.code or 500


def _database_error(exc: Exception) -> tuple[Response, int]:
    unreachable = isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )
    if not unreachable:
        return _unexpected_error(exc)
    log.warning("database unavailable: %s", exc)
    database_breaker(current_app.config["GENQ_SETTINGS"]).record_failure(exc)
    return error_response(GenqError(ErrorCode.SERVICE_UNAVAILABLE,
                                    "the database is unavailable; retry later"))


def _unexpected_error(exc: Exception) -> tuple[Response, int]:
    log.exception("unexpected error", exc_info=exc)
    return error_response(GenqError(ErrorCode.INTERNAL, "internal server error"))
