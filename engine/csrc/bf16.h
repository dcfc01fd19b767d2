// Loads and stores of bf16 through fp32, shared by genq's CPU ops.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace genq {

// Loads and stores through fp32. The bf16 ones are plain bit operations (round to nearest even,
// as c10's conversion, minus its NaN branch) so that the loops vectorize; c10's do not.
inline float load(float v) { return v; }
inline float load(double v) { return static_cast<float>(v); }
inline float load(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void store(float* p, float v) { *p = v; }
inline void store(double* p, float v) { *p = v; }
inline void store(c10::BFloat16* p, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  p->x = static_cast<uint16_t>(bits >> 16);
}
template <typename T>
inline float round_trip(float v) {  // v rounded to T and back, as storing and loading it
  T t;
  store(&t, v);
  return load(t);
}

}  // namespace genq
