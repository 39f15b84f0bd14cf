// BatchNorm's elementwise passes written in place (CUDA).  The forward of a
// BatchNorm whose input has no other reader writes its output over the
// input once the compressed copy is taken; the backward of a compressed
// BatchNorm restores its input into a tensor of its own, read for the last
// time by the elementwise pass, which therefore writes the input gradient in
// its place.  Each saves a tensor of the input's size at BatchNorm's peak.
// The per-channel statistics come from LibTorch's own kernels.
#include "kernels.h"

#include <ATen/TensorIterator.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/native/cuda/Loops.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/block/block_reduce.cuh>

namespace aq::kernels {
namespace {

// The per-channel float [C] vectors a pass reads (null where absent), and
// the 1 / count of the backward's means.
struct Args {
  const float* p[5];
  float norm;
  bool last;  // channels innermost
};

// The forward, as LibTorch's training-mode kernels compute it, in their
// order of operations: w (x - mean) invstd + b with channels innermost,
// ((x - mean) invstd) w + b otherwise; p = {mean, invstd, w, b}.
struct Forward {
  static constexpr bool kDy = false;
  float mean, is, w, b;
  bool last;
  Forward() = default;
  __device__ Forward(const Args& a, int64_t c)
      : mean(__ldg(a.p[0] + c)),
        is(__ldg(a.p[1] + c)),
        w(a.p[2] ? __ldg(a.p[2] + c) : 1.0f),
        b(a.p[3] ? __ldg(a.p[3] + c) : 0.0f),
        last(a.last) {}
  __device__ float operator()(float, float x) const { return last ? w * (x - mean) * is + b : (x - mean) * is * w + b; }
};

// The input gradient, as LibTorch's batch_norm_backward_elemt computes it:
// (dy - mean_dy - (x - mean) k1) k2, with mean_dy = sum dy / M, k1 =
// invstd^2 sum dy (x - mean) / M, k2 = w invstd; p = {mean, invstd, w,
// sum_dy, sum_dy_xmu}.
struct InputGrad {
  static constexpr bool kDy = true;
  float mean, mdy, k1, k2;
  InputGrad() = default;
  __device__ InputGrad(const Args& a, int64_t c) {
    const float is = __ldg(a.p[1] + c);
    mean = __ldg(a.p[0] + c);
    mdy = __ldg(a.p[3] + c) * a.norm;
    k1 = is * is * __ldg(a.p[4] + c) * a.norm;
    k2 = a.p[2] ? __ldg(a.p[2] + c) * is : is;
  }
  __device__ float operator()(float dy, float x) const { return (dy - mdy - (x - mean) * k1) * k2; }
};

template <typename scalar_t, int E>
struct alignas(sizeof(scalar_t) * E) Vec {
  scalar_t v[E];
};

constexpr int kThreads = 256;

// Channels last (the channel is the innermost dimension): x (and dy) are
// rows of C / E vectors of E channels.  The threads step through them a
// whole number of rows at a time, so each thread keeps its E channels, and
// their coefficients, from one step to the next.  x is overwritten.
// With `partial`, blockIdx.y is a sample, n_vec counts that sample's
// vectors, and each block also writes the sum of the squares of the values
// it wrote to partial[sample * gridDim.x + blockIdx.x] (a fixed order of
// operations: the same sums every run).
template <typename Op, typename scalar_t, int E>
__global__ void __launch_bounds__(kThreads)
    last_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, int64_t n_vec, int64_t c_vec, Args a,
                float* __restrict__ partial) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x / c_vec * c_vec;
  const int64_t base = static_cast<int64_t>(blockIdx.y) * n_vec;
  auto* xv = reinterpret_cast<Vec<scalar_t, E>*>(x) + base;
  const auto* gv = reinterpret_cast<const Vec<scalar_t, E>*>(dy) + (Op::kDy ? base : 0);
  float sq = 0.0f;
  if (tid < step) {
    const int64_t c0 = tid % c_vec * E;
    Op k[E];
#pragma unroll
    for (int e = 0; e < E; ++e) k[e] = Op(a, c0 + e);
    for (int64_t i = tid; i < n_vec; i += step) {
      Vec<scalar_t, E> g;
      if constexpr (Op::kDy) g = gv[i];
      Vec<scalar_t, E> v = xv[i];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        v.v[e] = static_cast<scalar_t>(k[e](Op::kDy ? static_cast<float>(g.v[e]) : 0.0f, static_cast<float>(v.v[e])));
        if (partial) {
          const float q = static_cast<float>(v.v[e]);
          sq = fmaf(q, q, sq);
        }
      }
      xv[i] = v;
    }
  }
  if (partial) {
    using Reduce = cub::BlockReduce<float, kThreads>;
    __shared__ typename Reduce::TempStorage tmp;
    const float total = Reduce(tmp).Sum(sq);
    if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
  }
}

