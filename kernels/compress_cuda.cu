// CUDA implementation of the compression kernels (see kernels.h).
//
// Quantize is one kernel and one pass: a warp owns a group, loads it once into
// registers (groups up to 1024 elements; larger ones are read twice, the
// second time mostly from L2), reduces min/max with shuffles, rounds with
// Philox numbers and writes its packed words.  Everything runs on the current
// stream; nothing waits for the host.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/detail/UnpackRaw.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>

namespace aq::kernels {
namespace {

constexpr int kWarps = 8;  // warps (groups) per block
constexpr int kKeep = 4;   // chunks per lane kept in registers (G <= 1024 at E = 8)

template <typename T, int E>
struct alignas(sizeof(T) * E) Vec {
  T v[E];
};

struct Stream {
  int b;
  int64_t word;
};

__device__ __forceinline__ Stream sample_stream(const Plan& p, const int32_t* sbits,
                                                const int64_t* woff, int64_t n) {
  if (p.bits) return {p.bits, n * (p.bits * p.Dp / 32)};
  return {sbits[n], woff[n]};
}

__device__ __forceinline__ void seed_of(const Plan& p, at::PhiloxCudaState st, uint64_t& seed,
                                        uint64_t& offset) {
  if (p.draw_seed) {
    auto so = at::cuda::philox::unpack(st);
    seed = std::get<0>(so);
    offset = std::get<1>(so);
  } else {
    seed = p.seed;
    offset = p.offset;
  }
}

// Loads E elements at x[d..d+E) of which those before `valid` exist.
template <typename scalar_t, int E, bool VEC>
__device__ __forceinline__ void load_chunk(const scalar_t* x, int64_t d, int64_t valid, float (&v)[E]) {
  if (VEC && d + E <= valid) {
    Vec<scalar_t, E> w = *reinterpret_cast<const Vec<scalar_t, E>*>(x + d);
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = static_cast<float>(w.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = d + i < valid ? static_cast<float>(x[d + i]) : 0.f;
  }
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ bool byte_sized(int nb) { return nb == 8 || nb == 16 || nb == 32 || nb == 64; }

// Writes a lane's nb = E*b bits, at bit lane*nb of the warp's current chunk
// (`words`: the chunk's first word).  Byte-sized pieces are stored directly by
// lanes inside the group; other widths are assembled in the warp's shared
// words `sw` (all lanes take part) and the chunk's first `nwords` written.
__device__ __forceinline__ void store_bits(uint32_t* words, uint32_t* sw, int lane, int nb,
                                           uint64_t c, bool inside, int64_t nwords) {
  const int bit = lane * nb;
  if (byte_sized(nb)) {
    if (!inside) return;
    if (nb == 8)
      reinterpret_cast<uint8_t*>(words)[bit / 8] = static_cast<uint8_t>(c);
    else if (nb == 16)
      reinterpret_cast<uint16_t*>(words)[bit / 16] = static_cast<uint16_t>(c);
    else if (nb == 32)
      words[bit / 32] = static_cast<uint32_t>(c);
    else {
      words[bit / 32] = static_cast<uint32_t>(c);
      words[bit / 32 + 1] = static_cast<uint32_t>(c >> 32);
    }
    return;
  }
  sw[lane] = 0;
  sw[lane + 32] = 0;
  __syncwarp();
  const int s = bit & 31, w = bit >> 5;
  const uint64_t lo = c << s;
  const uint32_t hi = s ? static_cast<uint32_t>(c >> (64 - s)) : 0u;
  if (static_cast<uint32_t>(lo)) atomicOr(&sw[w], static_cast<uint32_t>(lo));
  if (static_cast<uint32_t>(lo >> 32)) atomicOr(&sw[w + 1], static_cast<uint32_t>(lo >> 32));
  if (hi) atomicOr(&sw[w + 2], hi);
  __syncwarp();
  for (int i = lane; i < nb && i < nwords; i += 32) words[i] = sw[i];
  __syncwarp();
}

// Reads the nb bits at bit `bit` of a stream starting at `words`.
__device__ __forceinline__ uint64_t load_bits(const uint32_t* words, int64_t bit, int nb) {
  if (nb == 8) return reinterpret_cast<const uint8_t*>(words)[bit / 8];
  if (nb == 16) return reinterpret_cast<const uint16_t*>(words)[bit / 16];
  const int64_t w = bit >> 5;
  const int s = static_cast<int>(bit & 31);
  uint64_t lo = words[w];
  if (s + nb > 32) lo |= static_cast<uint64_t>(words[w + 1]) << 32;
  uint64_t c = lo >> s;
  if (s + nb > 64) c |= static_cast<uint64_t>(words[w + 2]) << (64 - s);
  return nb == 64 ? c : c & ((uint64_t(1) << nb) - 1);
}

// One warp per group.  Chunk j of lane l holds group elements
// [(32 j + l) E, (32 j + l + 1) E): loads are coalesced and each lane's codes
// are E*b contiguous bits of the stream.
template <typename scalar_t, int E, bool VEC>
__global__ void __launch_bounds__(kWarps * 32)
    quantize_kernel(Plan p, const scalar_t* __restrict__ x, const int32_t* __restrict__ sbits,
                    const int64_t* __restrict__ woff, const float* __restrict__ global_range,
                    uint32_t* __restrict__ packed, void* mn, void* mx, bool bf16,
                    at::PhiloxCudaState st) {
  __shared__ uint32_t smem[kWarps][64];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t gi = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (gi >= p.N * p.ngroups) return;  // warp-uniform
  uint64_t seed, offset;
  seed_of(p, st, seed, offset);
  const int64_t n = gi / p.ngroups, d0 = (gi - n * p.ngroups) * p.G;
  const int64_t T = imin(p.G, p.Dp - d0);  // padded length of this group, a multiple of 32
  const scalar_t* xs = x + n * p.D;
  const int R = static_cast<int>(p.G / (32 * E));  // chunks per lane
  const Stream s = sample_stream(p, sbits, woff, n);
  auto elem = [&](int j) { return d0 + (static_cast<int64_t>(j) * 32 + lane) * E; };

  float v[kKeep][E];
  float lo, hi;
  if (p.pergroup) {
    lo = INFINITY;
    hi = -INFINITY;
    auto reduce = [&](const float (&t)[E], int64_t d) {
#pragma unroll
      for (int i = 0; i < E; ++i)
        if (d + i < p.D) {
          lo = nan_min(lo, t[i]);
          hi = nan_max(hi, t[i]);
        }
    };
#pragma unroll
    for (int j = 0; j < kKeep; ++j)
      if (j < R && elem(j) - d0 < T) {
        load_chunk<scalar_t, E, VEC>(xs, elem(j), p.D, v[j]);
        reduce(v[j], elem(j));
      }
    for (int j = kKeep; j < R; ++j)
      if (elem(j) - d0 < T) {
        float t[E];
        load_chunk<scalar_t, E, VEC>(xs, elem(j), p.D, t);
        reduce(t, elem(j));
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      lo = nan_min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = nan_max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if (lane == 0) {
      store_range(mn, bf16, gi, lo, false);
      store_range(mx, bf16, gi, hi, true);
    }
  } else {
    lo = global_range[0];
    hi = global_range[1];
    if (gi == 0 && lane == 0) {
      store_range(mn, bf16, 0, lo, false);
      store_range(mx, bf16, 0, hi, true);
    }
  }
  const Grid grid = make_grid(round_range(lo, bf16, false), round_range(hi, bf16, true), s.b);
  uint32_t* gw = packed + s.word + d0 * s.b / 32;
  const int nb = E * s.b;
  auto emit = [&](int j, const float (&t)[E]) {
    const int64_t c0 = static_cast<int64_t>(j) * 32 * E;  // chunk start within the group
    const int64_t d = elem(j);
    const int64_t e = n * p.Dp + d;
    Philox4 r{};
    if (p.stochastic) r = philox(static_cast<uint64_t>(e) >> 3, offset, seed);
    uint64_t c = 0;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float u = p.stochastic ? uniform_of(r, e + i) : 0.5f;
      const uint32_t q = d + i < p.D ? quantize_one(grid, t[i], u) : 0u;
      c |= static_cast<uint64_t>(q) << (i * s.b);
    }
    const int64_t rem = imin(32 * E, T - c0);  // padded elements of the group in this chunk
    store_bits(gw + c0 * s.b / 32, smem[warp], lane, nb, c, d - d0 < T, rem * s.b / 32);
  };
#pragma unroll
  for (int j = 0; j < kKeep; ++j)
    if (j < R && static_cast<int64_t>(j) * 32 * E < T) {  // warp-uniform
      if (!p.pergroup) load_chunk<scalar_t, E, VEC>(xs, elem(j), p.D, v[j]);
      emit(j, v[j]);
    }
  for (int j = kKeep; j < R; ++j)
    if (static_cast<int64_t>(j) * 32 * E < T) {
      float t[E];
      load_chunk<scalar_t, E, VEC>(xs, elem(j), p.D, t);
      emit(j, t);
    }
}

template <typename scalar_t, int E, bool VEC>
__global__ void __launch_bounds__(kWarps * 32)
    dequantize_kernel(Plan p, const uint32_t* __restrict__ packed, const void* mn, const void* mx,
                      bool bf16, const int32_t* __restrict__ sbits,
                      const int64_t* __restrict__ woff, scalar_t* __restrict__ y) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t gi = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (gi >= p.N * p.ngroups) return;
  const int64_t n = gi / p.ngroups, d0 = (gi - n * p.ngroups) * p.G;
  const int64_t T = imin(p.G, p.Dp - d0);
  const Stream s = sample_stream(p, sbits, woff, n);
  const int64_t ri = p.pergroup ? gi : 0;
  const Grid grid = make_grid(load_range(mn, bf16, ri), load_range(mx, bf16, ri), s.b);
  const uint32_t* gw = packed + s.word + d0 * s.b / 32;
  const int nb = E * s.b;
  const uint64_t mask = (1u << s.b) - 1u;
  scalar_t* ys = y + n * p.D;
  const int R = static_cast<int>(p.G / (32 * E));
  for (int j = 0; j < R; ++j) {
    const int64_t c0 = static_cast<int64_t>(j) * 32 * E;
    const int64_t d = d0 + c0 + static_cast<int64_t>(lane) * E;
    if (d - d0 >= T) break;
    const uint64_t c = load_bits(gw, (d - d0) * s.b, nb);
    Vec<scalar_t, E> w;
#pragma unroll
    for (int i = 0; i < E; ++i)
      w.v[i] = static_cast<scalar_t>(dequantize_one(grid, static_cast<uint32_t>((c >> (i * s.b)) & mask)));
    if (VEC && d + E <= p.D) {
      *reinterpret_cast<Vec<scalar_t, E>*>(ys + d) = w;
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i)
        if (d + i < p.D) ys[d + i] = w.v[i];
    }
  }
}

// Calls f.template operator()<E, VEC>() for the plan's chunk width and whether
// every chunk of x/y is aligned for vector access.
template <typename scalar_t, typename F>
void dispatch_chunk(const Plan& p, const void* ptr, F&& f) {
  auto go = [&](auto e_tag) {
    constexpr int E = decltype(e_tag)::value;
    const bool vec = p.D % E == 0 && reinterpret_cast<uintptr_t>(ptr) % (sizeof(scalar_t) * E) == 0;
    if (vec)
      f(std::integral_constant<int, E>{}, std::true_type{});
    else
      f(std::integral_constant<int, E>{}, std::false_type{});
  };
  switch (p.G) {
    case 32: go(std::integral_constant<int, 1>{}); break;
    case 64: go(std::integral_constant<int, 2>{}); break;
    case 128: go(std::integral_constant<int, 4>{}); break;
    default: go(std::integral_constant<int, 8>{}); break;
  }
}

int64_t blocks_for(int64_t groups) { return (groups + kWarps - 1) / kWarps; }

}  // namespace

void quantize_cuda(const Plan& plan, const at::Tensor& x, const at::Tensor& sample_bits,
                   const at::Tensor& word_offset, const at::Tensor& global_range,
                   at::Tensor& packed, at::Tensor& mn, at::Tensor& mx) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t groups = plan.N * plan.ngroups;
  if (groups == 0) return;
  TORCH_CHECK(blocks_for(groups) < (int64_t(1) << 31), "aq: tensor too large for one launch");
  at::PhiloxCudaState st;
  if (plan.draw_seed) {
    auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(x.device().index()));
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st = gen->philox_cuda_state(4);
  }
  const bool bf16 = mn.scalar_type() == at::kBFloat16;
  const int32_t* sb = plan.bits ? nullptr : sample_bits.const_data_ptr<int32_t>();
  const int64_t* wo = plan.bits ? nullptr : word_offset.const_data_ptr<int64_t>();
  const float* gr = plan.pergroup ? nullptr : global_range.const_data_ptr<float>();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aq_quantize_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_chunk<scalar_t>(plan, xp, [&](auto e_tag, auto vec_tag) {
      constexpr int E = decltype(e_tag)::value;
      constexpr bool VEC = decltype(vec_tag)::value;
      quantize_kernel<scalar_t, E, VEC><<<blocks_for(groups), kWarps * 32, 0, stream>>>(
          plan, xp, sb, wo, gr, reinterpret_cast<uint32_t*>(packed.data_ptr<uint8_t>()),
          mn.data_ptr(), mx.data_ptr(), bf16, st);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void dequantize_cuda(const Plan& plan, const at::Tensor& packed, const at::Tensor& mn,
                     const at::Tensor& mx, const at::Tensor& sample_bits,
                     const at::Tensor& word_offset, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t groups = plan.N * plan.ngroups;
  if (groups == 0) return;
  TORCH_CHECK(blocks_for(groups) < (int64_t(1) << 31), "aq: tensor too large for one launch");
  const bool bf16 = mn.scalar_type() == at::kBFloat16;
  const int32_t* sb = plan.bits ? nullptr : sample_bits.const_data_ptr<int32_t>();
  const int64_t* wo = plan.bits ? nullptr : word_offset.const_data_ptr<int64_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aq_dequantize_cuda", [&] {
    scalar_t* yp = out.data_ptr<scalar_t>();
    dispatch_chunk<scalar_t>(plan, yp, [&](auto e_tag, auto vec_tag) {
      constexpr int E = decltype(e_tag)::value;
      constexpr bool VEC = decltype(vec_tag)::value;
      dequantize_kernel<scalar_t, E, VEC><<<blocks_for(groups), kWarps * 32, 0, stream>>>(
          plan, reinterpret_cast<const uint32_t*>(packed.const_data_ptr<uint8_t>()),
          mn.const_data_ptr(), mx.const_data_ptr(), bf16, sb, wo, yp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---------------------------------------------------------------------------
// Small-integer codes (masks, window argmax): a warp packs 32 codes into
// `bits` words (the CPU file documents the layout).

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

int grid_for(int64_t work, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, sms * 32)));
}

}  // namespace

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

}  // namespace aq::kernels
