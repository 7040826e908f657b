// Batch-all and batch-semi-hard triplet losses on CPU, with the gradient computed inside the forward: what
// fastloss.ops.triplet runs for CPU tensors (its blocked torch path, batch_all_fwd / batch_semi_hard_fwd, is the
// fallback and the CUDA path; this file follows its arithmetic and tie rules).
//
// Per block of m anchor rows: G = X_blk X^T (at::mm into one m x B buffer; bf16 GEMMs with fp32 results for bf16
// inputs where those are fast, bf16_gemm.h, the gradient GEMMs below too), a parallel pass turning each row into
// distances in place (distance_rows; at::sqrt of the block for euclidean), then a parallel pass over the anchors.
// With anchor a's negatives n (y_n != y_a) and positives p (p != a, y_p = y_a):
//   batch-all  h_pn = (d_ap - d_an) + margin in the distances' dtype, sentence-transformers' order of operations
//              (d_ap + margin first would round differently: a duplicate's d_ap = 6e-8 vanishes in 1 + 6e-8, and a
//              triplet ST counts would get no loss and a 1e16 gradient); loss terms sum max(h, 0) (fp64 sum), the
//              count #{h > 1e-16}; weights w_ap = #{n : h >= 0}, w_an = -#{p : h >= 0} (the gradient at h = 0 as
//              sentence-transformers passes it). h is monotone in d_an (falling) and d_ap (rising), so the searched
//              evaluation finds these sets by binary searches on the same predicate.
//   semi-hard  n*(p) = the negative first in (d_an, n) order with d_an > d_ap, else the fallback of
//              sentence-transformers' masked maximum: f = max_j([y_j != y_a] (d_aj - min_k d_ak)) + min_k d_ak, whose
//              gradient goes to its argmax when that is a negative, else to the row's argmin (first indices);
//              h = (d_ap - d_an*) + margin, loss term max(h, 0), u = 1 (h > 0), 1/2 (h == 0, torch.max's tie), 0;
//              w_ap += u, w_an* -= u.
// Each anchor takes one of two equal evaluations by its number of positives P: direct, one vectorised pass over its
// negatives per positive (O(P B): a few positives per class, the usual batch), or searched (O(B log P): the
// positives sorted, one binary search per negative, fp64 suffix sums; one or two large classes).
//
// Gradient inside the forward: the weights do not depend on the normaliser (the batch's count of triplets or
// positive pairs, known only after the last block), which only scales the result, so the same pass turns each row
// into coefficients c_aj with w_aj dd_aj/dx_a = c_aj (x_a - x_j) (euclidean c = w / d, squared 2 w, 0 where d = 0)
// and two GEMMs per block apply them: with C the (never whole) B x B coefficient matrix, r and k its row and column
// sums,
//   dX = diag(r + k) X - C X - C^T X                 (euclidean, squared)
//   dX_hat = -C X_hat - C^T X_hat, then the backward of F.normalize (cosine; c_aa = 0: d_aa is a constant 0).
// A training step then costs three GEMMs (G, C X, C^T X_blk) and one pass per row instead of recomputing the block
// in a backward; the backward only scales the saved gradient by grad_output, and need_grad = false (a forward under
// no_grad) skips the coefficients and both gradient GEMMs. Memory beyond inputs and outputs: the operand rows and the
// fp32 / fp64 gradient (O(B D)), one m x B block (block_bytes(), at least one row; and a bf16 copy of its coefficients
// where bf16 GEMMs take them) and O(B) scratch per thread.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bf16_gemm.h"
#include "fastloss.h"

