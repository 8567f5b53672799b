// The fused label-smoothing kernels on CPU, one per pass over the logits (lsr/fused/passes.py):
//
//   row_stats         one read   -> lse, and dot (exact) or 1 - p_y (SparseLSR) per row
//   gradient          one read, one write (new memory or over the logits) -> p exp(z_k - lse) - r w_k,
//                     and t on the target column
//   forward_gradient  the one-pass mode: one read, one write over the logits -> row losses, and the
//                     gradient written over the logits
//
// and what the losses call, a whole forward or backward with its O(N) algebra (at the end of the file):
//   loss_forward      row_stats' sweep, then the loss and per-row lse, alpha, tau and share
//   loss_backward     gradient's sweep, scaled by the upstream gradient
//   onepass_loss      forward_gradient's sweep, then the loss
//
// The math is in lsr/fused/algebra.py; this file orders it for the cache. A row (40 KB at C = 10000
// float32) is swept while it stays in L2, so only its first read and last write go to memory:
//   1. the max m (and dot = sum_j w_j z_j for exact smoothing with eps > 0);
//   2. exp(z_j - m), summed (row_stats: SparseLSR sums the non-target terms, so that 1 - p_y keeps
//      its digits); the one-pass mode writes them over the row, or, for half inputs, into a float32
//      row buffer, so that they are never rounded to half;
//   3. the gradient, written out (the gradient kernel: steps 2 and 3 in one sweep, from lse).
// Rows run in parallel (at::parallel_for). Half inputs are widened to float32 as they are read.
//
// Built per vector ISA by lsr/fused/cpp.py (torch.utils.cpp_extension.load, -O3, CPU_CAPABILITY set
// to the one torch itself dispatches to on this machine), so at::vec::Vectorized is AVX2 or AVX-512,
// and with -fopenmp where torch has OpenMP: at::parallel_for is a header template whose
// `#pragma omp parallel` is ignored without it, and the whole range then runs on the calling thread.
// `threads_used()` says how many distinct threads ran rows in the last call, so a test can tell.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Partial sums of this many elements are added in double: float32 sums of whole 262144-long rows
// would lose digits; blocks keep the error at that of a 1024-term sum.
constexpr int64_t kSumBlock = 1024;
// Independent accumulators per sweep: with one, each vector waits for the previous max's or add's
// latency (measured: the max sweep took a third of the one-pass kernel's time with one chain).
constexpr int kChains = 4;

constexpr double kInf = std::numeric_limits<double>::infinity();

// exp for the sweeps: ATen's exp_u20, a degree-5 polynomial for float (for double the ordinary exp).
// Measured on AVX2 (one thread, 1024 x 10000): the one-pass kernel at 0.71x the floor's time with
// it, 1.0x with Sleef's exp_u10 (the floor's own); the softmax it gives is within 2.0e-6 relative of
// float64 (torch's float32 softmax: 2.8e-6). Its arguments here are <= 0 (z - m or z - lse; -inf
// gives 0); it does not propagate NaN, so rows with a NaN or +inf logit take `scalar_*` instead.
// GCC does not inline exp_u20 on its own: it was a call through the PLT per vector. The sweeps are
// therefore `flatten`ed, which inlines it (and everything else they call) into their loops.
template <typename acc_t>
inline Vectorized<acc_t> vec_exp(const Vectorized<acc_t>& x) {
  return x.exp_u20();
}

#if defined(CPU_CAPABILITY_AVX512)
// On AVX-512, where the logits come from cache, the sweeps are bound by arithmetic, most of it the
// exp, on the two ports that run 512-bit instructions: 11 instructions here against exp_u20's 19
// (a loop over L1: 0.26 against 0.35 ns per value; docs/fused.md has the kernels' times).
// exp(x) = 2^n e^r, n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two parts, so
// that n ln2_hi is exact), e^r by a degree-5 polynomial fitted for relative error (1.7e-7 over every
// float32 in [-110, 0]), 2^n applied by scalef, which also gives subnormals and 0. Arguments below
// -110 are clamped there (exp 0 exactly, -inf included); NaN becomes 0 as with exp_u20. Tested
// against float64 by tests/test_cpp_kernels.py through `lsr_fused::sweep_exp`.
template <>
inline Vectorized<float> vec_exp<float>(const Vectorized<float>& x) {
  constexpr float kLog2e = 1.44269502f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860677e-06f;
  constexpr float kC1 = 0.999999821f, kC2 = 0.499990970f, kC3 = 0.166672811f, kC4 = 0.0419040658f,
                  kC5 = 0.00831373967f;
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-110.0f));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_mul_ps(clamped, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kC5), r, _mm512_set1_ps(kC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif
#define LSR_FLATTEN __attribute__((flatten))

// Vectorized<acc_t>::size() logits from their storage, widened to acc_t.
template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> load_wide(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    Vectorized<float> out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// A row's tail, its last C % V values, as a padded vector: the first `count` from p, the other lanes
// `fill` (masked loads for float and double). The sweeps handle it as one more vector, before their
// loop: assembled after it by scalar code (the gradient's in double, with std::exp per value) it
// cost 5-22% of the kernels at C = 1000 (docs/fused.md).
template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> load_tail(const scalar_t* p, int64_t count, acc_t fill) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vec::set(Vec(fill), Vec::loadu(p, count), count);
  } else {
    acc_t values[Vec::size()];
    for (int64_t k = 0; k < Vec::size(); ++k) values[k] = k < count ? static_cast<acc_t>(p[k]) : fill;
    return Vec::loadu(values);
  }
}

