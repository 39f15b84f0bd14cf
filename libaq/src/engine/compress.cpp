// Front end of the compression engine: argument checks, layout, allocation,
// random seeds; the kernels (kernels/quantize.h, pack.h, masks.h) compute.
#include "aq/compress.h"

#include "aq_config.h"
#include "masks.h"
#include "pack.h"
#include "quantize.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Functions.h>
#include <ATen/core/Generator.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>

namespace aq {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("aq: " + what); }

void check_device(const at::Tensor& t, const char* what) {
  if (t.is_cpu()) return;
  if (!t.is_cuda()) fail(std::string(what) + " must be on the CPU or a CUDA device, not " + t.device().str());
  if (!AQ_WITH_CUDA)
    fail(std::string("this aq was built without CUDA and cannot use the CUDA tensor ") + what +
         " (rebuild with -Dcuda=enabled)");
}

bool on_cuda(const at::Tensor& t) { return AQ_WITH_CUDA && t.is_cuda(); }

// x as a flat tensor in memory order, samples outermost, plus the strides to
// restore it with.
at::Tensor memory_order(const at::Tensor& x, std::vector<int64_t>& strides) {
  const int64_t n = x.dim() ? x.size(0) : 1;
  const bool dense = x.is_non_overlapping_and_dense() &&
                     (x.dim() == 0 || n <= 1 || x.stride(0) * n == x.numel());
  at::Tensor src = dense ? x : x.contiguous();
  strides = src.strides().vec();
  return src;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace

at::Tensor samples_in_memory_order(const at::Tensor& x) {
  const int64_t n = x.dim() ? x.size(0) : 1;
  const int64_t d = n ? x.numel() / n : 0;
  std::vector<int64_t> strides;
  return memory_order(x, strides).as_strided({n, d}, {d, 1});
}

namespace {

// The kernels' view of a packed tensor (seed and rounding mode aside).
kernels::Plan plan_of(const Packed& p) {
  kernels::Plan plan;
  plan.N = p.samples;
  plan.D = p.sample_elements;
  plan.Dp = round_up(plan.D, 32);
  plan.G = p.group_size;
  plan.ngroups = p.groups_per_sample();
  plan.bits = static_cast<int>(p.uniform_bits);
  plan.pergroup = p.pergroup;
  return plan;
}

// total_bits >= 0: per-sample bits whose sum is known and that stay where
// they are (no host round trip); -1: read them on the host and check them.
Packed quantize_impl(const at::Tensor& x, int64_t bits, at::Tensor sample_bits, int64_t total_bits,
                     const CompressOptions& o, const at::Tensor& word_offset = {}) {
  check_device(x, "input");
  const auto dt = x.scalar_type();
  if (dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16)
    fail(std::string("can only compress float32, float16 or bfloat16 tensors, not ") + c10::toString(dt));
  const int64_t G = o.group_size;
  if (G < 32 || G > (int64_t(1) << 20) || (G & (G - 1)) != 0)
    fail("group size must be a power of two from 32 to 2^20, not " + std::to_string(G));
  if (o.range_dtype != at::kFloat && o.range_dtype != at::kBFloat16)
    fail("range storage must be float32 or bfloat16");

  Packed p;
  p.dtype = dt;
  p.sizes = x.sizes().vec();
  p.group_size = G;
  p.pergroup = o.pergroup;
  at::Tensor src = memory_order(x, p.strides);
  p.samples = x.dim() ? x.size(0) : 1;
  p.sample_elements = p.samples ? x.numel() / p.samples : 0;

  p.uniform_bits = sample_bits.defined() ? 0 : bits;
  kernels::Plan plan = plan_of(p);
  plan.stochastic = o.stochastic;

  const auto dev = x.device();
  const auto bytes = at::TensorOptions().dtype(at::kByte).device(dev);
  int64_t words = 0;
  if (sample_bits.defined()) {
    if (sample_bits.dim() != 1 || sample_bits.numel() != plan.N)
      fail("per-sample bits must be a vector of " + std::to_string(plan.N) + " values, got shape " +
           c10::str(sample_bits.sizes()));
    if (sample_bits.is_floating_point() || sample_bits.is_complex())
      fail("per-sample bits must be integers");
  }
  if (sample_bits.defined() && total_bits >= 0) {
    if (sample_bits.device() != dev) fail("per-sample bits must be on the input's device to stay there");
    if (total_bits < plan.N || total_bits > 8 * plan.N)
      fail("per-sample bits of " + std::to_string(plan.N) + " samples cannot sum to " + std::to_string(total_bits));
    p.bits = sample_bits.to(at::kInt).contiguous();
    if (word_offset.defined()) {
      if (word_offset.dim() != 1 || word_offset.numel() != plan.N || word_offset.device() != dev ||
          word_offset.scalar_type() != at::kLong)
        fail("word offsets must be int64 [" + std::to_string(plan.N) + "] on the input's device");
      p.word_offset = word_offset.contiguous();
    } else {
      const at::Tensor w = p.bits.to(at::kLong).mul(plan.Dp / 32);
      p.word_offset = w.cumsum(0).sub_(w);
    }
    words = total_bits * (plan.Dp / 32);
  } else if (sample_bits.defined()) {
    sample_bits = sample_bits.to(at::kCPU, at::kInt).contiguous();
    const int32_t* b = sample_bits.const_data_ptr<int32_t>();
    at::Tensor off = at::empty({plan.N}, at::kLong);
    int64_t* w = off.data_ptr<int64_t>();
    p.host_offsets.resize(plan.N + 1);
    for (int64_t i = 0; i < plan.N; ++i) {
      if (b[i] < 1 || b[i] > 8)
        fail("per-sample bits must be in 1..8; sample " + std::to_string(i) + " has " + std::to_string(b[i]));
      w[i] = p.host_offsets[i] = words;
      words += b[i] * plan.Dp / 32;
    }
    p.host_offsets[plan.N] = words;
    const bool pin = on_cuda(x);
    p.bits = pin ? sample_bits.pin_memory().to(dev, /*non_blocking=*/true) : sample_bits;
    p.word_offset = pin ? off.pin_memory().to(dev, /*non_blocking=*/true) : off;
  } else {
    if (bits < 1 || bits > 8) fail("bits must be in 1..8, not " + std::to_string(bits));
    words = plan.N * (bits * plan.Dp / 32);
  }

  p.data = at::empty({words * 4}, bytes);
  const auto range_opts = at::TensorOptions().dtype(o.range_dtype).device(dev);
  if (o.pergroup) {
    p.mn = at::empty({plan.N, plan.ngroups}, range_opts);
    p.mx = at::empty({plan.N, plan.ngroups}, range_opts);
  } else {
    p.mn = at::empty({1}, range_opts);
    p.mx = at::empty({1}, range_opts);
  }
  if (plan.N * plan.D == 0) return p;

  at::Tensor global_range;
  if (!o.pergroup) {  // min/max propagate NaN, as the per-group path does
    global_range = at::stack({src.min(), src.max()}).to(at::kFloat).contiguous();
  }
  if (o.seed) {
    plan.seed = *o.seed;
    plan.offset = o.stream;
  } else if (on_cuda(x)) {
    plan.draw_seed = true;
  } else {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    plan.seed = gen.get<at::CPUGeneratorImpl>()->random64();
    plan.offset = 0;
  }
  kernels::quantize(dev.type(), plan, src, p.bits, p.word_offset, global_range, p.data, p.mn, p.mx);
  return p;
}

}  // namespace

int64_t Packed::groups_per_sample() const { return (sample_elements + group_size - 1) / group_size; }

int64_t Packed::nbytes() const {
  int64_t n = 0;
  for (const at::Tensor* t : {&data, &mn, &mx, &bits, &word_offset})
    if (t->defined()) n += t->nbytes();
  return n;
}

Packed Packed::to(at::Device device) const {
  Packed p = *this;
  p.data = data.to(device);
  p.mn = mn.to(device);
  p.mx = mx.to(device);
  if (bits.defined()) p.bits = bits.to(device);
  if (word_offset.defined()) p.word_offset = word_offset.to(device);
  return p;
}

Packed Packed::slice(int64_t begin, int64_t end) const {
  if (begin < 0 || end > samples || begin > end)
    fail("slice [" + std::to_string(begin) + ", " + std::to_string(end) + ") of " + std::to_string(samples) +
         " samples");
  Packed p = *this;
  p.samples = end - begin;
  if (!p.sizes.empty()) p.sizes[0] = p.samples;
  const int64_t Dp = round_up(sample_elements, 32);
  int64_t w0, w1;
  if (uniform_bits) {
    w0 = begin * (uniform_bits * Dp / 32);
    w1 = end * (uniform_bits * Dp / 32);
  } else if (host_offsets.empty()) {  // offsets only on the device: keep all the data
    p.bits = bits.narrow(0, begin, p.samples);
    p.word_offset = word_offset.narrow(0, begin, p.samples);
    p.mn = pergroup ? mn.narrow(0, begin, p.samples) : mn;
    p.mx = pergroup ? mx.narrow(0, begin, p.samples) : mx;
    return p;
  } else {
    w0 = host_offsets[begin];
    w1 = host_offsets[end];
    p.bits = bits.narrow(0, begin, p.samples);
    p.word_offset = word_offset.narrow(0, begin, p.samples).sub(w0);
    p.host_offsets.assign(host_offsets.begin() + begin, host_offsets.begin() + end + 1);
    for (auto& o : p.host_offsets) o -= w0;
  }
  p.data = data.narrow(0, 4 * w0, 4 * (w1 - w0));
  if (pergroup) {
    p.mn = mn.narrow(0, begin, p.samples);
    p.mx = mx.narrow(0, begin, p.samples);
  }
  return p;
}

Packed quantize(const at::Tensor& x, int64_t bits, const CompressOptions& options) {
  RECORD_FUNCTION("aq::compress", std::vector<c10::IValue>());
  return quantize_impl(x, bits, at::Tensor(), -1, options);
}

Packed quantize(const at::Tensor& x, const at::Tensor& bits_per_sample, const CompressOptions& options) {
  RECORD_FUNCTION("aq::compress", std::vector<c10::IValue>());
  if (!bits_per_sample.defined()) fail("per-sample bits tensor is undefined");
  return quantize_impl(x, 0, bits_per_sample, -1, options);
}

Packed quantize(const at::Tensor& x, const at::Tensor& bits_per_sample, int64_t total_bits,
                const CompressOptions& options, const at::Tensor& word_offset) {
  RECORD_FUNCTION("aq::compress", std::vector<c10::IValue>());
  if (!bits_per_sample.defined()) fail("per-sample bits tensor is undefined");
  if (total_bits < 0) fail("total bits must be >= 0, not " + std::to_string(total_bits));
  return quantize_impl(x, 0, bits_per_sample, total_bits, options, word_offset);
}

namespace {
// The kernels' plan of a packed tensor to restore, after checking that its
// group bounds and per-sample bits are there, on its data's device.
kernels::Plan restore_plan(const Packed& p, const char* op) {
  const auto dev = p.data.device();
  const kernels::Plan plan = plan_of(p);
  const int64_t groups = p.pergroup ? p.samples * plan.ngroups : 1;
  if (p.mn.numel() != groups || p.mx.numel() != groups || p.mn.device() != dev || p.mx.device() != dev)
    fail(std::string(op) + ": group bounds do not match the packed tensor");
  if (plan.bits == 0 && (!p.bits.defined() || !p.word_offset.defined() ||
                         p.bits.device() != dev || p.word_offset.device() != dev))
    fail(std::string(op) + ": per-sample bits or word offsets missing");
  return plan;
}
}  // namespace

at::Tensor dequantize(const Packed& p) {
  RECORD_FUNCTION("aq::decompress", std::vector<c10::IValue>());
  if (!p.data.defined()) fail("dequantize: empty Packed object");
  const auto dev = p.data.device();
  check_device(p.data, "packed data");
  at::Tensor out = at::empty_strided(p.sizes, p.strides, at::TensorOptions().dtype(p.dtype).device(dev));
  if (p.samples * p.sample_elements == 0) return out;
  const kernels::Plan plan = restore_plan(p, "dequantize");
  kernels::dequantize(dev.type(), plan, p.data, p.mn, p.mx, p.bits, p.word_offset, out);
  return out;
}

at::Tensor dequantize_mul(const Packed& p, const at::Tensor& g, at::Tensor* sample_sq) {
  if (sample_sq) *sample_sq = at::Tensor();
  if (!p.data.defined()) fail("dequantize_mul: empty Packed object");
  const auto dev = p.data.device();
  const bool fused = g.defined() && kernels::dequantize_mul.has(dev.type()) && p.pergroup && g.device() == dev &&
                     g.scalar_type() == p.dtype && g.sizes() == at::IntArrayRef(p.sizes) &&
                     g.strides() == at::IntArrayRef(p.strides) && g.is_non_overlapping_and_dense() &&
                     p.samples * p.sample_elements > 0;
  if (!fused) return at::mul(g, dequantize(p).to(g.scalar_type()));
  RECORD_FUNCTION("aq::decompress", std::vector<c10::IValue>());
  const kernels::Plan plan = restore_plan(p, "dequantize_mul");
  at::Tensor out = at::empty_strided(p.sizes, p.strides, g.options());
  at::Tensor sq = at::empty({p.samples, plan.ngroups}, g.options().dtype(at::kFloat));
  kernels::dequantize_mul(dev.type(), plan, p.data, p.mn, p.mx, p.bits, p.word_offset, g, out, sq);
  if (sample_sq) *sample_sq = sq.sum(1);
  return out;
}

int64_t packed_bits_nbytes(int64_t n, int64_t bits) { return (n + 31) / 32 * bits * 4; }

at::Tensor pack_bits(const at::Tensor& codes, int64_t bits) {
  RECORD_FUNCTION("aq::pack_bits", std::vector<c10::IValue>());
  check_device(codes, "codes");
  if (bits < 1 || bits > 16) fail("code bits must be in 1..16, not " + std::to_string(bits));
  if (codes.is_floating_point() || codes.is_complex()) fail("codes must be bool or integers");
  at::Tensor c = codes.contiguous();
  at::Tensor out = at::empty({packed_bits_nbytes(c.numel(), bits)}, c.options().dtype(at::kByte));
  if (c.numel() == 0) return out;
  kernels::pack_bits(c.device().type(), c, static_cast<int>(bits), out);
  return out;
}

at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, at::IntArrayRef sizes, c10::ScalarType dtype) {
  RECORD_FUNCTION("aq::unpack_bits", std::vector<c10::IValue>());
  check_device(packed, "packed codes");
  if (bits < 1 || bits > 16) fail("code bits must be in 1..16, not " + std::to_string(bits));
  at::Tensor out = at::empty(sizes, packed.options().dtype(dtype));
  if (packed.scalar_type() != at::kByte || !packed.is_contiguous() ||
      packed.numel() != packed_bits_nbytes(out.numel(), bits))
    fail("unpack_bits: packed tensor does not hold " + std::to_string(out.numel()) + " codes of " +
         std::to_string(bits) + " bits");
  if (out.numel() == 0) return out;
  kernels::unpack_bits(packed.device().type(), packed, static_cast<int>(bits), out);
  return out;
}

