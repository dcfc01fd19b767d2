"""Builds and loads genq's CPU ops from engine/csrc: the decode attention that reads the paged
KV pool in place (``torch.ops.genq.paged_decode_attention``), RMSNorm and RoPE + KV store as
one op each (``rms_norm``, ``rope_store_``), the W8A8 linear (``int8_linear``) and the top k
of logits rows (``row_top_k``); bf16 on CPU.

Compiled once per machine with the host's own instruction set (about a minute on 2 cores),
then loaded from torch's extension cache. Without a C++ compiler the engine keeps its ATen
paths, so the ops are a speed-up, never a requirement. GENQ_CPU_KERNELS=0 turns them off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time

import torch

from engine.config import cpu_flags

log = logging.getLogger(__name__)
_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = [os.path.join(_CSRC, name)
            for name in ("paged_attention.cpp", "fused_ops.cpp", "int8_linear.cpp")]
_HEADERS = [os.path.join(_CSRC, "bf16.h")]
_OPS = ("paged_decode_attention", "rms_norm", "rope_store_", "int8_linear", "row_top_k")
_lock = threading.Lock()
_loaded: bool | None = None
# A build killed midway (Ctrl-C during a first start) leaves torch's lock file behind, and every
# later load waits on it forever. A build takes a minute or two: an older lock is stale.
STALE_BUILD_LOCK_SECONDS = 600


def cpu_kernels_available() -> bool:
    """True once the ops are loaded (building them on first call); False if they cannot be."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def _load() -> bool:
    if os.environ.get("GENQ_CPU_KERNELS", "1") == "0":
        return False
    from torch.utils.cpp_extension import load

    # -march=native: the build is for this CPU only, so its flags are part of the name, and so
    # is the sources' text (an edited kernel is a new build, not a stale cached one).
    key = hashlib.sha256(" ".join(sorted(cpu_flags())).encode())
    for source in _SOURCES + _HEADERS:
        with open(source, "rb") as file:
            key.update(file.read())
    name = f"genq_cpu_kernels_{key.hexdigest()[:10]}"
    clear_stale_build_lock(name)
    try:
        load(name, _SOURCES, is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
             extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no headers: fall back, loudly once
        log.warning("genq CPU kernels unavailable (%s); using ATen ops",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    return all(hasattr(torch.ops.genq, op) for op in _OPS)


def clear_stale_build_lock(name: str) -> None:
    """Remove the build lock of extension ``name`` if it is older than any build takes."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:  # no lock: no build running or left
        return
    if age > STALE_BUILD_LOCK_SECONDS:
        log.warning("removing a stale build lock (%.0f s old): %s", age, lock)
        with contextlib.suppress(OSError):
            os.remove(lock)


def row_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest of each row, descending, as ``x.topk(k, dim=-1)``;
    one vectorized pass on the CPU (ties: lower index first)."""
    if _uses_row_top_k(x):
        return torch.ops.genq.row_top_k(x, k)
    return x.topk(k, dim=-1)


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` (the first of equal maxima), a vectorized pass on the CPU."""
    if _uses_row_top_k(x):
        return torch.ops.genq.row_top_k(x, 1)[1][:, 0]
    return x.argmax(dim=-1)


def _uses_row_top_k(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and x.is_contiguous() and cpu_kernels_available())