// The first `count` lanes of v, narrowed to scalar_t, stored at p.
template <typename scalar_t, typename acc_t>
inline void store_tail(scalar_t* p, const Vectorized<acc_t>& v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, count);
  } else {
    acc_t values[Vectorized<acc_t>::size()];
    v.store(values);
    for (int64_t k = 0; k < count; ++k) p[k] = static_cast<scalar_t>(values[k]);
  }
}

// v with lane k set to x (rare: a target column's lane in SparseLSR's exp sweep).
template <typename acc_t>
inline Vectorized<acc_t> with_lane(const Vectorized<acc_t>& v, int64_t k, acc_t x) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  lanes[k] = x;
  return Vectorized<acc_t>::loadu(lanes);
}

// V values from p, widened: all of them (count == V, the loops' case, which the inlined lambdas
// below fold to `load_wide`), or a tail padded with zeros.
template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> load_some(const scalar_t* p, int64_t count) {
  return count == Vectorized<acc_t>::size() ? load_wide<scalar_t, acc_t>(p) : load_tail<scalar_t, acc_t>(p, count, 0);
}

// Stores a row of C values given as vectors: value(j, count) for the `count` values from column j,
// count = V but in the tail (the tail first, as load_tail says), narrowed to scalar_t two vectors
// at a time for half types.
template <typename scalar_t, typename acc_t, typename Value>
inline void store_row(scalar_t* out, int64_t C, Value value) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C_vec = C - C % V;
  if (C_vec < C) store_tail<scalar_t, acc_t>(out + C_vec, value(C_vec, C - C_vec), C - C_vec);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t j = 0; j < C_vec; j += V) value(j, V).store(out + j);
  } else {
    int64_t j = 0;
    for (; j + 2 * V <= C_vec; j += 2 * V) {
      at::vec::convert_from_float<scalar_t>(value(j, V), value(j + V, V)).store(out + j);
    }
    if (j < C_vec) store_tail<scalar_t, acc_t>(out + j, value(j, V), V);
  }
}

// Ask for the cache lines of logits [j, j + n) of the next row into L2 (prefetcht1).
template <typename scalar_t>
inline void prefetch(const scalar_t* next_row, int64_t j, int64_t n) {
#if defined(__GNUC__) || defined(__clang__)
  if (next_row == nullptr) return;
  const char* start = reinterpret_cast<const char*>(next_row + j);
  for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(scalar_t)); offset += 64) {
    __builtin_prefetch(start + offset, 0, 2);
  }
#endif
}

struct Params {
  int64_t num_classes;
  double smoothing;
  bool sparse;
  double paper_eps;  // SparseLSR's guard of log(0): lsr.constants.PAPER_EPS
  bool has_weight;
  double weight_sum;  // W = sum_j w_j (exact smoothing with weights)
};

// --- step 1: max and dot -------------------------------------------------------------------------------

struct MaxDot {
  double max;  // NaN if a logit is NaN
  double dot;  // sum_j w_j z_j if asked for, else 0
};

// Step 1 over a row; half logits are also widened into `wide` when it is not null (the one-pass mode).
template <typename scalar_t, typename acc_t>
LSR_FLATTEN MaxDot max_and_dot(const scalar_t* z, int64_t C, const acc_t* w, bool need_dot, acc_t* wide) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C_vec = C - C % V;
  Vec vmax[kChains], vdot[kChains];
  for (int c = 0; c < kChains; ++c) {
    vmax[c] = Vec(-std::numeric_limits<acc_t>::infinity());
    vdot[c] = Vec(0);
  }
  // The tail first (load_tail says why): zeros past C for the dot, -inf for the max
  Vec tail_dot(0);
  if (C_vec < C) {
    const Vec t = load_tail<scalar_t, acc_t>(z + C_vec, C - C_vec, acc_t(0));
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      if (wide) t.store(wide + C_vec, C - C_vec);
    }
    vmax[0] = Vec::set(Vec(-std::numeric_limits<acc_t>::infinity()), t, C - C_vec);
    if (need_dot) tail_dot = w ? t * Vec::loadu(w + C_vec, C - C_vec) : t;
  }
  auto read = [&](int64_t j, int c) {
    const Vec v = load_wide<scalar_t, acc_t>(z + j);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      if (wide) v.store(wide + j);
    }
    vmax[c] = at::vec::maximum(vmax[c], v);  // propagates NaN
    if (need_dot) vdot[c] = w ? at::vec::fmadd(v, Vec::loadu(w + j), vdot[c]) : vdot[c] + v;
  };
  double dot = 0;
  for (int64_t start = 0; start < C_vec; start += kSumBlock) {
    const int64_t stop = std::min(start + kSumBlock, C_vec);
    int64_t j = start;
    for (; j + kChains * V <= stop; j += kChains * V) {
      for (int c = 0; c < kChains; ++c) read(j + c * V, c);
    }
    for (; j < stop; j += V) read(j, 0);
    if (need_dot) {
      const Vec block = (vdot[0] + vdot[1]) + (vdot[2] + vdot[3]);
      dot += at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, block);
      for (int c = 0; c < kChains; ++c) vdot[c] = Vec(0);
    }
  }
  if (need_dot) dot += at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, tail_dot);
  const Vec all = at::vec::maximum(at::vec::maximum(vmax[0], vmax[1]), at::vec::maximum(vmax[2], vmax[3]));
  const double m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, all);
  return {m, dot};
}

// A row whose max is NaN or +inf: exp(z - m) in double with std::exp, which propagates NaN as the
// references do (exp_u20 would clamp it). Rare; no speed needed.
template <typename scalar_t>
double scalar_sum_exp(const scalar_t* z, int64_t C, double m, int64_t excluded) {
  double total = 0;
  for (int64_t j = 0; j < C; ++j) {
    if (j != excluded) total += std::exp(static_cast<double>(z[j]) - m);
  }
  return total;
}

// --- row_stats -------------------------------------------------------------------------------------------

