// allocate_per_sample: a layer's per-sample bit allocation in one launch
// (docs/design.md §5, with unit weights).  CUDA only: elsewhere the library
// computes the sensitivities with LibTorch ops and runs the greedy of
// aq/allocate.h, which gives the same bits, ties included.
#pragma once

#include "dispatch.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace aq::kernels {

// The most samples one launch (one block) takes; the library runs its own
// path for larger batches.
constexpr int64_t kAllocMaxSamples = 4096;
// The most range_sq entries (N * range_cols) one launch sums itself: its one
// block reads them at a fraction of the card's bandwidth, so beyond this a
// separate reduction over the whole card is the faster way.
constexpr int64_t kAllocMaxParts = int64_t{1} << 16;

struct AllocPlan {
  int64_t N = 0;
  int ibits = 8;
  int64_t removals = 0;        // ibits * N - target: bits the greedy takes away
  int64_t words_per_bit = 0;   // Dp / 32
  double range_scale = 1;      // G / positions
  float grad_scale = 1;        // kernel area / (4 groups); unused for batch norm
  bool batch_norm = false;     // s_n = 1, no gradient term
  int mode = 0;                // s_n: 0 ones, 1 grad_mean[0], 2 per-sample statistics
  int64_t stat_size = 0;       // mode 2: entries of sample_stat
  int64_t range_cols = 1;      // range_sq's entries per sample (a sample's parts, summed in order)
  double dinv[9] = {};         // dinv[b] = 1/(2^(b-1)-1)^2 - 1/(2^b-1)^2, b = 2..8
};

// The sensitivities from the layer's group ranges and gradient statistics,
// then the greedy's bits (the same as allocate_bits, ties included) and
// each sample's first packed word.  range_sq float [N, range_cols]: with
// more than one column, each row is summed in a fixed order first and the
// sums written to range_sum (float [N]); grad_mean float
// (mode 1); sample_stat float [stat_size] and indices int64 [N] (mode 2),
// all on one device; writes bits int32 [N] and word_offset int64 [N]; or,
// when `cost` is given, only the sensitivities (double [N], NaN kept)
// there.  `extra` (double [N], or undefined) is added to the sensitivities:
// layers sharing the compressed copy.  N <= kAllocMaxSamples.
using AllocatePerSampleFn = void(const AllocPlan& plan, const at::Tensor& range_sq, const at::Tensor& range_sum,
                                 const at::Tensor& grad_mean, const at::Tensor& sample_stat,
                                 const at::Tensor& indices, at::Tensor& bits, at::Tensor& word_offset,
                                 at::Tensor* cost, const at::Tensor& extra);
inline Kernel<AllocatePerSampleFn> allocate_per_sample{"allocate_per_sample"};

}  // namespace aq::kernels
