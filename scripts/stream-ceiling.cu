// The ceiling for `aq-bench kernels`: how fast can a kernel that does nothing
// but stream move the bytes each compression kernel must move (read once,
// write once), against cudaMemcpy's copy in the same run?  The last column is
// the ratio `aq-bench kernels` would print for such a kernel: bytes of the
// full-precision side per second over the copy's bytes read plus written.
// The rows are named after the cases they bound (fp32 c2: fp32 compression at
// 2 bits, reading 16 bytes of input per byte of codes; d: decompression).
// Plain CUDA, no LibTorch; on the GPU machine:
//   nvcc -O3 -arch=sm_90a -o /tmp/stream-ceiling scripts/stream-ceiling.cu && /tmp/stream-ceiling
// docs/kernel-benchmarks.md has the H100's figures.
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

// K reads per write (compress-like): out[i] = xor_j in[j*nw + i], nw units out.
template <int K, int UNR>
__global__ void mix_rw(const uint4* __restrict__ in, uint4* __restrict__ out, int64_t nw) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * UNR;
  for (int64_t b = (int64_t)blockIdx.x * blockDim.x * UNR + threadIdx.x; b < nw; b += stride) {
    uint4 acc[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) acc[u] = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int j = 0; j < K; ++j)
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int64_t i = b + u * blockDim.x;
        if (i < nw) {
          const uint4 v = in[j * nw + i];
          acc[u].x ^= v.x; acc[u].y ^= v.y; acc[u].z ^= v.z; acc[u].w ^= v.w;
        }
      }
#pragma unroll
    for (int u = 0; u < UNR; ++u) {
      const int64_t i = b + u * blockDim.x;
      if (i < nw) out[i] = acc[u];
    }
  }
}
// K writes per read (decompress-like): out[j*nr + i] = in[i] ^ j.
template <int K, int UNR>
__global__ void mix_wr(const uint4* __restrict__ in, uint4* __restrict__ out, int64_t nr) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * UNR;
  for (int64_t b = (int64_t)blockIdx.x * blockDim.x * UNR + threadIdx.x; b < nr; b += stride) {
    uint4 v[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) {
      const int64_t i = b + u * blockDim.x;
      v[u] = i < nr ? in[i] : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < K; ++j)
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int64_t i = b + u * blockDim.x;
        if (i < nr) out[j * nr + i] = make_uint4(v[u].x ^ j, v[u].y, v[u].z, v[u].w);
      }
  }
}
__global__ void read_only(const uint4* __restrict__ in, uint4* __restrict__ out, int64_t n) {
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const uint4 v = in[i];
    acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) out[0] = acc;
}
__global__ void write_only(uint4* __restrict__ out, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = make_uint4((uint32_t)i, 0, 0, 0);
}

template <typename F>
float time_ms(F&& f) {
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> t;
  for (int r = 0; r < 25; ++r) {
    cudaEventRecord(a); f(); cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b); t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  for (int64_t bytes : {int64_t(256) << 20, int64_t(1) << 30}) {
    uint4 *a, *b;
    CK(cudaMalloc(&a, bytes)); CK(cudaMalloc(&b, bytes));
    CK(cudaMemset(a, 1, bytes)); CK(cudaMemset(b, 2, bytes));
    const int64_t n = bytes / 16;
    const float tc = time_ms([&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice); });
    const double copy = 2.0 * bytes / tc / 1e6;  // GB/s read+write
    printf("bytes\tcase\tread_MiB\twrite_MiB\tms\tbyte_rate_of_copy\tratio_to_copy(full-precision side)\n");
    printf("%lld\tmemcpy\t%lld\t%lld\t%.4f\t1.000\t0.500\t(copy %.1f GB/s)\n", (long long)bytes, (long long)(bytes >> 20), (long long)(bytes >> 20), tc, copy);
    auto row = [&](const char* name, double rd, double wr, float ms) {
      const double full = std::max(rd, wr);
      const double rate = (rd + wr) / ms / 1e6;
      printf("%lld\t%s\t%.0f\t%.0f\t%.4f\t%.3f\t%.3f\n", (long long)bytes, name, rd / 1048576, wr / 1048576, ms, rate / copy,
             full / ms / 1e6 / copy);
    };
    for (int blocks_per_sm : {4, 8, 16}) {
      const int grid = sms * blocks_per_sm;
      printf("# grid %d blocks of 256\n", grid);
      row("copy_kernel", bytes, bytes, time_ms([&] { mix_rw<1, 4><<<grid, 256>>>(a, b, n); }));
      row("read_only", bytes, 0, time_ms([&] { read_only<<<grid, 256>>>(a, b, n); }));
      row("write_only", 0, bytes, time_ms([&] { write_only<<<grid, 256>>>(b, n); }));
      row("r16:w1 (fp32 c2)", bytes, bytes / 16, time_ms([&] { mix_rw<16, 1><<<grid, 256>>>(a, b, n / 16); }));
      row("r8:w1 (fp32 c4, bf16 c2)", bytes, bytes / 8, time_ms([&] { mix_rw<8, 2><<<grid, 256>>>(a, b, n / 8); }));
      row("r4:w1 (bf16 c4)", bytes, bytes / 4, time_ms([&] { mix_rw<4, 4><<<grid, 256>>>(a, b, n / 4); }));
      row("r1:w16 (fp32 d2)", bytes / 16, bytes, time_ms([&] { mix_wr<16, 1><<<grid, 256>>>(a, b, n / 16); }));
      row("r1:w8 (fp32 d4, bf16 d2)", bytes / 8, bytes, time_ms([&] { mix_wr<8, 2><<<grid, 256>>>(a, b, n / 8); }));
      row("r1:w4 (bf16 d4)", bytes / 4, bytes, time_ms([&] { mix_wr<4, 4><<<grid, 256>>>(a, b, n / 4); }));
    }
    CK(cudaGetLastError());
    cudaFree(a); cudaFree(b);
  }
  return 0;
}
