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

template <typename T>
bool decode_in_registers(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,
                         int64_t, float, float*, T*) {
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

// One whole (sequence, kv head) task in registers, for head dims of 64 and 128: key scores 16
// positions at a time, summed across lanes by one transpose tree instead of a horizontal sum
// per score; probabilities times V accumulated in zmm registers instead of a buffer in memory.
// Batch 64 x 200 context, SmolLM2's heads, one thread, Zen 4: 0.64-0.74 ms a call against
// 1.7-2.3 ms for the loops below (engine CPU per output token on the mixed workload: -10%).
inline __m512 sum_each_of_16(const __m512* s) {  // result lane i = the sum of s[i]'s lanes
  __m512 u[8], v[4], w[2];
  for (int i = 0; i < 8; ++i) {  // lanes 0-7: s[2i] folded to 8; lanes 8-15: s[2i+1]
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lane l: s[4i + l] folded to 4
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0xEE));
  }
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88),
                                 _mm512_shuffle_ps(w[0], w[1], 0xDD));
  // r[4l + t] is the sum of s[4t + l]
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, r);
}

inline __m512 widen(__m256i bf16) {  // 16 bf16 -> 16 fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

// Dim and the group size are compile-time, so every loop over them unrolls and the
// accumulators stay in registers (with a runtime group they spilled to the stack each position).
template <int64_t Dim, int64_t group>
void decode_task_in_registers(const c10::BFloat16* query_rows, const c10::BFloat16* keys,
                              const c10::BFloat16* values, const int64_t* table,
                              int64_t block_size, int64_t length, float scale, float* scores,
                              c10::BFloat16* out) {
  constexpr int64_t kChunks = Dim / 32, kVectors = Dim / 16;
  __m512bh queries[group][kChunks];
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t c = 0; c < kChunks; ++c) {
      queries[g][c] = (__m512bh)_mm512_loadu_si512(query_rows + g * Dim + 32 * c);
    }
  }
  auto row_of = [&](const c10::BFloat16* plane, int64_t pos) {
    return plane + (table[pos / block_size] * block_size + pos % block_size) * Dim;
  };
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t pos = 0;
  for (; pos + 16 <= length; pos += 16) {
    const c10::BFloat16* rows[16];
    for (int i = 0; i < 16; ++i) rows[i] = row_of(keys, pos + i);
    for (int64_t g = 0; g < group; ++g) {
      __m512 sums[16];
      for (int i = 0; i < 16; ++i) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < kChunks; ++c) {
          sum = _mm512_dpbf16_ps(sum, queries[g][c],
                                 (__m512bh)_mm512_loadu_si512(rows[i] + 32 * c));
        }
        sums[i] = sum;
      }
      _mm512_storeu_ps(scores + g * length + pos, _mm512_mul_ps(sum_each_of_16(sums), vscale));
    }
  }
  for (; pos < length; ++pos) {
    const c10::BFloat16* row = row_of(keys, pos);
    for (int64_t g = 0; g < group; ++g) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < kChunks; ++c) {
        sum = _mm512_dpbf16_ps(sum, queries[g][c], (__m512bh)_mm512_loadu_si512(row + 32 * c));
      }
      scores[g * length + pos] = _mm512_reduce_add_ps(sum) * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * length;
    const float top = *std::max_element(s, s + length);
    float total = 0.f;
    for (int64_t i = 0; i < length; ++i) total += (s[i] = std::exp(s[i] - top));
    const float inverse = 1.f / total;
    for (int64_t i = 0; i < length; ++i) s[i] *= inverse;
  }
  __m512 acc[group][kVectors];
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t v = 0; v < kVectors; ++v) acc[g][v] = _mm512_setzero_ps();
  }
  for (pos = 0; pos < length; ++pos) {
    const c10::BFloat16* row = row_of(values, pos);
    __m512 value[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) {
      value[v] = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * v)));
    }
    for (int64_t g = 0; g < group; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * length + pos]);
      for (int64_t v = 0; v < kVectors; ++v) acc[g][v] = _mm512_fmadd_ps(p, value[v], acc[g][v]);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t v = 0; v < kVectors; ++v) {
      // fp32 -> bf16, rounded to nearest even (as genq::store)
      const __m512i bits = _mm512_castps_si512(acc[g][v]);
      const __m512i rounded = _mm512_add_epi32(
          bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                 _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * Dim + 16 * v),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
    }
  }
}

template <int64_t Dim>
bool decode_dim_in_registers(const c10::BFloat16* query_rows, const c10::BFloat16* keys,
                             const c10::BFloat16* values, const int64_t* table,
                             int64_t block_size, int64_t length, int64_t group, float scale,
                             float* scores, c10::BFloat16* out) {
  switch (group) {
    case 1: decode_task_in_registers<Dim, 1>(query_rows, keys, values, table, block_size,
                                             length, scale, scores, out); return true;
    case 2: decode_task_in_registers<Dim, 2>(query_rows, keys, values, table, block_size,
                                             length, scale, scores, out); return true;
    case 3: decode_task_in_registers<Dim, 3>(query_rows, keys, values, table, block_size,
                                             length, scale, scores, out); return true;
    case 4: decode_task_in_registers<Dim, 4>(query_rows, keys, values, table, block_size,
                                             length, scale, scores, out); return true;
    default: return false;
  }
}

template <>
bool decode_in_registers(const c10::BFloat16* query_rows, const c10::BFloat16* keys,
                         const c10::BFloat16* values, const int64_t* table, int64_t block_size,
                         int64_t length, int64_t group, int64_t dim, float scale, float* scores,
                         c10::BFloat16* out) {
  if (dim == 64) {
    return decode_dim_in_registers<64>(query_rows, keys, values, table, block_size, length,
                                       group, scale, scores, out);
  }
  if (dim == 128) {
    return decode_dim_in_registers<128>(query_rows, keys, values, table, block_size, length,
                                        group, scale, scores, out);
  }
  return false;
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
      const T* keys = pool + h * num_slots * dim;
      const T* values = pool + (kv_heads + h) * num_slots * dim;
      const int64_t* table = tables + b * table_width;
      scores.resize(group * length);
      if (decode_in_registers(query_rows, keys, values, table, block_size, length, group, dim,
                              scale, scores.data(), out + first_head * dim)) {
        continue;
      }
      std::fill(scores.begin(), scores.end(), 0.f);
      for (int64_t i = 0; i < group * dim; ++i) {
        queries[i] = static_cast<float>(query_rows[i]) * scale;
      }
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
