// CUDA implementation of the compression kernels (see kernels.h).
//
// Quantize is one kernel and one pass over the input: a team of lanes owns a
// group and loads it once into registers (32 fp32 or 64 16-bit elements per
// lane, as loaded; groups larger than a team holds are read twice, the second
// time mostly from cache), reduces min/max (16-bit inputs as packed pairs)
// and shuffles, then rounds with two FMAs per element and Philox numbers and
// writes its packed bytes, with the group's bit width a compile-time
// constant.  Dequantize writes 16-byte units, contiguous across a team, one
// FMA per value.  Everything runs on the current stream; nothing waits for
// the host.  docs/kernel-benchmarks.md has the figures and the profile.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/detail/UnpackRaw.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
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
__constant__ uint32_t kRoundBaseReg[1] = {kRoundBase};             // see encode_piece()
__constant__ uint32_t kCodeBaseReg[1] = {0x4b000000u};             // see decode_piece()

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

// A piece: 8 consecutive elements of one group, as loaded (16-bit types as 4
// words of pairs).  A lane's pieces stay in registers between the group's
// min/max and its rounding.
template <typename scalar_t>
struct Piece {
  static constexpr int kWords = 2 * sizeof(scalar_t);
  uint32_t w[kWords];
};

template <typename scalar_t>
constexpr bool is_fp32() {
  return std::is_same_v<scalar_t, float>;
}
template <typename scalar_t>
constexpr bool is_bf16() {
  return std::is_same_v<scalar_t, c10::BFloat16>;
}

// Raw bits of element i of src (16-bit types in the low half).
template <typename scalar_t>
__device__ __forceinline__ uint32_t raw_bits(const scalar_t* src, int i) {
  if constexpr (is_fp32<scalar_t>())
    return __float_as_uint(src[i]);
  else
    return reinterpret_cast<const uint16_t*>(src)[i];
}

// All 8 elements (16-byte aligned), or the first nv (0..8) and zeros.
template <typename scalar_t>
__device__ __forceinline__ void load_piece(const scalar_t* src, Piece<scalar_t>& p) {
#pragma unroll
  for (int k = 0; k < Piece<scalar_t>::kWords / 4; ++k) {
    const uint4 u = reinterpret_cast<const uint4*>(src)[k];
    p.w[4 * k] = u.x;
    p.w[4 * k + 1] = u.y;
    p.w[4 * k + 2] = u.z;
    p.w[4 * k + 3] = u.w;
  }
}
template <typename scalar_t>
__device__ __forceinline__ void load_piece(const scalar_t* src, int nv, Piece<scalar_t>& p) {
#pragma unroll
  for (int k = 0; k < Piece<scalar_t>::kWords; ++k) p.w[k] = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i >= nv) break;
    if constexpr (is_fp32<scalar_t>())
      p.w[i] = raw_bits(src, i);
    else
      p.w[i >> 1] |= raw_bits(src, i) << (16 * (i & 1));
  }
}

// Element i of a piece as a float (exact for every input type).
template <typename scalar_t>
__device__ __forceinline__ float piece_float(const Piece<scalar_t>& p, int i) {
  if constexpr (is_fp32<scalar_t>()) {
    return __uint_as_float(p.w[i]);
  } else if constexpr (is_bf16<scalar_t>()) {
    const uint32_t w = p.w[i >> 1];
    return __uint_as_float((i & 1) ? (w & 0xffff0000u) : (w << 16));
  } else {
    const uint32_t w = p.w[i >> 1];
    return __half2float(__ushort_as_half(static_cast<unsigned short>((i & 1) ? (w >> 16) : (w & 0xffffu))));
  }
}

