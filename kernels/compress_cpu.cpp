// CPU implementation of the compression kernels (see kernels.h).  One task
// per group: range, rounding and packing happen in one pass over the group.
#include "kernels.h"

#include <ATen/OpMathType.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

namespace aq::kernels {
namespace {

struct Bits {
  int b;
  int64_t word;  // first word of the sample's stream
};

Bits sample_stream(const Plan& p, const int32_t* sample_bits, const int64_t* word_offset,
                   int64_t n) {
  if (p.bits) return {p.bits, n * (p.bits * p.Dp / 32)};
  return {sample_bits[n], word_offset[n]};
}

// The CPU's rounding uses std::fma, which a baseline x86-64 build calls in
// libm; where the processor has FMA the loops below are compiled a second time
// with it (same results: an FMA is exactly rounded either way).
#if defined(__x86_64__) && defined(__GNUC__)
#define AQ_FMA_CLONES 1
bool cpu_has_fma() {
  static const bool yes = __builtin_cpu_supports("fma");
  return yes;
}
#define AQ_TARGET_FMA __attribute__((target("fma")))
#else
#define AQ_TARGET_FMA
#endif

// Calls f, an always-inline lambda, so that it is compiled into the FMA copy
// too, and runs that copy where the processor has FMA.
template <typename F>
AQ_TARGET_FMA void call_with_fma(const F& f) {
  f();
}
template <typename F>
void call_best(const F& f) {
#ifdef AQ_FMA_CLONES
  if (cpu_has_fma()) return call_with_fma(f);
#endif
  f();
}

// Groups [begin, end): range, rounding and packing in one pass over each.
template <typename scalar_t>
[[gnu::always_inline]] inline void quantize_groups(const Plan& p, const scalar_t* x, const int32_t* sample_bits,
                                                   const int64_t* word_offset, const float* global_range,
                                                   uint32_t* packed, void* mn, void* mx, bool bf16, int64_t begin,
                                                   int64_t end) {
  for (int64_t gi = begin; gi < end; ++gi) {
    const int64_t n = gi / p.ngroups, d0 = (gi % p.ngroups) * p.G;
    const int64_t dv = std::min(d0 + p.G, p.D), dp = std::min(d0 + p.G, p.Dp);
    const scalar_t* xs = x + n * p.D;
    const Bits s = sample_stream(p, sample_bits, word_offset, n);
    float lo, hi;
    if (p.pergroup) {
      lo = std::numeric_limits<float>::infinity();
      hi = -lo;
      for (int64_t d = d0; d < dv; ++d) {
        float v = static_cast<float>(xs[d]);
        lo = nan_min(lo, v);
        hi = nan_max(hi, v);
      }
      store_range(mn, bf16, gi, lo, false);
      store_range(mx, bf16, gi, hi, true);
    } else {
      lo = global_range[0];
      hi = global_range[1];
    }
    const Grid grid = make_grid(round_range(lo, bf16, false), round_range(hi, bf16, true), s.b);
    uint32_t* out = packed + s.word + d0 * s.b / 32;
    uint64_t acc = 0;
    int nacc = 0;
    Philox4 r{};
    for (int64_t d = d0; d < dp; ++d) {
      const int64_t e = n * p.Dp + d;
      uint32_t q = 0;
      if (d < dv) {
        uint32_t k = kNearest;
        if (p.stochastic) {
          if ((e & 7) == 0 || d == d0) r = philox(static_cast<uint64_t>(e) >> 3, p.offset, p.seed);
          k = random15(r, e);
        }
        q = quantize_one(grid, static_cast<float>(xs[d]), k, (1u << s.b) - 1u, sizeof(scalar_t) >= 4);
      }
      acc |= static_cast<uint64_t>(q) << nacc;
      nacc += s.b;
      if (nacc >= 32) {
        *out++ = static_cast<uint32_t>(acc);
        acc >>= 32;
        nacc -= 32;
      }
    }
  }
}

template <typename scalar_t>
void quantize_impl(const Plan& p, const scalar_t* x, const int32_t* sample_bits,
                   const int64_t* word_offset, const float* global_range, uint32_t* packed,
                   void* mn, void* mx, bool bf16) {
  if (!p.pergroup) {
    store_range(mn, bf16, 0, global_range[0], false);
    store_range(mx, bf16, 0, global_range[1], true);
  }
  const int64_t total = p.N * p.ngroups;
  const int64_t grain = std::max<int64_t>(1, 65536 / p.G);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    call_best([&]() __attribute__((always_inline)) {
      quantize_groups(p, x, sample_bits, word_offset, global_range, packed, mn, mx, bf16, begin, end);
    });
  });
}

