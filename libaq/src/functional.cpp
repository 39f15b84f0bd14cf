// Autograd functions that keep compressed activations (ALGORITHM.md 4).
// Forward calls LibTorch's own op; backward calls LibTorch's backward op on
// the restored input.
#include "aq/functional.h"

#include "aq/adaptive.h"
#include "aq/log.h"
#include "offer.h"

#include "aq_config.h"
#include "batch_norm.h"
#include "pool.h"

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#if AQ_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <stdexcept>

namespace aq {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

CompressOptions compress_options(const QuantConfig& c) {
  CompressOptions o;
  o.group_size = c.group_size;
  o.pergroup = c.pergroup;
  o.stochastic = c.stochastic;
  o.range_dtype = c.range_dtype;
  return o;
}

namespace {

// Autograd functions take no undefined tensors: an absent bias or weight
// travels as an empty tensor and is turned back into "none" inside.
at::Tensor placeholder(const std::optional<at::Tensor>& t, const at::Tensor& like) {
  return t && t->defined() ? *t : at::empty({0}, like.options());
}
at::Tensor placeholder(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}
at::Tensor present(const at::Tensor& t) { return t.numel() ? t : at::Tensor(); }

// Whether a backward may write its result over its incoming gradient g,
// which it takes by reference from autograd's list (a function taking the
// list by value holds a second reference): nothing else holds g's tensor or
// its memory (an addition's backward hands the same gradient to both its
// inputs, a retained gradient keeps it) and no graph is built through it.
bool writable_grad(const at::Tensor& g) {
  return g.defined() && g.use_count() == 1 && g.has_storage() && !g.is_view() && g.storage().use_count() == 1 &&
         !g.requires_grad() && g.is_non_overlapping_and_dense();
}

void put_state(AutogradContext* ctx, const LayerStatePtr& st) {
  if (st) ctx->saved_data["state"] = c10::IValue::make_capsule(st);
}
LayerStatePtr state_of(AutogradContext* ctx) {
  auto it = ctx->saved_data.find("state");
  if (it == ctx->saved_data.end()) return LayerStatePtr();
  return c10::static_intrusive_pointer_cast<LayerState>(it->second.toCapsule());
}

// --- L4: packed activations swapped to pinned host memory ----------------------
//
// Forward copies a layer's packed tensors to pinned host memory on a side
// stream (after the compression on the current stream) and lets the device
// copies go; the caching allocator reuses their memory once the copy is done.
// Backward takes the copies back: prefetched on the side stream when the
// layer after it (in forward order) ran its backward, else copied then.
// Nothing waits for the host.
struct SwapEntry : torch::CustomClassHolder {
  std::vector<at::Tensor> host;    // data, mn, mx[, bits, word_offset]
  std::vector<at::Tensor> device;  // prefetched copies, empty until then
  at::Device dev{at::kCPU};
  size_t index = 0;
#if AQ_WITH_CUDA
  std::optional<at::cuda::CUDAEvent> ready;  // prefetch done (side stream)
#endif
  // Runs when the last autograd context lets go; the swapper's weak
  // reference keeps only the object's shell until the next step.
  void release_resources() override {
    host.clear();
    device.clear();
#if AQ_WITH_CUDA
    ready.reset();
#endif
  }
};
using SwapEntryPtr = c10::intrusive_ptr<SwapEntry>;

#if AQ_WITH_CUDA
class Swapper {
 public:
  static Swapper& get() {
    static Swapper s;
    return s;
  }
  SwapEntryPtr swap_out(const std::vector<at::Tensor>& tensors) {
    auto e = c10::make_intrusive<SwapEntry>();
    e->dev = tensors[0].device();
    const c10::cuda::CUDAStream cur = c10::cuda::getCurrentCUDAStream(e->dev.index());
    const c10::cuda::CUDAStream side = side_stream(e->dev);
    at::cuda::CUDAEvent produced;
    produced.record(cur);
    produced.block(side);
    {
      c10::cuda::CUDAStreamGuard guard(side);
      for (const auto& t : tensors) {
        at::Tensor h = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
        h.copy_(t, /*non_blocking=*/true);
        c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), side);
        e->host.push_back(h);
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    // A new step once everything of the last one has been released.
    bool alive = false;
    for (const auto& w : entries_) alive = alive || !w.expired();
    if (!alive) entries_.clear();
    e->index = entries_.size();
    entries_.push_back(c10::weak_intrusive_ptr<SwapEntry>(e));
    return e;
  }
  std::vector<at::Tensor> swap_in(const SwapEntryPtr& e) {
    const c10::cuda::CUDAStream cur = c10::cuda::getCurrentCUDAStream(e->dev.index());
    std::vector<at::Tensor> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      out.swap(e->device);
      if (!out.empty()) {
        e->ready->block(cur);
        for (const auto& t : out) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), cur);
      }
    }
    if (out.empty()) {
      c10::cuda::CUDAStreamGuard guard(cur);
      for (const auto& h : e->host) out.push_back(h.to(e->dev, /*non_blocking=*/true));
    }
    if (e->index > 0) prefetch(e->index - 1);
    return out;
  }

 private:
  c10::cuda::CUDAStream side_stream(const at::Device& d) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = streams_.find(d.index());
    if (it == streams_.end()) it = streams_.emplace(d.index(), c10::cuda::getStreamFromPool(false, d.index())).first;
    return it->second;
  }
  void prefetch(size_t i) {
    SwapEntryPtr e;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (i < entries_.size()) e = entries_[i].lock();
      if (!e || !e->device.empty()) return;
    }
    const c10::cuda::CUDAStream side = side_stream(e->dev);
    std::vector<at::Tensor> dev;
    at::cuda::CUDAEvent ready;
    {
      c10::cuda::CUDAStreamGuard guard(side);
      for (const auto& h : e->host) dev.push_back(h.to(e->dev, /*non_blocking=*/true));
      ready.record(side);
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (!e->device.empty()) return;
    e->device = std::move(dev);
    e->ready.emplace(std::move(ready));
  }
  std::mutex mu_;
  std::vector<c10::weak_intrusive_ptr<SwapEntry>> entries_;
  std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams_;
};
#endif

