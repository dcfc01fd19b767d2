"""The worker's engine in its own process: outcomes, refusals and aborts come back over the pipe,
stats arrive for metrics, and each process ends when the other dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine import EngineStats, SamplingParams
from tests.conftest import MODEL_CACHE_DIR
from workers.engine_loop import EngineRequest
from workers.engine_process import ENGINE_DIED_EXIT_CODE, STATS_SECONDS, EngineProcess

REPO = Path(__file__).resolve().parents[2]


def options(model: str) -> dict:
    return {"model": model, "device": "cpu", "dtype": "float32", "kv_cache_tokens": 4096,
            "cache_dir": MODEL_CACHE_DIR}


@pytest.fixture
def engine_process():
    processes: list[EngineProcess] = []

    def start(model: str) -> EngineProcess:
        process = EngineProcess(options(model))
        process.start()
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop(timeout=10)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_requests_run_in_another_process_and_their_outputs_come_back(engine_process):
    engine = engine_process("echo")
    assert engine.pid not in (None, os.getpid())

    params = SamplingParams(max_tokens=3, temperature=0)
    futures = [engine.submit(EngineRequest(f"r{i}", f"alpha beta gamma {i}", params, 1))
               for i in range(5)]

    outputs = [future.result(timeout=30) for future in futures]
    assert [o.request_id for o in outputs] == [f"r{i}" for i in range(5)]
    assert all(o.outputs[0].text == "alpha beta gamma" for o in outputs)
    assert engine.in_flight() == []


def test_refusals_aborts_and_stats_cross_the_pipe(engine_process):
    # SmolLM2's shapes, not tiny-llama's: 1500 tokens of tiny-llama took about 1.5 s, so the
    # request sometimes finished between two stats messages (1 s apart) and was never seen
    # running (1 run in 5 failed). At ~10 ms a step this one runs for many seconds.
    engine = engine_process("dummy:smollm2-135m")
    too_long = engine.submit(EngineRequest("long", [5] * 9000, SamplingParams(max_tokens=2), 1))
    with pytest.raises(ValueError, match="context"):
        too_long.result(timeout=30)

    endless = SamplingParams(max_tokens=1500, ignore_eos=True, temperature=0)
    running = engine.submit(EngineRequest("run", "tell me a story", endless, 1))
    deadline = time.monotonic() + 30
    while engine.stats is None or engine.stats.num_running == 0:
        assert time.monotonic() < deadline, "no stats showing the running request"
        time.sleep(STATS_SECONDS / 4)
    assert isinstance(engine.stats, EngineStats)
    engine.abort("run")

    output = running.result(timeout=30)
    assert output.outputs[0].finish_reason == "abort"
    generated = len(output.outputs[0].token_ids)
    assert 0 < generated < 1500  # partial output kept
    # The stats came with the outcome: the worker's metrics count a job's tokens at once.
    assert engine.stats.num_generated_tokens >= generated


def test_a_build_failure_is_raised_by_start():
    with pytest.raises(ValueError, match="dummy:"):
        EngineProcess(options("no-such-model")).start()


def test_sigint_to_the_process_group_does_not_stop_the_engine(engine_process):
    engine = engine_process("echo")
    os.kill(engine.pid, signal.SIGINT)  # what a Ctrl-C sends to every process of the group
    os.kill(engine.pid, signal.SIGTERM)
    time.sleep(0.5)
    params = SamplingParams(max_tokens=2, temperature=0)
    assert engine.submit(EngineRequest("r", "still here", params, 1)).result(timeout=30)


OWNER = textwrap.dedent("""
    import sys, time
    from workers.engine_process import EngineProcess
    process = EngineProcess({"model": "echo", "device": "cpu", "cache_dir": sys.argv[1]})
    process.start()
    print(process.pid, flush=True)
    time.sleep(float(sys.argv[2]))
""")


def start_owner(lifetime: float = 60) -> tuple[subprocess.Popen, int]:
    """A process that owns an engine process for `lifetime` seconds and then exits without
    stopping it, and that engine process's pid."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, MODEL_CACHE_DIR, str(lifetime)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    return owner, int(owner.stdout.readline())


def test_a_worker_that_exits_without_stopping_its_engine_exits_promptly():
    owner, engine_pid = start_owner(lifetime=0)
    try:
        assert owner.wait(15) == 0  # not stuck joining a child that ignores SIGTERM
        assert wait_gone(engine_pid, timeout=5)
    finally:
        owner.kill()


def test_the_engine_process_exits_when_its_worker_is_killed():
    owner, engine_pid = start_owner()
    owner.kill()  # kill -9: no cleanup runs in the worker
    owner.wait(10)
    assert wait_gone(engine_pid, timeout=STATS_SECONDS + 10)


def test_the_worker_exits_when_its_engine_process_dies():
    owner, engine_pid = start_owner()
    try:
        os.kill(engine_pid, signal.SIGKILL)  # a segfault or the OOM killer
        assert owner.wait(15) == ENGINE_DIED_EXIT_CODE
    finally:
        owner.kill()


def test_the_worker_process_imports_no_torch():
    """Only the engine process needs torch: the worker's own modules (and the engine's request
    and output types they use) load without it (~1.4 s and ~280 MB less per worker)."""
    code = ("import sys; import cli.main, workers.celery_app, workers.worker, "
            "workers.intake_redis, workers.intake_rabbitmq, workers.engine_process; "
            "from engine import SamplingParams, RequestOutput, EngineStats; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


KILLED_ENGINE_OWNER = textwrap.dedent("""
    import os, signal, sys
    from workers.engine_process import EngineProcess
    process = EngineProcess({"model": sys.argv[2], "device": "cpu", "cache_dir": sys.argv[1]})
    process.start()
    process._stopping = True  # the owner expects the engine's end: it does not exit with it
    os.kill(process.pid, signal.SIGKILL)
    process._process.join()
""")


@pytest.mark.slow
def test_an_engine_process_that_ends_without_cleanup_leaks_no_semaphore():
    # Regression (issue 20): SmolLM2's loader made a multiprocessing lock (tqdm's) in the
    # engine process; one that ended killed (or by os._exit, its worker gone) left it to the
    # resource tracker, which warned of a leaked semaphore at every such stop.
    owner = subprocess.run([sys.executable, "-c", KILLED_ENGINE_OWNER, MODEL_CACHE_DIR,
                            "smollm2-135m"], cwd=REPO, capture_output=True, text=True,
                           timeout=240)
    assert owner.returncode == 0, owner.stderr[-2000:]
    assert "leaked semaphore" not in owner.stderr, owner.stderr[-2000:]
