// CUDA per-sample allocation (see allocation.h), a layer in one block.
// Thread t owns samples t, t + kAllocThreads, ...; candidate removals
// (sample i, b -> b-1) have keys c_i * dinv[b] >= 0, whose IEEE bit patterns
// order like their values.  The greedy removes the R smallest in (key, i, b
// descending) order: a radix select finds the R-th key K, every key below K
// goes, and of the keys equal to K the first ones in sample order make up
// the rest.
#include "allocation.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

namespace aq::kernels {
namespace {

constexpr int kAllocThreads = 512;
struct MaxOp {
  __device__ double operator()(double a, double b) const { return a > b ? a : b; }
};
constexpr int kAllocPerThread = (kAllocMaxSamples + kAllocThreads - 1) / kAllocThreads;

__global__ void __launch_bounds__(kAllocThreads)
allocate_per_sample_kernel(const AllocPlan p, const float* __restrict__ parts, float* range_sum,
                           const float* __restrict__ grad_mean,
                           const float* __restrict__ stat, const int64_t* __restrict__ idx, int32_t* __restrict__ bits,
                           int64_t* __restrict__ word_offset, double* __restrict__ cost,
                           const double* __restrict__ extra) {
  using Reduce = cub::BlockReduce<double, kAllocThreads>;
  using ScanL = cub::BlockScan<int64_t, kAllocThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename ScanL::TempStorage scan;
  } tmp;
  __shared__ unsigned int hist[256];
  __shared__ double shared_value;
  __shared__ uint64_t prefix, found;
  __shared__ int64_t rank;
  __shared__ int single;
  const int t = threadIdx.x;
  const int64_t N = p.N;
  double c[kAllocPerThread];

