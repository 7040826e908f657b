// Batch-hard triplet mining on CPU: the selections of fastloss.ops.triplet.batch_hard_fwd without a B x B matrix,
// and the backward through the selected pairs (batch_hard_triplet_bwd, below the mining).
//
// Per block of m anchor rows: G = X_blk X^T (at::mm into one m x B buffer; MKL's bf16 GEMM with fp32 results for
// bf16 inputs where FASTLOSS_NATIVE_BF16_GEMM allows, bf16_gemm.h), then one parallel pass over the block's
// rows turns each row of G into distances in place (fp64 for fp64 inputs, as the torch path; fp32 otherwise) and
// keeps the row's hardest positive, smallest negative, smallest same-label distance and maximum, each with its
// first index (torch's max / min tie rule). Memory beyond the inputs: the operand rows
// (O(B*D): x_hat for cosine, fp32 for half inputs) and one m x B block.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bf16_gemm.h"
#include "fastloss.h"

namespace fastloss {

FASTLOSS_SIMD_CLONES void distance_rows_f32(float* g, const float* sq, const float* x, int64_t dim, int64_t first,
                                            int64_t rows, int64_t n, int64_t metric) {
  distance_rows<float>(g, sq, x, dim, first, rows, n, metric);
}

FASTLOSS_SIMD_CLONES int64_t first_match_f32(const float* d, const int64_t* labels, int64_t n, float best,
                                             int64_t label, bool same, int64_t skip) {
  return first_match<float>(d, labels, n, best, label, same, skip);
}

namespace {

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

template <typename T>
struct RowExtremes {
  T pos;       // max over positives (same label, not self), -inf without one
  T top;       // max over the row
  T neg;       // min over negatives, inf without one
  T same_min;  // min over the same label (self included)
};

template <typename T>
[[gnu::always_inline]] inline RowExtremes<T> row_extremes(const T* d, const int64_t* labels, int64_t own, int64_t n) {
  const int64_t label = labels[own];
  T pos = -kInf<T>, top = -kInf<T>, neg = kInf<T>, same_min = kInf<T>;
#pragma omp simd reduction(max : pos, top) reduction(min : neg, same_min)
  for (int64_t j = 0; j < n; ++j) {
    const T v = d[j];
    const bool same = labels[j] == label;
    const T p = (same && j != own) ? v : -kInf<T>;
    const T q = same ? kInf<T> : v;
    const T s = same ? v : kInf<T>;
    pos = p > pos ? p : pos;
    top = v > top ? v : top;
    neg = q < neg ? q : neg;
    same_min = s < same_min ? s : same_min;
  }
  return {pos, top, neg, same_min};
}

FASTLOSS_SIMD_CLONES RowExtremes<float> row_extremes_f32(const float* d, const int64_t* labels, int64_t own,
                                                         int64_t n) {
  return row_extremes<float>(d, labels, own, n);
}

inline RowExtremes<float> extremes(const float* d, const int64_t* labels, int64_t own, int64_t n) {
  return row_extremes_f32(d, labels, own, n);
}

inline RowExtremes<double> extremes(const double* d, const int64_t* labels, int64_t own, int64_t n) {
  return row_extremes<double>(d, labels, own, n);
}

// The first j whose masked value (d_j where kept, as first_match keeps, else fill) equals best, the masked values'
// extreme: torch's index of a max / min. A best equal to the fill means every masked value is the fill (e.g. no
// negative): 0, as torch's argmin of an all-inf row.
template <typename T>
int64_t first_index(const T* d, int64_t n, T best, T fill, const int64_t* labels, int64_t label, bool same,
                    int64_t skip = -1) {
  if (best == fill) return 0;
  const int64_t j = find_first(d, labels, n, best, label, same, skip);
  return j < n ? j : 0;  // only a NaN best finds none; torch would return the NaN's index
}

template <typename T>
struct Outputs {
  T* hp;
  T* hn;
  int64_t* sel_idx;  // [3, B]
  T* sel_d;          // [3, B]
};

// The selections of row i from its distances d (see fastloss.ops.triplet._batch_hard_fwd_blocked).
template <typename T>
void select_row(const T* d, const int64_t* labels, int64_t i, int64_t n, const Outputs<T>& o) {
  const RowExtremes<T> e = extremes(d, labels, i, n);
  const int64_t label = labels[i];
  const T shifted = e.same_min + e.top;
  bool use_neg = e.neg < shifted;
  int64_t neg_i = -1, same_i = -1;
  if (e.neg == shifted) {  // a tie: the earlier index wins, as sentence-transformers' min over d + rowmax * same
    neg_i = first_index(d, n, e.neg, kInf<T>, labels, label, false);
    same_i = first_index(d, n, e.same_min, kInf<T>, labels, label, true);
    use_neg = neg_i < same_i;
  }
  const T hp = e.pos < T(0) ? T(0) : e.pos;  // clamp_min(0): -inf (no positive) -> 0
  int64_t pos_i = -1;
  if (e.pos > T(0)) pos_i = first_index(d, n, e.pos, -kInf<T>, labels, label, true, i);
  o.hp[i] = hp;
  o.sel_idx[i] = pos_i;
  o.sel_d[i] = hp;
  if (use_neg) {
    if (neg_i < 0) neg_i = first_index(d, n, e.neg, kInf<T>, labels, label, false);
    o.hn[i] = e.neg;
    o.sel_idx[n + i] = neg_i;
    o.sel_idx[2 * n + i] = -1;
    o.sel_d[n + i] = e.neg;
    o.sel_d[2 * n + i] = T(0);
  } else {
    if (same_i < 0) same_i = first_index(d, n, e.same_min, kInf<T>, labels, label, true);
    o.hn[i] = shifted;
    o.sel_idx[n + i] = same_i;
    o.sel_idx[2 * n + i] = first_index<T>(d, n, e.top, -kInf<T>, nullptr, 0, true);
    o.sel_d[n + i] = e.same_min;
    o.sel_d[2 * n + i] = e.top;
  }
}

// T: the distances' type (fp64 for fp64 inputs, else fp32), which the outputs keep. gemm_x: the Gram's operand, xo
// or its bf16 form (products: bf16 GEMMs with fp32 results). xo: the rows in T, which distance_rows reads for near
// pairs; undefined for cosine with cosine_gram_rows' bf16 rows (cosine has no near pairs). sq_t: the squared norms, or
// for cosine those rows' inverse norms, else undefined (unit rows).
template <typename T>
void mine_impl(const at::Tensor& xo, const at::Tensor& gemm_x, const at::Tensor& sq_t, const at::Tensor& labels_t,
               int64_t metric, const Outputs<T>& o) {
  const int64_t batch = gemm_x.size(0);
  const auto options = gemm_x.options().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t rows_per_block =
      std::clamp<int64_t>(block_bytes() / (batch * static_cast<int64_t>(sizeof(T))), 1, batch);
  at::Tensor gram = at::empty({rows_per_block, batch}, options);
  const T* sq = sq_t.defined() ? sq_t.const_data_ptr<T>() : nullptr;
  const T* x = xo.defined() ? xo.const_data_ptr<T>() : nullptr;
  const int64_t dim = gemm_x.size(1);
  const int64_t* labels = labels_t.const_data_ptr<int64_t>();
  // rows in runs of ~64k distances (still in cache between the passes): one at::sqrt_ per run for euclidean rather
  // than one ATen call (~1 us) per row, which at B = 256 took as long as the GEMM
  const int64_t run = std::max<int64_t>(1, 65536 / batch);
  for (int64_t i0 = 0; i0 < batch; i0 += rows_per_block) {
    const int64_t m = std::min(rows_per_block, batch - i0);
    at::Tensor block = gram.narrow(0, 0, m);
    products(block, gemm_x.narrow(0, i0, m), gemm_x);  // [m, B]
    T* g = block.mutable_data_ptr<T>();
    at::parallel_for(0, m, std::max<int64_t>(1, 16384 / batch), [&](int64_t begin, int64_t end) {
      for (int64_t r0 = begin; r0 < end; r0 += run) {
        const int64_t r1 = std::min(end, r0 + run);
        // over the Gram row
        dist_rows(g + r0 * batch, sq, x, dim, i0 + r0, r1 - r0, batch, metric);
        if (metric == kEuclidean) at::from_blob(g + r0 * batch, {(r1 - r0) * batch}, options).sqrt_();
        for (int64_t r = r0; r < r1; ++r) select_row<T>(g + r * batch, labels, i0 + r, batch, o);
      }
    });
  }
}

template <typename T>
Outputs<T> outputs(at::Tensor& hp, at::Tensor& hn, at::Tensor& sel_idx, at::Tensor& sel_d) {
  return {hp.mutable_data_ptr<T>(), hn.mutable_data_ptr<T>(), sel_idx.mutable_data_ptr<int64_t>(),
          sel_d.mutable_data_ptr<T>()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_triplet_mine(const at::Tensor& x,
                                                                                   const at::Tensor& labels,
                                                                                   int64_t metric) {
  TORCH_CHECK(x.device().is_cpu() && labels.device().is_cpu(),
              "batch_hard_triplet_mine: x and labels must be CPU tensors");
  TORCH_CHECK(x.dim() == 2, "batch_hard_triplet_mine: x must be 2-D [B, D], got shape ", x.sizes());
  TORCH_CHECK(metric == kEuclidean || metric == kSquaredEuclidean || metric == kCosine,
              "batch_hard_triplet_mine: metric must be 0 (euclidean), 1 (squared euclidean) or 2 (cosine), got ",
              metric);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "batch_hard_triplet_mine: x must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t batch = x.size(0);
  TORCH_CHECK(labels.numel() == batch, "batch_hard_triplet_mine: labels must hold ", batch, " values, got shape ",
              labels.sizes());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && !at::isComplexType(labels.scalar_type()),
              "batch_hard_triplet_mine: labels must be an integer or bool tensor, got ", labels.scalar_type());

  at::NoGradGuard no_grad;
  const auto acc = x.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);  // the distances' type
  at::Tensor hp = at::empty({batch}, acc);
  at::Tensor hn = at::empty({batch}, acc);
  at::Tensor sel_idx = at::empty({3, batch}, x.options().dtype(at::kLong));
  at::Tensor sel_d = at::empty({3, batch}, acc);
  if (batch == 0) return {hp, hn, sel_idx, sel_d};

  // The torch path's operand: fp32 for half inputs; x_hat = F.normalize(x) for cosine, fp32 for half inputs too
  // (normalize_rows). bf16 rows also stay the Gram's operand where bf16 GEMMs are fast (bf16_gemm.h): their products
  // are exact in fp32, so only the order of the sums changes (cosine: rows scaled by powers of two, the products by
  // the inverse norms).
  at::Tensor rows = x.detach();
  const CosineRows scaled = metric == kCosine ? cosine_gram_rows(rows) : CosineRows{};
  at::Tensor xo, gemm_x;  // with scaled rows no copy in fp32: nothing reads it
  if (scaled.rows.defined()) {
    gemm_x = scaled.rows;
  } else {
    if (metric == kCosine) rows = normalize_rows(rows);
    // contiguous: distance_rows reads the rows of near pairs
    xo = (dtype == at::kHalf || dtype == at::kBFloat16 ? rows.to(at::kFloat) : rows).contiguous();
    gemm_x = gemm_operand(rows, xo);
  }
  const at::Tensor sq = metric == kCosine ? scaled.inv : xo.square().sum(1).contiguous();
  const at::Tensor labels64 = labels.reshape(-1).to(at::kLong).contiguous();

  if (dtype == at::kDouble) {
    mine_impl<double>(xo, gemm_x, sq, labels64, metric, outputs<double>(hp, hn, sel_idx, sel_d));
  } else {
    mine_impl<float>(xo, gemm_x, sq, labels64, metric, outputs<float>(hp, hn, sel_idx, sel_d));
  }
  return {hp, hn, sel_idx, sel_d};
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: dx from dL/dhp and dL/dhn through the (at most 3B) selected pairs.
//
// Pair e = k * B + r (k = 0 hardest positive, 1 negative or smallest same-label, 2 row argmax) joins row r and
// column j = sel_idx[k, r] (-1: no pair) with c_e = dL/dd_rj = grad_hp[r] (k = 0) or grad_hn[r] (k = 1, 2). Each
// pair adds the same kind of term to both of its rows, so with w_e its weight:
//   euclidean  d = |x_r - x_j|:      dx_r += w_e (x_r - x_j), dx_j += w_e (x_j - x_r), w_e = c_e / d  (0 where d = 0)
//   squared    d = |x_r - x_j|^2:    the same with w_e = 2 c_e                                        (0 where d = 0)
//   cosine     d = 1 - <x^_r, x^_j>: dx^_r -= w_e x^_j,  dx^_j -= w_e x^_r,  w_e = c_e              (0 where j = r)
// and for cosine dx = (dx^ - x^ <x^, dx^>) / max(|x|, eps) (F.normalize's backward; x^ recomputed in the
// accumulation type, the projection 0 where |x| <= eps, as fastloss.ops.triplet._normalize_backward).
// The scatter half (dx_j) is turned into a gather without races: a counting sort over the columns lists, for each
// row j, the pairs that selected it (in pair order, so the sum order is fixed: deterministic), and every output row
// is then one parallel gather over its own <= 3 pairs and its incoming ones. Memory beyond the inputs and dx: the
// operand (fp32 copy of half inputs; x^ for cosine), 3B weights, the B + 1 offsets and 3B pair ids, and one D-row
// accumulator per thread.

template <typename T>
[[gnu::always_inline]] inline void add_difference(T* acc, const T* xi, const T* xj, T w, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) acc[d] += w * (xi[d] - xj[d]);
}

template <typename T>
[[gnu::always_inline]] inline void add_scaled(T* acc, const T* xj, T w, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) acc[d] += w * xj[d];
}

FASTLOSS_SIMD_CLONES void add_difference_f32(float* acc, const float* xi, const float* xj, float w, int64_t n) {
  add_difference<float>(acc, xi, xj, w, n);
}

FASTLOSS_SIMD_CLONES void add_scaled_f32(float* acc, const float* xj, float w, int64_t n) {
  add_scaled<float>(acc, xj, w, n);
}

inline void add_pair(float* acc, const float* xi, const float* xj, float w, int64_t n, bool cosine) {
  if (cosine) {
    add_scaled_f32(acc, xj, -w, n);
  } else {
    add_difference_f32(acc, xi, xj, w, n);
  }
}

inline void add_pair(double* acc, const double* xi, const double* xj, double w, int64_t n, bool cosine) {
  if (cosine) {
    add_scaled<double>(acc, xj, -w, n);
  } else {
    add_difference<double>(acc, xi, xj, w, n);
  }
}

// Pairs grouped by their selected column: pairs_of[offsets[j] .. offsets[j + 1]) are the pair ids e with
// sel_idx[e] = j, in increasing e.
struct ColumnPairs {
  std::vector<int64_t> offsets;
  std::vector<int64_t> pairs_of;
};

ColumnPairs group_by_column(const int64_t* sel, int64_t batch) {
  ColumnPairs g;
  g.offsets.assign(batch + 1, 0);
  for (int64_t e = 0; e < 3 * batch; ++e) {
    const int64_t j = sel[e];
    TORCH_CHECK(j >= -1 && j < batch, "batch_hard_triplet_bwd: sel_idx must hold row indices in [-1, ", batch,
                "), got ", j);
    if (j >= 0) ++g.offsets[j + 1];
  }
  for (int64_t j = 0; j < batch; ++j) g.offsets[j + 1] += g.offsets[j];
  g.pairs_of.resize(g.offsets[batch]);
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  for (int64_t e = 0; e < 3 * batch; ++e)
    if (sel[e] >= 0) g.pairs_of[next[sel[e]]++] = e;
  return g;
}

// out = (g - x^ <x^, g>) / max(|x|, eps) with x^ = x / max(|x|, eps), the projection 0 where |x| <= eps.
// (always_inline: a clone only vectorises what is inlined into it; without, normalize_backward_row_f32's clones
// jumped to the baseline build of this)
template <typename scalar_t, typename acc_t>
[[gnu::always_inline]] inline void normalize_backward_row(const scalar_t* x, const acc_t* g, scalar_t* out, int64_t n) {
  acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < n; ++d) ss += static_cast<acc_t>(x[d]) * static_cast<acc_t>(x[d]);
  const acc_t norm = std::sqrt(ss);
  const acc_t denom = std::max(norm, static_cast<acc_t>(kNormEps));
  acc_t projection = 0;
  if (norm > static_cast<acc_t>(kNormEps)) {
#pragma omp simd reduction(+ : projection)
    for (int64_t d = 0; d < n; ++d) projection += static_cast<acc_t>(x[d]) / denom * g[d];
  }
#pragma omp simd
  for (int64_t d = 0; d < n; ++d)
    out[d] = static_cast<scalar_t>((g[d] - static_cast<acc_t>(x[d]) / denom * projection) / denom);
}

