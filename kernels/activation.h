// Elementwise ops that work out the group ranges of what they write on the
// way, for the allocation of the layer that compresses it next
// (docs/design.md §4): GELU with its derivative, and a residual stream's
// sum.
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

// z = x + y as LibTorch adds them (x and z fp32; y fp32, fp16 or bf16, read
// as float), and r2[k] = (max - min)^2 of group k of z, NaN if it holds one.
// x, y and z contiguous, of one size, a multiple of group_size; on CUDA
// 16-byte aligned, and group_size a multiple of kAddChunk.
constexpr int64_t kAddChunk = 128;
using AddAndRangesFn = void(const at::Tensor& x, const at::Tensor& y, at::Tensor& z, int64_t group_size, float* r2);
inline Kernel<AddAndRangesFn> add_and_ranges{"add_and_ranges"};

}  // namespace aq::kernels
