// Shared declarations of the fastloss._C extension: each op file defines one register_* function; the CPU ops share
// the row-block budget, F.normalize's eps and the SIMD dispatch below.
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__)  // target_clones resolves through ifunc
#define FASTLOSS_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLOSS_SIMD_CLONES
#endif

namespace fastloss {
void register_mnrl(pybind11::module_& m);
void register_triplet(pybind11::module_& m);
void register_triplet_streamed(pybind11::module_& m);
void register_cosent(pybind11::module_& m);
#ifdef FASTLOSS_WITH_CUDA
void register_cuda(pybind11::module_& m);
#endif

constexpr double kNormEps = 1e-12;                         // F.normalize's default
constexpr int64_t kDefaultBlockBytes = int64_t{16} << 20;  // MNRL: m = 512 rows at N = 8192, GEMMs still efficient

// The CPU ops' row-block budget in bytes: FASTLOSS_NATIVE_BLOCK_BYTES, else kDefaultBlockBytes.
inline int64_t block_bytes() {
  const char* env = std::getenv("FASTLOSS_NATIVE_BLOCK_BYTES");
  if (env == nullptr || *env == '\0') return kDefaultBlockBytes;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && value > 0,
              "FASTLOSS_NATIVE_BLOCK_BYTES must be a positive integer (bytes), got '", env, "'");
  return static_cast<int64_t>(value);
}
}  // namespace fastloss
