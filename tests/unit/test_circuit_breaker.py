"""The circuit breaker's states: open after failures, fail fast, one probe, close on success."""

from __future__ import annotations

import pytest

from genq.circuit_breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Probe:
    def __init__(self) -> None:
        self.healthy = False
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if not self.healthy:
            raise ConnectionError("still down")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_failures_open_it_and_calls_then_fail_fast_without_probing(clock):
    probe = Probe()
    breaker = CircuitBreaker("broker", probe, failure_threshold=2, reset_seconds=5, clock=clock)

    breaker.record_failure(ConnectionError("refused"))
    assert breaker.allow() and breaker.state is BreakerState.CLOSED
    breaker.record_failure(ConnectionError("refused"))

    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert probe.calls == 0
    assert "refused" in breaker.last_error


def test_after_the_reset_time_one_probe_decides(clock):
    probe = Probe()
    breaker = CircuitBreaker("broker", probe, reset_seconds=5, clock=clock)
    breaker.record_failure(ConnectionError("refused"))

    clock.now += 5
    assert not breaker.allow()  # the probe failed: open for another 5 s
    assert probe.calls == 1 and breaker.state is BreakerState.OPEN
    clock.now += 1
    assert not breaker.allow() and probe.calls == 1

    probe.healthy = True
    clock.now += 4
    assert breaker.allow()
    assert breaker.state is BreakerState.CLOSED and probe.calls == 2


def test_a_success_resets_the_failure_count(clock):
    breaker = CircuitBreaker("database", Probe(), failure_threshold=2, clock=clock)

    breaker.record_failure(ConnectionError("blip"))
    breaker.record_success()
    breaker.record_failure(ConnectionError("blip"))

    assert breaker.state is BreakerState.CLOSED
