// Host entry points of the CUDA kernels (ATen only, so that nvcc never parses pybind11).
#pragma once
#include <ATen/core/Tensor.h>

namespace fastloss {
at::Tensor l2norm_fwd_cuda(const at::Tensor& x, double eps);
at::Tensor l2norm_bwd_cuda(const at::Tensor& x, const at::Tensor& dy, double eps);
at::Tensor batch_hard_triplet_bwd_cuda(const at::Tensor& grad_hp, const at::Tensor& grad_hn, const at::Tensor& x,
                                       const at::Tensor& sel_idx, const at::Tensor& sel_d, int64_t metric);
}  // namespace fastloss
