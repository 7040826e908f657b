// Batch-hard triplet backward on CUDA: dx through the (at most 3B) pairs that batch_hard_triplet_mine selected,
// the same sums as fastloss.ops.triplet.batch_hard_bwd's torch path and the CPU kernel in csrc/triplet.cpp.
//
// Pair e = k * B + r joins row r and column j = sel_idx[e] (-1: none) with c_e = grad_hp[r] (k = 0) or grad_hn[r]
// (k = 1, 2). Both rows of a pair get the same kind of term:
//   euclidean  dx_r += w_e (x_r - x_j), dx_j += w_e (x_j - x_r),  w_e = c_e / d_e   (0 where d_e = 0)
//   squared    the same with w_e = 2 c_e                                            (0 where d_e = 0)
//   cosine     dx^_r -= c_e x^_j, dx^_j -= c_e x^_r, then dx = (dx^ - x^ <x^, dx^>) / max(|x|, eps)
// Deterministic design: a stable sort of sel_idx groups the pairs by their column (in pair order), searchsorted
// gives each row's slice, and one thread block per output row gathers its own pairs and the pairs that selected it,
// threads over the D columns; no atomics, so the sum order is fixed. A column outside [0, B) in sel_idx is skipped like
// -1 (the CPU op raises on it; here that check would cost a host sync, and the mining never produces one). Sums in
// at::opmath_type (fp32 for fp16/bf16/fp32, fp64 for fp64). For cosine the block reduces <x, dx^> and |x|^2 and then
// writes dx; dx^ stays in shared memory when D of it fits in kCacheBytes (D <= 8192 fp32, 4096 fp64), else it is
// recomputed in a second pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/grad_mode.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "cuda/kernels.h"
#include "normalize_rows.h"
#include "cuda/reduce.cuh"

namespace fastloss {
namespace {

constexpr int kMaxThreads = 256;
// dx^ cached in dynamic shared memory up to this size: within the 48 KiB a block gets without opting in, with room
// for block_sum2's static arrays
constexpr int64_t kCacheBytes = 32 * 1024;
constexpr int kEuclidean = 0;
constexpr int kCosine = 2;
constexpr double kEps = kNormEps;  // F.normalize's default (normalize_rows.h)

template <typename acc_t>
struct Pairs {
  const int64_t* sel;      // [3B] selected column of each pair, -1 for none
  const int64_t* order;    // [3B] pair ids sorted by selected column (stable)
  const int64_t* offsets;  // [B + 1] row j's incoming pairs: order[offsets[j] .. offsets[j + 1])
  const acc_t* grad_hp;    // [B]
  const acc_t* grad_hn;    // [B]
  const acc_t* sel_d;      // [3B]
  int64_t batch;
  int metric;

  // the anchor row r of pair e = k * B + r (k < 3: two compares instead of a 64-bit division)
  __device__ __forceinline__ int64_t row_of(int64_t e) const {
    return e < batch ? e : (e < 2 * batch ? e - batch : e - 2 * batch);
  }

