// For the CLI tests: the largest absolute difference between two
// checkpoints' parameters (and, with --buffers, floating-point buffers),
// tensor by tensor by name, printed as one number; exit 1 when the names or
// shapes differ.
//   ckpt_diff [--buffers] A.h5 B.h5
#include "aq/checkpoint.h"

#include <torch/torch.h>

#include <cstdio>
#include <map>
#include <string>

int main(int argc, char** argv) {
  bool buffers = argc > 1 && std::string(argv[1]) == "--buffers";
  if (argc != 3 + buffers) {
    std::fprintf(stderr, "usage: ckpt_diff [--buffers] A.h5 B.h5\n");
    return 2;
  }
  try {
    const auto a = aq::ckpt::load(argv[1 + buffers]), b = aq::ckpt::load(argv[2 + buffers]);
    auto named = [&](const aq::ckpt::Checkpoint& c) {
      std::map<std::string, torch::Tensor> m(c.parameters.begin(), c.parameters.end());
      if (buffers)
        for (const auto& [k, t] : c.buffers)
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
      worst = std::max(worst, (t.to(torch::kDouble) - it->second.to(torch::kDouble)).abs().max().item<double>());
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
