// CUDA max pooling with window-local indices (see pool.h).
#include "pool.h"

#include "cuda_common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace aq::kernels {
namespace {

// A 4-d tensor's sizes and strides, and the order its memory runs in:
// (n, h, w, c) for channels last, (n, c, h, w) otherwise.
// In index_t: 32-bit where every offset stays below 2^30 (integer division
// is what these kernels spend most of their time on), 64-bit otherwise.
template <typename index_t>
struct Dims {
  index_t n, c, h, w;
  index_t sn, sc, sh, sw;
};

template <typename index_t>
Dims<index_t> dims_of(const at::Tensor& t) {
  const auto i = [](int64_t v) { return static_cast<index_t>(v); };
  return {i(t.size(0)), i(t.size(1)), i(t.size(2)), i(t.size(3)), i(t.stride(0)), i(t.stride(1)), i(t.stride(2)),
          i(t.stride(3))};
}

// Element i of a [n, c, h, w] shape in memory order.
template <typename index_t>
struct Pos {
  index_t n, c, h, w;
};
template <typename index_t>
__device__ __forceinline__ Pos<index_t> position(index_t i, const Dims<index_t>& d, bool last) {
  Pos<index_t> p;
  if (last) {
    p.c = i % d.c, i /= d.c;
    p.w = i % d.w, i /= d.w;
    p.h = i % d.h, p.n = i / d.h;
  } else {
    p.w = i % d.w, i /= d.w;
    p.h = i % d.h, i /= d.h;
    p.c = i % d.c, p.n = i / d.c;
  }
  return p;
}
template <typename index_t>
__device__ __forceinline__ index_t offset(const Dims<index_t>& d, index_t n, index_t c, index_t h, index_t w) {
  return n * d.sn + c * d.sc + h * d.sh + w * d.sw;
}

// LibTorch's max_pool2d forward: the window scanned row by row, the first
// largest value kept, a NaN replacing whatever came before it.
// The pooling parameters in index_t.
template <typename index_t>
struct P {
  index_t kH, kW, sH, sW, pH, pW, dH, dW;
  explicit P(const Pool2d& p)
      : kH(p.kH), kW(p.kW), sH(p.sH), sW(p.sW), pH(p.pH), pW(p.pW), dH(p.dH), dW(p.dW) {}
};

template <typename scalar_t, typename index_t>
__global__ void max_pool_local_kernel(const scalar_t* __restrict__ x, Dims<index_t> xd, scalar_t* __restrict__ y,
                                      Dims<index_t> yd, uint8_t* __restrict__ local, Dims<index_t> ld, P<index_t> p,
                                      bool last, index_t n_out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_out;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const Pos<index_t> o = position(i, yd, last);
    const index_t h0 = o.h * p.sH - p.pH, w0 = o.w * p.sW - p.pW;  // the window's first row and column
    const index_t hend = min(h0 + (p.kH - 1) * p.dH + 1, xd.h), wend = min(w0 + (p.kW - 1) * p.dW + 1, xd.w);
    index_t hs = h0, ws = w0;
    while (hs < 0) hs += p.dH;
    while (ws < 0) ws += p.dW;
    const scalar_t* xp = x + o.n * xd.sn + o.c * xd.sc;
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    index_t bh = hs, bw = ws;
    for (index_t h = hs; h < hend; h += p.dH)
      for (index_t w = ws; w < wend; w += p.dW) {
        const scalar_t v = xp[h * xd.sh + w * xd.sw];
        const acc_t a = static_cast<acc_t>(v);
        if (a > best || a != a) best = a, bh = h, bw = w;
      }
    y[offset(yd, o.n, o.c, o.h, o.w)] = static_cast<scalar_t>(best);
    local[offset(ld, o.n, o.c, o.h, o.w)] = static_cast<uint8_t>((bh - h0) / p.dH * p.kW + (bw - w0) / p.dW);
  }
}

