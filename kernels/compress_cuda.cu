// CUDA implementation of the compression kernels (see kernels.h).
//
// Quantize is one kernel and one pass over the input: a team of lanes owns a
// group, loads it once into registers (groups up to 1024 elements; larger ones
// are read twice, the second time mostly from cache), reduces min/max with
// shuffles, rounds with Philox numbers and writes its packed bytes.  Each lane
// handles 32 elements per group, so the per-group work (locating the group,
// the grid's divisions) is spread thin.  Everything runs on the current
// stream; nothing waits for the host.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/detail/UnpackRaw.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <type_traits>

namespace aq::kernels {
namespace {

constexpr int kWarps = 8;  // warps per block

__constant__ uint32_t kPhiloxMul[2] = {kPhiloxM0, kPhiloxM1};  // see philox()

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

// NaN-propagating min/max in one instruction where the hardware has it.
__device__ __forceinline__ float dev_min(float a, float b) {
#if __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return nan_min(a, b);
#endif
}
__device__ __forceinline__ float dev_max(float a, float b) {
#if __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return nan_max(a, b);
#endif
}

// E elements of 16 or 32 bytes, moved with 16-byte loads and stores.
template <typename T, int E>
union Chunk {
  static_assert(sizeof(T) * E % 16 == 0, "chunks are whole 16-byte vectors");
  T v[E];
  uint4 q[sizeof(T) * E / 16];
};

template <typename T, int E>
__device__ __forceinline__ void load_raw(const T* src, Chunk<T, E>& c) {
#pragma unroll
  for (int k = 0; k < int(sizeof(T) * E / 16); ++k) c.q[k] = reinterpret_cast<const uint4*>(src)[k];
}
template <typename T, int E>
__device__ __forceinline__ void store_raw(T* dst, const Chunk<T, E>& c) {
#pragma unroll
  for (int k = 0; k < int(sizeof(T) * E / 16); ++k) reinterpret_cast<uint4*>(dst)[k] = c.q[k];
}

// Loads the nv (0..E) existing elements of a lane's chunk as floats.
template <typename scalar_t, int E, bool VEC>
__device__ __forceinline__ void load_chunk(const scalar_t* x, int nv, float (&v)[E]) {
  if (VEC && nv == E) {
    Chunk<scalar_t, E> c;
    load_raw<scalar_t, E>(x, c);
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = static_cast<float>(c.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = i < nv ? static_cast<float>(x[i]) : 0.f;
  }
}

// Floats to the output dtype, two at a time where the hardware converts pairs
// (round to nearest even, like LibTorch's CPU conversion).
template <typename scalar_t, int E>
__device__ __forceinline__ void to_storage(const float (&f)[E], scalar_t (&out)[E]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && E % 2 == 0) {
#pragma unroll
    for (int i = 0; i < E; i += 2) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(f[i], f[i + 1]);
      memcpy(&out[i], &h, 4);
    }
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && E % 2 == 0) {
#pragma unroll
    for (int i = 0; i < E; i += 2) {
      const __half2 h = __floats2half2_rn(f[i], f[i + 1]);
      memcpy(&out[i], &h, 4);
    }
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) out[i] = static_cast<scalar_t>(f[i]);
  }
}

// A lane's piece is 8 elements, 8*b bits = b whole bytes at byte (d/8)*b of
// the group's stream (d: the piece's first element in the group).  Streams are
// 4-byte aligned, so 1, 2 and 4 bytes go in one store and the rest in words
// or bytes.
__device__ __forceinline__ void store_piece(uint8_t* bytes, int b, uint64_t c) {
  switch (b) {
    case 1: *bytes = static_cast<uint8_t>(c); break;
    case 2: *reinterpret_cast<uint16_t*>(bytes) = static_cast<uint16_t>(c); break;
    case 4: *reinterpret_cast<uint32_t*>(bytes) = static_cast<uint32_t>(c); break;
    case 8:
      reinterpret_cast<uint32_t*>(bytes)[0] = static_cast<uint32_t>(c);
      reinterpret_cast<uint32_t*>(bytes)[1] = static_cast<uint32_t>(c >> 32);
      break;
    default:
#pragma unroll 1
      for (int i = 0; i < b; ++i) bytes[i] = static_cast<uint8_t>(c >> (8 * i));
  }
}

