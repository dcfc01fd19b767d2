"""Error codes and the exception that carries them to the API's JSON error handler."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    INVALID_JSON = "invalid_json"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    RATE_LIMITED = "rate_limited"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL = "internal_error"
    # Job failure codes, stored on the job row.
    ENGINE_ERROR = "engine_error"
    WORKER_LOST = "worker_lost"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.CONFLICT: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 422,
    ErrorCode.IDEMPOTENCY_KEY_REUSED: 422,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class GenqError(Exception):
    """A client-visible error: code, human message and the offending parameter, if any."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}  # e.g. Retry-After and x-ratelimit-* on a 429

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def about_item(self, name: str) -> GenqError:
        """The same error about one item of a list in the request: `name` (`jobs.3`, as in
        validation errors) goes before its param and message."""
        param = name if self.param is None else f"{name}.{self.param}"
        return GenqError(self.code, f"{name}: {self.message}", param, self.headers)

    def to_dict(self) -> dict:
        return {"error": {"code": self.code.value, "message": self.message, "param": self.param}}
