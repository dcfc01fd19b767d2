"""The worker's engine in a process of its own, fed over a pipe (as vLLM V1's EngineCore).

Why: the worker's own threads fetch messages, claim jobs, commit results and ack, all in
Python. In one process they share the GIL with the engine loop, and on a GPU an engine step
is Python-bound (it launches kernels), so the worker's bookkeeping stalled the GPU: on an
H200 host, 1000 prompts ran through the system at 0.74x of `LLM.generate` in the same run
(benchmarks/results-queue-overhead-h200.json). In its own process the engine loop steps as it
does offline, and the worker's process keeps the job bookkeeping.

`EngineProcess` has EngineLoop's interface (start, submit → Future, abort, in_flight, stop).
The child runs an EngineLoop (workers.engine_loop: continuous batching, fault isolation) and a
pipe reader that hands it requests and aborts. Both directions go in batches: a micro-batch
of requests is one message, and the outcomes of the requests that one engine step finished
come back as one message, with the step's deltas of streamed requests and the engine's stats
(which also come every `STATS_SECONDS`, for the worker's metrics). On a machine with few cores
every wake-up of a thread here or in the worker preempts one of torch's threads, which the
others then wait for at the next barrier, so one message per step rather than one per job is
worth it (benchmarks.queue_overhead).

Lifetimes:
- The child ignores SIGINT and SIGTERM (a Ctrl-C, or systemd's stop, reaches every process of
  the group): the worker drains its jobs first and then stops the engine with a message, at
  the latest when it exits.
- The worker dies (kill -9): its end of the pipe closes, and the child exits within
  `STATS_SECONDS`.
- The engine process dies (a segfault, the OOM killer): the worker exits at once, as it would
  have with the engine in its own process. Its jobs' messages are unacked and their leases
  run out, so they run again elsewhere; a job that kills every engine it reaches fails after
  `max_attempts`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from multiprocessing.connection import Connection

from engine.outputs import EngineStats, RequestOutput
from genq.settings import Settings
from workers.engine_loop import EngineLoop, EngineRequest

log = logging.getLogger(__name__)

STATS_SECONDS = 1.0
ENGINE_DIED_EXIT_CODE = 70  # EX_SOFTWARE


def engine_options(settings: Settings) -> dict:
    """The worker's engine, sized by its settings, as EngineConfig's arguments (the engine
    process builds it; benchmarks build the same engine offline with `LLM(**options)`)."""
    return {
        "model": settings.model,
        "dtype": settings.engine_dtype,
        "device": settings.engine_device,
        "max_num_seqs": settings.worker_concurrency,
        "max_num_batched_tokens": settings.engine_max_num_batched_tokens,
        "cache_dir": str(settings.model_cache_dir_resolved),
        "num_threads": settings.engine_threads_resolved,
        "quantization": settings.engine_quantization,
        **({"kv_cache_tokens": settings.engine_kv_cache_tokens}
           if settings.engine_kv_cache_tokens else {}),
    }


def make_engine(options: dict):
    """The engine a worker serves, from EngineConfig's arguments: the echo engine for the model
    "echo", else the LLMEngine. Imported here, in the engine process: the worker's own process
    never imports torch (~1.4 s and ~280 MB; even building an EngineConfig would, to resolve
    the device)."""
    from engine.echo import ECHO_MODEL, EchoEngine
    from engine.llm_engine import EngineConfig, LLMEngine

    if options["model"] == ECHO_MODEL:
        return EchoEngine(cache_dir=options.get("cache_dir"))
    return LLMEngine(EngineConfig(**options))


class EngineProcess:
    def __init__(self, options: dict, batch_wait_seconds: float = 0.0,
                 on_deltas: Callable[[list[RequestOutput]], None] | None = None) -> None:
        """`options`: EngineConfig's arguments (the engine process builds the config).
        `on_deltas`: called (by the outcome reader) with a step's streamed deltas, before the
        outcomes of that step."""
        self._on_deltas = on_deltas or (lambda deltas: None)
        context = multiprocessing.get_context("spawn")  # no forked CUDA state, no held locks
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve,
                                        args=(child_conn, options, batch_wait_seconds),
                                        name="genq-engine", daemon=True)
        self._futures: dict[str, Future[RequestOutput]] = {}
        self._lock = threading.Lock()  # the futures, and sends (a Connection is not shared)
        self._stopping = False
        self.stats: EngineStats | None = None  # the engine's latest, for metrics

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self) -> None:
        """Start the engine process and wait until it has built the engine (raises what the
        build raised)."""
        self._process.start()
        # Before multiprocessing's own exit handler, which would SIGTERM (ignored) and wait.
        atexit.register(self.stop, timeout=5)
        try:
            kind, *payload = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError("the engine process exited while starting (exit code "
                               f"{self._process.exitcode})") from None
        if kind == "failed":
            raise payload[0]
        threading.Thread(target=self._read, name="genq-engine-outcomes", daemon=True).start()

    def submit(self, request: EngineRequest) -> Future[RequestOutput]:
        """Queue a request for the engine; the Future resolves with its final RequestOutput,
        or raises ValueError when the engine refuses it (e.g. prompt too long)."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[EngineRequest]) -> list[Future[RequestOutput]]:
        """`submit` for a micro-batch of requests, sent as one message."""
        futures: list[Future[RequestOutput]] = [Future() for _ in requests]
        with self._lock:
            for request, future in zip(requests, futures, strict=True):
                self._futures[request.request_id] = future
            self._conn.send(("submit", requests))
        return futures

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._futures:
                self._conn.send(("abort", request_id))

    def in_flight(self) -> list[str]:
        with self._lock:
            return list(self._futures)

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            self._stopping = True
            try:
                self._conn.send(("stop", None))
            except OSError:  # already gone
                pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()

    def _read(self) -> None:
        while True:
            try:
                kind, *payload = self._conn.recv()
            except (EOFError, OSError):
                if self._stopping:
                    return
                self._process.join(1)
                log.critical("the engine process died (exit code %s); this worker exits and "
                             "its jobs run again elsewhere", self._process.exitcode)
                logging.shutdown()
                os._exit(ENGINE_DIED_EXIT_CODE)
            if kind == "done":
                outcomes, deltas, self.stats = payload
                if deltas:
                    self._on_deltas(deltas)
                with self._lock:
                    futures = [self._futures.pop(request_id, None)
                               for request_id, _output, _error in outcomes]
                for future, (_request_id, output, error) in zip(futures, outcomes, strict=True):
                    if future is None:
                        continue
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(output)
            elif kind == "stats":
                self.stats = payload[0]
            elif kind == "stopped":
                return


