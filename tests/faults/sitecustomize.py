"""A failed engine step, injected: every process of a test stack whose PYTHONPATH starts with
this directory loads it; the one that imports the engine (a worker's engine process) fails the
first model run that reaches `GENQ_TEST_FAIL_RUN_AT_TOKENS` output tokens, once."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from functools import wraps

FAIL_AT_TOKENS_VARIABLE = "GENQ_TEST_FAIL_RUN_AT_TOKENS"


def failing_once(run, num_output_tokens: int):
    """`ModelRunner.run` that raises, as a CUDA error would, the first time it is handed a
    sequence with `num_output_tokens` output tokens."""
    failed = []

    @wraps(run)
    def run_or_fail(*args):
        scheduled = args[-1]
        if not failed and any(seq.num_output_tokens >= num_output_tokens
                              for seq, _ in scheduled):
            failed.append(True)
            raise RuntimeError("CUDA error: an illegal memory access (injected by the test)")
        return run(*args)

    run_or_fail.failed = failed
    return run_or_fail


class _FailModelRunner(importlib.abc.MetaPathFinder):
    """Wraps ModelRunner.run when engine.model_runner is imported (never imported by the API
    or the worker's own process: they load no torch, and stay so)."""

    def __init__(self, num_output_tokens: int) -> None:
        self.num_output_tokens = num_output_tokens

    def find_spec(self, name, path, target=None):
        if name != "engine.model_runner":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module) -> None:
            exec_module(module)
            module.ModelRunner.run = failing_once(module.ModelRunner.run,
                                                  self.num_output_tokens)

        spec.loader.exec_module = exec_and_wrap
        return spec


if os.environ.get(FAIL_AT_TOKENS_VARIABLE):
    sys.meta_path.insert(0, _FailModelRunner(int(os.environ[FAIL_AT_TOKENS_VARIABLE])))
