"""On Redis, job messages are fetched in batches: one round trip acks the messages whose jobs
are done and takes up to a window of new ones, in strict serving order.

Why not kombu's consumer here: its Redis transport pays three round trips per message (BRPOP,
a pipeline recording the message as unacked, a pipeline acking it), plus Celery's event-loop
work around each; with the echo engine that was ~40% of a worker's CPU per job
(benchmarks.queue_overhead). Here one Lua script does a whole round, and records every message
it takes in kombu's own unacked hash and index (same keys, same format) in the same atomic step
that pops it: a worker killed at any moment leaves each message either in its queue or in the
unacked index, never in neither.

What stays kombu's: the message format and queue names (its priority steps), and the recovery
of unacked messages. `restore_visible` (run here, as every kombu consumer runs it) puts back
messages left unacked longer than the visibility timeout, i.e. by a worker that died;
`restore_by_tag` hands back this worker's unsettled messages when it stops.

With every queue empty the fetcher waits in a BRPOP, which pops one message; the next round
records it as unacked with the rest of its batch. A worker killed in that gap loses the message
from the broker (kombu's consumer has the same gap on every message); its job is still queued
in the DB, and the reaper republishes it (workers.reaper.republish_orphaned_queued).

On RabbitMQ nothing of this is needed: the broker pushes messages within the prefetch window
and Celery's consumer hands them to the micro-batcher (workers.tasks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

from celery import Celery
from kombu import Queue
from kombu.serialization import prepare_accept_content
from kombu.utils.json import loads

from genq.queues import RUN_JOB_TASK
from workers.micro_batch import JobMessage

log = logging.getLogger(__name__)

BLOCK_SECONDS = 1.0  # longest BRPOP; acks that arrive meanwhile wait for the next round
# A full window is polled this often for urgent (interactive) messages, taken into a few slots
# beyond the window: an interactive job never waits for a wave of long jobs to end.
URGENT_POLL_SECONDS = 0.25
RETRY_SECONDS = (0.1, 2.0)  # backoff while Redis is unreachable
RESTORE_VISIBLE_EVERY_SECONDS = 60.0

# KEYS: kombu's unacked hash and index, then the job queue lists in serving order.
# ARGV: how many messages to take, how many delivery tags to ack, those tags, then messages
# already popped (by BRPOP) that count towards the limit and are recorded with the rest.
_ROUND = """
local unacked, index = KEYS[1], KEYS[2]
local limit, num_acks = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, 2 + num_acks do
  redis.call('ZREM', index, ARGV[i])
  redis.call('HDEL', unacked, ARGV[i])
