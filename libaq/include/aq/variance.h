// The gradient variance that activation compression adds (docs/design.md
// §7), the "Overall Var" of ActNN's tables: on K batches, the exact weight
// gradients of every conv/linear layer, and S quantized gradients per batch
// with fresh random rounding, for each configuration.
#pragma once

#include "aq/config.h"
#include "aq/data.h"
#include "aq/models.h"
#include "aq/step.h"

#include <c10/core/Device.h>

#include <set>
#include <string>
#include <vector>

namespace aq::variance {

struct Options {
  int64_t batches = 10;  // K
  int64_t samples = 3;   // S
};

struct Figures {
  double overall_var = 0;  // (1/K) sum_k sum_elements Var_s(g_hat_ks)
  double bias = 0;         // (1/K) sum_k ||mean_s g_hat_ks - g_k||^2
  double sample_var = 0;   // sum_k ||g_k - g_bar||^2
};

struct Result {
  std::string config;                  // the configuration's flags
  std::vector<std::string> layers;     // conv/linear weight names
  std::vector<Figures> per_layer;
  Figures total;
};

// Measures every configuration on the same K batches of `loader` (its epoch
// 0).  The model's parameters and buffers are left as they were; its Q
// layers are reconfigured (QModule) for each configuration and left with
// the last one.  Adaptive configurations get one warm-up pass per batch
// first, so that their gradient statistics and per-layer budgets exist.
// Gradients come from the training step (aq/step.h) under `amp`.
std::vector<Result> measure(models::Model& model, data::Loader& loader, const c10::Device& device,
                            const std::vector<QuantConfig>& configs, const Options& options,
                            train::Amp amp = train::Amp::kOff);

// What aq-variance and `aq-train --evaluate --training-only` run: the model
// of `resume` (or a fresh one of `arch`) on the training split of the
// dataset, every configuration; the figures also go to the HDF5 file
// `output` when it is set (aq-checkpoint(5)).
struct RunOptions {
  data::DataOptions data;
  std::string arch = "preact_resnet20", resume, output;
  // A fresh model's shape (layers, width, heads, class_token; 0: the
  // architecture's own); its image size and context come from the data.
  models::ModelOptions shape;
  // Options the command line gave ("--arch", "--dataset", "--context",
  // "--layers", "--width", "--heads", "--pool"): with `resume`, one that
  // differs from the checkpoint's is refused.
  std::set<std::string> given;
  std::vector<QuantConfig> configs;
  Options options;
  train::Amp amp = train::Amp::kOff;
  c10::Device device{c10::kCPU};
  uint64_t seed = 0;
};
struct Report {
  std::string arch, dataset;  // of the checkpoint, or the options'
  std::vector<Result> results;
};
Report run(const RunOptions& options);

}  // namespace aq::variance