// Step 2: sum_j exp(z_j - m) over j != excluded (-1: every j), z read from `src`; written to `dst`
// too when kStore (the one-pass mode: dst = src, in place; a template argument, so that the loop
// tests nothing per vector). While it computes exps the next
// row (if any) is prefetched, so that its step 1 reads from cache: the read from memory overlaps the
// arithmetic, as it does in a streaming exp(z, out=).
template <bool kStore, typename src_t, typename acc_t, typename next_t>
LSR_FLATTEN double exp_sum(
    const src_t* src, acc_t* dst, int64_t C, double m, int64_t excluded, const next_t* next_row) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C_vec = C - C % V;
  const Vec vm(static_cast<acc_t>(m));
  constexpr acc_t kMinusInf = -std::numeric_limits<acc_t>::infinity();
  // The vector holding the excluded column gets that lane set to -inf (exp 0) as it is loaded
  const int64_t excluded_start = excluded >= 0 && excluded < C_vec ? excluded - excluded % V : -1;
  auto term = [&](int64_t j) {
    Vec v = load_wide<src_t, acc_t>(src + j);
    if (j == excluded_start) v = with_lane(v, excluded - j, kMinusInf);
    const Vec e = vec_exp(v - vm);
    if constexpr (kStore) e.store(dst + j);
    return e;
  };
  // The tail first (load_tail says why), padded with -inf: exp 0
  Vec tail(0);
  if (C_vec < C) {
    Vec v = load_tail<src_t, acc_t>(src + C_vec, C - C_vec, kMinusInf);
    if (excluded >= C_vec && excluded < C) v = with_lane(v, excluded - C_vec, kMinusInf);
    tail = vec_exp(v - vm);
    if constexpr (kStore) tail.store(dst + C_vec, C - C_vec);
  }
  double sum = 0;
  for (int64_t start = 0; start < C_vec; start += kSumBlock) {
    const int64_t stop = std::min(start + kSumBlock, C_vec);
    Vec vsum[kChains];
    for (int c = 0; c < kChains; ++c) vsum[c] = Vec(0);
    int64_t j = start;
    for (; j + kChains * V <= stop; j += kChains * V) {
      prefetch(next_row, j, kChains * V);
      for (int c = 0; c < kChains; ++c) vsum[c] = vsum[c] + term(j + c * V);
    }
    for (; j < stop; j += V) {
      prefetch(next_row, j, V);
      vsum[0] = vsum[0] + term(j);
    }
    const Vec block = (vsum[0] + vsum[1]) + (vsum[2] + vsum[3]);
    sum += at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, block);
  }
  return sum + at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, tail);
}

// One row's sums, from one read: m, S = sum_j exp(z_j - m), the non-target part of S (SparseLSR:
// summed on its own, so that 1 - p_y keeps its digits; exact smoothing: S - e_y, unused), e_y, z_y and
// dot (where need_dot). Half logits are widened once where `wide` (a float32 row buffer) is given, by
// step 1, and step 2 reads it: widening them again cost 10% of row_stats (bfloat16, 4096 x 10000).
// Null for float and double, and for rows longer than kWideRowMax.
struct RowSums {
  double m, total, non_target, e_y, z_y, dot;
};

template <typename scalar_t, typename acc_t>
RowSums sums_row(
    const scalar_t* z, const scalar_t* next_row, int64_t y, const acc_t* w, const Params& P, bool need_dot,
    acc_t* wide) {
  const int64_t C = P.num_classes;
  const MaxDot r = max_and_dot<scalar_t, acc_t>(z, C, w, need_dot, wide);
  double m = r.max;
  const bool finite = !(std::isnan(m) || m == kInf);
  if (m == -kInf) m = 0;  // a row of -inf only: lse = -inf, not NaN
  auto sum_exp = [&](int64_t excluded) {
    if (!finite) return scalar_sum_exp(z, C, m, excluded);
    if (wide != nullptr) return exp_sum<false, acc_t, acc_t, scalar_t>(wide, nullptr, C, m, excluded, next_row);
    return exp_sum<false, scalar_t, acc_t, scalar_t>(z, nullptr, C, m, excluded, next_row);
  };
  const double z_y = static_cast<double>(z[y]);
  const double e_y = std::exp(z_y - m);
  if (!P.sparse) {
    const double total = sum_exp(-1);
    return {m, total, total - e_y, e_y, z_y, r.dot};
  }
  const double non_target = sum_exp(y);
  return {m, non_target + e_y, non_target, e_y, z_y, r.dot};
}

// --- gradient --------------------------------------------------------------------------------------------

// One row of the gradient: out_k = p exp(z_k - lse) - r w_k, out_y = t. `out` may be `z` (in place).
template <typename scalar_t, typename acc_t>
LSR_FLATTEN void gradient_row(
    const scalar_t* z, scalar_t* out, const scalar_t* next_row, int64_t C, int64_t y, const acc_t* w, double lse,
    double p, double r, double t) {
  using Vec = Vectorized<acc_t>;
  const bool subtract = r != 0;  // no r * w at r = 0 (eps = 0, SparseLSR, an ignored row)
  auto scalar = [&](int64_t j) {
    const double g = p * std::exp(static_cast<double>(z[j]) - lse);
    return subtract ? g - r * (w ? static_cast<double>(w[j]) : 1.0) : g;
  };
  if (!std::isfinite(lse)) {  // NaN, or a row of -inf: the expression's own NaN, as the references give
    for (int64_t j = 0; j < C; ++j) out[j] = static_cast<scalar_t>(scalar(j));
  } else {
    const Vec vlse(static_cast<acc_t>(lse)), vp(static_cast<acc_t>(p)), vr(static_cast<acc_t>(r));
    store_row<scalar_t, acc_t>(out, C, [&](int64_t j, int64_t count) {
      prefetch(next_row, j, count);
      const Vec e = vec_exp(load_some<scalar_t, acc_t>(z + j, count) - vlse);
      if (!subtract) return e * vp;
      return w ? at::vec::fmsub(e, vp, vr * load_some<acc_t, acc_t>(w + j, count)) : at::vec::fmsub(e, vp, vr);
    });
  }
  out[y] = static_cast<scalar_t>(t);
}