namespace fastloss {
namespace {

// Anchors with more positives than these take the searched evaluation (P vectorised passes over the negatives
// against a sort of P values and B binary searches among them). The crossovers measured on one core of a 2-core
// EPYC (D = 64): batch-all near P = 12-16 at B = 512 and 2048; semi-hard (a cheaper pass) near 100 at B = 512
// and 50 at B = 2048.
constexpr int64_t kBatchAllSearchMinPositives = 12;
constexpr int64_t kSemiHardSearchMinPositives = 48;

// One anchor's columns split by label, in column order, and the per-thread buffers of its evaluation.
template <typename T>
struct Scratch {
  std::vector<T> neg, pos, w, reach, sorted_pos;
  std::vector<int64_t> neg_j, pos_j, hist;
  std::vector<double> suffix;
  std::vector<std::pair<T, int64_t>> order, best, chosen;
  int64_t n_neg = 0, n_pos = 0;

  explicit Scratch(int64_t n) : neg(n), pos(n), w(n), reach(n), neg_j(n), pos_j(n) {}

  void split(const T* d, const int64_t* labels, int64_t own, int64_t n) {
    const int64_t label = labels[own];
    n_neg = n_pos = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (labels[j] != label) {
        neg[n_neg] = d[j];
        neg_j[n_neg++] = j;
      } else if (j != own) {
        pos[n_pos] = d[j];
        pos_j[n_pos++] = j;
      }
    }
  }
};

struct RowSums {
  double total = 0.0;  // the row's loss terms
  double count = 0.0;  // batch-all: triplets with a loss above 1e-16; semi-hard: positive pairs
};

// #{i : before(a[i])} for a sorted so that those i form a prefix (lower_bound with <, upper_bound with <=), by a
// binary search whose steps are conditional moves, not branches: the searched evaluations' cost is mostly these.
template <typename T, typename Before>
[[gnu::always_inline]] inline int64_t prefix_count(const T* a, int64_t n, Before before) {
  if (n == 0) return 0;
  const T* base = a;
  while (n > 1) {
    const int64_t half = n / 2;
    base = before(base[half]) ? base + half : base;
    n -= half;
  }
  return (base - a) + (before(*base) ? 1 : 0);
}

// One positive of batch-all against the negatives s: with h_k = (dp - s_k) + margin in T, adds sum max(h_k, 0)
// (fp64) to sum, #{h_k > 1e-16} to counted, #{h_k >= 0} to at_most and 1 to reach[k] where h_k >= 0 (kReach only;
// at_most then too). The predicates are on the bits of h (positive_mask; h >= 0: h > 0 or h = +-0), so that the AVX2
// clone vectorises; int32 counts, so at most 2^31 - 1 negatives a call (hinge_pass takes chunks).
template <typename T, bool kReach>
[[gnu::always_inline]] inline void hinge_chunk(const T* s, int64_t n, T dp, T margin, T* reach, double& sum,
                                               int64_t& counted, int64_t& at_most) {
  using B = BitsOf<T>;
  const B tiny = bits_as<B>(static_cast<T>(1e-16));  // h > 1e-16: h > 0 with bits above these
  const B magnitude = std::numeric_limits<B>::max();  // every bit but the sign
  double acc = 0.0;
  int32_t c = 0, a = 0;
#pragma omp simd reduction(+ : acc, c, a)
  for (int64_t k = 0; k < n; ++k) {
    const T h = (dp - s[k]) + margin;
    const B hb = bits_as<B>(h), positive = positive_mask(h);
    const B reached = (positive | -static_cast<B>((hb & magnitude) == 0)) & 1;
    acc += static_cast<double>(bits_as<T>(hb & positive));
    c += static_cast<int32_t>(positive & static_cast<B>(hb > tiny));
    if constexpr (kReach) {
      a += static_cast<int32_t>(reached);
      reach[k] += bits_as<T>(reached * bits_as<B>(T(1)));
    }
  }
  sum += acc;
  counted += c;
  at_most += a;
}

// hinge_chunk over chunks of 2^30 negatives, reach (nullptr: none) picking the variant.
template <typename T>
[[gnu::always_inline]] inline void hinge_pass(const T* s, int64_t n, T dp, T margin, T* reach, double& sum,
                                              int64_t& counted, int64_t& at_most) {
  constexpr int64_t kChunk = int64_t{1} << 30;
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    const int64_t len = std::min(kChunk, n - k0);
    if (reach == nullptr)
      hinge_chunk<T, false>(s + k0, len, dp, margin, nullptr, sum, counted, at_most);
    else
      hinge_chunk<T, true>(s + k0, len, dp, margin, reach + k0, sum, counted, at_most);
  }
}

