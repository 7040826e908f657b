// The fused MNRL op on CPU: row blocks with the gradient computed inside the forward (DESIGN.md).
//
// Per block of m local rows and per selected direction: S = R_blk C^T on the raw embeddings (at::mm); one pass
// per row applies the inverse norms (cosine), the scale, the hardness penalty and the masks, and turns S into
// E = exp(logit - rowmax) in place, gathering the row's max, sum(E) and sum(E * sim). The softmax of row i is
// c_i * E_i with one scalar c_i per (direction, row), so the gradient GEMMs take that factor on their m x D side:
// dR_blk = diag(c) E C and dC += E^T diag(c) R_blk. Three GEMM-equivalents, no recompute, no normalised copies,
// and m x N_total logits in memory at a time. The k doc columns are read where they lie (a list of [W, D] tensors, or
// views of one [k*W, D] tensor): each GEMM with the docs runs per column, into its columns of the block, with no
// [k*W, D] concatenation (8 MiB of fp32 at the CPU target shape, B = 4096, two columns, D = 256).
//
// bf16 inputs on a CPU with AMX-BF16 (FASTLOSS_NATIVE_BF16_GEMM, bf16_gemm.h) stay bf16 in the GEMMs, whose results
// are fp32: S is the same exact products as in fp32 GEMMs (up to the order of the sums), and the gradient GEMMs
// take G' = diag(c) E rounded to bf16 once, as the CUDA row-block op rounds G for its tensor cores. Measured on the
// 2-core Xeon (AMX-BF16), fwd+bwd B = 4096, N = 8192, D = 256: 224 ms with fp32 GEMMs, 87 ms with bf16 ones.
//
// The symmetric loss (query_to_doc and doc_to_query, per direction) takes two passes instead: doc_to_query's rows
// are columns of query_to_doc's products (local positive d_i against every query), so a first pass runs their
// logsumexp down those columns (Q against the local positives: one B x B product), and the second computes
// query_to_doc's rows as above and adds doc_to_query's softmax, now known, into the same block, whose two gradient
// GEMMs then serve both directions: 3k + 1 GEMM-equivalents for k doc columns instead of 3k + 3.
//
// Elsewhere (GTE's four directions, query_to_query, doc_to_doc, the joint partition, W >= 3B) the one pass runs with
// the directions' shared products merged in the backward: entry (i, j) of query_to_doc's positives is entry (j, i)
// of doc_to_query's rows, and query_to_query's and doc_to_doc's blocks of the local rows' own vectors are symmetric.
// The later row's block takes both softmax entries of such a product into one entry of its gradient GEMMs (the
// earlier row's from its saved reference point max - log(c), out of the raw product before the row pass), so the
// backward covers about half of each B x B block of products: GTE's pairs take 8 GEMM-equivalents instead of 12.
// Neither merge runs where the logits may exceed kMergeLogitBound (logit_bound): there the two GEMMs' rounding of a
// shared product, a few ulps of the logit, would go into the merged entry's exponent.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bf16_gemm.h"
#include "fastloss.h"

namespace fastloss {
namespace {

constexpr int kQueryToDoc = 1;
constexpr int kQueryToQuery = 2;
constexpr int kDocToQuery = 4;
constexpr int kDocToDoc = 8;
constexpr int kDirectionOrder[] = {kQueryToDoc, kQueryToQuery, kDocToQuery, kDocToDoc};  // sentence-transformers'

// exp(x) for x <= 0, branch-free so that the row loops vectorise: Cody-Waite reduction x = n ln2 + r with
// |r| <= ln2 / 2 and Cephes' degree-6 polynomial for exp(r) (about 1 ulp), 2^n built in the exponent bits from the
// low bits of x log2(e) + 1.5 * 2^23. x below -87.3 (and -inf) gives 0, decided on the bits of x (NaN stays NaN):
// a floating-point compare and select, as this was written until 2026-11-30, GCC vectorises for AVX-512 (masks)
// but not for AVX2 under -ftrapping-math, so every exp loop of the AVX2 clones ran one lane at a time.
[[gnu::always_inline]] inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  constexpr int32_t kMinBits = static_cast<int32_t>(0xc2aeac4fu);  // the bits of -87.33654f
  const int32_t xb = bits_as<int32_t>(x);
  // kept: x >= 0 (sign bit clear), -87.33654 <= x < 0 (as signed integers, more negative floats are larger), NaN
  const uint32_t keep = -static_cast<uint32_t>((xb >= 0) | (xb <= kMinBits) | ((xb & 0x7fffffff) > 0x7f800000));
  const float k = x * kLog2e + kRound;
  const float n = k - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = bits_as<float>((bits_as<uint32_t>(k) + 127u) << 23);  // k's low bits: n + 1.5 * 2^23
  return bits_as<float>(bits_as<uint32_t>(p * two_n) & keep);
}

inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename T>
struct ExpSums {
  T sum = 0;  // sum_j E_j
  T dot = 0;  // sum_j E_j <r, c_j> inv_c_j (raw row r: its inverse norm is applied by the caller)
};

// max_j s_j * inv_j over one contiguous segment of a row (inv: the candidates' inverse norms).
template <typename T>
[[gnu::always_inline]] inline T segment_max(const T* s, const T* inv, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const T t = s[j] * inv[j];
    m = t > m ? t : m;
  }
  return m;
}

// With t_j = s_j * inv_j: E_j = exp(t_j * factor - row_max), stored as s_j <- E_j * inv_j (the column's inverse
// norm folded in for the gradient GEMMs), accumulating sum(E) and sum(E * t).
template <typename T>
[[gnu::always_inline]] inline ExpSums<T> segment_exp(T* s, const T* inv, int64_t n, T factor, T row_max) {
  T sum = 0, dot = 0;
#pragma omp simd reduction(+ : sum, dot)
  for (int64_t j = 0; j < n; ++j) {
    const T t = s[j] * inv[j];
    const T e = exp_nonpositive(t * factor - row_max);
    s[j] = e * inv[j];
    sum += e;
    dot += e * t;
  }
  return {sum, dot};
}

// The hot fp32 loops, compiled per x86 vector extension and picked at load time by CPU feature (always_inline
// above: a clone only vectorises what is inlined into it).
FASTLOSS_SIMD_CLONES float segment_max_f32(const float* s, const float* inv, int64_t n) {
  return segment_max<float>(s, inv, n);
}
FASTLOSS_SIMD_CLONES ExpSums<float> segment_exp_f32(float* s, const float* inv, int64_t n, float factor,
                                                    float row_max) {
  return segment_exp<float>(s, inv, n, factor, row_max);
}

inline float seg_max(const float* s, const float* inv, int64_t n) { return segment_max_f32(s, inv, n); }
inline double seg_max(const double* s, const double* inv, int64_t n) { return segment_max<double>(s, inv, n); }
inline ExpSums<float> seg_exp(float* s, const float* inv, int64_t n, float factor, float row_max) {
  return segment_exp_f32(s, inv, n, factor, row_max);
}
inline ExpSums<double> seg_exp(double* s, const double* inv, int64_t n, double factor, double row_max) {
  return segment_exp<double>(s, inv, n, factor, row_max);
}

// The same along a row of products s_j = <q_r, d_j> that is a slice of columns, each column j its own row of
// logits t_j * factor_j (t_j = s_j * inv_r, inv_r the query's inverse norm): the columns' running max,
// their sums of exp(t_j * factor_j - ref_j) and of that times t_j, and the softmax written out with a weight.
template <typename T>
[[gnu::always_inline]] inline void column_max(const T* s, T inv_r, const T* factor, T* max, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T l = (s[j] * inv_r) * factor[j];
    max[j] = l > max[j] ? l : max[j];
  }
}

