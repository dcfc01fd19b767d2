"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: DB and broker reachable).

/readyz goes through the circuit breakers (producer.breakers): while one is open it answers 503
at once; otherwise it probes, and a failed probe opens the breaker for the API's requests too.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify

from genq.circuit_breaker import CircuitBreaker
from genq.errors import ErrorCode
from producer.breakers import broker_breaker, database_breaker, ping_database
from producer.publisher import check_broker
from results_api.context import current_settings

BROKER_CHECK_TIMEOUT_SECONDS = 2.0

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


LIVE = {"status": "ok"}  # /healthz's body; results_api.asgi answers it on its event loop


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(LIVE)


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    settings = current_settings()
    checks = {
        "database": _check(database_breaker(settings),
                           lambda: ping_database(settings.database_url_resolved)),
        "broker": _check(broker_breaker(settings),
                         lambda: check_broker(settings.broker_url, BROKER_CHECK_TIMEOUT_SECONDS)),
    }
    failed = [name for name, result in checks.items() if result != "ok"]
    if not failed:
        return jsonify(status="ok", checks=checks), 200
    error = {"code": ErrorCode.SERVICE_UNAVAILABLE.value,
             "message": f"unreachable: {', '.join(failed)}", "param": None}
    return jsonify(status="unavailable", checks=checks, error=error), 503


def _check(breaker: CircuitBreaker, probe) -> str:
    if not breaker.allow():
        return f"circuit open: {breaker.last_error}"[:300]
    try:
        probe()
    except Exception as exc:  # a readiness probe reports failures, it does not raise them
        log.warning("readiness check failed: %s", exc)
        breaker.record_failure(exc)
        return f"error: {type(exc).__name__}: {exc}"[:300]
    breaker.record_success()
    return "ok"
