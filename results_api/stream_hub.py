"""The reads of every wait and stream of one API process, done together and without a thread
each: job rows in one DB query per tick (in a thread), event logs in one XREAD over them all."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from sqlalchemy import select

from genq import db
from genq.errors import ErrorCode, GenqError
from genq.job_events import MAX_BLOCK_SECONDS, SOCKET_TIMEOUT_SECONDS, JobEvent, events_key
from genq.models import Job
from genq.settings import Settings
from genq.states import TERMINAL_STATES
from producer.job_stream import (
    DB_CHECK_SECONDS,
    JobStreamEvent,
    ReadEvent,
    ReadEvents,
    ReadJob,
    event_log_for,
    follow_steps,
    read_event_quietly,
)
from results_api.waits import WAIT_POLL_SECONDS

log = logging.getLogger(__name__)

ROW_GATHER_SECONDS = 0.005  # a row asked for is read this soon, with the others asked meanwhile
QUERY_CHUNK = 500  # ids per IN (...) list
REDIS_RETRY_SECONDS = 0.5
_FINISHED = [state.value for state in TERMINAL_STATES]


@dataclass(eq=False)
class _Subscription:
    """One stream's place in a job's log: what the reader fetched past it, not yet taken."""
    job_id: str
    cursor: object  # the EventId of the last event fetched, or None
    buffer: list[JobEvent] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class StreamHub:
    """Per API process and event loop. Waiters and streams await it; it batches their reads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.database_url_resolved
        self._has_log = event_log_for(settings) is not None
        self._finished_waits: dict[str, set[_JobWait]] = {}
        self._row_requests: dict[str, list[asyncio.Future]] = {}
        self._rows_asked = asyncio.Event()
        self._poller: asyncio.Task | None = None
        self._subscriptions: dict[str, set[_Subscription]] = {}
        self._reader: asyncio.Task | None = None
        self._redis: aioredis.Redis | None = None
        self._wake_key = f"genq:api-wake:{uuid.uuid4().hex}"
        self._wake_cursor = "0-0"
        self._wakes: set[asyncio.Task] = set()

    @property
    def num_waiting(self) -> int:
        return len(self._finished_waits) + sum(map(len, self._subscriptions.values()))

    # --- job rows -------------------------------------------------------------------------

    async def wait_finished(self, job_ids: Iterable[str], seconds: float) -> None:
        """Return once every job is finished, or after `seconds`."""
        pending = set(job_ids)
        done = asyncio.Event()
        waits = [(job_id, _JobWait(pending, job_id, done)) for job_id in pending]
        for job_id, wait in waits:
            self._finished_waits.setdefault(job_id, set()).add(wait)
        self._ensure_poller()
        try:
            if pending:
                await asyncio.wait_for(done.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            for job_id, wait in waits:
                held = self._finished_waits.get(job_id)
                if held is not None:
                    held.discard(wait)
                    if not held:
                        del self._finished_waits[job_id]

    async def job_row(self, tenant_id: str, job_id: str) -> Job:
        """The job's row now (read with the other rows asked for at about the same time)."""
        future = asyncio.get_running_loop().create_future()
        self._row_requests.setdefault(job_id, []).append(future)
        self._rows_asked.set()
        self._ensure_poller()
        job = await future
        if job is None or job.tenant_id != tenant_id:
            raise GenqError(ErrorCode.NOT_FOUND, f"no job with id {job_id!r}", param="id")
        return job

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        next_finished_check = 0.0
        while self._finished_waits or self._row_requests:
            now = time.monotonic()
            wait_ids = list(self._finished_waits) if now >= next_finished_check else []
            if wait_ids:
                next_finished_check = now + WAIT_POLL_SECONDS
            rows, self._row_requests = self._row_requests, {}
            self._rows_asked.clear()
            try:
                finished, jobs = (await asyncio.to_thread(self._query, wait_ids, list(rows))
                                  if wait_ids or rows else ([], {}))
            except Exception as exc:  # a DB hiccup: waits go on, this tick's row reads fail
                log.warning("reading the rows of waited jobs failed: %s", exc)
                finished, jobs = [], {}
                for futures in rows.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(GenqError(
                                ErrorCode.SERVICE_UNAVAILABLE, "the database is unavailable"))
                rows = {}
            for job_id in finished:
                for wait in list(self._finished_waits.get(job_id, ())):
                    wait.finished()
            for job_id, futures in rows.items():
                for future in futures:
                    if not future.done():
                        future.set_result(jobs.get(job_id))
            if self._row_requests:
                await asyncio.sleep(ROW_GATHER_SECONDS)
                continue
            try:
                delay = max(ROW_GATHER_SECONDS, next_finished_check - time.monotonic())
                await asyncio.wait_for(self._rows_asked.wait(), delay)
                await asyncio.sleep(ROW_GATHER_SECONDS)
            except TimeoutError:
                pass

    def _query(self, wait_ids: list[str], row_ids: list[str]) -> tuple[list[str], dict[str, Job]]:
        finished: list[str] = []
        jobs: dict[str, Job] = {}
        with db.session_factory(self.database_url)() as session:
            for chunk in _chunks(wait_ids):
                finished += session.scalars(select(Job.id).where(
                    Job.id.in_(chunk), Job.status.in_(_FINISHED))).all()
            for chunk in _chunks(row_ids):
                jobs |= {job.id: job for job in session.scalars(
                    select(Job).where(Job.id.in_(chunk))).all()}
        return finished, jobs

    # --- event logs -----------------------------------------------------------------------

    async def follow_job(self, tenant_id: str, job: Job, after=None
                         ) -> AsyncIterator[JobStreamEvent]:
        """producer.job_stream.follow_job, its reads done by this hub."""
        steps = follow_steps(job, after, has_log=self._has_log)
        subscription = _Subscription(job.id, after)
        if self._has_log:
            self._subscribe(subscription)
        try:
            reply = None
            while True:
                try:
                    item = steps.send(reply)
                except StopIteration:
                    return
                reply = None
                if isinstance(item, ReadJob):
                    reply = await self.job_row(tenant_id, job.id)
                elif isinstance(item, ReadEvents):
                    reply = await self._events(subscription)
                elif isinstance(item, ReadEvent):
                    reply = await asyncio.to_thread(read_event_quietly,
                                                    event_log_for(self.settings), job.id, item.id)
                else:
                    yield item
        finally:
            steps.close()
            self._unsubscribe(subscription)

    async def _events(self, subscription: _Subscription) -> list[JobEvent]:
        if not self._has_log:
            await asyncio.sleep(DB_CHECK_SECONDS / 2)
            return []
        if not subscription.buffer:
            try:
                await asyncio.wait_for(subscription.ready.wait(), DB_CHECK_SECONDS)
            except TimeoutError:
                pass
        events, subscription.buffer = subscription.buffer, []
        subscription.ready.clear()
        return events

    def _subscribe(self, subscription: _Subscription) -> None:
        self._subscriptions.setdefault(subscription.job_id, set()).add(subscription)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_logs())
        else:
            task = asyncio.get_running_loop().create_task(self._wake_reader())
            self._wakes.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._wakes.discard)

    def _unsubscribe(self, subscription: _Subscription) -> None:
        held = self._subscriptions.get(subscription.job_id)
        if held is not None:
            held.discard(subscription)
            if not held:
                del self._subscriptions[subscription.job_id]

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(
                self.settings.broker_url_resolved, socket_timeout=SOCKET_TIMEOUT_SECONDS,
                socket_connect_timeout=SOCKET_TIMEOUT_SECONDS)
        return self._redis

    async def _wake_reader(self) -> None:
        """A new stream is read from the next XREAD on: end the one blocked now."""
        try:
            pipe = self._client().pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"wake": "1"}, maxlen=16, approximate=True)
            pipe.expire(self._wake_key, 60)
            await pipe.execute()
        except Exception:  # the reader notices the stream within MAX_BLOCK_SECONDS anyway
            pass

    async def _read_logs(self) -> None:
        """One XREAD over every followed job's log (from the earliest place any of its streams
        is at) and the hub's wake key; the entries go to each stream past its own place."""
        client = self._client()
        while self._subscriptions:
            streams = {self._wake_key: self._wake_cursor}
            for job_id, subscriptions in self._subscriptions.items():
                cursors = [s.cursor for s in subscriptions]
                streams[events_key(job_id)] = str(
                    "0-0" if None in cursors else min(cursors))
            try:
                reply = await client.xread(streams, block=int(MAX_BLOCK_SECONDS * 1000))
            except Exception as exc:  # Redis down: streams go on from the job rows
                log.warning("reading job event logs failed: %s", exc)
                await asyncio.sleep(REDIS_RETRY_SECONDS)
                continue
            for key, entries in reply or []:
                key = key.decode()
                if key == self._wake_key:
                    self._wake_cursor = entries[-1][0].decode()
                    continue
                events = [JobEvent.from_entry(entry_id, fields) for entry_id, fields in entries]
                for subscription in self._subscriptions.get(key.removeprefix(
                        events_key("")), ()):
                    new = [e for e in events
                           if subscription.cursor is None or e.id > subscription.cursor]
                    if new:
                        subscription.buffer += new
                        subscription.cursor = new[-1].id
                        subscription.ready.set()

    async def close(self) -> None:
        for task in (self._poller, self._reader):
            if task is not None:
                task.cancel()
        if self._redis is not None:
            await self._redis.aclose()


class _JobWait:
    """One job of a wait_finished call; the call's event is set once all its jobs are."""

    def __init__(self, pending: set[str], job_id: str, done: asyncio.Event) -> None:
        self.pending, self.job_id, self.done = pending, job_id, done

    def finished(self) -> None:
        self.pending.discard(self.job_id)
        if not self.pending:
            self.done.set()


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    return (ids[i:i + QUERY_CHUNK] for i in range(0, len(ids), QUERY_CHUNK))
