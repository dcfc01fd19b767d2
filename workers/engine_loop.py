"""One engine per worker process, driven by one thread; Celery task threads hand it requests.

Why this design: Celery's threads pool runs up to `worker_concurrency` tasks at once, each
blocked on a Future here. The loop thread adds their requests to the running engine between
steps, so jobs join and leave the batch continuously (continuous batching), while Celery keeps
doing what it is good at: reserving, acking and redelivering messages.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from engine import LLMEngine, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: str | list[dict]
    params: SamplingParams
    priority: int


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._futures: dict[str, Future[RequestOutput]] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genq-engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(timeout)

    def submit(self, request: EngineRequest) -> Future[RequestOutput]:
        """Add a request to the engine; the Future resolves with its final RequestOutput.

        Raises ValueError at once when the engine refuses the request (e.g. prompt too long).
        """
        future: Future[RequestOutput] = Future()
        with self._lock:
            if request.request_id in self._futures:
                raise ValueError(f"request {request.request_id} is already in flight")
            self.engine.add_request(
                request.request_id, request.prompt, request.params, priority=request.priority
            )
            self._futures[request.request_id] = future
        self._wakeup.set()
        return future

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._wakeup.set()

    def in_flight(self) -> list[str]:
        with self._lock:
            return list(self._futures)

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the engine broke: fail what is in flight, keep serving
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(exc)
                continue
            for output in outputs:
                if output.finished:
                    self._resolve(output)

    def _resolve(self, output: RequestOutput) -> None:
        with self._lock:
            future = self._futures.pop(output.request_id, None)
        if future is not None:
            future.set_result(output)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            futures, self._futures = self._futures, {}
        for request_id, future in futures.items():
            self.engine.abort_request(request_id)
            future.set_exception(exc)