// --- the per-row algebra, and forward_gradient (the one-pass mode) ----------------------------------------------------------------

struct RowCoefficients {
  double loss;   // the unscaled row loss
  double alpha;  // g_k = alpha p_k - gamma w_k off the target column (p_k = e_k / S) ...
  double gamma;
  double g_y;    // ... and g_y on it; all three times s
};

// The per-row algebra of lsr/fused/algebra.py (O(1)), for a row's upstream gradient s, from its sums
// (m, S, the non-target part of S, e_y, z_y, dot): the one source of it that every C++ mode shares.
inline RowCoefficients row_coefficients(
    const Params& P, double s, double m, double total, double non_target, double e_y, double z_y,
    double dot, double w_y) {
  const double C = static_cast<double>(P.num_classes);
  const double eps = P.smoothing;
  const double lse = m + std::log(total);
  const double p_y = e_y / total;
  RowCoefficients r{};
  if (P.sparse) {
    // Equation 15: a = 1 - xi + xi/C, b = xi (C-1)/C; 1 - p_y from the non-target terms keeps its digits
    const double a = 1 - eps + eps / C;
    const double b = eps * (C - 1) / C;
    const double one_minus_p_y = non_target / total;
    r.loss = -a * (z_y - lse) - b * std::log((one_minus_p_y + P.paper_eps) / (C - 1));
    const double c = a - b * p_y / (one_minus_p_y + P.paper_eps);
    r.alpha = s * c;
    r.gamma = 0;
    r.g_y = -s * c * one_minus_p_y;
  } else {
    // Exact: L = A lse - (1-eps) w_y z_y - (eps/C) dot, A = (1-eps) w_y + (eps/C) W (1 unweighted);
    // g_k = s (A p_k - (eps/C) w_k - (1-eps) w_y [k = y])
    const double A = P.has_weight ? (1 - eps) * w_y + eps / C * P.weight_sum : 1.0;
    r.loss = A * lse - (1 - eps) * w_y * z_y;
    if (eps > 0) {  // at eps = 0 a masked class (-inf) adds no 0 * inf
      r.loss -= eps / C * dot;
    }
    r.alpha = s * A;
    r.gamma = s * eps / C;
    r.g_y = s * (A * p_y - (1 - eps + eps / C) * w_y);
  }
  return r;
}

// A row with a NaN or +inf logit: the same math in double with std::exp, so that NaN propagates.
template <typename scalar_t, typename acc_t>
double scalar_onepass_row(scalar_t* z, int64_t y, const acc_t* w, double s, double w_y, const Params& P) {
  const int64_t C = P.num_classes;
  const MaxDot r0 = max_and_dot<scalar_t, acc_t>(z, C, w, true, nullptr);
  const double m = r0.max;
  const double z_y = static_cast<double>(z[y]);
  std::vector<double> e(C);
  double total = 0;
  for (int64_t j = 0; j < C; ++j) {
    e[j] = std::exp(static_cast<double>(z[j]) - m);
    total += e[j];
  }
  const RowCoefficients r = row_coefficients(P, s, m, total, total - e[y], e[y], z_y, r0.dot, w_y);
  for (int64_t j = 0; j < C; ++j) {
    const double g = r.alpha * e[j] / total - r.gamma * (w ? static_cast<double>(w[j]) : 1.0);
    z[j] = static_cast<scalar_t>(j == y ? r.g_y : g);
  }
  return r.loss;
}

// One row of the one-pass mode: steps 1-3. `e` is the row itself (full precision) or a float32
// buffer (half).
template <typename scalar_t, typename acc_t>
LSR_FLATTEN double onepass_row(
    scalar_t* z, acc_t* e, const scalar_t* next_row, int64_t y, const acc_t* w, double s, const Params& P) {
  using Vec = Vectorized<acc_t>;
  const int64_t C = P.num_classes;
  const bool need_dot = !P.sparse && P.smoothing > 0;
  const double w_y = w ? static_cast<double>(w[y]) : 1.0;

  const MaxDot stats = max_and_dot<scalar_t, acc_t>(z, C, w, need_dot, std::is_same_v<scalar_t, acc_t> ? nullptr : e);
  double m = stats.max;
  if (std::isnan(m) || m == kInf) return scalar_onepass_row<scalar_t, acc_t>(z, y, w, s, w_y, P);
  if (m == -kInf) m = 0;  // a row of -inf only: lse = -inf, not NaN
  const double z_y = static_cast<double>(e[y]);
  // SparseLSR needs the sum of the non-target terms: the target's exp is left out (written as 0)
  const double sum = exp_sum<true, acc_t, acc_t, scalar_t>(e, e, C, m, P.sparse ? y : -1, next_row);
  const double e_y = P.sparse ? std::exp(z_y - m) : static_cast<double>(e[y]);
  const double total = P.sparse ? sum + e_y : sum;
  const RowCoefficients r = row_coefficients(P, s, m, total, sum, e_y, z_y, stats.dot, w_y);

  // 3. g_j = (alpha / S) e_j - gamma w_j over the logits
  const Vec valpha(static_cast<acc_t>(r.alpha / total));
  const Vec vgamma(static_cast<acc_t>(r.gamma));
  const bool subtract = r.gamma != 0;  // skipped at eps = 0 (and s = 0): no 0 * w
  store_row<scalar_t, acc_t>(z, C, [&](int64_t j, int64_t count) {
    const Vec ej = load_some<acc_t, acc_t>(e + j, count);
    if (!subtract) return ej * valpha;
    return w ? at::vec::fmsub(ej, valpha, vgamma * load_some<acc_t, acc_t>(w + j, count))
             : at::vec::fmsub(ej, valpha, vgamma);
  });
  z[y] = static_cast<scalar_t>(r.g_y);
  return r.loss;
}

