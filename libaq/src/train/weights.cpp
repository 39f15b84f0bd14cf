#include "aq/weights.h"

#include "aq/evaluate.h"
#include "aq/log.h"
#include "aq/safetensors.h"
#include "fields.h"

#include <torch/nn/modules/linear.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstring>
#include <set>
#include <stdexcept>

namespace aq::train {

using detail::counter;
using detail::meta;
using detail::shape;

namespace {

// "0.485,0.456,0.406" (a checkpoint's list) as a JSON list.
std::string json_list(const std::string& text) { return "[" + text + "]"; }

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

bool starts_with_hdf5_signature(const std::string& path) {
  static const unsigned char kSignature[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  unsigned char head[8] = {};
  const bool ok = std::fread(head, 1, 8, f) == 8;
  std::fclose(f);
  return ok && std::memcmp(head, kSignature, 8) == 0;
}

// The name prefix of the model's classifier, its last Linear layer ("fc."),
// or "" if it has none.
std::string head_prefix(models::Model& model) {
  std::string head;
  for (const auto& m : model.named_modules("", /*include_self=*/false))
    if (dynamic_cast<torch::nn::LinearImpl*>(m.value().get())) head = m.key() + ".";
  return head;
}

}  // namespace

Weights export_weights(const ckpt::Checkpoint& c, const std::string& source) {
  Weights w;
  w.tensors = c.parameters;
  w.tensors.insert(w.tensors.end(), c.buffers.begin(), c.buffers.end());
  if (w.tensors.empty()) throw std::runtime_error(source + ": checkpoint holds no parameters");
  auto& m = w.metadata;
  m["format"] = "pt";  // what Hugging Face's loaders expect of a PyTorch state dict
  m["aq_weights"] = "1";
  m["arch"] = meta(c, "arch", source);
  m["num_classes"] = std::to_string(counter(c, "num_classes", source));
  m["in_channels"] = std::to_string(counter(c, "in_channels", source));
  for (const char* k : {"image_size", "epoch", "step"})
    if (auto it = c.counters.find(k); it != c.counters.end()) m[k] = std::to_string(it->second);
  for (const char* k : {"dataset", "config", "aq_version", "torch_version", "created"})
    if (auto it = c.meta.find(k); it != c.meta.end()) m[k] = it->second;
  bool normalisation = true;
  for (const char* k : {"mean", "std"}) {
    if (auto it = c.meta.find(k); it != c.meta.end())
      m[k] = json_list(it->second);
    else
      normalisation = false;
  }
  if (!normalisation) log().warn("{}: checkpoint records no input normalisation (mean, std): not exported", source);
  if (const std::string bad = first_bad_values(c); !bad.empty()) log().warn("{}: {}", source, bad);
  return w;
}

void init_from(models::Model& model, const std::string& path, bool reset_head) {
  ckpt::Tensors from;
  if (starts_with_hdf5_signature(path)) {
    auto c = ckpt::load(path);
    from = std::move(c.parameters);
    from.insert(from.end(), c.buffers.begin(), c.buffers.end());
  } else {
    from = safetensors::load(path).tensors;
  }
  const std::string classifier = head_prefix(model);
  if (reset_head && classifier.empty()) throw std::runtime_error("--reset-head: the model has no Linear classifier");
  const std::string head = reset_head ? classifier : "";
  auto in_head = [&](const std::string& name) { return !head.empty() && name.rfind(head, 0) == 0; };
  auto params = model.named_parameters();
  auto buffers = model.named_buffers();
  auto find = [&](const std::string& name) -> torch::Tensor* {
    if (auto* p = params.find(name)) return p;
    return buffers.find(name);
  };
  // Everything is checked before anything is copied.
  std::set<std::string> seen;
  std::vector<std::pair<torch::Tensor*, const torch::Tensor*>> copies;
  for (const auto& [name, t] : from) {
    if (in_head(name)) continue;
    torch::Tensor* dst = find(name);
    if (!dst)
      throw std::runtime_error(path + ": '" + name + "' is not a tensor of the model (another architecture?)");
    if (!dst->sizes().equals(t.sizes())) {
      const bool in_classifier = !classifier.empty() && name.rfind(classifier, 0) == 0;
      const std::string hint = in_classifier ? " (another class count: --reset-head starts the classifier afresh)"
                                             : " (another architecture or input channels?)";
      throw std::runtime_error(path + ": '" + name + "' has shape " + shape(t) + ", the model's " + shape(*dst) +
                               hint);
    }
    if (t.is_floating_point() != dst->is_floating_point())
      throw std::runtime_error(path + ": '" + name + "' has dtype " + std::string(c10::toString(t.scalar_type())) +
                               ", the model's " + std::string(c10::toString(dst->scalar_type())));
    seen.insert(name);
    copies.emplace_back(dst, &t);
  }
  for (const auto* list : {&params, &buffers})
    for (const auto& item : *list)
      if (!seen.count(item.key()) && !in_head(item.key()) && !ends_with(item.key(), ".num_batches_tracked"))
        throw std::runtime_error(path + ": file lacks the model's '" + item.key() + "'");
  torch::NoGradGuard no_grad;
  for (auto& [dst, src] : copies) dst->copy_(*src);
  log().info("weights from {}: {} tensors{}", path, copies.size(),
             head.empty() ? "" : ", classifier " + head.substr(0, head.size() - 1) + " initialised afresh");
}

}  // namespace aq::train
