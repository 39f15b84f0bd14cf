// What aq-variance and aq-calibrate share: the model and data they measure,
// and the running statistics they leave as they found them.
#pragma once

#include "aq/config.h"
#include "aq/data.h"
#include "aq/models.h"

#include <torch/torch.h>

#include <memory>
#include <set>
#include <string>
#include <vector>

namespace aq::train::detail {

// Restores a model's buffers (running statistics) when it goes out of
// scope: measuring trains in train mode, which updates them.
class KeepBuffers {
 public:
  explicit KeepBuffers(torch::nn::Module& model) {
    for (const auto& b : model.buffers()) buffers_.push_back(b), saved_.push_back(b.clone());
  }
  ~KeepBuffers() {
    torch::NoGradGuard g;
    for (size_t i = 0; i < buffers_.size(); ++i) buffers_[i].copy_(saved_[i]);
  }

 private:
  std::vector<torch::Tensor> buffers_, saved_;
};

// `shape` for a model of `info`'s data: a ViT's position embeddings are for
// its image size, a GPT's for its sequence (or `shape`'s longer context).
models::ModelOptions options_for(const data::Info& info, models::ModelOptions shape);

// Throws std::invalid_argument unless `arch` reads what `dataset` gives
// (token models text, the others images).
void check_arch_reads(const std::string& arch, const std::string& dataset);

// What aq-variance and aq-calibrate measure: the model of `resume` (or a
// fresh `arch` of `shape`) on the dataset it was trained on, on `device`,
// with a loader over the training split.  With `resume`, an option in
// `given` (--arch, --dataset, --context, --layers, --width, --heads, --pool)
// that differs from the checkpoint's is refused (std::invalid_argument).  The model is
// converted with `config` for its architecture (QuantConfig::for_model).
struct Subject {
  std::string arch, dataset;
  models::ModelPtr model;
  std::unique_ptr<data::Loader> loader;
  QuantConfig config;  // the model's
};
Subject open_subject(const std::string& resume, const data::DataOptions& data, const std::string& arch,
                     const models::ModelOptions& shape, const std::set<std::string>& given,
                     const QuantConfig& config, const c10::Device& device, uint64_t seed);

}  // namespace aq::train::detail
