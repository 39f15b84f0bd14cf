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

}  // namespace aq::kernels