// NaN-propagating min/max of packed pairs (one instruction for two elements).
template <typename scalar_t>
__device__ __forceinline__ uint32_t pair_min(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (is_bf16<scalar_t>())
    asm("min.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  else
    asm("min.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
template <typename scalar_t>
__device__ __forceinline__ uint32_t pair_max(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (is_bf16<scalar_t>())
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  else
    asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// A lane's running min and max: floats, plus packed pairs for 16-bit inputs.
template <typename scalar_t>
struct MinMax {
  float lo = INFINITY, hi = -INFINITY;
  uint32_t lo2 = is_bf16<scalar_t>() ? 0x7f807f80u : 0x7c007c00u;  // +inf pairs
  uint32_t hi2 = is_bf16<scalar_t>() ? 0xff80ff80u : 0xfc00fc00u;  // -inf pairs

  __device__ __forceinline__ void add(const Piece<scalar_t>& p) {  // all 8 elements
#pragma unroll
    for (int k = 0; k < Piece<scalar_t>::kWords; ++k) {
      if constexpr (is_fp32<scalar_t>()) {
        lo = dev_min(lo, __uint_as_float(p.w[k]));
        hi = dev_max(hi, __uint_as_float(p.w[k]));
      } else {
        lo2 = pair_min<scalar_t>(lo2, p.w[k]);
        hi2 = pair_max<scalar_t>(hi2, p.w[k]);
      }
    }
  }
  __device__ __forceinline__ void add(const Piece<scalar_t>& p, int nv) {  // the first nv
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i >= nv) break;
      lo = dev_min(lo, piece_float(p, i));
      hi = dev_max(hi, piece_float(p, i));
    }
  }
  __device__ __forceinline__ void finish() {
    if constexpr (!is_fp32<scalar_t>()) {
      Piece<scalar_t> l{{lo2, 0, 0, 0}}, h{{hi2, 0, 0, 0}};
      lo = dev_min(lo, dev_min(piece_float(l, 0), piece_float(l, 1)));
      hi = dev_max(hi, dev_max(piece_float(h, 0), piece_float(h, 1)));
    }
  }
};

// The 8*b bits of a piece's codes, at byte (d/8)*b of its group's stream:
// one store for b = 1, 2, 4, 8 (aligned), bytes otherwise.
template <int B>
__device__ __forceinline__ void store_codes(uint8_t* dst, uint64_t c) {
  if constexpr (B == 1) {
    *dst = static_cast<uint8_t>(c);
  } else if constexpr (B == 2) {
    *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(c);
  } else if constexpr (B == 4) {
    *reinterpret_cast<uint32_t*>(dst) = static_cast<uint32_t>(c);
  } else if constexpr (B == 8) {  // streams are only 4-byte aligned
    reinterpret_cast<uint32_t*>(dst)[0] = static_cast<uint32_t>(c);
    reinterpret_cast<uint32_t*>(dst)[1] = static_cast<uint32_t>(c >> 32);
  } else {
#pragma unroll
    for (int i = 0; i < B; ++i) dst[i] = static_cast<uint8_t>(c >> (8 * i));
  }
}
template <int B>
__device__ __forceinline__ uint64_t load_codes(const uint8_t* src) {
  if constexpr (B == 1) {
    return *src;
  } else if constexpr (B == 2) {
    return *reinterpret_cast<const uint16_t*>(src);
  } else if constexpr (B == 4) {
    return *reinterpret_cast<const uint32_t*>(src);
  } else if constexpr (B == 8) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(src);
    return (static_cast<uint64_t>(w[1]) << 32) | w[0];
  } else {
    uint64_t c = 0;
#pragma unroll
    for (int i = 0; i < B; ++i) c |= static_cast<uint64_t>(src[i]) << (8 * i);
    return c;
  }
}

// The Philox words of a piece (counter: its first element / 8); a
// deterministic stand-in when rounding to nearest.
__device__ __forceinline__ Philox4 piece_random(bool stochastic, uint64_t counter, uint64_t offset, uint64_t seed) {
  if (!stochastic) {
    const uint32_t w = kNearest | (kNearest << 17);  // random15 = kNearest for every element
    return Philox4{{w, w, w, w}};
  }
  return philox(counter, offset, seed, kPhiloxMul[0], kPhiloxMul[1]);
}

// Rounds and packs a piece's first nv elements (the rest get code 0) to b =
// B bits each: 8*b bits, code i at bit i*b.
template <int B, typename scalar_t>
__device__ __forceinline__ uint64_t encode_piece(const Grid& g, const Piece<scalar_t>& p, const Philox4& r,
                                                 int nv = 8) {
  constexpr bool kClamp = sizeof(scalar_t) >= 4;  // see quantize_bits
  uint32_t lo = 0, hi = 0;
  uint64_t wide = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    // 256 + k / 2^15 with k as random15: one instruction each (LEA.HI for
    // the top bits; LOP3 with the exponent from a register for the low bits).
    const uint32_t w = r.r[i >> 1];
    uint32_t rb;
    if (i & 1)
      rb = (w >> 17) + kRoundBase;
    else
      asm("lop3.b32 %0, %1, 0x7fff, %2, 0xEA;" : "=r"(rb) : "r"(w), "r"(kRoundBaseReg[0]));  // (w & 0x7fff) | base
    uint32_t q = quantize_bits(g, piece_float(p, i), rb, (1u << B) - 1u, kClamp);
    if (i >= nv) q = 0;
    if constexpr (B == 1 || B == 2 || B == 4) {
      lo |= q << (i * B);
    } else if constexpr (B == 8) {
      if (i < 4)
        lo |= q << (8 * i);
      else
        hi |= q << (8 * i - 32);
    } else {
      wide |= static_cast<uint64_t>(q) << (i * B);
    }
  }
  if constexpr (B == 1 || B == 2 || B == 4 || B == 8)
    return (static_cast<uint64_t>(hi) << 32) | lo;
  else
    return wide;
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

// How lanes share the groups: a team of 2^team_log2 lanes per group, P
// pieces per lane per chunk and `chunks` chunks per group (1 unless the
// group is larger than a team holds in registers).  Lane t of a team holds
// pieces (c P + j) team + t of its group, so a team's accesses are
// contiguous.
struct Teams {
  int team_log2;
  int chunks;
  bool vec;  // every full group's pieces are 16-byte aligned
};

// Calls f(B) with B = b as an integral constant (1..8).
template <typename F>
__device__ __forceinline__ void with_bits(int b, F&& f) {
  switch (b) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Element of piece j of chunk c of lane t's group.
__device__ __forceinline__ int piece_elem(const Teams& tm, int t, int P, int c, int j) {
  return (((c * P + j) << tm.team_log2) | t) * 8;
}

// Chunk c of a full group's pieces.
template <typename scalar_t, int P>
__device__ __forceinline__ void load_pieces(const Teams& tm, int t, const scalar_t* xg, int c,
                                            Piece<scalar_t> (&v)[P]) {
#pragma unroll
  for (int j = 0; j < P; ++j) load_piece(xg + piece_elem(tm, t, P, c, j), v[j]);
}

// The min and max of the group a lane's team works on (left: its real
// elements; full: all G of them, 16-byte aligned).  Every lane of the warp
// calls it, for the shuffles.  A full group's last chunk stays in v.
template <typename scalar_t, int P>
__device__ __forceinline__ void group_min_max(const Teams& tm, int t, const scalar_t* xg, int left, bool full,
                                              bool active, Piece<scalar_t> (&v)[P], float& lo, float& hi) {
  MinMax<scalar_t> m;
  if (full) {
    for (int c = 0; c < tm.chunks; ++c) {
      load_pieces(tm, t, xg, c, v);
#pragma unroll
      for (int j = 0; j < P; ++j) m.add(v[j]);
    }
  } else if (active) {
#pragma unroll 1
    for (int k = 0; k < tm.chunks * P; ++k) {
      const int d = ((k << tm.team_log2) | t) * 8;
      Piece<scalar_t> pc;
      load_piece(xg + d, clamp8(left - d), pc);
      m.add(pc, clamp8(left - d));
    }
  }
  m.finish();
  lo = m.lo;
  hi = m.hi;
  for (int o = (1 << tm.team_log2) >> 1; o > 0; o >>= 1) {
    lo = dev_min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = dev_max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
}

template <typename scalar_t, int P>
__global__ void __launch_bounds__(kWarps * 32)
    quantize_kernel(Plan p, Teams tm, const scalar_t* __restrict__ x, const int32_t* __restrict__ sbits,
                    const int64_t* __restrict__ woff, const float* __restrict__ global_range,
                    uint8_t* __restrict__ packed, void* mn, void* mx, bool bf16, at::PhiloxCudaState st) {
  const int lane = threadIdx.x & 31, t = lane & ((1 << tm.team_log2) - 1);
  const int groups_per_warp = 32 >> tm.team_log2;
  uint64_t seed, offset;
  seed_of(p, st, seed, offset);
  const int64_t total = p.N * p.ngroups;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); w * groups_per_warp < total;
       w += warps) {
    const int64_t gi = w * groups_per_warp + (lane >> tm.team_log2);
    const bool active = gi < total;  // lanes past the end still join the shuffles
    const GroupAt g = group_at(p, sbits, woff, active ? gi : total - 1);
    const scalar_t* xg = x + g.n * p.D + g.d0;
    const bool full = tm.vec && g.left == p.G;
    auto elem = [&](int c, int j) { return piece_elem(tm, t, P, c, j); };
    Piece<scalar_t> v[P];
    auto load = [&](int c) { load_pieces(tm, t, xg, c, v); };  // full groups
    float lo, hi;
    if (p.pergroup) {
      group_min_max(tm, t, xg, g.left, full, active, v, lo, hi);
      if (active && t == 0) {
        store_range(mn, bf16, gi, lo, false);
        store_range(mx, bf16, gi, hi, true);
      }
    } else {
      if (full && tm.chunks == 1) load(0);
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
    const uint64_t counter0 = static_cast<uint64_t>(g.n * p.Dp + g.d0) >> 3;
    if (full) {  // the pieces in registers, every element real
      with_bits(g.s.b, [&](auto b_tag) {
        constexpr int B = decltype(b_tag)::value;
        for (int c = 0; c < tm.chunks; ++c) {
          if (tm.chunks > 1) load(c);
#pragma unroll
          for (int j = 0; j < P; ++j) {
            const int d = elem(c, j);
            const Philox4 r = piece_random(p.stochastic, counter0 + d / 8, offset, seed);
            store_codes<B>(gb + (d / 8) * B, encode_piece<B>(grid, v[j], r));
          }
        }
      });
    } else {  // a tail or unaligned group: pieces reloaded one at a time
      with_bits(g.s.b, [&](auto b_tag) {
        constexpr int B = decltype(b_tag)::value;
#pragma unroll 1
        for (int k = 0; k < tm.chunks * P; ++k) {
          const int d = ((k << tm.team_log2) | t) * 8;
          if (d >= g.T) continue;  // past the padded end: no bytes
          const int nv = clamp8(g.left - d);
          Piece<scalar_t> pc;
          load_piece(xg + d, nv, pc);
          const Philox4 r = piece_random(p.stochastic, counter0 + d / 8, offset, seed);
          store_codes<B>(gb + (d / 8) * B, encode_piece<B>(grid, pc, r, nv));
        }
      });
    }
  }
}

// The E*b bits of codes of unit u of a group's stream (E = 4 or 8 elements;
// for E = 4 and odd b, a unit starts in the middle of a byte).
template <int E, int B>
__device__ __forceinline__ uint64_t load_unit_codes(const uint8_t* gb, int u) {
  if constexpr (E == 8) {
    return load_codes<B>(gb + u * B);
  } else if constexpr (B % 2 == 0) {
    const uint8_t* src = gb + u * (B / 2);
    if constexpr (B == 2) return *src;
    if constexpr (B == 4) return *reinterpret_cast<const uint16_t*>(src);
    if constexpr (B == 8) return *reinterpret_cast<const uint32_t*>(src);
    return src[0] | (src[1] << 8) | (src[2] << 16);  // B = 6
  } else {
    const uint8_t* src = gb + ((u * B) >> 1);
    uint32_t c = 0;
#pragma unroll
    for (int i = 0; i < (B + 1) / 2; ++i) c |= static_cast<uint32_t>(src[i]) << (8 * i);
    return c >> (4 * (u & 1));
  }
}

// A unit's E values from its codes.  FAST: the grid's step2 is finite, so a
// value is one FMA from the code's exact float (see dequantize_one).
template <int E, int B, bool FAST, typename scalar_t>
__device__ __forceinline__ void decode_unit(const Grid& g, uint64_t c, scalar_t (&out)[E]) {
  constexpr uint32_t kMask = (1u << B) - 1u;
  float f[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const uint32_t sh = (E * B <= 32 || i * B + B <= 32) ? static_cast<uint32_t>(c) >> (i * B)
                                                        : static_cast<uint32_t>(c >> (i * B));
    if constexpr (FAST) {
      uint32_t fb;  // 2^23 + q: (sh & mask) | exponent, in one instruction
      asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(fb) : "r"(sh), "n"(kMask), "r"(kCodeBaseReg[0]));
      f[i] = __fmaf_rn(__fsub_rn(__uint_as_float(fb), kMagic), g.step2, g.mn);
    } else {
      f[i] = dequantize_one(g, sh & kMask);
    }
  }
  to_storage<scalar_t, E>(f, out);
}

// The same teams, but a lane's unit is 16 bytes of output (E = 4 fp32 or 8
// 16-bit elements), so that every store instruction of a team covers
// contiguous memory: lane t writes units k team + t of its group.
template <typename scalar_t, int P>
__global__ void __launch_bounds__(kWarps * 32)
    dequantize_kernel(Plan p, Teams tm, const uint8_t* __restrict__ packed, const void* mn, const void* mx,
                      bool bf16, const int32_t* __restrict__ sbits, const int64_t* __restrict__ woff,
                      scalar_t* __restrict__ y) {
  constexpr int E = 16 / sizeof(scalar_t);
  constexpr int U = 8 * P / E;  // units per lane per chunk
  const int lane = threadIdx.x & 31, t = lane & ((1 << tm.team_log2) - 1);
  const int groups_per_warp = 32 >> tm.team_log2;
  const int64_t total = p.N * p.ngroups;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); w * groups_per_warp < total;
       w += warps) {
    const int64_t gi = w * groups_per_warp + (lane >> tm.team_log2);
    if (gi >= total) continue;  // no shuffles below
    const GroupAt g = group_at(p, sbits, woff, gi);
    const int64_t ri = p.pergroup ? gi : 0;
    const Grid grid = make_grid(load_range(mn, bf16, ri), load_range(mx, bf16, ri), g.s.b);
    const uint8_t* gb = packed + 4 * g.s.word + g.d0 * g.s.b / 8;
    scalar_t* yg = y + g.n * p.D + g.d0;
    const bool full = tm.vec && g.left == p.G && is_finite(grid.step2);
    with_bits(g.s.b, [&](auto b_tag) {
      constexpr int B = decltype(b_tag)::value;
      if (full) {
        for (int c = 0; c < tm.chunks; ++c) {
          uint64_t codes[U];  // all loads first
#pragma unroll
          for (int j = 0; j < U; ++j) codes[j] = load_unit_codes<E, B>(gb, ((c * U + j) << tm.team_log2) | t);
#pragma unroll
          for (int j = 0; j < U; ++j) {
            const int u = ((c * U + j) << tm.team_log2) | t;
            scalar_t out[E];
            decode_unit<E, B, true>(grid, codes[j], out);
            uint4 v;
            memcpy(&v, out, 16);
            reinterpret_cast<uint4*>(yg)[u] = v;
          }
        }
      } else {  // a tail or unaligned group, or a range beyond FLT_MAX
#pragma unroll 1
        for (int k = 0; k < tm.chunks * U; ++k) {
          const int u = (k << tm.team_log2) | t, d = u * E;
          if (d >= g.left) continue;
          scalar_t out[E];
          decode_unit<E, B, false>(grid, load_unit_codes<E, B>(gb, u), out);
          const int r = g.left - d < E ? g.left - d : E;
#pragma unroll
          for (int i = 0; i < E; ++i)
            if (i < r) yg[d + i] = out[i];
        }
      }
    });
  }
}

