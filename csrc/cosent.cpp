// CoSENT / AnglE on CPU: fastloss.ops.cosent's contract (see its module docstring for the maths) in three passes.
//
// 1. Pair statistics, in parallel over anchors: for anchor i and each of its repeats r (pair p = r * A + i) one fused
//    loop over the row halves gives <a, b>, AnglE's <a2, b1> - <a1, b2>, |a|^2 and |b|^2; each row is read once.
// 2. Ranking: a stable sort of the labels (radix, on order-preserving keys), then with s_k = scale * sim in sorted order
//      R_m = LSE_{j >= m}(-s_j),  Q_m = LSE_{j < m}(s_j),  t_k = s_k + R_{hi_k},  loss = LSE(0, t)
//      dloss/ds_k = exp(t_k - loss) - exp(Q_{lo_k} - s_k - loss)
//    The scans run in fp64 for every input dtype, with exp / log written branch-free so that they vectorise (a
//    libm call each would make this serial step a tenth of the op at N = 8192): fp64 keeps the N-term sums and the
//    difference of the two shares in dloss/ds exact to far below the fp32 outputs, and costs little more here.
// 3. Backward, in parallel over anchors: da of an anchor is summed over its repeats in an fp32 (fp64) row owned by
//    one thread, so no atomics; db of each pair is written once.
// Accumulation in fp32 for fp16 / bf16 / fp32 inputs (half rows are widened into per-thread buffers, with F16C where
// the CPU has it), fp64 for fp64. Memory beyond inputs and outputs: O(N) for the ranking, O(threads * D) row buffers.
#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fastloss.h"

namespace fastloss {
namespace {

constexpr int64_t kDot = 0;
constexpr int64_t kCos = 1;
constexpr int64_t kAngle = 2;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

template <typename T>
struct PairSums {
  T dot;  // <a, b> (+ <a2, b1> - <a1, b2> for AnglE)
  T aa;   // |a|^2
  T bb;   // |b|^2
};

template <typename T>
[[gnu::always_inline]] inline PairSums<T> plain_sums(const T* a, const T* b, int64_t dim) {
  T dot = 0, aa = 0, bb = 0;
#pragma omp simd reduction(+ : dot, aa, bb)
  for (int64_t j = 0; j < dim; ++j) {
    dot += a[j] * b[j];
    aa += a[j] * a[j];
    bb += b[j] * b[j];
  }
  return {dot, aa, bb};
}

// Halves x = (x1, x2) of `half` = ceil(D / 2) columns; x2 has `rest` = D - half columns (its zero padding adds
// nothing). <a1, b1> + <a2, b2> + <a2, b1> - <a1, b2> = <a1, b1 - b2> + <a2, b2 + b1> in one loop, the norms in a
// second over the rows (then in L1): one loop with all three reductions ran at half this speed (GCC keeps its
// reduction lanes in memory there).
template <typename T>
[[gnu::always_inline]] inline PairSums<T> angle_sums(const T* a, const T* b, int64_t half, int64_t rest) {
  const T* a2 = a + half;
  const T* b2 = b + half;
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < rest; ++j) dot += a[j] * (b[j] - b2[j]) + a2[j] * (b2[j] + b[j]);
  if (half > rest) dot += a[half - 1] * b[half - 1];  // odd D: the last column of x1 meets the padding of x2
  const int64_t dim = half + rest;
  T aa = 0, bb = 0;
#pragma omp simd reduction(+ : aa, bb)
  for (int64_t j = 0; j < dim; ++j) {
    aa += a[j] * a[j];
    bb += b[j] * b[j];
  }
  return {dot, aa, bb};
}

// da += c_ab * u(b) - c_aa * a,  db = c_ab * v(a) - c_bb * b  with u(b) = b, v(a) = a (cosine; dot: c_aa = c_bb = 0).
template <typename T>
[[gnu::always_inline]] inline void plain_grad(const T* a, const T* b, T* da, T* db, int64_t dim, T c_ab, T c_aa,
                                              T c_bb) {
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) {
    const T x = a[j], y = b[j];
    da[j] += c_ab * y - c_aa * x;
    db[j] = c_ab * x - c_bb * y;
  }
}