// The Philox words of elements e..e+7 (e a multiple of 8); a deterministic
// stand-in when rounding to nearest.
__device__ __forceinline__ Philox4 piece_random(bool stochastic, uint64_t e, uint64_t offset, uint64_t seed) {
  if (!stochastic) {
    // random15 of these words is kNearest for every element.
    const uint32_t w = kNearest | (kNearest << 17);
    return Philox4{{w, w, w, w}};
  }
  return philox(e >> 3, offset, seed, kPhiloxMul[0], kPhiloxMul[1]);
}

// Rounds and packs a piece: 8 elements (nv of them exist) into 8*b bits,
// with the piece's Philox words r.
__device__ __forceinline__ uint64_t encode_piece(const Grid& grid, const float (&t)[8], int nv, int b,
                                                 const Philox4& r) {
  uint32_t k[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) k[i] = (i & 1) ? r.r[i >> 1] >> 17 : r.r[i >> 1] & 0x7fffu;  // as random15
  // Codes 0..3 and 4..7 in two 32-bit halves: i*b < 32 for i < 4.
  uint32_t lo = 0, hi = 0;
  auto put = [&](int i, uint32_t q) {
    if (i < 4)
      lo |= q << (i * b);
    else
      hi |= q << ((i - 4) * b);
  };
  if (nv == 8) {  // the common case, without per-element predicates
#pragma unroll
    for (int i = 0; i < 8; ++i) put(i, quantize_one(grid, t[i], k[i]));
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) put(i, i < nv ? quantize_one(grid, t[i], k[i]) : 0u);
  }
  return (static_cast<uint64_t>(hi) << (4 * b)) | lo;
}

// Which group a lane works on, and where it lives.
struct GroupAt {
  int64_t n, d0;  // sample, first element in the sample
  int T;          // padded length (a multiple of 32)
  int left;       // real elements of the group (<= G)
  Stream s;
};

__device__ __forceinline__ GroupAt group_at(const Plan& p, const int32_t* sbits, const int64_t* woff,
                                            int64_t gi) {
  GroupAt g;
  if (p.N * p.ngroups < (int64_t(1) << 31)) {
    g.n = static_cast<uint32_t>(gi) / static_cast<uint32_t>(p.ngroups);
  } else {
    g.n = gi / p.ngroups;
  }
  g.d0 = (gi - g.n * p.ngroups) * p.G;
  g.T = static_cast<int>(p.Dp - g.d0 < p.G ? p.Dp - g.d0 : p.G);
  g.left = static_cast<int>(p.D - g.d0 < p.G ? p.D - g.d0 : p.G);
  g.s = sample_stream(p, sbits, woff, g.n);
  return g;
}

__device__ __forceinline__ int clamp8(int r) { return r <= 0 ? 0 : (r >= 8 ? 8 : r); }

