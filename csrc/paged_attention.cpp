// Paged attention on the CPU that reads each K/V block once.
//
// One task is (sequence, KV head, tile of query rows): it walks the sequence's blocks in
// order, and every block it loads serves all the query heads of that KV head (GQA) and all
// the rows of the tile, with an online softmax so that no score matrix is ever built.
// Tasks run in parallel with at::parallel_for (torch's own thread pool and thread count).
// Arithmetic is fp32 whatever the cache holds (fp32 or bf16).
//
// Layout (as fleetserve/attention/torch_ref.py): kv_cache [2, H_kv, num_blocks, block_size, D];
// q and out [num_tokens, H, D]; sequence s owns query rows
// query_start_loc[s]:query_start_loc[s+1], and row j of it sits at position
// seq_lens[s] - q_len + j and sees keys 0..that position (causal).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Query rows of one sequence per task: enough to share each loaded block among several
// rows of a prefill chunk, few enough to give both cores work.
constexpr int64_t kRowTile = 16;
// Scores start here instead of -inf: the build uses -ffast-math, which assumes no infinities.
constexpr float kNoScore = -1e30f;

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline void store(T* dst, const float* src, float mul, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d] * mul);
}

// Element i of a cache row as fp32. For bf16 a shift of its bits, which the compiler folds
// into the vector loops below: converting whole blocks into a buffer first cost more than
// the arithmetic (the buffer round trip, and no overlap of the cache reads with the math).
template <typename T>
inline float elem(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    return p[i];
  } else {
    const uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
    return __builtin_bit_cast(float, u);
  }
}

template <int64_t HD, typename T>
inline float dot(const float* __restrict a, const T* __restrict b, int64_t n) {
  if constexpr (HD > 0) n = HD;
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * elem(b, d);
  return s;
}

// a = a * alpha + sum_j p[j] * v[j]: v is [n, head_dim]. With head_dim known, the sum runs
// in a local array that the compiler keeps in registers.
template <int64_t HD, typename T>
inline void accumulate(float* __restrict a, float alpha, const float* __restrict p,
                       const T* __restrict v, int64_t n, int64_t head_dim) {
  if constexpr (HD > 0) {
    float sum[HD];
    for (int64_t d = 0; d < HD; ++d) sum[d] = a[d] * alpha;
    for (int64_t j = 0; j < n; ++j)
#pragma omp simd
      for (int64_t d = 0; d < HD; ++d) sum[d] += p[j] * elem(v, j * HD + d);
    for (int64_t d = 0; d < HD; ++d) a[d] = sum[d];
  } else {
    for (int64_t d = 0; d < head_dim; ++d) a[d] *= alpha;
    for (int64_t j = 0; j < n; ++j)
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) a[d] += p[j] * elem(v, j * head_dim + d);
  }
}

struct Task {
  int64_t seq, kv_head, row_begin, row_end;
};