template <typename scalar_t>
[[gnu::always_inline]] inline void dequantize_groups(const Plan& p, const uint32_t* packed, const void* mn,
                                                     const void* mx, bool bf16, const int32_t* sample_bits,
                                                     const int64_t* word_offset, scalar_t* y, int64_t begin,
                                                     int64_t end) {
  for (int64_t gi = begin; gi < end; ++gi) {
    const int64_t n = gi / p.ngroups, d0 = (gi % p.ngroups) * p.G;
    const int64_t dv = std::min(d0 + p.G, p.D);
    const Bits s = sample_stream(p, sample_bits, word_offset, n);
    const int64_t ri = p.pergroup ? gi : 0;
    const Grid grid = make_grid(load_range(mn, bf16, ri), load_range(mx, bf16, ri), s.b);
    const uint32_t* in = packed + s.word + d0 * s.b / 32;
    const uint64_t mask = (1u << s.b) - 1u;
    uint64_t acc = 0;
    int nacc = 0;
    scalar_t* ys = y + n * p.D;
    for (int64_t d = d0; d < dv; ++d) {
      if (nacc < s.b) {
        acc |= static_cast<uint64_t>(*in++) << nacc;
        nacc += 32;
      }
      ys[d] = static_cast<scalar_t>(dequantize_one(grid, static_cast<uint32_t>(acc & mask)));
      acc >>= s.b;
      nacc -= s.b;
    }
  }
}

template <typename scalar_t>
void dequantize_impl(const Plan& p, const uint32_t* packed, const void* mn, const void* mx,
                     bool bf16, const int32_t* sample_bits, const int64_t* word_offset,
                     scalar_t* y) {
  const int64_t total = p.N * p.ngroups;
  const int64_t grain = std::max<int64_t>(1, 65536 / p.G);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    call_best([&]() __attribute__((always_inline)) {
      dequantize_groups(p, packed, mn, mx, bf16, sample_bits, word_offset, y, begin, end);
    });
  });
}

}  // namespace

void quantize_cpu(const Plan& p, const at::Tensor& x, const at::Tensor& sample_bits,
                  const at::Tensor& word_offset, const at::Tensor& global_range,
                  at::Tensor& packed, at::Tensor& mn, at::Tensor& mx) {
  const float* gr = p.pergroup ? nullptr : global_range.const_data_ptr<float>();
  const bool bf16 = mn.scalar_type() == at::kBFloat16;
  const int32_t* sb = p.bits ? nullptr : sample_bits.data_ptr<int32_t>();
  const int64_t* wo = p.bits ? nullptr : word_offset.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aq_quantize_cpu", [&] {
    quantize_impl<scalar_t>(p, x.const_data_ptr<scalar_t>(), sb, wo, gr,
                            reinterpret_cast<uint32_t*>(packed.data_ptr<uint8_t>()),
                            mn.data_ptr(), mx.data_ptr(), bf16);
  });
}

void dequantize_cpu(const Plan& p, const at::Tensor& packed, const at::Tensor& mn,
                    const at::Tensor& mx, const at::Tensor& sample_bits,
                    const at::Tensor& word_offset, at::Tensor& out) {
  const bool bf16 = mn.scalar_type() == at::kBFloat16;
  const int32_t* sb = p.bits ? nullptr : sample_bits.const_data_ptr<int32_t>();
  const int64_t* wo = p.bits ? nullptr : word_offset.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aq_dequantize_cpu", [&] {
    dequantize_impl<scalar_t>(p, reinterpret_cast<const uint32_t*>(packed.const_data_ptr<uint8_t>()),
                              mn.const_data_ptr(), mx.const_data_ptr(), bf16, sb, wo,
                              out.data_ptr<scalar_t>());
  });
}

// Bit streams of small integer codes: chunk k of 32 codes fills words
// [k*bits, (k+1)*bits), code i of the chunk at bit i*bits (LSB first).
void pack_bits_cpu(const at::Tensor& codes, int bits, at::Tensor& packed) {
  const int64_t n = codes.numel(), chunks = (n + 31) / 32;
  uint32_t* out = reinterpret_cast<uint32_t*>(packed.data_ptr<uint8_t>());
  const uint64_t mask = (1u << bits) - 1u;
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, codes.scalar_type(), "aq_pack_bits_cpu", [&] {
    const scalar_t* c = codes.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        uint32_t* w = out + k * bits;
        uint64_t acc = 0;
        int nacc = 0;
        for (int64_t i = k * 32; i < k * 32 + 32; ++i) {
          uint64_t q = i < n ? (static_cast<uint64_t>(c[i]) & mask) : 0;
          acc |= q << nacc;
          nacc += bits;
          if (nacc >= 32) {
            *w++ = static_cast<uint32_t>(acc);
            acc >>= 32;
            nacc -= 32;
          }
        }
      }
    });
  });
}

