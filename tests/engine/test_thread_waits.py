"""Engine threads wait passively at OpenMP barriers, so a step does not crawl beside other busy
processes (benchmarks/engine_contention.py); the environment's own policy wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = ("import sys, os, engine; assert 'torch' not in sys.modules; "
         "from engine import LLMEngine; print(os.environ['OMP_WAIT_POLICY'])")


def _policy_seen(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, cwd=REPO,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_importing_the_engine_sets_passive_waits_before_torch_loads():
    assert _policy_seen() == "PASSIVE"


def test_the_environment_policy_wins():
    assert _policy_seen(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_a_worker_engine_process_starts_with_passive_waits():
    """The worker's parent imports the engine package (never torch) before it spawns the engine
    process, which inherits the policy before its torch loads."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    script = ("import os, time; from workers.engine_process import EngineProcess; "
              "p = EngineProcess({'model': 'echo', 'device': 'cpu'}); p.start(); "
              "print(open(f'/proc/{p.pid}/environ').read().split(chr(0)).count("
              "'OMP_WAIT_POLICY=PASSIVE')); p.stop(timeout=5)")
    done = subprocess.run([sys.executable, "-c", script], env=base, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "1"
