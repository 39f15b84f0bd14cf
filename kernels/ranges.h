// range_sq: each sample's ||R_n||^2, the sum over its groups of their
// squared ranges, which the adaptive allocation weighs samples by
// (docs/design.md §5).
#pragma once

#include "dispatch.h"

#include <ATen/core/Tensor.h>

namespace aq::kernels {

// Per sample of x ([N*D] contiguous in memory order, fp32/fp16/bf16/fp64),
// the sum over its groups of G elements of (max - min)^2 in float, NaN
// propagating; out float [N].  Both backends; they sum in different orders,
// so their values may differ in the last bits.
using RangeSqFn = void(const at::Tensor& x, int64_t N, int64_t D, int64_t G, at::Tensor& out);
inline Kernel<RangeSqFn> range_sq{"range_sq"};

// The terms of range_sq before the sum: (max - min)^2 of each group, float
// [N, ceil(D / G)], NaN propagating.  CUDA only, and only where
// group_range_sq_takes(x's dtype, G).
using GroupRangeSqFn = void(const at::Tensor& x, int64_t N, int64_t D, int64_t G, at::Tensor& out);
inline Kernel<GroupRangeSqFn> group_range_sq{"group_range_sq"};
inline bool group_range_sq_takes(at::ScalarType dtype, int64_t G) {
  return dtype != at::kDouble && G >= 32 && (G & (G - 1)) == 0;
}

}  // namespace aq::kernels