void unpack_bits_cpu(const at::Tensor& packed, int bits, at::Tensor& codes) {
  const int64_t n = codes.numel();
  const uint32_t* in = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<uint8_t>());
  const uint64_t mask = (1u << bits) - 1u;
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, codes.scalar_type(), "aq_unpack_bits_cpu", [&] {
    scalar_t* c = codes.data_ptr<scalar_t>();
    at::parallel_for(0, n, 65536, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bit = i * bits;
        uint64_t w = in[bit >> 5];
        if ((bit & 31) + bits > 32) w |= static_cast<uint64_t>(in[(bit >> 5) + 1]) << 32;
        c[i] = static_cast<scalar_t>((w >> (bit & 31)) & mask);
      }
    });
  });
}

void pack_positive_cpu(const at::Tensor& x, at::Tensor& packed) {
  const int64_t n = x.numel(), words = (n + 31) / 32;
  uint32_t* out = reinterpret_cast<uint32_t*>(packed.data_ptr<uint8_t>());
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "aq_pack_positive_cpu", [&] {
    const scalar_t* v = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, words, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t* vk = v + k * 32;
        uint32_t w = 0;
        if (k * 32 + 32 <= n) {  // a full word: a fixed trip count the compiler unrolls
          for (int i = 0; i < 32; ++i) w |= static_cast<uint32_t>(static_cast<float>(vk[i]) > 0.0f) << i;
        } else {
          for (int64_t i = 0; i < n - k * 32; ++i) w |= static_cast<uint32_t>(static_cast<float>(vk[i]) > 0.0f) << i;
        }
        out[k] = w;
      }
    });
  });
}

void range_sq_cpu(const at::Tensor& x, int64_t N, int64_t D, int64_t G, at::Tensor& out) {
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aq_range_sq_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, D)), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* xs = xp + n * D;
        float acc = 0.0f;
        for (int64_t d0 = 0; d0 < D; d0 += G) {
          const int64_t dv = std::min(d0 + G, D);
          // Eight independent lanes, which the compiler vectorises; min and
          // max are exact, so their order does not matter (NaN propagates).
          constexpr int L = 8;
          float lo8[L], hi8[L];
          for (int j = 0; j < L; ++j) lo8[j] = std::numeric_limits<float>::infinity(), hi8[j] = -lo8[j];
          int64_t d = d0;
          for (; d + L <= dv; d += L)
            for (int j = 0; j < L; ++j) {
              const float v = static_cast<float>(xs[d + j]);
              lo8[j] = nan_min(lo8[j], v);
              hi8[j] = nan_max(hi8[j], v);
            }
          for (; d < dv; ++d) {
            const float v = static_cast<float>(xs[d]);
            lo8[0] = nan_min(lo8[0], v);
            hi8[0] = nan_max(hi8[0], v);
          }
          float lo = lo8[0], hi = hi8[0];
          for (int j = 1; j < L; ++j) lo = nan_min(lo, lo8[j]), hi = nan_max(hi, hi8[j]);
          const float r = hi - lo;
          acc += r * r;
        }
        o[n] = acc;
      }
    });
  });
}

void apply_mask_cpu(const at::Tensor& g, const at::Tensor& packed, double scale, at::Tensor& out) {
  const int64_t n = g.numel();
  const uint32_t* m = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<uint8_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "aq_apply_mask_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = g.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t s = static_cast<acc_t>(scale);
    const bool unit = scale == 1.0;
    // A word of the mask at a time: 32 elements with constant shifts.
    at::parallel_for(0, (n + 31) / 32, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const uint32_t w = m[k];
        const scalar_t* ik = in + k * 32;
        scalar_t* ok = o + k * 32;
        const int64_t cnt = std::min<int64_t>(32, n - k * 32);
        auto one = [&](int64_t j) {
          const bool on = (w >> j) & 1u;
          ok[j] = !on ? scalar_t(0) : unit ? ik[j] : static_cast<scalar_t>(static_cast<acc_t>(ik[j]) * s);
        };
        if (cnt == 32) {
          _Pragma("GCC unroll 32") for (int j = 0; j < 32; ++j) one(j);
        } else {
          for (int64_t j = 0; j < cnt; ++j) one(j);
        }
      }
    });
  });
}

}  // namespace aq::kernels
