#include "saved.h"

#include "aq/log.h"
#include "aq/sample_bits.h"
#include "offer.h"

#include "aq_config.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#if AQ_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <deque>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>

namespace aq {

CompressOptions compress_options(const QuantConfig& c) {
  CompressOptions o;
  o.group_size = c.group_size;
  o.pergroup = c.pergroup;
  o.stochastic = c.stochastic;
  o.range_dtype = c.range_dtype;
  return o;
}

namespace detail {

namespace {

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

}  // namespace

at::Tensor placeholder(const std::optional<at::Tensor>& t, const at::Tensor& like) {
  return t && t->defined() ? *t : at::empty({0}, like.options());
}
at::Tensor placeholder(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}
at::Tensor present(const at::Tensor& t) { return t.numel() ? t : at::Tensor(); }

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
    st->group_size = owner->group_size;
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
    if (!shared) st->group_size = o.group_size;
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

at::Tensor restore(AutogradContext* ctx, c10::ScalarType dtype) { return dequantize(packed_of(ctx)).to(dtype); }

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
  const bool usegradient = s["usegradient"].toBool();
  const at::Tensor indices = s.count("indices") ? s["indices"].toTensor() : at::Tensor();
  if (st->share_stats) {
    st->due_stats = LayerState::DueStats{usegradient, indices};
    return;
  }
  update_gradient_stats(*st, usegradient, st->grad_sq, indices);
}

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
at::Tensor apply_mask(AutogradContext* ctx, const at::Tensor& g) {
  auto& s = ctx->saved_data;
  return apply_packed_mask(g, s["mask"].toTensor(), s["strides"].toIntVector(), s["scale"].toDouble(),
                           writable_grad(g));
}

at::Tensor maybe_bias(const std::optional<at::Tensor>& b) { return b ? *b : at::Tensor(); }

at::Tensor autocast_lower(const at::Tensor& t, const at::Tensor& x) {
  const auto type = x.device().type();
  // Autocast leaves double alone.
  if (!t.defined() || !t.is_floating_point() || t.scalar_type() == at::kDouble ||
      !at::autocast::is_autocast_enabled(type))
    return t;
  return t.to(at::autocast::get_autocast_dtype(type));
}

bool compressing(const QuantConfig& c, const at::Tensor& x, const at::Tensor& w) {
  return c.compresses() && at::GradMode::is_enabled() && (x.requires_grad() || (w.defined() && w.requires_grad()));
}

}  // namespace detail
}  // namespace aq
