// CPU residual sum with its group ranges (see activation.h).
#include "activation.h"

#include "arith.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <limits>

namespace aq::kernels {
namespace {

void add_and_ranges_cpu(const at::Tensor& x, const at::Tensor& y, at::Tensor& z, int64_t group_size, float* r2) {
  const int64_t n = x.numel();
  TORCH_CHECK(x.scalar_type() == at::kFloat && z.scalar_type() == at::kFloat && x.is_contiguous() &&
                  y.is_contiguous() && z.is_contiguous() && y.numel() == n && z.numel() == n && group_size > 0 &&
                  n % group_size == 0,
              "aq: add_and_ranges: float x and z, and y, contiguous, of one size, in whole groups");
  const float* xp = x.const_data_ptr<float>();
  float* zp = z.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "aq_add_and_ranges_cpu", [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const int64_t G = group_size;
    at::parallel_for(0, n / G, std::max<int64_t>(1, 65536 / G), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        // Eight independent lanes, as the range pass (ranges_cpu.cpp) reads them.
        constexpr int L = 8;
        float lo8[L], hi8[L];
        for (int j = 0; j < L; ++j) lo8[j] = std::numeric_limits<float>::infinity(), hi8[j] = -lo8[j];
        for (int64_t d = k * G; d < (k + 1) * G; d += L)
          for (int j = 0; j < L && d + j < (k + 1) * G; ++j) {
            const float s = xp[d + j] + static_cast<float>(yp[d + j]);  // LibTorch's x + 1 * y
            zp[d + j] = s;
            lo8[j] = nan_min(lo8[j], s);
            hi8[j] = nan_max(hi8[j], s);
          }
        float lo = lo8[0], hi = hi8[0];
        for (int j = 1; j < L; ++j) lo = nan_min(lo, lo8[j]), hi = nan_max(hi, hi8[j]);
        const float r = hi - lo;
        r2[k] = r * r;
      }
    });
  });
}

}  // namespace

AQ_REGISTER_KERNEL(add_and_ranges, c10::kCPU, add_and_ranges_cpu);

}  // namespace aq::kernels