// HD > 0 fixes head_dim at compile time, so that the loops over it unroll into registers;
// HD == 0 reads it from q.
template <typename T, int64_t HD>
void run(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
         const at::Tensor& block_tables, const std::vector<int64_t>& qsl,
         const std::vector<int64_t>& seq_lens, const std::vector<int64_t>& seqs,
         double scale_d) {
  const int64_t num_heads = q.size(1), head_dim = HD > 0 ? HD : q.size(2);
  const int64_t num_kv_heads = kv_cache.size(1), num_blocks = kv_cache.size(2);
  const int64_t block_size = kv_cache.size(3);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t table_stride = block_tables.stride(0);
  const float scale = static_cast<float>(scale_d);
  const int64_t q_row = q.stride(0);  // q may be a view into the fused qkv rows
  const T* q_ptr = q.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const T* k_base = kv_cache.data_ptr<T>();
  const T* v_base = k_base + num_kv_heads * num_blocks * block_size * head_dim;
  const int64_t* tables = block_tables.data_ptr<int64_t>();

  std::vector<Task> tasks;
  for (const int64_t s : seqs) {
    const int64_t q_len = qsl[s + 1] - qsl[s];
    for (int64_t h = 0; h < num_kv_heads; ++h)
      for (int64_t r = 0; r < q_len; r += kRowTile)
        tasks.push_back({s, h, r, std::min(r + kRowTile, q_len)});
  }

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    const int64_t max_q = kRowTile * group;
    std::vector<float> qf(max_q * head_dim), acc(max_q * head_dim), m(max_q), l(max_q);
    std::vector<float> p(block_size);
    for (int64_t i = begin; i < end; ++i) {
      const Task& t = tasks[i];
      const int64_t row0 = qsl[t.seq] + t.row_begin;  // token index of the tile's first row
      const int64_t rows = t.row_end - t.row_begin;
      const int64_t first_pos = seq_lens[t.seq] - (qsl[t.seq + 1] - qsl[t.seq]) + t.row_begin;
      const int64_t kv_end = first_pos + rows;  // keys [0, kv_end) are seen by some row
      // query r*group + g is row r of the tile, head t.kv_head*group + g
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t qi = r * group + g;
          const T* src = q_ptr + (row0 + r) * q_row + (t.kv_head * group + g) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) qf[qi * head_dim + d] = to_float(src[d]) * scale;
          m[qi] = kNoScore;
          l[qi] = 0.f;
        }
      std::fill(acc.begin(), acc.begin() + rows * group * head_dim, 0.f);

      const int64_t* table = tables + t.seq * table_stride;
      for (int64_t start = 0; start < kv_end; start += block_size) {
        const int64_t n = std::min(block_size, kv_end - start);
        const int64_t offset = ((t.kv_head * num_blocks) + table[start / block_size]) * block_size;
        const T* k = k_base + offset * head_dim;
        const T* v = v_base + offset * head_dim;
        for (int64_t r = 0; r < rows; ++r) {
          // row r sees keys up to first_pos + r: `visible` of this block's n
          const int64_t visible = std::min(n, first_pos + r + 1 - start);
          if (visible <= 0) continue;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t qi = r * group + g;
            const float* qv = qf.data() + qi * head_dim;
            float* __restrict pj = p.data();
            for (int64_t j = 0; j < visible; ++j) pj[j] = dot<HD>(qv, k + j * head_dim, head_dim);
            float block_max = kNoScore;
#pragma omp simd reduction(max : block_max)
            for (int64_t j = 0; j < visible; ++j) block_max = std::max(block_max, pj[j]);
            const float new_m = std::max(m[qi], block_max);
            const float alpha = std::exp(m[qi] - new_m);
            float sum = 0.f;
            // one vector exp for the block (libmvec), not one call per key
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < visible; ++j) {
              pj[j] = std::exp(pj[j] - new_m);
              sum += pj[j];
            }
            l[qi] = l[qi] * alpha + sum;
            m[qi] = new_m;
            float* a = acc.data() + qi * head_dim;
            accumulate<HD>(a, alpha, p.data(), v, visible, head_dim);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t qi = r * group + g;
          T* dst = out_ptr + ((row0 + r) * num_heads + t.kv_head * group + g) * head_dim;
          store(dst, acc.data() + qi * head_dim, 1.f / l[qi], head_dim);
        }
    }
  });
}

template <typename T>
void dispatch_head_dim(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                       const at::Tensor& block_tables, const std::vector<int64_t>& qsl,
                       const std::vector<int64_t>& lens, const std::vector<int64_t>& seqs,
                       double scale) {
  switch (q.size(2)) {
    case 64:
      return run<T, 64>(out, q, kv_cache, block_tables, qsl, lens, seqs, scale);
    case 128:
      return run<T, 128>(out, q, kv_cache, block_tables, qsl, lens, seqs, scale);
    default:
      return run<T, 0>(out, q, kv_cache, block_tables, qsl, lens, seqs, scale);
  }
}

