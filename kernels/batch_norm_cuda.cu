// CUDA BatchNorm passes (see batch_norm.h).  On the way, the backward's
// pass can sum each sample's squared input gradient (the conv before it
// records those), and the forward's statistics, with channels innermost,
// come from a kernel of ours that also works out the input's group ranges
// for the allocation; the backward's per-channel sums, and the statistics in
// other layouts, come from LibTorch's kernels.
#include "batch_norm.h"

#include "cuda_common.cuh"

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

// ---------------------------------------------------------------------------
// Training-mode statistics with channels innermost, from one read of x: the
// per-channel mean and biased variance (LibTorch's Welford kernel for this
// layout divides per element, which keeps it well below the read's speed)
// and, optionally, each group's squared range for the adaptive allocation
// (the range pass's per-group values), which then needs no pass of its own.
//
// Threads (tx, ty): tx picks a vector of E channels (blockIdx.x blocks of
// them), ty a row (blockIdx.y, then the whole grid's rows); a thread keeps
// its channels from row to row.  Each thread sums x - s and (x - s)^2 from
// a shift s (its first row's value: no cancellation for offset data), turns
// them into a count, mean and M2, and the block merges its threads' (Chan's
// pairwise update) in a fixed tree; a second kernel merges the blocks' in
// order.  A warp reads 32 consecutive vectors, so with G = 32 E it reads
// exactly one group per step.

constexpr int kStatThreads = 512;

template <typename T>
__device__ __forceinline__ void merge_moments(T& n, T& mean, T& m2, T nb, T mb, T m2b) {
  if (nb == T(0)) return;
  if (n == T(0)) {
    n = nb, mean = mb, m2 = m2b;
    return;
  }
  const T tot = n + nb, delta = mb - mean, fb = nb / tot;
  mean += delta * fb;
  m2 += m2b + delta * delta * n * fb;
  n = tot;
}

template <typename scalar_t, int E, bool kR2>
__global__ void __launch_bounds__(kStatThreads)
    stats_last_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t c_vec, float* __restrict__ part,
                      float* __restrict__ r2) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * bx + tx;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * by;
  const auto* xv = reinterpret_cast<const Vec<scalar_t, E>*>(x);
  float shift[E], sum[E], sq[E];
  int64_t r = static_cast<int64_t>(blockIdx.y) * by + ty;
  if (r < rows) {
    const Vec<scalar_t, E> v = xv[r * c_vec + cv];
#pragma unroll
    for (int e = 0; e < E; ++e) shift[e] = static_cast<float>(v.v[e]);
  }
#pragma unroll
  for (int e = 0; e < E; ++e) sum[e] = sq[e] = 0.0f;
  int64_t count = 0;
