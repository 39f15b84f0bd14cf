// quantize and dequantize: per-group quantization with stochastic rounding
// into a packed bit stream, and back (docs/design.md §2, §3).  Both
// backends; the CPU and CUDA kernels write the same bytes (arith.h).
//
// The front end (libaq/src/compress.cpp) checks arguments and allocates the
// outputs; a kernel only computes.
#pragma once

#include "arith.h"
#include "dispatch.h"

#include <ATen/core/Tensor.h>

namespace aq::kernels {

// Tensors: x [N*D] (fp32/fp16/bf16, memory order), packed uint8 (whole words),
// mn/mx fp32 or bf16 [N*ngroups] or [1] when !pergroup, sample_bits int32 [N]
// and word_offset int64 [N] when plan.bits == 0, all on x's device.  When
// !pergroup, global_range holds the tensor's fp32 {min, max}; the kernel
// stores them rounded into mn/mx.
using QuantizeFn = void(const Plan& plan, const at::Tensor& x, const at::Tensor& sample_bits,
                        const at::Tensor& word_offset, const at::Tensor& global_range, at::Tensor& packed,
                        at::Tensor& mn, at::Tensor& mx);
inline Kernel<QuantizeFn> quantize{"quantize"};

// The inverse: writes out ([N*D] in memory order, fp32/fp16/bf16) from
// packed, mn, mx, sample_bits and word_offset as quantize left them.
using DequantizeFn = void(const Plan& plan, const at::Tensor& packed, const at::Tensor& mn, const at::Tensor& mx,
                          const at::Tensor& sample_bits, const at::Tensor& word_offset, at::Tensor& out);
inline Kernel<DequantizeFn> dequantize{"dequantize"};

// out = g * the restored tensor (g and out [N*D] in the packed tensor's
// memory order and dtype; each restored value rounded to that dtype before
// the product, as multiplying the two tensors would), and group_sq (float
// [N*ngroups]) each group's sum of out^2: an elementwise backward and its
// gradient's per-sample norms from one pass.  Per-group ranges only.  CUDA
// only: elsewhere the library dequantizes and multiplies.
using DequantizeMulFn = void(const Plan& plan, const at::Tensor& packed, const at::Tensor& mn, const at::Tensor& mx,
                             const at::Tensor& sample_bits, const at::Tensor& word_offset, const at::Tensor& g,
                             at::Tensor& out, at::Tensor& group_sq);
inline Kernel<DequantizeMulFn> dequantize_mul{"dequantize_mul"};

}  // namespace aq::kernels
