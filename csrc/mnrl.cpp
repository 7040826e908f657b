// The fused MNRL op on CPU: row blocks with the gradient computed inside the forward (DESIGN.md).
//
// Per block of m local rows and per selected direction: S = R_blk C^T on the raw embeddings (at::mm); one pass
// per row applies the inverse norms (cosine), the scale, the hardness penalty and the masks, and turns S into
// E = exp(logit - rowmax) in place, gathering the row's max, sum(E) and sum(E * sim). The softmax of row i is
// c_i * E_i with one scalar c_i per (direction, row), so the gradient GEMMs take that factor on their m x D side:
// dR_blk = diag(c) E C and dC += E^T diag(c) R_blk. Three GEMM-equivalents, no recompute, no normalised copies,
// and m x N_total logits in memory at a time.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "fastloss.h"

namespace fastloss {
namespace {

constexpr int kQueryToDoc = 1;
constexpr int kQueryToQuery = 2;
constexpr int kDocToQuery = 4;
constexpr int kDocToDoc = 8;
constexpr int kDirectionOrder[] = {kQueryToDoc, kQueryToQuery, kDocToQuery, kDocToDoc};  // sentence-transformers'

// exp(x) for x <= 0, branch-free so that the row loops vectorise: Cody-Waite reduction x = n ln2 + r with
// |r| <= ln2 / 2 and Cephes' degree-6 polynomial for exp(r) (about 1 ulp); x below -87.3 gives 0.
[[gnu::always_inline]] inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  constexpr float kMin = -87.33654f;
  const bool underflow = x < kMin;
  x = underflow ? kMin : x;
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflow ? 0.0f : p * two_n;
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

// An embedding matrix in the accumulation dtype (the input itself when it already is one) and its rows' inverse
// norms 1 / max(|x_i|, eps) (ones for dot product): cosine similarity is (x_i . y_j) * inv_x_i * inv_y_j, so no
// normalised copy is made.
struct Embeddings {
  at::Tensor x;
  at::Tensor inv;
};

template <typename T>
Embeddings prepare(const at::Tensor& input, bool normalize) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  Embeddings out{input.scalar_type() == acc ? input : input.to(acc), at::empty({input.size(0)},
                                                                               input.options().dtype(acc))};
  if (!normalize) {
    out.inv.fill_(1);
    return out;
  }
  const int64_t rows = input.size(0), dim = input.size(1);
  const T* x = out.x.const_data_ptr<T>();
  T* inv = out.inv.mutable_data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * dim;
      T ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < dim; ++k) ss += xr[k] * xr[k];
      inv[r] = T(1) / std::max(std::sqrt(ss), static_cast<T>(kNormEps));
    }
  });
  return out;
}

// The gradient accumulators hold a_i = inv_i * dL/dx_hat_i. The backward of F.normalize(x, eps) is then
// dx = (dx_hat - x_hat <x_hat, dx_hat>) / |x| = a - x_hat <x_hat, a>, or dx_hat / eps = a where |x| < eps
// (clamp_min passes no gradient to the norm there). In place on a; x_hat = x / |x| by division, as F.normalize.
template <typename T>
void normalize_backward(const at::Tensor& embeddings, T* a) {
  const int64_t rows = embeddings.size(0), dim = embeddings.size(1);
  const T* x = embeddings.const_data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * dim;
      T* ar = a + r * dim;
      T ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < dim; ++k) ss += xr[k] * xr[k];
      const T norm = std::sqrt(ss);
      if (norm < static_cast<T>(kNormEps)) continue;
      T projection = 0;
