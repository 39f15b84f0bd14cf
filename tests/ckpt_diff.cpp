// For the CLI tests: the largest absolute difference between two
// checkpoints' parameters (and, with --buffers, floating-point buffers; with
// --adaptive, the adaptive state: budgets, gradient statistics), tensor by
// tensor by name, printed as one number (NaN where both hold NaN counts as
// equal); exit 1 when the names or shapes differ.
//   ckpt_diff [--buffers] [--adaptive] A.h5 B.h5
#include "aq/checkpoint.h"

#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <string>

int main(int argc, char** argv) {
  bool buffers = false, adaptive = false;
  int i = 1;
  for (; i < argc && argv[i][0] == '-'; ++i) {
    const std::string flag = argv[i];
    if (flag == "--buffers")
      buffers = true;
    else if (flag == "--adaptive")
      adaptive = true;
    else
      break;
  }
  if (argc != i + 2) {
    std::fprintf(stderr, "usage: ckpt_diff [--buffers] [--adaptive] A.h5 B.h5\n");
    return 2;
  }
  try {
    const auto a = aq::ckpt::load(argv[i]), b = aq::ckpt::load(argv[i + 1]);
    auto named = [&](const aq::ckpt::Checkpoint& c) {
      std::map<std::string, torch::Tensor> m(c.parameters.begin(), c.parameters.end());
      if (buffers)
        for (const auto& [k, t] : c.buffers)
          if (t.is_floating_point()) m[k] = t;
      if (adaptive)
        for (const auto& [k, t] : c.adaptive)
          if (t.is_floating_point()) m[k] = t;
      return m;
    };
    const auto ma = named(a), mb = named(b);
    double worst = 0;
    for (const auto& [k, t] : ma) {
      auto it = mb.find(k);
      if (it == mb.end() || !it->second.sizes().equals(t.sizes())) {
        std::fprintf(stderr, "ckpt_diff: '%s' is not in both, or differs in shape\n", k.c_str());
        return 1;
      }
      if (t.numel() == 0) continue;
      const auto x = t.to(torch::kDouble), y = it->second.to(torch::kDouble);
      const auto d = (x - y).abs().masked_fill(x.isnan() & y.isnan(), 0);
      const double m = d.max().item<double>();
      if (!std::isnan(worst) && !(m <= worst)) worst = m;  // a NaN against a number stays in sight
    }
    if (ma.size() != mb.size()) {
      std::fprintf(stderr, "ckpt_diff: %zu and %zu tensors\n", ma.size(), mb.size());
      return 1;
    }
    std::printf("%.9g\n", worst);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ckpt_diff: %s\n", e.what());
    return 1;
  }
  return 0;
}