// A tensor that several layers save (a ResNet block's input, read by its
// first conv and by its shortcut) is compressed once, by the first of them;
// the others share that copy, as autograd shares one saved tensor in the
// exact model.  Recent compressions are remembered through weak references
// (to the input and to the compressed parts): nothing is kept alive, and an
// input changed in place (its version moved) or freed does not match.
using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
struct RecentCompression {
  explicit RecentCompression(const at::Tensor& x) : source(x.getIntrusivePtr()) {}
  WeakTensor source;
  int64_t version = 0;
  const LayerState* owner_id = nullptr;  // the layer that compressed it (identity only)
  c10::weak_intrusive_ptr<LayerState> owner{c10::intrusive_ptr<LayerState>()};
  int64_t group_size = 0, cabits = 0, ibits = 0;
  bool pergroup = true, stochastic = true;
  c10::ScalarType range_dtype = c10::kBFloat16;
  std::vector<WeakTensor> parts;  // data, mn, mx[, bits, word offsets]
  std::optional<c10::weak_intrusive_ptr<SwapEntry>> swap;  // L4/L5: the host copies instead
  Packed meta;  // everything but the tensors
};
struct SharedCompression {
  Packed packed;      // its tensors undefined when swapped
  SwapEntryPtr swap;  // L4/L5
  LayerStatePtr owner;
};
thread_local std::deque<RecentCompression> recent_compressions;
constexpr size_t kRecentCompressions = 16;

// The same compression asked for: options and bits (for adaptive layers the
// budget and initial bits; each layer's share of the budget may differ, and
// the first layer's is used).
bool same_options(const RecentCompression& r, const CompressOptions& o, const QuantConfig& c) {
  return r.group_size == o.group_size && r.pergroup == o.pergroup && r.stochastic == o.stochastic &&
         r.range_dtype == o.range_dtype && !o.seed && r.cabits == c.cabits && r.ibits == c.ibits;
}

// Only another layer's copy is shared, and only one made after this layer's
// own last save: a layer that runs again (another forward over the same
// input while the first graph is alive) draws fresh random rounding.
std::optional<SharedCompression> shared_compression(const at::Tensor& x, const CompressOptions& o,
                                                   const QuantConfig& c, const LayerState* st, bool swap) {
  if (!st) return std::nullopt;
  for (const auto& r : recent_compressions) {
    if (r.owner_id == st) break;
    const auto src = r.source.lock();
    if (!src || src.get() != x.unsafeGetTensorImpl() || r.version != static_cast<int64_t>(x._version()) ||
        !same_options(r, o, c) || r.swap.has_value() != swap)
      continue;
    LayerStatePtr owner = r.owner.lock();
    if (!owner) return std::nullopt;
    if (r.swap) {
      SwapEntryPtr e = r.swap->lock();
      if (!e) return std::nullopt;
      return SharedCompression{r.meta, std::move(e), std::move(owner)};
    }
    std::vector<at::Tensor> ts;
    for (const auto& w : r.parts) {
      auto t = w.lock();
      if (!t) return std::nullopt;
      ts.push_back(at::Tensor::wrap_tensor_impl(std::move(t)));
    }
    Packed p = r.meta;
    p.data = ts[0];
    p.mn = ts[1];
    p.mx = ts[2];
    if (ts.size() > 3) p.bits = ts[3], p.word_offset = ts[4];
    return SharedCompression{std::move(p), SwapEntryPtr(), std::move(owner)};
  }
  return std::nullopt;
}

void remember_compression(const at::Tensor& x, const CompressOptions& o, const QuantConfig& c, LayerState* st,
                          const Packed& p, const SwapEntryPtr& swap) {
  if (o.seed || !st) return;  // a fixed seed asks for its own bytes
  RecentCompression r(x);
  r.owner_id = st;
  r.owner = c10::weak_intrusive_ptr<LayerState>(LayerStatePtr::reclaim_copy(st));
  r.version = static_cast<int64_t>(x._version());
  r.group_size = o.group_size;
  r.pergroup = o.pergroup;
  r.stochastic = o.stochastic;
  r.range_dtype = o.range_dtype;
  r.cabits = c.cabits;
  r.ibits = c.ibits;
  if (swap) {
    r.swap = c10::weak_intrusive_ptr<SwapEntry>(swap);
  } else {
    for (const at::Tensor* t : {&p.data, &p.mn, &p.mx, &p.bits, &p.word_offset})
      if (t->defined()) r.parts.emplace_back(t->getIntrusivePtr());
  }
  r.meta = p;
  r.meta.data = r.meta.mn = r.meta.mx = r.meta.bits = r.meta.word_offset = at::Tensor();
  recent_compressions.push_front(std::move(r));
  if (recent_compressions.size() > kRecentCompressions) recent_compressions.pop_back();
}

// Compresses x for backward with the layer's bits (or shares the copy an
// earlier layer made of the same tensor), records what the adaptive scheme
// reads, and keeps it in the context.
void save_compressed(AutogradContext* ctx, const at::Tensor& x, const QuantConfig& c, LayerState* st) {
  const CompressOptions o = compress_options(c);
  // Bits: set by hand on the layer, else adaptive (ibits > cabits), else cabits.
  const bool swap = AQ_WITH_CUDA && c.swap && x.is_cuda();
  Packed p;
  std::optional<SharedCompression> shared;
  if (!(st && st->bits.defined())) shared = shared_compression(x, o, c, st, swap);
  if (st) st->shared_from = shared ? shared->owner.get() : nullptr;
  if (shared) {
    p = shared->packed;
    // What the owner's allocation reads about this layer: its statistics of
    // the same input, and (after backward) its gradient statistics.
    LayerState* owner = shared->owner.get();
    st->range_sq = owner->range_sq;
    st->indices = owner->indices;
    st->last_bits = owner->last_bits;
    auto& list = owner->sharers;
    list.erase(std::remove_if(list.begin(), list.end(), [](const auto& w) { return w.expired(); }), list.end());
    if (std::none_of(list.begin(), list.end(), [&](const auto& w) { return w._unsafe_get_target() == st; }))
      list.emplace_back(LayerStatePtr::reclaim_copy(st));
    if (adaptive(c)) {
      ctx->saved_data["usegradient"] = c.usegradient;
      if (st->indices.defined()) ctx->saved_data["indices"] = st->indices;
    }
  } else if (st && st->bits.defined()) {
    p = quantize(x, st->bits, o);
  } else if (st && adaptive(c) && x.dim() > 0 && x.size(0) > 0) {
    int64_t total = 0;
    at::Tensor offsets;
    const at::Tensor bits = choose_bits(*st, c, x, &total, &offsets);
    p = quantize(x, bits, total, o, offsets);
    ctx->saved_data["usegradient"] = c.usegradient;
    if (st->indices.defined()) ctx->saved_data["indices"] = st->indices;
  } else {
    p = quantize(x, c.cabits, o);
  }
  if (st) {
    st->sample_elements = p.sample_elements;
    st->saved_bytes = shared ? 0 : p.nbytes();
  }
  auto& s = ctx->saved_data;
  SwapEntryPtr entry;
#if AQ_WITH_CUDA
  if (swap) {
    if (shared) {
      entry = shared->swap;
    } else {
      std::vector<at::Tensor> ts = {p.data, p.mn, p.mx};
      if (p.bits.defined()) ts.insert(ts.end(), {p.bits, p.word_offset});
      entry = Swapper::get().swap_out(ts);
    }
    s["swap"] = c10::IValue::make_capsule(entry);
  }
#endif
  if (!shared) remember_compression(x, o, c, st, p, entry);
  if (!swap) {
    s["data"] = p.data;
    s["mn"] = p.mn;
    s["mx"] = p.mx;
    if (p.bits.defined()) {
      s["bits"] = p.bits;
      s["word_offset"] = p.word_offset;
    }
  }
  if (p.bits.defined()) s["host_offsets"] = p.host_offsets;
  s["sizes"] = p.sizes;
  s["strides"] = p.strides;
  s["meta"] = std::vector<int64_t>{static_cast<int64_t>(p.dtype), p.samples, p.sample_elements, p.group_size,
                                   p.pergroup, p.uniform_bits};
  // L3.1, L4 and L5 (and swap on the CPU, which has nothing to swap from):
  // how many samples backward restores at a time (0: all at once).
  int64_t chunk = 0;
  if (c.swap && !x.is_cuda()) {
    static std::once_flag said;
    std::call_once(said, [&] {
      log().info("{} on the CPU: no device memory to swap from; running as L3.1 (micro-batched backward)",
                 to_string(c.level));
    });
  }
  if ((c.micro_batch_backward || (c.swap && !x.is_cuda())) && p.samples > 1) {
    const int64_t per_sample = std::max<int64_t>(1, p.sample_elements * x.element_size());
    chunk = std::max<int64_t>(1, c.micro_batch_bytes / per_sample);
    if (chunk >= p.samples) chunk = 0;
  }
  s["chunk"] = chunk;
}