// AnglE's d z / d a_hat = u(b) = (b1 - b2, b2 + b1) and d z / d b_hat = v(a) = (a1 + a2, a2 - a1), over |b|, |a|.
template <typename T>
[[gnu::always_inline]] inline void angle_grad(const T* a, const T* b, T* da, T* db, int64_t half, int64_t rest,
                                              T c_ab, T c_aa, T c_bb) {
#pragma omp simd
  for (int64_t j = 0; j < rest; ++j) {
    const T x1 = a[j], x2 = a[j + half], y1 = b[j], y2 = b[j + half];
    da[j] += c_ab * (y1 - y2) - c_aa * x1;
    da[j + half] += c_ab * (y2 + y1) - c_aa * x2;
    db[j] = c_ab * (x1 + x2) - c_bb * y1;
    db[j + half] = c_ab * (x2 - x1) - c_bb * y2;
  }
  if (half > rest) {
    const int64_t j = half - 1;
    da[j] += c_ab * b[j] - c_aa * a[j];
    db[j] = c_ab * a[j] - c_bb * b[j];
  }
}

// The fp32 loops compiled per x86 vector extension (always_inline above: a clone vectorises what it inlines).
FASTLOSS_SIMD_CLONES PairSums<float> plain_sums_f32(const float* a, const float* b, int64_t dim) {
  return plain_sums<float>(a, b, dim);
}
FASTLOSS_SIMD_CLONES PairSums<float> angle_sums_f32(const float* a, const float* b, int64_t half, int64_t rest) {
  return angle_sums<float>(a, b, half, rest);
}
FASTLOSS_SIMD_CLONES void plain_grad_f32(const float* a, const float* b, float* da, float* db, int64_t dim,
                                         float c_ab, float c_aa, float c_bb) {
  plain_grad<float>(a, b, da, db, dim, c_ab, c_aa, c_bb);
}
FASTLOSS_SIMD_CLONES void angle_grad_f32(const float* a, const float* b, float* da, float* db, int64_t half,
                                         int64_t rest, float c_ab, float c_aa, float c_bb) {
  angle_grad<float>(a, b, da, db, half, rest, c_ab, c_aa, c_bb);
}

template <typename T>
PairSums<T> pair_sums(const T* a, const T* b, int64_t dim, int64_t kind) {
  const int64_t half = (dim + 1) / 2;
  if constexpr (std::is_same_v<T, float>) {
    return kind == kAngle ? angle_sums_f32(a, b, half, dim - half) : plain_sums_f32(a, b, dim);
  } else {
    return kind == kAngle ? angle_sums<T>(a, b, half, dim - half) : plain_sums<T>(a, b, dim);
  }
}

template <typename T>
void pair_grad(const T* a, const T* b, T* da, T* db, int64_t dim, int64_t kind, T c_ab, T c_aa, T c_bb) {
  const int64_t half = (dim + 1) / 2;
  if constexpr (std::is_same_v<T, float>) {
    if (kind == kAngle) {
      angle_grad_f32(a, b, da, db, half, dim - half, c_ab, c_aa, c_bb);
    } else {
      plain_grad_f32(a, b, da, db, dim, c_ab, c_aa, c_bb);
    }
  } else if (kind == kAngle) {
    angle_grad<T>(a, b, da, db, half, dim - half, c_ab, c_aa, c_bb);
  } else {
    plain_grad<T>(a, b, da, db, dim, c_ab, c_aa, c_bb);
  }
}

// fp16 <-> fp32 rows: c10::Half converts one element at a time in software (this extension is built without -mf16c),
// which made fp16 ~6x slower than bf16 (whose widening is a shift); F16C converts 8 lanes per instruction, both ways
// rounding to nearest even as c10::Half does.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx,f16c"))) void widen_f16c(const at::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}
__attribute__((target("avx,f16c"))) void narrow_f16c(const float* src, at::Half* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; j < n; ++j) dst[j] = static_cast<at::Half>(src[j]);
}
const bool kHasF16c = (__builtin_cpu_init(), __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c"));
#else
constexpr bool kHasF16c = false;
void widen_f16c(const at::Half*, float*, int64_t) {}
void narrow_f16c(const float*, at::Half*, int64_t) {}
#endif

// bf16 <-> fp32 rows in vectorised loops: the widening is a shift, the narrowing bf16_bits (fastloss.h).
FASTLOSS_SIMD_CLONES void widen_bf16(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = bits_as<float>(static_cast<uint32_t>(bits[j]) << 16);
}
FASTLOSS_SIMD_CLONES void narrow_bf16(const float* src, at::BFloat16* dst, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) bits[j] = bf16_bits(src[j]);
}