#pragma unroll 4
  for (; r < rows; r += stride) {
    const Vec<scalar_t, E> v = xv[r * c_vec + cv];
    float lo = static_cast<float>(v.v[0]), hi = lo;
    bool nan = false;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float f = static_cast<float>(v.v[e]);
      const float d = f - shift[e];
      sum[e] += d;
      sq[e] = fmaf(d, d, sq[e]);
      if (kR2) lo = fminf(lo, f), hi = fmaxf(hi, f), nan |= f != f;
    }
    ++count;
    if (kR2) {  // the warp's 32 vectors are one group (whole warps take part: rows are whole groups)
      const float range_sq = warp_group_range_sq(lo, hi, nan);
      if (((ty * bx + tx) & 31) == 0) r2[(r * c_vec + cv) / 32] = range_sq;
    }
  }
  // Count, mean, M2 per channel, merged over ty in a fixed tree.
  __shared__ float sh[kStatThreads * E * 2 + kStatThreads];
  float* sm = sh;                             // [by][bx * E] means
  float* s2 = sh + kStatThreads * E;          // [by][bx * E] M2
  float* sn = sh + 2 * kStatThreads * E;      // [by] counts
  const float n = static_cast<float>(count);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int k = ty * bx * E + tx * E + e;
    const float mean_d = count ? sum[e] / n : 0.0f;
    sm[k] = count ? shift[e] + mean_d : 0.0f;
    s2[k] = count ? fmaxf(sq[e] - sum[e] * mean_d, 0.0f) : 0.0f;
  }
  if (tx == 0) sn[ty] = n;
  __syncthreads();
  for (int half = by / 2; half > 0; half >>= 1) {
    float na = 0, nb = 0;
    if (ty < half) {
      na = sn[ty], nb = sn[ty + half];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int k = ty * bx * E + tx * E + e, kb = k + half * bx * E;
        float cnt = na, mean = sm[k], m2 = s2[k];
        merge_moments(cnt, mean, m2, nb, sm[kb], s2[kb]);
        sm[k] = mean, s2[k] = m2;
      }
    }
    __syncthreads();  // every tx has read sn[ty] before it changes
    if (ty < half && tx == 0) sn[ty] = na + nb;
    __syncthreads();
  }
  if (ty == 0) {
    // part: [gridDim.y][2 C + 1]: means, M2s, count.
    const int64_t C = c_vec * E;
    float* p = part + static_cast<int64_t>(blockIdx.y) * (2 * C + 1);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      p[cv * E + e] = sm[tx * E + e];
      p[C + cv * E + e] = s2[tx * E + e];
    }
    if (blockIdx.x == 0 && tx == 0) p[2 * C] = sn[0];
  }
}

// Merges the blocks' moments per channel, in a fixed order: lane ty of
// channel tx takes blocks ty, ty + kLanes, ..., then the lanes merge in a
// tree.  Writes mean, invstd = 1 / sqrt(var + eps) (biased var) and, where
// given, the running statistics as LibTorch updates them (unbiased var,
// momentum).
constexpr int kFinalChannels = 32, kFinalLanes = 16;

__global__ void __launch_bounds__(kFinalChannels* kFinalLanes)
    stats_finalize_kernel(const float* __restrict__ part, int64_t parts, int64_t C, float eps, float momentum,
                          float* __restrict__ mean, float* __restrict__ invstd, float* __restrict__ running_mean,
                          float* __restrict__ running_var) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalChannels + tx;
  float n = 0, mu = 0, m2 = 0;
  if (c < C)
    for (int64_t q = ty; q < parts; q += kFinalLanes) {
      const float* p = part + q * (2 * C + 1);
      merge_moments(n, mu, m2, p[2 * C], p[c], p[C + c]);
    }
  __shared__ float sh[3][kFinalLanes][kFinalChannels];
  sh[0][ty][tx] = n, sh[1][ty][tx] = mu, sh[2][ty][tx] = m2;
  __syncthreads();
  for (int half = kFinalLanes / 2; half > 0; half >>= 1) {
    if (ty < half) {
      merge_moments(n, mu, m2, sh[0][ty + half][tx], sh[1][ty + half][tx], sh[2][ty + half][tx]);
      sh[0][ty][tx] = n, sh[1][ty][tx] = mu, sh[2][ty][tx] = m2;
    }
    __syncthreads();
  }
  if (ty != 0 || c >= C) return;
  const float var = n > 0 ? m2 / n : 0.0f;
  mean[c] = mu;
  invstd[c] = 1.0f / sqrtf(var + eps);
  if (running_mean) {
    const float bessel = n / (n - 1);
    running_mean[c] = mu * momentum + (1 - momentum) * running_mean[c];
    running_var[c] = var * bessel * momentum + (1 - momentum) * running_var[c];
  }
}

