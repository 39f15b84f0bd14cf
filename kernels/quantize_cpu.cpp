// CPU quantize and dequantize (see quantize.h).  One task per group: range,
// rounding and packing happen in one pass over the group.
#include "quantize.h"

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

}  // namespace

AQ_REGISTER_KERNEL(quantize, c10::kCPU, quantize_cpu);
AQ_REGISTER_KERNEL(dequantize, c10::kCPU, dequantize_cpu);

}  // namespace aq::kernels