// The compressed input kept by save_compressed.
Packed packed_of(AutogradContext* ctx) {
  auto& s = ctx->saved_data;
  Packed p;
#if AQ_WITH_CUDA
  if (s.count("swap")) {
    const auto e = c10::static_intrusive_pointer_cast<SwapEntry>(s["swap"].toCapsule());
    const auto ts = Swapper::get().swap_in(e);
    p.data = ts[0];
    p.mn = ts[1];
    p.mx = ts[2];
    if (ts.size() > 3) p.bits = ts[3], p.word_offset = ts[4];
  } else
#endif
  {
    p.data = s["data"].toTensor();
    p.mn = s["mn"].toTensor();
    p.mx = s["mx"].toTensor();
    if (s.count("bits")) {
      p.bits = s["bits"].toTensor();
      p.word_offset = s["word_offset"].toTensor();
    }
  }
  if (s.count("host_offsets")) p.host_offsets = s["host_offsets"].toIntVector();
  p.sizes = s["sizes"].toIntVector();
  p.strides = s["strides"].toIntVector();
  const auto m = s["meta"].toIntVector();
  p.dtype = static_cast<c10::ScalarType>(m[0]);
  p.samples = m[1];
  p.sample_elements = m[2];
  p.group_size = m[3];
  p.pergroup = m[4] != 0;
  p.uniform_bits = m[5];
  return p;
}

// The saved input restored (in grad's dtype).
at::Tensor restore(AutogradContext* ctx, c10::ScalarType dtype) { return dequantize(packed_of(ctx)).to(dtype); }

// Calls f(begin, end, restored input of samples [begin, end)) per
// micro-batch (one call for all samples unless the level restores in
// micro-batches: L3.1, L4, L5).
template <typename F>
void for_each_micro_batch(AutogradContext* ctx, const Packed& p, c10::ScalarType dtype, F&& f) {
  const int64_t chunk = ctx->saved_data["chunk"].toInt();
  if (chunk == 0) {
    f(int64_t(0), p.samples, dequantize(p).to(dtype));
    return;
  }
  for (int64_t b = 0; b < p.samples; b += chunk) {
    const int64_t e = std::min(p.samples, b + chunk);
    f(b, e, dequantize(p.slice(b, e)).to(dtype));
  }
}

void record_grad(AutogradContext* ctx, const at::Tensor& g) {
  LayerStatePtr st = state_of(ctx);
  auto& s = ctx->saved_data;
  // Squared norms a BatchNorm after this layer offered for g (taken either
  // way: an offer is for the next reader only).
  at::Tensor fused = grad_sq_offer().take(g);
  if (fused.defined() && (fused.dim() != 1 || g.dim() == 0 || fused.size(0) != g.size(0))) fused = at::Tensor();
  // Only adaptive layers (which saved "usegradient") keep gradient statistics.
  if (!st || !g.defined() || g.dim() == 0 || !s.count("usegradient")) return;
  RECORD_FUNCTION("aq::statistics", std::vector<c10::IValue>());
  // Per-sample squared norms over the other dimensions, in float, read in
  // g's own layout (no copy), unless the BatchNorm after the layer summed
  // them as it wrote g.
  std::vector<int64_t> dims(g.dim() - 1);
  std::iota(dims.begin(), dims.end(), 1);
  st->grad_sq = fused.defined() ? fused
                : dims.empty()  ? g.to(at::kFloat).pow(2)
                                : at::linalg_vector_norm(g, 2, dims, /*keepdim=*/false, at::kFloat).pow(2);
  update_gradient_stats(*st, s["usegradient"].toBool(), st->grad_sq,
                        s.count("indices") ? s["indices"].toTensor() : at::Tensor());
}

struct LinearFn : torch::autograd::Function<LinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                            const QuantConfig* c, const LayerStatePtr& st) {
    ctx->save_for_backward({w});
    put_state(ctx, st);
    if (st) st->kernel_area = 1, st->conv_groups = 1, st->in_channels = w.size(1);
    if (w.requires_grad())  // only the weight's gradient needs x
      save_compressed(ctx, x, *c, st.get());
    else if (st)
      st->saved_bytes = 0;
    return at::linear(x, w, present(b));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    const at::Tensor w = ctx->get_saved_variables()[0];
    record_grad(ctx, g);
    const int64_t out = w.size(0), in = w.size(1);
    at::Tensor gx, gw, gb;
    if (ctx->needs_input_grad(0)) gx = g.matmul(w.to(g.scalar_type()));
    if (ctx->needs_input_grad(1)) {
      at::Tensor acc;
      for_each_micro_batch(ctx, packed_of(ctx), g.scalar_type(), [&](int64_t b, int64_t e, const at::Tensor& x) {
        const at::Tensor part = g.narrow(0, b, e - b).reshape({-1, out}).t().matmul(x.reshape({-1, in}));
        acc = acc.defined() ? acc + part : part;
      });
      gw = acc.to(w.scalar_type());
    }
    if (ctx->needs_input_grad(2)) gb = g.reshape({-1, out}).sum(0);
    return {gx, gw, gb, at::Tensor(), at::Tensor()};
  }
};

