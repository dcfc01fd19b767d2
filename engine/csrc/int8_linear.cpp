// A bf16 linear layer in int8 arithmetic (W8A8): each row of x is quantized to int8 on the fly
// (symmetric, one scale per row), multiplied by int8 weights (one scale per output channel)
// with int32 accumulation in oneDNN (VNNI or AMX), then scaled back to bf16 with the bias and an
// optional epilogue in one pass. int8 dot products run at twice the rate of bf16 ones on
// AVX512-VNNI and AMX, so steps of many rows (prefills, large batches) gain. The weight is
// either plain [n, k] codes (at::_int_mm, which reorders it for oneDNN at every call) or packed
// once by onednn::qlinear_prepack (then onednn::qlinear_pointwise, 1.5-2x faster on AMX).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bf16.h"

namespace {

using genq::load;
using genq::store;

constexpr int64_t kRowsPerTask = 4;

enum Epilogue : int64_t { kNone = 0, kAdd = 1, kSilu = 2, kMul = 3 };

// x [rows, k] bf16 (row stride free) -> codes [rows, k] int8 and scales [rows] (x ≈ code * scale).
void quantize_rows(const c10::BFloat16* x, int64_t row_stride, int8_t* codes, float* scales,
                   int64_t rows, int64_t k) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const c10::BFloat16* row = x + r * row_stride;
      float absmax = 0.f;
#pragma omp simd reduction(max : absmax)
      for (int64_t i = 0; i < k; ++i) absmax = std::max(absmax, std::fabs(load(row[i])));
      const float scale = absmax > 0.f ? absmax / 127.f : 1.f;
      const float inverse = 1.f / scale;
      int8_t* out = codes + r * k;
#pragma omp simd
      for (int64_t i = 0; i < k; ++i) {
        out[i] = static_cast<int8_t>(std::nearbyint(load(row[i]) * inverse));
      }
      scales[r] = scale;
    }
  });
}

// out[r, j] = epilogue(acc[r, j] * row_scales[r] * column_scales[j] + bias[j], other[r, j]),
// acc int32, or the same integers in fp32 (exact: |acc| <= k * 127^2 < 2^24 for k <= 1040).
template <int64_t E, typename Acc>
void dequantize_rows(const Acc* acc, const float* row_scales, const float* column_scales,
                     const c10::BFloat16* bias, const c10::BFloat16* other, int64_t other_stride,
                     c10::BFloat16* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Acc* a = acc + r * n;
      const c10::BFloat16* o = other ? other + r * other_stride : nullptr;
      c10::BFloat16* y = out + r * n;
      const float row_scale = row_scales[r];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        float v = static_cast<float>(a[j]) * (row_scale * column_scales[j]);
        if (bias) v += load(bias[j]);
        if constexpr (E == kAdd) v += load(o[j]);
        // -ffast-math assumes no infinities: exp(-v) past fp32's range made SiLU NaN.
        if constexpr (E == kSilu) v = v / (1.f + std::exp(std::min(-v, 80.f)));
        if constexpr (E == kMul) v *= load(o[j]);
        store(y + j, v);
      }
    }
  });
}

// codes [rows, k] int8 times the packed weight: the int32 sums as fp32 [rows, n]. The scales
// are applied after, as for _int_mm, so both paths round alike; oneDNN gets a scale of 1 and a
// zero point of 0 for x and for the weight, built once.
at::Tensor packed_int_mm(const at::Tensor& codes, const at::Tensor& packed) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
      "onednn::qlinear_pointwise", "tensor");
  static const auto one = at::ones({}, at::kFloat);
  static const auto zero = at::zeros({}, at::kLong);
  std::vector<c10::IValue> stack{codes, one, zero, packed, one, zero,
                                 c10::IValue(), 1.0, int64_t{0}, at::kFloat,
                                 std::string("none"), c10::List<c10::optional<at::Scalar>>(),
                                 std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

// x [rows, k] bf16 (unit column stride); weight [n, k] int8, or packed by qlinear_prepack;
// weight_scales [n] fp32, bias [n] bf16 or None; epilogue 0 none, 1 add `other`, 2 SiLU,
// 3 multiply by `other` ([rows, n]).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& weight_scales, const c10::optional<at::Tensor>& bias,
                       int64_t epilogue, const c10::optional<at::Tensor>& other, bool packed) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16,
              "int8_linear: x must be bf16 [rows, k] with unit column stride");
  TORCH_CHECK(packed || (weight.dim() == 2 && weight.is_contiguous() &&
                         weight.scalar_type() == at::kChar && weight.size(1) == x.size(1)),
              "int8_linear: weight must be int8 [n, k]");
  TORCH_CHECK(weight_scales.is_contiguous() && weight_scales.scalar_type() == at::kFloat &&
              weight_scales.dim() == 1);
  const int64_t rows = x.size(0), k = x.size(1), n = weight_scales.numel();
  const bool has_other = epilogue == kAdd || epilogue == kMul;
  TORCH_CHECK(epilogue >= kNone && epilogue <= kMul && has_other == other.has_value(),
              "int8_linear: epilogue and other disagree");
  if (has_other) {
    TORCH_CHECK(other->scalar_type() == at::kBFloat16 && other->dim() == 2 &&
                other->size(0) == rows && other->size(1) == n && other->stride(1) == 1);
  }
  if (bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kBFloat16 &&
                bias->numel() == n);
  }
  auto codes = at::empty({rows, k}, x.options().dtype(at::kChar));
  auto row_scales = at::empty({rows}, x.options().dtype(at::kFloat));
  quantize_rows(x.data_ptr<c10::BFloat16>(), x.stride(0), codes.data_ptr<int8_t>(),
                row_scales.data_ptr<float>(), rows, k);
  const auto acc = packed ? packed_int_mm(codes, weight)
                          : at::_int_mm(codes, weight.t());
  auto out = at::empty({rows, n}, x.options());
  const c10::BFloat16* bias_data = bias ? bias->data_ptr<c10::BFloat16>() : nullptr;
  const c10::BFloat16* other_data = has_other ? other->data_ptr<c10::BFloat16>() : nullptr;
  const int64_t other_stride = has_other ? other->stride(0) : 0;
  auto run = [&](auto kind) {
    constexpr int64_t E = decltype(kind)::value;
    if (packed) {
      dequantize_rows<E>(acc.data_ptr<float>(), row_scales.data_ptr<float>(),
                         weight_scales.data_ptr<float>(), bias_data, other_data, other_stride,
                         out.data_ptr<c10::BFloat16>(), rows, n);
    } else {
      dequantize_rows<E>(acc.data_ptr<int32_t>(), row_scales.data_ptr<float>(),
                         weight_scales.data_ptr<float>(), bias_data, other_data, other_stride,
                         out.data_ptr<c10::BFloat16>(), rows, n);
    }
  };
  switch (epilogue) {
    case kAdd: run(std::integral_constant<int64_t, kAdd>{}); break;
    case kSilu: run(std::integral_constant<int64_t, kSilu>{}); break;
    case kMul: run(std::integral_constant<int64_t, kMul>{}); break;
    default: run(std::integral_constant<int64_t, kNone>{});
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(genq, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor weight_scales, Tensor? bias, int epilogue, "
        "Tensor? other, bool packed=False) -> Tensor", &int8_linear);
}
