"""Fail fast while the database is down: every request that needs it answers 503 at once while
the database's circuit breaker is open (see producer.breakers), instead of each one waiting out
a connect timeout. Health and metrics endpoints are exempt: they report the outage."""

from __future__ import annotations

from flask import Flask, Response, g, request

from producer.breakers import database_breaker, require
from results_api.context import current_settings

EXEMPT_BLUEPRINTS = frozenset({"health", "metrics"})
EXEMPT_ENDPOINTS = frozenset({"static"})


def init_app(app: Flask) -> None:
    app.before_request(_require_database)
    app.after_request(_record_success)


def _require_database() -> None:
    if request.blueprint in EXEMPT_BLUEPRINTS or request.endpoint in EXEMPT_ENDPOINTS:
        return
    require(database_breaker(current_settings()))
    g.database_required = True


def _record_success(response: Response) -> Response:
    if g.get("database_required") and response.status_code < 500:
        database_breaker(current_settings()).record_success()
    return response
