// Fused element-wise ops of a decoder layer on the CPU: RMSNorm (with the residual add),
// rotary embedding in place, and SiLU(gate) * up.
//
// Why: at decode batch sizes each of these is 5-10 small torch ops (cast, pow, mean, rsqrt,
// mul, cast back, ...), each paying the dispatcher and a pass over memory; 30 layers of them
// cost milliseconds per step. Each op here is one pass, one call.
//
// Rounding follows the torch reference (fleetserve/models/layers.py, rotary.py, llama.py) step
// by step: fp32 arithmetic, and a rounding to the tensor's dtype wherever torch stores an
// intermediate in that dtype, so that bf16 results match it to the last bit but for fp32
// summation order.

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "bf16.h"

namespace {

using fleetserve::load_float;
using fleetserve::round_in_place;
using fleetserve::store_float;

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
// x rounded to T and back: what storing an fp32 value in a T tensor does to it.
template <typename T>
inline float round_to(float x) {
  return to_float(static_cast<T>(x));
}

// Rows per parallel task: enough elements that a task outweighs waking a thread.
inline int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1));
}

// torch: x32 = x.float(); x32 * rsqrt(mean(x32^2) + eps) -> cast to T -> weight * that (in T).
template <typename T>
inline void rms_norm_row(T* __restrict out, const T* __restrict x, const T* __restrict w,
                         int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]);
    ss += v * v;
  }
  // In double: -ffast-math would turn 1/sqrtf into an approximate rsqrt.
  const float r = static_cast<float>(1.0 / std::sqrt(static_cast<double>(ss / n + eps)));
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(to_float(w[i]) * round_to<T>(to_float(x[i]) * r));
}

template <typename T>
void rms_norm_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const int64_t xs = x.stride(0), os = out.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) rms_norm_row(op + r * os, xp + r * xs, wp, n, eps);
  });
}

// residual = x + residual (in T), then x = rms_norm(residual): a layer's "add the sublayer's
// output to the stream, normalize the stream for the next sublayer".
template <typename T>
void add_rms_norm_impl(at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const int64_t xs = x.stride(0), rs = residual.stride(0);
  T* xp = x.data_ptr<T>();
  T* rp = residual.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* xr = xp + r * xs;
      T* rr = rp + r * rs;
      for (int64_t i = 0; i < n; ++i) rr[i] = static_cast<T>(to_float(xr[i]) + to_float(rr[i]));
      rms_norm_row(xr, rr, wp, n, eps);
    }
  });
}

// "Rotate half" RoPE on rows [T, H, D] (heads contiguous, any token stride), in place:
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin from cache[position] = [cos | sin].
template <typename T>
inline void rope_heads(T* base, int64_t token_stride, int64_t heads, int64_t head_dim,
                       const float* cs, int64_t t) {
  const int64_t half = head_dim / 2;
  const float* c = cs;
  const float* s = cs + half;
  for (int64_t h = 0; h < heads; ++h) {
    T* x = base + t * token_stride + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
      const float a = x1 * c[i], b = x2 * s[i], d = x2 * c[i], f = x1 * s[i];
      x[i] = static_cast<T>(a - b);
      x[i + half] = static_cast<T>(d + f);
    }
  }
}

template <typename T>
void rope_impl(at::Tensor& q, at::Tensor& k, const at::Tensor& positions,
               const at::Tensor& cache) {
  const int64_t tokens = q.size(0), hq = q.size(1), hk = k.size(1), d = q.size(2);
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const int64_t qs = q.stride(0), ks = k.stride(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cache.data_ptr<float>();
  const int64_t cstride = cache.stride(0);
  at::parallel_for(0, tokens, grain_rows((hq + hk) * d), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* cs = cp + pos[t] * cstride;
      rope_heads(qp, qs, hq, d, cs, t);
      rope_heads(kp, ks, hk, d, cs, t);
    }
  });
}

// Rows are converted in chunks of kChunk into fp32 arrays, so that the arithmetic (exp above
// all) vectorizes: at::BFloat16's conversions are calls the compiler does not vectorize.
constexpr int64_t kChunk = 64;