template <typename T>
[[gnu::always_inline]] inline void column_exp(const T* s, T inv_r, const T* factor, const T* ref, T* sum, T* dot,
                                              int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T t = s[j] * inv_r;
    const T e = exp_nonpositive(t * factor[j] - ref[j]);
    sum[j] += e;
    dot[j] += e * t;
  }
}

// out_j = exp((t_j * factor_j - max_j) - lnorm_j) * weight_j (out may be s): column j's softmax entry from its max and
// the log of its normaliser kept apart, as a row's exp(logit - max) / sum is. One reference point max + lnorm would
// carry max's rounding, ulp(|max|) / 2, into the exponent: 0.4% of a softmax entry at fp32 logits of 1e5 (dot
// similarity on large embeddings), where logit - max is exact for the entries that matter (Sterbenz).
template <typename T>
[[gnu::always_inline]] inline void column_softmax(const T* s, T inv_r, const T* factor, const T* max, const T* lnorm,
                                                  const T* weight, T* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    out[j] = exp_nonpositive(((s[j] * inv_r) * factor[j] - max[j]) - lnorm[j]) * weight[j];
}

FASTLOSS_SIMD_CLONES void column_max_f32(const float* s, float inv_r, const float* factor, float* max, int64_t n) {
  column_max<float>(s, inv_r, factor, max, n);
}
FASTLOSS_SIMD_CLONES void column_exp_f32(const float* s, float inv_r, const float* factor, const float* ref,
                                         float* sum, float* dot, int64_t n) {
  column_exp<float>(s, inv_r, factor, ref, sum, dot, n);
}
FASTLOSS_SIMD_CLONES void column_softmax_f32(const float* s, float inv_r, const float* factor, const float* max,
                                             const float* lnorm, const float* weight, float* out, int64_t n) {
  column_softmax<float>(s, inv_r, factor, max, lnorm, weight, out, n);
}

inline void col_max(const float* s, float inv_r, const float* factor, float* max, int64_t n) {
  column_max_f32(s, inv_r, factor, max, n);
}
inline void col_max(const double* s, double inv_r, const double* factor, double* max, int64_t n) {
  column_max<double>(s, inv_r, factor, max, n);
}
inline void col_exp(const float* s, float inv_r, const float* factor, const float* ref, float* sum, float* dot,
                    int64_t n) {
  column_exp_f32(s, inv_r, factor, ref, sum, dot, n);
}
inline void col_exp(const double* s, double inv_r, const double* factor, const double* ref, double* sum,
                    double* dot, int64_t n) {
  column_exp<double>(s, inv_r, factor, ref, sum, dot, n);
}
inline void col_softmax(const float* s, float inv_r, const float* factor, const float* max, const float* lnorm,
                        const float* weight, float* out, int64_t n) {
  column_softmax_f32(s, inv_r, factor, max, lnorm, weight, out, n);
}
inline void col_softmax(const double* s, double inv_r, const double* factor, const double* max, const double* lnorm,
                        const double* weight, double* out, int64_t n) {
  column_softmax<double>(s, inv_r, factor, max, lnorm, weight, out, n);
}

// The logit of column j of a row is t_j * factor, except at the columns own + t * period for t in
// [t_begin, t_end), which are masked (-inf) or use except_factor. Every factor is > 0.
template <typename T>
struct ColumnRule {
  T factor;
  T except_factor;
  bool except_masked;
  int64_t t_begin;
  int64_t t_end;
};

// One row of raw products s (n columns) against candidates with inverse norms inv; the rule's factors already
// hold the row's inverse norm.
template <typename T>
T row_max(const T* s, const T* inv, int64_t n, int64_t own, int64_t period, const ColumnRule<T>& rule) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t start = 0;
  for (int64_t t = rule.t_begin; t < rule.t_end; ++t) {
    const int64_t j = own + t * period;
    if (j > start) m = std::max(m, seg_max(s + start, inv + start, j - start) * rule.factor);  // factor > 0
    if (!rule.except_masked) m = std::max(m, s[j] * inv[j] * rule.except_factor);
    start = j + 1;
  }
  if (n > start) m = std::max(m, seg_max(s + start, inv + start, n - start) * rule.factor);
  return m;
}

// A row's sums over every column but one (``apart``: the positive's column, or none) and over that one, kept apart
// so that the negatives' mass carries no cancellation.
template <typename T>
struct RowSums {
  ExpSums<T> rest;
  ExpSums<T> apart;
  T sum() const { return rest.sum + apart.sum; }
  T dot() const { return rest.dot + apart.dot; }
};

// Overwrites the row with E_j * inv_j, E_j = exp(logit_j - row_max) (0 where masked); returns sum(E), sum(E * t)
// over the columns but ``apart`` (-1: none) and over that column.
template <typename T>
RowSums<T> row_exp(T* s, const T* inv, int64_t n, int64_t own, int64_t period, const ColumnRule<T>& rule,
                   T row_max, int64_t apart) {
  RowSums<T> acc;
  if (row_max == -std::numeric_limits<T>::infinity()) {  // every column masked
    std::fill(s, s + n, T(0));
    return acc;
  }
  auto add = [](ExpSums<T>& to, ExpSums<T> part) {
    to.sum += part.sum;
    to.dot += part.dot;
  };
  auto run = [&](int64_t a, int64_t b, T factor) {  // columns [a, b), which share one factor
    if (apart >= a && apart < b) {
      if (apart > a) add(acc.rest, seg_exp(s + a, inv + a, apart - a, factor, row_max));
      add(acc.apart, seg_exp(s + apart, inv + apart, 1, factor, row_max));
      a = apart + 1;
    }
    if (b > a) add(acc.rest, seg_exp(s + a, inv + a, b - a, factor, row_max));
  };
  int64_t start = 0;
  for (int64_t t = rule.t_begin; t < rule.t_end; ++t) {
    const int64_t j = own + t * period;
    run(start, j, rule.factor);
    if (rule.except_masked) {
      s[j] = 0;
    } else {
      run(j, j + 1, rule.except_factor);
    }
    start = j + 1;
  }
  run(start, n, rule.factor);
  return acc;
}

// 1 / (1 + e^-x), exact at both ends (softplus: fastloss.h).
template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// One row's statistics in one direction: what its loss, softmax factor and dL/dscale need.
template <typename T>
struct RowStats {
  T max = 0;        // the row's max logit (-inf: every column masked)
  T sum = 0;        // sum_j E_j, E_j = exp(logit_j - max)
  T neg = 0;        // the same without the positive's column (all of it where the direction holds no positive)
  T dot = 0;        // sum_j E_j sim_j
  T neg_dot = 0;    // the same without the positive's column
  T pos_logit = 0;  // the positive's logit and similarity
  T pos_sim = 0;
};