// A row of the input in the accumulation type T: the row itself when the types agree, else widened into buf.
template <typename S, typename T>
const T* row_as(const S* row, int64_t dim, T* buf) {
  if constexpr (std::is_same_v<S, T>) {
    return row;
  } else {
    if constexpr (std::is_same_v<S, at::Half> && std::is_same_v<T, float>) {
      if (kHasF16c) {
        widen_f16c(row, buf, dim);
        return buf;
      }
    } else if constexpr (std::is_same_v<S, at::BFloat16> && std::is_same_v<T, float>) {
      widen_bf16(row, buf, dim);
      return buf;
    }
    for (int64_t j = 0; j < dim; ++j) buf[j] = static_cast<T>(row[j]);
    return buf;
  }
}

// A row of the accumulation type T stored in the output type S.
template <typename T, typename S>
void store_row(const T* row, S* out, int64_t dim) {
  if constexpr (std::is_same_v<S, at::Half> && std::is_same_v<T, float>) {
    if (kHasF16c) {
      narrow_f16c(row, out, dim);
      return;
    }
  } else if constexpr (std::is_same_v<S, at::BFloat16> && std::is_same_v<T, float>) {
    narrow_bf16(row, out, dim);
    return;
  }
  for (int64_t j = 0; j < dim; ++j) out[j] = static_cast<S>(row[j]);
}

// An order-preserving unsigned key of a label: x < y <=> key(x) < key(y), and equal labels get equal keys (-0.0 and
// 0.0 included, as torch.sort and searchsorted compare them). Floating labels go through double (exact for every
// floating dtype): the sign bit set for x >= 0, all bits flipped for x < 0. Integers: the sign bit flipped.
template <typename scalar_t>
uint64_t label_key(scalar_t value) {
  if constexpr (std::is_same_v<scalar_t, bool>) {
    return value ? 1 : 0;
  } else if constexpr (std::is_integral_v<scalar_t>) {
    return static_cast<uint64_t>(static_cast<int64_t>(value)) ^ (uint64_t{1} << 63);
  } else {
    double x = static_cast<double>(value);
    if (x == 0.0) x = 0.0;
    const uint64_t bits = bits_as<uint64_t>(x);
    return (bits >> 63) ? ~bits : bits | (uint64_t{1} << 63);
  }
}

// The stable label sort: order[k] is the pair at sorted position k, starts[k] marks the first of a label group.
// An LSD radix sort of the keys, one byte per pass (each pass a stable counting sort, so ties keep the pair order),
// skipping the bytes that every key shares: a few passes of O(N) instead of a comparison sort's N log N branches.
void sort_labels(const at::Tensor& labels, std::vector<int64_t>& order, std::vector<uint8_t>& starts) {
  const int64_t n = labels.numel();
  std::vector<uint64_t> keys(n), keys_tmp(n);
  std::vector<int64_t> order_tmp(n);
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, labels.scalar_type(), "cosent_sort_labels", [&] {
    const scalar_t* y = labels.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) keys[i] = label_key<scalar_t>(y[i]);
  });
  std::vector<std::array<int64_t, 256>> counts(8);
  for (auto& c : counts) c.fill(0);
  for (const uint64_t key : keys)
    for (int byte = 0; byte < 8; ++byte) ++counts[byte][(key >> (8 * byte)) & 0xff];
  order.resize(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  for (int byte = 0; byte < 8; ++byte) {
    auto& count = counts[byte];
    if (std::any_of(count.begin(), count.end(), [n](int64_t c) { return c == n; })) continue;
    int64_t offset = 0;
    for (auto& c : count) offset += std::exchange(c, offset);  // counts -> first output slot per digit
    for (int64_t i = 0; i < n; ++i) {
      const int64_t slot = count[(keys[i] >> (8 * byte)) & 0xff]++;
      keys_tmp[slot] = keys[i];
      order_tmp[slot] = order[i];
    }
    keys.swap(keys_tmp);
    order.swap(order_tmp);
  }
  starts.resize(n);
  for (int64_t k = 0; k < n; ++k) starts[k] = k == 0 || keys[k - 1] != keys[k];
}