struct ConvFn : torch::autograd::Function<ConvFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                            std::vector<int64_t> dilation, bool transposed, std::vector<int64_t> output_padding,
                            int64_t groups, const QuantConfig* c, const LayerStatePtr& st) {
    ctx->save_for_backward({w});
    put_state(ctx, st);
    if (st) {
      st->kernel_area = 1;
      for (int64_t i = 2; i < w.dim(); ++i) st->kernel_area *= w.size(i);
      st->conv_groups = groups;
      st->in_channels = x.size(1);
    }
    save_compressed(ctx, x, *c, st.get());
    auto& s = ctx->saved_data;
    s["stride"] = stride;
    s["padding"] = padding;
    s["dilation"] = dilation;
    s["transposed"] = transposed;
    s["output_padding"] = output_padding;
    s["groups"] = groups;
    s["bias"] = present(b).defined();
    return at::convolution(x, w, present(b), stride, padding, dilation, transposed, output_padding, groups);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    const at::Tensor w = ctx->get_saved_variables()[0];
    record_grad(ctx, g);
    auto& s = ctx->saved_data;
    const bool transposed = s["transposed"].toBool();
    const int64_t groups = s["groups"].toInt();
    std::optional<std::vector<int64_t>> bias_sizes;
    if (s["bias"].toBool()) bias_sizes = std::vector<int64_t>{transposed ? w.size(1) * groups : w.size(0)};
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2)};
    const at::Tensor wg = w.to(g.scalar_type());
    const auto stride = s["stride"].toIntVector(), padding = s["padding"].toIntVector(),
               dilation = s["dilation"].toIntVector(), output_padding = s["output_padding"].toIntVector();
    // The weight's (and bias's) gradient first, from the restored input,
    // which is then let go; the input's gradient after, from the output
    // gradient and the weight alone: the adjoint convolution (transposed for
    // a convolution, plain for a transposed one), which is what the backward
    // op computes.  The restored input and the input gradient, each the
    // input's size, are never held together.
    at::Tensor gx, gw, gb;
    if (mask[1] || mask[2]) {
      for_each_micro_batch(ctx, packed_of(ctx), g.scalar_type(), [&](int64_t b, int64_t e, const at::Tensor& x) {
        auto [unused, gw_part, gb_part] = at::convolution_backward(
            g.narrow(0, b, e - b), x, wg, bias_sizes ? std::optional<at::IntArrayRef>(*bias_sizes) : std::nullopt,
            stride, padding, dilation, transposed, output_padding, groups, {false, mask[1], mask[2]});
        if (gw_part.defined()) gw = gw.defined() ? gw + gw_part : gw_part;
        if (gb_part.defined()) gb = gb.defined() ? gb + gb_part : gb_part;
      });
    }
    if (mask[0]) {
      const auto x_sizes = s["sizes"].toIntVector();
      const int64_t D = static_cast<int64_t>(stride.size());
      std::vector<int64_t> adjoint_padding(D, 0);
      if (!transposed) {  // what the output size leaves of the input's
        for (int64_t d = 0; d < D; ++d)
          adjoint_padding[d] = x_sizes[2 + d] - ((g.size(2 + d) - 1) * stride[d] - 2 * padding[d] +
                                                 dilation[d] * (w.size(2 + d) - 1) + 1);
      }
      gx = at::convolution(g, wg, {}, stride, padding, dilation, !transposed, adjoint_padding, groups);
    }
    if (gw.defined()) gw = gw.to(w.scalar_type());
    return {gx, gw, gb, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

struct BatchNormFn : torch::autograd::Function<BatchNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                            const at::Tensor& running_mean, const at::Tensor& running_var, double momentum,
                            double eps, const QuantConfig* c, const LayerStatePtr& st, bool overwrite) {
    put_state(ctx, st);
    if (st) st->batch_norm = true, st->in_channels = x.size(1);
    at::Tensor y, mean, invstd;
    if (overwrite) {
      // Statistics and the compressed copy first, then normalised in place.
      bool done = false;
      // On CUDA, the statistics (and the running statistics), then our own
      // kernel in place: LibTorch's in-place transform ran at two thirds of
      // its out-of-place speed (H100).  With channels innermost the
      // statistics come from our kernel, which also hands the allocation
      // its group ranges; elsewhere from LibTorch's.
      const auto is_float = [](const at::Tensor& t) { return !t.numel() || t.scalar_type() == at::kFloat; };
      const c10::DeviceType dt = x.device().type();
      if (kernels::batch_norm_stats.has(dt) && kernels::batch_norm_forward_inplace.has(dt) &&
          x.scalar_type() != at::kDouble && is_float(w) && is_float(b) && is_float(running_mean) &&
          is_float(running_var) && (x.is_contiguous() || x.is_contiguous(x.suggest_memory_format()))) {
        at::Tensor r2, rm = present(running_mean), rv = present(running_var);
        const bool ranges = st && !st->bits.defined() && adaptive(*c) && c->pergroup;
        if (kernels::batch_norm_stats(dt, x, momentum, eps, rm, rv, mean, invstd, c->group_size,
                                      ranges ? &r2 : nullptr)) {
          if (r2.defined()) group_range_offer().offer(x, std::move(r2), c->group_size);
        } else {
          at::Tensor var;
          std::tie(mean, var) = at::batch_norm_update_stats(x, rm, rv, momentum);
          invstd = var.add_(eps).rsqrt_();
        }
        save_compressed(ctx, x, *c, st.get());
        at::Tensor out = x;
        done = kernels::batch_norm_forward_inplace(dt, out, mean, invstd, present(w), present(b));
        TORCH_CHECK(done, "aq: BatchNorm: a dense input the in-place kernel refused");
      }
      if (!done) {
        save_compressed(ctx, x, *c, st.get());
        // LibTorch's kernels (their statistics pass reads x before the
        // output pass writes it), with the statistics' dtype its own call
        // would give them.
        const auto acc = x.is_cuda() ? at::toAccumulateType(x.scalar_type(), x.device().type())
                                     : (w.numel() ? w : x).scalar_type();
        mean = at::empty({0}, x.options().dtype(acc));
        invstd = at::empty({0}, x.options().dtype(acc));
        at::Tensor out = x;
        at::native_batch_norm_out(out, mean, invstd, x, present(w), present(b), present(running_mean),
                                  present(running_var), /*training=*/true, momentum, eps);
      }
      y = x;
      ctx->mark_dirty({x});
    } else {
      std::tie(y, mean, invstd) = at::native_batch_norm(x, present(w), present(b), present(running_mean),
                                                        present(running_var), /*training=*/true, momentum, eps);
      save_compressed(ctx, x, *c, st.get());
    }
    ctx->save_for_backward({w, mean, invstd});
    if (st) st->saved_bytes += mean.nbytes() + invstd.nbytes();
    ctx->saved_data["eps"] = eps;
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const at::Tensor& g = grads[0];
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2)};
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const at::Tensor w = present(saved[0]);
    const int64_t C = g.size(1);
    const int64_t M = g.numel() / std::max<int64_t>(1, C);
    const bool fused = g.is_cuda() && M <= std::numeric_limits<int32_t>::max();  // their count is an int
    if (chunk == 0 && (!fused || g.scalar_type() == at::kDouble)) {
      auto [gx, gw, gb] = at::native_batch_norm_backward(g, restore(ctx, g.scalar_type()), w, {}, {}, saved[1],
                                                         saved[2], /*train=*/true, ctx->saved_data["eps"].toDouble(),
                                                         mask);
      return {gx, gw, gb, {}, {}, {}, {}, {}, {}, {}};
    }
    // The training-mode formula in two passes over the restored input: the
    // per-channel sums of dy and dy (x - mean), then dx = (dy - sum dy / M -
    // (x - mean) invstd^2 sum dy (x - mean) / M) invstd w.  On CUDA,
    // LibTorch's own kernels for the sums (those of its synchronised
    // BatchNorm).  Restored in one piece (L3, CUDA), the input is a tensor of
    // its own that the second pass reads last, so that pass writes the input
    // gradient over it: the restored input and the input gradient are never
    // held together.  Micro-batched (L3.1), the input is restored a slice of
    // samples at a time for each pass, and the second pass is LibTorch's own
    // kernel on CUDA and the formula in ATen ops on the CPU.
    const Packed p = packed_of(ctx);
    const c10::ScalarType dtype = fused ? g.scalar_type() : at::kFloat;
    const at::Tensor wf = w.defined() ? w.to(saved[1].scalar_type()) : w;
    at::Tensor gx, sum_dy, sum_dy_xmu;
    if (chunk == 0) {  // fused: CUDA
      at::Tensor x = dequantize(p).to(dtype);
      std::tie(sum_dy, sum_dy_xmu, std::ignore, std::ignore) =
          at::batch_norm_backward_reduce(g, x, saved[1], saved[2], wf, /*input_g=*/true, false, false);
      if (mask[0]) {
        // An adaptive BatchNorm's input most likely comes from an adaptive
        // layer, whose gradient statistics the kernel can sum on the way.
        at::Tensor sq;
        kernels::batch_norm_input_grad_inplace(g.device().type(), x, g, saved[1], saved[2], w, sum_dy, sum_dy_xmu, M,
                                               ctx->saved_data.count("usegradient") ? &sq : nullptr);
        gx = std::move(x);
        if (sq.defined()) grad_sq_offer().offer(gx, std::move(sq));
      }
    } else {
      std::vector<int64_t> dims = {0}, shape(g.dim(), 1);
      for (int64_t d = 2; d < g.dim(); ++d) dims.push_back(d);
      shape[1] = C;
      sum_dy = at::zeros({C}, g.options().dtype(at::kFloat));
      sum_dy_xmu = at::zeros_like(sum_dy);
      const at::Tensor mean = fused ? saved[1] : saved[1].view(shape);
      const at::Tensor invstd = fused ? saved[2] : saved[2].view(shape);
      for_each_micro_batch(ctx, p, dtype, [&](int64_t b, int64_t e, const at::Tensor& x) {
        const at::Tensor dy = g.narrow(0, b, e - b);
        if (fused) {
          auto [s_dy, s_dy_xmu, unused_w, unused_b] =
              at::batch_norm_backward_reduce(dy, x, mean, invstd, wf, /*input_g=*/true, false, false);
          sum_dy += s_dy;
          sum_dy_xmu += s_dy_xmu;
        } else {
          const at::Tensor dyf = dy.to(at::kFloat);
          sum_dy += dyf.sum(dims);
          sum_dy_xmu += (dyf * (x - mean)).sum(dims);
        }
      });
      if (mask[0]) {
        // Each slice of the input gradient is written once its slice of g
        // has been read for the last time, so it may go over g.
        gx = writable_grad(g) ? g : at::empty_like(g);
        if (fused) {
          const at::Tensor count = at::full({1}, M, g.options().dtype(at::kInt));
          for_each_micro_batch(ctx, p, dtype, [&](int64_t b, int64_t e, const at::Tensor& x) {
            gx.narrow(0, b, e - b)
                .copy_(at::batch_norm_backward_elemt(g.narrow(0, b, e - b), x, mean, invstd, wf, sum_dy, sum_dy_xmu,
                                                     count));
          });
        } else {
          const at::Tensor scale = w.defined() ? invstd * wf.view(shape) : invstd;
          const at::Tensor mean_dy = (sum_dy / M).view(shape), proj = (sum_dy_xmu / M).view(shape) * invstd * invstd;
          for_each_micro_batch(ctx, p, dtype, [&](int64_t b, int64_t e, const at::Tensor& x) {
            gx.narrow(0, b, e - b).copy_((g.narrow(0, b, e - b) - mean_dy - (x - mean) * proj) * scale);
          });
        }
      }
    }
    const auto param_dtype = saved[0].numel() ? saved[0].scalar_type() : at::kFloat;
    at::Tensor gw = mask[1] ? (sum_dy_xmu.to(at::kFloat) * saved[2]).to(param_dtype) : at::Tensor();
    at::Tensor gb = mask[2] ? sum_dy.to(param_dtype) : at::Tensor();
    return {gx, gw, gb, {}, {}, {}, {}, {}, {}, {}};
  }
};

