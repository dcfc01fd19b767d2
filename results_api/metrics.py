"""`GET /metrics` (Prometheus text format) and the HTTP request metrics of the API.

Under gunicorn an API runs several processes; a scrape reaches one of them. The DB-derived
metrics (genq.metrics.DatabaseCollector) are the same in every process. The HTTP counters are
per process, so `genq api` / `genq up` turn on prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, one file per process, summed at scrape). Without it (a single
process, as in the tests) the counters are collected in memory.
"""

from __future__ import annotations

import hmac
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from genq.errors import ErrorCode, GenqError
from genq.metrics import DatabaseCollector, multiprocess_enabled

HTTP_REQUESTS = Counter("genq_http_requests", "HTTP requests answered by the API.",
                        ["method", "route", "status"], registry=None)
HTTP_REQUEST_SECONDS = Histogram("genq_http_request_duration_seconds",
                                 "Time to answer an HTTP request.", ["method", "route"],
                                 registry=None)
# Answered 429 by results_api.asgi before Flask: the caller's key had its share of the pool.
CALLS_REFUSED = Counter("genq_http_calls_refused_busy_key",
                        "Calls refused at once because their API key already had "
                        "GENQ_MAX_CALLS_PER_KEY calls in the API's request pool.", registry=None)
UNMATCHED_ROUTE = "<unmatched>"

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    token = current_app.config["GENQ_SETTINGS"].metrics_token
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
            raise GenqError(ErrorCode.UNAUTHORIZED,
                            "/metrics needs `Authorization: Bearer <GENQ_METRICS_TOKEN>`")
    registry: CollectorRegistry = current_app.extensions["genq_metrics_registry"]
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    settings = app.config["GENQ_SETTINGS"]
    registry = CollectorRegistry()
    if multiprocess_enabled():
        MultiProcessCollector(registry)
    else:
        registry.register(HTTP_REQUESTS)
        registry.register(HTTP_REQUEST_SECONDS)
        registry.register(CALLS_REFUSED)
    registry.register(DatabaseCollector(
        settings.database_url_resolved, settings.worker_live_seconds,
        target_backlog_seconds=settings.target_backlog_seconds,
        throughput_window_seconds=settings.throughput_window_seconds,
        default_worker_slots=settings.worker_concurrency))
    app.extensions["genq_metrics_registry"] = registry
    app.register_blueprint(bp)
    app.before_request(_start_timer)
    app.after_request(_count_request)


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _count_request(response: Response) -> Response:
    if g.get("genq_handed_off"):  # counted once answered (results_api.asgi)
        return response
    # The URL rule (`/v1/jobs/<job_id>`), not the path: one series per route, not per job id.
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    count_request(request.method, route, response.status_code, g.get("metrics_started"))
    return response


def count_request(method: str, route: str, status: int, started: float | None) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    if started is not None:
        HTTP_REQUEST_SECONDS.labels(method, route).observe(time.perf_counter() - started)

