"""Builds and loads engine/csrc/paged_attention.cpp, the CPU decode attention that reads the
paged KV pool in place, as ``torch.ops.genq.paged_decode_attention``.

Compiled once per machine with the host's own instruction set (about a minute on 2 cores),
then loaded from torch's extension cache. Without a C++ compiler the engine keeps its
gather-then-GEMM path, so the kernel is a speed-up, never a requirement.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

import torch

from engine.config import cpu_flags

log = logging.getLogger(__name__)
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "paged_attention.cpp")
_lock = threading.Lock()
_loaded: bool | None = None


def paged_decode_kernel_available() -> bool:
    """True once the kernel is loaded (building it on first call); False if it cannot be."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def _load() -> bool:
    if os.environ.get("GENQ_PAGED_KERNEL", "1") == "0":
        return False
    from torch.utils.cpp_extension import load

    # -march=native: the build is for this CPU only, so its flags are part of the name.
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:10]
    try:
        load(f"genq_paged_attention_{flags}", [_SOURCE], is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
             extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no headers: fall back, loudly once
        log.warning("paged decode kernel unavailable (%s); using gather + GEMM attention",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    return hasattr(torch.ops.genq, "paged_decode_attention")
