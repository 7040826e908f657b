// Device helpers shared by the CUDA kernels (included by .cu files only).
#pragma once

namespace fastloss {

constexpr int kWarp = 32;

// The sum of v over the 32 lanes of a warp, returned to every lane.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o_lane = kWarp / 2; o_lane > 0; o_lane /= 2) v += __shfl_xor_sync(0xffffffffu, v, o_lane);
  return v;
}

}  // namespace fastloss
