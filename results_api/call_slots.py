"""Calls of one credential in the API's Flask pool, capped, so that no key's slow calls (trickled
uploads, big lists, bursts of submits) take every request thread from the other tenants."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from genq.errors import ErrorCode, GenqError
from results_api.dashboard import SESSION_COOKIE

RETRY_AFTER_SECONDS = 1
ANONYMOUS = b""  # calls without a credential share one bucket (Flask refuses most at once)


class CallSlots:
    """Calls in the pool (waiting for a thread or holding one) per credential, at most
    `per_key` each. Used on the event loop only, so it needs no lock."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._by_caller: Counter[bytes] = Counter()

    def try_take(self, caller: bytes) -> bool:
        if self._by_caller[caller] >= self.per_key:
            return False
        self._by_caller[caller] += 1
        return True

    def give_back(self, caller: bytes) -> None:
        self._by_caller[caller] -= 1
        if not self._by_caller[caller]:
            del self._by_caller[caller]


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


def refusal(per_key: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The 429's headers and JSON body."""
    body = json.dumps(GenqError(
        ErrorCode.RATE_LIMITED, f"this API key already has {per_key} calls in progress on "
        f"this API process (GENQ_MAX_CALLS_PER_KEY); retry when one has ended").to_dict()
    ).encode()
    return [(b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_SECONDS).encode())], body
