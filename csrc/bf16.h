// bf16 <-> fp32 over arrays, written so that the compiler vectorizes them: at::BFloat16's own
// conversions are calls it does not. Shared by the kernels of this folder.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace fleetserve {

inline void load_float(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
// Bits move through __builtin_bit_cast (no pointer casts between float and integer types:
// those break strict aliasing, which -O3 assumes).
inline void load_float(const at::BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    dst[i] = __builtin_bit_cast(float, static_cast<uint32_t>(src[i].x) << 16);
}
// fp32 -> bf16 rounding to nearest even, as c10::BFloat16 does (finite values; a NaN may
// change payload but stays NaN).
inline uint16_t bf16_bits(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return nan ? static_cast<uint16_t>((u >> 16) | 0x40)
             : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline void store_float(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
inline void store_float(const float* src, at::BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i].x = bf16_bits(src[i]);
}
// x rounded to bf16's precision, kept in fp32 (NaN unchanged).
template <typename T>
inline void round_in_place(float* x, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t u = __builtin_bit_cast(uint32_t, x[i]);
      const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
      x[i] = __builtin_bit_cast(float, (u & 0x7fffffffu) > 0x7f800000u ? u : r);
    }
  }
}

}  // namespace fleetserve
