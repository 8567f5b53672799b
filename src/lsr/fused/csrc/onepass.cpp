// The one-pass fused label-smoothing kernel on CPU: loss and gradient of each row in one read of the
// logits, one write of the gradient over them and one exp per logit. The math is in
// lsr/fused/algebra.py (and lsr/fused/onepass_cpu.py); this file only orders it for the cache.
//
// Per row, while it stays in cache (40 KB at C = 10000 float32, in L2):
//   1. read z: the max m (and dot = sum_j w_j z_j for exact smoothing with eps > 0); half inputs are
//      widened into a float32 row buffer here, so their exp(z - m) is never rounded to half;
//   2. e_j = exp(z_j - m), written over the row (or the buffer), summed into S;
//   3. g_j = alpha e_j - gamma w_j written over the logits, then the target column.
// Only step 1's read and step 3's write go to memory. Rows run in parallel (at::parallel_for).
//
// Built per vector ISA by onepass_cpu.py (torch.utils.cpp_extension.load, -O3, CPU_CAPABILITY set
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
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;

// Partial sums of this many elements are added in double: float32 sums of whole 262144-long rows
// would lose digits; blocks keep the error at that of a 1024-term sum.
constexpr int64_t kSumBlock = 1024;

// exp for step 2: ATen's exp_u20, a degree-5 polynomial for float (for double it is the ordinary
// exp). Measured on AVX2 (one thread's CPU time, 1024 x 10000): the kernel at 0.71x the
// floor's time with it, 1.0x with Sleef's exp_u10 (the floor's own exp); the softmax it gives is
// within 2.0e-6 relative of float64 (torch's float32 softmax: 2.8e-6). Its arguments are <= 0
// (z - m; -inf gives 0); it does not propagate NaN, so rows with a NaN or +inf logit never reach it
// (see `scalar_row`).
template <typename acc_t>
inline Vectorized<acc_t> vec_exp(const Vectorized<acc_t>& x) {
  return x.exp_u20();
}

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

struct Params {
  int64_t num_classes;
  double smoothing;
  bool sparse;
  double paper_eps;  // SparseLSR's guard of log(0): lsr.constants.PAPER_EPS
  bool has_weight;
  double weight_sum;  // W = sum_j w_j (exact smoothing with weights)
};

struct RowCoefficients {
  double loss;   // the unscaled row loss
  double alpha;  // g_j = alpha e_j - gamma w_j off the target column ...
  double gamma;
  double g_y;    // ... and g_y on it
};

// The per-row algebra (O(1)) from m, S (all terms), S_nt (non-target terms), e_y, z_y, dot.
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
    r.alpha = s * c / total;
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
    r.alpha = s * A / total;
    r.gamma = s * eps / C;
    r.g_y = s * (A * p_y - (1 - eps + eps / C) * w_y);
  }
  return r;
}