// Saves the 1-bit mask (source > 0, as pack_positive or relu_and_mask packed
// it) in the source's memory order; backward multiplies by it and a scale.
void save_packed_mask(AutogradContext* ctx, const at::Tensor& source, const at::Tensor& packed, double scale,
                      LayerState* st) {
  ctx->saved_data["mask"] = packed;
  ctx->saved_data["strides"] = memory_strides(source);
  ctx->saved_data["scale"] = scale;
  if (st) {
    st->saved_bytes = packed.nbytes();
    st->sample_elements = source.dim() ? source.numel() / std::max<int64_t>(1, source.size(0)) : 1;
  }
}
void save_mask(AutogradContext* ctx, const at::Tensor& source, double scale, LayerState* st) {
  save_packed_mask(ctx, source, pack_positive(source), scale, st);
}
// The incoming gradient times the saved mask, written over the gradient
// where nothing else holds it (one tensor of the activation's size fewer at
// the backward's peak).
at::Tensor apply_mask(AutogradContext* ctx, const at::Tensor& g) {
  auto& s = ctx->saved_data;
  return apply_packed_mask(g, s["mask"].toTensor(), s["strides"].toIntVector(), s["scale"].toDouble(),
                           writable_grad(g));
}

struct ReluFn : torch::autograd::Function<ReluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, bool inplace, const LayerStatePtr& st,
                            int64_t group_size, at::Tensor* group_r2) {
    // ReLU and its mask (and the next layer's group ranges) from one read
    // of x (CUDA).
    auto [y, packed] = relu_and_mask(x, inplace, group_size, group_size > 0 ? group_r2 : nullptr);
    if (inplace) ctx->mark_dirty({x});
    save_packed_mask(ctx, y, packed, 1.0, st.get());
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    return {apply_mask(ctx, grads[0]), {}, {}, {}, {}};
  }
};

