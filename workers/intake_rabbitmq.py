"""The RabbitMQ intake, on kombu's public API: a consumer of the model's job queues with a
prefetch of the worker's window, and a second one of its interactive queue with a prefetch of
the reserve, which takes interactive jobs beyond a full window. The broker pushes messages
within those windows; `take` hands over what arrived. Unacked messages go back to their queue
when the channel closes (`close`, a lost connection, a killed worker).

A kombu channel is not thread-safe: `ack` and `give_up`, called from other threads, are queued
and sent by the thread that calls `take` (and by `close`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from kombu import Connection, Consumer, Queue
from kombu.message import Message

from workers.intake import Delivery, job_id_of

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05  # how long an ack asked for by another thread may wait to be sent
MAX_READY_FRAMES = 1000  # read per take at most, so a flood of frames cannot hold it forever


class RabbitMQIntake:
    """`queues`: the interactive queue first, then the model's priority queue. Deliveries'
    handles are (connection generation, kombu Message): a settle that arrives after the
    connection was lost is dropped, its message already back in its queue."""

    def __init__(self, broker_url: str, queues: list[Queue], window: int, reserve: int = 0
                 ) -> None:
        self.broker_url = broker_url
        self._queues = queues
        self._window = window
        self._reserve = reserve
        self._connection: Connection | None = None
        self._generation = 0
        self._lock = threading.Lock()
        self._settles: deque[tuple[int, Message, bool]] = deque()  # (generation, message, ack)
        self._arrived: deque[Message] = deque()
        self._arrived_interactive: deque[Message] = deque()
        self._unsettled: set[Message] = set()

    def take(self, n: int, timeout: float, *, interactive_only: bool = False
             ) -> list[Delivery]:
        if self._connection is None:
            self._connect()
        try:
            deadline = time.monotonic() + timeout
            while True:
                self._send_settles()
                self._drain_ready()
                if (self._arrived_interactive or (self._arrived and not interactive_only)
                        or n <= 0 or time.monotonic() >= deadline):
                    break
                self._drain(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        except Exception:
            self._disconnect()
            raise
        return self._hand_over(n, interactive_only)

    def ack(self, delivery: Delivery) -> None:
        generation, message = delivery.handle
        with self._lock:
            self._settles.append((generation, message, True))

    def give_up(self, delivery: Delivery) -> None:
        generation, message = delivery.handle
        with self._lock:
            self._settles.append((generation, message, False))

    def close(self) -> None:
        """Send the acks and hand-backs asked for, then close: the broker requeues the rest."""
        if self._connection is None:
            return
        try:
            self._send_settles()
        except Exception:
            log.warning("RabbitMQ unreachable at shutdown: unacked messages are requeued when "
                        "the connection drops", exc_info=True)
        self._disconnect()

    def _connect(self) -> None:
        # No heartbeats: `take` may not run for a while (a drain), and a missed heartbeat
        # would drop the connection and requeue every message of the jobs in flight.
        connection = Connection(self.broker_url, heartbeat=0)
        connection.ensure_connection(max_retries=1)
        jobs = connection.channel()
        jobs.basic_qos(prefetch_size=0, prefetch_count=self._window, a_global=False)
        Consumer(jobs, self._queues, callbacks=[self._on_message],
                 accept=["json"]).consume()
        if self._reserve:
            reserve = connection.channel()
            reserve.basic_qos(prefetch_size=0, prefetch_count=self._reserve, a_global=False)
            Consumer(reserve, self._queues[:1], callbacks=[self._on_message],
                     accept=["json"]).consume()
        self._connection = connection

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        self._generation += 1
        self._arrived.clear()
        self._arrived_interactive.clear()
        self._unsettled.clear()
        if connection is not None:
            try:
                connection.release()
            except Exception:
                log.debug("closing the RabbitMQ connection failed", exc_info=True)

    def _on_message(self, _body: object, message: Message) -> None:
        """Interactive messages apart, whichever consumer got them: they are handed over first,
        and alone into the reserve."""
        interactive = message.delivery_info.get("routing_key") == self._queues[0].name
        (self._arrived_interactive if interactive else self._arrived).append(message)

    def _drain_ready(self) -> None:
        """Read every message already received: an interactive one that came right behind a
        few others is handed over with them, first (one read takes one frame)."""
        for _ in range(MAX_READY_FRAMES):
            try:
                self._connection.drain_events(timeout=0)
            except TimeoutError:
                return

    def _drain(self, timeout: float) -> None:
        try:
            self._connection.drain_events(timeout=timeout)
        except TimeoutError:
            pass

    def _hand_over(self, n: int, interactive_only: bool) -> list[Delivery]:
        deliveries = []
        sources = [self._arrived_interactive] + ([] if interactive_only else [self._arrived])
        for arrived in sources:
            while arrived and len(deliveries) < n:
                message = arrived.popleft()
                try:
                    job_id = job_id_of(message.decode())
                except Exception as exc:  # it would fail the same way on any worker: drop it
                    log.error("dropping a malformed job message %.200r: %s", message.body, exc)
                    message.ack()
                    continue
                self._unsettled.add(message)
                deliveries.append(Delivery(job_id, (self._generation, message)))
        return deliveries

    def _send_settles(self) -> None:
        while True:
            with self._lock:
                if not self._settles:
                    return
                generation, message, ack = self._settles.popleft()
            if generation != self._generation or message not in self._unsettled:
                continue  # its connection is gone: the broker requeued it already
            self._unsettled.discard(message)
            message.ack() if ack else message.reject(requeue=True)
