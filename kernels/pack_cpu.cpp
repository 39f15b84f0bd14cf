// CPU pack_bits and unpack_bits (see pack.h for the layout).
#include "pack.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace aq::kernels {
namespace {

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

}  // namespace

AQ_REGISTER_KERNEL(pack_bits, c10::kCPU, pack_bits_cpu);
AQ_REGISTER_KERNEL(unpack_bits, c10::kCPU, unpack_bits_cpu);

}  // namespace aq::kernels