FASTLOSS_SIMD_CLONES void normalize_backward_row_f32(const float* x, const float* g, float* out, int64_t n) {
  normalize_backward_row<float, float>(x, g, out, n);
}

template <typename scalar_t, typename acc_t>
void normalize_backward(const scalar_t* x, const acc_t* g, scalar_t* out, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    normalize_backward_row_f32(x, g, out, n);
  } else {
    normalize_backward_row<scalar_t, acc_t>(x, g, out, n);
  }
}

template <typename scalar_t>
void bwd_impl(const at::Tensor& x, const at::Tensor& xo_t, const at::Tensor& w_t, const int64_t* sel,
              const ColumnPairs& cols, int64_t metric, at::Tensor& dx_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0), dim = x.size(1);
  const bool cosine = metric == kCosine;
  const acc_t* xo = xo_t.const_data_ptr<acc_t>();
  const acc_t* w = w_t.const_data_ptr<acc_t>();
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  scalar_t* dx = dx_t.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const acc_t* xi = xo + i * dim;
      for (int64_t k = 0; k < 3; ++k) {  // the row's own pairs
        const int64_t j = sel[k * batch + i];
        if (j >= 0) add_pair(acc.data(), xi, xo + j * dim, w[k * batch + i], dim, cosine);
      }
      for (int64_t p = cols.offsets[i]; p < cols.offsets[i + 1]; ++p) {  // the pairs that selected row i
        const int64_t e = cols.pairs_of[p];
        add_pair(acc.data(), xi, xo + (e % batch) * dim, w[e], dim, cosine);
      }
      scalar_t* out = dx + i * dim;
      if (!cosine) {
        for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(acc[d]);
        continue;
      }
      normalize_backward(xs + i * dim, acc.data(), out, dim);
    }
  });
}