// The row pass over one direction's row of raw products s against candidates with inverse norms inv: leaves
// E_j * inv_j in s. rule: the direction's (its factors are multiplied by the row's inverse norm row_inv here);
// hold: the direction's column own is the positive pair, whose sums are kept apart.
template <typename T>
RowStats<T> row_pass(T* s, const T* inv, int64_t n, int64_t own, int64_t period, const ColumnRule<T>& dir_rule,
                     T scale, T row_inv, bool hold) {
  const ColumnRule<T> rule{dir_rule.factor * row_inv, dir_rule.except_factor * row_inv, dir_rule.except_masked,
                           dir_rule.t_begin, dir_rule.t_end};
  RowStats<T> st;
  st.max = row_max(s, inv, n, own, period, rule);
  // the positive's similarity and logit exactly as the row pass computes them (its factor is scale * row_inv in
  // every rule)
  st.pos_sim = s[own] * inv[own] * row_inv;
  st.pos_logit = s[own] * inv[own] * (scale * row_inv);
  const RowSums<T> sums = row_exp(s, inv, n, own, period, rule, st.max, hold ? own : -1);
  st.sum = sums.sum();
  st.neg = sums.rest.sum;
  st.dot = sums.dot() * row_inv;
  st.neg_dot = sums.rest.dot * row_inv;
  return st;
}

// One row's loss over its directions and their softmax factors: softmax_k = c_k * E_k; entry_k: the positive's
// entry of G where folded (p - its share of the -1, formed without cancellation), else the -1 stays a separate
// term; dscale: the row's dL/dscale (before the 1/B).
template <typename T>
struct Combined {
  T loss = 0;
  T c[4] = {};
  T entry[4] = {};
  bool fold = true;
  T dscale = 0;
};

// holds[k]: direction k's column own is the positive pair (query_to_doc, doc_to_query; holders of them share its
// -1 equally); k_first: query_to_doc, whose positive logit the joint loss takes.
template <typename T>
Combined<T> combine(const RowStats<T>* st, int n_dir, const bool* holds, int holders, int k_first, bool joint) {
  // The positive enters as in fastloss.ops.mnrl.positive_terms: with x = log of the negatives' mass over the
  // positive's (the sums without its column, kept apart by row_exp), the row loss is softplus and the positive's
  // coefficient p - share a sigmoid of it, neither with cancellation.
  Combined<T> cb;
  if (joint) {  // the holders' copies of the positive share its -1 equally
    T top = -std::numeric_limits<T>::infinity();
    for (int k = 0; k < n_dir; ++k)
      if (st[k].sum > 0) top = std::max(top, st[k].max);
    T total = 0, negatives = 0;
    for (int k = 0; k < n_dir; ++k) {
      if (st[k].sum <= 0) continue;
      const T rescale = std::exp(st[k].max - top);
      total += st[k].sum * rescale;
      negatives += (holds[k] ? st[k].neg : st[k].sum) * rescale;
    }
    // differences of logits first (exact where they are close), then the logs of the sums: top's rounding, ulp(|top|)
    // / 2, stays out of x and of each c = exp((max - top) - log(total))
    const T log_total = std::log(total);
    const T log_k = std::log(static_cast<T>(holders));
    const T x = (top - st[k_first].pos_logit) + (std::log(negatives) - log_k);
    cb.loss = log_k + softplus(x);
    // folded where the copies hold at least half the row's mass (x <= 0): each copy's weight c E_own is then
    // >= 1 / (2 holders); elsewhere p - 1 <= -1/2 and the -1 stays a separate term
    cb.fold = x <= 0;
    const T coefficient = -sigmoid(x) / static_cast<T>(holders);
    for (int k = 0; k < n_dir; ++k) {
      cb.c[k] = st[k].sum > 0 ? std::exp((st[k].max - top) - log_total) : T(0);
      cb.entry[k] = coefficient;
    }
  } else {  // every direction holds the positive, with weight 1 / n_dir and its own -1 / n_dir
    for (int k = 0; k < n_dir; ++k) {
      const T x = (st[k].max - st[k].pos_logit) + std::log(st[k].neg);
      cb.loss += softplus(x);
      cb.c[k] = T(1) / (static_cast<T>(n_dir) * st[k].sum);
      cb.entry[k] = -sigmoid(x) / static_cast<T>(n_dir);
    }
    cb.loss /= static_cast<T>(n_dir);
  }
  // dL/dscale of the row: sum over the entries of softmax * sim, minus the positive's sim
  for (int k = 0; k < n_dir; ++k)
    cb.dscale += holds[k] && cb.fold ? cb.c[k] * st[k].neg_dot + cb.entry[k] * st[k].pos_sim : cb.c[k] * st[k].dot;
  if (!cb.fold) cb.dscale -= st[k_first].pos_sim;
  return cb;
}

struct Options {
  int64_t offset;
  int64_t batch;
  int64_t directions;
  bool joint;
  int64_t hardness;
  double alpha;
  bool normalize;
  bool need_grad;
};

// One selected direction: its rows (local queries or local positives), candidates and column rule.
template <typename T>
struct Direction {
  int bit;
  bool rows_are_queries;
  bool candidates_are_docs;
  ColumnRule<T> rule;
};

template <typename T>
std::vector<Direction<T>> select_directions(const Options& o, int64_t columns, T scale) {
  const T penalised = scale + static_cast<T>(o.alpha);
  const bool penalty = o.hardness != 0 && o.alpha > 0.0;
  std::vector<Direction<T>> out;
  for (int bit : kDirectionOrder) {
    if (!(o.directions & bit)) continue;
    ColumnRule<T> rule{scale, scale, false, 0, 0};
    if (bit == kQueryToDoc && penalty) {
      if (o.hardness == 1) {  // in_batch_negatives: every column but the own query's docs
        rule = {penalised, scale, false, 0, columns};
      } else if (o.hardness == 2) {  // hard_negatives: the own query's hard negatives
        rule = {scale, penalised, false, 1, columns};
      } else {  // all_negatives: every column but the positive
        rule = {penalised, scale, false, 0, 1};
      }
    } else if (bit == kQueryToQuery) {
      rule = {scale, scale, true, 0, 1};
    } else if (bit == kDocToDoc) {
      rule = {scale, scale, true, 0, columns};
    }
    out.push_back({bit, bit == kQueryToDoc || bit == kQueryToQuery, bit == kQueryToDoc || bit == kDocToDoc, rule});
  }
  return out;
}

// An embedding matrix as the op reads it, in parts whose rows follow one another (the queries: one; the docs: their k
// columns [W, D], read where they lie instead of concatenated), and its rows' inverse norms 1 / max(|x_i|, eps) (ones
// for dot product) in one vector: cosine similarity is (x_i . y_j) * inv_x_i * inv_y_j, so no normalised copy is
// made. The parts are the GEMMs' operands: the inputs themselves where they are in the accumulation dtype or bf16
// GEMMs take them (bf16_gemm.h: no fp32 copy then), else the inputs in the accumulation dtype.
struct Embeddings {
  std::vector<at::Tensor> parts;
  at::Tensor inv;
  // the first part: the queries; the docs' first column, the positives (every local row's own doc)
  const at::Tensor& x() const { return parts[0]; }
  int64_t rows() const { return inv.size(0); }
  // zeros for the gradient accumulators, [rows, D] in the accumulation dtype
  at::Tensor zeros() const { return at::zeros({rows(), x().size(1)}, inv.options()); }
};

// f(the entries of x as accumulation-dtype values T or as bf16, whichever x holds), and of x and y (one dtype)
template <typename T, typename F>
void with_rows(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kBFloat16) {
    f(x.const_data_ptr<at::BFloat16>());
  } else {
    f(x.const_data_ptr<T>());
  }
}
template <typename T, typename F>
void with_rows(const at::Tensor& x, const at::Tensor& y, F&& f) {
  TORCH_INTERNAL_ASSERT(x.scalar_type() == y.scalar_type());
  with_rows<T>(x, [&](const auto* xp) { f(xp, reinterpret_cast<decltype(xp)>(y.const_data_ptr())); });
}

