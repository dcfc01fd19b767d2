"""Worker middleware for the poison-job test: a job whose prompt is "POISON" kills the worker
process that claimed it (SIGKILL: no cleanup, no ack), every time it is delivered."""

from __future__ import annotations

import os
import signal

POISON_PROMPT = "POISON"


class PoisonMiddleware:
    def before_job(self, job) -> None:
        if job.prompt == POISON_PROMPT:
            os.kill(os.getpid(), signal.SIGKILL)