// Where the one-pass mode keeps exp(z - m): over the row itself (full precision), or in the buffer.
template <typename scalar_t, typename acc_t>
acc_t* row_or_buffer(scalar_t* row, at::Tensor& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    return buffer.data_ptr<acc_t>();
  }
}

// row_stats' float32 copy of a half row, one per task (a task per thread), only up to this many
// classes: at most 64 KB per thread, O(threads x C), not O(N). The in-place peak it adds is measured
// with the rest: 46-60 B/row in the sweep's half rows from 1024 rows at C 10000 (177 B/row at
// N 256), where a buffer at C 32768 gave 149 B/row at N 1024.
constexpr int64_t kWideRowMax = 16384;

// Half inputs: a float32 row, one per task, from torch's allocator (so that the peak-memory meter
// counts it); undefined for float and double
template <typename scalar_t, typename acc_t>
at::Tensor half_row_buffer(int64_t C, const at::Tensor& logits) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return at::Tensor();
  } else {
    return at::empty({C}, logits.options().dtype(at::kFloat));
  }
}

// --- the ops ---------------------------------------------------------------------------------------------

// The distinct at::get_thread_num() values that ran rows in the last call (threads_used()).
constexpr int kMaxRecordedThreads = 1024;
std::atomic<int64_t> g_threads_used{0};

// Flush-to-zero and denormals-are-zero while a task sweeps its rows, the thread's previous mode
// restored after. Without them every exp whose result is below float32's smallest normal number
// (z - m < -87.3: a row's padded tail lanes and SparseLSR's excluded target, both -inf, once per
// row; masked classes) took a microcode assist: perf put half of the one-pass kernel's time at
// 4096 x 8 on that one instruction. What they change: values below 1.2e-38 (float32; 2.2e-308 in
// double) become 0, far below anything a loss or gradient resolves.
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushBits); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushBits = 0x8040;  // FTZ (bit 15) and DAZ (bit 6) of MXCSR
  unsigned saved_;
#endif
};

// Runs body(begin, end) over row ranges on torch's intra-op threads, recording which threads ran.
template <typename Body>
void parallel_rows(int64_t M, int64_t C, Body body) {
  // About 64K logits per task: enough work to amortise the task, enough tasks to balance threads
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(C, 1));
  std::vector<std::atomic<bool>> seen(kMaxRecordedThreads);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    seen[std::min(at::get_thread_num(), kMaxRecordedThreads - 1)].store(true, std::memory_order_relaxed);
    const FlushDenormals flush;
    body(begin, end);
  });
  g_threads_used = std::count_if(seen.begin(), seen.end(), [](const auto& b) { return b.load(); });
}

at::ScalarType acc_dtype_of(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_rows(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be on the CPU");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), op, ": logits must be (M, C) contiguous");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == logits.size(0) &&
                  target.is_contiguous(),
              op, ": target must be (M,) contiguous int64");
}

void check_per_row(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.scalar_type() == acc_dtype_of(logits) && t.dim() == 1 && t.size(0) == logits.size(0) &&
                  t.is_contiguous(),
              op, ": ", name, " must be (M,) contiguous in the compute dtype");
}

void check_weight(const char* op, const std::optional<at::Tensor>& weight, const at::Tensor& logits) {
  if (!weight.has_value()) return;
  TORCH_CHECK(weight->scalar_type() == acc_dtype_of(logits) && weight->dim() == 1 &&
                  weight->size(0) == logits.size(1) && weight->is_contiguous(),
              op, ": weight must be (C,) contiguous in the compute dtype");
}

template <typename acc_t>
const acc_t* weight_ptr(const std::optional<at::Tensor>& weight) {
  return weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
}

#define LSR_DISPATCH(logits, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (logits).scalar_type(), name, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> row_stats(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, bool sparse) {
  check_rows("row_stats", logits, target);
  const int64_t M = logits.size(0), C = logits.size(1);
  check_weight("row_stats", weight, logits);
  TORCH_CHECK(C >= 1 || M == 0, "row_stats: no classes");  // (a vocab-parallel shard may hold one)
  const Params P{C, 0.0, sparse, 0.0, weight.has_value(), 0.0};
  at::Tensor lse = at::empty({M}, logits.options().dtype(acc_dtype_of(logits)));
  at::Tensor third = at::empty({M}, lse.options());  // dot (exact) or 1 - p_y (sparse)
  g_threads_used = 0;
  if (M == 0) return {lse, third};
  LSR_DISPATCH(logits, "row_stats", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    const acc_t* w = weight_ptr<acc_t>(weight);
    acc_t* lse_out = lse.data_ptr<acc_t>();
    acc_t* third_out = third.data_ptr<acc_t>();
    parallel_rows(M, C, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = C <= kWideRowMax ? half_row_buffer<scalar_t, acc_t>(C, logits) : at::Tensor();
      acc_t* wide = buffer.defined() ? buffer.data_ptr<acc_t>() : nullptr;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t y = t[i] >= 0 && t[i] < C ? t[i] : 0;  // never read out of bounds
        const RowSums r = sums_row<scalar_t, acc_t>(z + i * C, i + 1 < end ? z + (i + 1) * C : nullptr, y, w, P, !sparse, wide);
        lse_out[i] = static_cast<acc_t>(r.m + std::log(r.total));
        third_out[i] = static_cast<acc_t>(sparse ? r.non_target / r.total : r.dot);
      }
    });
  });
  return {lse, third};
}