template <typename T>
Embeddings prepare(const std::vector<at::Tensor>& inputs, bool normalize, bool bf16_operands) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  int64_t total = 0;
  for (const at::Tensor& input : inputs) total += input.size(0);
  Embeddings out{{}, at::empty({total}, inputs[0].options().dtype(acc))};
  T* inv = out.inv.mutable_data_ptr<T>();
  for (const at::Tensor& input : inputs) {
    const bool as_is = input.scalar_type() == acc || bf16_operands;
    out.parts.push_back(as_is ? input : input.to(acc));
    const int64_t rows = input.size(0), dim = input.size(1);
    if (normalize) {
      with_rows<T>(out.parts.back(), [&](const auto* x) {
        at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / dim), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const auto* xr = x + r * dim;
            T ss = 0;
#pragma omp simd reduction(+ : ss)
            for (int64_t k = 0; k < dim; ++k) ss += static_cast<T>(xr[k]) * static_cast<T>(xr[k]);
            inv[r] = T(1) / std::max(std::sqrt(ss), static_cast<T>(kNormEps));
          }
        });
      });
    } else {
      std::fill(inv, inv + rows, T(1));
    }
    inv += rows;
  }
  return out;
}

// out [m, n] = a x^T over the parts of x, each into its columns of out (products, bf16_gemm.h)
inline void products_by_part(at::Tensor out, const at::Tensor& a, const Embeddings& x) {
  int64_t start = 0;
  for (const at::Tensor& part : x.parts) {
    products(out.narrow(1, start, part.size(0)), a, part);
    start += part.size(0);
  }
}

// The gradient accumulators hold a_i = inv_i * dL/dx_hat_i. The backward of F.normalize(x, eps) is then
// dx = (dx_hat - x_hat <x_hat, dx_hat>) / |x| = a - x_hat <x_hat, a>, or dx_hat / eps = a where |x| < eps
// (clamp_min passes no gradient to the norm there). In place on a; x_hat = x / |x| by division, as F.normalize.
template <typename T>
void normalize_backward(const at::Tensor& embeddings, T* a) {
  const int64_t rows = embeddings.size(0), dim = embeddings.size(1);
  with_rows<T>(embeddings, [&](const auto* x) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto* xr = x + r * dim;
        T* ar = a + r * dim;
        T ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t k = 0; k < dim; ++k) ss += static_cast<T>(xr[k]) * static_cast<T>(xr[k]);
        const T norm = std::sqrt(ss);
        if (norm < static_cast<T>(kNormEps)) continue;
        T projection = 0;
#pragma omp simd reduction(+ : projection)
        for (int64_t k = 0; k < dim; ++k) projection += (static_cast<T>(xr[k]) / norm) * ar[k];
        for (int64_t k = 0; k < dim; ++k) ar[k] -= (static_cast<T>(xr[k]) / norm) * projection;
      }
    });
  });
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // loss, dq, dd, dscale

// out_j = bf16(g_j * w), as its bits
FASTLOSS_SIMD_CLONES void round_scaled_bf16(const float* g, float w, uint16_t* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = bf16_bits(g[j] * w);
}

// The two gradient GEMMs of a block of weights g = E diag(inv_c) (what a row pass leaves) over its raw rows R and
// candidates C, each row i weighted by w_i (its softmax factor * scale / B * inv_r_i; [m, 1]):
// inv_r * dL/dr_hat = diag(w) g C into d_rows and inv_c * dL/dc_hat += g^T diag(w) R into d_cands.
// With bf16 operands both take G' = diag(w) g rounded to bf16 (as the CUDA row-block op rounds G for its tensor-core
// GEMMs), in a scratch buffer kept across the op's blocks, and accumulate in fp32.
class GradientProducts {
 public:
  void add(const at::Tensor& g, const at::Tensor& rows, const at::Tensor& cands, const at::Tensor& w,
           at::Tensor d_rows, at::Tensor d_cands) {
    if (rows.scalar_type() != at::kBFloat16) {
      d_rows.addcmul_(at::mm(g, cands), w);
      d_cands.addmm_(g.t(), rows * w);
      return;
    }
    const int64_t m = g.size(0), n = g.size(1), dim = rows.size(1);
    if (scratch_.numel() < m * n) scratch_ = at::empty({m * n}, g.options().dtype(at::kBFloat16));
    const float* gp = g.const_data_ptr<float>();
    const float* wp = w.const_data_ptr<float>();
    const int64_t ldg = g.stride(0), ldw = w.stride(0);
    uint16_t* gw = reinterpret_cast<uint16_t*>(scratch_.mutable_data_ptr<at::BFloat16>());
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) round_scaled_bf16(gp + r * ldg, wp[r * ldw], gw + r * n, n);
    });
    const auto* g16 = reinterpret_cast<const at::BFloat16*>(gw);
    gemm_bf16_f32(false, false, m, dim, n, g16, n, cands.const_data_ptr<at::BFloat16>(), cands.stride(0), 1.0f,
                  d_rows.mutable_data_ptr<float>(), d_rows.stride(0));
    gemm_bf16_f32(true, false, n, dim, m, g16, n, rows.const_data_ptr<at::BFloat16>(), rows.stride(0), 1.0f,
                  d_cands.mutable_data_ptr<float>(), d_cands.stride(0));
  }

  // The same with the candidates in parts (Embeddings), over the columns [begin, end) of the block only: a pair of
  // GEMMs per part.
  void add(const at::Tensor& g, const at::Tensor& rows, const Embeddings& cands, const at::Tensor& w,
           at::Tensor d_rows, at::Tensor d_cands, int64_t begin, int64_t end) {
    int64_t start = 0;
    for (const at::Tensor& part : cands.parts) {
      const int64_t a = std::max(begin, start), b = std::min(end, start + part.size(0));
      if (a < b)
        add(g.narrow(1, a, b - a), rows, part.narrow(0, a - start, b - a), w, d_rows, d_cands.narrow(0, a, b - a));
      start += part.size(0);
    }
  }
  void add(const at::Tensor& g, const at::Tensor& rows, const Embeddings& cands, const at::Tensor& w,
           at::Tensor d_rows, at::Tensor d_cands) {
    add(g, rows, cands, w, d_rows, d_cands, 0, g.size(1));
  }

 private:
  at::Tensor scratch_;
};

// Below this a row's softmax factor c is applied to its entries rather than divided out of the partner's.
template <typename T>
constexpr T kMinFactor = T(1e-20);

// row *= c
template <typename T>
void scale_row(T* row, T c, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= c;
}

// to += from * factor (from widened to T as it is read: bf16 rows)
template <typename T, typename S>
void add_scaled(T* to, const S* from, T factor, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) to[j] += static_cast<T>(from[j]) * factor;
}

