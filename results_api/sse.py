"""Server-sent events for the API: the wire format, and a WSGI response that releases the
stream's wait slot (results_api.waits) once it closes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response

# A comment line: sent when nothing else was, so a closed connection is noticed (the write
# fails) within a second or so, and proxies keep the connection open.
KEEP_ALIVE = ": keep-alive\n\n"


def sse(data: Any, event: str | None = None, event_id: str | None = None) -> str:
    """One event; `data` is sent as JSON unless it is a str."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"),
                                                        ensure_ascii=False)
    head = (f"event: {event}\n" if event else "") + (f"id: {event_id}\n" if event_id else "")
    return head + "".join(f"data: {line}\n" for line in text.split("\n")) + "\n"


class _HeldStream:
    """The events of `events`, then `release()` once: when they end, or when the server
    closes the response (a client that went away), even if never started."""

    def __init__(self, events: Iterator[str], release: Callable[[], None]) -> None:
        self._events, self._release = events, release

    def __iter__(self) -> Iterator[str]:
        return self._events

    def close(self) -> None:
        try:
            self._events.close()
        finally:
            release, self._release = self._release, lambda: None
            release()


def stream_response(events: Iterator[str], release: Callable[[], None]) -> Response:
    """An SSE response of `events`; `release` (the stream's slot) is called once it closes."""
    return Response(_HeldStream(events, release), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
