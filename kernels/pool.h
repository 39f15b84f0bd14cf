// Max pooling with window-local indices (docs/design.md §4).  LibTorch's
// max pool saves an int64 flat index per output; a compressed model keeps
// each output's position inside its window instead (kh kW + kw, one byte
// for windows of up to 256), and these kernels produce and consume that
// index directly: no int64 tensor in the forward, no conversion back in the
// backward.
//
// CUDA only: elsewhere the library runs LibTorch's max pool and converts
// its indices.
#pragma once

#include "dispatch.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace aq::kernels {

struct Pool2d {
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
};

// Over the last two dims of a 4-d tensor: y as max_pool2d_with_indices
// computes it (the first largest value in window order, a NaN winning), and
// each output's window-local index in local (byte).  y and local are
// allocated by the caller, in one layout (NCHW or channels last), x in any.
// Floating types.
using MaxPool2dLocalFn = void(const at::Tensor& x, const Pool2d& p, at::Tensor& y, at::Tensor& local);
inline Kernel<MaxPool2dLocalFn> max_pool2d_local{"max_pool2d_local"};

// The backward: writes gx (allocated, any layout) from gy and local (any
// layouts): the sum, in the accumulation type and LibTorch's order, of the
// gradients of the windows whose index points at each element.
using MaxPool2dLocalBackwardFn = void(const at::Tensor& gy, const at::Tensor& local, const Pool2d& p,
                                      at::Tensor& gx);
inline Kernel<MaxPool2dLocalBackwardFn> max_pool2d_local_backward{"max_pool2d_local_backward"};

}  // namespace aq::kernels
