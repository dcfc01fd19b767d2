"""gunicorn hooks of the API's workers; `genq api` and `genq up` load them
(`-c python:results_api.gunicorn_config`)."""

from __future__ import annotations

import gc


def worker_exit(server: object, worker: object) -> None:
    """Freeze the heap of a worker that is exiting, so the interpreter's last collections skip
    it. A worker holds torch and transformers (the tokenizer counts prompt tokens), some 380,000
    objects: those collections took 1 s of CPU, past gunicorn's 5 s graceful timeout (and its
    SIGKILL) when the stopping worker, engine and API processes shared two loaded cores.
    Only cyclic garbage of the frozen objects stays unfreed, and the process is ending."""
    gc.freeze()