// NCHW: planes (one sample's channel) of inner / E vectors sharing one
// channel; blockIdx.y steps through the planes, blockIdx.x along each.
template <typename Op, typename scalar_t, int E>
__global__ void planes_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, int64_t planes, int64_t C,
                              int64_t inner_vec, Args a) {
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    const Op k(a, p % C);
    auto* xp = reinterpret_cast<Vec<scalar_t, E>*>(x) + p * inner_vec;
    const auto* gp = reinterpret_cast<const Vec<scalar_t, E>*>(dy) + p * inner_vec;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < inner_vec;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      Vec<scalar_t, E> g;
      if constexpr (Op::kDy) g = gp[i];
      Vec<scalar_t, E> v = xp[i];
#pragma unroll
      for (int e = 0; e < E; ++e)
        v.v[e] = static_cast<scalar_t>(k(Op::kDy ? static_cast<float>(g.v[e]) : 0.0f, static_cast<float>(v.v[e])));
      xp[i] = v;
    }
  }
}

template <typename Op, typename scalar_t, int E>
void launch(at::Tensor& x, const at::Tensor& dy, bool last, int64_t C, int64_t inner, const Args& a,
            at::Tensor* sample_sq) {
  constexpr int threads = kThreads;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t most = sms * 16;  // blocks
  const auto stream = at::cuda::getCurrentCUDAStream();
  scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = Op::kDy ? dy.const_data_ptr<scalar_t>() : nullptr;
  if (last) {
    const int64_t N = x.size(0);
    const bool per_sample = sample_sq && N <= 65535;
    const int64_t n_vec = x.numel() / E / (per_sample ? N : 1), c_vec = C / E;
    // Enough threads for every channel vector at least once.
    const int64_t most_x = per_sample ? std::max<int64_t>(1, most / N) : most;
    const int64_t blocks = std::max((c_vec + threads - 1) / threads, std::min((n_vec + threads - 1) / threads, most_x));
    at::Tensor partial;
    if (per_sample) partial = at::empty({N, blocks}, x.options().dtype(at::kFloat));
    last_kernel<Op, scalar_t, E><<<dim3(static_cast<unsigned>(blocks), per_sample ? static_cast<unsigned>(N) : 1u),
                                   threads, 0, stream>>>(xp, gp, n_vec, c_vec, a,
                                                         per_sample ? partial.data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (per_sample) *sample_sq = partial.sum(1);
    return;
  }
  const int64_t inner_vec = inner / E, planes = x.numel() / inner;
  const int64_t bx = std::min<int64_t>((inner_vec + threads - 1) / threads, most);
  const int64_t by = std::min<int64_t>({planes, std::max<int64_t>(1, most / bx), 65535});
  planes_kernel<Op, scalar_t, E><<<dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by)), threads, 0, stream>>>(
      xp, gp, planes, C, inner_vec, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Op, typename scalar_t>
void dense(at::Tensor& x, const at::Tensor& dy, bool last, int64_t C, int64_t inner, const Args& a,
           at::Tensor* sample_sq) {
  constexpr int V = 16 / sizeof(scalar_t);
  const bool aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                       (!Op::kDy || reinterpret_cast<uintptr_t>(dy.const_data_ptr()) % 16 == 0);
  if (aligned && inner % V == 0) return launch<Op, scalar_t, V>(x, dy, last, C, inner, a, sample_sq);
  return launch<Op, scalar_t, 1>(x, dy, last, C, inner, a, sample_sq);
}

// Where x is dense in one of the two layouts (and dy, if any, has x's
// strides), the flat kernels over x in place; false otherwise.  sample_sq
// (channels innermost only) receives the per-sample sums of squares of what
// was written.
template <typename Op>
bool run_dense(at::Tensor& x, const at::Tensor& dy, Args a, at::Tensor* sample_sq = nullptr) {
  const int64_t C = x.size(1);
  const int64_t inner = x.numel() / (x.size(0) * C);
  if (Op::kDy && x.strides() != dy.strides()) return false;
  const bool nchw = x.is_contiguous();
  const bool last = !nchw && x.is_contiguous(x.dim() == 4   ? at::MemoryFormat::ChannelsLast
                                             : x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                                            : at::MemoryFormat::Contiguous);
  if (!nchw && !last) return false;
  const bool l = last || inner == 1;  // [N, C] or 1x1: channels are innermost in NCHW too
  const int64_t in = l ? C : inner;
  a.last = l;
  switch (x.scalar_type()) {
    case at::kFloat: dense<Op, float>(x, dy, l, C, in, a, sample_sq); return true;
    case at::kHalf: dense<Op, at::Half>(x, dy, l, C, in, a, sample_sq); return true;
    case at::kBFloat16: dense<Op, at::BFloat16>(x, dy, l, C, in, a, sample_sq); return true;
    default: return false;
  }
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
                                        const at::Tensor& sum_dy_xmu, int64_t count, at::Tensor* sample_sq) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() >= 2 && x.sizes() == dy.sizes() && x.scalar_type() == dy.scalar_type(),
              "aq: batch_norm_input_grad_inplace_cuda: x and dy differ");
  if (x.numel() == 0) return;
  const auto f = [&](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat).contiguous() : t; };
  const std::array<at::Tensor, 5> v = {f(mean), f(invstd), f(weight), f(sum_dy), f(sum_dy_xmu)};
  Args a{};
  for (size_t i = 0; i < v.size(); ++i) a.p[i] = v[i].defined() ? v[i].const_data_ptr<float>() : nullptr;
  a.norm = 1.0f / static_cast<float>(count);
  if (run_dense<InputGrad>(x, dy, a, sample_sq)) return;
  // Any other pair of layouts.
  std::array<at::Tensor, 5> u = v;
  if (!u[2].defined()) u[2] = at::ones_like(u[0]);
  switch (x.scalar_type()) {
    case at::kFloat: return input_grad_strided<float>(x, dy, u, a.norm);
    case at::kHalf: return input_grad_strided<at::Half>(x, dy, u, a.norm);
    case at::kBFloat16: return input_grad_strided<at::BFloat16>(x, dy, u, a.norm);
    default: TORCH_CHECK(false, "aq: batch_norm_input_grad_inplace_cuda: fp32, fp16 or bf16, not ", x.scalar_type());
  }
}

bool batch_norm_forward_inplace_cuda(at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                     const at::Tensor& weight, const at::Tensor& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() >= 2, "aq: batch_norm_forward_inplace_cuda: x needs a channel dimension");
  if (x.numel() == 0) return true;
  const auto f = [&](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat).contiguous() : t; };
  const std::array<at::Tensor, 4> v = {f(mean), f(invstd), f(weight), f(bias)};
  Args a{};
  for (size_t i = 0; i < v.size(); ++i) a.p[i] = v[i].defined() ? v[i].const_data_ptr<float>() : nullptr;
  return run_dense<Forward>(x, at::Tensor(), a);
}

}  // namespace aq::kernels