FASTLOSS_SIMD_CLONES void hinge_pass_f32(const float* s, int64_t n, float dp, float margin, float* reach, double& sum,
                                         int64_t& counted, int64_t& at_most) {
  hinge_pass<float>(s, n, dp, margin, reach, sum, counted, at_most);
}
inline void hinge_pass_any(const float* s, int64_t n, float dp, float margin, float* reach, double& sum,
                           int64_t& counted, int64_t& at_most) {
  hinge_pass_f32(s, n, dp, margin, reach, sum, counted, at_most);
}
inline void hinge_pass_any(const double* s, int64_t n, double dp, double margin, double* reach, double& sum,
                           int64_t& counted, int64_t& at_most) {
  hinge_pass<double>(s, n, dp, margin, reach, sum, counted, at_most);
}

// Batch-all terms of one anchor; with w, its weights (w zeroed by the caller).
template <typename T>
RowSums batch_all_row(Scratch<T>& s, T margin, T* w) {
  RowSums out;
  const int64_t n_neg = s.n_neg, n_pos = s.n_pos;
  int64_t counted = 0;
  if (n_pos <= kBatchAllSearchMinPositives) {
    T* reach = nullptr;  // #{p : t_p >= d_an} per negative
    if (w != nullptr) {
      reach = s.reach.data();
      std::fill(reach, reach + n_neg, T(0));
    }
    for (int64_t p = 0; p < n_pos; ++p) {
      int64_t at_most = 0;
      hinge_pass_any(s.neg.data(), n_neg, s.pos[p], margin, reach, out.total, counted, at_most);
      if (w != nullptr) w[s.pos_j[p]] = static_cast<T>(at_most);
    }
    if (w != nullptr)
      for (int64_t k = 0; k < n_neg; ++k) w[s.neg_j[k]] = -reach[k];
    out.count = static_cast<double>(counted);
    return out;
  }
  // Positives sorted by distance, then per negative v binary searches for the prefixes of positives whose
  // h = (d_ap - v) + margin is <= 0, <= 1e-16 and < 0; with suffix sums S_i = sum_{q >= i} (d_q + margin) (fp64),
  // sum_{p : h > 0} h = S_i - (P - i) v for i = #{p : h <= 0}.
  s.order.resize(n_pos);
  for (int64_t p = 0; p < n_pos; ++p) s.order[p] = {s.pos[p], s.pos_j[p]};
  std::sort(s.order.begin(), s.order.end());
  s.sorted_pos.resize(n_pos);
  s.suffix.resize(n_pos + 1);
  s.suffix[n_pos] = 0.0;
  for (int64_t i = n_pos - 1; i >= 0; --i) {
    s.sorted_pos[i] = s.order[i].first;
    s.suffix[i] = s.suffix[i + 1] + (static_cast<double>(s.order[i].first) + static_cast<double>(margin));
  }
  const T* first = s.sorted_pos.data();
  const T tiny = static_cast<T>(1e-16);
  if (w != nullptr) s.hist.assign(n_pos + 1, 0);
  for (int64_t k = 0; k < n_neg; ++k) {
    const T v = s.neg[k];
    const int64_t no_loss = prefix_count(first, n_pos, [v, margin](T dp) { return (dp - v) + margin <= T(0); });
    out.total += s.suffix[no_loss] - static_cast<double>(n_pos - no_loss) * static_cast<double>(v);
    counted += n_pos - prefix_count(first, n_pos, [v, margin, tiny](T dp) { return (dp - v) + margin <= tiny; });
    if (w != nullptr) {
      const int64_t below = prefix_count(first, n_pos, [v, margin](T dp) { return (dp - v) + margin < T(0); });
      w[s.neg_j[k]] = -static_cast<T>(n_pos - below);  // -#{p : h >= 0}
      ++s.hist[below];  // h >= 0 for the sorted positives from `below` on
    }
  }
  if (w != nullptr) {
    int64_t reached = 0;
    for (int64_t i = 0; i < n_pos; ++i) {
      reached += s.hist[i];
      w[s.order[i].second] = static_cast<T>(reached);  // #{n : h >= 0}
    }
  }
  out.count = static_cast<double>(counted);
  return out;
}

