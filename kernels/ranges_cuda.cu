// CUDA range_sq (see ranges.h).  Where the group size allows, the group
// ranges come from the quantize kernel's teams and loads (groups.cuh), then
// LibTorch sums them per sample; otherwise a block per sample, a warp per
// group (strided), min and max propagating NaN, the squares summed in a
// fixed order.
#include "ranges.h"

#include "arith.h"
#include "cuda_common.cuh"
#include "groups.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/block/block_reduce.cuh>

namespace aq::kernels {
namespace {

// min and max in which NaN sticks: once mn (mx) is NaN nothing replaces it.
__device__ __forceinline__ float nan_min(float a, float v) { return a != a ? a : (v < a || v != v) ? v : a; }
__device__ __forceinline__ float nan_max(float a, float v) { return a != a ? a : (v > a || v != v) ? v : a; }

// (max - min)^2 of every group, with the compression kernel's teams and
// loads (a team per group, a lane's pieces loaded before they are reduced).
template <typename scalar_t, int P>
__global__ void __launch_bounds__(kWarps * 32)
    group_range_sq_kernel(Plan p, Teams tm, const scalar_t* __restrict__ x, float* __restrict__ r2) {
  const int lane = threadIdx.x & 31, t = lane & ((1 << tm.team_log2) - 1);
  const int groups_per_warp = 32 >> tm.team_log2;
  const int64_t total = p.N * p.ngroups;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); w * groups_per_warp < total;
       w += warps) {
    const int64_t gi = w * groups_per_warp + (lane >> tm.team_log2);
    const bool active = gi < total;  // lanes past the end still join the shuffles
    const GroupAt g = group_at(p, nullptr, nullptr, active ? gi : total - 1);
    const scalar_t* xg = x + g.n * p.D + g.d0;
    Piece<scalar_t> v[P];
    float lo, hi;
    group_min_max(tm, t, xg, g.left, tm.vec && g.left == p.G, active, v, lo, hi);
    if (active && t == 0) {
      const float r = __fsub_rn(hi, lo);
      r2[gi] = __fmul_rn(r, r);
    }
  }
}

constexpr int kRangeThreads = 1024;  // 32 warps per sample: enough warps in flight

template <typename scalar_t, bool VEC>
__global__ void __launch_bounds__(kRangeThreads)
range_sq_kernel(const scalar_t* __restrict__ x, int64_t D, int64_t G, float* __restrict__ out) {
  constexpr int E = 16 / sizeof(scalar_t);
  struct alignas(16) Vec {
    scalar_t v[E];
  };
  using Reduce = cub::BlockReduce<float, kRangeThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t n = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t groups = (D + G - 1) / G;
  const scalar_t* row = x + n * D;
  float acc = 0;  // lane 0 of each warp: its groups' squares, in group order
  for (int64_t g = warp; g < groups; g += kRangeThreads / 32) {
    const int64_t begin = g * G, len = min(G, D - begin);
    float mn = INFINITY, mx = -INFINITY;
    if (VEC) {
      const Vec* p = reinterpret_cast<const Vec*>(row + begin);
      for (int64_t k = lane; k < len / E; k += 32) {
        const Vec v = p[k];
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const float f = static_cast<float>(v.v[e]);
          mn = nan_min(mn, f);
          mx = nan_max(mx, f);
        }
      }
    } else {
      for (int64_t k = lane; k < len; k += 32) {
        const float f = static_cast<float>(row[begin + k]);
        mn = nan_min(mn, f);
        mx = nan_max(mx, f);
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float omn = __shfl_xor_sync(0xffffffffu, mn, o), omx = __shfl_xor_sync(0xffffffffu, mx, o);
      mn = nan_min(mn, omn);
      mx = nan_max(mx, omx);
    }
    const float r = __fsub_rn(mx, mn);
    if (lane == 0) acc = __fadd_rn(acc, __fmul_rn(r, r));
  }
  const float total = Reduce(tmp).Sum(lane == 0 ? acc : 0.0f);
  if (threadIdx.x == 0) out[n] = total;
}

void group_range_sq_cuda(const at::Tensor& x, int64_t N, int64_t D, int64_t G, at::Tensor& out) {
  TORCH_CHECK(group_range_sq_takes(x.scalar_type(), G) && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.numel() == N * ((D + G - 1) / G),
              "aq: group_range_sq_cuda: a float [N, groups] output and a power-of-two group of at least 32");
  const c10::cuda::CUDAGuard guard(x.device());
  if (N == 0 || D == 0) return;
  Plan p;
  p.N = N;
  p.D = D;
  p.G = G;
  p.ngroups = (D + G - 1) / G;
  p.Dp = (D + 31) / 32 * 32;
  p.bits = 1;  // unused: no stream
  auto stream = at::cuda::getCurrentCUDAStream();
  AQ_DISPATCH_FLOATS(x.scalar_type(), "aq_group_range_sq_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    with_pieces<scalar_t>(p, [&](auto p_tag) {
      constexpr int P = decltype(p_tag)::value;
      const Teams tm = teams_for(p, P, xp);
      group_range_sq_kernel<scalar_t, P><<<blocks_for<group_range_sq_kernel<scalar_t, P>>(N * p.ngroups, tm),
                                           kWarps * 32, 0, stream>>>(p, tm, xp, out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void range_sq_cuda(const at::Tensor& x, int64_t N, int64_t D, int64_t G, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (N == 0) return;
  if (D == 0) {
    out.zero_();
    return;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  if (group_range_sq_takes(x.scalar_type(), G)) {
    // Per group, then summed per sample by LibTorch (a fixed order).
    auto r2 = at::empty({N, (D + G - 1) / G}, x.options().dtype(at::kFloat));
    group_range_sq_cuda(x, N, D, G, r2);
    at::sum_out(out, r2, {1});
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aq_range_sq_cuda", [&] {
    constexpr int E = 16 / sizeof(scalar_t);
    const bool vec = E > 0 && D % E == 0 && G % E == 0 && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
    if (vec)
      range_sq_kernel<scalar_t, true>
          <<<N, kRangeThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), D, G, out.data_ptr<float>());
    else
      range_sq_kernel<scalar_t, false>
          <<<N, kRangeThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), D, G, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

AQ_REGISTER_KERNEL(range_sq, c10::kCUDA, range_sq_cuda);
AQ_REGISTER_KERNEL(group_range_sq, c10::kCUDA, group_range_sq_cuda);

}  // namespace aq::kernels