  __device__ __forceinline__ acc_t weight(int64_t e) const {
    const acc_t c = e < batch ? grad_hp[e] : grad_hn[row_of(e)];
    if (metric == kCosine) return sel[e] == row_of(e) ? acc_t(0) : c;  // d_ii: 6.3's fixed 0, no gradient
    const acc_t d = sel_d[e];
    if (!(d > acc_t(0))) return acc_t(0);
    return metric == kEuclidean ? c / d : acc_t(2) * c;
  }
};

// Column `col` of row i's dx^ (cosine) or dx (euclidean / squared): its own pairs, then the pairs that selected it.
template <typename operand_t, typename acc_t>
__device__ __forceinline__ acc_t gather_column(const operand_t* __restrict__ xo, const Pairs<acc_t>& p, int64_t i,
                                               int64_t dim, int64_t col) {
  const bool cosine = p.metric == kCosine;
  const acc_t x_i = cosine ? acc_t(0) : static_cast<acc_t>(xo[i * dim + col]);
  acc_t acc = 0;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const int64_t e = k * p.batch + i;
    const int64_t j = p.sel[e];
    if (j < 0 || j >= p.batch) continue;  // none (-1); out of range is skipped too: checking it would cost a sync
    const acc_t x_j = static_cast<acc_t>(xo[j * dim + col]);
    const acc_t w = p.weight(e);
    acc += cosine ? -w * x_j : w * (x_i - x_j);
  }
  for (int64_t q = p.offsets[i]; q < p.offsets[i + 1]; ++q) {
    const int64_t e = p.order[q];
    const acc_t x_r = static_cast<acc_t>(xo[p.row_of(e) * dim + col]);
    const acc_t w = p.weight(e);
    acc += cosine ? -w * x_r : w * (x_i - x_r);
  }
  return acc;
}

// The block-wide sums of a and b, returned to every thread (blockDim.x a multiple of 32, at most 1024).
template <typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b) {
  __shared__ T s_a[kWarp], s_b[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    s_a[warp] = a;
    s_b[warp] = b;
  }
  __syncthreads();
  a = lane < warps ? s_a[lane] : T(0);
  b = lane < warps ? s_b[lane] : T(0);
  a = warp_sum(a);
  b = warp_sum(b);
}

// xo: x itself (euclidean, squared) or x^ in acc_t (cosine: normalize_rows, fp32 for half x)
template <typename scalar_t, typename operand_t>
__global__ void batch_hard_bwd_kernel(const scalar_t* __restrict__ x, const operand_t* __restrict__ xo,
                                      Pairs<at::opmath_type<scalar_t>> pairs, scalar_t* __restrict__ dx, int64_t dim,
                                      bool cache) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* s_dxh = reinterpret_cast<acc_t*>(smem);
  const int64_t i = blockIdx.x;
  scalar_t* p_dx = dx + i * dim;
  if (pairs.metric != kCosine) {
    for (int64_t col = threadIdx.x; col < dim; col += blockDim.x)
      p_dx[col] = static_cast<scalar_t>(gather_column(xo, pairs, i, dim, col));
    return;
  }
  const scalar_t* p_x = x + i * dim;
  acc_t b_ss = 0, b_dot = 0;  // |x_i|^2 and <x_i, dx^_i>
  for (int64_t col = threadIdx.x; col < dim; col += blockDim.x) {
    const acc_t g = gather_column(xo, pairs, i, dim, col);
    const acc_t v = static_cast<acc_t>(p_x[col]);
    if (cache) s_dxh[col] = g;
    b_ss += v * v;
    b_dot += v * g;
  }
  block_sum2(b_ss, b_dot);
  const acc_t norm = sqrt(b_ss);
  const acc_t denom = max(norm, static_cast<acc_t>(kEps));
  const acc_t projection = norm > static_cast<acc_t>(kEps) ? b_dot / denom : acc_t(0);  // <x^, dx^>
  for (int64_t col = threadIdx.x; col < dim; col += blockDim.x) {
    const acc_t g = cache ? s_dxh[col] : gather_column(xo, pairs, i, dim, col);
    const acc_t x_hat = static_cast<acc_t>(p_x[col]) / denom;
    p_dx[col] = static_cast<scalar_t>((g - x_hat * projection) / denom);
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "batch_hard_triplet_bwd_cuda: ", name,
              " must be a CUDA tensor on x's device (", x.device(), "), got ", t.device());
}

}  // namespace

