// Row-wise L2 normalisation with F.normalize(x, p=2, dim=1, eps) semantics, forward and backward.
// One warp per row; sums in at::opmath_type (fp32 for fp16/bf16/fp32, fp64 for fp64). Only c10/cuda headers:
// ATen/cuda/CUDAContext.h needs the cuSPARSE/cuBLAS headers, which a minimal toolkit lacks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#include "cuda/reduce.cuh"

namespace fastloss {
namespace {

constexpr int kRowsPerBlock = 8;

// y = x / max(|x|, eps)
template <typename scalar_t>
__global__ void l2norm_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t rows,
                                  int64_t dim, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const scalar_t* p_x = x + row * dim;
  scalar_t* p_y = y + row * dim;
  acc_t b_ss = 0;
  for (int64_t k = threadIdx.x; k < dim; k += kWarp) {
    const acc_t v = static_cast<acc_t>(p_x[k]);
    b_ss += v * v;
  }
  const acc_t denom = max(sqrt(warp_sum(b_ss)), static_cast<acc_t>(eps));
  for (int64_t k = threadIdx.x; k < dim; k += kWarp) p_y[k] = static_cast<scalar_t>(static_cast<acc_t>(p_x[k]) / denom);
}

// dx = (dy - y <y, dy>) / |x| where |x| >= eps, else dy / eps (clamp_min passes no gradient to the norm there).
// dy in x's dtype or in acc_t (an fp32 gradient for a half x is not rounded to x's dtype first); dx in x's dtype.
template <typename scalar_t, typename grad_t>
__global__ void l2norm_bwd_kernel(const scalar_t* __restrict__ x, const grad_t* __restrict__ dy,
                                  scalar_t* __restrict__ dx, int64_t rows, int64_t dim, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const scalar_t* p_x = x + row * dim;
  const grad_t* p_dy = dy + row * dim;
  scalar_t* p_dx = dx + row * dim;
  acc_t b_ss = 0, b_dot = 0;
  for (int64_t k = threadIdx.x; k < dim; k += kWarp) {
    const acc_t v = static_cast<acc_t>(p_x[k]);
    b_ss += v * v;
    b_dot += v * static_cast<acc_t>(p_dy[k]);
  }
  const acc_t norm = sqrt(warp_sum(b_ss));
  b_dot = warp_sum(b_dot);
  if (norm < static_cast<acc_t>(eps)) {
    for (int64_t k = threadIdx.x; k < dim; k += kWarp)
      p_dx[k] = static_cast<scalar_t>(static_cast<acc_t>(p_dy[k]) / static_cast<acc_t>(eps));
    return;
  }
  const acc_t projection = b_dot / (norm * norm);  // <y, dy> / |x|
  for (int64_t k = threadIdx.x; k < dim; k += kWarp) {
    const acc_t v = static_cast<acc_t>(p_x[k]);
    p_dx[k] = static_cast<scalar_t>((static_cast<acc_t>(p_dy[k]) - v * projection) / norm);
  }
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "l2norm: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, "l2norm: ", name, " must be 2-D [rows, dim], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kDouble,
              "l2norm: ", name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

dim3 grid_for(int64_t rows) { return dim3(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock)); }

}  // namespace

at::Tensor l2norm_fwd_cuda(const at::Tensor& x_in, double eps) {
  check_input(x_in, "x");
  TORCH_CHECK(eps > 0.0, "l2norm_fwd: eps must be > 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t rows = x.size(0), dim = x.size(1);
  if (rows == 0 || dim == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2norm_fwd", [&] {
    l2norm_fwd_kernel<scalar_t><<<grid_for(rows), dim3(kWarp, kRowsPerBlock), 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(x.const_data_ptr<scalar_t>(),
                                                                      y.mutable_data_ptr<scalar_t>(), rows, dim, eps);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor l2norm_bwd_cuda(const at::Tensor& x_in, const at::Tensor& dy_in, double eps) {
  check_input(x_in, "x");
  check_input(dy_in, "dy");
  const at::ScalarType acc_type = at::toOpMathType(x_in.scalar_type());
  TORCH_CHECK(x_in.sizes() == dy_in.sizes() && x_in.device() == dy_in.device(),
              "l2norm_bwd: dy must match x in shape and device");
  TORCH_CHECK(dy_in.scalar_type() == x_in.scalar_type() || dy_in.scalar_type() == acc_type,
              "l2norm_bwd: dy must be in x's dtype or in ", acc_type, " (x is ", x_in.scalar_type(), "), got ",
              dy_in.scalar_type());
  TORCH_CHECK(eps > 0.0, "l2norm_bwd: eps must be > 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t rows = x.size(0), dim = x.size(1);
  if (rows == 0 || dim == 0) return dx;
  const dim3 grid = grid_for(rows), block(kWarp, kRowsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (dy.scalar_type() == x.scalar_type()) {
      l2norm_bwd_kernel<scalar_t, scalar_t><<<grid, block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), rows, dim, eps);
    } else {
      l2norm_bwd_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), dy.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), rows, dim, eps);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace fastloss