// A team of TEAM lanes works on one group; a warp on 32/TEAM consecutive
// groups at a time, in a grid-stride loop.  Lane t of a team holds pieces
// j*TEAM + t (8 elements each) of its group: a team's loads are contiguous.
// P > 0: P pieces per lane, kept in registers between the min/max and the
// rounding; P == 0: groups of 2048 or more, read twice.
template <typename scalar_t, int TEAM, int P, bool VEC>
__global__ void __launch_bounds__(kWarps * 32)
    quantize_kernel(Plan p, const scalar_t* __restrict__ x, const int32_t* __restrict__ sbits,
                    const int64_t* __restrict__ woff, const float* __restrict__ global_range,
                    uint8_t* __restrict__ packed, void* mn, void* mx, bool bf16,
                    at::PhiloxCudaState st) {
  constexpr int kGroupsPerWarp = 32 / TEAM;
  const int lane = threadIdx.x & 31, t = lane % TEAM;
  uint64_t seed, offset;
  seed_of(p, st, seed, offset);
  const int64_t total = p.N * p.ngroups;
  const int pieces = P ? P : static_cast<int>(p.G / (8 * TEAM));
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
       w * kGroupsPerWarp < total; w += warps) {
    const int64_t gi = w * kGroupsPerWarp + lane / TEAM;
    const bool active = gi < total;  // lanes past the end still join the shuffles
    const GroupAt g = group_at(p, sbits, woff, active ? gi : total - 1);
    const scalar_t* xg = x + g.n * p.D + g.d0;
    auto elem = [&](int j) { return (j * TEAM + t) * 8; };

    float v[P ? P : 1][8];
    float lo = INFINITY, hi = -INFINITY;
    auto take = [&](float u) {
      lo = dev_min(lo, u);
      hi = dev_max(hi, u);
    };
    auto reduce = [&](const float (&u)[8], int nv) {
      if (nv == 8) {  // without per-element predicates
#pragma unroll
        for (int i = 0; i < 8; ++i) take(u[i]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i < nv) take(u[i]);
      }
    };
    if (p.pergroup) {
      if (P) {
#pragma unroll
        for (int j = 0; j < (P ? P : 1); ++j) {
          const int nv = active ? clamp8(g.left - elem(j)) : 0;
          load_chunk<scalar_t, 8, VEC>(xg + elem(j), nv, v[j]);
          reduce(v[j], nv);
        }
      } else {
        for (int j = 0; j < pieces; ++j) {
          const int nv = active ? clamp8(g.left - elem(j)) : 0;
          float u[8];
          load_chunk<scalar_t, 8, VEC>(xg + elem(j), nv, u);
          reduce(u, nv);
        }
      }
#pragma unroll
      for (int o = TEAM / 2; o > 0; o >>= 1) {
        lo = dev_min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = dev_max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
      }
      if (active && t == 0) {
        store_range(mn, bf16, gi, lo, false);
        store_range(mx, bf16, gi, hi, true);
      }
    } else {
      lo = global_range[0];
      hi = global_range[1];
      if (gi == 0) {
        store_range(mn, bf16, 0, lo, false);
        store_range(mx, bf16, 0, hi, true);
      }
    }
    if (!active) continue;
    const Grid grid = make_grid(round_range(lo, bf16, false), round_range(hi, bf16, true), g.s.b);
    uint8_t* gb = packed + 4 * g.s.word + g.d0 * g.s.b / 8;
    const int64_t e0 = g.n * p.Dp + g.d0;
    auto emit = [&](int j, const float (&u)[8], const Philox4& r) {
      const int d = elem(j);
      if (d >= g.T) return;
      store_piece(gb + (d / 8) * g.s.b, g.s.b, encode_piece(grid, u, clamp8(g.left - d), g.s.b, r));
    };
    if (P && p.pergroup) {
      // All pieces' random numbers first: independent Philox chains that the
      // scheduler can interleave.
      Philox4 r[P ? P : 1];
#pragma unroll
      for (int j = 0; j < (P ? P : 1); ++j) r[j] = piece_random(p.stochastic, e0 + elem(j), offset, seed);
#pragma unroll
      for (int j = 0; j < (P ? P : 1); ++j) emit(j, v[j], r[j]);
    } else {
      for (int j = 0; j < pieces; ++j) {
        float u[8];
        load_chunk<scalar_t, 8, VEC>(xg + elem(j), clamp8(g.left - elem(j)), u);
        emit(j, u, piece_random(p.stochastic, e0 + elem(j), offset, seed));
      }
    }
  }
}

// Reads the nb (<= 32) bits at bit `bit` of a 4-byte aligned stream.
__device__ __forceinline__ uint32_t load_bits32(const uint32_t* words, int64_t bit, int nb) {
  const int64_t w = bit >> 5;
  const int s = static_cast<int>(bit & 31);
  uint32_t c = words[w] >> s;
  if (s + nb > 32) c |= words[w + 1] << (32 - s);
  return nb == 32 ? c : c & ((1u << nb) - 1u);
}