  // A sample's parts summed by one warp, lanes strided, then by shuffles:
  // the same order every launch.  Read back below through L2 (written by
  // other threads of the block).
  const float* range_sq = parts;
  if (p.range_cols > 1) {
    for (int64_t i = t >> 5; i < N; i += kAllocThreads / 32) {
      const float* row = parts + i * p.range_cols;
      float s = 0.0f;
      for (int64_t k = t & 31; k < p.range_cols; k += 32) s = __fadd_rn(s, row[k]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s = __fadd_rn(s, __shfl_xor_sync(0xffffffffu, s, o));
      if ((t & 31) == 0) range_sum[i] = s;
    }
    __syncthreads();
    range_sq = range_sum;
  }

  // s_n: per-sample statistics need the mean of the seen ones first.
  float known[kAllocPerThread];
  float mean = 1.0f;
  if (p.mode == 2) {
    double sum = 0, count = 0;
    for (int j = 0; j < kAllocPerThread; ++j) {
      const int64_t i = t + static_cast<int64_t>(j) * kAllocThreads;
      known[j] = -1.0f;
      if (i < N) {
        const int64_t k = idx[i];
        known[j] = k >= 0 && k < p.stat_size ? stat[k] : -1.0f;
        if (known[j] >= 0.0f) sum += known[j], count += 1;
      }
    }
    const double total = Reduce(tmp.reduce).Sum(sum);
    __syncthreads();
    const double seen = Reduce(tmp.reduce).Sum(count);
    if (t == 0) shared_value = seen > 0 ? static_cast<double>(static_cast<float>(total) / static_cast<float>(seen)) : 1.0;
    __syncthreads();
    mean = static_cast<float>(shared_value);
  }
  double local_max = -1.0;
  for (int j = 0; j < kAllocPerThread; ++j) {
    const int64_t i = t + static_cast<int64_t>(j) * kAllocThreads;
    c[j] = 0;
    if (i >= N) continue;
    float s = 1.0f;
    if (!p.batch_norm) {
      if (p.mode == 1) s = grad_mean[0];
      else if (p.mode == 2) s = known[j] >= 0.0f ? known[j] : mean;
      s = __fmul_rn(s, p.grad_scale);
    }
    double v = __dmul_rn(__dmul_rn(static_cast<double>(__ldcg(range_sq + i)), p.range_scale), static_cast<double>(s));
    if (extra) v = __dadd_rn(v, extra[i]);
    if (v <= 0) v = 0;  // also -0.0 -> +0.0; NaN stays
    c[j] = v;
    if (isfinite(v) && v > local_max) local_max = v;
  }
  if (cost) {  // sensitivities only
    for (int j = 0; j < kAllocPerThread; ++j) {
      const int64_t i = t + static_cast<int64_t>(j) * kAllocThreads;
      if (i < N) cost[i] = c[j];
    }
    return;
  }
  // NaN and +Inf take the largest finite value (1e300 if there is none).
  __syncthreads();
  const double maxf = Reduce(tmp.reduce).Reduce(local_max, MaxOp());
  if (t == 0) shared_value = maxf < 0 ? 1e300 : maxf;
  __syncthreads();
  for (int j = 0; j < kAllocPerThread; ++j)
    if (!isfinite(c[j])) c[j] = shared_value;

  const int m = p.ibits - 1;  // candidates per sample: b = ibits .. 2
  auto key_of = [&](double v, int b) { return static_cast<uint64_t>(__double_as_longlong(__dmul_rn(v, p.dinv[b]))); };
  auto key = [&](int j, int b) { return key_of(c[j], b); };
  if (p.removals > 0 && p.removals < m * N && m * N <= kAllocThreads) {
    // Few candidates (a small batch): thread q takes candidate q = i m +
    // (ibits - b), in the greedy's tie order, and counts the candidates
    // before it in (key, q) order; the first `removals` go.  No radix
    // rounds, two barriers.
    __shared__ double cs[kAllocThreads];
    __shared__ uint64_t keys[kAllocThreads];
    __shared__ int removed[kAllocThreads];
    const int M = static_cast<int>(m * N);
    if (t < N) cs[t] = c[0], removed[t] = 0;
    __syncthreads();
    uint64_t mine = 0;
    if (t < M) keys[t] = mine = key_of(cs[t / m], p.ibits - t % m);
    __syncthreads();
    if (t < M) {
      int before = 0;
      for (int q = 0; q < M; ++q) {
        const uint64_t k = keys[q];
        before += k < mine || (k == mine && q < t);
      }
      if (before < p.removals) atomicAdd(&removed[t / m], 1);
    }
    __syncthreads();
    const int b = t < N ? p.ibits - removed[t] : 0;
    int64_t start = 0;
    ScanL(tmp.scan).ExclusiveSum(static_cast<int64_t>(b) * p.words_per_bit, start);
    if (t < N) bits[t] = b, word_offset[t] = start;
    return;
  }
  const int rounds = static_cast<int>((N + kAllocThreads - 1) / kAllocThreads);  // the same for every thread
  const int lane = t & 31;
  uint64_t K = 0;
  int64_t need = 0;
  if (p.removals > 0 && p.removals < m * N) {
    // Radix select of the removals-th smallest key, a byte at a time from
    // the top.  A warp's lanes with keys in the same bucket add to its
    // count once (a bucket can hold nearly every key); the bucket is found
    // by a scan in one warp; once it holds a single key, that key is K.
    if (t == 0) prefix = 0, rank = p.removals, single = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int d = t; d < 256; d += kAllocThreads) hist[d] = 0;
      __syncthreads();
      const uint64_t high = shift == 56 ? 0 : ~uint64_t(0) << (shift + 8);
      const uint64_t want = prefix & high;
      for (int j = 0; j < rounds; ++j) {
        const bool valid = t + static_cast<int64_t>(j) * kAllocThreads < N;
        for (int b = p.ibits; b >= 2; --b) {
          const uint64_t k = valid ? key(j, b) : 0;
          const unsigned bucket = valid && (k & high) == want ? static_cast<unsigned>(k >> shift) & 255u : 256u;
          const unsigned peers = __match_any_sync(0xffffffffu, bucket);
          if (bucket < 256u && lane == __ffs(peers) - 1) atomicAdd(&hist[bucket], __popc(peers));
        }
      }
      __syncthreads();
      if (t < 32) {  // lane L holds buckets 8L .. 8L + 7
        unsigned cnt[8];
        long long sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) cnt[i] = hist[8 * lane + i], sum += cnt[i];
        long long incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const long long v = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += v;
        }
        const long long r = rank;
        const int first = __ffs(__ballot_sync(0xffffffffu, incl >= r)) - 1;
        if (lane == first) {
          long long below = incl - sum;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (below + cnt[i] >= r) {
              prefix |= static_cast<uint64_t>(8 * lane + i) << shift;
              rank = r - below;
              single = cnt[i] == 1;
              break;
            }
            below += cnt[i];
          }
        }
      }
      __syncthreads();
      if (single) {  // the one key under the prefix found so far
        const uint64_t fixed = ~uint64_t(0) << shift, pre = prefix;
        for (int j = 0; j < rounds; ++j) {
          if (t + static_cast<int64_t>(j) * kAllocThreads >= N) break;
          for (int b = p.ibits; b >= 2; --b) {
            const uint64_t k = key(j, b);
            if ((k & fixed) == pre) found = k;
          }
        }
        __syncthreads();
        if (t == 0) prefix = found;
        __syncthreads();
        break;
      }
    }
    K = prefix;
    need = rank;  // candidates equal to K still to remove
  }
  // Removals per sample, then bits and word offsets by block scans in sample order.
  int64_t carry_eq = 0, carry_words = 0;
  for (int j = 0; j < kAllocPerThread; ++j) {
    const int64_t i = t + static_cast<int64_t>(j) * kAllocThreads;
    int less = 0, eq = 0;
    if (i < N && p.removals >= m * N) {
      less = m;
    } else if (i < N && p.removals > 0) {
      for (int b = p.ibits; b >= 2; --b) {
        const uint64_t k = key(j, b);
        less += k < K;
        eq += k == K;
      }
    }
    int64_t before = 0, round_eq = 0;
    __syncthreads();
    ScanL(tmp.scan).ExclusiveSum(static_cast<int64_t>(eq), before, round_eq);
    before += carry_eq;
    carry_eq += round_eq;
    const int64_t left = need - before;
    const int64_t take = left <= 0 ? 0 : left < eq ? left : eq;
    const int b = p.ibits - less - static_cast<int>(take);
    const int64_t words = i < N ? static_cast<int64_t>(b) * p.words_per_bit : 0;
    int64_t start = 0, round_words = 0;
    __syncthreads();
    ScanL(tmp.scan).ExclusiveSum(words, start, round_words);
    if (i < N) {
      bits[i] = b;
      word_offset[i] = carry_words + start;
    }
    carry_words += round_words;
  }
}