#pragma omp simd reduction(+ : projection)
      for (int64_t k = 0; k < dim; ++k) projection += (xr[k] / norm) * ar[k];
      for (int64_t k = 0; k < dim; ++k) ar[k] -= (xr[k] / norm) * projection;
    }
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mnrl_fused_impl(const at::Tensor& q_in,
                                                                           const at::Tensor& d_in,
                                                                           double scale_value, const Options& o) {
  const int64_t world = q_in.size(0);
  const int64_t columns = d_in.size(0) / world;
  const int64_t batch = o.batch;
  const T scale = static_cast<T>(scale_value);

  const Embeddings q = prepare<T>(q_in, o.normalize);
  const Embeddings d = prepare<T>(d_in, o.normalize);
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

  int64_t total_columns = 0;
  for (const auto& dir : dirs) total_columns += dir.candidates_are_docs ? columns * world : world;
  const int64_t rows_per_block =
      std::clamp<int64_t>(block_bytes() / (total_columns * static_cast<int64_t>(sizeof(T))), 1, batch);

  std::vector<at::Tensor> logits;
  for (const auto& dir : dirs)
    logits.push_back(at::empty({rows_per_block, dir.candidates_are_docs ? columns * world : world}, q.x.options()));
  at::Tensor coef = at::empty({n_dir, rows_per_block}, q.x.options());
  std::vector<T> row_loss(batch), row_dscale(batch), separate_share(batch, T(0));

  at::Tensor dq, dd;  // inv_i * dL/dx_hat_i until normalize_backward
  if (o.need_grad) {
    dq = at::zeros_like(q.x);
    dd = at::zeros_like(d.x);
  }
  const T inv_batch = T(1) / static_cast<T>(batch);

  for (int64_t i0 = 0; i0 < batch; i0 += rows_per_block) {
    const int64_t m = std::min(rows_per_block, batch - i0);
    const int64_t g0 = o.offset + i0;
    const at::Tensor q_blk = q.x.narrow(0, g0, m);
    const at::Tensor d_blk = d.x.narrow(0, g0, m);
    std::vector<T*> rows_ptr(n_dir);
    std::vector<int64_t> widths(n_dir);
    for (int k = 0; k < n_dir; ++k) {
      at::Tensor block = logits[k].narrow(0, 0, m);
      at::mm_out(block, dirs[k].rows_are_queries ? q_blk : d_blk, (dirs[k].candidates_are_docs ? d.x : q.x).t());
      rows_ptr[k] = block.mutable_data_ptr<T>();
      widths[k] = block.size(1);
    }
    T* coef_ptr = coef.mutable_data_ptr<T>();

    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      T row_max_of[4], sum_of[4], neg_of[4], dot_of[4], neg_dot_of[4], row_inv[4], c[4], pos_logit[4], pos_sim[4];
      T entry[4];
      const T* cand_inv[4];  // each direction's candidates' inverse norms
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = i0 + r;
        const int64_t own = o.offset + i;
        for (int k = 0; k < n_dir; ++k) {
          const Direction<T>& dir = dirs[k];
          row_inv[k] = dir.rows_are_queries ? q_inv[own] : d_inv[own];
          const ColumnRule<T> rule{dir.rule.factor * row_inv[k], dir.rule.except_factor * row_inv[k],
                                   dir.rule.except_masked, dir.rule.t_begin, dir.rule.t_end};
          const T* inv = cand_inv[k] = dir.candidates_are_docs ? d_inv : q_inv;
          T* row = rows_ptr[k] + r * widths[k];
          row_max_of[k] = row_max(row, inv, widths[k], own, world, rule);
          // the positive's similarity and logit exactly as the row pass computes them (its factor is
          // scale * row_inv in every rule)
          pos_sim[k] = row[own] * inv[own] * row_inv[k];
          pos_logit[k] = row[own] * inv[own] * (scale * row_inv[k]);
          const RowSums<T> sums = row_exp(row, inv, widths[k], own, world, rule, row_max_of[k], holds[k] ? own : -1);
          sum_of[k] = sums.sum();
          neg_of[k] = sums.rest.sum;
          dot_of[k] = sums.dot() * row_inv[k];
          neg_dot_of[k] = sums.rest.dot * row_inv[k];
        }
        // softmax_k(row) = c_k * E_k. The positive enters as in fastloss.ops.mnrl.positive_terms: with x = log of
        // the negatives' mass over the positive's (the sums without its column, kept apart by row_exp), the row
        // loss is softplus and the positive's coefficient p - share a sigmoid of it, neither with cancellation.
        T loss = 0;
        bool fold = true;
        if (o.joint) {  // the holders' copies of the positive share its -1 equally
          T top = -std::numeric_limits<T>::infinity();
          for (int k = 0; k < n_dir; ++k)
            if (sum_of[k] > 0) top = std::max(top, row_max_of[k]);
          T total = 0, negatives = 0;
          for (int k = 0; k < n_dir; ++k) {
            if (sum_of[k] <= 0) continue;
            const T rescale = std::exp(row_max_of[k] - top);
            total += sum_of[k] * rescale;
            negatives += (holds[k] ? neg_of[k] : sum_of[k]) * rescale;
          }
          const T log_z = top + std::log(total);
          const T log_k = std::log(static_cast<T>(holders));
          const T x = std::log(negatives) + top - pos_logit[k_first] - log_k;
          loss = log_k + softplus(x);
          // folded where the copies hold at least half the row's mass (x <= 0): each copy's weight c E_own is then
          // >= 1 / (2 holders); elsewhere p - 1 <= -1/2 and the -1 stays a separate term
          fold = x <= 0;
          const T coefficient = -sigmoid(x) / static_cast<T>(holders);
          for (int k = 0; k < n_dir; ++k) {
            c[k] = sum_of[k] > 0 ? std::exp(row_max_of[k] - log_z) : T(0);
            entry[k] = coefficient;
          }
        } else {  // every direction holds the positive, with weight 1 / n_dir and its own -1 / n_dir
          for (int k = 0; k < n_dir; ++k) {
            const T x = std::log(neg_of[k]) + row_max_of[k] - pos_logit[k];
            loss += softplus(x);
            c[k] = T(1) / (static_cast<T>(n_dir) * sum_of[k]);
            entry[k] = -sigmoid(x) / static_cast<T>(n_dir);
          }
          loss /= static_cast<T>(n_dir);
        }
        // dL/dscale of the row: sum over the entries of softmax * sim, minus the positive's sim
        T dscale_row = 0;
        for (int k = 0; k < n_dir; ++k) {
          coef_ptr[k * rows_per_block + r] = c[k] * scale * inv_batch * row_inv[k];
          if (holds[k] && fold) {
            // the positive's coefficient joins its softmax entry: G = c E', E' = inv entry / c, so p - 1 is formed
            // before any sum (as cross-entropy does) instead of cancelling inside the GEMMs
            rows_ptr[k][r * widths[k] + own] = cand_inv[k][own] * entry[k] / c[k];
            dscale_row += c[k] * neg_dot_of[k] + entry[k] * pos_sim[k];
          } else {
            dscale_row += c[k] * dot_of[k];
          }
        }
        if (!fold) {
          separate_share[i] = T(1);
          dscale_row -= pos_sim[k_first];
        }
        row_loss[i] = loss;
        row_dscale[i] = dscale_row * inv_batch;
      }
    });

    if (!o.need_grad) continue;
    // With E' = E diag(inv_c) (what the row pass left) and coef_i = c_i * scale / B * inv_r_i:
    // inv_r * dL/dr_hat = diag(coef) E' C and inv_c * dL/dc_hat += E'^T diag(coef) R (raw rows R, candidates C).
    for (int k = 0; k < n_dir; ++k) {
      const at::Tensor e = logits[k].narrow(0, 0, m);
      const at::Tensor weight = coef[k].narrow(0, 0, m).unsqueeze(1);
      const at::Tensor& rows = dirs[k].rows_are_queries ? q_blk : d_blk;
      const at::Tensor& cands = dirs[k].candidates_are_docs ? d.x : q.x;
      at::Tensor d_rows = (dirs[k].rows_are_queries ? dq : dd).narrow(0, g0, m);
      at::Tensor d_cands = dirs[k].candidates_are_docs ? dd : dq;
      d_rows.addcmul_(at::mm(e, cands), weight);
      d_cands.addmm_(e.t(), rows * weight);
    }
  }

  double loss_sum = 0, dscale_sum = 0;
  for (int64_t i = 0; i < batch; ++i) {
    loss_sum += row_loss[i];
    dscale_sum += row_dscale[i];
  }
  const auto acc_options = q.x.options();
  at::Tensor loss = at::scalar_tensor(loss_sum / static_cast<double>(batch), acc_options);
  if (!o.need_grad) return {loss, at::zeros_like(q_in), at::zeros_like(d_in), at::zeros({}, acc_options)};

  // The positive terms not folded into E': the positive logit scale * <q_hat_i, d_hat_i> with weight
  // -separate_share_i / B, i.e. with w_i = -separate_share_i * scale / B * inv_q_i * inv_d_i,
  // inv_q * dL/dq_hat += w d and inv_d * dL/dd_hat += w q over the local rows.
  const at::Tensor w = (q.inv.narrow(0, o.offset, batch) * d.inv.narrow(0, o.offset, batch))
                           .mul_(at::from_blob(separate_share.data(), {batch}, q.inv.options()))
                           .mul_(-scale_value * inv_batch)
                           .unsqueeze(1);
  dq.narrow(0, o.offset, batch).addcmul_(d.x.narrow(0, o.offset, batch), w);
  dd.narrow(0, o.offset, batch).addcmul_(q.x.narrow(0, o.offset, batch), w);
  if (o.normalize) {
    normalize_backward<T>(q.x, dq.mutable_data_ptr<T>());
    normalize_backward<T>(d.x, dd.mutable_data_ptr<T>());
  }
  at::Tensor dscale = at::scalar_tensor(dscale_sum, acc_options);
  return {loss, dq.to(q_in.scalar_type()), dd.to(d_in.scalar_type()), dscale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mnrl_fused(const at::Tensor& q, const at::Tensor& d,
                                                                      const at::Tensor& scale, int64_t offset,
                                                                      int64_t batch, int64_t directions, bool joint,
                                                                      int64_t hardness, double alpha, bool normalize,
                                                                      bool need_grad) {
  TORCH_CHECK(q.device().is_cpu() && d.device().is_cpu() && scale.device().is_cpu(),
              "mnrl_fused: q, d and scale must be CPU tensors");
  TORCH_CHECK(q.dim() == 2 && d.dim() == 2, "mnrl_fused: q must be [W, D] and d [k*W, D], got ", q.sizes(), " and ",
              d.sizes());
  TORCH_CHECK(q.size(0) > 0 && q.size(1) > 0, "mnrl_fused: q must be non-empty, got ", q.sizes());
  TORCH_CHECK(d.size(1) == q.size(1) && d.size(0) > 0 && d.size(0) % q.size(0) == 0,
              "mnrl_fused: d must be [k*W, D] with k >= 1 for q [W, D] = ", q.sizes(), ", got ", d.sizes());
  TORCH_CHECK(q.scalar_type() == d.scalar_type(), "mnrl_fused: q and d must share a dtype, got ", q.scalar_type(),
              " and ", d.scalar_type());
  TORCH_CHECK(q.is_contiguous() && d.is_contiguous(), "mnrl_fused: q and d must be contiguous");
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
  if (dtype == at::kDouble) return mnrl_fused_impl<double>(q, d, scale_value, o);
  return mnrl_fused_impl<float>(q, d, scale_value, o);
}

}  // namespace

