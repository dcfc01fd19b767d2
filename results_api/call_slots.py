"""Each credential's share of the API's Flask pool (the rest of its calls wait on the event
loop), so that no key's slow calls take every request thread from the other tenants."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter, deque

from genq.errors import ErrorCode, GenqError
from results_api.dashboard import SESSION_COOKIE

RETRY_AFTER_SECONDS = 1
ANONYMOUS = b""  # calls without a credential share one bucket (Flask refuses most at once)


class CallSlots:
    """Calls in the pool (waiting for a thread or holding one) per credential, at most
    `per_key` each; beyond, up to `max_queued` more wait their turn here on the event loop,
    holding no thread, and the rest are refused. Used on the event loop only (no lock)."""

    def __init__(self, per_key: int, max_queued: int) -> None:
        self.per_key, self.max_queued = per_key, max_queued
        self._running: Counter[bytes] = Counter()
        self._queued: dict[bytes, deque[asyncio.Future]] = {}

    async def take(self, caller: bytes) -> bool:
        """True once the caller holds a slot; False (at once) if its queue is full."""
        if self._running[caller] < self.per_key:
            self._running[caller] += 1
            return True
        queue = self._queued.setdefault(caller, deque())
        if len(queue) >= self.max_queued:
            if not queue:
                del self._queued[caller]
            return False
        turn = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn  # give_back hands its slot over: the running count stays
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give_back(caller)  # handed a slot, then cancelled before using it
            elif turn in queue:  # give_back may have dropped it already
                queue.remove(turn)
                if not queue and self._queued.get(caller) is queue:
                    del self._queued[caller]
            raise
        return True

    def give_back(self, caller: bytes) -> None:
        queue = self._queued.get(caller)
        while queue:
            turn = queue.popleft()
            if not queue:
                del self._queued[caller]
            if not turn.done():
                turn.set_result(None)
                return
        self._running[caller] -= 1
        if not self._running[caller]:
            del self._running[caller]


def caller_of(scope: dict) -> bytes:
    """A digest of the call's credential, read from its headers without a database read: the
    Bearer value, else the dashboard's session cookie. The raw key is never kept."""
    credential = ANONYMOUS
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                credential = b"bearer:" + token.strip()
                break
        elif name == b"cookie" and credential == ANONYMOUS:
            session = _session_cookie(value)
            if session:
                credential = b"session:" + session
    if credential == ANONYMOUS:
        return ANONYMOUS
    return hashlib.blake2b(credential, digest_size=16).digest()


def _session_cookie(header: bytes) -> bytes:
    """The dashboard session's signed payload, without the timestamp and signature that Flask
    renews on each response: one session keeps one bucket."""
    prefix = SESSION_COOKIE.encode() + b"="
    for part in header.split(b";"):
        part = part.strip()
        if part.startswith(prefix):
            return part[len(prefix):].rsplit(b".", 2)[0]
    return b""


def refusal(per_key: int, max_queued: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The 429's headers and JSON body."""
    body = json.dumps(GenqError(
        ErrorCode.RATE_LIMITED, f"this API key already has {per_key} calls in progress and "
        f"{max_queued} waiting on this API process (GENQ_MAX_CALLS_PER_KEY, "
        f"GENQ_MAX_QUEUED_CALLS_PER_KEY); retry when one has ended").to_dict()
    ).encode()
    return [(b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_SECONDS).encode())], body