at::Tensor batch_hard_triplet_bwd(const at::Tensor& grad_hp, const at::Tensor& grad_hn, const at::Tensor& x_in,
                                  const at::Tensor& sel_idx, const at::Tensor& sel_d, int64_t metric) {
  TORCH_CHECK(x_in.device().is_cpu() && grad_hp.device().is_cpu() && grad_hn.device().is_cpu() &&
                  sel_idx.device().is_cpu() && sel_d.device().is_cpu(),
              "batch_hard_triplet_bwd: every argument must be a CPU tensor");
  TORCH_CHECK(x_in.dim() == 2, "batch_hard_triplet_bwd: x must be 2-D [B, D], got shape ", x_in.sizes());
  TORCH_CHECK(metric == kEuclidean || metric == kSquaredEuclidean || metric == kCosine,
              "batch_hard_triplet_bwd: metric must be 0 (euclidean), 1 (squared euclidean) or 2 (cosine), got ",
              metric);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "batch_hard_triplet_bwd: x must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t batch = x_in.size(0);
  TORCH_CHECK(grad_hp.numel() == batch && grad_hn.numel() == batch, "batch_hard_triplet_bwd: grad_hp and grad_hn ",
              "must hold ", batch, " values, got shapes ", grad_hp.sizes(), " and ", grad_hn.sizes());
  TORCH_CHECK(at::isFloatingType(grad_hp.scalar_type()) && at::isFloatingType(grad_hn.scalar_type()),
              "batch_hard_triplet_bwd: grad_hp and grad_hn must be floating point");
  TORCH_CHECK(sel_idx.dim() == 2 && sel_idx.size(0) == 3 && sel_idx.size(1) == batch &&
                  sel_idx.scalar_type() == at::kLong,
              "batch_hard_triplet_bwd: sel_idx must be int64 [3, ", batch, "], got ", sel_idx.scalar_type(), " ",
              sel_idx.sizes());
  TORCH_CHECK(sel_d.dim() == 2 && sel_d.size(0) == 3 && sel_d.size(1) == batch &&
                  at::isFloatingType(sel_d.scalar_type()),
              "batch_hard_triplet_bwd: sel_d must be a floating [3, ", batch, "] tensor, got ", sel_d.scalar_type(),
              " ", sel_d.sizes());

  at::NoGradGuard no_grad;
  const at::Tensor x = x_in.detach().contiguous();
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx.zero_();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor sel = sel_idx.contiguous();
  const ColumnPairs cols = group_by_column(sel.const_data_ptr<int64_t>(), batch);

  // The operand rows in the accumulation type, as the torch path: x^ = F.normalize(x) for cosine (fp32 for half x).
  at::Tensor xo = x;
  if (metric == kCosine) xo = normalize_rows(xo);
  xo = xo.to(acc_type).contiguous();

  // w [3, B]: the pair weights of the header comment (0 for no pair).
  const at::Tensor c = at::stack({grad_hp.reshape(-1), grad_hn.reshape(-1), grad_hn.reshape(-1)}).to(acc_type);
  at::Tensor w = at::where(sel >= 0, c, at::zeros({}, c.options()));
  if (metric == kCosine) {  // a row's own pair (d_ii, sentence-transformers 6.3's fixed 0) has no gradient
    w = at::where(sel == at::arange(batch, sel.options()), at::zeros({}, c.options()), w);
  } else {
    const at::Tensor d = sel_d.to(acc_type);
    const at::Tensor positive = d > 0;
    w = metric == kEuclidean ? at::where(positive, w / at::where(positive, d, at::ones({}, d.options())), 0.0)
                             : at::where(positive, 2.0 * w, 0.0);
  }
  w = w.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "batch_hard_triplet_bwd", [&] {
    bwd_impl<scalar_t>(x, xo, w, sel.const_data_ptr<int64_t>(), cols, metric, dx);
  });
  return dx;
}

}  // namespace