// exp(x) for x <= 0 (-inf included) in fp64, written so that loops of it vectorise (no floating-point compare or
// select, which GCC will not if-convert under -ftrapping-math): Cody-Waite reduction x = n ln2 + r (fdlibm's split
// of ln2, n ln2_hi exact), |r| <= ln2 / 2, the Taylor series of exp(r) to degree 13 (truncation below 5e-18), 2^n
// built in the exponent bits from the low bits of x log2(e) + 1.5 * 2^52. Below -708 (and at -inf) the garbage of
// that construction is masked to 0, decided on the bits of x: subnormal shares are far below any output's rounding.
[[gnu::always_inline]] inline double exp_nonpositive(double x) {
  constexpr double kLog2e = 1.4426950408889634;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52: adding and subtracting it rounds to an integer
  constexpr int64_t kMinBits = static_cast<int64_t>(0xc086200000000000ull);  // the bits of -708.0
  const int64_t xb = bits_as<int64_t>(x);
  const uint64_t keep = -static_cast<uint64_t>(xb >= 0 || xb <= kMinBits);
  const double k = x * kLog2e + kShift;
  const double n = k - kShift;
  const double r = (x - n * kLn2Hi) - n * kLn2Lo;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const double two_n = bits_as<double>((bits_as<uint64_t>(k) + 1023) << 52);
  return bits_as<double>(bits_as<uint64_t>(p * two_n) & keep);
}
// log(x) for normal x > 0, vectorisable like exp_nonpositive: x = 2^e m with m in [sqrt(1/2), sqrt(2)) (decided on
// the bits of m), log(m) = 2 atanh(u) with u = (m - 1) / (m + 1), |u| <= 0.172, by its series to u^21 (truncation
// below 1e-18).
[[gnu::always_inline]] inline double log_positive(double x) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01;
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr int64_t kSqrt2Bits = 0x3ff6a09e667f3bcd;  // the bits of sqrt(2)
  const uint64_t bits = bits_as<uint64_t>(x);
  const int64_t m_bits = static_cast<int64_t>((bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull);
  const uint64_t big = -static_cast<uint64_t>(m_bits > kSqrt2Bits);
  const double m = bits_as<double>(static_cast<uint64_t>(m_bits) - (big & (uint64_t{1} << 52)));
  const double e = bits_as<double>((bits >> 52) | 0x4330000000000000ull) - (4503599627370496.0 + 1023.0) +
                   bits_as<double>(bits_as<uint64_t>(1.0) & big);
  const double u = (m - 1.0) / (m + 1.0);
  const double u2 = u * u;
  double p = 1.0 / 21.0;
  p = p * u2 + 1.0 / 19.0;
  p = p * u2 + 1.0 / 17.0;
  p = p * u2 + 1.0 / 15.0;
  p = p * u2 + 1.0 / 13.0;
  p = p * u2 + 1.0 / 11.0;
  p = p * u2 + 1.0 / 9.0;
  p = p * u2 + 1.0 / 7.0;
  p = p * u2 + 1.0 / 5.0;
  p = p * u2 + 1.0 / 3.0;
  p = p * u2 + 1.0;
  return e * kLn2Hi + (e * kLn2Lo + 2.0 * u * p);
}
// Inclusive LSE scan: out[j] = log(sum_{i <= j} exp(x[i])) for finite x. With the prefix maximum M_j the running
// sum S_j = sum_{i <= j} exp(x_i - M_j) >= 1 obeys S_j = S_{j-1} exp(M_{j-1} - M_j) + exp(x_j - M_j): the exps
// and logs vectorise, only that linear recurrence is serial, and no term is taken relative to a later maximum
// (which could underflow the whole sum at large scales).
FASTLOSS_SIMD_CLONES void lse_scan(const double* x, double* out, double* carry, double* term, int64_t n) {
  double running = kNegInf;
  for (int64_t j = 0; j < n; ++j) {
    running = std::max(running, x[j]);
    out[j] = running;  // M_j
  }
  carry[0] = 0.0;
#pragma omp simd
  for (int64_t j = 1; j < n; ++j) carry[j] = exp_nonpositive(out[j - 1] - out[j]);  // exp(M_{j-1} - M_j)
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) term[j] = exp_nonpositive(x[j] - out[j]);  // exp(x_j - M_j)
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    sum = sum * carry[j] + term[j];
    carry[j] = sum;  // S_j
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] += log_positive(carry[j]);
}