// Writes the gradient rows: out_k = p exp(z_k - lse) - r w_k, out_y = t, with (p, r, t) =
// coefficients(i) for row i (the caller's, from saved per-row values).
template <typename Coefficients>
void gradient_rows(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                   const at::Tensor& lse, at::Tensor& out, Coefficients coefficients) {
  const int64_t M = logits.size(0), C = logits.size(1);
  g_threads_used = 0;
  if (M == 0 || C == 0) return;
  LSR_DISPATCH(logits, "gradient", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    scalar_t* g = out.data_ptr<scalar_t>();
    const int64_t* y = target.data_ptr<int64_t>();
    const acc_t* w = weight_ptr<acc_t>(weight);
    const acc_t* lse_in = lse.data_ptr<acc_t>();
    parallel_rows(M, C, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto [p, r, t] = coefficients(i);
        const int64_t y_i = y[i] >= 0 && y[i] < C ? y[i] : 0;  // a bad target's row is NaN (t), never read
        gradient_row<scalar_t, acc_t>(z + i * C, g + i * C, i + 1 < end ? z + (i + 1) * C : nullptr, C, y_i, w,
                                      lse_in[i], p, r, t);
      }
    });
  });
}

void check_out(const char* op, const at::Tensor& out, const at::Tensor& logits) {
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type() && out.is_contiguous() &&
                  out.device().is_cpu(),
              op, ": out must be contiguous, of the logits' shape and dtype");
}

void gradient(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& p, const at::Tensor& r, const at::Tensor& t, at::Tensor& out) {
  check_rows("gradient", logits, target);
  for (const auto& [name, tensor] : {std::pair{"lse", &lse}, {"p", &p}, {"r", &r}, {"t", &t}}) {
    check_per_row("gradient", name, *tensor, logits);
  }
  check_weight("gradient", weight, logits);
  check_out("gradient", out, logits);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "gradient", [&] {
    const scalar_t *p_in = p.data_ptr<scalar_t>(), *r_in = r.data_ptr<scalar_t>(), *t_in = t.data_ptr<scalar_t>();
    gradient_rows(logits, target, weight, lse, out, [&](int64_t i) {
      return std::tuple<double, double, double>{p_in[i], r_in[i], t_in[i]};
    });
  });
}

// The one-pass rows: row i's gradient for an upstream gradient of share(i) written over it, its
// unscaled loss to loss_out[i].
template <typename Share>
void onepass_rows(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                  const Params& P, at::Tensor& loss_out, Share share) {
  const int64_t M = logits.size(0), C = logits.size(1);
  g_threads_used = 0;
  if (M == 0 || C == 0) return;
  LSR_DISPATCH(logits, "forward_gradient", [&] {
    using acc_t = acc_type<scalar_t>;
    scalar_t* z = logits.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    const acc_t* w = weight_ptr<acc_t>(weight);
    acc_t* loss = loss_out.data_ptr<acc_t>();
    parallel_rows(M, C, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = half_row_buffer<scalar_t, acc_t>(C, logits);  // the row of exp(z - m)
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* row = z + i * C;
        acc_t* e = row_or_buffer<scalar_t, acc_t>(row, buffer);
        const scalar_t* next_row = i + 1 < end ? row + C : nullptr;
        const int64_t y_i = t[i] >= 0 && t[i] < C ? t[i] : 0;  // a bad target's share is NaN
        loss[i] = static_cast<acc_t>(onepass_row<scalar_t, acc_t>(row, e, next_row, y_i, w, share(i), P));
      }
    });
  });
}

double weight_sum(const std::optional<at::Tensor>& weight) {
  return weight.has_value() ? weight->sum(at::kDouble).item<double>() : 0.0;
}

at::Tensor forward_gradient(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& scale, double smoothing, bool sparse, double paper_eps) {
  check_rows("forward_gradient", logits, target);
  check_per_row("forward_gradient", "scale", scale, logits);
  TORCH_CHECK(!sparse || logits.size(1) >= 2, "forward_gradient: SparseLSR needs at least 2 classes");
  check_weight("forward_gradient", weight, logits);
  const Params P{logits.size(1), smoothing, sparse, paper_eps, weight.has_value(), weight_sum(weight)};
  at::Tensor row_loss = at::empty({logits.size(0)}, logits.options().dtype(acc_dtype_of(logits)));
  AT_DISPATCH_FLOATING_TYPES(scale.scalar_type(), "forward_gradient", [&] {
    const scalar_t* s = scale.data_ptr<scalar_t>();
    onepass_rows(logits, target, weight, P, row_loss, [&](int64_t i) { return static_cast<double>(s[i]); });
  });
  return row_loss;
}

// --- the whole passes: what the autograd Functions run on CPU (lsr/fused/autograd.py) ------------------
//
// A forward or a backward is one call: the per-row algebra and the O(N) work around the sweeps (the
// targets' check, ignore_index, the mean's denominator, the reduction) are here too. As ~40 small
// torch ops they cost 0.3-0.6 ms per call at N = 4096, each slower for following a sweep that
// emptied the caches: more than the sweep itself at 4096 x 1000 (docs/fused.md). A target outside
// [0, C) raises where `validate`, else makes its row NaN (it is never read).

enum class Reduction { kNone, kMean, kSum };

Reduction reduction_of(c10::string_view name) {
  if (name == "none") return Reduction::kNone;
  if (name == "mean") return Reduction::kMean;
  TORCH_CHECK_VALUE(name == "sum", "reduction must be 'mean', 'sum' or 'none', got '", std::string(name), "'");
  return Reduction::kSum;
}