void register_triplet(pybind11::module_& m) {
  m.def("batch_hard_triplet_mine", &batch_hard_triplet_mine, pybind11::call_guard<pybind11::gil_scoped_release>(),
        R"doc(batch_hard_triplet_mine(x, labels, metric) -> (hp, hn, sel_idx, sel_d)

Batch-hard mining of embeddings x [B, D] with class labels [B]; metric 0 euclidean | 1 squared euclidean |
2 cosine. Returns what fastloss.ops.triplet.batch_hard_fwd returns: hp [B] (hardest positive distance, 0
without one), hn [B] (smallest negative distance, or sentence-transformers' smallest same-label distance plus
the row maximum where that is smaller or no negative exists), int64 sel_idx [3, B] (hardest positive or -1,
the negative or smallest same-label index, the row argmax or -1) and their distances sel_d [3, B].
Distances, selections and hp, hn, sel_d in fp64 for fp64 x, else fp32 (the Gram of bf16 x in MKL's bf16 GEMM
with fp32 results where FASTLOSS_NATIVE_BF16_GEMM allows); ties go to the first index. Memory
beyond the inputs: O(B*D) plus one block of Gram rows of at most FASTLOSS_NATIVE_BLOCK_BYTES bytes (default
16 MiB; at least one row).)doc",
        pybind11::arg("x"), pybind11::arg("labels"), pybind11::arg("metric"));
  m.def("batch_hard_triplet_bwd", &batch_hard_triplet_bwd, pybind11::call_guard<pybind11::gil_scoped_release>(),
        R"doc(batch_hard_triplet_bwd(grad_hp, grad_hn, x, sel_idx, sel_d, metric) -> dx

The gradient w.r.t. embeddings x [B, D] (CPU, fp16/bf16/fp32/fp64) of a loss of batch_hard_triplet_mine's hp and
hn, given dL/dhp = grad_hp [B] and dL/dhn = grad_hn [B] and the mined sel_idx [3, B] / sel_d [3, B]; metric as in
batch_hard_triplet_mine. Returns dx in x's dtype, equal to fastloss.ops.triplet.batch_hard_bwd's torch path: each
selected pair (r, j) with c = dL/dd_rj adds c/d (x_r - x_j) (euclidean; 2c (x_r - x_j) squared; 0 where d = 0) to
dx_r and its negative to dx_j; for cosine -c x^_j to dx^_r and -c x^_r to dx^_j, then F.normalize's backward.
The scatter runs as a gather over the pairs grouped by column (a counting sort): parallel over rows, no atomics,
deterministic. Sums in fp32 (fp64 for fp64 x). Memory beyond the inputs and dx: O(B*D) (an fp32 copy of half x,
or x^ for cosine) plus O(B) and one D-row per thread.)doc",
        pybind11::arg("grad_hp"), pybind11::arg("grad_hn"), pybind11::arg("x"), pybind11::arg("sel_idx"),
        pybind11::arg("sel_d"), pybind11::arg("metric"));
}

}  // namespace fastloss
