// The gradient variance that activation compression adds (ALGORITHM.md 7),
// the "Overall Var" of the seed's tables: on K batches, the exact weight
// gradients of every conv/linear layer, and S quantized gradients per batch
// with fresh random rounding, for each configuration.
#pragma once

#include "aq/config.h"
#include "aq/data.h"
#include "aq/models.h"

#include <c10/core/Device.h>

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
std::vector<Result> measure(models::Model& model, data::Loader& loader, const c10::Device& device,
                            const std::vector<QuantConfig>& configs, const Options& options);

// Configurations from text: one per line (or separated by ';'), in the
// seed's spelling ("-c quantize --ca=True --cabits=2 ..."); blank lines and
// '#' comments are skipped.  Throws std::invalid_argument naming a bad line.
std::vector<QuantConfig> parse_configs(const std::string& text);

// What aq-variance and `aq-train --evaluate --training-only` run: the model
// of `resume` (or a fresh one of `arch`) on the training split of the
// dataset, every configuration, TSV on stdout (config, layer, overall_var,
// bias, sample_var; a "total" row per configuration), and optionally an
// HDF5 file (`output`, see aq-checkpoint(5)).
struct RunOptions {
  std::string dataset = "fashion-mnist", data_dir, arch = "preact_resnet20", resume, output;
  int64_t num_classes = 0, batch_size = 128, image_size = 224;
  int workers = 0;
  std::vector<QuantConfig> configs;
  Options options;
  c10::Device device{c10::kCPU};
  uint64_t seed = 0;
};
int run(const RunOptions& options);

}  // namespace aq::variance

// aq-calibrate: the statistics of adaptive precision (group ranges,
// per-sample gradient statistics, sensitivities) collected over K batches of
// training data forward and backward, and the allocation they give, so that
// training can start from them instead of an arbitrary first step.
namespace aq::calibrate {

struct RunOptions {
  std::string dataset = "fashion-mnist", data_dir, arch = "preact_resnet20", resume, output;
  int64_t num_classes = 0, batch_size = 128, image_size = 224, batches = 10;
  int workers = 0;
  QuantConfig config;
  c10::Device device{c10::kCPU};
  uint64_t seed = 0;
};
// TSV on stdout (layer, elements, sensitivity, bits, budget); the HDF5 file
// (aq-checkpoint(5), "Calibration files") when output is set.
int run(const RunOptions& options);

// Loads a calibration file's statistics and budgets into the model's aq
// layers (aq-train --calibration).  Throws std::runtime_error naming the
// file if it is not a calibration file or is for another architecture.
void load(models::Model& model, const std::string& path, const std::string& arch);

}  // namespace aq::calibrate