// Inverted dropout's kept elements and their scale.
at::Tensor dropout_keep(const at::Tensor& x, double p) {
  return at::empty_like(x, x.options().dtype(at::kBool)).bernoulli_(1.0 - p);
}
double dropout_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

struct DropoutFn : torch::autograd::Function<DropoutFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, const LayerStatePtr& st) {
    const at::Tensor keep = dropout_keep(x, p);
    save_mask(ctx, keep, dropout_scale(p), st.get());
    return x * keep * dropout_scale(p);
  }
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    return {apply_mask(ctx, grads[0]), {}, {}};
  }
};

// Window-local argmax <-> flat input index, for D pooled dimensions.
struct PoolGeometry {
  std::vector<int64_t> kernel, stride, padding, dilation, in, out;  // per pooled dim
  // Per output position (broadcast over the pooled dims, [out...]), the
  // first input coordinate of its window in dim d.
  at::Tensor start(int64_t d, const at::TensorOptions& o) const {
    std::vector<int64_t> shape(out.size(), 1);
    shape[d] = out[d];
    return (at::arange(out[d], o) * stride[d] - padding[d]).view(shape);
  }
  int64_t window() const {
    int64_t w = 1;
    for (int64_t k : kernel) w *= k;
    return w;
  }
  at::Tensor to_local(const at::Tensor& flat) const {
    at::Tensor rest = flat, local;
    std::vector<at::Tensor> coord(in.size());
    for (int64_t d = static_cast<int64_t>(in.size()) - 1; d >= 0; --d) {
      coord[d] = rest.remainder(in[d]);
      rest = rest.div(in[d], "floor");
    }
    for (size_t d = 0; d < in.size(); ++d) {
      const at::Tensor l = (coord[d] - start(d, flat.options())).div(dilation[d], "floor");
      local = d ? local * kernel[d] + l : l;
    }
    return local;
  }
  at::Tensor to_flat(const at::Tensor& local) const {
    at::Tensor rest = local, flat;
    std::vector<at::Tensor> l(in.size());
    for (int64_t d = static_cast<int64_t>(in.size()) - 1; d >= 0; --d) {
      l[d] = rest.remainder(kernel[d]);
      rest = rest.div(kernel[d], "floor");
    }
    for (size_t d = 0; d < in.size(); ++d) {
      const at::Tensor c = start(d, local.options()) + l[d] * dilation[d];
      flat = d ? flat * in[d] + c : c;
    }
    return flat;
  }
};

// The index conversions make several int64 temporaries the size of their
// input: they run over at most this many elements at a time (whole slices of
// the first dimension), so that they never hold more than a few tens of MB.
constexpr int64_t kIndexChunk = int64_t(1) << 22;
template <typename F>
void for_each_slice(const at::Tensor& t, F&& f) {
  const int64_t n = t.size(0);
  const int64_t step = std::max<int64_t>(1, kIndexChunk / std::max<int64_t>(1, n ? t.numel() / n : 0));
  for (int64_t b = 0; b < n; b += step) f(b, std::min(n, b + step) - b);
}

// The window-local max-pool indices, bit-packed in local's memory order (a
// contiguous tensor), and the sizes to unpack them to.
void save_pool_indices(AutogradContext* ctx, const at::Tensor& local, int64_t bits, const at::Tensor& y,
                       LayerState* st) {
  const at::Tensor packed = pack_bits(local, bits);
  auto& s = ctx->saved_data;
  s["packed"] = packed;
  s["bits"] = bits;
  s["local_sizes"] = local.sizes().vec();
  if (st) {
    st->saved_bytes = packed.nbytes();
    st->sample_elements = y.dim() ? y.numel() / std::max<int64_t>(1, y.size(0)) : 1;
  }
}

kernels::Pool2d pool2d(AutogradContext* ctx) {
  const auto& s = ctx->saved_data;
  const auto k = s.at("kernel").toIntVector(), st = s.at("stride").toIntVector(), p = s.at("padding").toIntVector(),
             d = s.at("dilation").toIntVector();
  return {k[0], k[1], st[0], st[1], p[0], p[1], d[0], d[1]};
}

