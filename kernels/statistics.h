// update_sample_stat: the per-sample gradient statistics the adaptive
// allocation reads (docs/design.md §5), updated in one launch.  CUDA only:
// elsewhere the library runs the same update as LibTorch ops (index,
// where, index_put_).
#pragma once

#include "allocation.h"
#include "dispatch.h"

#include <ATen/core/Tensor.h>

namespace aq::kernels {

// For each i < N, stat[idx[i]] = stat[idx[i]] >= 0 ? 0.5 stat[idx[i]] +
// 0.5 g[i] : g[i] (every old value read before any is written, as
// LibTorch's index and index_put_), and mean[0] = the mean of g.  g float
// [N], idx int64 [N] (each < stat's length), stat float, mean float [] on
// one device, contiguous; one block, 0 < N <= kAllocMaxSamples.
using UpdateSampleStatFn = void(const at::Tensor& g, const at::Tensor& idx, at::Tensor& stat, at::Tensor& mean);
inline Kernel<UpdateSampleStatFn> update_sample_stat{"update_sample_stat"};

}  // namespace aq::kernels
