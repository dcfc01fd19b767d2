"""gunicorn hooks of the API's workers; `genq api` and `genq up` load them
(`-c python:results_api.gunicorn_config`)."""

from __future__ import annotations

import asyncio
import gc
import resource
import signal
import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

# Each open wait or stream holds a socket, and GENQ_MAX_OPEN_WAITS allows 5000 per process: a
# soft limit of 1024 open files (many hosts' default) would refuse connections long before.
OPEN_FILES_WANTED = 65536


def on_starting(server: object) -> None:
    """The master raises its soft open-files limit, which the workers it forks inherit."""
    raise_open_files_limit(OPEN_FILES_WANTED)


def raise_open_files_limit(wanted: int) -> None:
    """The soft limit up to `wanted`, never past the hard limit (the host's real cap)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (
            wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def post_worker_init(worker: object) -> None:
    """ApiWorker: freeze the loaded app's heap. gthread workers (`gunicorn results_api.wsgi:app`;
    ApiWorker stops on its own): leave Ctrl-C to the master. In a terminal a Ctrl-C reaches the
    master and its workers at once, and the master then sends each worker SIGQUIT: a gthread
    worker whose second quit handler ran inside the first one's ThreadPoolExecutor.shutdown
    waited on its lock until the master SIGKILLed it (cpython issue 121649). The master's
    SIGQUIT still stops the worker quickly, once.

    That SIGQUIT takes the graceful path (set a flag, wake the poller) instead of gthread's
    quick quit, which shuts the thread pool down from inside the signal handler: a quit that
    landed while the main thread was in ThreadPoolExecutor.submit, holding the pool's lock while
    a new thread started, waited on that lock until the SIGKILL (py-spy stack; 2 of 3 Ctrl-Cs
    right after boot, when the tokenizer warm-up thread held the GIL)."""
    if isinstance(worker, UvicornWorker):
        # The loaded app's ~130,000 objects (Flask, pydantic, SQLAlchemy, their modules)
        # leave the collector's view: a full collection, which stops the event loop and every
        # thread, took 89 ms (nice 15, 2 shared cores), then 0.1 ms; /healthz's p99 under
        # benchmarks.load had those pauses in it.
        gc.freeze()
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, worker.handle_exit)


def worker_exit(server: object, worker: object) -> None:
    """Freeze the heap of a worker that is exiting, so the interpreter's last collections skip
    it. A worker holds torch and transformers (the tokenizer counts prompt tokens), some 380,000
    objects: those collections took 1 s of CPU, past gunicorn's 5 s graceful timeout (and its
    SIGKILL) when the stopping worker, engine and API processes shared two loaded cores.
    Only cyclic garbage of the frozen objects stays unfreed, and the process is ending."""
    gc.freeze()


class ApiWorker(UvicornWorker):
    """The API's gunicorn worker: uvicorn serving results_api.asgi.

    A SIGQUIT (the master's quick shutdown: its own SIGINT, `genq up`'s Ctrl-C) stops it at
    once: uvicorn_worker's handler only flags the gunicorn worker, which uvicorn never reads,
    so the master SIGKILLed it after its graceful timeout. A SIGTERM (graceful) lets calls in
    progress end for GRACEFUL_SECONDS, below gunicorn's 5 s, then cancels the waits and
    streams still open (their slots released, a stream's job canceled as on a disconnect)."""

    GRACEFUL_SECONDS = 3
    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS,
                     "timeout_graceful_shutdown": GRACEFUL_SECONDS}

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        server = _WorkerServer(config=self.config)
        asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, _quick_exit, server)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


class _WorkerServer(Server):
    """uvicorn's server, less its re-raising of the stop signal once it stopped: the worker
    then exits through gunicorn's own path ("Worker exiting"), not killed by that signal (which
    its master logged as a worker lost to SIGINT)."""

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def _quick_exit(server: Server) -> None:
    server.should_exit = server.force_exit = True
