// aq-calibrate: the statistics of adaptive precision (group ranges,
// per-sample gradient statistics, sensitivities) collected over K batches of
// training data forward and backward, and the allocation they give, so that
// training can start from them instead of an arbitrary first step.
#pragma once

#include "aq/adaptive.h"
#include "aq/config.h"
#include "aq/data.h"
#include "aq/models.h"
#include "aq/step.h"

#include <c10/core/Device.h>

#include <set>
#include <string>
#include <vector>

namespace aq::calibrate {

struct RunOptions {
  data::DataOptions data;
  std::string arch = "preact_resnet20", resume, output;
  // As aq::variance::RunOptions's: a fresh model's shape, and the options
  // given, which must agree with a checkpoint's model.
  models::ModelOptions shape;
  std::set<std::string> given;
  int64_t batches = 10;
  QuantConfig config;
  train::Amp amp = train::Amp::kOff;
  c10::Device device{c10::kCPU};
  uint64_t seed = 0;
};
// Each adaptive layer's figures after K batches; the HDF5 file `output`
// (aq-checkpoint(5), "Calibration files") when it is set.
std::vector<LayerBits> run(const RunOptions& options);

// What a calibration file must have been made for.
struct Match {
  std::string arch, dataset;
  QuantConfig config;         // its allocation settings: cabits, ibits, pergroup, perlayer, usegradient, group size
  int64_t dataset_size = 0;   // training samples (0: not checked)
};
// Loads a calibration file's statistics and budgets into the model's aq
// layers (aq-train --calibration).  Throws std::runtime_error naming the
// file and the difference if it is not a calibration file, or was made for
// another architecture, dataset (name or size), allocation configuration,
// or holds state for a layer the model does not have.
void load(models::Model& model, const std::string& path, const Match& match);

}  // namespace aq::calibrate
