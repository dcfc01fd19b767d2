"""Job event logs on a real Redis: the worker's JobStreams publishes a step's deltas for every
job at once, with ids `attempt-token_offset`, and a reader resumes after any id."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from engine.outputs import CompletionOutput, RequestOutput
from genq.job_events import (
    END_OFFSET,
    FINISHED_TTL_SECONDS,
    RUNNING_TTL_SECONDS,
    EventId,
    EventKind,
    JobEventLog,
)
from tests.e2e.conftest import redis_db
from workers.job_streams import JobStreams

pytestmark = pytest.mark.integration

EVENTS_REDIS_DB = 2


def delta(job_id: str, text: str, token_ids: list[int]) -> RequestOutput:
    return RequestOutput(job_id, [], [CompletionOutput(text, token_ids, None)], finished=False)


def read_all(event_log: JobEventLog, job_id: str, count: int) -> list:
    deadline, events = time.monotonic() + 5, []
    while len(events) < count and time.monotonic() < deadline:
        events += event_log.read(job_id, events[-1].id if events else None, 0.2)
    return events


def test_streams_publish_a_jobs_deltas_with_offsets_and_an_end(redis_url):
    # given a worker's JobStreams on Redis, and two jobs started in the engine (attempt 3 and 1)
    url = redis_db(redis_url, EVENTS_REDIS_DB)
    event_log = JobEventLog(url)
    streams = JobStreams(event_log)
    first, second = f"job_{uuid.uuid4().hex}", f"job_{uuid.uuid4().hex}"
    streams.started([(first, 3), (second, 1)])

    # when two engine steps report deltas for both, and the first job's outcome is committed
    streams.add_deltas([delta(first, "Hel", [10]), delta(second, "A", [7])])
    streams.add_deltas([delta(first, "lo\x00", [11, 12]), delta(second, "B", [8])])
    streams.ended(first)

    # then the first job's log holds the deltas with token offsets and character counts (NUL
    # as the job row stores it), then the end
    events = read_all(event_log, first, 3)
    assert [(str(e.id), e.kind, e.text, e.token_ids, e.chars) for e in events] == [
        ("3-1", EventKind.DELTA, "Hel", (10,), 3),
        ("3-3", EventKind.DELTA, "lo\ufffd", (11, 12), 6),
        (f"3-{END_OFFSET}", EventKind.ENDED, "", (), 6),
    ]
    assert 0 < redis.Redis.from_url(url).ttl(f"genq:job-events:{first}") <= FINISHED_TTL_SECONDS
    # and a reader resuming after an id gets only what came after it
    assert [str(e.id) for e in event_log.read(first, EventId(3, 1), 0.1)] == [
        "3-3", f"3-{END_OFFSET}"]
    assert event_log.event(first, EventId(3, 3)).chars == 6
    # and the other job's log is its own
    assert [e.text for e in read_all(event_log, second, 2)] == ["A", "B"]
    assert 0 < redis.Redis.from_url(url).ttl(f"genq:job-events:{second}") <= RUNNING_TTL_SECONDS


def test_a_rerun_appends_after_the_earlier_attempt(redis_url):
    # given a job whose attempt 1 streamed a delta and then was lost
    event_log = JobEventLog(redis_db(redis_url, EVENTS_REDIS_DB))
    streams = JobStreams(event_log)
    job_id = f"job_{uuid.uuid4().hex}"
    streams.started([(job_id, 1)])
    streams.add_deltas([delta(job_id, "old", [1])])
    read_all(event_log, job_id, 1)

    # when attempt 2 starts over
    streams.started([(job_id, 2)])
    streams.add_deltas([delta(job_id, "new", [2])])

    # then its events follow the first attempt's, their offsets counted from 0 again
    events = read_all(event_log, job_id, 2)
    assert [(str(e.id), e.text, e.chars) for e in events] == [("1-1", "old", 3), ("2-1", "new", 3)]


def test_ids_parse_back_and_refuse_garbage():
    assert EventId.parse("12-345") == EventId(12, 345) and str(EventId(12, 345)) == "12-345"
    assert EventId(1, 9) < EventId(2, 0)
    for text in (None, "", "7", "a-1", "1-", "-1", "1-2-3", "١-٢"):
        assert EventId.parse(text) is None