struct MaxPoolFn : torch::autograd::Function<MaxPoolFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, std::vector<int64_t> kernel,
                            std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                            bool ceil_mode, const LayerStatePtr& st) {
    const int64_t D = static_cast<int64_t>(kernel.size());
    auto& s = ctx->saved_data;
    s["kernel"] = kernel;
    s["stride"] = stride;
    s["padding"] = padding;
    s["dilation"] = dilation;
    s["x_sizes"] = x.sizes().vec();
    s["ceil_mode"] = ceil_mode;
    s["x_format"] = static_cast<int64_t>(x.suggest_memory_format());
    s["local_last"] = false;
    if (D == 2 && kernels::max_pool2d_local.has(x.device().type()) && x.dim() == 4 && kernel[0] * kernel[1] <= 256) {
      // Our own kernel writes the window-local indices directly.  LibTorch's
      // meta function checks the arguments and gives the output's shape.
      const at::Tensor meta = at::empty_strided(x.sizes(), x.strides(), x.options().device(at::kMeta));
      const at::Tensor ym = std::get<0>(at::max_pool2d_with_indices(meta, kernel, stride, padding, dilation, ceil_mode));
      const auto format = x.suggest_memory_format();
      at::Tensor y = at::empty(ym.sizes(), x.options().memory_format(format));
      at::Tensor local = at::empty(ym.sizes(), x.options().dtype(at::kByte).memory_format(format));
      const kernels::Pool2d p = pool2d(ctx);
      kernels::max_pool2d_local(x.device().type(), x, p, y, local);
      s["in"] = std::vector<int64_t>{x.size(2), x.size(3)};
      s["out"] = std::vector<int64_t>{y.size(2), y.size(3)};
      // Packed in memory order: channels last as [N, H, W, C].
      const bool last = format == at::MemoryFormat::ChannelsLast;
      save_pool_indices(ctx, last ? local.permute({0, 2, 3, 1}) : local, index_bits(p.kH * p.kW), y, st.get());
      s["local_last"] = last;
      return y;
    }
    at::Tensor y, idx;
    if (D == 1)
      std::tie(y, idx) = at::max_pool1d_with_indices(x, kernel, stride, padding, dilation, ceil_mode);
    else if (D == 2)
      std::tie(y, idx) = at::max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode);
    else
      std::tie(y, idx) = at::max_pool3d_with_indices(x, kernel, stride, padding, dilation, ceil_mode);
    PoolGeometry g{kernel, stride, padding, dilation, {}, {}};
    for (int64_t d = 0; d < D; ++d) {
      g.in.push_back(x.size(x.dim() - D + d));
      g.out.push_back(y.size(y.dim() - D + d));
    }
    const int64_t bits = index_bits(g.window());
    at::Tensor local = at::empty(idx.sizes(), idx.options().dtype(bits <= 8 ? at::kByte : at::kInt));
    if (idx.dim() > D) {
      for_each_slice(idx, [&](int64_t b, int64_t n) { local.narrow(0, b, n).copy_(g.to_local(idx.narrow(0, b, n))); });
    } else {
      local.copy_(g.to_local(idx));
    }
    idx = at::Tensor();
    s["in"] = g.in;
    s["out"] = g.out;
    save_pool_indices(ctx, local, bits, y, st.get());
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto& s = ctx->saved_data;
    const PoolGeometry g{s["kernel"].toIntVector(), s["stride"].toIntVector(), s["padding"].toIntVector(),
                         s["dilation"].toIntVector(), s["in"].toIntVector(), s["out"].toIntVector()};
    const int64_t D = static_cast<int64_t>(g.kernel.size());
    const auto x_sizes = s["x_sizes"].toIntVector();
    const bool ceil_mode = s["ceil_mode"].toBool();
    const auto format = static_cast<at::MemoryFormat>(s["x_format"].toInt());
    const at::Tensor& gy = grads[0];
    const int64_t bits = s["bits"].toInt();
    const auto memory_sizes = s["local_sizes"].toIntVector();  // [N, H, W, C] when channels last
    at::Tensor local = unpack_bits(s["packed"].toTensor(), bits, memory_sizes, bits <= 8 ? at::kByte : at::kInt);
    if (s["local_last"].toBool()) local = local.permute({0, 3, 1, 2});
    if (kernels::max_pool2d_local_backward.has(gy.device().type()) && D == 2 && local.dim() == 4 &&
        local.scalar_type() == at::kByte) {
      at::Tensor gx = at::empty(x_sizes, gy.options().memory_format(format));
      kernels::max_pool2d_local_backward(gy.device().type(), gy, local, pool2d(ctx), gx);
      return {gx, {}, {}, {}, {}, {}, {}};
    }
    // LibTorch's own backward kernels scatter into the input's layout, from
    // flat indices into each input plane, a slice of samples at a time.
    // One dimension runs as two with a height of 1.
    auto backward_slice = [&](const at::Tensor& gy_part, const at::Tensor& local_part,
                              at::IntArrayRef x_part) -> at::Tensor {
      const at::Tensor flat = g.to_flat(local_part.to(at::kLong));
      const at::Tensor shape_only = at::empty(x_part, gy.options().memory_format(format));  // values never read
      if (D == 3)
        return at::max_pool3d_with_indices_backward(gy_part, shape_only, g.kernel, g.stride, g.padding, g.dilation,
                                                    ceil_mode, flat);
      if (D == 2)
        return at::max_pool2d_with_indices_backward(gy_part, shape_only, g.kernel, g.stride, g.padding, g.dilation,
                                                    ceil_mode, flat);
      return at::max_pool2d_with_indices_backward(gy_part.unsqueeze(-2), shape_only.unsqueeze(-2), {1, g.kernel[0]},
                                                  {1, g.stride[0]}, {0, g.padding[0]}, {1, g.dilation[0]}, ceil_mode,
                                                  flat.unsqueeze(-2))
          .squeeze(-2);
    };
    if (static_cast<int64_t>(x_sizes.size()) < D + 2) {  // unbatched (C, ...): one sample
      std::vector<int64_t> one = x_sizes;
      one.insert(one.begin(), 1);
      return {backward_slice(gy.unsqueeze(0), local.unsqueeze(0), one).squeeze(0), {}, {}, {}, {}, {}, {}};
    }
    at::Tensor gx = at::empty(x_sizes, gy.options().memory_format(format));
    for_each_slice(local, [&](int64_t b, int64_t n) {
      std::vector<int64_t> part = x_sizes;
      part[0] = n;
      gx.narrow(0, b, n).copy_(backward_slice(gy.narrow(0, b, n), local.narrow(0, b, n), part));
    });
    return {gx, {}, {}, {}, {}, {}, {}};
  }
};

