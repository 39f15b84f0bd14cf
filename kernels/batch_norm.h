// BatchNorm's training-mode elementwise passes written in place, and its
// statistics with channels innermost (docs/design.md §4).  The forward of a
// BatchNorm whose input has no other reader writes its output over the
// input once the compressed copy is taken; the backward of a compressed
// BatchNorm restores its input into a tensor of its own, read for the last
// time by the elementwise pass, which therefore writes the input gradient in
// its place.  Each saves a tensor of the input's size at BatchNorm's peak.
//
// CUDA only: elsewhere the library runs LibTorch's BatchNorm kernels, out of
// place.
#pragma once

#include "dispatch.h"

#include <ATen/core/Tensor.h>

namespace aq::kernels {

// The input gradient written over x (the restored input, dy's shape and
// dtype; a tensor of its own), as LibTorch's batch_norm_backward_elemt
// computes it: x = (dy - mean_dy - (x - mean) k1) k2 per channel (dim 1),
// with mean_dy = sum_dy / count, k1 = invstd^2 sum_dy_xmu / count and k2 =
// weight invstd (invstd without a weight).  The per-channel tensors are
// [C]; sum_dy and sum_dy_xmu are the sums of dy and dy (x - mean) over all
// but dim 1.  A flat vectorised kernel where x and dy are both NCHW- or both
// channels-last-dense, any layouts otherwise; fp32, fp16 or bf16.  With
// sample_sq (may be null), where the flat channels-innermost kernel runs
// (channels last, or no spatial dims) and N <= 65535, *sample_sq becomes
// float [N]: each sample's sum of the squares of the gradient written,
// summed in a fixed order; elsewhere it is left undefined.
using BatchNormInputGradInplaceFn = void(at::Tensor& x, const at::Tensor& dy, const at::Tensor& mean,
                                         const at::Tensor& invstd, const at::Tensor& weight,
                                         const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, int64_t count,
                                         at::Tensor* sample_sq);
inline Kernel<BatchNormInputGradInplaceFn> batch_norm_input_grad_inplace{"batch_norm_input_grad_inplace"};

// The output written over x, as LibTorch's batch_norm_transform_input
// computes it: w (x - mean) invstd + b per channel (dim 1; [C] tensors,
// weight and bias may be undefined).  x dense in NCHW or channels last,
// fp32, fp16 or bf16; false (x untouched) otherwise.
using BatchNormForwardInplaceFn = bool(at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                       const at::Tensor& weight, const at::Tensor& bias);
inline Kernel<BatchNormForwardInplaceFn> batch_norm_forward_inplace{"batch_norm_forward_inplace"};

// The statistics where channels are innermost (channels last, or [N, C];
// fp32, fp16 or bf16; C / 8 a power of two up to 32 or a multiple of 32),
// from one read of x: mean and invstd = 1 / sqrt(var + eps) ([C] float,
// biased var) and, where defined (float), running_mean and running_var
// updated as LibTorch does (momentum, unbiased var).  With r2 (may be
// null), where group_size is 256 and divides each sample, *r2 becomes float
// [N, groups]: each group's (max - min)^2, NaN if it holds one, as the
// range pass computes it, so that the allocation needs no range pass of its
// own.  false (nothing written) for any other input: the library then takes
// LibTorch's statistics.
using BatchNormStatsFn = bool(const at::Tensor& x, double momentum, double eps, at::Tensor& running_mean,
                              at::Tensor& running_var, at::Tensor& mean, at::Tensor& invstd, int64_t group_size,
                              at::Tensor* r2);
inline Kernel<BatchNormStatsFn> batch_norm_stats{"batch_norm_stats"};

}  // namespace aq::kernels
