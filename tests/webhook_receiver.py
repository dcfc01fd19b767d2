"""Webhook test helpers: a real HTTP receiver (a threaded server on 127.0.0.1 that answers from
a script: status, headers or a hang, and records every request) and the tests' broker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook

from tests.conftest import REDIS_URL, free_port, require_service

# Webhook tests' Redis database: their webhook workers consume `genq.webhooks` there, and the
# run messages of the jobs they submit pile up unconsumed (no job worker reads it).
WEBHOOK_TEST_REDIS_DB = 12


def webhook_test_broker_url() -> str:
    require_service("Redis", REDIS_URL)
    return REDIS_URL.rsplit("/", 1)[0] + f"/{WEBHOOK_TEST_REDIS_DB}"


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang_seconds: float = 0.0  # sleep before answering (longer than the sender's timeout)


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic()
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """Answers the n-th request with `script[n]` (the last entry repeats)."""

    def __init__(self, script: list[Reply] | None = None, port: int | None = None) -> None:
        self.script = script or [Reply()]
        self.port = port or free_port()
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests.append(Received(time.monotonic(), self.path,
                                                      dict(self.headers.items()), body))
                    reply = receiver.script[min(len(receiver.requests), len(receiver.script)) - 1]
                if reply.hang_seconds:
                    time.sleep(reply.hang_seconds)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def verified(self, secret: str) -> list[dict]:
        """Every request's payload, each checked by the official standardwebhooks package."""
        return [Webhook(secret).verify(r.body, r.headers) for r in self.requests]


@contextmanager
def receiving(script: list[Reply] | None = None, port: int | None = None) -> Iterator[Receiver]:
    receiver = Receiver(script, port).start()
    try:
        yield receiver
    finally:
        receiver.stop()