// A row with a NaN or +inf logit (m is not finite): the same math with std::exp, so that NaN
// propagates as it does in the references (exp_u20 would clamp it). Rare; no speed needed.
template <typename scalar_t, typename acc_t>
double scalar_row(
    scalar_t* z, int64_t y, const acc_t* w, double s, double w_y, const Params& P) {
  const int64_t C = P.num_classes;
  double m = -std::numeric_limits<double>::infinity();
  double dot = 0;
  for (int64_t j = 0; j < C; ++j) {
    const double v = static_cast<double>(z[j]);
    m = (std::isnan(v) || std::isnan(m)) ? std::numeric_limits<double>::quiet_NaN() : std::max(m, v);
    dot += (w ? static_cast<double>(w[j]) : 1.0) * v;
  }
  if (m == -std::numeric_limits<double>::infinity()) m = 0;
  const double z_y = static_cast<double>(z[y]);
  std::vector<double> e(C);
  double total = 0;
  for (int64_t j = 0; j < C; ++j) {
    e[j] = std::exp(static_cast<double>(z[j]) - m);
    total += e[j];
  }
  const double non_target = total - e[y];
  const RowCoefficients r = row_coefficients(P, s, m, total, non_target, e[y], z_y, dot, w_y);
  for (int64_t j = 0; j < C; ++j) {
    const double g = r.alpha * e[j] - r.gamma * (w ? static_cast<double>(w[j]) : 1.0);
    z[j] = static_cast<scalar_t>(j == y ? r.g_y : g);
  }
  return r.loss;
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

// One row: steps 1-3 above. `e` is the row itself (full precision) or a float32 buffer (half).
// While step 2 computes exps, the next row (if any) is prefetched, so that its step 1 reads from
// cache: the read from memory overlaps the arithmetic, as it does in a streaming exp(z, out=).
template <typename scalar_t, typename acc_t>
double onepass_row(
    scalar_t* z, acc_t* e, const scalar_t* next_row, int64_t y, const acc_t* w, double s, const Params& P) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = P.num_classes;
  const int64_t C_vec = C - C % V;
  const bool need_dot = !P.sparse && P.smoothing > 0;
  const double w_y = w ? static_cast<double>(w[y]) : 1.0;

  // 1. max (and dot), widening half logits into the buffer
  Vec vmax(-std::numeric_limits<acc_t>::infinity());
  Vec vdot(0);
  double dot = 0;
  for (int64_t start = 0; start < C_vec; start += kSumBlock) {
    const int64_t stop = std::min(start + kSumBlock, C_vec);
    for (int64_t j = start; j < stop; j += V) {
      const Vec v = load_wide<scalar_t, acc_t>(z + j);
      if constexpr (!std::is_same_v<scalar_t, acc_t>) v.store(e + j);
      vmax = at::vec::maximum(vmax, v);  // propagates NaN
      if (need_dot) vdot = w ? at::vec::fmadd(v, Vec::loadu(w + j), vdot) : vdot + v;
    }
    if (need_dot) {
      dot += at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vdot);
      vdot = Vec(0);
    }
  }
  double m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (int64_t j = C_vec; j < C; ++j) {
    const acc_t v = static_cast<acc_t>(z[j]);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) e[j] = v;
    m = (std::isnan(v) || std::isnan(m)) ? std::numeric_limits<double>::quiet_NaN() : std::max(m, double(v));
    if (need_dot) dot += (w ? static_cast<double>(w[j]) : 1.0) * v;
  }
  if (std::isnan(m) || m == std::numeric_limits<double>::infinity()) {
    return scalar_row<scalar_t, acc_t>(z, y, w, s, w_y, P);
  }
  if (m == -std::numeric_limits<double>::infinity()) m = 0;  // a row of -inf only: lse = -inf, not NaN
  const double z_y = static_cast<double>(e[y]);
  // SparseLSR needs the sum of the non-target terms: exclude the target by making its exp 0
  if (P.sparse) e[y] = -std::numeric_limits<acc_t>::infinity();

  // 2. e_j = exp(z_j - m), summed
  const Vec vm(static_cast<acc_t>(m));
  double sum = 0;
  for (int64_t start = 0; start < C_vec; start += kSumBlock) {
    const int64_t stop = std::min(start + kSumBlock, C_vec);
    Vec vsum0(0), vsum1(0);
    int64_t j = start;
    for (; j + 2 * V <= stop; j += 2 * V) {
      prefetch(next_row, j, 2 * V);
      const Vec e0 = vec_exp(Vec::loadu(e + j) - vm);
      const Vec e1 = vec_exp(Vec::loadu(e + j + V) - vm);
      e0.store(e + j);
      e1.store(e + j + V);
      vsum0 = vsum0 + e0;
      vsum1 = vsum1 + e1;
    }
    for (; j < stop; j += V) {
      prefetch(next_row, j, V);
      const Vec e0 = vec_exp(Vec::loadu(e + j) - vm);
      e0.store(e + j);
      vsum0 = vsum0 + e0;
    }
    sum += at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vsum0 + vsum1);
  }
  if (C_vec < C) {  // the tail through a padded vector, so that it gets the same exp
    acc_t tail[V];
    std::fill(tail, tail + V, -std::numeric_limits<acc_t>::infinity());
    std::copy(e + C_vec, e + C, tail);
    const Vec e0 = vec_exp(Vec::loadu(tail) - vm);
    e0.store(tail);
    std::copy(tail, tail + (C - C_vec), e + C_vec);
    for (int64_t j = 0; j < C - C_vec; ++j) sum += tail[j];
  }
  double e_y, non_target, total;
  if (P.sparse) {
    e_y = std::exp(z_y - m);
    non_target = sum;
    total = sum + e_y;
  } else {
    e_y = static_cast<double>(e[y]);
    total = sum;
    non_target = 0;  // unused
  }
  const RowCoefficients r = row_coefficients(P, s, m, total, non_target, e_y, z_y, dot, w_y);

  // 3. g_j = alpha e_j - gamma w_j over the logits
  const Vec valpha(static_cast<acc_t>(r.alpha));
  const Vec vgamma(static_cast<acc_t>(r.gamma));
  const bool subtract = r.gamma != 0;  // skipped at eps = 0 (and s = 0): no 0 * w
  auto gradient = [&](int64_t j) {
    const Vec ej = Vec::loadu(e + j);
    if (!subtract) return ej * valpha;
    return w ? at::vec::fmsub(ej, valpha, vgamma * Vec::loadu(w + j)) : at::vec::fmsub(ej, valpha, vgamma);
  };
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t j = 0; j < C_vec; j += V) gradient(j).store(z + j);
  } else {
    int64_t j = 0;
    for (; j + 2 * V <= C_vec; j += 2 * V) {
      at::vec::convert_from_float<scalar_t>(gradient(j), gradient(j + V)).store(z + j);
    }
    for (; j < C_vec; j += V) {
      acc_t g[V];
      gradient(j).store(g);
      for (int64_t k = 0; k < V; ++k) z[j + k] = static_cast<scalar_t>(g[k]);
    }
  }
  for (int64_t j = C_vec; j < C; ++j) {
    const double g = r.alpha * e[j] - (subtract ? r.gamma * (w ? static_cast<double>(w[j]) : 1.0) : 0.0);
    z[j] = static_cast<scalar_t>(g);
  }
  z[y] = static_cast<scalar_t>(r.g_y);
  return r.loss;
}