// Team shape for a plan: P pieces (8 elements each) per lane, at most 32
// lanes per group, chunks for larger groups.
Teams teams_for(const Plan& p, int P, const void* ptr) {
  Teams tm;
  const int64_t per_lane = 8 * static_cast<int64_t>(P);
  const int64_t lanes = std::min<int64_t>(32, std::max<int64_t>(1, p.G / per_lane));
  tm.team_log2 = 0;
  while ((int64_t(1) << tm.team_log2) < lanes) ++tm.team_log2;
  tm.chunks = static_cast<int>(std::max<int64_t>(1, p.G / (per_lane * lanes)));
  tm.vec = p.D % 8 == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  return tm;
}

// As many blocks as the device holds at once (each loops over groups, so a
// second wave would only add a tail), or fewer for small tensors.
template <auto Kernel>
int64_t blocks_for(int64_t groups, const Teams& tm) {
  static const int per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kWarps * 32, 0));
    return std::max(1, n);
  }();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t warps = ((groups << tm.team_log2) + 31) / 32;
  return std::max<int64_t>(1, std::min<int64_t>((warps + kWarps - 1) / kWarps, sms * per_sm));
}

// Pieces per lane: 4 for fp32 (32 registers of data), 8 for 16-bit inputs
// (the same registers), 4 when a group is smaller than 8 pieces.
template <typename scalar_t, typename F>
void with_pieces(const Plan& p, F&& f) {
  if constexpr (sizeof(scalar_t) == 2) {
    if (p.G >= 64) return f(std::integral_constant<int, 8>{});
  }
  f(std::integral_constant<int, 4>{});
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
    with_pieces<scalar_t>(plan, [&](auto p_tag) {
      constexpr int P = decltype(p_tag)::value;
      const Teams tm = teams_for(plan, P, xp);
      quantize_kernel<scalar_t, P><<<blocks_for<quantize_kernel<scalar_t, P>>(groups, tm), kWarps * 32, 0, stream>>>(
          plan, tm, xp, sb, wo, gr, packed.data_ptr<uint8_t>(), mn.data_ptr(), mx.data_ptr(), bf16, st);
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
    with_pieces<scalar_t>(plan, [&](auto p_tag) {
      constexpr int P = decltype(p_tag)::value;
      const Teams tm = teams_for(plan, P, yp);
      dequantize_kernel<scalar_t, P><<<blocks_for<dequantize_kernel<scalar_t, P>>(groups, tm), kWarps * 32, 0, stream>>>(
          plan, tm, packed.const_data_ptr<uint8_t>(), mn.const_data_ptr(), mx.const_data_ptr(), bf16, sb, wo, yp);
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
// With y given, the same pass writes y = relu(x) (y may be x): ReLU and its
// mask in one read.

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

}  // namespace

void pack_positive_cuda(const at::Tensor& x, at::Tensor& packed, at::Tensor* relu_out, int64_t group_size,
                        float* r2) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  TORCH_CHECK(!relu_out || (relu_out->numel() == n && relu_out->scalar_type() == x.scalar_type() &&
                            relu_out->is_contiguous() && x.scalar_type() != at::kBool),
              "aq: pack_positive_cuda: relu_out must be a flat floating tensor like x");
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
                "aq: pack_positive_cuda: group ranges need whole aligned chunks of ", kChunk, " elements");
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
  __shared__ uint64_t prefix, found;
  __shared__ int64_t rank;
  __shared__ int single;
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
  const int rounds = static_cast<int>((N + kAllocThreads - 1) / kAllocThreads);  // the same for every thread
  const int lane = t & 31;
  uint64_t K = 0;
  int64_t need = 0;
  if (p.removals > 0 && p.removals < m * N) {
    // Radix select of the removals-th smallest key, a byte at a time from
    // the top.  A warp's lanes with keys in the same bucket add to its
    // count once (a bucket can hold nearly every key); the bucket is found
    // by a scan in one warp; once it holds a single key, that key is K.
    if (t == 0) prefix = 0, rank = p.removals, single = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int d = t; d < 256; d += kAllocThreads) hist[d] = 0;
      __syncthreads();
      const uint64_t high = shift == 56 ? 0 : ~uint64_t(0) << (shift + 8);
      const uint64_t want = prefix & high;
      for (int j = 0; j < rounds; ++j) {
        const bool valid = t + static_cast<int64_t>(j) * kAllocThreads < N;
        for (int b = p.ibits; b >= 2; --b) {
          const uint64_t k = valid ? key(j, b) : 0;
          const unsigned bucket = valid && (k & high) == want ? static_cast<unsigned>(k >> shift) & 255u : 256u;
          const unsigned peers = __match_any_sync(0xffffffffu, bucket);
          if (bucket < 256u && lane == __ffs(peers) - 1) atomicAdd(&hist[bucket], __popc(peers));
        }
      }
      __syncthreads();
      if (t < 32) {  // lane L holds buckets 8L .. 8L + 7
        unsigned cnt[8];
        long long sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) cnt[i] = hist[8 * lane + i], sum += cnt[i];
        long long incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const long long v = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += v;
        }
        const long long r = rank;
        const int first = __ffs(__ballot_sync(0xffffffffu, incl >= r)) - 1;
        if (lane == first) {
          long long below = incl - sum;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (below + cnt[i] >= r) {
              prefix |= static_cast<uint64_t>(8 * lane + i) << shift;
              rank = r - below;
              single = cnt[i] == 1;
              break;
            }
            below += cnt[i];
          }
        }
      }
      __syncthreads();
      if (single) {  // the one key under the prefix found so far
        const uint64_t fixed = ~uint64_t(0) << shift, pre = prefix;
        for (int j = 0; j < rounds; ++j) {
          if (t + static_cast<int64_t>(j) * kAllocThreads >= N) break;
          for (int b = p.ibits; b >= 2; --b) {
            const uint64_t k = key(j, b);
            if ((k & fixed) == pre) found = k;
          }
        }
        __syncthreads();
        if (t == 0) prefix = found;
        __syncthreads();
        break;
      }
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

}  // namespace

void range_sq_cuda(const at::Tensor& x, int64_t N, int64_t D, int64_t G, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (N == 0) return;
  if (D == 0) {
    out.zero_();
    return;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  if (x.scalar_type() != at::kDouble && G >= 32 && (G & (G - 1)) == 0) {
    // Per group, then summed per sample by LibTorch (a fixed order).
    Plan p;
    p.N = N;
    p.D = D;
    p.G = G;
    p.ngroups = (D + G - 1) / G;
    p.Dp = (D + 31) / 32 * 32;
    p.bits = 1;  // unused: no stream
    auto r2 = at::empty({N, p.ngroups}, x.options().dtype(at::kFloat));
    AQ_DISPATCH_FLOATS(x.scalar_type(), "aq_group_range_sq_cuda", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      with_pieces<scalar_t>(p, [&](auto p_tag) {
        constexpr int P = decltype(p_tag)::value;
        const Teams tm = teams_for(p, P, xp);
        group_range_sq_kernel<scalar_t, P><<<blocks_for<group_range_sq_kernel<scalar_t, P>>(N * p.ngroups, tm),
                                             kWarps * 32, 0, stream>>>(p, tm, xp, r2.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
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

}  // namespace aq::kernels