// out = silu(gate) * up with x = [gate | up]: silu rounded to T, then the product in T.
template <typename T>
void silu_and_mul_impl(at::Tensor& out, const at::Tensor& x) {
  const int64_t rows = x.size(0), n = out.size(1);
  const int64_t xs = x.stride(0), os = out.stride(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, grain_rows(2 * n), [&](int64_t b, int64_t e) {
    alignas(64) float g[kChunk], u[kChunk];
    for (int64_t r = b; r < e; ++r) {
      for (int64_t c = 0; c < n; c += kChunk) {
        const int64_t m = std::min(kChunk, n - c);
        load_float(xp + r * xs + c, g, m);
        load_float(xp + r * xs + n + c, u, m);
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) g[i] = g[i] / (1.f + std::exp(-g[i]));
        round_in_place<T>(g, m);
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) g[i] *= u[i];
        store_float(g, op + r * os + c, m);
      }
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, n] with contiguous rows");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, not ", t.scalar_type());
  // Rows are written by parallel threads: two rows must not share memory (stride 0, expand).
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), name, " has overlapping rows");
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes(), "out and x differ in shape");
  at::assert_no_overlap(out, x);
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(1),
              "weight must be contiguous [", x.size(1), "]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "out, x and weight must share one dtype");
  if (x.scalar_type() == at::kFloat)
    rms_norm_impl<float>(out, x, weight, eps);
  else
    rms_norm_impl<at::BFloat16>(out, x, weight, eps);
}

void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual and x differ in shape");
  at::assert_no_overlap(x, residual);
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(1),
              "weight must be contiguous [", x.size(1), "]");
  TORCH_CHECK(
      residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
      "x, residual and weight must share one dtype");
  if (x.scalar_type() == at::kFloat)
    add_rms_norm_impl<float>(x, residual, weight, eps);
  else
    add_rms_norm_impl<at::BFloat16>(x, residual, weight, eps);
}

void rotary_embedding(at::Tensor q, at::Tensor k, const at::Tensor& positions,
                      const at::Tensor& cos_sin_cache) {
  for (const auto* t : {&q, &k}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 3, "q and k must be CPU [tokens, heads, D]");
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == t->size(2),
                "q and k must have contiguous heads");
    TORCH_CHECK(t->size(0) <= 1 || t->stride(0) >= t->size(1) * t->size(2),
                "q and k must not have overlapping rows");
  }
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(2) % 2 == 0,
              "q and k: same tokens and an even head_dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "q and k must share one dtype, float32 or bfloat16");
  TORCH_CHECK(cos_sin_cache.device().is_cpu() && cos_sin_cache.scalar_type() == at::kFloat &&
                  cos_sin_cache.dim() == 2 && cos_sin_cache.stride(1) == 1 &&
                  cos_sin_cache.size(1) == q.size(2),
              "cos_sin_cache must be float32 [max_position, head_dim]");
  TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == at::kLong &&
                  positions.dim() == 1 && positions.is_contiguous() &&
                  positions.size(0) == q.size(0),
              "positions must be contiguous int64 [tokens]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.size(0); ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos_sin_cache.size(0), "position ", pos[t],
                " outside the rotary cache of ", cos_sin_cache.size(0));
  if (q.scalar_type() == at::kFloat)
    rope_impl<float>(q, k, positions, cos_sin_cache);
  else
    rope_impl<at::BFloat16>(q, k, positions, cos_sin_cache);
}

void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(x.size(0) == out.size(0) && x.size(1) == 2 * out.size(1),
              "x must be [rows, 2n] for out [rows, n]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out and x must share one dtype");
  at::assert_no_overlap(out, x);
  if (x.scalar_type() == at::kFloat)
    silu_and_mul_impl<float>(out, x);
  else
    silu_and_mul_impl<at::BFloat16>(out, x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fleetserve, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def(
      "rotary_embedding(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin_cache) "
      "-> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.impl("rotary_embedding", c10::DispatchKey::CPU, TORCH_FN(rotary_embedding));
  m.impl("silu_and_mul", c10::DispatchKey::CPU, TORCH_FN(silu_and_mul));
}
