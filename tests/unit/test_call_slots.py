"""Who a call counts against in the API's pool (results_api.call_slots), and its slots."""

from __future__ import annotations

import asyncio

from flask import Flask

from genq.settings import Settings
from results_api.call_slots import ANONYMOUS, CallSlots, caller_of
from results_api.dashboard import SESSION_COOKIE


def _scope(*headers: tuple[str, str]) -> dict:
    return {"headers": [(name.encode(), value.encode()) for name, value in headers]}


def test_a_bearer_key_is_its_own_bucket_and_never_kept_raw():
    one = caller_of(_scope(("authorization", "Bearer sk-one")))

    assert one == caller_of(_scope(("authorization", "bearer  sk-one ")))
    assert one != caller_of(_scope(("authorization", "Bearer sk-two")))
    assert b"sk-one" not in one and len(one) == 16


def test_calls_without_a_credential_share_one_bucket():
    assert caller_of(_scope()) == ANONYMOUS
    assert caller_of(_scope(("authorization", "Basic dXNlcg=="))) == ANONYMOUS
    assert caller_of(_scope(("authorization", "Bearer "))) == ANONYMOUS
    assert caller_of(_scope(("cookie", "other=1"))) == ANONYMOUS


def test_a_dashboard_session_keeps_its_bucket_when_flask_signs_it_again():
    app = Flask(__name__)
    app.secret_key = "test"
    signed = app.session_interface.get_signing_serializer(app).dumps({"key_id": "key_1"})
    payload = signed.rsplit(".", 2)[0]

    first = caller_of(_scope(("cookie", f"a=1; {SESSION_COOKIE}={payload}.AAAA.sig1")))
    renewed = caller_of(_scope(("cookie", f"{SESSION_COOKIE}={payload}.AAAB.sig2")))

    assert first == renewed != ANONYMOUS
    assert first != caller_of(_scope(("cookie", f"{SESSION_COOKIE}=other.AAAA.sig1")))
    bearer = caller_of(_scope(("cookie", f"{SESSION_COOKIE}={signed}"),
                              ("authorization", "Bearer sk-one")))
    assert bearer == caller_of(_scope(("authorization", "Bearer sk-one")))  # the key first


def test_a_key_holds_its_share_then_queues_then_is_refused():
    async def scenario() -> None:
        slots = CallSlots(per_key=2, max_queued=1)
        assert [await slots.take(b"a") for _ in range(2)] == [True, True]
        queued = asyncio.ensure_future(slots.take(b"a"))
        await asyncio.sleep(0)
        assert not queued.done()  # waiting its turn, holding no slot
        assert await slots.take(b"a") is False  # the queue is full: refused at once
        assert await slots.take(b"b")  # another key is not held back
        slots.give_back(b"a")  # a slot ends: the queued call gets it
        assert await queued is True
        cancelled = asyncio.ensure_future(slots.take(b"a"))
        await asyncio.sleep(0)
        cancelled.cancel()  # a queued call that goes away leaves the queue
        await asyncio.gather(cancelled, return_exceptions=True)
        for _ in range(2):
            slots.give_back(b"a")
        assert [await slots.take(b"a") for _ in range(2)] == [True, True]

    asyncio.run(scenario())


def test_the_default_share_is_half_the_pool_and_at_least_one():
    assert Settings(api_threads=8).max_calls_per_key_resolved == 4
    assert Settings(api_threads=1).max_calls_per_key_resolved == 1
    assert Settings(api_threads=8, max_calls_per_key=6).max_calls_per_key_resolved == 6
