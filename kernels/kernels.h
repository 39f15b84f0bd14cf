// Internal interface between libaq's front end (libaq/src/compress.cpp) and the
// per-backend compression kernels: compress_cpu.cpp and compress_cuda.cu.
//
// The front end checks arguments and allocates outputs; a kernel only computes.
// The arithmetic that decides the packed bytes lives here, once, as inline
// functions both backends call, so the CPU and CUDA paths write identical bytes
// for the same seed and offset.  The layout is documented in aq-packed(5).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define AQ_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define AQ_HD inline __attribute__((always_inline))  // also into compress_cpu.cpp's FMA clones
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

// Tensors: x [N*D] (fp32/fp16/bf16, memory order), packed uint8 (whole words),
// mn/mx fp32 or bf16 [N*ngroups] or [1] when !pergroup, sample_bits int32 [N]
// and word_offset int64 [N] when plan.bits == 0, all on x's device.  When
// !pergroup, global_range holds the tensor's fp32 {min, max}; the kernel
// stores them rounded into mn/mx.
void quantize_cpu(const Plan& plan, const at::Tensor& x, const at::Tensor& sample_bits,
                  const at::Tensor& word_offset, const at::Tensor& global_range,
                  at::Tensor& packed, at::Tensor& mn, at::Tensor& mx);
void dequantize_cpu(const Plan& plan, const at::Tensor& packed, const at::Tensor& mn,
                    const at::Tensor& mx, const at::Tensor& sample_bits,
                    const at::Tensor& word_offset, at::Tensor& out);
// codes (bool/uint8/int16/int32/int64, numel n) -> bit stream of n*bits bits
// in whole words; only the low `bits` bits of each code are kept.
void pack_bits_cpu(const at::Tensor& codes, int bits, at::Tensor& packed);
void unpack_bits_cpu(const at::Tensor& packed, int bits, at::Tensor& codes);

void quantize_cuda(const Plan& plan, const at::Tensor& x, const at::Tensor& sample_bits,
                   const at::Tensor& word_offset, const at::Tensor& global_range,
                   at::Tensor& packed, at::Tensor& mn, at::Tensor& mx);
void dequantize_cuda(const Plan& plan, const at::Tensor& packed, const at::Tensor& mn,
                     const at::Tensor& mx, const at::Tensor& sample_bits,
                     const at::Tensor& word_offset, at::Tensor& out);
void pack_bits_cuda(const at::Tensor& codes, int bits, at::Tensor& packed);
void unpack_bits_cuda(const at::Tensor& packed, int bits, at::Tensor& codes);

// Per-sample bit allocation of one layer in one launch (ALGORITHM.md 5 with
// unit weights): the sensitivities from the layer's group ranges and
// gradient statistics, then the greedy's bits (the same as allocate_bits,
// ties included) and each sample's first packed word.  One block; N <=
// kAllocMaxSamples.
constexpr int64_t kAllocMaxSamples = 4096;
struct AllocPlan {
  int64_t N = 0;
  int ibits = 8;
  int64_t removals = 0;        // ibits * N - target: bits the greedy takes away
  int64_t words_per_bit = 0;   // Dp / 32
  double range_scale = 1;      // G / positions
  float grad_scale = 1;        // kernel area / (4 groups); unused for batch norm
  bool batch_norm = false;     // s_n = 1, no gradient term
  int mode = 0;                // s_n: 0 ones, 1 grad_mean[0], 2 per-sample statistics
  int64_t stat_size = 0;       // mode 2: entries of sample_stat
  double dinv[9] = {};         // dinv[b] = 1/(2^(b-1)-1)^2 - 1/(2^b-1)^2, b = 2..8
};
// range_sq float [N]; grad_mean float (mode 1); sample_stat float
// [stat_size] and indices int64 [N] (mode 2), all on one device; writes
// bits int32 [N] and word_offset int64 [N]; or, when `cost` is given, only
// the sensitivities (double [N], NaN kept) there.  `extra` (double [N], or
// undefined) is added to the sensitivities: layers sharing the compressed copy.
void allocate_per_sample_cuda(const AllocPlan& plan, const at::Tensor& range_sq, const at::Tensor& grad_mean,
                              const at::Tensor& sample_stat, const at::Tensor& indices, at::Tensor& bits,
                              at::Tensor& word_offset, at::Tensor* cost = nullptr, const at::Tensor& extra = {});
// ||R_n||^2: per sample of x ([N*D] in memory order, fp32/fp16/bf16/fp64),
// the sum over its groups of G elements of (max - min)^2 in float, NaN
// propagating; out float [N].
void range_sq_cuda(const at::Tensor& x, int64_t N, int64_t D, int64_t G, at::Tensor& out);
void range_sq_cpu(const at::Tensor& x, int64_t N, int64_t D, int64_t G, at::Tensor& out);
// Per-sample gradient statistics in one launch: for each i < N,
// stat[idx[i]] = stat[idx[i]] >= 0 ? 0.5 stat[idx[i]] + 0.5 g[i] : g[i]
// (every old value read before any is written, as LibTorch's index and
// index_put_), and mean[0] = the mean of g.  g float [N], idx int64 [N]
// (each < stat's length), stat float, mean float [] on one device; one
// block, N <= kAllocMaxSamples.
void update_sample_stat_cuda(const at::Tensor& g, const at::Tensor& idx, at::Tensor& stat, at::Tensor& mean);