void allocate_per_sample_cuda(const AllocPlan& plan, const at::Tensor& range_sq, const at::Tensor& range_sum,
                              const at::Tensor& grad_mean, const at::Tensor& sample_stat, const at::Tensor& indices,
                              at::Tensor& bits, at::Tensor& word_offset, at::Tensor* cost, const at::Tensor& extra) {
  const c10::cuda::CUDAGuard guard(range_sq.device());
  if (plan.N == 0) return;
  TORCH_CHECK(plan.N <= kAllocMaxSamples, "aq: per-sample allocation of more than ", kAllocMaxSamples, " samples");
  TORCH_CHECK(plan.range_cols >= 1 && range_sq.numel() == plan.N * plan.range_cols &&
                  (plan.range_cols == 1 || (range_sum.defined() && range_sum.numel() == plan.N)),
              "aq: allocate_per_sample_cuda: range_sq [N, range_cols], range_sum [N] for more than one column");
  auto stream = at::cuda::getCurrentCUDAStream();
  allocate_per_sample_kernel<<<1, kAllocThreads, 0, stream>>>(
      plan, range_sq.const_data_ptr<float>(), plan.range_cols > 1 ? range_sum.data_ptr<float>() : nullptr,
      plan.mode == 1 ? grad_mean.const_data_ptr<float>() : nullptr,
      plan.mode == 2 ? sample_stat.const_data_ptr<float>() : nullptr,
      plan.mode == 2 ? indices.const_data_ptr<int64_t>() : nullptr, cost ? nullptr : bits.data_ptr<int32_t>(),
      cost ? nullptr : word_offset.data_ptr<int64_t>(), cost ? cost->data_ptr<double>() : nullptr,
      extra.defined() ? extra.const_data_ptr<double>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

AQ_REGISTER_KERNEL(allocate_per_sample, c10::kCUDA, allocate_per_sample_cuda);

}  // namespace aq::kernels
