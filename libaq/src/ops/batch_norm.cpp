// Training-mode batch norm keeping its input compressed and the per-channel
// statistics.
#include "aq/functional.h"

#include "aq/sample_bits.h"
#include "aq_config.h"
#include "batch_norm.h"
#include "offer.h"
#include "saved.h"

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>

namespace aq {
namespace {

using namespace detail;

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
      // kernel in place, which keeps the out-of-place transform's speed
      // (LibTorch's in-place one does not).  With channels innermost the
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

}  // namespace

namespace functional {

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

}  // namespace functional
}  // namespace aq