// Same teams as quantize_kernel, but a lane's unit is a 16-byte block of
// output (E = 4 fp32 or 8 fp16/bf16 elements), so that every store
// instruction of a team covers contiguous memory; codes are read with
// funnel shifts from whatever words hold them.
template <typename scalar_t, int TEAM, int P, bool VEC>
__global__ void __launch_bounds__(kWarps * 32)
    dequantize_kernel(Plan p, const uint8_t* __restrict__ packed, const void* mn, const void* mx,
                      bool bf16, const int32_t* __restrict__ sbits,
                      const int64_t* __restrict__ woff, scalar_t* __restrict__ y) {
  constexpr int E = 16 / sizeof(scalar_t);
  constexpr int kGroupsPerWarp = 32 / TEAM;
  const int lane = threadIdx.x & 31, t = lane % TEAM;
  const int64_t total = p.N * p.ngroups;
  const int blocks = static_cast<int>(p.G / (E * TEAM));  // per lane
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
       w * kGroupsPerWarp < total; w += warps) {
    const int64_t gi = w * kGroupsPerWarp + lane / TEAM;
    if (gi >= total) continue;  // no shuffles below
    const GroupAt g = group_at(p, sbits, woff, gi);
    const int64_t ri = p.pergroup ? gi : 0;
    const Grid grid = make_grid(load_range(mn, bf16, ri), load_range(mx, bf16, ri), g.s.b);
    const uint32_t* gw = reinterpret_cast<const uint32_t*>(packed) + g.s.word + g.d0 * g.s.b / 32;
    const uint32_t mask = (1u << g.s.b) - 1u;
    const int nb = E * g.s.b;  // <= 64
    scalar_t* yg = y + g.n * p.D + g.d0;
#pragma unroll(P ? 4 * P / (E / 2) : 1)
    for (int j = 0; j < blocks; ++j) {
      const int d = (j * TEAM + t) * E;
      if (d >= g.T) break;
      const int64_t bit = static_cast<int64_t>(d) * g.s.b;
      uint32_t lo32, hi32 = 0;
      if (nb <= 32) {
        lo32 = load_bits32(gw, bit, nb);
        if (E > 4) hi32 = lo32 >> (4 * g.s.b);  // b <= 4 here
      } else {  // E = 8, b > 4: two halves of 4 codes
        lo32 = load_bits32(gw, bit, nb / 2);
        hi32 = load_bits32(gw, bit + nb / 2, nb / 2);
      }
      const int r = g.left - d < E ? g.left - d : E;
      float f[E];
#pragma unroll
      for (int i = 0; i < E; ++i) f[i] = dequantize_one(grid, ((i < 4 ? lo32 : hi32) >> ((i & 3) * g.s.b)) & mask);
      Chunk<scalar_t, E> out;
      to_storage<scalar_t, E>(f, out.v);
      if (VEC && r == E) {
        store_raw<scalar_t, E>(yg + d, out);
      } else {
#pragma unroll
        for (int i = 0; i < E; ++i)
          if (i < r) yg[d + i] = out.v[i];
      }
    }
  }
}

// Calls f(TEAM, P, VEC) as integral constants for the plan's group size and
// whether every piece of `ptr` is aligned for vector access.
template <typename scalar_t, typename F>
void dispatch_chunk(const Plan& p, const void* ptr, F&& f) {
  auto go = [&](auto team, auto pieces) {
    const bool vec = p.D % 8 == 0 && reinterpret_cast<uintptr_t>(ptr) % 32 == 0;
    if (vec)
      f(team, pieces, std::true_type{});
    else
      f(team, pieces, std::false_type{});
  };
  using C1 = std::integral_constant<int, 1>;
  using C2 = std::integral_constant<int, 2>;
  using C4 = std::integral_constant<int, 4>;
  using C8 = std::integral_constant<int, 8>;
  using C16 = std::integral_constant<int, 16>;
  using C32 = std::integral_constant<int, 32>;
  using C0 = std::integral_constant<int, 0>;
  switch (p.G) {  // 32 elements per lane up to G = 1024
    case 32: go(C1{}, C4{}); break;
    case 64: go(C2{}, C4{}); break;
    case 128: go(C4{}, C4{}); break;
    case 256: go(C8{}, C4{}); break;
    case 512: go(C16{}, C4{}); break;
    case 1024: go(C32{}, C4{}); break;
    default: go(C32{}, C0{}); break;
  }
}