// min over s_k > v of s_k (inf without one): the direct search for the semi-hard negative.
template <typename T>
[[gnu::always_inline]] inline T min_above(const T* s, int64_t n, T v) {
  T best = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : best)
  for (int64_t k = 0; k < n; ++k) {
    const T c = s[k] > v ? s[k] : std::numeric_limits<T>::infinity();
    best = c < best ? c : best;
  }
  return best;
}

FASTLOSS_SIMD_CLONES float min_above_f32(const float* s, int64_t n, float v) { return min_above<float>(s, n, v); }
inline float min_above_any(const float* s, int64_t n, float v) { return min_above_f32(s, n, v); }
inline double min_above_any(const double* s, int64_t n, double v) { return min_above<double>(s, n, v); }

// Semi-hard terms of anchor own with distances d; with w, its weights (w zeroed by the caller).
template <typename T>
RowSums semi_hard_row(Scratch<T>& s, const T* d, const int64_t* labels, int64_t own, int64_t n, T margin, T* w) {
  RowSums out;
  const int64_t n_neg = s.n_neg, n_pos = s.n_pos;
  out.count = static_cast<double>(n_pos);
  const bool searched = n_pos > kSemiHardSearchMinPositives;
  if (searched) {
    // Positives sorted by distance; each negative, in column order, is a candidate for the positives closer than it
    // (a prefix of that order): keep it at the prefix's end, then a suffix minimum over (distance, column) gives
    // each positive its first negative farther away.
    s.order.resize(n_pos);
    for (int64_t p = 0; p < n_pos; ++p) s.order[p] = {s.pos[p], p};
    std::sort(s.order.begin(), s.order.end());
    s.sorted_pos.resize(n_pos);
    for (int64_t i = 0; i < n_pos; ++i) s.sorted_pos[i] = s.order[i].first;
    s.best.assign(n_pos, {std::numeric_limits<T>::infinity(), -1});
    for (int64_t k = 0; k < n_neg; ++k) {
      const T v = s.neg[k];
      const int64_t closer = prefix_count(s.sorted_pos.data(), n_pos, [v](T d) { return d < v; });
      if (closer > 0 && v < s.best[closer - 1].first) s.best[closer - 1] = {v, s.neg_j[k]};
    }
    for (int64_t i = n_pos - 2; i >= 0; --i) s.best[i] = std::min(s.best[i], s.best[i + 1]);
    s.chosen.resize(n_pos);
    for (int64_t i = 0; i < n_pos; ++i) s.chosen[s.order[i].second] = s.best[i];
  }
  bool have_fallback = false;
  T fallback = 0;
  int64_t fallback_j = -1;
  T fallback_u = 0;
  for (int64_t p = 0; p < n_pos; ++p) {
    const T dp = s.pos[p];
    T chosen = std::numeric_limits<T>::infinity();
    int64_t chosen_j = -1;
    if (searched) {
      chosen = s.chosen[p].first;
      chosen_j = s.chosen[p].second;
    } else {
      chosen = min_above_any(s.neg.data(), n_neg, dp);
      if (chosen < std::numeric_limits<T>::infinity())  // one of the negatives: found
        chosen_j = s.neg_j[find_first(s.neg.data(), nullptr, n_neg, chosen, 0, true, -1)];
    }
    const bool outside = chosen < std::numeric_limits<T>::infinity();
    if (!outside && !have_fallback) {
      // max_j ([y_j != y_a] (d_j - rowmin)) + rowmin, first indices of the min and the max, as torch's min / max
      T row_min = d[0];
      int64_t arg_min = 0;
      for (int64_t j = 1; j < n; ++j)
        if (d[j] < row_min) row_min = d[j], arg_min = j;
      const int64_t label = labels[own];
      T best = -std::numeric_limits<T>::infinity();
      int64_t arg_best = 0;
      for (int64_t j = 0; j < n; ++j) {
        const T v = labels[j] != label ? d[j] - row_min : T(0);
        if (v > best) best = v, arg_best = j;
      }
      fallback = best + row_min;
      fallback_j = labels[arg_best] != label ? arg_best : arg_min;
      have_fallback = true;
    }
    const T hinge = (dp - (outside ? chosen : fallback)) + margin;
    out.total += hinge > T(0) ? static_cast<double>(hinge) : 0.0;
    if (w != nullptr) {
      const T u = hinge > T(0) ? T(1) : (hinge == T(0) ? T(0.5) : T(0));
      w[s.pos_j[p]] += u;
      if (outside) {
        w[chosen_j] -= u;
      } else {
        fallback_u += u;
      }
    }
  }
  if (w != nullptr && have_fallback) w[fallback_j] -= fallback_u;
  return out;
}

