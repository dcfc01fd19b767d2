"""Worker middleware (dramatiq-style hooks instead of flags threaded through calls).

`GENQ_WORKER_MIDDLEWARE="pkg.module:object,…"` names objects with any of these hooks (`job` is
the jobs table's row as the claim left it: attributes named as the columns, read-only):
- `before_job(job)`: called after the job was claimed, before it goes to the engine. If it
  raises, that job fails (`internal_error`, the hook's error as its message); the rest of its
  micro-batch runs.
- `after_job(job)`: called once the job's outcome is committed, however it ended (on the
  worker's writer thread: keep it quick).
- `job_ended(job, status)`: called with `after_job`, with the state the job was written to
  (`succeeded`, `failed`, `expired`, `canceled`, `queued` when handed back) or `unwritten`
  when its outcome could not be committed.
"""

from __future__ import annotations

import importlib
from typing import Any


def load_middleware(spec: str) -> list[Any]:
    middleware = []
    for path in filter(None, (part.strip() for part in spec.split(","))):
        module_name, _, attribute = path.partition(":")
        obj = getattr(importlib.import_module(module_name), attribute)
        middleware.append(obj() if isinstance(obj, type) else obj)
    return middleware


def run_hook(middleware: list[Any], hook: str, *args: Any) -> None:
    for item in middleware:
        method = getattr(item, hook, None)
        if method is not None:
            method(*args)