// Enough resident warps to fill the device; each loops over groups.
int64_t blocks_for(int64_t groups, int team) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t warps = (groups * team + 31) / 32;
  return std::max<int64_t>(1, std::min<int64_t>((warps + kWarps - 1) / kWarps, sms * 8));
}

#define AQ_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

void quantize_cuda(const Plan& plan, const at::Tensor& x, const at::Tensor& sample_bits,
                   const at::Tensor& word_offset, const at::Tensor& global_range,
                   at::Tensor& packed, at::Tensor& mn, at::Tensor& mx) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t groups = plan.N * plan.ngroups;
  if (groups == 0) return;
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
  AQ_DISPATCH_FLOATS(x.scalar_type(), "aq_quantize_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_chunk<scalar_t>(plan, xp, [&](auto team_tag, auto p_tag, auto vec_tag) {
      constexpr int TEAM = decltype(team_tag)::value;
      constexpr int P = decltype(p_tag)::value;
      constexpr bool VEC = decltype(vec_tag)::value;
      quantize_kernel<scalar_t, TEAM, P, VEC><<<blocks_for(groups, TEAM), kWarps * 32, 0, stream>>>(
          plan, xp, sb, wo, gr, packed.data_ptr<uint8_t>(),
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
  const bool bf16 = mn.scalar_type() == at::kBFloat16;
  const int32_t* sb = plan.bits ? nullptr : sample_bits.const_data_ptr<int32_t>();
  const int64_t* wo = plan.bits ? nullptr : word_offset.const_data_ptr<int64_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  AQ_DISPATCH_FLOATS(out.scalar_type(), "aq_dequantize_cuda", [&] {
    scalar_t* yp = out.data_ptr<scalar_t>();
    dispatch_chunk<scalar_t>(plan, yp, [&](auto team_tag, auto p_tag, auto vec_tag) {
      constexpr int TEAM = decltype(team_tag)::value;
      constexpr int P = decltype(p_tag)::value;
      constexpr bool VEC = decltype(vec_tag)::value;
      dequantize_kernel<scalar_t, TEAM, P, VEC><<<blocks_for(groups, TEAM), kWarps * 32, 0, stream>>>(
          plan, packed.const_data_ptr<uint8_t>(),
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

// ---------------------------------------------------------------------------
// Masks straight from the activation: a warp's ballot is the 32-element word;
// applying reads a word per element (from cache) next to the gradient.

namespace {

template <typename scalar_t>
__global__ void pack_positive_kernel(const scalar_t* __restrict__ x, int64_t n, uint32_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
       k < (n + 31) / 32; k += warps) {
    const int64_t i = k * 32 + lane;
    const bool on = i < n && static_cast<float>(x[i]) > 0.0f;
    const uint32_t word = __ballot_sync(0xffffffffu, on);
    if (lane == 0) out[k] = word;
  }
}

// E consecutive elements per thread (16 bytes when aligned; E divides 32, so
// they share one mask word).
template <typename scalar_t, int E>
__global__ void apply_mask_kernel(const scalar_t* __restrict__ g, const uint32_t* __restrict__ mask, int64_t n,
                                  at::opmath_type<scalar_t> scale, bool scaled, scalar_t* __restrict__ out) {
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

}  // namespace

void pack_positive_cuda(const at::Tensor& x, at::Tensor& packed) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "aq_pack_positive_cuda", [&] {
    pack_positive_kernel<scalar_t><<<grid_for(n, 256), 256, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), n, reinterpret_cast<uint32_t*>(packed.data_ptr<uint8_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// ---------------------------------------------------------------------------
// Per-sample allocation of a layer in one block.  Thread t owns samples t,
// t + kAllocThreads, ...; candidate removals (sample i, b -> b-1) have keys
// c_i * dinv[b] >= 0, whose IEEE bit patterns order like their values.  The
// greedy removes the R smallest in (key, i, b descending) order: a radix
// select finds the R-th key K, every key below K goes, and of the keys equal
// to K the first ones in sample order make up the rest.

namespace {

constexpr int kAllocThreads = 512;
struct MaxOp {
  __device__ double operator()(double a, double b) const { return a > b ? a : b; }
};
constexpr int kAllocPerThread = (kAllocMaxSamples + kAllocThreads - 1) / kAllocThreads;

__global__ void __launch_bounds__(kAllocThreads)
allocate_per_sample_kernel(const AllocPlan p, const float* __restrict__ range_sq, const float* __restrict__ grad_mean,
                           const float* __restrict__ stat, const int64_t* __restrict__ idx, int32_t* __restrict__ bits,
                           int64_t* __restrict__ word_offset, double* __restrict__ cost,
                           const double* __restrict__ extra) {
  using Reduce = cub::BlockReduce<double, kAllocThreads>;
  using ScanL = cub::BlockScan<int64_t, kAllocThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename ScanL::TempStorage scan;
  } tmp;
  __shared__ unsigned int hist[256];
  __shared__ double shared_value;
  __shared__ uint64_t prefix;
  __shared__ int64_t rank;
  const int t = threadIdx.x;
  const int64_t N = p.N;
  double c[kAllocPerThread];

  // s_n: per-sample statistics need the mean of the seen ones first.
  float known[kAllocPerThread];
  float mean = 1.0f;
  if (p.mode == 2) {
    double sum = 0, count = 0;
    for (int j = 0; j < kAllocPerThread; ++j) {
      const int64_t i = t + static_cast<int64_t>(j) * kAllocThreads;
      known[j] = -1.0f;
      if (i < N) {
        const int64_t k = idx[i];
        known[j] = k >= 0 && k < p.stat_size ? stat[k] : -1.0f;
        if (known[j] >= 0.0f) sum += known[j], count += 1;
      }
    }
    const double total = Reduce(tmp.reduce).Sum(sum);
    __syncthreads();
    const double seen = Reduce(tmp.reduce).Sum(count);
    if (t == 0) shared_value = seen > 0 ? static_cast<double>(static_cast<float>(total) / static_cast<float>(seen)) : 1.0;
    __syncthreads();
    mean = static_cast<float>(shared_value);
  }
  double local_max = -1.0;
  for (int j = 0; j < kAllocPerThread; ++j) {
    const int64_t i = t + static_cast<int64_t>(j) * kAllocThreads;
    c[j] = 0;
    if (i >= N) continue;
    float s = 1.0f;
    if (!p.batch_norm) {
      if (p.mode == 1) s = grad_mean[0];
      else if (p.mode == 2) s = known[j] >= 0.0f ? known[j] : mean;
      s = __fmul_rn(s, p.grad_scale);
    }
    double v = __dmul_rn(__dmul_rn(static_cast<double>(range_sq[i]), p.range_scale), static_cast<double>(s));
    if (extra) v = __dadd_rn(v, extra[i]);
    if (v <= 0) v = 0;  // also -0.0 -> +0.0; NaN stays
    c[j] = v;
    if (isfinite(v) && v > local_max) local_max = v;
  }
  if (cost) {  // sensitivities only
    for (int j = 0; j < kAllocPerThread; ++j) {
      const int64_t i = t + static_cast<int64_t>(j) * kAllocThreads;
      if (i < N) cost[i] = c[j];
    }
    return;
  }
  // NaN and +Inf take the largest finite value (1e300 if there is none).
  __syncthreads();
  const double maxf = Reduce(tmp.reduce).Reduce(local_max, MaxOp());
  if (t == 0) shared_value = maxf < 0 ? 1e300 : maxf;
  __syncthreads();
  for (int j = 0; j < kAllocPerThread; ++j)
    if (!isfinite(c[j])) c[j] = shared_value;

  const int m = p.ibits - 1;  // candidates per sample: b = ibits .. 2
  auto key = [&](int j, int b) { return static_cast<uint64_t>(__double_as_longlong(__dmul_rn(c[j], p.dinv[b]))); };
  uint64_t K = 0;
  int64_t need = 0;
  if (p.removals > 0 && p.removals < m * N) {
    if (t == 0) prefix = 0, rank = p.removals;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int d = t; d < 256; d += kAllocThreads) hist[d] = 0;
      __syncthreads();
      const uint64_t high = shift == 56 ? 0 : ~uint64_t(0) << (shift + 8);
      const uint64_t want = prefix & high;
      for (int j = 0; j < kAllocPerThread; ++j) {
        if (t + static_cast<int64_t>(j) * kAllocThreads >= N) break;
        for (int b = p.ibits; b >= 2; --b) {
          const uint64_t k = key(j, b);
          if ((k & high) == want) atomicAdd(&hist[(k >> shift) & 255], 1u);
        }
      }
      __syncthreads();
      if (t == 0) {
        int64_t below = 0;
        for (int d = 0; d < 256; ++d) {
          if (below + hist[d] >= rank) {
            prefix |= static_cast<uint64_t>(d) << shift;
            rank -= below;
            break;
          }
          below += hist[d];
        }
      }
      __syncthreads();
    }
    K = prefix;
    need = rank;  // candidates equal to K still to remove
  }
  // Removals per sample, then bits and word offsets by block scans in sample order.
  int64_t carry_eq = 0, carry_words = 0;
  for (int j = 0; j < kAllocPerThread; ++j) {
    const int64_t i = t + static_cast<int64_t>(j) * kAllocThreads;
    int less = 0, eq = 0;
    if (i < N && p.removals >= m * N) {
      less = m;
    } else if (i < N && p.removals > 0) {
      for (int b = p.ibits; b >= 2; --b) {
        const uint64_t k = key(j, b);
        less += k < K;
        eq += k == K;
      }
    }
    int64_t before = 0, round_eq = 0;
    __syncthreads();
    ScanL(tmp.scan).ExclusiveSum(static_cast<int64_t>(eq), before, round_eq);
    before += carry_eq;
    carry_eq += round_eq;
    const int64_t left = need - before;
    const int64_t take = left <= 0 ? 0 : left < eq ? left : eq;
    const int b = p.ibits - less - static_cast<int>(take);
    const int64_t words = i < N ? static_cast<int64_t>(b) * p.words_per_bit : 0;
    int64_t start = 0, round_words = 0;
    __syncthreads();
    ScanL(tmp.scan).ExclusiveSum(words, start, round_words);
    if (i < N) {
      bits[i] = b;
      word_offset[i] = carry_words + start;
    }
    carry_words += round_words;
  }
}

}  // namespace

void allocate_per_sample_cuda(const AllocPlan& plan, const at::Tensor& range_sq, const at::Tensor& grad_mean,
                              const at::Tensor& sample_stat, const at::Tensor& indices, at::Tensor& bits,
                              at::Tensor& word_offset, at::Tensor* cost, const at::Tensor& extra) {
  const c10::cuda::CUDAGuard guard(range_sq.device());
  if (plan.N == 0) return;
  TORCH_CHECK(plan.N <= kAllocMaxSamples, "aq: per-sample allocation of more than ", kAllocMaxSamples, " samples");
  auto stream = at::cuda::getCurrentCUDAStream();
  allocate_per_sample_kernel<<<1, kAllocThreads, 0, stream>>>(
      plan, range_sq.const_data_ptr<float>(), plan.mode == 1 ? grad_mean.const_data_ptr<float>() : nullptr,
      plan.mode == 2 ? sample_stat.const_data_ptr<float>() : nullptr,
      plan.mode == 2 ? indices.const_data_ptr<int64_t>() : nullptr, cost ? nullptr : bits.data_ptr<int32_t>(),
      cost ? nullptr : word_offset.data_ptr<int64_t>(), cost ? cost->data_ptr<double>() : nullptr,
      extra.defined() ? extra.const_data_ptr<double>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// ||R_n||^2 per sample: a block per sample, a warp per group (strided), min
// and max propagating NaN, the squares summed in a fixed order.

namespace {

// min and max in which NaN sticks: once mn (mx) is NaN nothing replaces it.
__device__ __forceinline__ float nan_min(float a, float v) { return a != a ? a : (v < a || v != v) ? v : a; }
__device__ __forceinline__ float nan_max(float a, float v) { return a != a ? a : (v > a || v != v) ? v : a; }

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

}  // namespace

void range_sq_cuda(const at::Tensor& x, int64_t N, int64_t D, int64_t G, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (N == 0) return;
  if (D == 0) {
    out.zero_();
    return;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
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

}  // namespace aq::kernels
