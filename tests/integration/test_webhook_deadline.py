"""A webhook attempt ends at its wall-clock deadline, against a real socket: a receiver that
trickles its answer a byte at a time cannot hold a webhook thread past the timeout."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from genq.webhook_urls import WebhookTarget
from workers.webhook_delivery import post

pytestmark = pytest.mark.integration


def _trickling_receiver(stop: threading.Event) -> int:
    """Accepts connections, reads the request, then sends its answer one byte every 0.2 s."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            try:
                for byte in answer:
                    if stop.is_set():
                        break
                    conn.sendall(bytes([byte]))
                    time.sleep(0.2)
            except OSError:  # the sender hung up: what the deadline is for
                pass
            conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


@pytest.mark.parametrize("when", ["headers", "body"])
def test_a_trickling_receiver_is_cut_off_at_the_attempt_deadline(when):
    stop = threading.Event()
    port = _trickling_receiver(stop)
    timeout = 2.0 if when == "headers" else 12.0  # the headers alone take ~8 s to trickle
    target = WebhookTarget("http", "127.0.0.1", port, "/hook", "127.0.0.1")
    try:
        started = time.monotonic()
        outcome = post(target, {}, b"{}", timeout_seconds=timeout)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
    assert elapsed < timeout + 1.5, elapsed
    assert not outcome.is_delivered and outcome.error
