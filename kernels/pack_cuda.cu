// CUDA pack_bits and unpack_bits (see pack.h for the layout): a warp packs
// 32 codes into `bits` words; unpacking is a thread per code.
#include "pack.h"

#include "cuda_common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace aq::kernels {
namespace {

template <typename scalar_t>
__global__ void pack_bits_kernel(const scalar_t* __restrict__ codes, int64_t n, int bits,
                                 uint32_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
       k < (n + 31) / 32; k += warps) {
    const int64_t i = k * 32 + lane;
    const uint64_t q = i < n ? (static_cast<uint64_t>(codes[i]) & mask) : 0;
    const int bit = lane * bits, w0 = bit >> 5, s = bit & 31;
    const uint64_t sh = q << s;
    uint32_t mine = 0;
    for (int w = 0; w < bits; ++w) {
      uint32_t part = (w == w0 ? static_cast<uint32_t>(sh) : 0u) |
                      (w == w0 + 1 ? static_cast<uint32_t>(sh >> 32) : 0u);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      part = __reduce_or_sync(0xffffffffu, part);
#else
      for (int o = 16; o > 0; o >>= 1) part |= __shfl_xor_sync(0xffffffffu, part, o);
#endif
      if (lane == w) mine = part;
    }
    if (lane < bits) out[k * bits + lane] = mine;
  }
}

template <typename scalar_t>
__global__ void unpack_bits_kernel(const uint32_t* __restrict__ in, int64_t n, int bits,
                                   scalar_t* __restrict__ codes) {
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bit = i * bits;
    uint64_t w = in[bit >> 5];
    if ((bit & 31) + bits > 32) w |= static_cast<uint64_t>(in[(bit >> 5) + 1]) << 32;
    codes[i] = static_cast<scalar_t>((w >> (bit & 31)) & mask);
  }
}

void pack_bits_cuda(const at::Tensor& codes, int bits, at::Tensor& packed) {
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t n = codes.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, codes.scalar_type(), "aq_pack_bits_cuda", [&] {
    pack_bits_kernel<scalar_t><<<grid_for(n, 256), 256, 0, stream>>>(
        codes.const_data_ptr<scalar_t>(), n, bits, reinterpret_cast<uint32_t*>(packed.data_ptr<uint8_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void unpack_bits_cuda(const at::Tensor& packed, int bits, at::Tensor& codes) {
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t n = codes.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, codes.scalar_type(), "aq_unpack_bits_cuda", [&] {
    unpack_bits_kernel<scalar_t><<<grid_for(n, 256), 256, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(packed.const_data_ptr<uint8_t>()), n, bits,
        codes.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

AQ_REGISTER_KERNEL(pack_bits, c10::kCUDA, pack_bits_cuda);
AQ_REGISTER_KERNEL(unpack_bits, c10::kCUDA, unpack_bits_cuda);

}  // namespace aq::kernels
