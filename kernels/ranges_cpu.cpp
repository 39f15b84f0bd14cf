// CPU range_sq (see ranges.h).
#include "ranges.h"

#include "arith.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

namespace aq::kernels {
namespace {

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

}  // namespace

AQ_REGISTER_KERNEL(range_sq, c10::kCPU, range_sq_cpu);

}  // namespace aq::kernels