// Average pools: backward needs the input's shape only, so only that is kept.
struct AvgPoolFn : torch::autograd::Function<AvgPoolFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, std::vector<int64_t> kernel,
                            std::vector<int64_t> stride, std::vector<int64_t> padding, bool ceil_mode,
                            bool count_include_pad, std::optional<int64_t> divisor, bool adaptive) {
    auto& s = ctx->saved_data;
    s["x_sizes"] = x.sizes().vec();
    s["adaptive"] = adaptive;
    if (adaptive) return at::adaptive_avg_pool2d(x, kernel);
    s["kernel"] = kernel;
    s["stride"] = stride;
    s["padding"] = padding;
    s["ceil_mode"] = ceil_mode;
    s["count_include_pad"] = count_include_pad;
    s["divisor"] = divisor ? *divisor : int64_t(0);
    return at::avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto& s = ctx->saved_data;
    const at::Tensor& g = grads[0];
    const at::Tensor shape_only = at::empty(s["x_sizes"].toIntVector(), g.options());  // values never read
    at::Tensor gx;
    if (s["adaptive"].toBool()) {
      gx = at::_adaptive_avg_pool2d_backward(g.contiguous(), shape_only);
    } else {
      const int64_t div = s["divisor"].toInt();
      gx = at::avg_pool2d_backward(g, shape_only, s["kernel"].toIntVector(), s["stride"].toIntVector(),
                                   s["padding"].toIntVector(), s["ceil_mode"].toBool(),
                                   s["count_include_pad"].toBool(), div ? std::optional<int64_t>(div) : std::nullopt);
    }
    return {gx, {}, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor maybe_bias(const std::optional<at::Tensor>& b) { return b ? *b : at::Tensor(); }

// Under autocast, convolutions run in the lower-precision dtype as LibTorch's
// conv*d do (at::convolution itself is not on every device's autocast list).
at::Tensor autocast_lower(const at::Tensor& t, const at::Tensor& x) {
  const auto type = x.device().type();
  if (!t.defined() || !t.is_floating_point() || !at::autocast::is_autocast_enabled(type)) return t;
  return t.to(at::autocast::get_autocast_dtype(type));
}

// Whether an op should keep a compressed copy rather than LibTorch's own.
bool compressing(const QuantConfig& c, const at::Tensor& x, const at::Tensor& w) {
  return c.compresses() && at::GradMode::is_enabled() && (x.requires_grad() || (w.defined() && w.requires_grad()));
}

}  // namespace

namespace functional {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const QuantConfig& config, const LayerStatePtr& state) {
  if (!compressing(config, x, weight)) return at::linear(x, weight, maybe_bias(bias));
  return LinearFn::apply(x, weight, placeholder(bias, x), &config, state);
}

at::Tensor convolution(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       bool transposed, at::IntArrayRef output_padding, int64_t groups,
                       const QuantConfig& config, const LayerStatePtr& state) {
  const at::Tensor xl = autocast_lower(x, x), wl = autocast_lower(weight, x);
  const at::Tensor bl = bias ? autocast_lower(*bias, x) : at::Tensor();
  if (!compressing(config, x, weight))
    return at::convolution(xl, wl, bl, stride, padding, dilation, transposed, output_padding, groups);
  return ConvFn::apply(xl, wl, placeholder(bl, x), stride.vec(), padding.vec(), dilation.vec(), transposed,
                       output_padding.vec(), groups, &config, state);
}

at::Tensor batch_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                      const at::Tensor& running_var, double momentum, double eps, const QuantConfig& config,
                      const LayerStatePtr& state, bool overwrite_input) {
  const at::Tensor w = maybe_bias(weight);
  if (!config.compress_bn || !compressing(config, x, w))
    return at::batch_norm(x, w, maybe_bias(bias), running_mean, running_var, /*training=*/true, momentum, eps,
                          /*cudnn_enabled=*/true);
  // Never over a leaf or a view (autograd forbids the first; the second's
  // base may be read elsewhere), nor over what is not one dense block.
  const bool overwrite = overwrite_input && !x.is_leaf() && !x.is_view() && x.is_non_overlapping_and_dense();
  return BatchNormFn::apply(x, placeholder(weight, x), placeholder(bias, x), placeholder(running_mean, x),
                            placeholder(running_var, x), momentum, eps, &config, state, overwrite);
}

at::Tensor relu(const at::Tensor& x, bool inplace, const LayerStatePtr& state, int64_t group_size) {
  if (!at::GradMode::is_enabled() || !x.requires_grad()) return inplace ? x.relu_() : x.relu();
  at::Tensor r2;
  at::Tensor y = ReluFn::apply(x, inplace, state, group_size, &r2);
  // For the next layer's allocation, if it reads y next (as it is now).
  if (r2.defined()) group_range_offer().offer(y, std::move(r2), group_size);
  return y;
}

at::Tensor dropout(const at::Tensor& x, double p, const LayerStatePtr& state) {
  if (p < 0.0 || p > 1.0) throw std::invalid_argument("aq: dropout probability must be in [0, 1], not " + std::to_string(p));
  if (!at::GradMode::is_enabled() || !x.requires_grad()) return x * dropout_keep(x, p) * dropout_scale(p);
  return DropoutFn::apply(x, p, state);
}

at::Tensor max_pool(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, bool ceil_mode, const LayerStatePtr& state) {
  const size_t D = kernel.size();
  if (D < 1 || D > 3 || stride.size() != D || padding.size() != D || dilation.size() != D)
    throw std::invalid_argument("aq: max_pool takes 1 to 3 dimensions, with one stride, padding and dilation each");
  std::vector<int64_t> st = stride.empty() ? kernel.vec() : stride.vec();
  if (!at::GradMode::is_enabled() || !x.requires_grad()) {
    if (D == 1) return at::max_pool1d(x, kernel, st, padding, dilation, ceil_mode);
    if (D == 2) return at::max_pool2d(x, kernel, st, padding, dilation, ceil_mode);
    return at::max_pool3d(x, kernel, st, padding, dilation, ceil_mode);
  }
  return MaxPoolFn::apply(x, kernel.vec(), st, padding.vec(), dilation.vec(), ceil_mode, state);
}

at::Tensor avg_pool2d(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                      bool ceil_mode, bool count_include_pad, std::optional<int64_t> divisor_override) {
  if (!at::GradMode::is_enabled() || !x.requires_grad())
    return at::avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override);
  return AvgPoolFn::apply(x, kernel.vec(), stride.empty() ? kernel.vec() : stride.vec(), padding.vec(), ceil_mode,
                          count_include_pad, divisor_override, false);
}

at::Tensor adaptive_avg_pool2d(const at::Tensor& x, at::IntArrayRef output_size) {
  if (!at::GradMode::is_enabled() || !x.requires_grad()) return at::adaptive_avg_pool2d(x, output_size);
  return AvgPoolFn::apply(x, output_size.vec(), std::vector<int64_t>(), std::vector<int64_t>(), false, false,
                          std::optional<int64_t>(), true);
}

}  // namespace functional
}  // namespace aq