// t_k = s_k + R_{hi_k} and the loss LSE(0, t) = softplus(LSE(t)): the max of t first, then one vectorised pass of
// exps. Not log(1 + sum) directly: in a well-ranked batch the sum is far below 1's ulp, and softplus keeps its digits.
FASTLOSS_SIMD_CLONES double loss_of(const double* s, const double* r_hi, double* t, int64_t n) {
  double t_max = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : t_max)
  for (int64_t k = 0; k < n; ++k) {
    t[k] = s[k] + r_hi[k];
    t_max = t[k] > t_max ? t[k] : t_max;
  }
  if (t_max == -std::numeric_limits<double>::infinity()) return 0.0;  // no pair ranks below another
  double total = 0.0;
#pragma omp simd reduction(+ : total)
  for (int64_t k = 0; k < n; ++k) total += exp_nonpositive(t[k] - t_max);
  return softplus(t_max + std::log(total));
}

// dloss/ds_k = exp(t_k - loss) - exp(Q_{lo_k} - s_k - loss): the share of the partition where pair k is the lower
// one minus the share where it is the higher one; both arguments are <= 0.
FASTLOSS_SIMD_CLONES void shares(const double* t, const double* q_lo, const double* s, double loss, double* out,
                                 int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = exp_nonpositive(t[k] - loss) - exp_nonpositive(q_lo[k] - s[k] - loss);
}

// Pass 2: loss, dloss/ds per pair (scattered back to pair order into g) and gsim = sum_p dloss/ds_p * sim_p.
template <typename T>
std::tuple<double, double> rank(const T* z, T* g, const at::Tensor& labels, double scale, int64_t kind) {
  const int64_t n = labels.numel();
  std::vector<int64_t> order;
  std::vector<uint8_t> starts;
  sort_labels(labels, order, starts);
  std::vector<double> sim(n), s(n), neg_rev(n);
  for (int64_t k = 0; k < n; ++k) {
    const double v = static_cast<double>(z[order[k]]);
    sim[k] = kind == kAngle ? std::abs(v) : v;
    s[k] = scale * sim[k];
    neg_rev[n - 1 - k] = -s[k];
  }
  // P_m = LSE_{j <= m}(s_j) (so Q_m = P_{m-1}) and R_m = LSE_{j >= m}(-s_j), through the reversed -s
  std::vector<double> prefix(n), suffix_rev(n), scratch(n), scratch2(n);
  lse_scan(s.data(), prefix.data(), scratch.data(), scratch2.data(), n);
  lse_scan(neg_rev.data(), suffix_rev.data(), scratch.data(), scratch2.data(), n);
  // per sorted position: R at the first position of the next label group, Q at the first of its own group
  std::vector<double> r_hi(n), q_lo(n);
  int64_t lo = 0;
  for (int64_t k = 0; k < n; ++k) {
    if (starts[k]) lo = k;
    q_lo[k] = lo > 0 ? prefix[lo - 1] : kNegInf;
  }
  double r_next = kNegInf;  // R_n
  for (int64_t k = n - 1; k >= 0; --k) {
    r_hi[k] = r_next;
    if (starts[k]) r_next = suffix_rev[n - 1 - k];  // R_k, the next group's value for the positions before k
  }
  std::vector<double>& t = neg_rev;  // reused
  const double loss = loss_of(s.data(), r_hi.data(), t.data(), n);
  std::vector<double>& gs = scratch;  // dloss/ds in sorted order
  shares(t.data(), q_lo.data(), s.data(), loss, gs.data(), n);
  double gsim = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    g[order[k]] = static_cast<T>(gs[k]);
    gsim += gs[k] * sim[k];
  }
  return {loss, gsim};
}

