// CUDA GELU with its derivative, and the residual sum (see activation.h): a
// warp reads a group as 16-byte vectors, writes the results and reduces
// their group ranges.
#include "activation.h"

#include "cuda_common.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <type_traits>

namespace aq::kernels {
namespace {

// The forward in LibTorch's arithmetic (float opmath, the same operations in
// the same order, so the same bits); the derivative as its gelu_backward
// computes it with an incoming gradient of 1.
template <bool kTanh>
__device__ __forceinline__ void gelu_pair(float x, float& y, float& d) {
  if (kTanh) {
    constexpr float kBeta = M_SQRT2 * M_2_SQRTPI * 0.5;
    constexpr float kKappa = 0.044715;
    const float x_sq = x * x;
    const float inner = kBeta * (x + kKappa * (x_sq * x));
    const float t = ::tanhf(inner);
    y = 0.5f * x * (1.0f + t);
    const float half_x = 0.5f * x, right = 1.0f + t;
    const float slope = kBeta * (1.0f + 3.0f * kKappa * x_sq);
    d = 0.5f * right + half_x * (1.0f - t * t) * slope;
  } else {
    constexpr float kAlpha = M_SQRT1_2;
    constexpr float kBeta = M_2_SQRTPI * M_SQRT1_2 * 0.5;
    const float e = ::erff(x * kAlpha);
    y = x * 0.5f * (1.0f + e);
    const float cdf = 0.5f * (1.0f + e);
    const float pdf = ::expf(-0.5f * x * x) * kBeta;
    d = cdf + x * pdf;
  }
}

// Warp w takes group w (chunks_per_group chunks of 32 vectors), grid-stride.
template <typename scalar_t, bool kTanh>
__global__ void gelu_and_derivative_kernel(const scalar_t* __restrict__ x, int64_t groups, int chunks_per_group,
                                           scalar_t* __restrict__ y, scalar_t* __restrict__ d,
                                           float* __restrict__ r2_y, float* __restrict__ r2_d) {
  constexpr int E = 16 / sizeof(scalar_t);
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5); k < groups;
       k += warps) {
    float ylo = INFINITY, yhi = -INFINITY, dlo = INFINITY, dhi = -INFINITY;
    bool ynan = false, dnan = false;
    for (int c = 0; c < chunks_per_group; ++c) {
      const int64_t v = (k * chunks_per_group + c) * 32 + lane;
      const uint4 raw = reinterpret_cast<const uint4*>(x)[v];
      scalar_t xs[E], ys[E], ds[E];
      memcpy(xs, &raw, 16);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        float fy, fd;
        gelu_pair<kTanh>(static_cast<float>(xs[e]), fy, fd);
        ys[e] = static_cast<scalar_t>(fy);
        ds[e] = static_cast<scalar_t>(fd);
        // The stored values' ranges, as the range pass would read them.
        fy = static_cast<float>(ys[e]);
        fd = static_cast<float>(ds[e]);
        ylo = fminf(ylo, fy), yhi = fmaxf(yhi, fy), ynan |= fy != fy;
        dlo = fminf(dlo, fd), dhi = fmaxf(dhi, fd), dnan |= fd != fd;
      }
      uint4 out;
      memcpy(&out, ys, 16);
      reinterpret_cast<uint4*>(y)[v] = out;
      memcpy(&out, ds, 16);
      reinterpret_cast<uint4*>(d)[v] = out;
    }
    if (r2_y) {
      const float ry = warp_group_range_sq(ylo, yhi, ynan);
      const float rd = warp_group_range_sq(dlo, dhi, dnan);
      if (lane == 0) r2_y[k] = ry, r2_d[k] = rd;
    }
  }
}

