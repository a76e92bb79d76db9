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
inline void load_float(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}
// fp32 -> bf16 rounding to nearest even, as c10::BFloat16 does (finite values; a NaN may
// change payload but stays NaN).
inline void store_float(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
inline void store_float(const float* src, at::BFloat16* dst, int64_t n) {
  const uint32_t* in = reinterpret_cast<const uint32_t*>(src);
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = in[i];
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    bits[i] = nan ? static_cast<uint16_t>((u >> 16) | 0x40) : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}
template <typename T>
inline void round_in_place(float* x, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    uint32_t* u = reinterpret_cast<uint32_t*>(x);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t r = (u[i] + 0x7fffu + ((u[i] >> 16) & 1u)) & 0xffff0000u;
      u[i] = (u[i] & 0x7fffffffu) > 0x7f800000u ? u[i] : r;
    }
  }
}

}  // namespace fleetserve
