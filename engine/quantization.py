"""Linear layers for the CPU: bf16 weights pre-packed for oneDNN, weight-only int8 / int4 for
small steps, and int8 activations with int8 weights (W8A8) for large ones.

int4 follows GGUF's Q4_1 scheme (groups of 32 along the input, a scale and a minimum per group,
codes 0..15), so the bundled Q4_1 model requantizes to its own file's blocks; torch's kernel
reads it as ``(code - 8) * scale + (minimum + 8 * scale)``. Quantized weights pay off while a
step is bound by reading weights (few rows); past ``max_quantized_rows`` rows the packed bf16
GEMM is faster on the CPUs measured, so a quantized layer keeps both and picks per call.
Past that many rows, ``activation_quantization="int8"`` runs the layer in int8 arithmetic
(engine/csrc/int8_linear.cpp): a step of many rows is bound by dot products, and int8 ones
run at twice the rate of bf16 ones on AVX512-VNNI and AMX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32
# int8_linear's epilogues (engine/csrc/int8_linear.cpp).
EPILOGUE_NONE, EPILOGUE_ADD, EPILOGUE_SILU, EPILOGUE_MUL = range(4)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (codes [N, K] int8, scales [N])."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    codes = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1-style groups: (codes [N, K] int32 in 0..15, scales [N, K/g], minimums [N, K/g])."""
    n, k = weight.shape
    groups = weight.float().view(n, k // group_size, group_size)
    minimums = groups.amin(dim=-1)
    scales = ((groups.amax(dim=-1) - minimums) / 15).clamp(min=1e-12)
    codes = ((groups - minimums[..., None]) / scales[..., None]).round().clamp(0, 15)
    return codes.to(torch.int32).view(n, k), scales, minimums


# oneDNN's packed GEMM returns the int32 sums as fp32: exact while K * 127^2 < 2^24.
MAX_PACKED_INT8_K = 1040


def pack_int8(codes: torch.Tensor) -> torch.Tensor | None:
    """int8 weight codes [N, K] packed once for oneDNN's int8 GEMM, or None where this torch has
    no such op or K is too long for exact sums. Unpacked, ``_int_mm`` reorders the weight at
    every call: 1.5-2x slower on AMX. Both give the same bits."""
    if codes.shape[1] > MAX_PACKED_INT8_K:
        return None
    try:
        return torch.ops.onednn.qlinear_prepack(codes, None)
    except (AttributeError, RuntimeError):
        return None


def int4_supported(weight: torch.Tensor) -> bool:
    return weight.shape[1] % INT4_GROUP_SIZE == 0 and weight.device.type == "cpu"


class Linear:
    """``x @ weight.T + bias`` with optional fused epilogues (residual add, SiLU, product).

    On CPU in bf16 the weight is pre-packed once for oneDNN (6-18% faster than F.linear on
    SmolLM2's shapes) and the epilogues run inside the GEMM as oneDNN post-ops; fp32 keeps
    plain ops so its results match transformers bit for bit.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 quantization: str = "none", max_quantized_rows: int = 8,
                 activation_quantization: str = "none"):
        self.weight, self.bias, self.packed = weight, bias, None
        self.max_quantized_rows = max_quantized_rows
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
            except (AttributeError, RuntimeError):
                self.packed = None
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.int4: tuple[torch.Tensor, torch.Tensor] | None = None
        if quantization == "int8":
            codes, scales = quantize_int8(weight)
            self.int8 = (codes, scales.to(weight.dtype))
        elif quantization == "int4" and int4_supported(weight):
            codes, scales, minimums = quantize_int4(weight)
            zeros = minimums + 8 * scales
            # [K / group, N, 2]: the layout _weight_int4pack_mm_for_cpu reads.
            scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
            self.int4 = (torch._convert_weight_to_int4pack_for_cpu(codes, 1),
                         scales_and_zeros.to(weight.dtype))
        # (codes [N, K] or oneDNN's packing of them, scales [N], whether packed)
        self.w8a8: tuple[torch.Tensor, torch.Tensor, bool] | None = None
        if activation_quantization == "int8" and self.packed is not None:
            from engine.cpu_kernels import cpu_kernels_available

            if cpu_kernels_available():
                codes, scales = quantize_int8(weight)
                packed_codes = pack_int8(codes)
                self.w8a8 = (codes if packed_codes is None else packed_codes, scales.float(),
                             packed_codes is not None)

    @property
    def is_quantized(self) -> bool:
        return self.int8 is not None or self.int4 is not None

    def _quantized(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.shape[0] > self.max_quantized_rows:
            return None
        if self.int4 is not None:
            out = torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.int4[0],
                                                    INT4_GROUP_SIZE, self.int4[1])
        elif self.int8 is not None:
            out = torch._weight_int8pack_mm(x.contiguous(), *self.int8)
        else:
            return None
        return out if self.bias is None else out + self.bias

    def _runs_w8a8(self, x: torch.Tensor) -> bool:
        return self.w8a8 is not None and x.shape[0] > self.max_quantized_rows

    def _w8a8(self, x: torch.Tensor, epilogue: int,
              other: torch.Tensor | None = None) -> torch.Tensor:
        weight, scales, packed = self.w8a8
        return torch.ops.genq.int8_linear(x, weight, scales, self.bias, epilogue, other, packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_w8a8(x):
            return self._w8a8(x, EPILOGUE_NONE)
        out = self._quantized(x)
        if out is not None:
            return out
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias,
                                                  "none", [], "")

    def _fuses(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through the packed bf16 GEMM, where epilogues are post-ops."""
        return self.packed is not None and not (
            self.is_quantized and x.shape[0] <= self.max_quantized_rows)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + linear(x)``."""
        if self._runs_w8a8(x):
            return self._w8a8(x, EPILOGUE_ADD, residual)
        if not self._fuses(x):
            return residual + self(x)
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), residual, self.packed,
                                                         self.bias, "add")

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_w8a8(x):
            return self._w8a8(x, EPILOGUE_SILU)
        if not self._fuses(x):
            return F.silu(self(x))
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias,
                                                  "swish", [], "")

    def mul(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``other * linear(x)``."""
        if self._runs_w8a8(x):
            return self._w8a8(x, EPILOGUE_MUL, other)
        if not self._fuses(x):
            return other * self(x)
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), other, self.packed,
                                                         self.bias, "mul")