// The op's outputs from the rows' losses and dL/dscale (already over B) and the accumulators dq, dd
// (inv * dL/dx_hat: normalised back here; undefined without need_grad).
template <typename T>
Outputs finish(const std::vector<T>& row_loss, const std::vector<T>& row_dscale, const Embeddings& q,
               const Embeddings& d, at::Tensor dq, at::Tensor dd, const at::Tensor& q_in, const Options& o) {
  double loss_sum = 0, dscale_sum = 0;
  for (int64_t i = 0; i < o.batch; ++i) {
    loss_sum += row_loss[i];
    dscale_sum += row_dscale[i];
  }
  const auto acc_options = q.inv.options();
  at::Tensor loss = at::scalar_tensor(loss_sum / static_cast<double>(o.batch), acc_options);
  if (!o.need_grad)
    return {loss, at::zeros_like(q_in), at::zeros({d.rows(), q_in.size(1)}, q_in.options()),
            at::zeros({}, acc_options)};
  if (o.normalize) {
    const auto backward = [](const Embeddings& x, at::Tensor& a) {
      T* rows = a.mutable_data_ptr<T>();
      for (const at::Tensor& part : x.parts) {
        normalize_backward<T>(part, rows);
        rows += part.numel();
      }
    };
    backward(q, dq);
    backward(d, dd);
  }
  return {loss, dq.to(q_in.scalar_type()), dd.to(q_in.scalar_type()), at::scalar_tensor(dscale_sum, acc_options)};
}

constexpr int64_t kColumnGrain = 256;  // columns per task of the column passes
// The one-pass op's blocks where directions share products (partner in mnrl_fused_impl): measured on this 2-core
// machine, GTE's four directions at B = 512..2048 (D = 256, 768) ran 5-30% faster in 8 blocks of >= 128 rows than in
// the one block the buffer allowed; B = 256 the same either way.
constexpr int64_t kMergeBlocks = 8;
constexpr int64_t kMergeMinRows = 128;
// Merged products (the one pass's partners; the symmetric loss's two passes, whose second pass takes doc_to_query's
// statistics from the first) write a softmax entry from one GEMM's product and its row's statistics from another
// GEMM's: the two round that product alike only to a few ulps of the logit, which goes into the entry's exponent
// (GTE's directions at logits of ~5e7: 0.6 of the gradient, where sentence-transformers' fp32 errs by 7e-8). Where
// the logits may exceed this bound the op merges nothing: each entry then comes from its own row's product, as in
// sentence-transformers. fastloss.ops.mnrl_blocked.MERGE_LOGIT_BOUND is the same number.
constexpr double kMergeLogitBound = 1024.0;

// An upper bound on |logit| over every direction: (|scale| + |alpha| where penalised) times the largest squared
// norm of the rows (1 with cosine similarity: unit rows, zero vectors 0), or inf where that is not finite.
double logit_bound(const at::Tensor& q_in, const std::vector<at::Tensor>& docs, double scale, const Options& o) {
  const double factor = std::abs(scale) + (o.hardness != 0 ? std::abs(o.alpha) : 0.0);
  if (o.normalize) return factor;
  double norm = 0.0;
  const auto widen = [&norm](const at::Tensor& x) {
    if (x.numel() == 0) return;
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;  // fp16/bf16 summed in fp32
    norm = std::max(norm, at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, false, acc).max().item<double>());
  };
  widen(q_in);
  for (const at::Tensor& x : docs) widen(x);
  const double bound = factor * norm * norm;
  return std::isfinite(bound) ? bound : std::numeric_limits<double>::infinity();
}

// query_to_doc and doc_to_query, per direction (the symmetric loss), in two passes (top of the file). doc_to_query's
// row i, the local positive p_i = d_(offset + i) against every query q_j, has logits t_j * factor_i with
// t_j = <q_j, p_i> inv_q_j and factor_i = scale * inv_p_i: column i of Q P^T, its softmax
// exp((logit - max_i) - lnorm_i).
template <typename T>
Outputs mnrl_symmetric(const Embeddings& q, const Embeddings& d, T scale, const Options& o, const at::Tensor& q_in) {
  const int64_t world = q.x().size(0), width = d.rows(), batch = o.batch, offset = o.offset;
  const T* q_inv = q.inv.const_data_ptr<T>();
  const T* d_inv = d.inv.const_data_ptr<T>();
  const T* p_inv = d_inv + offset;
  const at::Tensor positives = d.x().narrow(0, offset, batch);  // GEMM operands
  const T inv_batch = T(1) / static_cast<T>(batch);
  const int64_t bytes = block_bytes(), elem = static_cast<int64_t>(sizeof(T));
  const int64_t column_rows = std::clamp<int64_t>(bytes / (batch * elem), 1, world);  // blocks of Q P^T
  const int64_t full_rows = std::clamp<int64_t>(bytes / (width * elem), 1, batch);    // blocks of Q_local D^T
  at::Tensor buffer = at::empty({std::max(column_rows * batch, full_rows * width)}, q.inv.options());
  at::Tensor weight = at::empty({std::max(column_rows, full_rows)}, q.inv.options());

  std::vector<T> factor(batch);
  for (int64_t i = 0; i < batch; ++i) factor[i] = scale * p_inv[i];
  // Pass 1: doc_to_query's online logsumexp down the columns of Q P^T, one block of query rows at a time: the
  // columns' running max, the sums (E, E * t) without the positive's entry, kept apart as row_exp does, and its
  // product.
  std::vector<T> col_max_of(batch, -std::numeric_limits<T>::infinity()), col_sum(batch, 0), col_dot(batch, 0);
  std::vector<T> pos_raw(batch, 0);
  for (int64_t j0 = 0; j0 < world; j0 += column_rows) {
    const int64_t m = std::min(column_rows, world - j0);
    at::Tensor block = buffer.narrow(0, 0, m * batch).view({m, batch});
    products(block, q.x().narrow(0, j0, m), positives);
    const T* s = block.const_data_ptr<T>();
    at::parallel_for(0, batch, kColumnGrain, [&](int64_t c0, int64_t c1) {
      std::vector<T> block_max(c1 - c0, -std::numeric_limits<T>::infinity());
      for (int64_t r = 0; r < m; ++r)
        col_max(s + r * batch + c0, q_inv[j0 + r], factor.data() + c0, block_max.data(), c1 - c0);
      for (int64_t c = c0; c < c1; ++c) {
        if (block_max[c - c0] <= col_max_of[c]) continue;
        const T rescale = std::exp(col_max_of[c] - block_max[c - c0]);  // 0 on the first block
        col_sum[c] *= rescale;
        col_dot[c] *= rescale;
        col_max_of[c] = block_max[c - c0];
      }
      auto add = [&](const T* row, T inv_r, int64_t a, int64_t b) {
        if (b > a) col_exp(row + a, inv_r, factor.data() + a, col_max_of.data() + a, col_sum.data() + a,
                           col_dot.data() + a, b - a);
      };
      for (int64_t r = 0; r < m; ++r) {
        const T* row = s + r * batch;
        const int64_t apart = j0 + r - offset;  // the column whose positive is this query
        if (apart >= c0 && apart < c1) {
          add(row, q_inv[j0 + r], c0, apart);
          add(row, q_inv[j0 + r], apart + 1, c1);
          pos_raw[apart] = row[apart];
        } else {
          add(row, q_inv[j0 + r], c0, c1);
        }
      }
    });
  }
  // doc_to_query's rows' statistics, as row_pass gives them, and lnorm_i = log(2 sum): their softmax entries are
  // exp((logit - max_i) - lnorm_i), combine's 1 / (2 sum) per direction
  std::vector<RowStats<T>> back(batch);
  std::vector<T> lnorm(batch);
  for (int64_t i = 0; i < batch; ++i) {
    const T t = pos_raw[i] * q_inv[offset + i];
    const T apart = exp_nonpositive(t * factor[i] - col_max_of[i]);
    RowStats<T>& st = back[i];
    st.max = col_max_of[i];
    st.sum = col_sum[i] + apart;
    st.neg = col_sum[i];
    st.dot = (col_dot[i] + apart * t) * p_inv[i];
    st.neg_dot = col_dot[i] * p_inv[i];
    st.pos_sim = t * p_inv[i];
    st.pos_logit = t * (scale * p_inv[i]);
    lnorm[i] = std::log(T(2) * st.sum);
  }

  // Pass 2: query_to_doc's row pass on blocks of the local queries' products with every doc, as mnrl_fused_impl,
  // plus doc_to_query's softmax entries of those queries (columns offset .. offset + batch), so that one pair of
  // GEMMs takes both directions' gradients.
  const Direction<T> forward = select_directions<T>(o, width / world, scale)[0];  // query_to_doc
  const bool holds[2] = {true, true};
  std::vector<T> row_loss(batch), row_dscale(batch);
  at::Tensor dq, dd;  // inv_i * dL/dx_hat_i until normalize_backward
  GradientProducts gradients;
  if (o.need_grad) {
    dq = q.zeros();
    dd = d.zeros();
  }
  for (int64_t i0 = 0; i0 < batch; i0 += full_rows) {
    const int64_t m = std::min(full_rows, batch - i0);
    const at::Tensor rows = q.x().narrow(0, offset + i0, m);
    at::Tensor block = buffer.narrow(0, 0, m * width).view({m, width});
    products_by_part(block, rows, d);
    T* s = block.mutable_data_ptr<T>();
    T* w = weight.mutable_data_ptr<T>();
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> back_softmax(batch);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = i0 + r, own = offset + i;
        T* row = s + r * width;
        const T inv_r = q_inv[own];
        col_softmax(row + offset, inv_r, factor.data(), col_max_of.data(), lnorm.data(), p_inv, back_softmax.data(),
                    batch);  // raw
        const RowStats<T> st[2] = {row_pass(row, d_inv, width, own, world, forward.rule, scale, inv_r, true),
                                   back[i]};
        const Combined<T> cb = combine(st, 2, holds, 2, 0, false);
        // G = c_0 (E' + doc_to_query's softmax / c_0): query_to_doc's factor stays on the GEMMs' m x D side
        const T unfactor = T(1) / cb.c[0];
        for (int64_t c = 0; c < batch; ++c) row[offset + c] += back_softmax[c] * unfactor;
        row[own] = d_inv[own] * (cb.entry[0] + cb.entry[1]) * unfactor;  // both directions' positive, folded
        w[r] = cb.c[0] * scale * inv_batch * inv_r;
        row_loss[i] = cb.loss;
        row_dscale[i] = cb.dscale * inv_batch;
      }
    });
    if (!o.need_grad) continue;
    gradients.add(block, rows, d, weight.narrow(0, 0, m).unsqueeze(1), dq.narrow(0, offset + i0, m), dd);
  }
  // The other ranks' queries (gathered) are candidates of doc_to_query only: their softmax entries of Q P^T.
  const int64_t segments[2][2] = {{0, offset}, {offset + batch, world}};
  for (const auto& segment : segments) {
    for (int64_t j0 = segment[0]; o.need_grad && j0 < segment[1]; j0 += column_rows) {
      const int64_t m = std::min(column_rows, segment[1] - j0);
      const at::Tensor rows = q.x().narrow(0, j0, m);
      at::Tensor block = buffer.narrow(0, 0, m * batch).view({m, batch});
      products(block, rows, positives);
      T* s = block.mutable_data_ptr<T>();
      T* w = weight.mutable_data_ptr<T>();
      at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          T* row = s + r * batch;
          col_softmax(row, q_inv[j0 + r], factor.data(), col_max_of.data(), lnorm.data(), p_inv, row, batch);
          w[r] = scale * inv_batch * q_inv[j0 + r];
        }
      });
      gradients.add(block, rows, positives, weight.narrow(0, 0, m).unsqueeze(1), dq.narrow(0, j0, m),
                            dd.narrow(0, offset, batch));
    }
  }
  return finish(row_loss, row_dscale, q, d, dq, dd, q_in, o);
}

