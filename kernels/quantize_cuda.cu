// CUDA quantize and dequantize (see quantize.h).
//
// Quantize is one kernel and one pass over the input: a team of lanes owns a
// group and loads it once into registers (groups.cuh), reduces its min/max,
// then rounds with two FMAs per element and Philox numbers and writes its
// packed bytes, with the group's bit width a compile-time constant.
// Dequantize writes 16-byte units, contiguous across a team, one FMA per
// value.  Everything runs on the current stream; nothing waits for the host.
// docs/kernel-benchmarks.md has the figures and the profile.
#include "quantize.h"

#include "cuda_common.cuh"
#include "groups.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/detail/UnpackRaw.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <type_traits>

namespace aq::kernels {
namespace {

__constant__ uint32_t kPhiloxMul[2] = {kPhiloxM0, kPhiloxM1};  // see philox()
__constant__ uint32_t kRoundBaseReg[1] = {kRoundBase};             // see encode_piece()
__constant__ uint32_t kCodeBaseReg[1] = {0x4b000000u};             // see decode_unit()

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
// With MUL, y = g * the restored values (rounded to scalar_t first, as a
// multiplication of the two tensors would see them; g laid out like y), and
// group_sq[gi] = the sum of y^2 over group gi, in float.
template <typename scalar_t, int P, bool MUL = false>
__global__ void __launch_bounds__(kWarps * 32)
    dequantize_kernel(Plan p, Teams tm, const uint8_t* __restrict__ packed, const void* mn, const void* mx,
                      bool bf16, const int32_t* __restrict__ sbits, const int64_t* __restrict__ woff,
                      scalar_t* __restrict__ y, const scalar_t* __restrict__ gin = nullptr,
                      float* __restrict__ group_sq = nullptr) {
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
    const scalar_t* gg = MUL ? gin + g.n * p.D + g.d0 : nullptr;
    float sq = 0.0f;
    // out[i] *= gv[i] for the first r elements, summing the squares.
    auto times_g = [&](scalar_t (&out)[E], const scalar_t (&gv)[E], int r) {
#pragma unroll
      for (int i = 0; i < E; ++i) {
        if (i >= r) break;
        out[i] = static_cast<scalar_t>(static_cast<float>(gv[i]) * static_cast<float>(out[i]));
        const float v = static_cast<float>(out[i]);
        sq = __fmaf_rn(v, v, sq);
      }
    };
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
            if constexpr (MUL) {
              scalar_t gv[E];
              const uint4 raw = reinterpret_cast<const uint4*>(gg)[u];
              memcpy(gv, &raw, 16);
              times_g(out, gv, E);
            }
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
          if constexpr (MUL) {
            scalar_t gv[E];
#pragma unroll
            for (int i = 0; i < E; ++i) gv[i] = i < r ? gg[d + i] : scalar_t(0);
            times_g(out, gv, r);
          }
#pragma unroll
          for (int i = 0; i < E; ++i)
            if (i < r) yg[d + i] = out[i];
        }
      }
    });
    if constexpr (MUL) {  // the team's lanes hold the same group
      const int team = 1 << tm.team_log2;
      const unsigned mask = team == 32 ? 0xffffffffu : ((1u << team) - 1u) << (lane & ~(team - 1));
      for (int o = team >> 1; o > 0; o >>= 1) sq += __shfl_xor_sync(mask, sq, o);
      if (t == 0) group_sq[gi] = sq;
    }
  }
}
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

// Both dequantize ops' launch; g and group_sq only with MUL.
template <bool MUL>
void launch_dequantize(const Plan& plan, const at::Tensor& packed, const at::Tensor& mn, const at::Tensor& mx,
                       const at::Tensor& sample_bits, const at::Tensor& word_offset, at::Tensor& out,
                       const at::Tensor& g = {}, float* group_sq = nullptr) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t groups = plan.N * plan.ngroups;
  if (groups == 0) return;
  const bool bf16 = mn.scalar_type() == at::kBFloat16;
  const int32_t* sb = plan.bits ? nullptr : sample_bits.const_data_ptr<int32_t>();
  const int64_t* wo = plan.bits ? nullptr : word_offset.const_data_ptr<int64_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  AQ_DISPATCH_FLOATS(out.scalar_type(), "aq_dequantize_cuda", [&] {
    scalar_t* yp = out.data_ptr<scalar_t>();
    const scalar_t* gp = MUL ? g.const_data_ptr<scalar_t>() : nullptr;
    with_pieces<scalar_t>(plan, [&](auto p_tag) {
      constexpr int P = decltype(p_tag)::value;
      Teams tm = teams_for(plan, P, yp);
      tm.vec = tm.vec && reinterpret_cast<uintptr_t>(gp) % 16 == 0;
      constexpr auto kernel = dequantize_kernel<scalar_t, P, MUL>;
      kernel<<<blocks_for<kernel>(groups, tm), kWarps * 32, 0, stream>>>(
          plan, tm, packed.const_data_ptr<uint8_t>(), mn.const_data_ptr(), mx.const_data_ptr(), bf16, sb, wo, yp, gp,
          group_sq);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void dequantize_cuda(const Plan& plan, const at::Tensor& packed, const at::Tensor& mn, const at::Tensor& mx,
                     const at::Tensor& sample_bits, const at::Tensor& word_offset, at::Tensor& out) {
  launch_dequantize<false>(plan, packed, mn, mx, sample_bits, word_offset, out);
}

void dequantize_mul_cuda(const Plan& plan, const at::Tensor& packed, const at::Tensor& mn, const at::Tensor& mx,
                         const at::Tensor& sample_bits, const at::Tensor& word_offset, const at::Tensor& g,
                         at::Tensor& out, at::Tensor& group_sq) {
  TORCH_CHECK(plan.pergroup && g.scalar_type() == out.scalar_type() && group_sq.numel() == plan.N * plan.ngroups &&
                  group_sq.scalar_type() == at::kFloat && group_sq.is_contiguous(),
              "aq: dequantize_mul: per-group ranges, g of the output's dtype and float group sums needed");
  launch_dequantize<true>(plan, packed, mn, mx, sample_bits, word_offset, out, g, group_sq.data_ptr<float>());
}

}  // namespace

AQ_REGISTER_KERNEL(quantize, c10::kCUDA, quantize_cuda);
AQ_REGISTER_KERNEL(dequantize, c10::kCUDA, dequantize_cuda);
AQ_REGISTER_KERNEL(dequantize_mul, c10::kCUDA, dequantize_mul_cuda);

}  // namespace aq::kernels
