// Batch-hard triplet mining on CPU: the selections of fastloss.ops.triplet.batch_hard_fwd without a B x B matrix.
//
// Per block of m anchor rows: G = X_blk X^T (at::mm into one m x B buffer), then one parallel pass over the block's
// rows turns each row of G into distances in place (fp64 for fp64 inputs, then rounded to fp32 in a per-thread row,
// as the torch path does) and keeps the row's hardest positive, smallest negative, smallest same-label distance and
// maximum, each with its first index (torch's max / min tie rule). Memory beyond the inputs: the operand rows
// (O(B*D): x_hat for cosine, fp32 for half inputs) and one m x B block.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fastloss.h"

namespace fastloss {

FASTLOSS_SIMD_CLONES void distance_row_f32(float* g, const float* sq, int64_t own, int64_t n, int64_t metric) {
  distance_row<float>(g, sq, own, n, metric);
}

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct RowExtremes {
  float pos;       // max over positives (same label, not self), -inf without one
  float top;       // max over the row
  float neg;       // min over negatives, inf without one
  float same_min;  // min over the same label (self included)
};

FASTLOSS_SIMD_CLONES RowExtremes row_extremes(const float* d, const int64_t* labels, int64_t own, int64_t n) {
  const int64_t label = labels[own];
  float pos = -kInf, top = -kInf, neg = kInf, same_min = kInf;
#pragma omp simd reduction(max : pos, top) reduction(min : neg, same_min)
  for (int64_t j = 0; j < n; ++j) {
    const float v = d[j];
    const bool same = labels[j] == label;
    const float p = (same && j != own) ? v : -kInf;
    const float q = same ? kInf : v;
    const float s = same ? v : kInf;
    pos = p > pos ? p : pos;
    top = v > top ? v : top;
    neg = q < neg ? q : neg;
    same_min = s < same_min ? s : same_min;
  }
  return {pos, top, neg, same_min};
}

// The first j whose masked value (d_j where keep(j), else fill) equals best: torch's index of a max / min. A row
// whose every masked value is the fill (e.g. no negative) gets 0, as torch's argmin of an all-inf row.
template <typename Keep>
int64_t first_index(const float* d, int64_t n, float best, float fill, Keep keep) {
  for (int64_t j = 0; j < n; ++j)
    if ((keep(j) ? d[j] : fill) == best) return j;
  return 0;  // only a NaN best gets here; torch would return the NaN's index
}

struct Outputs {
  float* hp;
  float* hn;
  int64_t* sel_idx;  // [3, B]
  float* sel_d;      // [3, B]
};

// The selections of row i from its distances d (see fastloss.ops.triplet._batch_hard_fwd_blocked).
void select_row(const float* d, const int64_t* labels, int64_t i, int64_t n, const Outputs& o) {
  const RowExtremes e = row_extremes(d, labels, i, n);
  const int64_t label = labels[i];
  auto is_same = [&](int64_t j) { return labels[j] == label; };
  auto is_negative = [&](int64_t j) { return labels[j] != label; };
  const float shifted = e.same_min + e.top;
  bool use_neg = e.neg < shifted;
  int64_t neg_i = -1, same_i = -1;
  if (e.neg == shifted) {  // a tie: the earlier index wins, as sentence-transformers' min over d + rowmax * same
    neg_i = first_index(d, n, e.neg, kInf, is_negative);
    same_i = first_index(d, n, e.same_min, kInf, is_same);
    use_neg = neg_i < same_i;
  }
  const float hp = e.pos < 0.0f ? 0.0f : e.pos;  // clamp_min(0): -inf (no positive) -> 0
  int64_t pos_i = -1;
  if (e.pos > 0.0f) pos_i = first_index(d, n, e.pos, -kInf, [&](int64_t j) { return j != i && labels[j] == label; });
  o.hp[i] = hp;
  o.sel_idx[i] = pos_i;
  o.sel_d[i] = hp;
  if (use_neg) {
    if (neg_i < 0) neg_i = first_index(d, n, e.neg, kInf, is_negative);
    o.hn[i] = e.neg;
    o.sel_idx[n + i] = neg_i;
    o.sel_idx[2 * n + i] = -1;
    o.sel_d[n + i] = e.neg;
    o.sel_d[2 * n + i] = 0.0f;
  } else {
    if (same_i < 0) same_i = first_index(d, n, e.same_min, kInf, is_same);
    o.hn[i] = shifted;
    o.sel_idx[n + i] = same_i;
    o.sel_idx[2 * n + i] = first_index(d, n, e.top, -kInf, [](int64_t) { return true; });
    o.sel_d[n + i] = e.same_min;
    o.sel_d[2 * n + i] = e.top;
  }
}

template <typename T>
void mine_impl(const at::Tensor& xo, const at::Tensor& sq_t, const at::Tensor& labels_t, int64_t metric,
               const Outputs& o) {
  const int64_t batch = xo.size(0);
  const int64_t rows_per_block =
      std::clamp<int64_t>(block_bytes() / (batch * static_cast<int64_t>(sizeof(T))), 1, batch);
  at::Tensor gram = at::empty({rows_per_block, batch}, xo.options());
  const T* sq = metric == kCosine ? nullptr : sq_t.const_data_ptr<T>();
  const int64_t* labels = labels_t.const_data_ptr<int64_t>();
  const at::Tensor xt = xo.t();
  for (int64_t i0 = 0; i0 < batch; i0 += rows_per_block) {
    const int64_t m = std::min(rows_per_block, batch - i0);
    at::Tensor block = gram.narrow(0, 0, m);
    at::mm_out(block, xo.narrow(0, i0, m), xt);  // [m, B]
    T* g = block.mutable_data_ptr<T>();
    at::parallel_for(0, m, std::max<int64_t>(1, 16384 / batch), [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(std::is_same_v<T, float> ? 0 : batch);
      for (int64_t r = begin; r < end; ++r) {
        T* row = g + r * batch;  // distances overwrite the Gram row
        dist_row(row, sq, i0 + r, batch, metric);
        if (metric == kEuclidean) at::from_blob(row, {batch}, xo.options()).sqrt_();
        const float* d;
        if constexpr (std::is_same_v<T, float>) {
          d = row;
        } else {  // fp64 distances rounded to fp32, as the torch path's .float()
          for (int64_t j = 0; j < batch; ++j) scratch[j] = static_cast<float>(row[j]);
          d = scratch.data();
        }
        select_row(d, labels, i0 + r, batch, o);
      }
    });
  }
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
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor hp = at::empty({batch}, f32);
  at::Tensor hn = at::empty({batch}, f32);
  at::Tensor sel_idx = at::empty({3, batch}, x.options().dtype(at::kLong));
  at::Tensor sel_d = at::empty({3, batch}, f32);
  if (batch == 0) return {hp, hn, sel_idx, sel_d};

  // The torch path's operand: x_hat = F.normalize(x) in the input dtype for cosine; fp32 for half inputs.
  at::Tensor xo = x.detach();
  if (metric == kCosine) xo = xo / xo.norm(2, {1}, true).clamp_min(kNormEps);
  if (dtype == at::kHalf || dtype == at::kBFloat16) xo = xo.to(at::kFloat);
  const at::Tensor sq = metric == kCosine ? at::Tensor() : xo.square().sum(1).contiguous();
  const at::Tensor labels64 = labels.reshape(-1).to(at::kLong).contiguous();

  const Outputs o{hp.mutable_data_ptr<float>(), hn.mutable_data_ptr<float>(), sel_idx.mutable_data_ptr<int64_t>(),
                  sel_d.mutable_data_ptr<float>()};
  if (xo.scalar_type() == at::kDouble) {
    mine_impl<double>(xo, sq, labels64, metric, o);
  } else {
    mine_impl<float>(xo, sq, labels64, metric, o);
  }
  return {hp, hn, sel_idx, sel_d};
}

}  // namespace

void register_triplet(pybind11::module_& m) {
  m.def("batch_hard_triplet_mine", &batch_hard_triplet_mine, pybind11::call_guard<pybind11::gil_scoped_release>(),
        R"doc(batch_hard_triplet_mine(x, labels, metric) -> (hp, hn, sel_idx, sel_d)

Batch-hard mining of embeddings x [B, D] with class labels [B]; metric 0 euclidean | 1 squared euclidean |
2 cosine. Returns what fastloss.ops.triplet.batch_hard_fwd returns: fp32 hp [B] (hardest positive distance, 0
without one), fp32 hn [B] (smallest negative distance, or sentence-transformers' smallest same-label distance plus
the row maximum where that is smaller or no negative exists), int64 sel_idx [3, B] (hardest positive or -1,
the negative or smallest same-label index, the row argmax or -1) and their fp32 distances sel_d [3, B].
Distances in fp64 for fp64 x, else fp32; ties go to the first index. Memory beyond the inputs: O(B*D) plus one
block of Gram rows of at most FASTLOSS_NATIVE_BLOCK_BYTES bytes (default 16 MiB; at least one row).)doc",
        pybind11::arg("x"), pybind11::arg("labels"), pybind11::arg("metric"));
}

}  // namespace fastloss
