// Shared declarations of the fastloss._C extension: each op file defines one register_* function; the CPU ops share
// the row-block budget, F.normalize's eps and the SIMD dispatch below, the triplet ops their distance rows.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "normalize_rows.h"  // kNormEps, normalize_rows

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

// log(1 + e^x), exact at both ends (x = -inf gives 0; a tiny e^x keeps its digits): MNRL's confident rows, CoSENT's
// well-ranked batches.
template <typename T>
T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

// The bits of a value as another type of the same size (std::bit_cast before C++20; GCC folds it to a register move).
template <typename To, typename From>
[[gnu::always_inline]] inline To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}

// The signed integer type of a floating-point type's bits.
template <typename T>
using BitsOf = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// All ones where x > 0 (not NaN; +inf included), else 0, decided on the bits of x: a loop that selects with it has no
// floating-point compare, which GCC (-ftrapping-math) if-converts for AVX-512's mask registers but not for AVX2, so
// such a loop's AVX2 clone would run one lane at a time (the triplet ops' hinge and coefficient passes until
// 2026-11-30; tests/test_native.py::test_hot_loops_vectorise).
template <typename T>
[[gnu::always_inline]] inline BitsOf<T> positive_mask(T x) {
  using B = BitsOf<T>;
  const B b = bits_as<B>(x);
  return -static_cast<B>((b > 0) & (b <= bits_as<B>(std::numeric_limits<T>::infinity())));
}

// x rounded to bf16, as its bits: to nearest even exactly as c10::BFloat16 does (NaN -> 0x7fc0), on the integer bits
// so that a loop of it has no floating-point select (cosent's narrowed gradients, the MNRL op's bf16 weights).
[[gnu::always_inline]] inline uint16_t bf16_bits(float x) {
  const uint32_t u = bits_as<uint32_t>(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

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
// Triplet distances (the metric codes of fastloss.ops.triplet), shared by the batch-hard and streamed ops.
constexpr int64_t kEuclidean = 0;
constexpr int64_t kSquaredEuclidean = 1;
constexpr int64_t kCosine = 2;

// A squared distance t_ij <= kNearFraction (|x_i|^2 + |x_j|^2) from the Gram row is recomputed as |x_i - x_j|^2: the
// Gram formula's rounding, ~eps (|x_i|^2 + |x_j|^2), is all of a duplicate's distance (fastloss.ops.triplet's
// NEAR_FRACTION is the same number).
constexpr double kNearFraction = 1.0 / 4096;

// Whether a pair whose Gram-formula squared distance is t (squared norms sq_i, sq_j; near = kNearFraction in T) is
// near, i.e. recomputed from the rows' difference. NaN is not near.
template <typename T>
[[gnu::always_inline]] inline bool is_near(T t, T sq_i, T sq_j, T near) {
  return t <= near * (sq_j + sq_i);
}

// Rows of distances in place of their Gram rows g (`rows` rows of n entries, the first row's own index `first`), in
// the torch path's order of operations and rounding: cosine max(1 - g, 0), or max(1 - (g r_i) r_j, 0) where g holds
// the products of rows scaled by powers of two and sq their inverse norms r (cosine_gram_rows; sq is nullptr where g
// holds unit rows' products), with d_ii = 0 (sentence-transformers 6.3's cosine_distance); else
// t = max((|x_j|^2 - 2 g_j) + |x_i|^2, 0) with t_ii = 0, and t_ij = |x_i - x_j|^2 where t_ij is near (is_near; x: the
// contiguous [n, dim] operand rows); euclidean then takes sqrt(t) by at::sqrt, as torch does
// (MKL's vector sqrt is not correctly rounded, so std::sqrt would differ in the last bit). The near pairs are
// recomputed in groups of kRefineRows rows per chunk of 64 columns, so that each x_j read serves the group's rows: a
// collapsed batch (every pair near) streamed all of x through the cache once per row.
constexpr int64_t kRefineRows = 8;
template <typename T>
[[gnu::always_inline]] inline void distance_rows(T* g, const T* sq, const T* x, int64_t dim, int64_t first,
                                                 int64_t rows, int64_t n, int64_t metric) {
  if (metric == kCosine) {
    for (int64_t r = 0; r < rows; ++r) {
      T* gr = g + r * n;
      if (sq == nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const T d = T(1) - gr[j];
          gr[j] = d < T(0) ? T(0) : d;  // NaN stays NaN, as clamp_min
        }
      } else {
        const T r_i = sq[first + r];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const T d = T(1) - (gr[j] * r_i) * sq[j];
          gr[j] = d < T(0) ? T(0) : d;
        }
      }
      gr[first + r] = T(0);
    }
    return;
  }
  const T near = static_cast<T>(kNearFraction);
  constexpr int64_t kChunk = 64;  // a vectorised any-of per chunk: a row with one duplicate scans n lanes, not scalars
  for (int64_t r0 = 0; r0 < rows; r0 += kRefineRows) {
    const int64_t group = std::min(kRefineRows, rows - r0);
    int group_near = 0;
    for (int64_t r = r0; r < r0 + group; ++r) {
      T* gr = g + r * n;
      const int64_t own = first + r;
      const T sq_i = sq[own];
      int any_near = 0;
#pragma omp simd reduction(| : any_near)
      for (int64_t j = 0; j < n; ++j) {
        const T t = (sq[j] - T(2) * gr[j]) + sq_i;
        gr[j] = t < T(0) ? T(0) : t;  // NaN stays NaN, as clamp_min
        any_near |= is_near(t, sq_i, sq[j], near) & (j != own);
      }
      gr[own] = T(0);
      group_near |= any_near;
    }
    if (!group_near) continue;
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t c1 = std::min(n, c0 + kChunk);
      uint64_t hits[kRefineRows] = {};  // bit j - c0: entry (r0 + k, j) is near
      uint64_t any = 0;
      for (int64_t k = 0; k < group; ++k) {
        const T* gr = g + (r0 + k) * n;
        const int64_t own = first + r0 + k;
        const T sq_i = sq[own];
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t j = c0; j < c1; ++j) hit |= is_near(gr[j], sq_i, sq[j], near) & (j != own);
        if (!hit) continue;
        for (int64_t j = c0; j < c1; ++j)
          if (j != own && is_near(gr[j], sq_i, sq[j], near)) hits[k] |= uint64_t(1) << (j - c0);
        any |= hits[k];
      }
      if (!any) continue;
      for (int64_t j = c0; j < c1; ++j) {
        const T* xj = x + j * dim;
        for (int64_t k = 0; k < group; ++k) {
          if (!((hits[k] >> (j - c0)) & 1)) continue;
          const T* xi = x + (first + r0 + k) * dim;
          T sum = T(0);
#pragma omp simd reduction(+ : sum)
          for (int64_t d = 0; d < dim; ++d) sum += (xi[d] - xj[d]) * (xi[d] - xj[d]);
          g[(r0 + k) * n + j] = sum;
        }
      }
    }
  }
}

