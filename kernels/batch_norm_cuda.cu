// BatchNorm's input gradient written over the restored input (CUDA).  The
// backward of a compressed BatchNorm restores its input into a tensor of its
// own; once the per-channel sums are taken, that tensor is read for the last
// time by the elementwise pass, which can therefore write the input gradient
// in its place: one tensor of the input's size fewer at BatchNorm's peak.
#include "kernels.h"

#include <ATen/TensorIterator.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/native/cuda/Loops.cuh>
#include <ATen/ops/ones_like.h>
#include <c10/cuda/CUDAGuard.h>

namespace aq::kernels {
namespace {

// ATen's batch_norm_backward_elemt: (dy - mean_dy - (x - mean) k1) k2, with
// mean_dy = sum dy / M, k1 = invstd^2 sum dy (x - mean) / M, k2 = w invstd.
struct Coef {
  float mean, mdy, k1, k2;
  __device__ Coef(const float* mean_, const float* invstd, const float* w, const float* sum_dy,
                  const float* sum_dy_xmu, float norm, int64_t c) {
    const float is = __ldg(invstd + c);
    mean = __ldg(mean_ + c);
    mdy = __ldg(sum_dy + c) * norm;
    k1 = is * is * __ldg(sum_dy_xmu + c) * norm;
    k2 = w ? __ldg(w + c) * is : is;
  }
  __device__ float operator()(float dy, float x) const { return (dy - mdy - (x - mean) * k1) * k2; }
};

template <typename scalar_t, int E>
struct alignas(sizeof(scalar_t) * E) Vec {
  scalar_t v[E];
};

// Channels last (the channel is the innermost dimension): x and dy are rows
// of C / E vectors of E channels.  The threads step through them a whole
// number of rows at a time, so each thread keeps its E channels, and their
// coefficients, from one step to the next.
template <typename scalar_t, int E>
__global__ void input_grad_last_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, int64_t n_vec,
                                       int64_t c_vec, const float* __restrict__ mean, const float* __restrict__ invstd,
                                       const float* __restrict__ w, const float* __restrict__ sum_dy,
                                       const float* __restrict__ sum_dy_xmu, float norm) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x / c_vec * c_vec;
  if (tid >= step) return;
  const int64_t c0 = tid % c_vec * E;
  float m[E], mdy[E], k1[E], k2[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const Coef k(mean, invstd, w, sum_dy, sum_dy_xmu, norm, c0 + e);
    m[e] = k.mean, mdy[e] = k.mdy, k1[e] = k.k1, k2[e] = k.k2;
  }
  for (int64_t i = tid; i < n_vec; i += step) {
    const Vec<scalar_t, E> g = reinterpret_cast<const Vec<scalar_t, E>*>(dy)[i];
    Vec<scalar_t, E> v = reinterpret_cast<const Vec<scalar_t, E>*>(x)[i];
#pragma unroll
    for (int e = 0; e < E; ++e)
      v.v[e] = static_cast<scalar_t>((static_cast<float>(g.v[e]) - mdy[e] - (static_cast<float>(v.v[e]) - m[e]) * k1[e]) * k2[e]);
    reinterpret_cast<Vec<scalar_t, E>*>(x)[i] = v;
  }
}

// NCHW: planes (one sample's channel) of inner / E vectors sharing one
// channel; blockIdx.y steps through the planes, blockIdx.x along each.
template <typename scalar_t, int E>
__global__ void input_grad_planes_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, int64_t planes,
                                         int64_t C, int64_t inner_vec, const float* __restrict__ mean,
                                         const float* __restrict__ invstd, const float* __restrict__ w,
                                         const float* __restrict__ sum_dy, const float* __restrict__ sum_dy_xmu,
                                         float norm) {
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    const Coef k(mean, invstd, w, sum_dy, sum_dy_xmu, norm, p % C);
    auto* xp = reinterpret_cast<Vec<scalar_t, E>*>(x) + p * inner_vec;
    const auto* gp = reinterpret_cast<const Vec<scalar_t, E>*>(dy) + p * inner_vec;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < inner_vec;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const Vec<scalar_t, E> g = gp[i];
      Vec<scalar_t, E> v = xp[i];
#pragma unroll
      for (int e = 0; e < E; ++e) v.v[e] = static_cast<scalar_t>(k(static_cast<float>(g.v[e]), static_cast<float>(v.v[e])));
      xp[i] = v;
    }
  }
}

