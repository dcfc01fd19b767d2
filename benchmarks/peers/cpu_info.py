"""The CPU a benchmark ran on: its name and the flags that decide the fast paths."""

from __future__ import annotations

import os

# The flags that pick bf16 / int8 / int4 kernels in torch, vLLM and ggml.
NAMED_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def cpu_summary(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    name, flags = "unknown", set()
    try:
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return dict(model_name=name, num_cpus=len(os.sched_getaffinity(0)),
                flags={flag: flag in flags for flag in NAMED_FLAGS})
