"""One engine, driven by one thread; the worker hands it requests. In a worker the loop runs
inside the engine's own process (workers.engine_process), which passes requests and outcomes
over a pipe; tests drive it in-process.

Why this design: the worker (workers.worker) submits each claimed job and gets a
Future, resolved with the final output (its callback writes the result; nobody blocks per
job). The loop thread adds new requests to the running engine between steps, so jobs join and
leave the batch continuously (continuous batching), while the broker keeps doing what it is good
at: reserving, acking and redelivering messages. Only the loop thread calls the engine's
add_request/step; other threads just append to `_pending`.

The loop thread also builds the engine: torch's CPU kernels ran ~1.7x slower on a thread
other than the one that loaded the model (measured on Zen 4, bf16: 8.9 s vs 5.3 s for the same
150 prompts), so the engine is created where it will run.

Fault isolation: if a step raises, the loop cannot tell which request broke it, so it aborts the
batch and re-runs each of its requests alone ("isolated"); the one that fails alone gets the
exception, its neighbours finish normally. A re-run resumes from the tokens its request had
produced (the abort's partial output), not from scratch: what was streamed stays the start of
the final output, and the re-run's deltas continue it. Requests submitted with `isolated=True`
run alone the same way. Interactive requests are admitted beside an isolated one all the same:
the isolation never holds them back. (A job lost with a worker that was starting it, or lost
twice, is isolated by the worker instead, which starts such suspects one at a time
(workers.in_flight): a dead process takes its engine queue with it, so isolation here could not
protect the waiting jobs.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from genq.states import Priority

if TYPE_CHECKING:  # the loop runs in the engine process; its importers need no torch
    from engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

INTERACTIVE_RANK = Priority.INTERACTIVE.rank


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: str | list[dict]
    params: SamplingParams
    priority: int
    isolated: bool = False
    stream: bool = False  # report its new tokens at every step (on_deltas)
    resume_from: CompletionOutput | None = None  # a failed step's partial output, to go on from


@dataclass
class _InFlight:
    request: EngineRequest
    future: Future[RequestOutput] = field(default_factory=Future)
    partial: RequestOutput | None = None  # a re-run's output so far (an abort's), to resume


class EngineLoop:
    def __init__(self, make_engine: Callable[[], LLMEngine],
                 batch_wait_seconds: float = 0.0,
                 after_pass: Callable[[], None] | None = None,
                 on_deltas: Callable[[list[RequestOutput]], None] | None = None) -> None:
        """`after_pass`: called by the loop thread after each pass (admit, step, resolve), e.g.
        to send the outcomes the pass resolved in one message. `on_deltas`: called by the loop
        thread with the deltas of a step's unfinished streamed requests, all in one call."""
        self._make_engine = make_engine
        self._on_deltas = on_deltas or (lambda deltas: None)
        self._after_pass = after_pass or (lambda: None)
        self.engine: LLMEngine | None = None  # built by the loop thread in `start`
        self._built: Future[None] = Future()
        self.batch_wait_seconds = batch_wait_seconds
        self._pending: deque[_InFlight] = deque()
        self._isolated: deque[_InFlight] = deque()
        self._running: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genq-engine-loop", daemon=True)

    def start(self) -> None:
        """Start the loop thread and wait until it has built the engine (raises what the
        build raised)."""
        self._thread.start()
        self._built.result()

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(timeout)

    def submit(self, request: EngineRequest) -> Future[RequestOutput]:
        """Queue a request for the engine; the Future resolves with its final RequestOutput,
        or raises ValueError when the engine refuses it (e.g. prompt too long)."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[EngineRequest]) -> list[Future[RequestOutput]]:
        """`submit` for a micro-batch of requests (one wake-up of the loop)."""
        items = [_InFlight(request) for request in requests]
        with self._lock:
            for item in items:
                (self._isolated if item.request.isolated else self._pending).append(item)
        self._wakeup.set()
        return [item.future for item in items]

    def abort(self, request_id: str) -> None:
        with self._lock:
            queued = [i for i in (*self._pending, *self._isolated)
                      if i.request.request_id == request_id]
            running = request_id in self._running
        for item in queued:  # not in the engine: finish it here, with its output so far
            self._forget(item)
            if item.partial is not None:
                item.future.set_result(item.partial)
            else:
                item.future.set_exception(RequestAborted(request_id))
        if running:
            self.engine.abort_request(request_id)
            self._wakeup.set()

    def in_flight(self) -> list[str]:
        with self._lock:
            items = [*self._running.values(), *self._pending, *self._isolated]
        return [item.request.request_id for item in items]

    def _run(self) -> None:
        try:
            self.engine = self._make_engine()
        except BaseException as exc:  # reported to `start`, which re-raises it
            self._built.set_exception(exc)
            return
        self._built.set_result(None)
        while not self._stopping.is_set():
            if not self._running and not self._has_queued():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                if self.batch_wait_seconds:  # let a burst of messages land in one first step
                    time.sleep(self.batch_wait_seconds)
                continue
            try:
                self._pass()
            finally:
                self._after_pass()

    def _pass(self) -> None:
        """Admit what is queued, run one engine step, resolve the requests it finished."""
        self._admit()
        if not self._running:
            return
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self._recover_from_failed_step(exc)
            return
        deltas = []
        for output in outputs:
            if output.finished:
                self._resolve(output)
            else:
                deltas.append(output)
        if deltas:
            self._on_deltas(deltas)

    def _has_queued(self) -> bool:
        with self._lock:
            return bool(self._pending or self._isolated)

    def _admit(self) -> None:
        """Move queued requests into the engine. An isolated request waits for an empty engine
        and then runs alone, except beside interactive requests: the quarantine never holds
        those back (at worst one is lost with the suspect once, and runs again)."""
        with self._lock:
            isolating = bool(self._isolated) or any(
                item.request.isolated for item in self._running.values())
            if not isolating:
                batch, self._pending = list(self._pending), deque()
            else:
                batch = [i for i in self._pending if i.request.priority == INTERACTIVE_RANK]
                self._pending = deque(i for i in self._pending
                                      if i.request.priority != INTERACTIVE_RANK)
                if self._isolated and not self._running and not batch:
                    batch = [self._isolated.popleft()]
        for item in batch:
            request = item.request
            try:
                self.engine.add_request(request.request_id, request.prompt, request.params,
                                        priority=request.priority, stream=request.stream,
                                        resume_from=request.resume_from)
            except Exception as exc:
                item.future.set_exception(exc)
                continue
            with self._lock:
                self._running[request.request_id] = item

    def _resolve(self, output: RequestOutput) -> None:
        with self._lock:
            item = self._running.pop(output.request_id, None)
        if item is not None:
            item.future.set_result(output)

    def _recover_from_failed_step(self, exc: Exception) -> None:
        with self._lock:
            batch, self._running = list(self._running.values()), {}
        partial = self._abort_all([item.request.request_id for item in batch])
        if len(batch) == 1 and batch[0].request.isolated:
            log.error("request %s failed alone in the engine: %s", batch[0].request.request_id,
                      exc)
            batch[0].future.set_exception(exc)
            return
        log.exception("engine step failed; re-running its %d requests one at a time", len(batch))
        with self._lock:
            for item in reversed(batch):
                output = partial.get(item.request.request_id)
                rerun = replace(item.request, isolated=True,
                                resume_from=output.outputs[0] if output else None)
                self._isolated.appendleft(_InFlight(rerun, item.future, output))

    def _abort_all(self, request_ids: list[str]) -> dict[str, RequestOutput]:
        """Abort these requests (all the engine runs) at once, so that no step computes any of
        them again; their partial outputs that have tokens, by request id."""
        partial: dict[str, RequestOutput] = {}
        try:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            while self.engine.has_unfinished_requests():  # flush the aborted requests out
                for output in self.engine.step():
                    if output.finished and output.outputs and output.outputs[0].token_ids:
                        partial[output.request_id] = output
        except Exception:  # a re-run of a request still in the engine fails as a duplicate
            log.exception("the engine could not abort %s after a failed step", request_ids)
        return partial

    def _forget(self, item: _InFlight) -> None:
        with self._lock:
            for queue in (self._pending, self._isolated):
                if item in queue:
                    queue.remove(item)


class RequestAborted(Exception):
    """The request was aborted before it produced a token (no partial output exists)."""
