// Helpers several CUDA kernel files share.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace aq::kernels {

// Blocks of `threads` threads for a grid-stride loop over `work` items: one
// item per thread, but no more than 32 blocks per multiprocessor (the loop
// takes the rest).
inline int grid_for(int64_t work, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, sms * 32)));
}

// The input types of the compression kernels: fp32, fp16, bf16.
#define AQ_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// A group held by a whole warp, each lane with its part's min, max and
// whether it saw a NaN: the group's (max - min)^2 on every lane, NaN if any
// lane saw one, as the range pass's sticky min/max give it (min and max are
// exact in any order, so the shuffles' order does not matter).  The passes
// that offer group ranges on their way (ReLU, BatchNorm statistics) use it,
// so that their values are the range pass's.
__device__ __forceinline__ float warp_group_range_sq(float lo, float hi, bool nan) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  nan = __any_sync(0xffffffffu, nan);
  const float d = nan ? __int_as_float(0x7fffffff) : __fsub_rn(hi, lo);
  return __fmul_rn(d, d);
}

}  // namespace aq::kernels
