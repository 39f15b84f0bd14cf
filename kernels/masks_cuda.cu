// CUDA masks (see masks.h) straight from the activation: a warp's ballot is
// the 32-element word; applying reads a word per element (from cache) next
// to the gradient.  With y given, the same pass writes y = relu(x) (y may be
// x): ReLU and its mask in one read.
#include "masks.h"

#include "cuda_common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace aq::kernels {
namespace {

// LibTorch's relu (clamp_min(x, 0)): NaN stays, otherwise fmaxf(x, 0).
template <typename scalar_t>
__device__ __forceinline__ scalar_t relu_of(scalar_t v) {
  const float f = static_cast<float>(v);
  return f != f ? v : static_cast<scalar_t>(fmaxf(f, 0.0f));
}
template <>
__device__ __forceinline__ bool relu_of(bool v) {
  return v;
}
template <>
__device__ __forceinline__ double relu_of(double v) {
  return v != v ? v : fmax(v, 0.0);
}

template <typename scalar_t>
__global__ void pack_positive_kernel(const scalar_t* x, int64_t n, uint32_t* __restrict__ out, scalar_t* y) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
       k < (n + 31) / 32; k += warps) {
    const int64_t i = k * 32 + lane;
    scalar_t v{};
    if (i < n) v = x[i];
    const bool on = i < n && static_cast<float>(v) > 0.0f;
    if (y && i < n) y[i] = relu_of(v);
    const uint32_t word = __ballot_sync(0xffffffffu, on);
    if (lane == 0) out[k] = word;
  }
}

// The same words from 16-byte loads: lane L of a warp tests elements
// [L E, L E + E) of a chunk of 32 E, and the lanes sharing a word OR their
// bits together.  x is 16-byte aligned; n_chunks full chunks.
template <typename scalar_t>
__global__ void pack_positive_vec_kernel(const scalar_t* x, int64_t n_chunks, uint32_t* __restrict__ out,
                                         scalar_t* y, float* __restrict__ r2) {
  constexpr int E = 16 / sizeof(scalar_t);  // 2..16, divides 32
  constexpr int kLanesPerWord = 32 / E;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5); k < n_chunks;
       k += warps) {
    const uint4 raw = reinterpret_cast<const uint4*>(x + k * 32 * E)[lane];
    scalar_t v[E];
    memcpy(v, &raw, 16);
    uint32_t bits = 0;
#pragma unroll
    for (int i = 0; i < E; ++i) bits |= static_cast<uint32_t>(static_cast<float>(v[i]) > 0.0f) << i;
    if (y) {
#pragma unroll
      for (int i = 0; i < E; ++i) v[i] = relu_of(v[i]);
      uint4 w;
      memcpy(&w, v, 16);
      reinterpret_cast<uint4*>(y + k * 32 * E)[lane] = w;
      if (r2) {  // the chunk is one group: its (max - min)^2, NaN if any NaN
        float lo = static_cast<float>(v[0]), hi = lo;
        bool nan = false;
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const float f = static_cast<float>(v[i]);
          lo = fminf(lo, f), hi = fmaxf(hi, f), nan |= f != f;
        }
        const float range_sq = warp_group_range_sq(lo, hi, nan);
        if (lane == 0) r2[k] = range_sq;
      }
    }
    bits <<= (lane * E) & 31;
#pragma unroll
    for (int o = 1; o < kLanesPerWord; o <<= 1) bits |= __shfl_xor_sync(0xffffffffu, bits, o);
    if (lane % kLanesPerWord == 0) out[k * E + lane / kLanesPerWord] = bits;
  }
}