void check_embeddings(const char* fn, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), fn, ": a and b must be CPU tensors");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, fn, ": a and b must be 2-D [A, D] and [N, D], got shapes ", a.sizes(),
              " and ", b.sizes());
  const auto dtype = a.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, fn,
              ": a must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(b.scalar_type() == dtype, fn, ": b must have the dtype of a (", dtype, "), got ", b.scalar_type());
  TORCH_CHECK(b.size(1) == a.size(1), fn, ": b must have the embedding dimension of a (", a.size(1), "), got ",
              b.size(1));
  TORCH_CHECK(a.size(0) > 0 ? b.size(0) % a.size(0) == 0 : b.size(0) == 0, fn,
              ": the pair count of b (", b.size(0), ") must be a multiple of the anchor count of a (", a.size(0), ")");
}

void check_kind(const char* fn, int64_t kind) {
  TORCH_CHECK(kind == kDot || kind == kCos || kind == kAngle, fn,
              ": kind must be 0 (dot), 1 (cos) or 2 (angle), got ", kind);
}

double scalar_of(const char* fn, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.numel() == 1 && at::isFloatingType(x.scalar_type()), fn, ": ", name,
              " must be a 1-element floating tensor, got shape ", x.sizes(), " dtype ", x.scalar_type());
  return x.to(at::kCPU).to(at::kDouble).item<double>();
}

at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Pass 1 and 2 for input rows of type S, accumulated in T.
template <typename S, typename T>
void forward_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& labels, double scale, int64_t kind,
                  at::Tensor& aux, at::Tensor& loss, at::Tensor& gsim) {
  const int64_t n_anchor = a.size(0), n_pairs = b.size(0), dim = a.size(1);
  const int64_t n_rep = n_anchor > 0 ? n_pairs / n_anchor : 0;
  const S* pa = a.const_data_ptr<S>();
  const S* pb = b.const_data_ptr<S>();
  T* z = aux.mutable_data_ptr<T>();
  T* na = z + n_pairs;
  T* nb = z + 2 * n_pairs;
  T* g = z + 3 * n_pairs;
  const T eps = static_cast<T>(kNormEps);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dim * n_rep));
  at::parallel_for(0, n_anchor, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> a_buf(std::is_same_v<S, T> ? 0 : dim), b_buf(std::is_same_v<S, T> ? 0 : dim);
    for (int64_t i = begin; i < end; ++i) {
      const T* a_row = row_as<S, T>(pa + i * dim, dim, a_buf.data());
      for (int64_t rep = 0; rep < n_rep; ++rep) {
        const int64_t p = rep * n_anchor + i;
        const T* b_row = row_as<S, T>(pb + p * dim, dim, b_buf.data());
        const PairSums<T> sums = pair_sums<T>(a_row, b_row, dim, kind);
        if (kind == kDot) {
          z[p] = sums.dot;
          na[p] = nb[p] = T(1);
        } else {
          na[p] = std::sqrt(sums.aa);
          nb[p] = std::sqrt(sums.bb);
          z[p] = sums.dot / (std::max(na[p], eps) * std::max(nb[p], eps));
        }
      }
    }
  });
  const auto [value, gs] = rank<T>(z, g, labels, scale, kind);
  loss.fill_(value);
  gsim.fill_(gs);
}

