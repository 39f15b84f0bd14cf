// A group read by a team of lanes: its loads and its NaN-propagating min and
// max, shared by quantize (quantize_cuda.cu) and the range pass
// (ranges_cuda.cu), so that both see a group's range the same way.
//
// A team of lanes owns a group and loads it once into registers (32 fp32 or
// 64 16-bit elements per lane, as loaded; groups larger than a team holds
// are read twice, the second time mostly from cache) and reduces min/max
// (16-bit inputs as packed pairs), then shuffles.
#pragma once

#include "arith.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace aq::kernels {

constexpr int kWarps = 8;  // warps per block

struct Stream {
  int b;
  int64_t word;
};

__device__ __forceinline__ Stream sample_stream(const Plan& p, const int32_t* sbits,
                                                const int64_t* woff, int64_t n) {
  if (p.bits) return {p.bits, n * (p.bits * p.Dp / 32)};
  return {sbits[n], woff[n]};
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

// Team shape for a plan: P pieces (8 elements each) per lane, at most 32
// lanes per group, chunks for larger groups.
inline Teams teams_for(const Plan& p, int P, const void* ptr) {
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

}  // namespace aq::kernels