template <typename T>
Outputs mnrl_fused_impl(const at::Tensor& q_in, const std::vector<at::Tensor>& docs, double scale_value,
                        const Options& o) {
  const int64_t world = q_in.size(0);
  const int64_t columns = static_cast<int64_t>(docs.size());
  const int64_t batch = o.batch;
  const T scale = static_cast<T>(scale_value);

  // bf16 inputs keep bf16 GEMM operands where that is fast (bf16_gemm.h): their products are exact in fp32, so only
  // the gradient GEMMs' weights G are rounded, to bf16
  const bool bf16_operands =
      std::is_same_v<T, float> && q_in.scalar_type() == at::kBFloat16 && bf16_gemm_enabled();
  const Embeddings q = prepare<T>({q_in}, o.normalize, bf16_operands);
  const Embeddings d = prepare<T>(docs, o.normalize, bf16_operands);
  // merged products only where the logits are bounded (kMergeLogitBound); query_to_doc alone has none
  const bool merge = o.directions != kQueryToDoc && logit_bound(q_in, docs, scale_value, o) <= kMergeLogitBound;
  // Two passes cost W B + 3 B kW GEMM work against one pass's 3 B kW + 3 B W: less while W < 3 B.
  if (merge && o.directions == (kQueryToDoc | kDocToQuery) && !o.joint && world < 3 * batch)
    return mnrl_symmetric<T>(q, d, scale, o, q_in);
  const T* q_inv = q.inv.const_data_ptr<T>();
  const T* d_inv = d.inv.const_data_ptr<T>();
  const std::vector<Direction<T>> dirs = select_directions<T>(o, columns, scale);
  const int n_dir = static_cast<int>(dirs.size());
  // The directions whose column own is the positive pair (query_to_doc, doc_to_query): they share its -1 equally.
  bool holds[4];
  int holders = 0, k_first = 0;  // k_first: query_to_doc, whose positive logit the joint loss takes
  for (int k = 0; k < n_dir; ++k) {
    holds[k] = dirs[k].bit == kQueryToDoc || dirs[k].bit == kDocToQuery;
    holders += holds[k];
    if (dirs[k].bit == kQueryToDoc) k_first = k;
  }
  // partner[k]: the direction whose rows, transposed, are direction k's columns offset .. offset + batch (the local
  // rows' own vectors): doc_to_query's rows are query_to_doc's positives and the reverse; query_to_query and
  // doc_to_doc are their own partners (a Gram block). -1: none selected. Entry (i, j) of those columns and entry
  // (j, i) of the partner's rows are one product, so one pair of gradient GEMMs takes both softmax entries: the
  // block of rows [i0, i1) takes them at the earlier rows' columns (j < i0, whose statistics are known), its own
  // rows' columns as they are (the partner's rows in this block take the transposed ones) and leaves the later
  // rows' columns to their blocks. Per pair of directions, two GEMM-equivalents of backward over those B x B
  // products instead of four (GTE's four directions on pairs: 8 in all instead of 12).
  int partner[4] = {-1, -1, -1, -1};
  for (int k = 0; k < n_dir && merge; ++k) {
    const int bit = dirs[k].bit;
    const int wanted = bit == kQueryToDoc ? kDocToQuery : bit == kDocToQuery ? kQueryToDoc : bit;
    for (int l = 0; l < n_dir; ++l)
      if (dirs[l].bit == wanted) partner[k] = l;
  }
  // per direction with a partner: the partner's factor at those columns (its rule's, as no such column is the
  // partner row's own) times the column's inverse norm, and the rows' max and lnorm = -log(c), so that the partner's
  // softmax entry of row j at column offset + i is exp((logit - max_j) - lnorm_j) (max +inf: a row with c = 0)
  std::vector<std::vector<T>> partner_factor(n_dir), ref_max(n_dir), ref_lnorm(n_dir);
  for (int k = 0; k < n_dir; ++k) {
    if (partner[k] < 0) continue;
    const T* inv = (dirs[k].candidates_are_docs ? d_inv : q_inv) + o.offset;
    partner_factor[k].resize(batch);
    for (int64_t j = 0; j < batch; ++j) partner_factor[k][j] = dirs[partner[k]].rule.factor * inv[j];
    ref_max[k].assign(batch, std::numeric_limits<T>::infinity());
    ref_lnorm[k].assign(batch, T(0));
  }

  int64_t total_columns = 0;
  for (const auto& dir : dirs) total_columns += dir.candidates_are_docs ? columns * world : world;
  int64_t rows_per_block =
      std::clamp<int64_t>(block_bytes() / (total_columns * static_cast<int64_t>(sizeof(T))), 1, batch);
  // The merge takes nothing from the block's own rows' columns: with a partner, at least kMergeBlocks blocks (of
  // kMergeMinRows rows or more), so that the backward covers about half the B x B products, not all of them (the
  // loss alone needs no backward, nor the partners' entries).
  if (o.need_grad && std::any_of(partner, partner + n_dir, [](int l) { return l >= 0; }))
    rows_per_block = std::min(rows_per_block, std::max(kMergeMinRows, (batch + kMergeBlocks - 1) / kMergeBlocks));

  std::vector<at::Tensor> logits;
  for (const auto& dir : dirs)
    logits.push_back(at::empty({rows_per_block, dir.candidates_are_docs ? columns * world : world}, q.inv.options()));
  at::Tensor coef = at::empty({n_dir, rows_per_block}, q.inv.options());
  std::vector<T> row_loss(batch), row_dscale(batch), separate_share(batch, T(0));

  at::Tensor dq, dd;  // inv_i * dL/dx_hat_i until normalize_backward
  GradientProducts gradients;
  if (o.need_grad) {
    dq = q.zeros();
    dd = d.zeros();
  }
  const T inv_batch = T(1) / static_cast<T>(batch);

  for (int64_t i0 = 0; i0 < batch; i0 += rows_per_block) {
    const int64_t m = std::min(rows_per_block, batch - i0);
    const int64_t g0 = o.offset + i0;
    const at::Tensor q_blk = q.x().narrow(0, g0, m);
    const at::Tensor d_blk = d.x().narrow(0, g0, m);
    std::vector<T*> rows_ptr(n_dir);
    std::vector<int64_t> widths(n_dir);
    for (int k = 0; k < n_dir; ++k) {
      at::Tensor block = logits[k].narrow(0, 0, m);
      products_by_part(block, dirs[k].rows_are_queries ? q_blk : d_blk, dirs[k].candidates_are_docs ? d : q);
      rows_ptr[k] = block.mutable_data_ptr<T>();
      widths[k] = block.size(1);
    }
    T* coef_ptr = coef.mutable_data_ptr<T>();

    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      // the partners' softmax entries at the earlier rows' columns
      std::vector<T> transposed(o.need_grad ? n_dir * i0 : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = i0 + r;
        const int64_t own = o.offset + i;
        RowStats<T> st[4];
        T row_inv[4];
        const T* cand_inv[4];  // each direction's candidates' inverse norms
        for (int k = 0; k < n_dir; ++k) {
          const Direction<T>& dir = dirs[k];
          T* row = rows_ptr[k] + r * widths[k];
          row_inv[k] = dir.rows_are_queries ? q_inv[own] : d_inv[own];
          cand_inv[k] = dir.candidates_are_docs ? d_inv : q_inv;
          if (o.need_grad && partner[k] >= 0 && i0 > 0)  // from the raw products, before the row pass's E
            col_softmax(row + o.offset, row_inv[k], partner_factor[k].data(), ref_max[partner[k]].data(),
                        ref_lnorm[partner[k]].data(),
                        cand_inv[k] + o.offset, transposed.data() + k * i0, i0);
          st[k] = row_pass(row, cand_inv[k], widths[k], own, world, dir.rule, scale, row_inv[k], holds[k]);
        }
        const Combined<T> cb = combine(st, n_dir, holds, holders, k_first, o.joint);
        for (int k = 0; k < n_dir; ++k) {
          T* row = rows_ptr[k] + r * widths[k];
          // G = c E' with the factor c on the GEMMs' m x D side, unless c is too small to divide by (a direction
          // far below the joint partition's top, whose partner's entries may still count): then G = c E in place
          const T c = cb.c[k];
          const bool factored = c >= kMinFactor<T>;
          if (!factored) scale_row(row, c, widths[k]);
          const T unfactor = factored ? T(1) / c : T(1);
          coef_ptr[k * rows_per_block + r] = (factored ? c : T(1)) * scale * inv_batch * row_inv[k];
          // the positive's coefficient joins its softmax entry: G = c E', E' = inv entry / c, so p - 1 is formed
          // before any sum (as cross-entropy does) instead of cancelling inside the GEMMs
          if (holds[k] && cb.fold) row[own] = cand_inv[k][own] * cb.entry[k] * unfactor;
          if (!o.need_grad || partner[k] < 0) continue;
          if (i0 > 0) add_scaled(row + o.offset, transposed.data() + k * i0, unfactor, i0);
          if (c > 0 && st[k].max > -std::numeric_limits<T>::infinity()) {
            ref_max[k][i] = st[k].max;
            ref_lnorm[k][i] = -std::log(c);
          }
        }
        if (!cb.fold) separate_share[i] = T(1);
        row_loss[i] = cb.loss;
        row_dscale[i] = cb.dscale * inv_batch;
      }
    });

    if (!o.need_grad) continue;
    for (int k = 0; k < n_dir; ++k) {
      const at::Tensor g = logits[k].narrow(0, 0, m);
      const at::Tensor& rows = dirs[k].rows_are_queries ? q_blk : d_blk;
      const Embeddings& cands = dirs[k].candidates_are_docs ? d : q;
      const at::Tensor w = coef[k].narrow(0, 0, m).unsqueeze(1);
      at::Tensor d_rows = (dirs[k].rows_are_queries ? dq : dd).narrow(0, g0, m);
      at::Tensor d_cands = dirs[k].candidates_are_docs ? dd : dq;
      if (partner[k] < 0) {
        gradients.add(g, rows, cands, w, d_rows, d_cands);
        continue;
      }
      // the later local rows' columns are their blocks' (with this block's rows as the partner's transposed entries)
      gradients.add(g, rows, cands, w, d_rows, d_cands, 0, g0 + m);
      gradients.add(g, rows, cands, w, d_rows, d_cands, o.offset + batch, widths[k]);
    }
  }

  if (o.need_grad) {
    // The positive terms not folded into E': the positive logit scale * <q_hat_i, d_hat_i> with weight
    // -separate_share_i / B, i.e. with w_i = -separate_share_i * scale / B * inv_q_i * inv_d_i,
    // inv_q * dL/dq_hat += w d and inv_d * dL/dd_hat += w q over the local rows.
    // (x read as it is: bf16 inputs that bf16 GEMMs take are never widened whole)
    const T unit = static_cast<T>(-scale_value * inv_batch);
    const int64_t dim = q.x().size(1);
    T* dq_local = dq.mutable_data_ptr<T>() + o.offset * dim;
    T* dd_local = dd.mutable_data_ptr<T>() + o.offset * dim;
    with_rows<T>(q.x(), d.x(), [&](const auto* qx, const auto* dx) {
      at::parallel_for(0, batch, std::max<int64_t>(1, 4096 / dim), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t own = o.offset + i;
          const T w = q_inv[own] * d_inv[own] * separate_share[i] * unit;
          add_scaled(dq_local + i * dim, dx + own * dim, w, dim);
          add_scaled(dd_local + i * dim, qx + own * dim, w, dim);
        }
      });
    });
  }
  return finish(row_loss, row_dscale, q, d, dq, dd, q_in, o);
}

