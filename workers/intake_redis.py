"""The Redis intake: one round trip acks the messages whose jobs are done and takes up to a
micro-batch of new ones, in strict serving order, recording each in kombu's unacked storage.

Why not kombu's consumer: its Redis transport pays three round trips per message (BRPOP, a
pipeline recording the message as unacked, a pipeline acking it), plus Celery's event-loop
work around each; with the echo engine that was ~40% of a worker's CPU per job
(benchmarks.queue_overhead). Here one Lua script does a whole round, and records every message
it takes in kombu's own unacked hash and index (same keys, same format) in the same atomic step
that pops it: a worker killed at any moment leaves each message either in its queue or in the
unacked index, never in neither. That uses kombu internals (`_q_for_pri`, the unacked keys and
format, `QoS.restore_by_tag`): pyproject.toml pins kombu's range and
tests/integration/test_intake_redis.py fails if they change.

What stays kombu's: the message format and queue names (its priority steps), and the recovery
of unacked messages. `restore_visible` (run here, as every kombu consumer runs it) puts back
messages left unacked longer than the visibility timeout, i.e. by a worker that died;
`restore_by_tag` hands back a given-up message at once, and the unsettled ones at `close`.

With every queue empty `take` waits in a BRPOP, which pops one message; the round after it
records it as unacked with the rest of its batch (and sends the acks asked for meanwhile). A
worker killed in that gap loses the message from the broker (kombu's consumer has the same gap
on every message); its job is still queued in the DB, and the reaper republishes it
(workers.reaper.republish_orphaned_queued).
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery
from kombu import Queue
from kombu.serialization import prepare_accept_content
from kombu.utils.json import loads

from genq.queues import RUN_JOB_TASK
from workers.intake import Delivery, job_id_of

log = logging.getLogger(__name__)

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


class RedisIntake:
    """`queues` in serving order, the interactive one first. Deliveries' handles are kombu
    delivery tags."""

    def __init__(self, app: Celery, queues: list[Queue]) -> None:
        self._queues = queues
        self._connection = app.connection_for_read()
        self._channel = None  # connected by the first `take` (redis-py reconnects after that)
        self._accept = prepare_accept_content(app.conf.accept_content)
        self._lock = threading.Lock()
        self._unsettled: set[str] = set()  # taken, neither acked nor given up
        self._to_ack: list[str] = []
        self._to_hand_back: list[str] = []
        self._next_restore = 0.0
        self._drained = False  # the last round left every queue empty

    def take(self, n: int, timeout: float, *, interactive_only: bool = False
             ) -> list[Delivery]:
        if self._channel is None:
            self._connect()
        if time.monotonic() >= self._next_restore:
            self._channel.qos.restore_visible(num=self._channel.unacked_restore_limit,
                                              interval=1)
            self._next_restore = time.monotonic() + RESTORE_VISIBLE_EVERY_SECONDS
        self._hand_back_given_up()
        keys = self._interactive_keys if interactive_only else self._keys
        wait = n > 0 and timeout > 0
        with self._lock:
            acks, self._to_ack = self._to_ack, []
        # Queues emptied by the last round, no acks to send: straight to the BRPOP, which
        # returns at once if a message came meanwhile (one round trip less per micro-batch
        # when jobs come one at a time).
        raws = [] if wait and self._drained and not acks and not interactive_only else (
            self._round(max(n, 0), acks, keys))
        if not raws and wait:
            popped = self._redis.brpop(keys, timeout=timeout)
            if popped is not None:
                with self._lock:  # the acks asked for while it waited go with its round
                    acks, self._to_ack = self._to_ack, []
                raws = self._round(n, acks, keys, already_popped=popped[1])
        self._drained = not interactive_only and len(raws) < n
        return [delivery for delivery in map(self._delivery, raws) if delivery is not None]

    def ack(self, delivery: Delivery) -> None:
        """Sent with the next round (one round trip for many acks)."""
        with self._lock:
            self._unsettled.discard(delivery.handle)
            self._to_ack.append(delivery.handle)

    def give_up(self, delivery: Delivery) -> None:
        """Handed back by the next `take` (or `close`): kombu puts it at the head of its queue."""
        with self._lock:
            self._unsettled.discard(delivery.handle)
            self._to_hand_back.append(delivery.handle)

    def close(self) -> None:
        with self._lock:
            acks, self._to_ack = self._to_ack, []
            self._to_hand_back.extend(self._unsettled)
            self._unsettled.clear()
        if self._channel is None:  # never reached Redis (or lost it): nothing to send
            self._connection.release()
            return
        try:
            if acks:
                self._round(0, acks, [])
            self._hand_back_given_up()
        except self._connection.connection_errors + self._connection.channel_errors:
            log.warning("Redis unreachable at shutdown: %d acks not sent; unacked messages "
                        "wait for the visibility timeout", len(acks), exc_info=True)
        self._connection.release()

    def _connect(self) -> None:
        channel = self._connection.default_channel
        for queue in self._queues:  # kombu's restore routes a message back by these bindings
            queue.bind(channel).declare()
        self._redis = channel.Client(connection_pool=channel.pool)
        # kombu's BRPOP order: every queue's first priority step, then every queue's second...
        self._keys = [channel._q_for_pri(queue.name, step)
                      for step in channel.priority_steps for queue in self._queues]
        self._interactive_keys = [channel._q_for_pri(self._queues[0].name, step)
                                  for step in channel.priority_steps]
        self._script = self._redis.register_script(_ROUND)
        self._channel = channel  # last: a failure above is retried from the start

    def _round(self, limit: int, acks: list[str], keys: list[str],
               already_popped: bytes | None = None) -> list[bytes]:
        extra = [already_popped] if already_popped is not None else []
        try:
            return self._script(keys=[self._channel.unacked_key,
                                      self._channel.unacked_index_key, *keys],
                                args=[limit, len(acks), *acks, *extra])
        except BaseException:
            with self._lock:  # not sent: they go with the next round
                self._to_ack[:0] = acks
            if already_popped is not None:  # in hand but not recorded: run it all the same
                log.warning("a message could not be recorded as unacked; running it anyway")
                return [already_popped]
            raise

    def _hand_back_given_up(self) -> None:
        with self._lock:
            tags, self._to_hand_back = self._to_hand_back, []
        for index, tag in enumerate(tags):
            try:
                self._channel.qos.restore_by_tag(tag, client=self._redis)
            except BaseException:
                with self._lock:
                    self._to_hand_back.extend(tags[index:])
                raise

    def _delivery(self, raw: bytes) -> Delivery | None:
        try:
            message = self._channel.Message(loads(raw), channel=self._channel,
                                            accept=self._accept)
            tag = message.delivery_tag
            task = (message.headers or {}).get("task")
            if task != RUN_JOB_TASK:
                raise ValueError(f"task {task!r} is not {RUN_JOB_TASK}")
            job_id = job_id_of(message.decode())
        except Exception as exc:  # it would fail the same way on any worker: drop it
            log.error("dropping an undecodable job message %.200r: %s", raw, exc)
            tag = _delivery_tag(raw)
            if tag is not None:
                with self._lock:
                    self._to_ack.append(tag)
            return None
        with self._lock:
            self._unsettled.add(tag)
        return Delivery(job_id, tag)


def _delivery_tag(raw: bytes) -> str | None:
    try:
        return loads(raw)["properties"]["delivery_tag"]
    except Exception:
        return None