// The rows' targets, and each row's share of a backward of 1 (algebra.row_upstream at grad_output 1):
// 0 for an ignored row, NaN for a bad target, else 1, over the mean's denominator for "mean": the
// valid rows, weighted by w_y (NaN when that is 0, as F.cross_entropy's 0/0).
struct Rows {
  const int64_t* target;
  int64_t num_classes;
  int64_t ignore_index;
  Reduction reduction;
  double denominator;  // 1 but for "mean"

  bool valid(int64_t i) const { return target[i] != ignore_index; }
  bool in_range(int64_t i) const { return target[i] >= 0 && target[i] < num_classes; }
  int64_t safe_target(int64_t i) const { return in_range(i) ? target[i] : 0; }  // the class a row reads
  double share(int64_t i) const {
    if (!valid(i)) return 0.0;
    return in_range(i) ? 1.0 / denominator : std::numeric_limits<double>::quiet_NaN();
  }
  // The row's loss as the reduction counts it: 0 ignored, NaN for a bad target
  double masked(int64_t i, double loss) const {
    if (!valid(i)) return 0.0;
    return in_range(i) ? loss : std::numeric_limits<double>::quiet_NaN();
  }
};

template <typename acc_t>
Rows rows_of(const at::Tensor& target, int64_t C, int64_t ignore_index, bool validate, const acc_t* w,
             Reduction reduction) {
  Rows rows{target.data_ptr<int64_t>(), C, ignore_index, reduction, 1.0};
  const int64_t M = target.size(0);
  for (int64_t i = 0; validate && i < M; ++i) {
    TORCH_CHECK_VALUE(!rows.valid(i) || rows.in_range(i), "target value ", rows.target[i],
                      " is out of range for C=", C, " classes: targets must be in [0, ", C,
                      ") or equal ignore_index=", ignore_index);
  }
  if (reduction == Reduction::kMean) {
    double denominator = 0;
    for (int64_t i = 0; i < M; ++i) {
      if (rows.valid(i)) denominator += w ? static_cast<double>(w[rows.safe_target(i)]) : 1.0;
    }
    rows.denominator = denominator == 0 ? std::numeric_limits<double>::quiet_NaN() : denominator;
  }
  return rows;
}

// The masked row losses, reduced, in the logits' dtype: "none" keeps them, "sum" and "mean" add
// them in double.
at::Tensor reduce_losses(const at::Tensor& row_loss, const Rows& rows, at::ScalarType out_dtype) {
  if (rows.reduction == Reduction::kNone) return row_loss.to(out_dtype);
  const at::Tensor as_double = row_loss.to(at::kDouble);
  const double* loss = as_double.data_ptr<double>();
  double total = 0;
  for (int64_t i = 0; i < row_loss.size(0); ++i) total += loss[i];
  return at::scalar_tensor(total / rows.denominator, row_loss.options().dtype(out_dtype));
}

void check_whole(const char* op, const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, bool sparse) {
  check_rows(op, logits, target);
  TORCH_CHECK(logits.size(1) >= (sparse ? 2 : 1), op, ": too few classes (", logits.size(1), ")");
  check_weight(op, weight, logits);
}

// The two-pass forward: the loss, and per row lse, alpha, tau (g_y) and the share, which the
// backward reads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_forward(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, double smoothing,
    bool sparse, c10::string_view reduction, int64_t ignore_index, bool validate, double paper_eps) {
  check_whole("loss_forward", logits, target, weight, sparse);
  const int64_t M = logits.size(0), C = logits.size(1);
  const Params P{C, smoothing, sparse, paper_eps, weight.has_value(), weight_sum(weight)};
  const auto acc = logits.options().dtype(acc_dtype_of(logits));
  at::Tensor row_loss = at::empty({M}, acc), lse = at::empty({M}, acc), alpha = at::empty({M}, acc);
  at::Tensor tau = at::empty({M}, acc), share = at::empty({M}, acc);
  g_threads_used = 0;
  std::optional<Rows> rows;
  LSR_DISPATCH(logits, "loss_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const acc_t* w = weight_ptr<acc_t>(weight);
    rows = rows_of<acc_t>(target, C, ignore_index, validate, w, reduction_of(reduction));
    acc_t *loss_out = row_loss.data_ptr<acc_t>(), *lse_out = lse.data_ptr<acc_t>();
    acc_t *alpha_out = alpha.data_ptr<acc_t>(), *tau_out = tau.data_ptr<acc_t>(), *share_out = share.data_ptr<acc_t>();
    const bool need_dot = !sparse && smoothing > 0;  // at eps = 0 a masked class (-inf) adds no 0 * inf
    if (M == 0) return;
    parallel_rows(M, C, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = C <= kWideRowMax ? half_row_buffer<scalar_t, acc_t>(C, logits) : at::Tensor();
      acc_t* wide = buffer.defined() ? buffer.data_ptr<acc_t>() : nullptr;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t y = rows->safe_target(i);
        const RowSums r = sums_row<scalar_t, acc_t>(z + i * C, i + 1 < end ? z + (i + 1) * C : nullptr, y, w, P,
                                                    need_dot, wide);
        const double w_y = w ? static_cast<double>(w[y]) : 1.0;
        const RowCoefficients c = row_coefficients(P, 1.0, r.m, r.total, r.non_target, r.e_y, r.z_y, r.dot, w_y);
        loss_out[i] = static_cast<acc_t>(rows->masked(i, c.loss));
        lse_out[i] = static_cast<acc_t>(r.m + std::log(r.total));
        alpha_out[i] = static_cast<acc_t>(c.alpha);
        tau_out[i] = static_cast<acc_t>(c.g_y);
        share_out[i] = static_cast<acc_t>(rows->share(i));
      }
    });
  });
  return {reduce_losses(row_loss, *rows, logits.scalar_type()), lse, alpha, tau, share};
}

