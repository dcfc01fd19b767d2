"""A circuit breaker for one dependency (the broker, the database) in one process.

closed: calls go through; `failure_threshold` failures in a row open it.
open: `allow()` is False at once (callers answer 503 fast instead of waiting on timeouts) for
`reset_seconds`; then the first caller runs `probe()` (a quick, bounded check) while the others
still fail fast: success closes the breaker, failure opens it for another `reset_seconds`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import Enum

log = logging.getLogger(__name__)


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"  # a probe is running


class CircuitBreaker:
    def __init__(self, name: str, probe: Callable[[], None], failure_threshold: int = 1,
                 reset_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.probe = probe
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self.last_error = ""

    @property
    def state(self) -> BreakerState:
        return self._state

    def seconds_until_probe(self) -> float:
        return max(0.0, self._opened_at + self.reset_seconds - self._clock())

    def allow(self) -> bool:
        """True if a call may go to the dependency now (runs the recovery probe when due)."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.HALF_OPEN or self.seconds_until_probe() > 0:
                return False
            self._state = BreakerState.HALF_OPEN
        try:
            self.probe()
        except Exception as exc:  # the probe's failure is the answer, not an error
            self._open(exc)
            return False
        self.record_success()
        log.info("%s is reachable again: circuit closed", self.name)
        return True

    def record_success(self) -> None:
        if self._state is BreakerState.CLOSED and not self._failures:
            return  # the hot path: no lock
        with self._lock:
            self._state, self._failures = BreakerState.CLOSED, 0

    def record_failure(self, error: BaseException) -> None:
        with self._lock:
            self._failures += 1
            if self._failures < self.failure_threshold and self._state is BreakerState.CLOSED:
                return
        self._open(error)

    def _open(self, error: BaseException) -> None:
        with self._lock:
            if self._state is not BreakerState.OPEN:
                log.warning("%s unavailable, circuit open for %.1f s: %s", self.name,
                            self.reset_seconds, error)
            self._state, self._opened_at = BreakerState.OPEN, self._clock()
            self.last_error = f"{type(error).__name__}: {error}"[:300]
