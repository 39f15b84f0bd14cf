// Pooling: max pooling keeping window-local argmaxes as small integers,
// average pooling keeping shapes only.
#include "aq/functional.h"

#include "aq_config.h"
#include "pool.h"
#include "saved.h"

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>

namespace aq {
namespace {

using namespace detail;

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
    s["channels_last"] = x.dim() == 4 && x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
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
    const std::vector<int64_t> sizes = s["x_sizes"].toIntVector();
    // The gradient in the input's layout: the layers before read it as they wrote x.
    const auto layout = s["channels_last"].toBool() ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    const at::Tensor shape_only = at::empty(sizes, g.options().memory_format(layout));  // values never read
    at::Tensor gx;
    if (s["adaptive"].toBool() && g.size(-1) == 1 && g.size(-2) == 1) {
      // A global average (ResNets' last pool), as LibTorch's forward computes
      // it: a mean, whose gradient is one broadcast division instead of
      // _adaptive_avg_pool2d_backward's atomics over the whole input.
      const double area = static_cast<double>(sizes[sizes.size() - 1] * sizes[sizes.size() - 2]);
      gx = shape_only;
      gx.copy_((g / area).expand(sizes));
    } else if (s["adaptive"].toBool()) {
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

}  // namespace

namespace functional {

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