at::Tensor pack_mask(const at::Tensor& mask) { return pack_bits(mask, 1); }

at::Tensor unpack_mask(const at::Tensor& packed, at::IntArrayRef sizes) {
  return unpack_bits(packed, 1, sizes, at::kBool);
}

std::vector<int64_t> memory_strides(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x.strides().vec();
  std::vector<int64_t> st(x.dim());
  int64_t acc = 1;
  for (int64_t d = x.dim() - 1; d >= 0; --d) {
    st[d] = acc;
    acc *= std::max<int64_t>(1, x.size(d));
  }
  return st;
}

namespace {
// x's elements in memory order, flat (no copy when x is dense).
at::Tensor flat_in_memory_order(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x.as_strided({x.numel()}, {1}) : x.contiguous().view(-1);
}
}  // namespace

at::Tensor pack_positive(const at::Tensor& x) {
  RECORD_FUNCTION("aq::mask", std::vector<c10::IValue>());
  check_device(x, "input");
  if (!x.is_floating_point() && x.scalar_type() != at::kBool) fail("pack_positive: x must be floating or bool");
  const at::Tensor flat = flat_in_memory_order(x);
  at::Tensor out = at::empty({packed_bits_nbytes(flat.numel(), 1)}, x.options().dtype(at::kByte));
  if (flat.numel() == 0) return out;
  kernels::pack_positive(x.device().type(), flat, out);
  return out;
}