void register_mnrl(pybind11::module_& m) {
  m.def("mnrl_fused", &mnrl_fused, pybind11::call_guard<pybind11::gil_scoped_release>(),
        R"doc(mnrl_fused(q, d, scale, offset, batch, directions, joint, hardness, alpha, normalize, need_grad)
    -> (loss, dq, dd, dscale)

MultipleNegativesRankingLoss over gathered queries q [W, D] and docs d [k*W, D] (k columns, positives first) for
the local rows offset .. offset + batch, with the gradients computed in the same pass. directions: bitmask
1 query_to_doc (required) | 2 query_to_query | 4 doc_to_query | 8 doc_to_doc; joint: one softmax over all
directions (else the mean of per-direction log-partitions); hardness: 0 none | 1 in_batch_negatives |
2 hard_negatives | 3 all_negatives with strength alpha; normalize: cosine (else dot product).
Returns loss (0-d), dq, dd (the dtype of q) and dscale (0-d): fp64 for fp64 inputs, else fp32 accumulation.
need_grad=False computes only the loss; dq, dd and dscale are then zeros.
Memory beyond inputs and outputs: the normalised inputs and gradients (O(W*D)) and one block of logits of at
most FASTLOSS_NATIVE_BLOCK_BYTES bytes (default 16 MiB; at least one row).)doc",
        pybind11::arg("q"), pybind11::arg("d"), pybind11::arg("scale"), pybind11::arg("offset"),
        pybind11::arg("batch"), pybind11::arg("directions"), pybind11::arg("joint"), pybind11::arg("hardness"),
        pybind11::arg("alpha"), pybind11::arg("normalize"), pybind11::arg("need_grad"));
}

}  // namespace fastloss