// Weights -> GEMM coefficients in place of the distances g (see the header); returns the row sum (0 for cosine).
template <typename T>
[[gnu::always_inline]] inline T coefficients(T* g, const T* w, int64_t n, int64_t metric) {
  if (metric == kCosine) {
    std::copy(w, w + n, g);
    return T(0);
  }
  // d > 0 decided on the bits of d (positive_mask), so that the AVX2 clone vectorises
  using B = BitsOf<T>;
  const B one = bits_as<B>(T(1));
  T sum = 0;
  if (metric == kEuclidean) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const B keep = positive_mask(g[j]);
      const T d = bits_as<T>((bits_as<B>(g[j]) & keep) | (one & ~keep));  // d, else 1
      const T c = bits_as<T>(bits_as<B>(w[j] / d) & keep);
      g[j] = c;
      sum += c;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const T c = bits_as<T>(bits_as<B>(T(2) * w[j]) & positive_mask(g[j]));
      g[j] = c;
      sum += c;
    }
  }
  return sum;
}

FASTLOSS_SIMD_CLONES float coefficients_f32(float* g, const float* w, int64_t n, int64_t metric) {
  return coefficients<float>(g, w, n, metric);
}
inline float coefficients_any(float* g, const float* w, int64_t n, int64_t metric) {
  return coefficients_f32(g, w, n, metric);
}
inline double coefficients_any(double* g, const double* w, int64_t n, int64_t metric) {
  return coefficients<double>(g, w, n, metric);
}

// out_j = bf16(-c_j) as bits, the coefficients as the bf16 gradient GEMMs take them (negated: those GEMMs add);
// returns the row sum of the same rounded values, so that diag(r + k) X - C X - C^T X stays the gradient of one set of
// coefficients (each off by at most half a bf16 step) rather than subtracting products of different ones
FASTLOSS_SIMD_CLONES float round_negated_bf16(const float* c, uint16_t* out, int64_t n) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t b = bf16_bits(-c[j]);
    out[j] = b;
    sum -= bits_as<float>(static_cast<uint32_t>(b) << 16);  // + bf16(c_j)
  }
  return sum;
}

struct Totals {
  double total = 0.0;
  double count = 0.0;
};

