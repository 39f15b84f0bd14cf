// The activation-compression engine: per-group stochastic quantization and
// bit packing of the tensors a layer saves for backward (docs/design.md §2-3).
//
// A tensor of N samples is viewed as [N, D] in memory order (a dense tensor
// whose first dimension is outermost keeps its layout: channels_last works
// without a copy).  Each sample is cut into groups of `group_size` elements;
// each group keeps its min and max and b-bit codes of its elements, stochastic
// rounding making the dequantized tensor an unbiased estimate of the input.
// The byte layout is documented in aq-packed(5).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace aq {

struct CompressOptions {
  int64_t group_size = 256;  // power of two, 32 .. 2^20
  bool pergroup = true;      // false: one min/max for the whole tensor
  bool stochastic = true;    // false: round to nearest (biased; for tests and layouts)
  // Storage of each group's min/max: bf16 (min rounded down, max up, so the
  // estimator stays unbiased) or fp32.
  c10::ScalarType range_dtype = c10::kBFloat16;
  // Fixed Philox key and stream instead of the device's default generator:
  // the same key and stream give the same bytes on CPU and CUDA.
  std::optional<uint64_t> seed;
  uint64_t stream = 0;
};

// A compressed tensor and what is needed to restore it.
struct Packed {
  at::Tensor data;         // uint8, a whole number of 32-bit words
  at::Tensor mn, mx;       // group bounds, [N, groups] (or [1] when !pergroup)
  at::Tensor bits;         // per-sample bits, int32 [N]; undefined if uniform
  at::Tensor word_offset;  // int64 [N], first word of each sample (per-sample bits only)
  // (all tensors live on one device)
  // Per-sample bits: word_offset and the total on the host; empty when the
  // bits stayed on the device (then word_offset are positions in `data`,
  // which slices share whole).
  std::vector<int64_t> host_offsets;
  int64_t uniform_bits = 0;  // b when uniform, 0 when per-sample
  std::vector<int64_t> sizes, strides;
  c10::ScalarType dtype = c10::kFloat;
  int64_t samples = 0, sample_elements = 0, group_size = 256;
  bool pergroup = true;

  // Bytes this object holds on its device (what autograd keeps).
  int64_t nbytes() const;
  at::Device device() const { return data.device(); }
  int64_t groups_per_sample() const;
  // A copy on another device; dequantizes there to the same values.
  Packed to(at::Device device) const;
  // Samples [begin, end) as a Packed of their own (views, no copy, no sync).
  Packed slice(int64_t begin, int64_t end) const;
};

// Quantizes x (fp32, fp16 or bf16; CPU or CUDA) to `bits` bits per element
// (1..8).  Empty, zero-dimensional and non-contiguous tensors are accepted.
// Groups holding NaN or Inf dequantize to NaN.
Packed quantize(const at::Tensor& x, int64_t bits, const CompressOptions& options = {});
// Per-sample bits: bits_per_sample holds N integers in 1..8.  They are read on
// the host (a CUDA tensor is copied back, which waits for the device).
Packed quantize(const at::Tensor& x, const at::Tensor& bits_per_sample,
                const CompressOptions& options = {});
// Per-sample bits that stay on x's device (no host round trip, no wait):
// total_bits must be their sum, which sizes the output.  They are not
// checked (that would need reading them back): values outside 1..8 or a
// wrong sum give undefined bytes.  word_offset, when given, holds each
// sample's first 32-bit word (the exclusive prefix sum of bits x D/32, D
// rounded up to 32), as aq's fused allocation computes it.
Packed quantize(const at::Tensor& x, const at::Tensor& bits_per_sample, int64_t total_bits,
                const CompressOptions& options = {}, const at::Tensor& word_offset = {});
// x as [N, D] in the memory order quantize() groups it: a view when x is
// dense with its samples outermost (channels_last included), else a
// contiguous copy.
at::Tensor samples_in_memory_order(const at::Tensor& x);
// Restores a tensor of the input's shape, strides, dtype and device.
at::Tensor dequantize(const Packed& packed);
// g * dequantize(packed) in g's dtype (an elementwise backward).  Where the
// device has a kernel for it and g is laid out like the packed tensor, one
// pass, which also gives each sample's sum of squares of the product (float
// [N]) in *sample_sq; otherwise *sample_sq is left undefined.
at::Tensor dequantize_mul(const Packed& packed, const at::Tensor& g, at::Tensor* sample_sq = nullptr);

// Bit streams of small integers (ReLU/dropout masks, max-pool window argmax):
// code i occupies bits [i*bits, (i+1)*bits) of a little-endian stream padded to
// whole 32-code chunks.  codes: bool or an integer dtype; only the low `bits`
// (1..16) bits of each code are kept.
at::Tensor pack_bits(const at::Tensor& codes, int64_t bits);
at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, at::IntArrayRef sizes,
                       c10::ScalarType dtype = c10::kByte);
// 1-bit masks, exact.
at::Tensor pack_mask(const at::Tensor& mask);
at::Tensor unpack_mask(const at::Tensor& packed, at::IntArrayRef sizes);
// Masks straight from an activation, in its memory order (channels_last
// stays channels_last; no bool tensor in between): bit i of pack_bits's
// 1-bit layout is (element i in memory order > 0), for floating or bool x.
at::Tensor pack_positive(const at::Tensor& x);
// ReLU and its mask: {relu(x), pack_positive(relu(x))}, the values
// LibTorch's relu gives (NaN stays NaN, its bit 0).  inplace: x itself is
// overwritten and returned (its version bumped, as relu_ does).  On CUDA a
// dense x is read once for both.  With group_r2, it becomes, where that
// same pass could work it out (CUDA; group_size = 32 x 16 bytes' worth of
// elements, whole groups per sample), float [N, groups]: each group's
// (max - min)^2 of relu(x) in memory order, NaN if it holds one; undefined
// elsewhere.
std::pair<at::Tensor, at::Tensor> relu_and_mask(const at::Tensor& x, bool inplace, int64_t group_size = 0,
                                                at::Tensor* group_r2 = nullptr);
// The strides pack_positive ordered x's elements by (x's own when dense).
std::vector<int64_t> memory_strides(const at::Tensor& x);
// g * mask * scale, g of the masked tensor's shape, `strides` its
// memory_strides: the result has those strides (g is copied into them first
// when it has another layout).  With overwrite, g itself is written and
// returned where it already has those strides (the caller must be g's only
// user: a backward's incoming gradient that nothing else holds).
at::Tensor apply_packed_mask(const at::Tensor& g, const at::Tensor& packed, at::IntArrayRef strides,
                             double scale = 1.0, bool overwrite = false);
// Bits needed for an argmax inside a window of `window` elements (>= 1).
int64_t index_bits(int64_t window);

// Bytes pack_bits produces for n codes of `bits` bits.
int64_t packed_bits_nbytes(int64_t n, int64_t bits);

// True when this build has the CUDA kernels.
bool built_with_cuda();

}  // namespace aq
