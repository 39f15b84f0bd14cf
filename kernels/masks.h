// ReLU-style masks without a bool tensor in between (docs/design.md §4):
// bit i = (x[i] > 0), in pack_bits's 1-bit layout.  x, g and out are flat
// (memory order).
#pragma once

#include "dispatch.h"

#include <ATen/core/Tensor.h>

namespace aq::kernels {

// packed (uint8, whole words) from x (floating or bool).  Both backends.
using PackPositiveFn = void(const at::Tensor& x, at::Tensor& packed);
inline Kernel<PackPositiveFn> pack_positive{"pack_positive"};

// pack_positive that also writes relu_out[i] = relu(x[i]) as LibTorch
// computes it, from the same read (relu_out flat, x's floating dtype, may be
// x itself).  With r2 too (group_size = 32 x 16 bytes' worth of elements,
// dividing x.numel(), x and relu_out 16-byte aligned) r2[k] = (max - min)^2
// of group k of relu_out, NaN if it holds one: the range pass's values.
// CUDA only: elsewhere the library runs LibTorch's relu, then pack_positive.
using ReluPackPositiveFn = void(const at::Tensor& x, at::Tensor& packed, at::Tensor& relu_out, int64_t group_size,
                                float* r2);
inline Kernel<ReluPackPositiveFn> relu_pack_positive{"relu_pack_positive"};

// out[i] = bit i ? g[i] * scale : 0 (scale == 1: g[i] unchanged), g
// floating; out may be g itself.  Both backends.
using ApplyMaskFn = void(const at::Tensor& g, const at::Tensor& packed, double scale, at::Tensor& out);
inline Kernel<ApplyMaskFn> apply_mask{"apply_mask"};

}  // namespace aq::kernels