// BatchNorm's training-mode input gradient written over x (the restored
// input, dy's shape and dtype; a tensor of its own), as LibTorch's
// batch_norm_backward_elemt computes it: x = (dy - mean_dy - (x - mean) k1)
// k2 per channel (dim 1), with mean_dy = sum_dy / count, k1 = invstd^2
// sum_dy_xmu / count and k2 = weight invstd (invstd without a weight).  The
// per-channel tensors are [C]; sum_dy and sum_dy_xmu are the sums of dy and
// dy (x - mean) over all but dim 1.  A flat vectorised kernel where x and dy
// are both NCHW- or both channels-last-dense, any layouts otherwise; fp32,
// fp16 or bf16.  With sample_sq, where the flat channels-innermost kernel
// runs (channels last, or no spatial dims) and N <= 65535, *sample_sq
// becomes float [N]: each sample's sum of the squares of the gradient
// written, summed in a fixed order; elsewhere it is left undefined.
void batch_norm_input_grad_inplace_cuda(at::Tensor& x, const at::Tensor& dy, const at::Tensor& mean,
                                        const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& sum_dy,
                                        const at::Tensor& sum_dy_xmu, int64_t count, at::Tensor* sample_sq = nullptr);

// BatchNorm's training-mode output written over x, as LibTorch's
// batch_norm_transform_input computes it: w (x - mean) invstd + b per
// channel (dim 1; [C] tensors, weight and bias may be undefined).  x dense
// in NCHW or channels last, fp32, fp16 or bf16; false (x untouched)
// otherwise.
bool batch_norm_forward_inplace_cuda(at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                     const at::Tensor& weight, const at::Tensor& bias);

// BatchNorm's training-mode statistics where channels are innermost
// (channels last, or [N, C]; fp32, fp16 or bf16; C / 8 a power of two up to
// 32 or a multiple of 32), from one read of x: mean and invstd =
// 1 / sqrt(var + eps) ([C] float, biased var) and, where defined (float),
// running_mean and running_var updated as LibTorch does (momentum, unbiased
// var).  With r2, where group_size is 256 and divides each sample, *r2
// becomes float [N, groups]: each group's (max - min)^2, NaN if it holds
// one, as the range pass computes it.  false (nothing written) for any other
// input.
bool batch_norm_stats_cuda(const at::Tensor& x, double momentum, double eps, at::Tensor& running_mean,
                           at::Tensor& running_var, at::Tensor& mean, at::Tensor& invstd, int64_t group_size,
                           at::Tensor* r2);

// Max pooling over the last two dims of a 4-d tensor (CUDA), with each
// output's window-local index (kh kW + kw, a byte: windows of at most 256)
// in place of LibTorch's int64 flat index.  The forward computes y as
// max_pool2d_with_indices does (the first largest value in window order, a
// NaN winning); y and local are allocated by the caller, in one layout (NCHW
// or channels last), x in any.  The backward writes gx (allocated, any
// layout) from gy and local (any layouts): the sum, in the accumulation type
// and LibTorch's order, of the gradients of the windows whose index points at
// each element.  Floating types.
struct Pool2d {
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
};
void max_pool2d_local_cuda(const at::Tensor& x, const Pool2d& p, at::Tensor& y, at::Tensor& local);
void max_pool2d_local_backward_cuda(const at::Tensor& gy, const at::Tensor& local, const Pool2d& p, at::Tensor& gx);

// Masks without a bool tensor in between.  x, g and out are flat (memory
// order); packed holds bit i = (x[i] > 0) in pack_bits's 1-bit layout.
// apply: out[i] = bit i ? g[i] * scale : 0 (scale == 1: g[i] unchanged).
// With relu_out (flat, x's dtype, may be x itself), the CUDA pass also writes
// relu_out[i] = relu(x[i]) as LibTorch computes it, from the same read, and
// with r2 too (group_size = 32 x 16 bytes' worth of elements, dividing
// x.numel(), x and relu_out 16-byte aligned) r2[k] = (max - min)^2 of group
// k of relu_out, NaN if it holds one: the range pass's values.
void pack_positive_cpu(const at::Tensor& x, at::Tensor& packed);
void apply_mask_cpu(const at::Tensor& g, const at::Tensor& packed, double scale, at::Tensor& out);
void pack_positive_cuda(const at::Tensor& x, at::Tensor& packed, at::Tensor* relu_out = nullptr,
                        int64_t group_size = 0, float* r2 = nullptr);
void apply_mask_cuda(const at::Tensor& g, const at::Tensor& packed, double scale, at::Tensor& out);

// ---------------------------------------------------------------------------
// Shared arithmetic.  Every float operation below is a single IEEE operation
// (no contraction into FMA: the CUDA file uses the _rn intrinsics, the CPU file
// is compiled with -ffp-contract=off), so both backends agree bit for bit.

constexpr float kEps = 2e-6f;  // added to each group's range (ALGORITHM.md 2)

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

#if defined(__CUDACC__)
// A group held by a whole warp, each lane with its part's min, max and
// whether it saw a NaN: the group's (max - min)^2 on every lane, NaN if any
// lane saw one, as the range pass's sticky min/max give it (min and max are
// exact in any order, so the shuffles' order does not matter).  The passes
// that offer group ranges on their way (ReLU, BatchNorm statistics) use it,
// so that their values are the range pass's.
__device__ __forceinline__ float warp_group_range_sq(float lo, float hi, bool nan) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  nan = __any_sync(0xffffffffu, nan);
  const float d = nan ? __int_as_float(0x7fffffff) : __fsub_rn(hi, lo);
  return __fmul_rn(d, d);
}
#endif

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
