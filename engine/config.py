"""EngineConfig: the one dataclass that sizes the engine, plus device and dtype resolution."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    """How to build and size an engine.

    ``kv_cache_tokens`` is the size of the paged KV pool in tokens; ``None`` picks
    ``max(max_model_len, max_num_seqs * 1024)`` capped by ``kv_cache_memory_fraction`` of the
    device memory. ``dtype="auto"`` is bf16 on CUDA and on CPUs with native bf16 (AMX or
    AVX512-BF16), fp32 elsewhere.

    ``quantization`` is weight-only, for the CPU: ``"int4"`` (GGUF Q4_1's scheme, groups of 32),
    ``"int8"`` (per output channel) or ``"none"``; quantized weights serve steps of at most
    ``max_quantized_rows`` rows, where reading weights bounds the step. ``"auto"`` is int4 on
    a CPU in bf16 (perplexity within 2% of bf16 on tests/engine/data, see
    test_quantization.py), none in fp32 (the exact path) and on a GPU. ``head_quantization``
    (``"none"`` or ``"int8"``, CPU only) applies to the output head alone, which stays bf16 by
    default (see LlamaForCausalLM._load). ``activation_quantization="int8"`` runs the layers
    of steps with more than ``max_quantized_rows`` rows in int8 arithmetic (W8A8, CPU only);
    ``"auto"`` turns it on in bf16 on CPUs with int8 dot products (VNNI) but no AMX-BF16, where
    it is about twice as fast as bf16 per row; with AMX, bf16 GEMMs outrun torch's int8 ones
    (perplexity bound in test_quantization.py).
    """

    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    kv_cache_tokens: int | None = None
    kv_cache_memory_fraction: float = 0.3
    block_size: int = 16
    enable_prefix_caching: bool = True
    cache_dir: str | None = None
    seed: int = 0
    num_threads: int | None = None
    quantization: str = "auto"
    max_quantized_rows: int = 8
    head_quantization: str = "none"
    activation_quantization: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError("kv_cache_tokens must be >= block_size")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)
        self.quantization = resolve_quantization(self.quantization, self.device, self.dtype)
        self.activation_quantization = resolve_activation_quantization(
            self.activation_quantization, self.device, self.dtype)
        if self.head_quantization not in ("none", "int8"):
            raise ValueError(f"head_quantization must be 'none' or 'int8', "
                             f"got {self.head_quantization!r}")
        if self.head_quantization != "none" and self.device != "cpu":
            raise ValueError("head_quantization is for the CPU")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return device


def resolve_quantization(quantization: str, device: str, dtype: torch.dtype) -> str:
    if quantization == "auto":
        return "int4" if device == "cpu" and dtype == torch.bfloat16 else "none"
    if quantization not in ("none", "int8", "int4"):
        raise ValueError(f"quantization must be 'auto', 'none', 'int8' or 'int4', "
                         f"got {quantization!r}")
    if quantization != "none" and device != "cpu":
        raise ValueError(f"quantization={quantization!r} is for the CPU (device is {device})")
    return quantization


def resolve_activation_quantization(quantization: str, device: str, dtype: torch.dtype) -> str:
    if quantization == "auto":
        return ("int8" if device == "cpu" and dtype == torch.bfloat16 and int8_beats_bf16()
                else "none")
    if quantization not in ("none", "int8"):
        raise ValueError(f"activation_quantization must be 'auto', 'none' or 'int8', "
                         f"got {quantization!r}")
    if quantization == "int8" and (device != "cpu" or dtype != torch.bfloat16):
        raise ValueError("activation_quantization='int8' is for the CPU in bfloat16")
    return quantization


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_has_native_bf16() -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def int8_beats_bf16() -> bool:
    """int8 dot products (VNNI) without AMX-BF16. With AMX, torch's int8 GEMM (`_int_mm`) ran at
    0.75x bf16's rate on SmolLM2's [512 x 576] x [576 x 1536] (one Sapphire Rapids core)."""
    flags = cpu_flags()
    return bool({"avx512_vnni", "avx_vnni"} & flags) and "amx_bf16" not in flags


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda") or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def available_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
