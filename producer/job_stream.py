"""Follow one job to its end: status changes, token deltas (its event log, genq.job_events),
then the job as committed, whose row gives the last delta: the deltas join to `output_text`.
Without Redis (RabbitMQ) the row gives it all: status changes, then the output as one delta."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache

from genq.job_events import EventId, EventKind, JobEvent, JobEventLog
from genq.models import Job
from genq.settings import Settings
from genq.states import JobStatus
from producer.jobs import get_job

# The job row is read this often while no `ended` event says it changed (jobs canceled while
# queued, expired, or a worker that could not publish), and while there is no log to follow.
DB_CHECK_SECONDS = 1.0
# A running job canceled through the API: its worker stores the partial output shortly after.
PARTIAL_OUTPUT_WAIT_SECONDS = 3.0


@dataclass(frozen=True)
class StatusChanged:
    status: JobStatus


@dataclass(frozen=True)
class Delta:
    id: EventId
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    job: Job


@dataclass(frozen=True)
class Idle:
    """Nothing new for a while: a chance to send a keep-alive (and to notice a gone client)."""


JobStreamEvent = StatusChanged | Delta | Finished | Idle


@dataclass(frozen=True)
class ReadJob:
    """A request of follow_steps: the job's row now (its reply: the Job)."""


@dataclass(frozen=True)
class ReadEvents:
    """A request of follow_steps: the log's events after `after`, waiting up to
    DB_CHECK_SECONDS for one (its reply: a list, empty on a timeout or without a log)."""
    after: EventId | None


@dataclass(frozen=True)
class ReadEvent:
    """A request of follow_steps: the log's event `id`, or None (a Last-Event-ID resume)."""
    id: EventId


IoRequest = ReadJob | ReadEvents | ReadEvent
READ_JOB = ReadJob()


@lru_cache(maxsize=4)
def _event_log(broker_url: str) -> JobEventLog:
    return JobEventLog(broker_url)


def event_log_for(settings: Settings) -> JobEventLog | None:
    broker_url = settings.broker_url_resolved
    return _event_log(broker_url) if broker_url.startswith("redis") else None


def follow_job(settings: Settings, tenant_id: str, job: Job,
               after: EventId | None = None) -> Iterator[JobStreamEvent]:
    """The events of `job` (the tenant's) after `after` (a Last-Event-ID), ending with
    Finished. A finished job yields at most one last delta and Finished. This thread does the
    reads (results_api.stream_hub does them for many streams at once, without a thread)."""
    event_log = event_log_for(settings)
    steps = follow_steps(job, after, has_log=event_log is not None)
    reply = None
    while True:
        try:
            item = steps.send(reply)
        except StopIteration:
            return
        reply = None
        if isinstance(item, ReadJob):
            reply = get_job(settings, tenant_id, job.id)
        elif isinstance(item, ReadEvents):
            reply = _read(event_log, job.id, item.after)
        elif isinstance(item, ReadEvent):
            reply = read_event_quietly(event_log, job.id, item.id)
        else:
            yield item


def read_event_quietly(event_log: JobEventLog | None, job_id: str,
                       event_id: EventId) -> JobEvent | None:
    if event_log is None:
        return None
    try:
        return event_log.event(job_id, event_id)
    except Exception:  # Redis down: the rest comes from the job row
        return None


def follow_steps(job: Job, after: EventId | None = None, has_log: bool = True
                 ) -> Generator[JobStreamEvent | IoRequest, object, None]:
    """follow_job without its I/O: yields the stream's events and the reads it needs
    (ReadJob, ReadEvents, ReadEvent), each answered by the driver through send()."""
    attempt, num_chars = (after.attempt, 0) if after is not None else (None, 0)
    if after is not None and after.offset and has_log:
        resumed = yield ReadEvent(after)
        num_chars = resumed.chars if resumed is not None else 0
        if (resumed is None and JobStatus(job.status).is_terminal
                and after.offset >= (job.completion_tokens or 0)):
            num_chars = len(job.output_text or "")  # it had the last delta, from the row
    status, partial_deadline = None, None
    ended = refresh = False  # the current attempt's outcome is written; re-read the row
    next_check = time.monotonic() + DB_CHECK_SECONDS
    cursor = after
    while True:
        now = time.monotonic()
        if refresh or now >= next_check:
            job = yield READ_JOB
            next_check, refresh = now + DB_CHECK_SECONDS, False
        if JobStatus(job.status).is_terminal:
            # Canceled while it ran: its worker stores the partial output a moment later (and
            # then says `ended`); a worker that is gone never will.
            partial_deadline = partial_deadline or now + PARTIAL_OUTPUT_WAIT_SECONDS
            if (ended or attempt is None or job.output_text is not None
                    or job.status != JobStatus.CANCELED.value or now >= partial_deadline):
                yield from _finish(job, attempt, num_chars)
                return
        if job.status != status and not JobStatus(job.status).is_terminal:
            status = job.status
            yield StatusChanged(JobStatus(status))
        events = yield ReadEvents(cursor)
        if not events:
            yield Idle()
        for event in _coalesced(events):
            cursor = event.id
            if event.id.attempt != attempt:  # a new attempt (a rerun) starts its text over
                attempt, num_chars, ended = event.id.attempt, 0, False
            if event.kind is EventKind.ENDED:
                ended = refresh = True
                continue
            if status != JobStatus.RUNNING.value:
                status = JobStatus.RUNNING.value
                yield StatusChanged(JobStatus.RUNNING)
            if event.kind is EventKind.DELTA:
                num_chars = event.chars
                yield Delta(event.id, event.text, event.token_ids)


def _finish(job: Job, attempt: int | None, num_chars: int) -> Iterator[JobStreamEvent]:
    text = job.output_text or ""
    if len(text) > num_chars:
        yield Delta(EventId(attempt or job.attempts, job.completion_tokens or 0),
                    text[num_chars:], ())
    yield Finished(job)


def _coalesced(events: list[JobEvent]) -> list[JobEvent]:
    """Runs of deltas of one attempt as one delta: a reader that fell behind (a busy API, a
    slow client) catches up with one write instead of one per engine step."""
    merged: list[JobEvent] = []
    for event in events:
        last = merged[-1] if merged else None
        if (last is not None and event.kind is EventKind.DELTA and last.kind is EventKind.DELTA
                and event.id.attempt == last.id.attempt):
            merged[-1] = replace(event, text=last.text + event.text,
                                 token_ids=last.token_ids + event.token_ids)
        else:
            merged.append(event)
    return merged


def _read(event_log: JobEventLog | None, job_id: str, after: EventId | None) -> list:
    """The next events; none after a pause when there is no log or Redis fails (the DB checks
    carry the stream on)."""
    if event_log is not None:
        try:
            return event_log.read(job_id, after, DB_CHECK_SECONDS)
        except Exception:
            pass
    time.sleep(DB_CHECK_SECONDS / 2)
    return []
