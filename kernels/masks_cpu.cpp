// CPU masks (see masks.h).
#include "masks.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace aq::kernels {
namespace {

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

}  // namespace

AQ_REGISTER_KERNEL(pack_positive, c10::kCPU, pack_positive_cpu);
AQ_REGISTER_KERNEL(apply_mask, c10::kCPU, apply_mask_cpu);

}  // namespace aq::kernels