// Attention of the query rows of sequences `seqs` against the paged cache, written into
// their rows of `out` (other rows are left alone). The step's own K/V must already be in
// the cache. Does not modify the cache.
void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& kv_cache,
                     const at::Tensor& block_tables, at::IntArrayRef query_start_loc,
                     at::IntArrayRef seq_lens, at::IntArrayRef seqs, double scale) {
  TORCH_CHECK(out.device().is_cpu() && q.device().is_cpu() && kv_cache.device().is_cpu() &&
                  block_tables.device().is_cpu(),
              "out, q, kv_cache and block_tables must be CPU tensors");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out: [num_tokens, H, D]");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.size(4) == q.size(2) &&
                  kv_cache.size(1) > 0 && kv_cache.size(3) > 0,
              "kv_cache: [2, H_kv, num_blocks, block_size, D]");
  TORCH_CHECK(q.size(1) % kv_cache.size(1) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, out and kv_cache must share one dtype");
  TORCH_CHECK(out.is_contiguous() && kv_cache.is_contiguous(),
              "out and kv_cache must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && q.stride(0) >= q.size(1) * q.size(2),
              "q must have contiguous heads (rows may be strided)");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 &&
                  block_tables.stride(1) == 1,
              "block_tables: int64 [num_seqs, max_blocks] with contiguous rows");
  TORCH_CHECK(query_start_loc.size() == seq_lens.size() + 1 &&
                  static_cast<int64_t>(seq_lens.size()) <= block_tables.size(0),
              "query_start_loc has one entry more than seq_lens; one table row per sequence");
  const std::vector<int64_t> qsl(query_start_loc.begin(), query_start_loc.end());
  const std::vector<int64_t> lens(seq_lens.begin(), seq_lens.end());
  const std::vector<int64_t> todo(seqs.begin(), seqs.end());
  // Every query row index the tasks compute, qsl[s] + r, must lie in [0, q.size(0)): out and
  // q are written and read through raw pointers with no other bound.
  TORCH_CHECK(qsl.front() >= 0, "query_start_loc[0] must be >= 0, got ", qsl.front());
  for (size_t i = 1; i < qsl.size(); ++i)
    TORCH_CHECK(qsl[i] >= qsl[i - 1], "query_start_loc must be non-decreasing, got ", qsl[i - 1],
                " then ", qsl[i], " at ", i);
  TORCH_CHECK(qsl.back() <= q.size(0), "query_start_loc ends at ", qsl.back(), " but q has ",
              q.size(0), " rows");
  for (const int64_t s : todo) {
    TORCH_CHECK(s >= 0 && s < static_cast<int64_t>(lens.size()), "no sequence ", s);
    const int64_t q_len = qsl[s + 1] - qsl[s];
    TORCH_CHECK(lens[s] >= q_len, "seq_lens[", s, "] = ", lens[s], " is shorter than its ", q_len,
                " query rows");
    const int64_t used = (lens[s] + kv_cache.size(3) - 1) / kv_cache.size(3);
    TORCH_CHECK(used <= block_tables.size(1), "block table of sequence ", s, " is too short");
    const int64_t* row = block_tables.data_ptr<int64_t>() + s * block_tables.stride(0);
    for (int64_t j = 0; j < used; ++j)
      TORCH_CHECK(row[j] >= 0 && row[j] < kv_cache.size(2), "block id out of range: ", row[j]);
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "paged_attention supports float32 and bfloat16, not ", q.scalar_type());
  if (q.scalar_type() == at::kFloat) {
    dispatch_head_dim<float>(out, q, kv_cache, block_tables, qsl, lens, todo, scale);
  } else {
    dispatch_head_dim<at::BFloat16>(out, q, kv_cache, block_tables, qsl, lens, todo, scale);
  }
}

// The step's new K/V rows into their cache slots: kv_cache[0|1][h][slot / bs][slot % bs] =
// k|v[t][h] for slot = slot_mapping[t]. k and v may be views into the fused qkv rows.
template <typename T>
void write_kv_impl(at::Tensor& kv_cache, const at::Tensor& k, const at::Tensor& v,
                   const int64_t* slots) {
  const int64_t tokens = k.size(0), heads = k.size(1), d = k.size(2);
  const int64_t num_slots = kv_cache.size(2) * kv_cache.size(3);
  T* k_base = kv_cache.data_ptr<T>();
  T* v_base = k_base + heads * num_slots * d;
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t ks = k.stride(0), vs = v.stride(0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t dst = (h * num_slots + slots[t]) * d;
      std::copy_n(kp + t * ks + h * d, d, k_base + dst);
      std::copy_n(vp + t * vs + h * d, d, v_base + dst);
    }
}

void write_kv(at::Tensor kv_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(kv_cache.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  slot_mapping.device().is_cpu(),
              "kv_cache, k, v and slot_mapping must be CPU tensors");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache: contiguous [2, H_kv, num_blocks, block_size, D]");
  TORCH_CHECK(k.sizes() == v.sizes() && k.dim() == 3 && k.size(1) == kv_cache.size(1) &&
                  k.size(2) == kv_cache.size(4),
              "k and v: [tokens, H_kv, D] matching the cache");
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == t->size(2),
                "k and v must have contiguous heads");
  TORCH_CHECK(k.scalar_type() == kv_cache.scalar_type() && v.scalar_type() == k.scalar_type(),
              "k, v and kv_cache must share one dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.is_contiguous() && slot_mapping.size(0) == k.size(0),
              "slot_mapping: contiguous int64 [tokens]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = kv_cache.size(2) * kv_cache.size(3);
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot out of range: ", slots[t]);
  if (k.scalar_type() == at::kFloat)
    write_kv_impl<float>(kv_cache, k, v, slots);
  else if (k.scalar_type() == at::kBFloat16)
    write_kv_impl<at::BFloat16>(kv_cache, k, v, slots);
  else
    TORCH_CHECK(false, "write_kv supports float32 and bfloat16, not ", k.scalar_type());
}

}  // namespace

TORCH_LIBRARY(fleetserve, m) {
  m.def("write_kv(Tensor(a!) kv_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
  m.impl("write_kv", c10::DispatchKey::CPU, TORCH_FN(write_kv));
  m.def(
      "paged_attention(Tensor(a!) out, Tensor q, Tensor kv_cache, Tensor block_tables, "
      "int[] query_start_loc, int[] seq_lens, int[] seqs, float scale) -> ()");
  m.impl("paged_attention", c10::DispatchKey::CPU, TORCH_FN(paged_attention));
}
