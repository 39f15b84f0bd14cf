// The arithmetic that decides the packed bytes, once, as inline functions
// both backends call, so that the CPU and CUDA kernels write identical bytes
// for the same seed and offset.  The layout is documented in aq-packed(5),
// the method in docs/design.md §2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define AQ_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define AQ_HD inline __attribute__((always_inline))  // also into quantize_cpu.cpp's FMA clones
#else
#define AQ_HD inline
#endif

namespace aq::kernels {

// Everything a quantize or dequantize kernel needs to know about one packed
// tensor.  Samples are the rows of x viewed as [N, D] in memory order; each is
// padded to Dp = D rounded up to 32 elements, so every group starts on a
// 32-bit word of the packed stream.
struct Plan {
  int64_t N = 0;        // samples
  int64_t D = 0;        // elements per sample
  int64_t Dp = 0;       // D rounded up to a multiple of 32
  int64_t G = 256;      // group size (power of two >= 32)
  int64_t ngroups = 0;  // ceil(D / G) groups per sample
  int bits = 2;         // uniform bits per element, or 0: per-sample bits
  bool pergroup = true; // false: one min/max for the whole tensor, given in mn/mx
  bool stochastic = true;
  uint64_t seed = 0;    // Philox key
  uint64_t offset = 0;  // Philox stream, one per call
  bool draw_seed = false;  // CUDA: draw seed/offset from the device's generator
};

// ---------------------------------------------------------------------------
// Shared arithmetic.  Every float operation below is a single IEEE operation
// (no contraction into FMA: the CUDA files use the _rn intrinsics, the CPU
// files are compiled with -ffp-contract=off), so both backends agree bit for bit.

constexpr float kEps = 2e-6f;  // added to each group's range (docs/design.md §2)

AQ_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
AQ_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
AQ_HD bool is_finite(float f) { return (float_bits(f) & 0x7f800000u) != 0x7f800000u; }

// NaN-propagating min and max: a NaN anywhere in a group reaches its range.
AQ_HD float nan_min(float a, float b) { return (a != a || a < b) ? a : b; }
AQ_HD float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }


// bf16 storage of a group's range: mn rounds toward -inf and mx toward +inf,
// so the stored range still covers every element and rounding stays
// unbiased.  A finite value never becomes infinite: past bf16's largest
// finite value it saturates (the few elements beyond are then clamped).
AQ_HD uint16_t bf16_down(float f) {
  uint32_t u = float_bits(f);
  if (f != f) return 0x7fc0;
  uint32_t t = u & 0xffff0000u;
  if (t != u && (u >> 31)) t += 0x10000u;  // negative: more negative
  if ((t & 0x7fffffffu) == 0x7f800000u && is_finite(f)) t = (u & 0x80000000u) | 0x7f7f0000u;
  return static_cast<uint16_t>(t >> 16);
}
AQ_HD uint16_t bf16_up(float f) {
  if (f != f) return 0x7fc0;
  return static_cast<uint16_t>(bf16_down(-f) ^ 0x8000u);
}
AQ_HD float bf16_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Philox4x32-10 (Salmon et al., SC'11): counter (c0..c3), key (k0, k1).
struct Philox4 {
  uint32_t r[4];
};
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;

// The 64-bit product of two 32-bit words (one instruction on the GPU: written
// in C++, nvcc adds a zero to the high word after every multiply).
AQ_HD uint64_t mul_wide(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint64_t r;
  asm("mul.wide.u32 %0, %1, %2;" : "=l"(r) : "r"(a), "r"(b));
  return r;
#else
  return static_cast<uint64_t>(a) * b;
#endif
}

// m0, m1: the multipliers, always kPhiloxM0/M1.  The CUDA kernels pass them
// from constant memory: as immediates (top bit set) ptxas adds a correction
// instruction to every wide multiply.
AQ_HD Philox4 philox(uint64_t counter, uint64_t stream, uint64_t key, uint32_t m0 = kPhiloxM0,
                     uint32_t m1 = kPhiloxM1) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    const uint64_t p0 = mul_wide(m0, c0), p1 = mul_wide(m1, c2);
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The random 15-bit integer of element e (its index in the padded [N, Dp]
// space): one Philox call serves 8 consecutive elements, two per 32-bit word:
// bits 0..14 for even e, bits 17..31 for odd e.
AQ_HD uint32_t random15(const Philox4& p, int64_t e) {
  const uint32_t w = p.r[(e & 7) >> 1];
  return (e & 1) ? w >> 17 : w & 0x7fffu;
}
constexpr uint32_t kNearest = 0x4000u;  // random15's stand-in for round-to-nearest

// A group's quantization grid, from its stored (already rounded) mn and mx.
// Values are kept halved so that mx - mn never overflows for finite inputs.
// A group with a non-finite bound gets scale 0 (codes carry nothing) and
// base NaN (every value NaN), so that no per-element branch is needed.
struct Grid {
  float nhm;    // -mn / 2 (0 if not finite)
  float scale;  // B / ((mx - mn + eps) / 2) (0 if not finite)
  float tmax;   // the largest float below 257 + B (256 if not finite)
  float base;   // mn / 2, or NaN if not finite
  float step;   // ((mx - mn + eps) / 2) / B
  float mn;     // 2 base
  float step2;  // 2 step; infinite only for B = 1 and a range beyond FLT_MAX
};

#if defined(__CUDA_ARCH__)
#define AQ_ADD(a, b) __fadd_rn(a, b)
#define AQ_SUB(a, b) __fsub_rn(a, b)
#define AQ_MUL(a, b) __fmul_rn(a, b)
#define AQ_DIV(a, b) __fdiv_rn(a, b)
#define AQ_FMA(a, b, c) __fmaf_rn(a, b, c)
#else
#define AQ_ADD(a, b) ((a) + (b))
#define AQ_SUB(a, b) ((a) - (b))
#define AQ_MUL(a, b) ((a) * (b))
#define AQ_DIV(a, b) ((a) / (b))
#define AQ_FMA(a, b, c) std::fma(a, b, c)  // correctly rounded, as on the GPU
#endif

// min(a, b) and max(a, 0) that return the other operand when a is NaN (one
// FMNMX each on the GPU).
AQ_HD float min_or(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fminf(a, b);
#else
  return a < b ? a : b;
#endif
}
AQ_HD float max0(float a) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, 0.f);
#else
  return a > 0.f ? a : 0.f;
#endif
}

