"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: DB and broker reachable)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from genq import db
from genq.errors import ErrorCode
from producer.publisher import check_broker
from results_api.context import current_settings

BROKER_CHECK_TIMEOUT_SECONDS = 2.0

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    settings = current_settings()
    checks = {
        "database": _check(lambda: _ping_database(settings.database_url_resolved)),
        "broker": _check(lambda: check_broker(settings.broker_url, BROKER_CHECK_TIMEOUT_SECONDS)),
    }
    failed = [name for name, result in checks.items() if result != "ok"]
    if not failed:
        return jsonify(status="ok", checks=checks), 200
    error = {"code": ErrorCode.SERVICE_UNAVAILABLE.value,
             "message": f"unreachable: {', '.join(failed)}", "param": None}
    return jsonify(status="unavailable", checks=checks, error=error), 503


def _ping_database(url: str) -> None:
    with db.get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


def _check(probe) -> str:
    try:
        probe()
    except Exception as exc:  # a readiness probe reports failures, it does not raise them
        log.warning("readiness check failed: %s", exc)
        return f"error: {type(exc).__name__}: {exc}"[:300]
    return "ok"