// E consecutive elements per thread (16 bytes when aligned; E divides 32, so
// they share one mask word).  g and out may be the same memory (a backward
// writing over its incoming gradient): each element is read, then written,
// by the same thread.
template <typename scalar_t, int E>
__global__ void apply_mask_kernel(const scalar_t* g, const uint32_t* __restrict__ mask, int64_t n,
                                  at::opmath_type<scalar_t> scale, bool scaled, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  struct alignas(sizeof(scalar_t) * E) Vec {
    scalar_t v[E];
  };
  const int64_t chunks = n / E;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = c * E;
    const uint32_t w = __ldg(mask + (i0 >> 5)) >> (i0 & 31);
    Vec in = reinterpret_cast<const Vec*>(g)[c], o;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const bool on = (w >> e) & 1u;
      o.v[e] = !on ? scalar_t(0) : scaled ? static_cast<scalar_t>(static_cast<acc_t>(in.v[e]) * scale) : in.v[e];
    }
    reinterpret_cast<Vec*>(out)[c] = o;
  }
}

// Both kernels' pass: the mask, and with relu_out also ReLU (and with r2 the
// group ranges).
void pack_positive_pass(const at::Tensor& x, at::Tensor& packed, at::Tensor* relu_out, int64_t group_size,
                        float* r2) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  TORCH_CHECK(!relu_out || (relu_out->numel() == n && relu_out->scalar_type() == x.scalar_type() &&
                            relu_out->is_contiguous() && x.scalar_type() != at::kBool),
              "aq: relu_pack_positive: relu_out must be a flat floating tensor like x");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "aq_pack_positive_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = relu_out ? relu_out->data_ptr<scalar_t>() : nullptr;
    uint32_t* out = reinterpret_cast<uint32_t*>(packed.data_ptr<uint8_t>());
    // Whole chunks of 32 16-byte vectors where aligned, the rest (a word-aligned tail) a word per warp.
    constexpr int64_t kChunk = 32 * (16 / sizeof(scalar_t));
    const bool aligned = reinterpret_cast<uintptr_t>(xp) % 16 == 0 && reinterpret_cast<uintptr_t>(yp) % 16 == 0;
    const int64_t chunks = aligned ? n / kChunk : 0;
    TORCH_CHECK(!r2 || (yp && group_size == kChunk && chunks * kChunk == n),
                "aq: relu_pack_positive: group ranges need whole aligned chunks of ", kChunk, " elements");
    if (chunks > 0) {
      pack_positive_vec_kernel<scalar_t><<<grid_for(chunks * 32, 256), 256, 0, stream>>>(xp, chunks, out, yp, r2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t done = chunks * kChunk;
    if (done < n) {
      pack_positive_kernel<scalar_t><<<grid_for(n - done, 256), 256, 0, stream>>>(
          xp + done, n - done, out + done / 32, yp ? yp + done : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void apply_mask_cuda(const at::Tensor& g, const at::Tensor& packed, double scale, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t n = g.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const uint32_t* m = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<uint8_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "aq_apply_mask_cuda", [&] {
    constexpr int E = 16 / sizeof(scalar_t) < 32 ? 16 / sizeof(scalar_t) : 32;
    const bool vec = n % E == 0 && reinterpret_cast<uintptr_t>(g.const_data_ptr()) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
    const auto s = static_cast<at::opmath_type<scalar_t>>(scale);
    if (vec) {
      apply_mask_kernel<scalar_t, E><<<grid_for(n / E, 256), 256, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), m, n, s, scale != 1.0, out.data_ptr<scalar_t>());
    } else {
      apply_mask_kernel<scalar_t, 1><<<grid_for(n, 256), 256, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), m, n, s, scale != 1.0, out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void pack_positive_cuda(const at::Tensor& x, at::Tensor& packed) { pack_positive_pass(x, packed, nullptr, 0, nullptr); }

void relu_pack_positive_cuda(const at::Tensor& x, at::Tensor& packed, at::Tensor& relu_out, int64_t group_size,
                             float* r2) {
  pack_positive_pass(x, packed, &relu_out, group_size, r2);
}

}  // namespace

AQ_REGISTER_KERNEL(pack_positive, c10::kCUDA, pack_positive_cuda);
AQ_REGISTER_KERNEL(relu_pack_positive, c10::kCUDA, relu_pack_positive_cuda);
AQ_REGISTER_KERNEL(apply_mask, c10::kCUDA, apply_mask_cuda);

}  // namespace aq::kernels