AQ_HD Grid make_grid(float mn, float mx, int bits) {
  Grid g;
  const uint32_t levels = (1u << bits) - 1u;
  const float B = static_cast<float>(levels);
  const bool finite = is_finite(mn) && is_finite(mx);
  const float hm = AQ_MUL(0.5f, mn);
  const float hr = AQ_ADD(AQ_SUB(AQ_MUL(0.5f, mx), hm), 0.5f * kEps);
  g.nhm = finite ? -hm : 0.f;
  g.scale = finite ? AQ_DIV(B, hr) : 0.f;
  g.tmax = finite ? bits_float(float_bits(257.0f + B) - 1u) : 256.0f;
  g.base = finite ? hm : bits_float(0x7fc00000u);
  g.step = AQ_DIV(hr, B);
  g.mn = AQ_MUL(2.0f, g.base);
  g.step2 = AQ_MUL(2.0f, g.step);
  return g;
}

// The code of x: with v = (x - mn) B / (mx - mn + eps) in [0, B] and u =
// k / 2^15 (k a uniform 15-bit integer), q = floor(v + u) where v + u is
// rounded once to a multiple of 2^-15, so that E[q] = v to within 2^-16 of a
// grid step.  t = 256 + v + u lies in [256, 257 + B), where a float's ulp is
// 2^-15: its integer part is bits 15..22, read without a conversion unit.
// k = kNearest rounds to nearest instead.
//
// Every element of a finite group lies in [mn, mx], so t needs no clamping,
// except for fp32 inputs beyond bf16's saturated bounds (|x| > 3.39e38):
// `clamp` (fp32 inputs) keeps t in [256, tmax].  In a non-finite group a
// finite x gets code 0 and a non-finite one an unspecified code <= B.
constexpr uint32_t kRoundBase = 0x43800000u;  // 256.0f
// rb: the bits of 256 + k / 2^15, i.e. kRoundBase | k; levels = B.
AQ_HD uint32_t quantize_bits(const Grid& g, float x, uint32_t rb, uint32_t levels, bool clamp) {
  float h = AQ_FMA(x, 0.5f, g.nhm);
  if (clamp) h = max0(h);
  float t = AQ_FMA(h, g.scale, bits_float(rb));
  if (clamp) t = min_or(t, g.tmax);
  return (float_bits(t) >> 15) & levels;  // bits 23..30 hold the exponent, 0x87
}
AQ_HD uint32_t quantize_one(const Grid& g, float x, uint32_t k, uint32_t levels, bool clamp) {
  return quantize_bits(g, x, kRoundBase | k, levels, clamp);
}

// 2^23 + v has v rounded to an integer in its low mantissa bits, for 0 <= v
// < 2^23: the exact float of a code without a conversion unit.
constexpr float kMagic = 8388608.0f;
AQ_HD float code_float(uint32_t q) { return AQ_SUB(bits_float(0x4b000000u | q), kMagic); }

// mn + q step2, or in halves where step2 overflows.
AQ_HD float dequantize_one(const Grid& g, uint32_t q) {
  const float c = code_float(q);
  return is_finite(g.step2) ? AQ_FMA(c, g.step2, g.mn) : AQ_MUL(2.0f, AQ_FMA(c, g.step, g.base));
}

// Reads the stored range of group i (fp32 or bf16 storage).
AQ_HD float load_range(const void* p, bool bf16, int64_t i) {
  return bf16 ? bf16_float(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}
// The value a range bound keeps in storage: mn rounds down, mx up (bf16).
AQ_HD float round_range(float v, bool bf16, bool up) {
  return bf16 ? bf16_float(up ? bf16_up(v) : bf16_down(v)) : v;
}
AQ_HD void store_range(void* p, bool bf16, int64_t i, float v, bool up) {
  if (bf16)
    static_cast<uint16_t*>(p)[i] = up ? bf16_up(v) : bf16_down(v);
  else
    static_cast<float*>(p)[i] = v;
}

}  // namespace aq::kernels