// The two-pass backward: the gradient for upstream gradient `grad_output` (0-d, or one per row for
// "none") into `out` (new memory, or the logits): row i's s = share_i grad_output_i scales
// (alpha, gamma, tau).
void loss_backward(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& alpha, const at::Tensor& tau, const at::Tensor& share, double gamma,
    const at::Tensor& grad_output, at::Tensor& out) {
  check_rows("loss_backward", logits, target);
  for (const auto& [name, tensor] : {std::pair{"lse", &lse}, {"alpha", &alpha}, {"tau", &tau}, {"share", &share}}) {
    check_per_row("loss_backward", name, *tensor, logits);
  }
  check_weight("loss_backward", weight, logits);
  check_out("loss_backward", out, logits);
  const int64_t M = logits.size(0);
  TORCH_CHECK(grad_output.dim() == 0 || grad_output.numel() == M,
              "loss_backward: grad_output must be 0-d or one per row");
  const at::Tensor upstream = grad_output.to(at::kDouble).reshape({-1}).contiguous();
  const double* g = upstream.data_ptr<double>();
  const bool per_row = grad_output.dim() > 0;
  LSR_DISPATCH(logits, "loss_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t *a = alpha.data_ptr<acc_t>(), *t = tau.data_ptr<acc_t>(), *sh = share.data_ptr<acc_t>();
    gradient_rows(logits, target, weight, lse, out, [&](int64_t i) {
      // An ignored row's gradient is 0 whatever the upstream gradient (inf or NaN included), as in PyTorch
      const double s = sh[i] == 0 ? 0.0 : static_cast<double>(sh[i]) * g[per_row ? i : 0];
      return std::tuple{s * static_cast<double>(a[i]), s * gamma, s * static_cast<double>(t[i])};
    });
  });
}

// The one-pass forward: the loss; the gradient for a backward of 1 written over the logits.
at::Tensor onepass_loss(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, double smoothing,
    bool sparse, c10::string_view reduction, int64_t ignore_index, bool validate, double paper_eps) {
  check_whole("onepass_loss", logits, target, weight, sparse);
  const int64_t M = logits.size(0), C = logits.size(1);
  const Params P{C, smoothing, sparse, paper_eps, weight.has_value(), weight_sum(weight)};
  at::Tensor row_loss = at::empty({M}, logits.options().dtype(acc_dtype_of(logits)));
  std::optional<Rows> rows;
  AT_DISPATCH_FLOATING_TYPES(row_loss.scalar_type(), "onepass_loss", [&] {
    rows = rows_of<scalar_t>(target, C, ignore_index, validate, weight_ptr<scalar_t>(weight), reduction_of(reduction));
  });
  onepass_rows(logits, target, weight, P, row_loss, [&](int64_t i) { return rows->share(i); });
  AT_DISPATCH_FLOATING_TYPES(row_loss.scalar_type(), "onepass_loss", [&] {
    scalar_t* loss = row_loss.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M; ++i) loss[i] = static_cast<scalar_t>(rows->masked(i, loss[i]));
  });
  return reduce_losses(row_loss, *rows, logits.scalar_type());
}

int64_t threads_used() {
  return g_threads_used.load();
}

// The sweeps' exp itself, elementwise over float32 or float64 values, so that a test can hold it to
// float64's (the kernels' outputs alone would hide an error that the reductions average out).
at::Tensor sweep_exp(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "sweep_exp: x must be contiguous float32 or float64 on the CPU");
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sweep_exp", [&] {
    using Vec = Vectorized<scalar_t>;
    constexpr int64_t V = Vec::size();
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* result = out.data_ptr<scalar_t>();
    const int64_t n = x.numel();
    int64_t j = 0;
    for (; j + V <= n; j += V) vec_exp(Vec::loadu(in + j)).store(result + j);
    if (j < n) vec_exp(Vec::loadu(in + j, n - j)).store(result + j, n - j);
  });
  return out;
}

}  // namespace

// A dispatcher op library (no pybind11: the build is about 3x faster), called as torch.ops.lsr_fused.*.
// `out` and the one-pass logits are written (`Tensor(a!)`), which torch.compile orders reads around.
TORCH_LIBRARY(lsr_fused, m) {
  m.def("row_stats(Tensor logits, Tensor target, Tensor? weight, bool sparse) -> (Tensor, Tensor)");
  m.def(
      "gradient(Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor p, Tensor r, Tensor t, "
      "Tensor(a!) out) -> ()");
  m.def(
      "forward_gradient(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor scale, float smoothing, "
      "bool sparse, float paper_eps) -> Tensor");
  m.def(
      "loss_forward(Tensor logits, Tensor target, Tensor? weight, float smoothing, bool sparse, str reduction, "
      "int ignore_index, bool validate, float paper_eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "loss_backward(Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor alpha, Tensor tau, "
      "Tensor share, float gamma, Tensor grad_output, Tensor(a!) out) -> ()");
  m.def(
      "onepass_loss(Tensor(a!) logits, Tensor target, Tensor? weight, float smoothing, bool sparse, str reduction, "
      "int ignore_index, bool validate, float paper_eps) -> Tensor");
  m.def("threads_used() -> int", &threads_used);
  m.def("sweep_exp(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(lsr_fused, CPU, m) {
  m.impl("row_stats", &row_stats);
  m.impl("gradient", &gradient);
  m.impl("forward_gradient", &forward_gradient);
  m.impl("loss_forward", &loss_forward);
  m.impl("loss_backward", &loss_backward);
  m.impl("onepass_loss", &onepass_loss);
  m.impl("sweep_exp", &sweep_exp);
}
