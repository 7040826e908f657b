// MKL's bf16 GEMM as torch carries it (bf16_gemm.h). The symbol is declared weak: an extension built against a
// torch without it (another BLAS, another platform) still loads, and sees a null pointer.
#include "bf16_gemm.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#define FASTLOSS_X86_CPUID 1
#endif

#if defined(__linux__) && defined(__GNUC__)
extern "C" {
// MKL's CBLAS (LP64: int dimensions), bf16 as its raw 16 bits
__attribute__((weak)) void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                                                  float alpha, const uint16_t* a, int lda, const uint16_t* b,
                                                  int ldb, float beta, float* c, int ldc);
}
#define FASTLOSS_WEAK_MKL 1
#endif

namespace fastloss {
namespace {
constexpr int kRowMajor = 101;  // CblasRowMajor
constexpr int kNoTrans = 111;   // CblasNoTrans
constexpr int kTrans = 112;     // CblasTrans
}  // namespace

bool bf16_gemm_linked() {
#ifdef FASTLOSS_WEAK_MKL
  return &cblas_gemm_bf16bf16f32 != nullptr;
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() {
#ifdef FASTLOSS_X86_CPUID
  unsigned a = 0, b = 0, c = 0, d = 0;
  // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return ((d >> 22) & 1u) && ((d >> 24) & 1u);
#else
  return false;
#endif
}

bool bf16_gemm_enabled() {
  const char* env = std::getenv("FASTLOSS_NATIVE_BF16_GEMM");
  const std::string value = env == nullptr ? "" : env;
  if (value.empty() || value == "auto") {
    static const bool automatic = bf16_gemm_linked() && cpu_has_amx_bf16();
    return automatic;
  }
  if (value == "0") return false;
  TORCH_CHECK(value == "1", "FASTLOSS_NATIVE_BF16_GEMM must be auto, 0 or 1, got '", value, "'");
  TORCH_CHECK(bf16_gemm_linked(),
              "FASTLOSS_NATIVE_BF16_GEMM=1, but this torch carries no MKL bf16 GEMM (cblas_gemm_bf16bf16f32); "
              "unset it to use fp32 GEMMs");
  return true;
}

void gemm_bf16_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const at::BFloat16* a, int64_t lda,
                   const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#ifdef FASTLOSS_WEAK_MKL
  TORCH_CHECK(bf16_gemm_linked(), "gemm_bf16_f32: MKL's bf16 GEMM is not linked");
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "gemm_bf16_f32: dimensions beyond MKL's 32-bit integers");
  if (m == 0 || n == 0) return;
  static_assert(sizeof(at::BFloat16) == sizeof(uint16_t), "bf16 is 16 bits");
  cblas_gemm_bf16bf16f32(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, static_cast<int>(m),
                         static_cast<int>(n), static_cast<int>(k), 1.0f, reinterpret_cast<const uint16_t*>(a),
                         static_cast<int>(lda), reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), beta, c,
                         static_cast<int>(ldc));
#else
  TORCH_CHECK(false, "gemm_bf16_f32: MKL's bf16 GEMM is not available on this platform");
#endif
}

}  // namespace fastloss
