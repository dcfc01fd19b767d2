// Decode attention that reads K/V where they live in the paged pool (no gather into a buffer).
// One task per (sequence, kv head): its grouped query heads share every K/V row it loads;
// scores, softmax and the weighted sum of V are accumulated in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// K/V rows to fp32. The bf16 case is a shift the compiler vectorizes (the generic cast is not).
inline void load_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void load_row(const double* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void load_row(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t widened = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &widened, sizeof(float));
  }
}

// Scores of a group of query heads against every key of one sequence, with AVX512-BF16's
// vdpbf16ps (32 bf16 products summed in fp32 an instruction, no conversion of the key rows):
// the loop that bounds this kernel at batch sizes past a few rows. False where it does not apply.
template <typename T>
bool key_scores(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, float,
                float*) {
  return false;
}

#if defined(__AVX512BF16__)
constexpr int64_t kMaxQueryChunks = 32;  // group heads x (dim / 32), held in registers

template <>
bool key_scores(const c10::BFloat16* query_rows, const c10::BFloat16* keys, const int64_t* table,
                int64_t block_size, int64_t length, int64_t group, int64_t dim, float scale,
                float* scores) {
  const int64_t chunks = dim / 32;
  if (dim % 32 != 0 || group * chunks > kMaxQueryChunks || chunks > 8) return false;
  __m512bh queries[kMaxQueryChunks];
  for (int64_t i = 0; i < group * chunks; ++i) {
    queries[i] = (__m512bh)_mm512_loadu_si512(query_rows + 32 * i);
  }
  __m512bh key[8];
  for (int64_t pos = 0; pos < length; ++pos) {
    const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
    const c10::BFloat16* row = keys + slot * dim;
    for (int64_t c = 0; c < chunks; ++c) key[c] = (__m512bh)_mm512_loadu_si512(row + 32 * c);
    for (int64_t g = 0; g < group; ++g) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) sum = _mm512_dpbf16_ps(sum, queries[g * chunks + c], key[c]);
      scores[g * length + pos] = _mm512_reduce_add_ps(sum) * scale;
    }
  }
  return true;
}
#endif

template <typename T>
void decode(const T* q, int64_t q_stride, const T* pool, const int64_t* tables, const int64_t* lengths, T* out,
            int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t num_slots,
            int64_t block_size, int64_t table_width, float scale) {
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries(group * dim), acc(group * dim), row(dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads, length = lengths[b];
      const int64_t first_head = b * heads + h * group;
      const T* query_rows = q + b * q_stride + h * group * dim;
      for (int64_t i = 0; i < group * dim; ++i) {
        queries[i] = static_cast<float>(query_rows[i]) * scale;
      }
      const T* keys = pool + h * num_slots * dim;
      const T* values = pool + (kv_heads + h) * num_slots * dim;
      const int64_t* table = tables + b * table_width;
      scores.assign(group * length, 0.f);
      if (!key_scores(query_rows, keys, table, block_size, length, group, dim, scale,
                      scores.data())) {
        for (int64_t pos = 0; pos < length; ++pos) {
          const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
          const T* key = keys + slot * dim;
          load_row(key, row.data(), dim);
          for (int64_t g = 0; g < group; ++g) {
            const float* query = queries.data() + g * dim;
            float dot = 0.f;
            for (int64_t d = 0; d < dim; ++d) dot += query[d] * row[d];
            scores[g * length + pos] = dot;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * length;
        const float top = *std::max_element(s, s + length);
        float total = 0.f;
        for (int64_t pos = 0; pos < length; ++pos) total += (s[pos] = std::exp(s[pos] - top));
        for (int64_t pos = 0; pos < length; ++pos) s[pos] /= total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = 0; pos < length; ++pos) {
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        const T* value = values + slot * dim;
        load_row(value, row.data(), dim);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * length + pos];
          float* a = acc.data() + g * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] += p * row[d];
        }
      }
      for (int64_t i = 0; i < group * dim; ++i) out[first_head * dim + i] = static_cast<T>(acc[i]);
    }
  });
}

}  // namespace

// q [batch, heads, dim], each row's heads contiguous (a view into the qkv GEMM's output is
// fine); pool [2 * kv_heads * num_slots, dim] (plane (k|v, head) is slot-indexed);
// tables [batch, width] block ids; lengths [batch] context lengths (the new token included).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& pool,
                                  const at::Tensor& tables, const at::Tensor& lengths,
                                  int64_t kv_heads, int64_t block_size, double scale) {
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q: each row's heads contiguous");
  TORCH_CHECK(pool.is_contiguous() && tables.is_contiguous());
  TORCH_CHECK(q.scalar_type() == pool.scalar_type());
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t num_slots = pool.size(0) / (2 * kv_heads);
  auto out = at::empty({batch, heads, dim}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode_attention", [&] {
    decode<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), pool.data_ptr<scalar_t>(),
                     tables.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
                     out.data_ptr<scalar_t>(), batch, heads, kv_heads, dim, num_slots,
                     block_size, tables.size(1), static_cast<float>(scale));
  });
  return out;
}

TORCH_LIBRARY(genq, m) {
  m.def("paged_decode_attention(Tensor q, Tensor pool, Tensor tables, Tensor lengths, "
        "int kv_heads, int block_size, float scale) -> Tensor", &paged_decode_attention);
}
