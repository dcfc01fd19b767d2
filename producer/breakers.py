"""The API process's circuit breakers on the broker and the database (genq.circuit_breaker),
one pair per process and settings, and the 503 a caller raises while one is open."""

from __future__ import annotations

import math
from functools import lru_cache

from sqlalchemy import text

from genq import db
from genq.circuit_breaker import CircuitBreaker
from genq.errors import ErrorCode, GenqError
from genq.settings import Settings
from producer.publisher import check_broker


def broker_breaker(settings: Settings) -> CircuitBreaker:
    return _breaker("broker", settings.broker_url, settings.breaker_probe_timeout_seconds,
                    settings.breaker_failure_threshold, settings.breaker_reset_seconds)


def database_breaker(settings: Settings) -> CircuitBreaker:
    return _breaker("database", settings.database_url_resolved,
                    settings.breaker_probe_timeout_seconds, settings.breaker_failure_threshold,
                    settings.breaker_reset_seconds)


@lru_cache(maxsize=16)
def _breaker(name: str, url: str, probe_timeout: float, failure_threshold: int,
             reset_seconds: float) -> CircuitBreaker:
    if name == "broker":
        def probe() -> None:
            check_broker(url, probe_timeout)
    else:
        def probe() -> None:
            ping_database(url)
    return CircuitBreaker(name, probe, failure_threshold, reset_seconds)


def ping_database(url: str) -> None:
    with db.get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


def require(breaker: CircuitBreaker) -> None:
    """Raise a 503 (with Retry-After) at once while `breaker` is open."""
    if breaker.allow():
        return
    retry_after = max(1, math.ceil(breaker.seconds_until_probe()))
    raise GenqError(ErrorCode.SERVICE_UNAVAILABLE,
                    f"the {breaker.name} is unavailable; retry later",
                    headers={"Retry-After": str(retry_after)})