// Streams the anchors in row blocks; with need_grad accumulates dxo (unnormalised: dL/dxo times the normaliser, the
// diag(r + k) X term left to the caller through diag). gemm_x: the Gram's operand, xo or its bf16 form; with bf16 the
// gradient GEMMs take it too, with the coefficients rounded to bf16 (round_negated_bf16), as the MNRL op's weights.
template <typename T>
Totals stream(const at::Tensor& xo, const at::Tensor& gemm_x, const at::Tensor& sq_t, const at::Tensor& labels_t,
              int64_t metric, T margin, bool semi_hard, at::Tensor& dxo, at::Tensor& diag) {
  const int64_t batch = xo.size(0);
  const bool need_grad = dxo.defined();
  const int64_t rows_per_block =
      std::clamp<int64_t>(block_bytes() / (batch * static_cast<int64_t>(sizeof(T))), 1, batch);
  at::Tensor buffer = at::empty({rows_per_block, batch}, xo.options());
  const bool bf16_grad = need_grad && gemm_x.scalar_type() == at::kBFloat16;
  at::Tensor buffer16 = bf16_grad ? at::empty({rows_per_block, batch}, gemm_x.options()) : at::Tensor();
  uint16_t* c16 = bf16_grad ? reinterpret_cast<uint16_t*>(buffer16.mutable_data_ptr<at::BFloat16>()) : nullptr;
  std::vector<RowSums> sums(rows_per_block);
  const T* sq = metric == kCosine ? nullptr : sq_t.const_data_ptr<T>();
  const T* x = xo.const_data_ptr<T>();  // contiguous
  const int64_t dim = xo.size(1);
  const int64_t* labels = labels_t.const_data_ptr<int64_t>();
  T* diag_p = need_grad && metric != kCosine ? diag.mutable_data_ptr<T>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 4096 / batch);
  Totals totals;
  for (int64_t i0 = 0; i0 < batch; i0 += rows_per_block) {
    const int64_t m = std::min(rows_per_block, batch - i0);
    at::Tensor block = buffer.narrow(0, 0, m);
    const at::Tensor xa = xo.narrow(0, i0, m);
    products(block, gemm_x.narrow(0, i0, m), gemm_x);  // [m, B]
    T* g = block.mutable_data_ptr<T>();
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      dist_rows(g + begin * batch, sq, x, dim, i0 + begin, end - begin, batch, metric);
    });
    if (metric == kEuclidean) block.sqrt_();
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      Scratch<T> s(batch);
      for (int64_t r = begin; r < end; ++r) {
        T* row = g + r * batch;
        const int64_t own = i0 + r;
        s.split(row, labels, own, batch);
        T* w = nullptr;
        if (need_grad) {
          w = s.w.data();
          std::fill(w, w + batch, T(0));
        }
        sums[r] = s.n_pos == 0 ? RowSums{}
                  : semi_hard ? semi_hard_row(s, row, labels, own, batch, margin, w)
                              : batch_all_row(s, margin, w);
        if (need_grad) {
          if (metric == kCosine) w[own] = T(0);  // d_ii: sentence-transformers 6.3's fixed 0, no gradient
          T row_sum = coefficients_any(row, w, batch, metric);
          if constexpr (std::is_same_v<T, float>) {
            if (c16 != nullptr) row_sum = round_negated_bf16(row, c16 + r * batch, batch);
          }
          if (diag_p != nullptr) diag_p[own] += row_sum;
        }
      }
    });
    for (int64_t r = 0; r < m; ++r) {  // in row order: the same sum for any number of threads
      totals.total += sums[r].total;
      totals.count += sums[r].count;
    }
    if (bf16_grad) {  // the same three updates with -C_blk in bf16 (bf16 GEMMs add)
      const auto* xb = gemm_x.const_data_ptr<at::BFloat16>();
      const auto* cb = reinterpret_cast<const at::BFloat16*>(c16);
      float* dp = dxo.mutable_data_ptr<float>();
      gemm_bf16_f32(false, false, m, dim, batch, cb, batch, xb, dim, 1.0f, dp + i0 * dim, dim);
      gemm_bf16_f32(true, false, batch, dim, m, cb, batch, xb + i0 * dim, dim, 1.0f, dp, dim);
      if (metric != kCosine) diag.sub_(buffer16.narrow(0, 0, m).sum(0, false, at::kFloat));
    } else if (need_grad) {
      dxo.narrow(0, i0, m).addmm_(block, xo, 1, -1);  // -= C_blk X
      dxo.addmm_(block.t(), xa, 1, -1);                // -= C_blk^T X_blk
      if (metric != kCosine) diag.add_(block.sum(0));  // column sums k
    }
  }
  return totals;
}

