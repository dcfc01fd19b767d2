"""The API as an ASGI app (uvicorn workers under gunicorn): Flask answers every route in a
thread pool; the waits and streams its views hand off are served here on the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from a2wsgi import WSGIMiddleware
from flask import Flask

from genq.errors import ErrorCode, GenqError
from results_api import health, metrics
from results_api.app import create_app
from results_api.call_slots import CallSlots, caller_of, refusal
from results_api.handoff import ASYNC_LAYER, HANDOFF, Handoff, Stream, WaitThenAnswer
from results_api.stream_hub import StreamHub

log = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/readyz"})
PROBE_THREADS = 2
RELEASE_SECONDS = 1.5  # at shutdown, for the open calls' releases (gunicorn kills at 5 s)
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def create_asgi_app(config: dict | None = None) -> GenqAsgi:
    """`genq api`'s app (gunicorn: `'results_api.asgi:create_asgi_app()'`)."""
    return GenqAsgi(create_app(config))


class GenqAsgi:
    # Flask (in a2wsgi's bounded pool) authenticates, validates, admits and submits; what its
    # views hand off (results_api.handoff) waits here, its reads batched by one StreamHub per
    # process, so thousands of waits and streams stay open without a thread each. gevent was
    # the other way to cheap waits; its hub stalls on SQLite's busy waits and on tokenization,
    # which run in C without yielding: here they stay in threads.

    def __init__(self, flask_app: Flask) -> None:
        self.flask_app = flask_app
        self.settings = flask_app.config["GENQ_SETTINGS"]
        self.wsgi = WSGIMiddleware(flask_app, workers=self.settings.api_threads)
        # /readyz never queues behind a burst of ordinary calls in the pool above.
        self.probes = WSGIMiddleware(flask_app, workers=PROBE_THREADS)
        self.call_slots = CallSlots(self.settings.max_calls_per_key_resolved,
                                    self.settings.max_queued_calls_per_key)
        self._hub: StreamHub | None = None
        self._num_open = 0  # waits and streams, until released

    @property
    def hub(self) -> StreamHub:
        if self._hub is None:  # made on the server's event loop
            self._hub = StreamHub(self.settings)
        return self._hub

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return await self.wsgi(scope, receive, send)
        if scope["path"] == "/healthz" and scope["method"] in ("GET", "HEAD"):
            return await self._live(scope, send)
        if scope["path"] in PROBE_PATHS:
            return await self.probes(scope, receive, send)
        scope[ASYNC_LAYER] = True

        async def send_unless_handed_off(message) -> None:
            if HANDOFF not in scope:
                await send(message)

        # A call counts against its key from here until Flask is done with it, reading its
        # body included (a trickled upload holds its thread); a handed-off wait or stream has
        # left the pool by then and counts against the wait caps instead.
        caller = caller_of(scope)
        if not await self.call_slots.take(caller):
            return await self._refuse(send)
        try:
            await self.wsgi(scope, receive, send_unless_handed_off)
        finally:
            self.call_slots.give_back(caller)
        handoff: Handoff | None = scope.pop(HANDOFF, None)
        if handoff is None:
            return
        self._num_open += 1
        try:
            if isinstance(handoff.work, Stream):
                await self._stream(handoff, handoff.work, receive, send)
            else:
                await self._wait(handoff, handoff.work, receive, send)
        finally:
            self._num_open -= 1

    async def _live(self, scope, send) -> None:
        """Liveness is this loop answering: no thread hop, which under a busy pool waits its
        turn for the GIL (/healthz p99 0.4-0.6 s under benchmarks.load through the pool)."""
        started = time.perf_counter()
        body = json.dumps(health.LIVE).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body",
                    "body": body if scope["method"] == "GET" else b""})
        metrics.count_request(scope["method"], "/healthz", 200, started)

    async def _refuse(self, send) -> None:
        """A 429 at once, from the loop, to a key whose calls fill its slots and its queue."""
        headers, body = refusal(self.call_slots.per_key, self.call_slots.max_queued)
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        metrics.CALLS_REFUSED.inc()

    async def _wait(self, handoff: Handoff, work: WaitThenAnswer, receive, send) -> None:
        """A client that goes away frees its slot at once (its jobs run on: a poll or a
        webhook still gets them)."""
        gone = asyncio.ensure_future(_client_gone(receive))
        try:
            if work.job_ids:
                waiting = asyncio.ensure_future(
                    self.hub.wait_finished(work.job_ids, work.seconds))
                await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
        finally:
            gone.cancel()
            work.release()
        if gone.done() and not gone.cancelled():
            return
        status, headers, body = await self._in_pool(_answer, handoff.app, work)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        metrics.count_request(handoff.method, handoff.route, status, handoff.started)

    async def _stream(self, handoff: Handoff, work: Stream, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            metrics.count_request(handoff.method, handoff.route, 200, handoff.started)
            events = asyncio.ensure_future(self._send_events(work, send))
            gone = asyncio.ensure_future(_client_gone(receive))
            await asyncio.wait({events, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not events.done():  # the client went away: stop following its job
                events.cancel()
            elif events.exception() is None:
                await send({"type": "http.response.body", "body": b""})
            else:
                log.error("stream of job %s failed", work.job.id, exc_info=events.exception())
        finally:
            await self._in_pool(work.release)

    async def _send_events(self, work: Stream, send) -> None:
        async def send_text(texts: list[str]) -> None:
            if texts:
                await send({"type": "http.response.body", "body": "".join(texts).encode(),
                            "more_body": True})

        await send_text(work.render.start())
        events = self.hub.follow_job(work.tenant_id, work.job, work.after)
        try:
            async for event in events:
                await send_text(work.render.on(event))
                if work.render.done:
                    return
        finally:
            await events.aclose()

    async def _in_pool(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(
            self.wsgi.executor, function, *args)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # uvicorn canceled the calls still open: let them release their slots and
                # cancel their streams' jobs before it ends the process.
                deadline = time.monotonic() + RELEASE_SECONDS
                while self._num_open and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if self._hub is not None:
                    await self._hub.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _answer(app: Flask, work: WaitThenAnswer) -> tuple[int, list, bytes]:
    with app.app_context():
        try:
            response = app.make_response(work.answer())
        except GenqError as error:
            response = app.make_response(work.on_error(error))
        except Exception:  # as Flask's own handler would: logged, a JSON 500
            log.exception("answering a wait failed")
            response = app.make_response(work.on_error(GenqError(
                ErrorCode.INTERNAL, "internal error; see the API's log")))
        headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                   for name, value in response.headers.to_wsgi_list()]
        return response.status_code, headers, response.get_data()


async def _client_gone(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
