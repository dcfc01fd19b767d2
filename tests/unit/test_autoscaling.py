"""genq.autoscaling.scaling_signal: the one formula behind /metrics and the simulation."""

from __future__ import annotations

import math

import pytest

from genq.autoscaling import ClassLoad, FleetThroughput, scaling_signal

TARGET = 30.0
NO_FLEET = FleetThroughput(live_workers=0, slots_per_worker=32, finished_tokens=0,
                           worker_seconds=0.0)
# Two workers up for the whole 60 s window, 12,000 tokens finished: 100 tokens/s each.
TWO_WORKERS = FleetThroughput(live_workers=2, slots_per_worker=32, finished_tokens=12_000,
                              worker_seconds=120.0)


def test_no_jobs_and_no_workers_want_no_worker():
    signal = scaling_signal(ClassLoad(0, 0, 0), NO_FLEET, TARGET)
    assert (signal.backlog_seconds, signal.desired_workers) == (0.0, 0.0)


def test_jobs_waiting_on_no_workers_want_one_to_start_from_zero():
    signal = scaling_signal(ClassLoad(queued_jobs=500, queued_tokens=90_000, running_jobs=0),
                            NO_FLEET, TARGET)
    assert signal.backlog_seconds == math.inf
    assert signal.desired_workers == 1


def test_live_workers_that_finished_nothing_yet_still_want_one():
    fresh = FleetThroughput(live_workers=1, slots_per_worker=32, finished_tokens=0,
                            worker_seconds=5.0)
    assert scaling_signal(ClassLoad(3, 600, 0), fresh, TARGET).desired_workers == 1


def test_backlog_is_queued_work_over_the_fleets_tokens_per_second():
    signal = scaling_signal(ClassLoad(queued_jobs=40, queued_tokens=9_000, running_jobs=0),
                            TWO_WORKERS, TARGET)
    assert signal.backlog_seconds == pytest.approx(9_000 / 200)
    # 9,000 tokens in 30 s at 100 tokens/s per worker: 3 workers.
    assert signal.desired_workers == pytest.approx(3.0)


def test_running_jobs_keep_their_batch_slots_when_nothing_is_queued():
    signal = scaling_signal(ClassLoad(queued_jobs=0, queued_tokens=0, running_jobs=48),
                            TWO_WORKERS, TARGET)
    assert signal.backlog_seconds == 0
    assert signal.desired_workers == pytest.approx(1.5)


def test_a_worker_that_just_started_does_not_lower_the_measured_speed():
    # The second worker has been up 6 s of the window: 6,600 tokens over 66 worker-seconds.
    grown = FleetThroughput(live_workers=2, slots_per_worker=32, finished_tokens=6_600,
                            worker_seconds=66.0)
    assert grown.tokens_per_second_per_worker == pytest.approx(100)