def _serve(conn: Connection, options: dict, batch_wait_seconds: float) -> None:
    """The engine process: build the engine, then serve the worker's requests until it says
    stop or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _use_no_process_shared_locks()
    replies = _Replies(conn)
    loop = EngineLoop(partial(make_engine, options), batch_wait_seconds,
                      after_pass=replies.send_outcomes, on_deltas=replies.add_deltas)
    try:
        loop.start()
    except BaseException as exc:
        conn.send(("failed", _picklable(exc)))
        return
    replies.stats = lambda: getattr(loop.engine, "stats", None)  # the echo engine has none
    replies.send(("ready",))
    stats_sent = time.monotonic()
    while True:
        if time.monotonic() - stats_sent >= STATS_SECONDS:
            replies.send(("stats", replies.stats()))
            stats_sent = time.monotonic()
        try:
            if not conn.poll(STATS_SECONDS):
                continue
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the worker is gone: so is the reason to run
            os._exit(0)
        if kind == "submit":
            for request, future in zip(payload, loop.submit_many(payload), strict=True):
                future.add_done_callback(partial(replies.add, request.request_id))
        elif kind == "abort":
            loop.abort(payload)
        elif kind == "stop":
            loop.stop(timeout=5)
            replies.send(("stopped",))
            return
        # Outcomes resolved on this thread: a request aborted before it reached the engine, or
        # one the loop finished before its callback above was added.
        replies.send_outcomes()


def _use_no_process_shared_locks() -> None:
    """The model loader's progress bars (tqdm) would create a multiprocessing lock, a named
    semaphore tracked by the worker's resource tracker: an engine process that ends without
    its finalizers (killed, or `os._exit` when its worker is gone) left it behind, and every
    such stop warned about a leaked semaphore. This process shares its bars with nobody."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


class _Replies:
    """The engine process's messages to the worker. Outcomes are collected as requests finish
    and sent together after the engine loop's pass (one message per step, not per request),
    with the engine's stats as of then (so a finished job's tokens are counted in the worker's
    metrics by the time its result is written)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # a Connection is not shared between threads
        self._outcomes: list[tuple[str, RequestOutput | None, BaseException | None]] = []
        self._deltas: list[RequestOutput] = []
        self.stats: Callable[[], EngineStats | None] = lambda: None

    def send(self, message: tuple) -> None:
        with self._lock:
            self._conn.send(message)

    def add(self, request_id: str, future: Future[RequestOutput]) -> None:
        error = future.exception()
        outcome = (request_id, None if error is not None else future.result(),
                   _picklable(error) if error is not None else None)
        with self._lock:
            self._outcomes.append(outcome)

    def add_deltas(self, deltas: list[RequestOutput]) -> None:
        with self._lock:
            self._deltas.extend(deltas)

    def send_outcomes(self) -> None:
        with self._lock:
            if self._outcomes or self._deltas:
                self._conn.send(("done", self._outcomes, self._deltas, self.stats()))
                self._outcomes, self._deltas = [], []


def _picklable(error: BaseException) -> BaseException:
    """`error` if it survives the pipe, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