end
local taken = {}
for i = 3 + num_acks, #ARGV do taken[#taken + 1] = ARGV[i] end
for k = 3, #KEYS do
  if #taken >= limit then break end
  local popped = redis.call('RPOP', KEYS[k], limit - #taken)
  if popped then
    for _, raw in ipairs(popped) do taken[#taken + 1] = raw end
  end
end
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
for _, raw in ipairs(taken) do
  local ok, message = pcall(cjson.decode, raw)
  local properties = ok and type(message) == 'table' and message['properties']
  if type(properties) == 'table' and properties['delivery_tag'] then
    local info = properties['delivery_info'] or {}
    -- kombu's format: json [message, exchange, routing_key]
    redis.call('HSET', unacked, properties['delivery_tag'], '[' .. raw .. ',' ..
      cjson.encode(info['exchange'] or '') .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
    redis.call('ZADD', index, now, properties['delivery_tag'])
  end
end
return taken
"""


class RedisJobFetcher:
    """Keeps up to `window` job messages in this worker: a message counts from the round that
    takes it until its job is settled (`ack`, or `give_up` when its outcome could not be
    written; that message stays unacked and is handed back when the fetcher closes).

    A round runs once `refill_at` slots are free; the acks of jobs settled meanwhile wait for
    it. With standby jobs queued in the engine (the window is larger than the engine's batch),
    waiting for a few free slots costs the engine nothing and turns many one-job rounds (each
    a wake-up of this thread and of the group committer, for a claim) into fewer, larger ones:
    on a machine with few cores each wake-up preempts the engine."""

    def __init__(self, app: Celery, queues: list[Queue], window: int,
                 deliver: Callable[[list[JobMessage]], None], refill_at: int = 1,
                 urgent_queue: str | None = None, urgent_reserve: int = 0) -> None:
        self.window = window
        self.refill_at = max(1, min(refill_at, window))
        self.urgent_queue = urgent_queue
        self.urgent_reserve = urgent_reserve if urgent_queue is not None else 0
        self._deliver = deliver
        self._queues = queues
        self._connection = app.connection_for_read()
        self._channel = None  # connected by the fetch thread, which retries while Redis is down
        self._accept = prepare_accept_content(app.conf.accept_content)
        self._errors = tuple(self._connection.connection_errors
                             + self._connection.channel_errors)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._unsettled: set[str] = set()  # taken, not yet settled: they fill the window
        self._to_ack: list[str] = []
        self._given_up: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="genq-redis-fetch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Take no more messages (returns within about BLOCK_SECONDS)."""
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(BLOCK_SECONDS + 5)

    def close(self) -> None:
        """After `stop` and the drain: send the pending acks, hand back every message that is
        still unsettled or given up, and close the connection."""
        with self._lock:
            acks, self._to_ack = self._to_ack, []
            hand_back = self._unsettled | self._given_up
        if self._channel is None:  # never reached Redis: nothing was taken
            return
        try:
            if acks:
                self._round(keys=self._round_keys(), args=[0, len(acks), *acks])
            for tag in hand_back:
                self._channel.qos.restore_by_tag(tag, client=self._redis)
        except self._errors:
            log.warning("Redis unreachable at shutdown: %d acks not sent, %d messages left for "
                        "the visibility timeout", len(acks), len(hand_back), exc_info=True)
        self._connection.release()

    def ack(self, tag: str) -> None:
        """The message's job is settled: ack it in the next round, free its slot now."""
        with self._lock:
            self._unsettled.discard(tag)
            self._to_ack.append(tag)
            refill = self._free() >= self.refill_at
        if refill:
            self._wakeup.set()

    def give_up(self, tag: str) -> None:
        """The job's outcome could not be written: keep the message unacked (the broker
        delivers it again), but free its slot."""
        with self._lock:
            self._unsettled.discard(tag)
            self._given_up.add(tag)
            refill = self._free() >= self.refill_at
        if refill:
            self._wakeup.set()

    def _free(self) -> int:
        return self.window - len(self._unsettled)

    def _connect(self) -> None:
        channel = self._connection.default_channel
        for queue in self._queues:  # kombu's restore routes a message back by these bindings
            queue.bind(channel).declare()
        self._redis = channel.Client(connection_pool=channel.pool)
        # kombu's BRPOP order: every queue's first priority step, then every queue's second...
        self._keys = [channel._q_for_pri(queue.name, step)
                      for step in channel.priority_steps for queue in self._queues]
        self._urgent_keys = [channel._q_for_pri(self.urgent_queue, step)
                             for step in channel.priority_steps] if self.urgent_reserve else []
        self._round = self._redis.register_script(_ROUND)
        self._channel = channel  # last: a failure above is retried from the start

    def _run(self) -> None:
        backoff = RETRY_SECONDS[0]
        next_restore = time.monotonic()
        while not self._stopping.is_set():
            try:
                if self._channel is None:
                    self._connect()
                if time.monotonic() >= next_restore:
                    self._channel.qos.restore_visible(
                        num=self._channel.unacked_restore_limit, interval=1)
                    next_restore = time.monotonic() + RESTORE_VISIBLE_EVERY_SECONDS
                self._fetch_round()
                backoff = RETRY_SECONDS[0]
            except self._errors:
                log.warning("fetching jobs from Redis failed; retrying in %.1f s", backoff,
                            exc_info=True)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, RETRY_SECONDS[1])
            except Exception:  # never let the thread die: the worker would idle silently
                log.exception("fetch round failed")
                self._stopping.wait(RETRY_SECONDS[0])

    def _fetch_round(self) -> None:
        with self._lock:
            free = self._free()
            if free >= self.refill_at:
                acks, self._to_ack = self._to_ack, []
        if free < self.refill_at:
            # set by the ack that frees `refill_at` slots
            self._wakeup.wait(URGENT_POLL_SECONDS if self._urgent_keys else BLOCK_SECONDS)
            self._wakeup.clear()
            if free + self.urgent_reserve > 0 and self._urgent_keys:
                self._take(free + self.urgent_reserve, [], keys=self._urgent_keys)
            return
        self._wakeup.clear()
        taken = self._take(max(free, 0), acks)
        if taken or free <= 0:
            return
        popped = self._redis.brpop(self._keys, timeout=BLOCK_SECONDS)
        if popped is not None and not self._stopping.is_set():
            self._take(free, [], already_popped=popped[1])
        elif popped is not None:  # stopping: put it back where BRPOP took it from
            self._redis.rpush(popped[0], popped[1])

    def _take(self, limit: int, acks: list[str], already_popped: bytes | None = None,
              keys: list[str] | None = None) -> int:
        """One round: ack `acks`, take up to `limit` messages (from `keys`, by default every
        job queue), hand them to the worker."""
        extra = [already_popped] if already_popped is not None else []
        try:
            raws = self._round(keys=self._round_keys(keys),
                               args=[limit, len(acks), *acks, *extra])
        except BaseException:
            with self._lock:  # not sent: they go with the next round
                self._to_ack[:0] = acks
            if already_popped is not None:  # in hand but not recorded: run it all the same
                log.warning("a message could not be recorded as unacked; running it anyway")
                self._hand_over([already_popped])
            raise
        self._hand_over(raws)
        return len(raws)

    def _round_keys(self, keys: list[str] | None = None) -> list[str]:
        return [self._channel.unacked_key, self._channel.unacked_index_key,
                *(keys if keys is not None else self._keys)]

    def _hand_over(self, raws: list[bytes]) -> None:
        messages = [message for message in map(self._message, raws) if message is not None]
        if messages:
            self._deliver(messages)

    def _message(self, raw: bytes) -> JobMessage | None:
        try:
            message = self._channel.Message(loads(raw), channel=self._channel,
                                            accept=self._accept)
            tag = message.delivery_tag
            task = (message.headers or {}).get("task")
            if task != RUN_JOB_TASK:
                raise ValueError(f"task {task!r} is not {RUN_JOB_TASK}")
            payload = message.decode()
        except Exception as exc:  # it would fail the same way on any worker: drop it
            log.error("dropping an undecodable job message %.200r: %s", raw, exc)
            tag = _delivery_tag(raw)
            if tag is not None:
                with self._lock:
                    self._to_ack.append(tag)
            return None
        with self._lock:
            self._unsettled.add(tag)
        return JobMessage(payload, partial(self.ack, tag), partial(self.give_up, tag))


def _delivery_tag(raw: bytes) -> str | None:
    try:
        return loads(raw)["properties"]["delivery_tag"]
    except Exception:
        return None