// Pass 3: (da, db) for input rows of type S, accumulated in T.
template <typename S, typename T>
void backward_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& aux, double coef, int64_t kind,
                   at::Tensor& da, at::Tensor& db) {
  const int64_t n_anchor = a.size(0), n_pairs = b.size(0), dim = a.size(1);
  const int64_t n_rep = n_pairs / n_anchor;
  const S* pa = a.const_data_ptr<S>();
  const S* pb = b.const_data_ptr<S>();
  S* pda = da.mutable_data_ptr<S>();
  S* pdb = db.mutable_data_ptr<S>();
  const T* z = aux.const_data_ptr<T>();
  const T* na = z + n_pairs;
  const T* nb = z + 2 * n_pairs;
  const T* g = z + 3 * n_pairs;
  const T eps = static_cast<T>(kNormEps);
  constexpr bool kSame = std::is_same_v<S, T>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dim * n_rep));
  at::parallel_for(0, n_anchor, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> a_buf(kSame ? 0 : dim), b_buf(kSame ? 0 : dim), da_buf(kSame ? 0 : dim), db_buf(kSame ? 0 : dim);
    for (int64_t i = begin; i < end; ++i) {
      const T* a_row = row_as<S, T>(pa + i * dim, dim, a_buf.data());
      T* da_row;
      if constexpr (kSame) {
        da_row = pda + i * dim;
      } else {
        da_row = da_buf.data();
      }
      std::fill(da_row, da_row + dim, T(0));
      for (int64_t rep = 0; rep < n_rep; ++rep) {
        const int64_t p = rep * n_anchor + i;
        const T* b_row = row_as<S, T>(pb + p * dim, dim, b_buf.data());
        T* db_row;
        if constexpr (kSame) {
          db_row = pdb + p * dim;
        } else {
          db_row = db_buf.data();
        }
        // G = grad * scale * dloss/ds * dsim/dz; the normalisation's chain rule gives the c's (see ops/cosent.py)
        T big_g = static_cast<T>(coef) * g[p];
        if (kind == kAngle) big_g = z[p] > T(0) ? big_g : (z[p] < T(0) ? -big_g : T(0));
        T c_ab = big_g, c_aa = 0, c_bb = 0;
        if (kind != kDot) {
          const T ia = T(1) / std::max(na[p], eps), ib = T(1) / std::max(nb[p], eps);
          c_ab = big_g * ia * ib;
          c_aa = na[p] >= eps ? big_g * ia * (z[p] * ia) : T(0);
          c_bb = nb[p] >= eps ? big_g * ib * (z[p] * ib) : T(0);
        }
        pair_grad<T>(a_row, b_row, da_row, db_row, dim, kind, c_ab, c_aa, c_bb);
        if constexpr (!kSame) {
          store_row<T, S>(db_row, pdb + p * dim, dim);
        }
      }
      if constexpr (!kSame) {
        store_row<T, S>(da_row, pda + i * dim, dim);
      }
    }
  });
}

