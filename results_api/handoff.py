"""The long-lived part of a call (a wait, a stream), which a Flask view hands to the ASGI layer
(results_api.asgi) so that it holds no request thread; under plain WSGI it runs in the thread."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from flask import Flask, Response, current_app, g, request
from flask.typing import ResponseReturnValue

from genq.errors import GenqError
from genq.job_events import EventId
from genq.models import Job
from genq.settings import Settings
from producer.job_stream import JobStreamEvent, follow_job
from results_api.errors import error_response
from results_api.sse import stream_response

ASYNC_LAYER = "genq.async_layer"  # in the ASGI scope: the layer takes handoffs
HANDOFF = "genq.handoff"  # in the ASGI scope: the handoff of this call


@dataclass
class WaitThenAnswer:
    """Wait until the jobs finish or `seconds` pass, then answer (in a pool thread, in the app
    context). `release` runs once the wait ends, whatever happened; it must not block."""
    job_ids: list[str]
    seconds: float
    answer: Callable[[], ResponseReturnValue]
    release: Callable[[], None] = lambda: None
    on_error: Callable[[GenqError], ResponseReturnValue] = error_response


class EventRenderer(Protocol):
    """Turns a job's stream events into SSE text; `done` once the stream must end."""
    done: bool

    def start(self) -> list[str]: ...

    def on(self, event: JobStreamEvent) -> list[str]: ...


@dataclass
class Stream:
    """Follow the job and send what `render` makes of its events; `release` (in a pool thread)
    once the response closes, even before its first event."""
    settings: Settings
    tenant_id: str
    job: Job
    after: EventId | None
    render: EventRenderer
    release: Callable[[], None]


@dataclass
class Handoff:
    work: WaitThenAnswer | Stream
    app: Flask
    method: str
    route: str
    started: float = field(default_factory=time.perf_counter)


def hand_off(work: WaitThenAnswer | Stream) -> ResponseReturnValue:
    """Give `work` to the ASGI layer when there is one (the returned response is then never
    sent), else do it in this thread."""
    scope = request.environ.get("asgi.scope")
    if scope is not None and scope.get(ASYNC_LAYER):
        scope[HANDOFF] = Handoff(work, current_app._get_current_object(), request.method,
                                 request.url_rule.rule, g.get("metrics_started")
                                 or time.perf_counter())
        g.genq_handed_off = True  # results_api.metrics counts it once it is answered
        return Response(status=204)
    if isinstance(work, Stream):
        return stream_response(_stream_here(work), work.release)
    try:
        watcher = current_app.extensions["genq_job_watcher"]
        deadline = time.monotonic() + work.seconds
        for job_id in work.job_ids:
            watcher.wait(job_id, max(0.0, deadline - time.monotonic()))
    finally:
        work.release()
    return work.answer()


def _stream_here(work: Stream) -> Iterator[str]:
    yield from work.render.start()
    for event in follow_job(work.settings, work.tenant_id, work.job, work.after):
        yield from work.render.on(event)
        if work.render.done:
            return