void gelu_and_derivative_cuda(const at::Tensor& x, bool tanh, at::Tensor& y, at::Tensor& d, int64_t group_size,
                              float* r2_y, float* r2_d) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  const int64_t chunk = activation_chunk(x.element_size());
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && d.is_contiguous() && aligned(x) && aligned(y) &&
                  aligned(d) && y.numel() == n && d.numel() == n && y.scalar_type() == x.scalar_type() &&
                  d.scalar_type() == x.scalar_type() && n % chunk == 0,
              "aq: gelu_and_derivative: x, y and d must be contiguous, aligned, alike and whole chunks of ", chunk);
  const bool ranges = r2_y && r2_d;
  TORCH_CHECK(!ranges || (group_size % chunk == 0 && n % group_size == 0),
              "aq: gelu_and_derivative: group ranges need groups of whole chunks of ", chunk);
  const int per_group = ranges ? static_cast<int>(group_size / chunk) : 1;
  const int64_t groups = n / (chunk * per_group);
  auto stream = at::cuda::getCurrentCUDAStream();
  AQ_DISPATCH_FLOATS(x.scalar_type(), "aq_gelu_and_derivative_cuda", [&] {
    auto launch = [&](auto kernel) {
      kernel<<<grid_for(groups * 32, 256), 256, 0, stream>>>(x.const_data_ptr<scalar_t>(), groups, per_group,
                                                             y.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(),
                                                             ranges ? r2_y : nullptr, ranges ? r2_d : nullptr);
    };
    if (tanh)
      launch(gelu_and_derivative_kernel<scalar_t, true>);
    else
      launch(gelu_and_derivative_kernel<scalar_t, false>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Warp w takes group w (chunks_per_group chunks of 32 lanes x 4 elements),
// grid-stride.  One float addition per element: LibTorch's add computes
// x + 1 * y in float, which is the same sum.
template <typename y_t>
__global__ void add_and_ranges_kernel(const float* __restrict__ x, const y_t* __restrict__ y, int64_t groups,
                                      int chunks_per_group, float* __restrict__ z, float* __restrict__ r2) {
  using YVec = std::conditional_t<sizeof(y_t) == 4, uint4, uint2>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5); k < groups;
       k += warps) {
    float lo = INFINITY, hi = -INFINITY;
    bool nan = false;
    for (int c = 0; c < chunks_per_group; ++c) {
      const int64_t v = (k * chunks_per_group + c) * 32 + lane;
      const float4 a = reinterpret_cast<const float4*>(x)[v];
      const YVec raw = reinterpret_cast<const YVec*>(y)[v];
      y_t b[4];
      memcpy(b, &raw, sizeof(raw));
      float4 s;
      s.x = __fadd_rn(a.x, static_cast<float>(b[0]));
      s.y = __fadd_rn(a.y, static_cast<float>(b[1]));
      s.z = __fadd_rn(a.z, static_cast<float>(b[2]));
      s.w = __fadd_rn(a.w, static_cast<float>(b[3]));
      reinterpret_cast<float4*>(z)[v] = s;
      lo = fminf(fminf(lo, s.x), fminf(s.y, fminf(s.z, s.w)));
      hi = fmaxf(fmaxf(hi, s.x), fmaxf(s.y, fmaxf(s.z, s.w)));
      nan |= s.x != s.x || s.y != s.y || s.z != s.z || s.w != s.w;
    }
    const float r = warp_group_range_sq(lo, hi, nan);
    if (lane == 0) r2[k] = r;
  }
}

void add_and_ranges_cuda(const at::Tensor& x, const at::Tensor& y, at::Tensor& z, int64_t group_size, float* r2) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  TORCH_CHECK(x.scalar_type() == at::kFloat && z.scalar_type() == at::kFloat && x.is_contiguous() &&
                  y.is_contiguous() && z.is_contiguous() && aligned(x) && aligned(y) && aligned(z) && y.numel() == n &&
                  z.numel() == n && group_size % kAddChunk == 0 && n % group_size == 0,
              "aq: add_and_ranges: float x and z, and y, contiguous, aligned, of one size, in whole groups of whole "
              "chunks of ", kAddChunk);
  const int per_group = static_cast<int>(group_size / kAddChunk);
  const int64_t groups = n / group_size;
  auto stream = at::cuda::getCurrentCUDAStream();
  AQ_DISPATCH_FLOATS(y.scalar_type(), "aq_add_and_ranges_cuda", [&] {
    add_and_ranges_kernel<scalar_t><<<grid_for(groups * 32, 256), 256, 0, stream>>>(
        x.const_data_ptr<float>(), y.const_data_ptr<scalar_t>(), groups, per_group, z.data_ptr<float>(), r2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

AQ_REGISTER_KERNEL(gelu_and_derivative, c10::kCUDA, gelu_and_derivative_cuda);
AQ_REGISTER_KERNEL(add_and_ranges, c10::kCUDA, add_and_ranges_cuda);

}  // namespace aq::kernels