std::pair<at::Tensor, at::Tensor> relu_and_mask(const at::Tensor& x, bool inplace, int64_t group_size,
                                                at::Tensor* group_r2) {
  RECORD_FUNCTION("aq::relu", std::vector<c10::IValue>());
  check_device(x, "input");
  if (!x.is_floating_point()) fail("relu_and_mask: x must be floating");
  if (kernels::relu_pack_positive.has(x.device().type()) && x.is_non_overlapping_and_dense()) {
    at::Tensor y = inplace ? x : at::empty_like(x);
    if (y.strides() == x.strides()) {
      const at::Tensor flat = flat_in_memory_order(x);
      at::Tensor out = at::empty({packed_bits_nbytes(flat.numel(), 1)}, x.options().dtype(at::kByte));
      if (flat.numel() == 0) return {y, out};
      at::Tensor y_flat = inplace ? flat : flat_in_memory_order(y);
      // Group ranges where a warp's 32 16-byte loads are one group and
      // samples are whole groups.
      const int64_t n = x.dim() ? x.size(0) : 1, d = n ? flat.numel() / n : 0;
      const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
      at::Tensor r2;
      if (group_r2 && x.scalar_type() != at::kDouble && group_size == 32 * (16 / x.element_size()) &&
          d % group_size == 0 && aligned(flat) && aligned(y_flat))
        r2 = at::empty({n, d / group_size}, x.options().dtype(at::kFloat));
      kernels::relu_pack_positive(x.device().type(), flat, out, y_flat, group_size,
                                  r2.defined() ? r2.data_ptr<float>() : nullptr);
      if (group_r2) *group_r2 = r2;
      if (inplace) x.unsafeGetTensorImpl()->bump_version();  // as relu_ would
      return {y, out};
    }
  }
  if (group_r2) *group_r2 = at::Tensor();
  at::Tensor y = inplace ? x.relu_() : x.relu();
  return {y, pack_positive(y)};
}