// The distinct at::get_thread_num() values that ran rows in the last call (threads_used()).
constexpr int kMaxRecordedThreads = 1024;
std::atomic<int64_t> g_threads_used{0};

template <typename scalar_t>
void forward_gradient_typed(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& scale, at::Tensor& row_loss, const Params& P) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t M = logits.size(0);
  const int64_t C = P.num_classes;
  scalar_t* z = logits.data_ptr<scalar_t>();
  const int64_t* t = target.data_ptr<int64_t>();
  const acc_t* w = weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
  const acc_t* s = scale.data_ptr<acc_t>();
  acc_t* loss = row_loss.data_ptr<acc_t>();
  // About 64K logits per task: enough work to amortise the task, enough tasks to balance threads
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(C, 1));
  std::vector<std::atomic<bool>> seen(kMaxRecordedThreads);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    seen[std::min(at::get_thread_num(), kMaxRecordedThreads - 1)].store(true, std::memory_order_relaxed);
    std::vector<acc_t> buffer;  // the float32 row of exp(z - m) for half inputs
    if constexpr (!std::is_same_v<scalar_t, acc_t>) buffer.resize(C);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* row = z + i * C;
      acc_t* e;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        e = row;
      } else {
        e = buffer.data();
      }
      const scalar_t* next_row = i + 1 < end ? row + C : nullptr;
      loss[i] = static_cast<acc_t>(
          onepass_row<scalar_t, acc_t>(row, e, next_row, t[i], w, static_cast<double>(s[i]), P));
    }
  });
  g_threads_used = std::count_if(seen.begin(), seen.end(), [](const auto& b) { return b.load(); });
}

at::Tensor forward_gradient(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& scale, double smoothing, bool sparse, double paper_eps) {
  TORCH_CHECK(logits.device().is_cpu(), "onepass forward_gradient: logits must be on the CPU");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "onepass forward_gradient: logits must be (M, C) contiguous");
  const int64_t M = logits.size(0), C = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == M && target.is_contiguous(),
              "onepass forward_gradient: target must be (M,) contiguous int64");
  TORCH_CHECK(scale.scalar_type() == acc && scale.dim() == 1 && scale.size(0) == M && scale.is_contiguous(),
              "onepass forward_gradient: scale must be (M,) contiguous in the compute dtype");
  Params P{C, smoothing, sparse, paper_eps, weight.has_value(), 0.0};
  if (weight.has_value()) {
    TORCH_CHECK(weight->scalar_type() == acc && weight->dim() == 1 && weight->size(0) == C && weight->is_contiguous(),
                "onepass forward_gradient: weight must be (C,) contiguous in the compute dtype");
    P.weight_sum = weight->sum(at::kDouble).item<double>();
  }
  at::Tensor row_loss = at::empty({M}, logits.options().dtype(acc));
  g_threads_used = 0;
  if (M == 0 || C == 0) return row_loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "onepass_forward_gradient", [&] {
    forward_gradient_typed<scalar_t>(logits, target, weight, scale, row_loss, P);
  });
  return row_loss;
}

int64_t threads_used() {
  return g_threads_used.load();
}

}  // namespace

// A dispatcher op (no pybind11: the build is about 3x faster), called as torch.ops.lsr_onepass.*
TORCH_LIBRARY(lsr_onepass, m) {
  m.def(
      "forward_gradient(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor scale, float smoothing, "
      "bool sparse, float paper_eps) -> Tensor");
  m.def("threads_used() -> int", &threads_used);
}

TORCH_LIBRARY_IMPL(lsr_onepass, CPU, m) {
  m.impl("forward_gradient", &forward_gradient);
}