Outputs mnrl_fused_columns(const at::Tensor& q, const std::vector<at::Tensor>& docs, const at::Tensor& scale,
                           int64_t offset, int64_t batch, int64_t directions, bool joint, int64_t hardness, double alpha,
                           bool normalize, bool need_grad) {
  TORCH_CHECK(q.device().is_cpu() && scale.device().is_cpu(), "mnrl_fused: q and scale must be CPU tensors");
  TORCH_CHECK(q.dim() == 2, "mnrl_fused: q must be [W, D], got ", q.sizes());
  TORCH_CHECK(q.size(0) > 0 && q.size(1) > 0, "mnrl_fused: q must be non-empty, got ", q.sizes());
  TORCH_CHECK(!docs.empty(), "mnrl_fused: docs must hold at least one column [W, D]");
  for (const at::Tensor& d : docs) {
    TORCH_CHECK(d.device().is_cpu(), "mnrl_fused: the doc columns must be CPU tensors");
    TORCH_CHECK(d.dim() == 2 && d.size(0) == q.size(0) && d.size(1) == q.size(1),
                "mnrl_fused: each doc column must be [W, D] = ", q.sizes(), ", got ", d.sizes());
    TORCH_CHECK(q.scalar_type() == d.scalar_type(), "mnrl_fused: q and d must share a dtype, got ",
                q.scalar_type(), " and ", d.scalar_type());
    TORCH_CHECK(d.is_contiguous(), "mnrl_fused: q and d must be contiguous");
  }
  TORCH_CHECK(q.is_contiguous(), "mnrl_fused: q and d must be contiguous");
  TORCH_CHECK(scale.numel() == 1 && scale.is_floating_point(), "mnrl_fused: scale must be a 1-element float tensor");
  TORCH_CHECK(batch > 0 && offset >= 0 && offset + batch <= q.size(0), "mnrl_fused: the local rows [", offset, ", ",
              offset + batch, ") must lie in [0, ", q.size(0), ") and be non-empty");
  TORCH_CHECK((directions & kQueryToDoc) && directions > 0 && directions < 16,
              "mnrl_fused: directions must be a bitmask of 1|2|4|8 with query_to_doc (1) set, got ", directions);
  TORCH_CHECK(hardness >= 0 && hardness <= 3, "mnrl_fused: hardness must be 0..3, got ", hardness);
  const double scale_value = scale.item<double>();
  TORCH_CHECK(scale_value > 0.0 && std::isfinite(scale_value), "mnrl_fused: scale must be finite and > 0, got ",
              scale_value);
  TORCH_CHECK(alpha >= 0.0 && std::isfinite(alpha), "mnrl_fused: alpha must be finite and >= 0, got ", alpha);

  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "mnrl_fused: q and d must be float16, bfloat16, float32 or float64, got ", dtype);

  const Options o{offset, batch, directions, joint, hardness, alpha, normalize, need_grad};
  if (dtype == at::kDouble) return mnrl_fused_impl<double>(q, docs, scale_value, o);
  return mnrl_fused_impl<float>(q, docs, scale_value, o);
}

