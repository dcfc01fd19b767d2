"""RabbitMQ's interactive reserve: a consumer on a connection of its own that takes up to a few
interactive jobs beyond the full prefetch window of Celery's consumer, as the Redis fetcher's
urgent reserve does. Without it an interactive message waits for a window slot behind long jobs.

Celery's consumer takes the interactive queue too (its window is the usual way in); this one
only matters while that window is full. A kombu channel is not thread-safe, so acks asked for
by other threads are queued and sent by this consumer's own thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from kombu import Connection, Consumer, Queue
from kombu.message import Message

from workers.micro_batch import JobMessage

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05  # how long an ack asked for by another thread may wait to be sent
RECONNECT_SECONDS = 1.0


class InteractiveReserve:
    def __init__(self, broker_url: str, queue: Queue, reserve: int,
                 receive: Callable[[JobMessage], None]) -> None:
        self.broker_url = broker_url
        self.queue = queue
        self.reserve = reserve
        self.receive = receive
        self._acks: deque[Message] = deque()
        self._consuming = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genq-interactive-reserve",
                                        daemon=True)

    def start(self) -> None:
        self._consuming.set()
        self._thread.start()

    def stop(self) -> None:
        """No more messages; the ones taken are still acked (call `close` after the drain)."""
        self._consuming.clear()

    def close(self, timeout: float = 5.0) -> None:
        """Send the acks asked for, then close the connection: the broker requeues what is
        still unacked (its jobs were handed back, or never started)."""
        self._closing.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                with Connection(self.broker_url, heartbeat=0) as connection:
                    self._serve(connection)
            except Exception:  # broker restart, lost connection: its unacked are requeued
                log.warning("interactive reserve: connection lost; reconnecting",
                            exc_info=True)
                self._acks.clear()  # their messages come back; a finished job's is a no-op
                self._closing.wait(RECONNECT_SECONDS)

    def _serve(self, connection: Connection) -> None:
        channel = connection.channel()
        channel.basic_qos(prefetch_size=0, prefetch_count=self.reserve, a_global=False)
        consumer = Consumer(channel, [self.queue], callbacks=[self._on_message],
                            accept=["json"])
        consuming = False
        while True:
            self._send_acks()
            if self._closing.is_set():
                return
            if self._consuming.is_set() != consuming:
                consuming = not consuming
                consumer.consume() if consuming else consumer.cancel()
            try:
                connection.drain_events(timeout=POLL_SECONDS)
            except TimeoutError:
                pass

    def _on_message(self, body: object, message: Message) -> None:
        self.receive(JobMessage(body, lambda: self._acks.append(message)))

    def _send_acks(self) -> None:
        while self._acks:
            self._acks.popleft().ack()