template <typename scalar_t>
bool stats_last(const at::Tensor& x, double momentum, double eps, at::Tensor& running_mean, at::Tensor& running_var,
                at::Tensor& mean, at::Tensor& invstd, int64_t group_size, at::Tensor* r2) {
  constexpr int E = 8;  // channels per thread: one 16-byte load of 16-bit values, two of floats
  const int64_t C = x.size(1), N = x.size(0), rows = x.numel() / C;
  if (C % E != 0 || reinterpret_cast<uintptr_t>(x.const_data_ptr()) % (E * sizeof(scalar_t)) != 0) return false;
  const int64_t c_vec = C / E;
  if (c_vec < 32 ? 32 % c_vec != 0 : c_vec % 32 != 0) return false;  // warps of whole rows or row pieces
  const int bx = static_cast<int>(std::min<int64_t>(c_vec, 32)), by = kStatThreads / bx;
  const int64_t gx = c_vec / bx;
  if (gx > 65535) return false;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({(rows + by - 1) / by, sms * 2 / gx, 65535}));
  const int64_t D = x.numel() / N;
  const bool with_r2 = r2 && group_size == 32 * E && D % group_size == 0;
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor part = at::empty({gy, 2 * C + 1}, fopts);
  at::Tensor groups;
  if (with_r2) groups = at::empty({N, D / group_size}, fopts);
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), block(bx, by);
  if (with_r2)
    stats_last_kernel<scalar_t, E, true><<<grid, block, 0, stream>>>(x.const_data_ptr<scalar_t>(), rows, c_vec,
                                                                    part.data_ptr<float>(), groups.data_ptr<float>());
  else
    stats_last_kernel<scalar_t, E, false>
        <<<grid, block, 0, stream>>>(x.const_data_ptr<scalar_t>(), rows, c_vec, part.data_ptr<float>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  mean = at::empty({C}, fopts);
  invstd = at::empty({C}, fopts);
  const bool running = running_mean.defined() && running_mean.numel() > 0;
  stats_finalize_kernel<<<static_cast<unsigned>((C + kFinalChannels - 1) / kFinalChannels),
                          dim3(kFinalChannels, kFinalLanes), 0, stream>>>(
      part.const_data_ptr<float>(), gy, C, static_cast<float>(eps), static_cast<float>(momentum),
      mean.data_ptr<float>(), invstd.data_ptr<float>(), running ? running_mean.data_ptr<float>() : nullptr,
      running ? running_var.data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (with_r2) *r2 = groups;
  return true;
}

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

bool batch_norm_stats_cuda(const at::Tensor& x, double momentum, double eps, at::Tensor& running_mean,
                           at::Tensor& running_var, at::Tensor& mean, at::Tensor& invstd, int64_t group_size,
                           at::Tensor* r2) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.dim() < 2 || x.numel() == 0 || x.size(1) == 0) return false;
  // Channels innermost: channels last, or no other dims than N and C.
  const bool last = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                    (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) ||
                    (x.is_contiguous() && x.numel() == x.size(0) * x.size(1));
  if (!last) return false;
  const auto is_float = [](const at::Tensor& t) {
    return !t.defined() || !t.numel() || (t.scalar_type() == at::kFloat && t.is_contiguous());
  };
  if (!is_float(running_mean) || !is_float(running_var) || running_mean.defined() != running_var.defined())
    return false;
  switch (x.scalar_type()) {
    case at::kFloat: return stats_last<float>(x, momentum, eps, running_mean, running_var, mean, invstd, group_size, r2);
    case at::kHalf: return stats_last<at::Half>(x, momentum, eps, running_mean, running_var, mean, invstd, group_size, r2);
    case at::kBFloat16:
      return stats_last<at::BFloat16>(x, momentum, eps, running_mean, running_var, mean, invstd, group_size, r2);
    default: return false;
  }
}

}  // namespace

AQ_REGISTER_KERNEL(batch_norm_input_grad_inplace, c10::kCUDA, batch_norm_input_grad_inplace_cuda);
AQ_REGISTER_KERNEL(batch_norm_forward_inplace, c10::kCUDA, batch_norm_forward_inplace_cuda);
AQ_REGISTER_KERNEL(batch_norm_stats, c10::kCUDA, batch_norm_stats_cuda);

}  // namespace aq::kernels