// The backward of x_hat = F.normalize(x, eps) for dL/dx_hat = dxh, as fastloss.ops.triplet._normalize_backward.
at::Tensor normalize_backward(const at::Tensor& x, const at::Tensor& dxh) {
  const at::Tensor xf = x.to(dxh.scalar_type());
  const at::Tensor norm = at::linalg_vector_norm(xf, 2, {1}, true);
  const at::Tensor denom = norm.clamp_min(kNormEps);
  const at::Tensor x_hat = xf / denom;
  const at::Tensor projection = at::where(norm > kNormEps, (x_hat * dxh).sum(1, true), at::zeros_like(norm));
  return (dxh - x_hat * projection) / denom;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> streamed(const char* name, bool semi_hard, const at::Tensor& x,
                                                        const at::Tensor& labels, double margin, int64_t metric,
                                                        bool need_grad) {
  TORCH_CHECK(x.device().is_cpu() && labels.device().is_cpu(), name, ": x and labels must be CPU tensors");
  TORCH_CHECK(x.dim() == 2, name, ": x must be 2-D [B, D], got shape ", x.sizes());
  TORCH_CHECK(metric == kEuclidean || metric == kSquaredEuclidean || metric == kCosine, name,
              ": metric must be 0 (euclidean), 1 (squared euclidean) or 2 (cosine), got ", metric);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
              ": x must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t batch = x.size(0);
  TORCH_CHECK(labels.numel() == batch, name, ": labels must hold ", batch, " values, got shape ", labels.sizes());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && !at::isComplexType(labels.scalar_type()), name,
              ": labels must be an integer or bool tensor, got ", labels.scalar_type());
  TORCH_CHECK(std::isfinite(margin), name, ": margin must be finite, got ", margin);

  at::NoGradGuard no_grad;
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc = x.options().dtype(acc_type);
  // The torch path's operand: fp32 for half inputs; x_hat = F.normalize(x) for cosine (fp32 for half x too).
  const at::Tensor rows = x.detach();
  const at::Tensor xo = (metric == kCosine ? normalize_rows(rows) : rows).to(acc_type).contiguous();
  // bf16 rows stay the GEMMs' operand where bf16 GEMMs are fast: the Gram's products are exact in fp32; the gradient
  // GEMMs take the coefficients rounded to bf16 (exact for squared euclidean, small multiples of weights). Cosine
  // keeps fp32 GEMMs of the fp32 unit rows (the raw bf16 rows' Gram scaled by inverse norms, as the mining's, measured
  // no faster here: semi-hard B = 1024 15.0-17.0 against 15.1-18.1 ms, batch-all B = 512 5.6-6.1 against 5.3-5.7)
  const at::Tensor gemm_x = metric == kCosine ? xo : gemm_operand(rows, xo);
  const at::Tensor sq = metric == kCosine ? at::Tensor() : xo.square().sum(1).contiguous();
  const at::Tensor labels64 = labels.reshape(-1).to(at::kLong).contiguous();
  at::Tensor dxo = need_grad ? at::zeros_like(xo) : at::Tensor();
  at::Tensor diag = need_grad && metric != kCosine ? at::zeros({batch}, acc) : at::Tensor();

  Totals t;
  if (batch > 0) {
    if (acc_type == at::kDouble) {
      t = stream<double>(xo, gemm_x, sq, labels64, metric, static_cast<double>(margin), semi_hard, dxo, diag);
    } else {
      t = stream<float>(xo, gemm_x, sq, labels64, metric, static_cast<float>(margin), semi_hard, dxo, diag);
    }
  }
  const double norm = semi_hard ? std::max(t.count, 1e-16) : t.count + 1e-16;
  at::Tensor loss = at::scalar_tensor(t.total / norm, acc);
  at::Tensor norm_t = at::scalar_tensor(norm, x.options().dtype(at::kDouble));
  if (!need_grad) return {loss, norm_t, at::zeros({batch, x.size(1)}, acc)};
  if (metric != kCosine) dxo.addcmul_(diag.unsqueeze(1), xo);  // + diag(r + k) X
  dxo.mul_(1.0 / norm);
  if (metric == kCosine) dxo = normalize_backward(x, dxo);
  return {loss, norm_t, dxo};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_all_triplet_fused(const at::Tensor& x, const at::Tensor& labels,
                                                                       double margin, int64_t metric, bool need_grad) {
  return streamed("batch_all_triplet_fused", false, x, labels, margin, metric, need_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_semi_hard_triplet_fused(const at::Tensor& x,
                                                                             const at::Tensor& labels, double margin,
                                                                             int64_t metric, bool need_grad) {
  return streamed("batch_semi_hard_triplet_fused", true, x, labels, margin, metric, need_grad);
}

}  // namespace

void register_triplet_streamed(pybind11::module_& m) {
  m.def("batch_all_triplet_fused", &batch_all_triplet_fused, pybind11::call_guard<pybind11::gil_scoped_release>(),
        R"doc(batch_all_triplet_fused(x, labels, margin, metric, need_grad) -> (loss, norm, dx)

Batch-all triplet loss of embeddings x [B, D] with class labels [B] and its gradient in one pass; metric
0 euclidean | 1 squared euclidean | 2 cosine. loss = sum over valid triplets (a, p, n) of
max(d_ap - d_an + margin, 0) / norm with norm = #{triplets with a loss > 1e-16} + 1e-16 (fp64 0-d), as
sentence-transformers' BatchAllTripletLoss and fastloss.ops.triplet.batch_all_fwd. Returns loss (0-d) and
dx = dloss/dx [B, D] in fp64 for fp64 x, else fp32 (distances and GEMMs in fp32 for fp16 / bf16 / fp32; for bf16
x where FASTLOSS_NATIVE_BF16_GEMM allows, MKL's bf16 GEMMs with fp32 results, the gradient's coefficients rounded
to bf16; counts and sums of hinges in fp64). need_grad=False computes only the loss (dx is then zeros).
Memory beyond inputs and outputs: O(B*D) plus one block of distance rows of at most FASTLOSS_NATIVE_BLOCK_BYTES
bytes (default 16 MiB; at least one row; half as much again for bf16 coefficients) and O(B) per thread.)doc",
        pybind11::arg("x"), pybind11::arg("labels"), pybind11::arg("margin"), pybind11::arg("metric"),
        pybind11::arg("need_grad"));
  m.def("batch_semi_hard_triplet_fused", &batch_semi_hard_triplet_fused,
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        R"doc(batch_semi_hard_triplet_fused(x, labels, margin, metric, need_grad) -> (loss, norm, dx)

Batch-semi-hard triplet loss of embeddings x [B, D] with class labels [B] and its gradient in one pass; metric
0 euclidean | 1 squared euclidean | 2 cosine. For each positive pair (a, p) the closest negative farther than p
(ties: the lowest index), else sentence-transformers' masked-maximum fallback; loss = sum_ap max(d_ap - d_an +
margin, 0) / norm with norm = max(#positive pairs, 1e-16) (fp64 0-d), as sentence-transformers'
BatchSemiHardTripletLoss and fastloss.ops.triplet.batch_semi_hard_fwd (half the gradient at a hinge of exactly
0). Returns loss (0-d) and dx = dloss/dx [B, D] in fp64 for fp64 x, else fp32 (GEMMs as batch_all_triplet_fused).
need_grad=False computes only the loss (dx is then zeros). Memory beyond inputs and outputs: O(B*D) plus one
block of distance rows of at most FASTLOSS_NATIVE_BLOCK_BYTES bytes (default 16 MiB; at least one row; half as much
again for bf16 coefficients) and O(B) per thread.)doc",
        pybind11::arg("x"), pybind11::arg("labels"), pybind11::arg("margin"), pybind11::arg("metric"),
        pybind11::arg("need_grad"));
}

}  // namespace fastloss
