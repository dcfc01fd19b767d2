// RMSNorm, and RoPE with the KV store, as one CPU op each: at batch 1 a step is bound by ATen's
// per-op cost, and the Python forms take 7 ops (RMSNorm, 61 a step) and 7 (RoPE + store, 30).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"

namespace {

using genq::load;
using genq::round_trip;
using genq::store;

constexpr int64_t kRowsPerTask = 16;

// x [rows, n] (row stride free, unit column stride) -> out [rows, n]. The arithmetic of
// engine.models.llama.rms_norm: mean of squares and scale in fp32, rounded to T, then times
// the weight (a T product, as torch's T * T is).
template <typename T>
void rms_norm_rows(const T* x, int64_t row_stride, const T* weight, T* out, int64_t rows,
                   int64_t n, float eps) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * row_stride;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < n; ++i) {
        const float v = load(row[i]);
        squares += v * v;
      }
      const float scale = 1.f / std::sqrt(squares / static_cast<float>(n) + eps);
      T* o = out + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        store(o + i, load(weight[i]) * round_trip<T>(load(row[i]) * scale));
      }
    }
  });
}

// Rotates heads [0, rotated) of each token of qkv [tokens, heads, dim] in place:
// x * cos + swap_halves(x) * sin, with sin's first half negated (a signed table); then stores each token's K heads (rotated; [rotated - kv_heads, rotated)) and V heads (the
// next kv_heads) at its slot: pool row (c * kv_heads + h) * num_slots + slot, c = 0 K, 1 V.
template <typename T>
void rope_rows(T* qkv, const T* cos, const T* sin, int64_t tokens, int64_t heads,
               int64_t rotated, int64_t dim, T* pool, const int64_t* slots, int64_t kv_heads,
               int64_t num_slots) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* __restrict__ c = cos + t * dim;
      const T* __restrict__ s = sin + t * dim;
      for (int64_t h = 0; h < rotated; ++h) {
        T* __restrict__ x = qkv + (t * heads + h) * dim;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float lo = load(x[i]), hi = load(x[i + half]);
          store(x + i, lo * load(c[i]) + hi * load(s[i]));
          store(x + i + half, hi * load(c[i + half]) + lo * load(s[i + half]));
        }
      }
      const T* kv = qkv + (t * heads + rotated - kv_heads) * dim;  // K heads, then V heads
      for (int64_t plane = 0; plane < 2 * kv_heads; ++plane) {
        std::copy(kv + plane * dim, kv + (plane + 1) * dim,
                  pool + (plane * num_slots + slots[t]) * dim);
      }
    }
  });
}


// The k largest of each row of x [rows, n] (fp32, contiguous), in descending order, ties
// lower index first (as argmax): one pass that compares a block's max with the k-th
// largest so far, against ATen's topk and argmax that cost 3-4 ms for 64 x 49152 logits.
void top_k_row(const float* x, int64_t n, int64_t k, float* values, int64_t* indices) {
  int64_t filled = 0;
  auto offer = [&](int64_t i) {
    const float v = x[i];
    if (filled == k && !(v > values[k - 1])) return;
    int64_t at = filled < k ? filled++ : k - 1;
    while (at > 0 && v > values[at - 1]) {
      values[at] = values[at - 1];
      indices[at] = indices[at - 1];
      --at;
    }
    values[at] = v;
    indices[at] = i;
  };
  constexpr int64_t kBlock = 32;  // a block's max is a vectorized reduction; few pass it
  int64_t i = 0;
  for (; i < k; ++i) offer(i);
  for (; i + kBlock <= n; i += kBlock) {
    float block_max = x[i];
    for (int64_t j = 1; j < kBlock; ++j) block_max = std::max(block_max, x[i + j]);
    if (block_max > values[k - 1]) {
      for (int64_t j = i; j < i + kBlock; ++j) offer(j);
    }
  }
  for (; i < n; ++i) offer(i);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> row_top_k(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "row_top_k: contiguous float32 [rows, n] expected");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "row_top_k: k must be in [1, n]");
  auto values = at::empty({x.size(0), k}, x.options());
  auto indices = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  float* value_data = values.data_ptr<float>();
  int64_t* index_data = indices.data_ptr<int64_t>();
  const int64_t n = x.size(1);
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      top_k_row(data + row * n, n, k, value_data + row * k, index_data + row * k);
    }
  });
  return {values, indices};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [rows, n], unit stride");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type());
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), weight.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                            static_cast<float>(eps));
  });
  return out;
}

// RoPE on q and k heads (the first heads + kv_heads) of qkv [tokens, heads, dim] in place
// (cos, sin [tokens, 1, dim]), then K and V stored in one layer's pool
// [2 * kv_heads * num_slots, dim] at each token's slot (slots [tokens], int64).
void rope_store_(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                 const at::Tensor& pool, const at::Tensor& slots, int64_t heads,
                 int64_t kv_heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && cos.is_contiguous() &&
              sin.is_contiguous(), "rope_store_: contiguous qkv [tokens, heads, dim] expected");
  TORCH_CHECK(cos.numel() == qkv.size(0) * qkv.size(2) && sin.numel() == cos.numel());
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() && cos.scalar_type() == sin.scalar_type());
  TORCH_CHECK(qkv.size(1) == heads + 2 * kv_heads && qkv.size(2) % 2 == 0 && pool.is_contiguous() &&
              pool.scalar_type() == qkv.scalar_type() && pool.size(1) == qkv.size(2));
  TORCH_CHECK(slots.is_contiguous() && slots.scalar_type() == at::kLong &&
              slots.numel() == qkv.size(0));
  const int64_t num_slots = pool.size(0) / (2 * kv_heads);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rope_store_", [&] {
    rope_rows<scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                        sin.data_ptr<scalar_t>(), qkv.size(0), qkv.size(1), heads + kv_heads,
                        qkv.size(2), pool.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
                        kv_heads, num_slots);
  });
}

TORCH_LIBRARY_FRAGMENT(genq, m) {
  m.def("row_top_k(Tensor x, int k) -> (Tensor, Tensor)", &row_top_k);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("rope_store_(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) pool, Tensor slots, "
        "int heads, int kv_heads) -> ()", &rope_store_);
}