template <typename F>
void dispatch_input(at::ScalarType dtype, F&& fn) {
  switch (dtype) {
    case at::kDouble:
      fn(double{}, double{});
      break;
    case at::kFloat:
      fn(float{}, float{});
      break;
    case at::kHalf:
      fn(at::Half{}, float{});
      break;
    case at::kBFloat16:
      fn(at::BFloat16{}, float{});
      break;
    default:
      TORCH_CHECK(false, "cosent: unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosent_fwd(const at::Tensor& a, const at::Tensor& b,
                                                          const at::Tensor& labels, const at::Tensor& scale,
                                                          int64_t kind) {
  check_embeddings("cosent_fwd", a, b);
  check_kind("cosent_fwd", kind);
  TORCH_CHECK(labels.device().is_cpu(), "cosent_fwd: labels must be a CPU tensor");
  TORCH_CHECK(labels.numel() == b.size(0), "cosent_fwd: labels must hold one value per pair (", b.size(0),
              "), got shape ", labels.sizes());
  TORCH_CHECK(!at::isComplexType(labels.scalar_type()), "cosent_fwd: labels must be real, got ",
              labels.scalar_type());
  const double scale_value = scalar_of("cosent_fwd", "scale", scale);

  at::NoGradGuard no_grad;
  const auto acc = a.options().dtype(accumulation_type(a));
  at::Tensor aux = at::empty({4, b.size(0)}, acc);
  at::Tensor loss = at::zeros({}, acc);
  at::Tensor gsim = at::zeros({}, acc);
  if (b.size(0) == 0) return {loss, aux, gsim};
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor labels_flat = labels.reshape({-1}).contiguous();
  dispatch_input(ac.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    forward_impl<S, T>(ac, bc, labels_flat, scale_value, kind, aux, loss, gsim);
  });
  return {loss, aux, gsim};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosent_bwd(const at::Tensor& grad, const at::Tensor& a,
                                                          const at::Tensor& b, const at::Tensor& scale,
                                                          const at::Tensor& aux, const at::Tensor& gsim,
                                                          int64_t kind) {
  check_embeddings("cosent_bwd", a, b);
  check_kind("cosent_bwd", kind);
  const auto acc = accumulation_type(a);
  TORCH_CHECK(aux.device().is_cpu() && aux.dim() == 2 && aux.size(0) == 4 && aux.size(1) == b.size(0),
              "cosent_bwd: aux must be a CPU tensor [4, ", b.size(0), "], got shape ", aux.sizes());
  TORCH_CHECK(aux.scalar_type() == acc, "cosent_bwd: aux must be ", acc, " (cosent_fwd's output), got ",
              aux.scalar_type());
  const double grad_value = scalar_of("cosent_bwd", "grad", grad);
  const double scale_value = scalar_of("cosent_bwd", "scale", scale);
  const double gsim_value = scalar_of("cosent_bwd", "gsim", gsim);

  at::NoGradGuard no_grad;
  const at::Tensor dscale = at::full({}, grad_value * gsim_value, a.options().dtype(acc));
  if (b.size(0) == 0) return {at::zeros_like(a), at::empty_like(b), dscale};
  const at::Tensor ac = a.contiguous(), bc = b.contiguous(), auxc = aux.contiguous();
  at::Tensor da = at::empty_like(ac, at::MemoryFormat::Contiguous);
  at::Tensor db = at::empty_like(bc, at::MemoryFormat::Contiguous);
  dispatch_input(ac.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    backward_impl<S, T>(ac, bc, auxc, grad_value * scale_value, kind, da, db);
  });
  return {da, db, dscale};
}

}  // namespace

void register_cosent(pybind11::module_& m) {
  m.def("cosent_fwd", &cosent_fwd, pybind11::call_guard<pybind11::gil_scoped_release>(),
        R"doc(cosent_fwd(a, b, labels, scale, kind) -> (loss, aux, gsim)

CoSENT / AnglE forward over the pairs (a[p mod A], b[p]) of anchors a [A, D] and b [N, D] (N a multiple of A),
labels [N] (bool, integer or floating; ties are not compared), scale a 1-element tensor, kind 0 dot | 1 cos |
2 angle (fastloss.ops.cosent.KINDS). Returns loss (0-d) = log(1 + sum_{y_i < y_j} exp(s_i - s_j)), aux [4, N]
(z, |a|, |b| and dloss/ds per pair; |a| = |b| = 1 for dot) and gsim (0-d) = sum_p dloss/ds_p * sim_p: fp64 for fp64
inputs, else fp32 (fp32 accumulation; the ranking scans run in fp64 for every dtype). O(N) memory beyond the
inputs and outputs, plus one row buffer per thread for half inputs.)doc",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("labels"), pybind11::arg("scale"), pybind11::arg("kind"));
  m.def("cosent_bwd", &cosent_bwd, pybind11::call_guard<pybind11::gil_scoped_release>(),
        R"doc(cosent_bwd(grad, a, b, scale, aux, gsim, kind) -> (da, db, dscale)

CoSENT / AnglE backward for the incoming scalar grad, from cosent_fwd's aux and gsim: da [A, D] (summed over the
repeats of each anchor) and db [N, D] in the dtype of a, and dscale = grad * gsim (0-d, fp64 for fp64 inputs,
else fp32). Parallel over anchors; accumulation in fp32 (fp64 for fp64); one row buffer per thread for half
inputs.)doc",
        pybind11::arg("grad"), pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("scale"), pybind11::arg("aux"),
        pybind11::arg("gsim"), pybind11::arg("kind"));
}

}  // namespace fastloss