at::Tensor apply_packed_mask(const at::Tensor& g, const at::Tensor& packed, at::IntArrayRef strides, double scale,
                             bool overwrite) {
  RECORD_FUNCTION("aq::mask", std::vector<c10::IValue>());
  check_device(g, "gradient");
  if (!g.is_floating_point()) fail("apply_packed_mask: the gradient must be floating");
  if (static_cast<int64_t>(strides.size()) != g.dim()) fail("apply_packed_mask: strides do not match the gradient");
  if (packed.scalar_type() != at::kByte || !packed.is_contiguous() || packed.device() != g.device() ||
      packed.numel() != packed_bits_nbytes(g.numel(), 1))
    fail("apply_packed_mask: the mask does not hold " + std::to_string(g.numel()) + " bits");
  // The gradient in the mask's memory order (a copy only when it has another
  // layout), and the result in that order too.
  at::Tensor src = g;
  const bool in_order = g.is_non_overlapping_and_dense() && g.strides() == strides;
  if (!in_order) src = at::empty_strided(g.sizes(), strides, g.options()).copy_(g);
  // The kernels read each element before they write it, so in place is safe.
  at::Tensor out = overwrite || !in_order ? src : at::empty_strided(g.sizes(), strides, g.options());
  if (g.numel() == 0) return out;
  if (out.is_same(g)) out.unsafeGetTensorImpl()->bump_version();  // changed in place, as far as anyone can tell
  const at::Tensor in_flat = flat_in_memory_order(src);
  at::Tensor out_flat = out.as_strided({out.numel()}, {1});
  kernels::apply_mask(g.device().type(), in_flat, packed, scale, out_flat);
  return out;
}

int64_t index_bits(int64_t window) {
  if (window < 1) fail("window size must be >= 1, not " + std::to_string(window));
  int64_t b = 1;
  while ((int64_t(1) << b) < window) ++b;
  return b;
}

bool built_with_cuda() { return AQ_WITH_CUDA; }

}  // namespace aq
