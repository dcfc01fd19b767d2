"""Worker middleware for the chaos tests: a job whose prompt is "POISON" kills the worker
process that claimed it (SIGKILL: no cleanup, no ack) every time it is delivered; one whose
prompt is "CRASH ONCE" only the first time (a crash that is not the job's fault)."""

from __future__ import annotations

import os
import signal

POISON_PROMPT = "POISON"
CRASH_ONCE_PROMPT = "CRASH ONCE"


class PoisonMiddleware:
    def before_job(self, job) -> None:
        if job.prompt == POISON_PROMPT or (job.prompt == CRASH_ONCE_PROMPT
                                           and job.attempts == 1):
            os.kill(os.getpid(), signal.SIGKILL)