// SIMD clones, triplet.cpp
void distance_rows_f32(float* g, const float* sq, const float* x, int64_t dim, int64_t first, int64_t rows, int64_t n,
                       int64_t metric);

inline void dist_rows(float* g, const float* sq, const float* x, int64_t dim, int64_t first, int64_t rows, int64_t n,
                      int64_t metric) {
  distance_rows_f32(g, sq, x, dim, first, rows, n, metric);
}
inline void dist_rows(double* g, const double* sq, const double* x, int64_t dim, int64_t first, int64_t rows,
                      int64_t n, int64_t metric) {
  distance_rows<double>(g, sq, x, dim, first, rows, n, metric);
}

// The first j with d_j == best among the kept columns (labels == nullptr: every column; else those whose label is
// `label` (same) or is not (!same), but skip), n if none: in chunks of 64 columns, each with one vectorised any-of,
// then a scan of the chunk that holds it. The triplet ops' first-index searches (batch-hard mining's extremes,
// semi-hard's chosen negative), which one lane at a time were the mining pass's largest cost after its extremes.
template <typename T>
[[gnu::always_inline]] inline int64_t first_match(const T* d, const int64_t* labels, int64_t n, T best, int64_t label,
                                                  bool same, int64_t skip) {
  constexpr int64_t kChunk = 64;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    int hit = 0;
    if (labels == nullptr) {
#pragma omp simd reduction(| : hit)
      for (int64_t j = c0; j < c1; ++j) hit |= d[j] == best;
    } else {
#pragma omp simd reduction(| : hit)
      for (int64_t j = c0; j < c1; ++j) hit |= (d[j] == best) & ((labels[j] == label) == same) & (j != skip);
    }
    if (!hit) continue;
    for (int64_t j = c0; j < c1; ++j)
      if (d[j] == best && (labels == nullptr || ((labels[j] == label) == same && j != skip))) return j;
  }
  return n;
}

// SIMD clones, triplet.cpp
int64_t first_match_f32(const float* d, const int64_t* labels, int64_t n, float best, int64_t label, bool same,
                        int64_t skip);

inline int64_t find_first(const float* d, const int64_t* labels, int64_t n, float best, int64_t label, bool same,
                          int64_t skip) {
  return first_match_f32(d, labels, n, best, label, same, skip);
}
inline int64_t find_first(const double* d, const int64_t* labels, int64_t n, double best, int64_t label, bool same,
                          int64_t skip) {
  return first_match<double>(d, labels, n, best, label, same, skip);
}
}  // namespace fastloss