at::Tensor batch_hard_triplet_bwd_cuda(const at::Tensor& grad_hp, const at::Tensor& grad_hn, const at::Tensor& x_in,
                                       const at::Tensor& sel_idx, const at::Tensor& sel_d, int64_t metric) {
  TORCH_CHECK(x_in.is_cuda(), "batch_hard_triplet_bwd_cuda: x must be a CUDA tensor, got ", x_in.device());
  check_cuda(grad_hp, x_in, "grad_hp");
  check_cuda(grad_hn, x_in, "grad_hn");
  check_cuda(sel_idx, x_in, "sel_idx");
  check_cuda(sel_d, x_in, "sel_d");
  TORCH_CHECK(x_in.dim() == 2, "batch_hard_triplet_bwd_cuda: x must be 2-D [B, D], got shape ", x_in.sizes());
  TORCH_CHECK(metric >= 0 && metric <= 2,
              "batch_hard_triplet_bwd_cuda: metric must be 0 (euclidean), 1 (squared euclidean) or 2 (cosine), got ",
              metric);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "batch_hard_triplet_bwd_cuda: x must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t batch = x_in.size(0), dim = x_in.size(1);
  TORCH_CHECK(grad_hp.numel() == batch && grad_hn.numel() == batch,
              "batch_hard_triplet_bwd_cuda: grad_hp and grad_hn must hold ", batch, " values, got shapes ",
              grad_hp.sizes(), " and ", grad_hn.sizes());
  TORCH_CHECK(sel_idx.dim() == 2 && sel_idx.size(0) == 3 && sel_idx.size(1) == batch &&
                  sel_idx.scalar_type() == at::kLong,
              "batch_hard_triplet_bwd_cuda: sel_idx must be int64 [3, ", batch, "], got ", sel_idx.scalar_type(), " ",
              sel_idx.sizes());
  TORCH_CHECK(sel_d.dim() == 2 && sel_d.size(0) == 3 && sel_d.size(1) == batch &&
                  at::isFloatingType(sel_d.scalar_type()),
              "batch_hard_triplet_bwd_cuda: sel_d must be a floating [3, ", batch, "] tensor, got ",
              sel_d.scalar_type(), " ", sel_d.sizes());
  TORCH_CHECK(batch < (int64_t{1} << 31), "batch_hard_triplet_bwd_cuda: B must be below 2^31, got ", batch);

  const c10::cuda::CUDAGuard guard(x_in.device());
  at::NoGradGuard no_grad;
  const at::Tensor x = x_in.detach().contiguous();
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx.zero_();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;

  // The pairs grouped by column: stable, so each row's incoming pairs keep their pair order (a fixed sum order).
  const at::Tensor sel = sel_idx.reshape(-1).contiguous();
  const auto sorted = at::sort(sel, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor order = std::get<1>(sorted).contiguous();
  const at::Tensor offsets = at::searchsorted(std::get<0>(sorted), at::arange(batch + 1, sel.options())).contiguous();
  // The operand, as the torch path: x^ = F.normalize(x) for cosine, in acc_t (normalize_rows: fp32 for half x).
  const at::Tensor xo = metric == kCosine ? normalize_rows(x).to(acc_type).contiguous() : x;
  const at::Tensor ghp = grad_hp.reshape(-1).to(acc_type).contiguous();
  const at::Tensor ghn = grad_hn.reshape(-1).to(acc_type).contiguous();
  const at::Tensor d = sel_d.reshape(-1).to(acc_type).contiguous();

  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (dim + kWarp - 1) / kWarp * kWarp));
  const int64_t acc_bytes = dim * static_cast<int64_t>(acc_type == at::kDouble ? sizeof(double) : sizeof(float));
  const bool cache = metric == kCosine && acc_bytes <= kCacheBytes;
  const size_t smem = cache ? static_cast<size_t>(acc_bytes) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "batch_hard_triplet_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Pairs<acc_t> pairs{sel.const_data_ptr<int64_t>(),
                             order.const_data_ptr<int64_t>(),
                             offsets.const_data_ptr<int64_t>(),
                             ghp.const_data_ptr<acc_t>(),
                             ghn.const_data_ptr<acc_t>(),
                             d.const_data_ptr<acc_t>(),
                             batch,
                             static_cast<int>(metric)};
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (metric == kCosine) {
      batch_hard_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(batch), threads, smem, stream>>>(
          x.const_data_ptr<scalar_t>(), xo.const_data_ptr<acc_t>(), pairs, dx.mutable_data_ptr<scalar_t>(), dim,
          cache);
    } else {
      batch_hard_bwd_kernel<scalar_t, scalar_t><<<static_cast<unsigned>(batch), threads, smem, stream>>>(
          x.const_data_ptr<scalar_t>(), xo.const_data_ptr<scalar_t>(), pairs, dx.mutable_data_ptr<scalar_t>(), dim,
          cache);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace fastloss