template <typename scalar_t, int E>
void launch(at::Tensor& x, const at::Tensor& dy, bool last, int64_t C, int64_t inner, const float* const* p,
            float norm) {
  constexpr int threads = 256;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t most = sms * 16;  // blocks
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (last) {
    const int64_t n_vec = x.numel() / E, c_vec = C / E;
    // Enough threads for every channel vector at least once.
    const int64_t blocks = std::max((c_vec + threads - 1) / threads, std::min((n_vec + threads - 1) / threads, most));
    input_grad_last_kernel<scalar_t, E><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), n_vec, c_vec, p[0], p[1], p[2], p[3], p[4], norm);
  } else {
    const int64_t inner_vec = inner / E, planes = x.numel() / inner;
    const int64_t bx = std::min<int64_t>((inner_vec + threads - 1) / threads, most);
    const int64_t by = std::min<int64_t>({planes, std::max<int64_t>(1, most / bx), 65535});
    input_grad_planes_kernel<scalar_t, E><<<dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by)), threads, 0,
                                            stream>>>(x.data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), planes,
                                                      C, inner_vec, p[0], p[1], p[2], p[3], p[4], norm);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void input_grad(at::Tensor& x, const at::Tensor& dy, bool last, int64_t C, int64_t inner, const float* const* p,
                float norm) {
  constexpr int V = 16 / sizeof(scalar_t);
  const bool aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(dy.const_data_ptr()) % 16 == 0;
  if (aligned && inner % V == 0) return launch<scalar_t, V>(x, dy, last, C, inner, p, norm);
  return launch<scalar_t, 1>(x, dy, last, C, inner, p, norm);
}

// Any other pair of layouts: a TensorIterator over x, dy and the [C] vectors
// seen as [1, C, 1, ...].
template <typename scalar_t>
void input_grad_strided(at::Tensor& x, const at::Tensor& dy, const std::array<at::Tensor, 5>& v, float norm) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  std::array<at::Tensor, 5> views;
  for (size_t i = 0; i < v.size(); ++i) views[i] = v[i].view(shape);
  auto cfg = at::TensorIteratorConfig();
  cfg.add_output(x).add_const_input(dy).add_const_input(x);
  for (const at::Tensor& t : views) cfg.add_const_input(t);
  auto iter = cfg.check_all_same_dtype(false).promote_inputs_to_common_dtype(false).resize_outputs(false).build();
  at::native::gpu_kernel(iter, [norm] GPU_LAMBDA(scalar_t g, scalar_t xv, float m, float is, float w, float sdy,
                                                 float sdxmu) -> scalar_t {
    return static_cast<scalar_t>(
        (static_cast<float>(g) - sdy * norm - (static_cast<float>(xv) - m) * (is * is * sdxmu * norm)) * (w * is));
  });
}

}  // namespace

void batch_norm_input_grad_inplace_cuda(at::Tensor& x, const at::Tensor& dy, const at::Tensor& mean,
                                        const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& sum_dy,
                                        const at::Tensor& sum_dy_xmu, int64_t count) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() >= 2 && x.sizes() == dy.sizes() && x.scalar_type() == dy.scalar_type(),
              "aq: batch_norm_input_grad_inplace_cuda: x and dy differ");
  if (x.numel() == 0) return;
  const int64_t C = x.size(1);
  const auto f = [&](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const std::array<at::Tensor, 5> v = {f(mean), f(invstd), weight.defined() ? f(weight) : at::Tensor(), f(sum_dy),
                                       f(sum_dy_xmu)};
  const float norm = 1.0f / static_cast<float>(count);
  // Dense in one of the two layouts, the same for x and dy: the flat kernel.
  const int64_t inner = x.numel() / (x.size(0) * C);
  const bool same = x.strides() == dy.strides() && x.size(0) > 0;
  const bool nchw = same && x.is_contiguous();
  const bool last = same && !nchw &&
                    x.is_contiguous(x.dim() == 4   ? at::MemoryFormat::ChannelsLast
                                    : x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                                   : at::MemoryFormat::Contiguous);
  if (nchw || last) {
    const float* p[5];
    for (size_t i = 0; i < v.size(); ++i) p[i] = v[i].defined() ? v[i].const_data_ptr<float>() : nullptr;
    const bool l = last || inner == 1;  // [N, C] or 1x1: channels are innermost in NCHW too
    const int64_t in = l ? C : inner;
    switch (x.scalar_type()) {
      case at::kFloat: return input_grad<float>(x, dy, l, C, in, p, norm);
      case at::kHalf: return input_grad<at::Half>(x, dy, l, C, in, p, norm);
      case at::kBFloat16: return input_grad<at::BFloat16>(x, dy, l, C, in, p, norm);
      default: break;
    }
  } else {
    std::array<at::Tensor, 5> u = v;
    if (!u[2].defined()) u[2] = at::ones_like(u[0]);
    switch (x.scalar_type()) {
      case at::kFloat: return input_grad_strided<float>(x, dy, u, norm);
      case at::kHalf: return input_grad_strided<at::Half>(x, dy, u, norm);
      case at::kBFloat16: return input_grad_strided<at::BFloat16>(x, dy, u, norm);
      default: break;
    }
  }
  TORCH_CHECK(false, "aq: batch_norm_input_grad_inplace_cuda: fp32, fp16 or bf16, not ", x.scalar_type());
}

}  // namespace aq::kernels
