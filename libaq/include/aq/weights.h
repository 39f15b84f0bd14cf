// Weights in and out of aq: a checkpoint's parameters and buffers as a
// safetensors file (aq-export), and a model's starting weights from an aq
// checkpoint or a safetensors file (aq-train --init-from).
//
// The names are the model's LibTorch names, which for resnet18/34/50/101/152
// are torchvision's: torchvision's state_dict() and an exported file hold
// the same keys, shapes and dtypes (num_batches_tracked included), so
// `model.load_state_dict(safetensors.torch.load_file(f))` loads one and
// `safetensors.torch.save_file(model.state_dict(), f)` writes the other.
#pragma once

#include "aq/checkpoint.h"
#include "aq/models.h"

#include <map>
#include <string>

namespace aq::train {

struct Weights {
  ckpt::Tensors tensors;                        // parameters, then buffers
  std::map<std::string, std::string> metadata;  // what rebuilds the model (man/aq-export.1)
};

// A checkpoint's parameters and buffers, with the metadata that rebuilds
// its model: format "pt", arch, num_classes, in_channels, image_size,
// dataset, mean and std (JSON lists, when the checkpoint has them), epoch,
// step, config, aq_version, torch_version.  Throws std::runtime_error naming
// `source` when the checkpoint lacks arch, num_classes or in_channels; logs
// a warning when it lacks mean and std, or holds inf or NaN.
Weights export_weights(const ckpt::Checkpoint& c, const std::string& source);

// Copies the parameters and buffers of `path` (an aq checkpoint, known by
// HDF5's signature, else a safetensors file) into `model`.  Every tensor of
// the model must be in the file with its shape, and the file may hold
// nothing else, except that a BatchNorm's num_batches_tracked may be missing
// (PyTorch's older files; the model's stays).  With `reset_head` the
// classifier (the model's last Linear layer) keeps its fresh initialisation
// and the file's tensors of that name are ignored, whatever their shape.
// Throws std::runtime_error with one line naming the file and the first
// mismatch.
void init_from(models::Model& model, const std::string& path, bool reset_head);

}  // namespace aq::train
