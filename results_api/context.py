"""Per-request context: the app's Settings and the tenant authenticated by the API key."""

from __future__ import annotations

from flask import current_app, g, request

from genq import db
from genq.api_keys import tenant_id_for_key
from genq.errors import ErrorCode, GenqError
from genq.settings import Settings


def current_settings() -> Settings:
    return current_app.config["GENQ_SETTINGS"]


def current_tenant_id() -> str:
    return g.tenant_id


def authenticate() -> None:
    """`before_request` of every /v1 blueprint: `Authorization: Bearer <key>` or 401."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise GenqError(ErrorCode.UNAUTHORIZED,
                        "missing API key: send `Authorization: Bearer <key>`")
    with db.session_factory(current_settings().database_url_resolved)() as session:
        tenant_id = tenant_id_for_key(session, key.strip())
    if tenant_id is None:
        raise GenqError(ErrorCode.UNAUTHORIZED, "invalid or revoked API key")
    g.tenant_id = tenant_id


def limit_arg(default: int) -> int:
    """The `limit` query parameter of a list: ASCII digits only (`int()` also takes " 5" and
    "٣", and `isdigit()` admits "²", which `int()` then refuses: a 500)."""
    value = request.args.get("limit")
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()):
        raise GenqError(ErrorCode.INVALID_REQUEST, "limit must be an integer", param="limit")
    return int(value)
