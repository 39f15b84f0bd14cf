// CUDA update_sample_stat (see statistics.h): one block reads every old
// value, then writes the new ones.
#include "statistics.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/block/block_reduce.cuh>

namespace aq::kernels {
namespace {

constexpr int kStatThreads = 256;
__global__ void __launch_bounds__(kStatThreads)
    update_sample_stat_kernel(const float* __restrict__ g, const int64_t* __restrict__ idx, int64_t N,
                              float* __restrict__ stat, float* __restrict__ mean) {
  constexpr int kPer = (kAllocMaxSamples + kStatThreads - 1) / kStatThreads;
  float v[kPer];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * kStatThreads;
    if (i < N) {
      const float o = stat[idx[i]], gi = g[i];
      v[k] = o >= 0.f ? __fadd_rn(__fmul_rn(0.5f, o), __fmul_rn(0.5f, gi)) : gi;
      sum += gi;
    }
  }
  __syncthreads();  // every old value read before any is written
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * kStatThreads;
    if (i < N) stat[idx[i]] = v[k];
  }
  using Reduce = cub::BlockReduce<float, kStatThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const float total = Reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) *mean = total / static_cast<float>(N);
}

void update_sample_stat_cuda(const at::Tensor& g, const at::Tensor& idx, at::Tensor& stat, at::Tensor& mean) {
  const int64_t N = g.numel();
  TORCH_CHECK(N > 0 && N <= kAllocMaxSamples, "aq: gradient statistics of ", N, " samples in one launch");
  TORCH_CHECK(g.scalar_type() == at::kFloat && stat.scalar_type() == at::kFloat && mean.scalar_type() == at::kFloat &&
                  idx.scalar_type() == at::kLong && idx.numel() == N && g.is_contiguous() && idx.is_contiguous() &&
                  stat.is_contiguous(),
              "aq: update_sample_stat_cuda: float g/stat/mean, int64 idx of g's length, contiguous");
  const c10::cuda::CUDAGuard guard(g.device());
  update_sample_stat_kernel<<<1, kStatThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      g.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(), N, stat.data_ptr<float>(), mean.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

AQ_REGISTER_KERNEL(update_sample_stat, c10::kCUDA, update_sample_stat_cuda);

}  // namespace aq::kernels
