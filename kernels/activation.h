// gelu_and_derivative: GELU and its derivative from one read of the input,
// with the group ranges of both on the way (docs/design.md §4).
#pragma once

#include "dispatch.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace aq::kernels {

// The input's elements per 16-byte vector and the elements a warp reads at a
// time: x.numel() must be a multiple of that, x, y and d contiguous, 16-byte
// aligned and of one dtype (fp32, fp16 or bf16).
constexpr int64_t activation_chunk(int64_t element_size) { return 32 * (16 / element_size); }

// y = gelu(x, tanh ? "tanh" : "none") as LibTorch computes it, and d =
// gelu_backward(1, x) (its derivative), written from one read of x.  With
// r2_y and r2_d (group_size a multiple of the chunk and dividing x.numel()),
// r2_y[k] and r2_d[k] = (max - min)^2 of group k of y and of d, NaN if it
// holds one: the range pass's values.  CUDA only: elsewhere the library runs
// LibTorch's gelu and gelu_backward.
using GeluAndDerivativeFn = void(const at::Tensor& x, bool tanh, at::Tensor& y, at::Tensor& d, int64_t group_size,
                                 float* r2_y, float* r2_d);
inline Kernel<GeluAndDerivativeFn> gelu_and_derivative{"gelu_and_derivative"};

}  // namespace aq::kernels