// The backward, gathered: each input element sums the output gradients of
// the windows whose index points at it, in LibTorch's order (output rows,
// then columns, ascending), in the accumulation type.
template <typename scalar_t, typename index_t>
__global__ void max_pool_local_backward_kernel(const scalar_t* __restrict__ gy, Dims<index_t> gd,
                                               const uint8_t* __restrict__ local, Dims<index_t> ld,
                                               scalar_t* __restrict__ gx, Dims<index_t> xd, P<index_t> p, bool last,
                                               index_t n_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t ext_h = (p.kH - 1) * p.dH + 1, ext_w = (p.kW - 1) * p.dW + 1;
  const bool dilated = p.dH != 1 || p.dW != 1;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_in;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const Pos<index_t> x = position(i, xd, last);
    const index_t hp = x.h + p.pH, wp = x.w + p.pW;
    const index_t oh0 = hp < ext_h ? 0 : (hp - ext_h) / p.sH + 1, oh1 = min(hp / p.sH + 1, gd.h);
    const index_t ow0 = wp < ext_w ? 0 : (wp - ext_w) / p.sW + 1, ow1 = min(wp / p.sW + 1, gd.w);
    acc_t sum = 0;
    for (index_t oh = oh0; oh < oh1; ++oh) {
      const index_t dh = hp - oh * p.sH;
      if (dilated && dh % p.dH) continue;
      for (index_t ow = ow0; ow < ow1; ++ow) {
        const index_t dw = wp - ow * p.sW;
        if (dilated && dw % p.dW) continue;
        const index_t k = dilated ? dh / p.dH * p.kW + dw / p.dW : dh * p.kW + dw;
        if (local[offset(ld, x.n, x.c, oh, ow)] == k)
          sum += static_cast<acc_t>(gy[offset(gd, x.n, x.c, oh, ow)]);
      }
    }
    gx[offset(xd, x.n, x.c, x.h, x.w)] = static_cast<scalar_t>(sum);
  }
}

bool channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Whether the 32-bit index math holds every offset of t (with room to spare).
bool pool_offsets_fit(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return last < (int64_t{1} << 30) && t.numel() < (int64_t{1} << 30);
}

void max_pool2d_local_cuda(const at::Tensor& x, const Pool2d& p, at::Tensor& y, at::Tensor& local) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 4 && y.dim() == 4 && local.sizes() == y.sizes() && local.scalar_type() == at::kByte &&
                  p.kH * p.kW <= 256,
              "aq: max_pool2d_local_cuda: 4-d input, byte indices, a window of at most 256");
  const bool fit = pool_offsets_fit(x) && pool_offsets_fit(y) && pool_offsets_fit(local);
  const int64_t n = y.numel();
  if (n == 0) return;
  const bool last = channels_last(y);
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aq_max_pool2d_local", [&] {
    const auto launch = [&](auto zero) {
      using index_t = decltype(zero);
      max_pool_local_kernel<scalar_t, index_t><<<grid_for(n, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), dims_of<index_t>(x), y.data_ptr<scalar_t>(), dims_of<index_t>(y),
          local.data_ptr<uint8_t>(), dims_of<index_t>(local), P<index_t>(p), last, static_cast<index_t>(n));
    };
    if (fit)
      launch(int32_t{0});
    else
      launch(int64_t{0});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void max_pool2d_local_backward_cuda(const at::Tensor& gy, const at::Tensor& local, const Pool2d& p, at::Tensor& gx) {
  const c10::cuda::CUDAGuard guard(gy.device());
  TORCH_CHECK(gy.dim() == 4 && gx.dim() == 4 && local.sizes() == gy.sizes() && local.scalar_type() == at::kByte &&
                  gx.scalar_type() == gy.scalar_type(),
              "aq: max_pool2d_local_backward_cuda: 4-d gradients of one dtype, byte indices of gy's shape");
  const bool fit = pool_offsets_fit(gx) && pool_offsets_fit(gy) && pool_offsets_fit(local);
  const int64_t n = gx.numel();
  if (n == 0) return;
  const bool last = channels_last(gx);
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "aq_max_pool2d_local_backward", [&] {
    const auto launch = [&](auto zero) {
      using index_t = decltype(zero);
      max_pool_local_backward_kernel<scalar_t, index_t>
          <<<grid_for(n, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
              gy.const_data_ptr<scalar_t>(), dims_of<index_t>(gy), local.const_data_ptr<uint8_t>(),
              dims_of<index_t>(local), gx.data_ptr<scalar_t>(), dims_of<index_t>(gx), P<index_t>(p), last,
              static_cast<index_t>(n));
    };
    if (fit)
      launch(int32_t{0});
    else
      launch(int64_t{0});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

AQ_REGISTER_KERNEL(max_pool2d_local, c10::kCUDA, max_pool2d_local_cuda);
AQ_REGISTER_KERNEL(max_pool2d_local_backward, c10::kCUDA, max_pool2d_local_backward_cuda);

}  // namespace aq::kernels
