// Training-mode batch norm whose statistics are those of the global batch,
// every rank's samples together (torch.nn.SyncBatchNorm's), keeping its
// input compressed as batch_norm does.
#include "aq/dist.h"
#include "aq/functional.h"

#include "saved.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

namespace aq {
namespace {

using namespace detail;

// The dimensions a channel's statistics run over, and a shape that
// broadcasts a [C] tensor against the input.
std::pair<std::vector<int64_t>, std::vector<int64_t>> channel_dims(const at::Tensor& x) {
  std::vector<int64_t> dims = {0}, shape(x.dim(), 1);
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  shape[1] = x.size(1);
  return {dims, shape};
}

struct SyncBatchNormFn : torch::autograd::Function<SyncBatchNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                            const at::Tensor& running_mean, const at::Tensor& running_var, double momentum,
                            double eps, const QuantConfig* c, const LayerStatePtr& st, bool compress) {
    put_state(ctx, st);
    if (st) st->batch_norm = true, st->in_channels = x.size(1);
    auto group = dist::current();
    const auto [dims, shape] = channel_dims(x);
    const int64_t C = x.size(1), n = x.numel() / std::max<int64_t>(1, C);
    // Each rank's count, n * mean and n * E[x^2] (from its own mean and
    // variance, which are accurate), summed over the ranks in double.
    auto [var, mean] = at::var_mean(x.to(at::kFloat), dims, /*correction=*/0);
    auto stats = at::cat({mean * n, (var + mean * mean) * n, at::full({1}, double(n), mean.options())})
                     .to(at::kDouble);
    std::vector<at::Tensor> t{stats};
    group->all_reduce_sum(t);
    stats = t[0];
    const double N = stats[2 * C].item<double>();
    TORCH_CHECK(N > 1, "aq: QSyncBatchNorm: ", N, " value(s) per channel over all ranks; at least 2 needed");
    const at::Tensor g_mean = stats.narrow(0, 0, C) / N;
    const at::Tensor g_var = (stats.narrow(0, C, C) / N - g_mean * g_mean).clamp_min(0);
    const at::Tensor invstd = (g_var + eps).rsqrt().to(at::kFloat), meanf = g_mean.to(at::kFloat);
    if (running_mean.numel()) {
      at::NoGradGuard no_grad;
      running_mean.mul_(1 - momentum).add_(meanf.to(running_mean.scalar_type()), momentum);
      running_var.mul_(1 - momentum).add_((g_var * (N / (N - 1))).to(running_var.scalar_type()), momentum);
    }
    at::Tensor scale = invstd.view(shape), shift = (-meanf * invstd).view(shape);
    if (w.numel()) scale = scale * w.to(at::kFloat).view(shape), shift = shift * w.to(at::kFloat).view(shape);
    if (b.numel()) shift = shift + b.to(at::kFloat).view(shape);
    at::Tensor y = (x * scale + shift).to(x.scalar_type());
    if (compress) {
      save_compressed(ctx, x, *c, st.get());
      ctx->save_for_backward({w, meanf, invstd});
    } else {
      ctx->save_for_backward({w, meanf, invstd, x});
    }
    if (st) st->saved_bytes += meanf.nbytes() + invstd.nbytes();
    ctx->saved_data["count"] = N;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const at::Tensor& g = grads[0];
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& w = saved[0];
    const auto [dims, shape] = channel_dims(g);
    const int64_t C = g.size(1);
    const at::Tensor mean = saved[1].view(shape), invstd = saved[2].view(shape);
    // f(begin, end, the input of samples [begin, end)) over the restored
    // input (in micro-batches where the level says so), or the input kept.
    const bool raw = saved.size() == 4;
    const Packed p = raw ? Packed{} : packed_of(ctx);
    const auto each = [&](auto&& f) {
      if (raw) f(int64_t(0), g.size(0), saved[3].to(at::kFloat));
      else for_each_micro_batch(ctx, p, at::kFloat, f);
    };
    // This rank's sums of dy and dy (x - mean); the input gradient needs
    // those of the global batch, the weight and bias gradients this rank's
    // (the gradient reducer averages them as every other gradient).
    at::Tensor sums = at::zeros({2 * C}, g.options().dtype(at::kFloat));
    at::Tensor sum_dy = sums.narrow(0, 0, C), sum_dy_xmu = sums.narrow(0, C, C);
    each([&](int64_t b, int64_t e, const at::Tensor& x) {
      const at::Tensor dy = g.narrow(0, b, e - b).to(at::kFloat);
      sum_dy += dy.sum(dims);
      sum_dy_xmu += (dy * (x - mean)).sum(dims);
    });
    const at::Tensor local = sums.clone();
    at::Tensor gx;
    if (ctx->needs_input_grad(0)) {
      std::vector<at::Tensor> t{sums};
      dist::current()->all_reduce_sum(t);
      const double N = ctx->saved_data["count"].toDouble();
      const at::Tensor mean_dy = (t[0].narrow(0, 0, C) / N).view(shape);
      const at::Tensor proj = (t[0].narrow(0, C, C) / N).view(shape) * invstd * invstd;
      const at::Tensor scale = w.numel() ? invstd * w.to(at::kFloat).view(shape) : invstd;
      gx = at::empty_like(g);
      each([&](int64_t b, int64_t e, const at::Tensor& x) {
        gx.narrow(0, b, e - b).copy_((g.narrow(0, b, e - b).to(at::kFloat) - mean_dy - (x - mean) * proj) * scale);
      });
    }
    const auto param_dtype = w.numel() ? w.scalar_type() : at::kFloat;
    at::Tensor gw = ctx->needs_input_grad(1) ? (local.narrow(0, C, C) * saved[2]).to(param_dtype) : at::Tensor();
    at::Tensor gb = ctx->needs_input_grad(2) ? local.narrow(0, 0, C).to(param_dtype) : at::Tensor();
    return {gx, gw, gb, {}, {}, {}, {}, {}, {}, {}};
  }
};

}  // namespace

namespace functional {

at::Tensor sync_batch_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, double momentum, double eps, const QuantConfig& config,
                           const LayerStatePtr& state) {
  if (!dist::current()) return batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, config, state);
  const bool compress = config.compress_bn && compressing(config, x, maybe_bias(weight));
  return SyncBatchNormFn::apply(x, placeholder(weight, x), placeholder(bias, x), placeholder(running_mean, x),
                                placeholder(running_var, x), momentum, eps, &config, state, compress);
}

}  // namespace functional
}  // namespace aq
