"""A job's event log on the broker's Redis: the worker appends token deltas and the end of each
attempt, the API reads them for SSE. One Redis stream per job, entry id `attempt-token_offset`,
so a reader can resume after any event (Last-Event-ID) and a rerun's events sort after the
earlier attempt's."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import redis

KEY_PREFIX = "genq:job-events:"
# A running job's log outlives any lease; a finished job's replays from the DB after this.
RUNNING_TTL_SECONDS = 3600
FINISHED_TTL_SECONDS = 300
END_OFFSET = 2**63  # the `ended` entry's offset: after any token offset of its attempt
MAX_BLOCK_SECONDS = 1.0
SOCKET_TIMEOUT_SECONDS = MAX_BLOCK_SECONDS + 2.0


class EventKind(str, Enum):
    DELTA = "delta"  # new text and token ids; offset = output tokens so far
    ENDED = "ended"  # the attempt's outcome is committed: read the job row


@dataclass(frozen=True, order=True)
class EventId:
    attempt: int
    offset: int

    def __str__(self) -> str:
        return f"{self.attempt}-{self.offset}"

    @classmethod
    def parse(cls, text: str | bytes | None) -> EventId | None:
        """The id of `text` ("3-17"), None when it is not one."""
        if isinstance(text, bytes):
            text = text.decode()
        attempt, dash, offset = (text or "").strip().partition("-")
        if not (dash and attempt.isascii() and attempt.isdigit() and offset.isascii()
                and offset.isdigit()):
            return None
        return cls(int(attempt), int(offset))


@dataclass(frozen=True)
class JobEvent:
    id: EventId
    kind: EventKind
    text: str = ""
    token_ids: tuple[int, ...] = ()
    chars: int = 0  # characters streamed in this attempt, this event's included

    def fields(self) -> dict[str, str]:
        return {"kind": self.kind.value, "text": self.text, "chars": str(self.chars),
                "token_ids": ",".join(map(str, self.token_ids))}

    @classmethod
    def from_entry(cls, entry_id: bytes, fields: dict[bytes, bytes]) -> JobEvent:
        token_ids = fields.get(b"token_ids", b"").decode()
        return cls(EventId.parse(entry_id), EventKind(fields[b"kind"].decode()),
                   fields.get(b"text", b"").decode(), tuple(map(int, filter(None,
                                                                          token_ids.split(",")))),
                   int(fields.get(b"chars", b"0")))


def events_key(job_id: str) -> str:
    return KEY_PREFIX + job_id


class JobEventLog:
    def __init__(self, redis_url: str) -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=SOCKET_TIMEOUT_SECONDS,
                                          socket_connect_timeout=SOCKET_TIMEOUT_SECONDS)

    def append(self, events: list[tuple[str, JobEvent]]) -> None:
        """Append (job id, event) pairs in one round trip. An id at or below the log's last
        (a duplicate) is refused by Redis and skipped. Two commands per job and attempt set the
        log's lifetime: at its first delta, and at its end."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, event in events:
            key = events_key(job_id)
            pipe.xadd(key, event.fields(), id=str(event.id))
            if event.kind is EventKind.ENDED:
                pipe.expire(key, FINISHED_TTL_SECONDS)
            elif event.id.offset == len(event.token_ids):  # the attempt's first delta
                pipe.expire(key, RUNNING_TTL_SECONDS)
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, redis.ConnectionError | redis.TimeoutError):
                raise result

    def read(self, job_id: str, after: EventId | None, block_seconds: float) -> list[JobEvent]:
        """The events after `after` (all with None), waiting up to `block_seconds` (at most
        MAX_BLOCK_SECONDS) for one."""
        block_ms = max(1, int(min(block_seconds, MAX_BLOCK_SECONDS) * 1000))
        reply = self.redis.xread({events_key(job_id): str(after or "0-0")}, block=block_ms)
        return [JobEvent.from_entry(entry_id, fields)
                for _key, entries in reply or [] for entry_id, fields in entries]

    def event(self, job_id: str, event_id: EventId) -> JobEvent | None:
        entries = self.redis.xrange(events_key(job_id), str(event_id), str(event_id))
        return JobEvent.from_entry(*entries[0]) if entries else None