// d [k*W, D] as its k columns (views: each contiguous where d is, which mnrl_fused_columns checks)
Outputs mnrl_fused(const at::Tensor& q, const at::Tensor& d, const at::Tensor& scale, int64_t offset, int64_t batch,
                   int64_t directions, bool joint, int64_t hardness, double alpha, bool normalize, bool need_grad) {
  TORCH_CHECK(q.dim() == 2 && d.dim() == 2, "mnrl_fused: q must be [W, D] and d [k*W, D], got ", q.sizes(), " and ",
              d.sizes());
  TORCH_CHECK(q.size(0) > 0 && q.size(1) > 0, "mnrl_fused: q must be non-empty, got ", q.sizes());
  TORCH_CHECK(d.size(1) == q.size(1) && d.size(0) > 0 && d.size(0) % q.size(0) == 0,
              "mnrl_fused: d must be [k*W, D] with k >= 1 for q [W, D] = ", q.sizes(), ", got ", d.sizes());
  const std::vector<at::Tensor> docs = d.split(q.size(0));
  return mnrl_fused_columns(q, docs, scale, offset, batch, directions, joint, hardness, alpha, normalize, need_grad);
}

}  // namespace

void register_mnrl(pybind11::module_& m) {
  // d: one [k*W, D] tensor, or its k columns [W, D] as a list (read where they lie: no concatenated copy); the
  // tensor form first, as pybind11 tries overloads in order
  const char* doc = R"doc(mnrl_fused(q, d, scale, offset, batch, directions, joint, hardness, alpha, normalize, need_grad)
    -> (loss, dq, dd, dscale)

MultipleNegativesRankingLoss over gathered queries q [W, D] and docs d [k*W, D] (k columns, positives first; or the
list of those k columns [W, D], which the op reads where they lie) for
the local rows offset .. offset + batch, with the gradients computed in the same pass. directions: bitmask
1 query_to_doc (required) | 2 query_to_query | 4 doc_to_query | 8 doc_to_doc; joint: one softmax over all
directions (else the mean of per-direction log-partitions); hardness: 0 none | 1 in_batch_negatives |
2 hard_negatives | 3 all_negatives with strength alpha; normalize: cosine (else dot product).
Returns loss (0-d), dq, dd (the dtype of q) and dscale (0-d): fp64 for fp64 inputs, else fp32 accumulation.
bf16 inputs take bf16 GEMMs with fp32 results where FASTLOSS_NATIVE_BF16_GEMM allows (auto: MKL's bf16 GEMM on a CPU
with AMX-BF16; bf16_gemm_enabled() says whether), their gradient GEMMs' weights rounded to bf16.
need_grad=False computes only the loss; dq, dd and dscale are then zeros.
Memory beyond inputs and outputs: fp32 gradient accumulators and fp32 copies of fp16/bf16 inputs (none where bf16
GEMMs take them) (O(W*D)), one block of logits of at most
FASTLOSS_NATIVE_BLOCK_BYTES bytes (default 16 MiB; at least one row; with bf16 GEMMs its weights in bf16 as well)
and, where directions share products, O(B) values per direction and per thread. dd is one [k*W, D] tensor
either way.)doc";
  const auto define = [&](auto fn) {
    m.def("mnrl_fused", fn, pybind11::call_guard<pybind11::gil_scoped_release>(), doc, pybind11::arg("q"),
          pybind11::arg("d"), pybind11::arg("scale"), pybind11::arg("offset"), pybind11::arg("batch"),
          pybind11::arg("directions"), pybind11::arg("joint"), pybind11::arg("hardness"), pybind11::arg("alpha"),
          pybind11::arg("normalize"), pybind11::arg("need_grad"));
  };
  define(&mnrl_fused);
  define(&mnrl_fused_columns);
}

}  // namespace fastloss
