// The triplet ops' cosine operand, shared by the CPU ops and the CUDA backward (ATen only, so nvcc can include it).
#pragma once
#include <ATen/ATen.h>

namespace fastloss {
constexpr double kNormEps = 1e-12;  // F.normalize's default

// As fastloss.ops.triplet._normalize: F.normalize(x, eps) of x promoted to fp32 when it is fp16 / bf16 (fp64 stays
// fp64), as sentence-transformers' cos_sim promotes its inputs: the unit rows are never rounded to the input dtype.
inline at::Tensor normalize_rows(const at::Tensor& x) {
  const at::Tensor xf = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ? x.to(at::kFloat) : x;
  return xf / xf.norm(2, {1}, true).clamp_min(kNormEps);
}
}  // namespace fastloss
