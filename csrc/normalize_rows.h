// The triplet ops' cosine operand, shared by the CPU ops and the CUDA backward (ATen only, so nvcc can include it).
#pragma once
#include <ATen/ATen.h>

namespace fastloss {
constexpr double kNormEps = 1e-12;  // F.normalize's default

// As fastloss.ops.triplet._normalize: F.normalize(x, eps) in x's dtype (sentence-transformers' numbers), except zero
// rows of fp16 x: eps = 1e-12 rounds to 0 in fp16, so F.normalize gives 0 / 0 there; they give 0, as in every
// other dtype.
inline at::Tensor normalize_rows(const at::Tensor& x) {
  const at::Tensor norm = x.norm(2, {1}, true);
  const at::Tensor out = x / norm.clamp_min(kNormEps);
  return x.scalar_type() == at::kHalf ? at::where(norm == 0, at::zeros({}, out.options()), out) : out;
}
}  // namespace fastloss
