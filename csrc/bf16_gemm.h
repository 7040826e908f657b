// bf16 x bf16 -> fp32 GEMMs for the CPU MNRL and triplet ops, on CPUs whose bf16 matrix units (AMX-BF16) multiply
// bf16 several times faster than fp32. torch's x86-64 Linux builds carry MKL, whose cblas_gemm_bf16bf16f32 takes bf16
// operands and accumulates into fp32 (torch's own mm on bf16 rounds its result to bf16, and its out_dtype is
// CUDA-only). Where torch has no such MKL, or the CPU no AMX-BF16, the ops keep fp32 GEMMs.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

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

// The triplet ops' cosine Gram for bf16 rows where bf16 GEMMs run: the raw rows' products (exact in fp32) scaled by
// the inverse norms r returned here, 1 - (g_ij r_i) r_j, which differs from the fp32 unit rows' 1 - <x^_i, x^_j>
// (sentence-transformers' distances of half inputs, normalize_rows) by fp32 rounding only. Zero rows get r = 0 (x^ = 0,
// as F.normalize). Undefined, so the unit rows' fp32 GEMM runs instead, where bf16 GEMMs do not run or some nonzero
// norm lies outside [2^-60, 2^60] (products of such rows could leave fp32's normal range; NaN and inf too).
inline at::Tensor cosine_inverse_norms(const at::Tensor& x) {
  if (x.scalar_type() != at::kBFloat16 || x.size(0) == 0 || !bf16_gemm_enabled()) return {};
  const at::Tensor norm = at::linalg_vector_norm(x, 2, {1}, false, at::kFloat);
  const at::Tensor zero = (x != 0).any(1).logical_not();  // not norm == 0: a tiny row's squares underflow to 0
  const at::Tensor checked = norm.masked_fill(zero, 1.0f);
  const double lo = checked.min().item<double>(), hi = checked.max().item<double>();
  if (!(lo >= 0x1p-60 && hi <= 0x1p60)) return {};
  return at::where(zero, at::zeros({}, norm.options()), norm.reciprocal()).contiguous();
}

}  // namespace fastloss
