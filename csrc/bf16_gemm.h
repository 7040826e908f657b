// bf16 x bf16 -> fp32 GEMMs for the CPU MNRL and triplet ops, on CPUs whose bf16 matrix units (AMX-BF16) multiply
// bf16 several times faster than fp32. torch's x86-64 Linux builds carry MKL, whose cblas_gemm_bf16bf16f32 takes bf16
// operands and accumulates into fp32 (torch's own mm on bf16 rounds its result to bf16, and its out_dtype is
// CUDA-only). Where torch has no such MKL, or the CPU no AMX-BF16, the ops keep fp32 GEMMs.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "normalize_rows.h"  // kNormEps

namespace fastloss {

// Whether bf16 inputs take bf16 GEMMs now: FASTLOSS_NATIVE_BF16_GEMM = auto (default: where MKL's bf16 GEMM is
// linked and the CPU has AMX-BF16) | 1 (wherever it is linked; an error where it is not) | 0 (fp32 GEMMs).
bool bf16_gemm_enabled();

// Whether MKL's bf16 GEMM is linked, and whether the CPU has AMX-BF16 (build_info reports both).
bool bf16_gemm_linked();
bool cpu_has_amx_bf16();

// c = op(a) op(b) + beta * c on row-major matrices: c [m, n] fp32 with row stride ldc, op(a) [m, k], op(b) [k, n];
// trans_a: a is stored [k, m] (row stride lda), else [m, k]; the same for b.
void gemm_bf16_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const at::BFloat16* a, int64_t lda,
                   const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc);

// out [m, n] = a b^T, the raw products of rows a [m, D] and candidates b [n, D] (rows of unit stride): fp32 results
// of bf16 operands in MKL's bf16 GEMM, else at::mm in the accumulation dtype.
inline void products(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != at::kBFloat16) {
    at::mm_out(out, a, b.t());
    return;
  }
  gemm_bf16_f32(false, true, a.size(0), b.size(0), a.size(1), a.const_data_ptr<at::BFloat16>(), a.stride(0),
                b.const_data_ptr<at::BFloat16>(), b.stride(0), 0.0f, out.mutable_data_ptr<float>(), out.stride(0));
}

// The GEMMs' operand for rows (in the input dtype) whose copy in the accumulation type is xo: the rows themselves
// where they are bf16 and bf16 GEMMs run (products), else xo.
inline at::Tensor gemm_operand(const at::Tensor& rows, const at::Tensor& xo) {
  return rows.scalar_type() == at::kBFloat16 && bf16_gemm_enabled() ? rows.contiguous() : xo;
}

// The triplet ops' cosine Gram for bf16 rows where bf16 GEMMs run, as fastloss.ops.triplet._cosine_operand for the
// Triton kernel: rows, each scaled by the power of two 2^-e that brings its norm into [0.5, 1) (exact, in two steps
// that each stay in the normal range: bf16 shares fp32's exponent range, so products of tiny or huge rows could leave
// it), and inverse norms r = 2^e / max(|x|, eps), so that 1 - (g_ij r_i) r_j of the rows' products g (exact in fp32)
// differs from the fp32 unit rows' 1 - <x^_i, x^_j> (sentence-transformers' distances of half inputs,
// normalize_rows) by fp32 rounding only. A row whose fp32 norm is 0 or inf becomes a zero row with r = 0 (distance 1
// to every row: x / eps ~ 0, x / inf = 0). Both undefined where bf16 GEMMs do not run (the unit rows' fp32 GEMM runs
// instead). One pass over x in a parallel loop: as ATen ops (norm, frexp, two scalings) it made the mining at B = 256
// slower than the fp32 path's.
struct CosineRows {
  at::Tensor rows;  // [B, D] bf16, contiguous
  at::Tensor inv;   // [B] fp32
};
inline CosineRows cosine_gram_rows(const at::Tensor& x_in) {
  if (x_in.scalar_type() != at::kBFloat16 || !bf16_gemm_enabled()) return {};
  const at::Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0), dim = x.size(1);
  at::Tensor rows = at::empty_like(x);
  at::Tensor inv = at::empty({batch}, x.options().dtype(at::kFloat));
  const at::BFloat16* src = x.const_data_ptr<at::BFloat16>();
  at::BFloat16* dst = rows.mutable_data_ptr<at::BFloat16>();
  float* r = inv.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const at::BFloat16* xi = src + i * dim;
      at::BFloat16* yi = dst + i * dim;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t d = 0; d < dim; ++d) squares += static_cast<float>(xi[d]) * static_cast<float>(xi[d]);
      const float norm = std::sqrt(squares);
      if (!(norm > 0.0f && std::isfinite(norm))) {
        std::fill(yi, yi + dim, at::BFloat16(0.0f));
        r[i] = 0.0f;
        continue;
      }
      int e = 0;
      std::frexp(norm, &e);  // norm in [2^(e-1), 2^e)
      const int half = e >= 0 ? e / 2 : -((-e + 1) / 2);  // floor(e / 2)
      const float s1 = std::ldexp(1.0f, -half), s2 = std::ldexp(1.0f, half - e);
      for (int64_t d = 0; d < dim; ++d) yi[d] = at::BFloat16((static_cast<float>(xi[d]) * s1) * s2);
      r[i] = std::ldexp(std::ldexp(1.0f / std::max(norm, static_cast<float>(kNormEps)), half), e - half);
    }
  });
  return {rows, inv};
}

}  // namespace fastloss
