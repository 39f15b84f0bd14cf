// The transformers of aq/models.h (internal to the models layer).
#pragma once

#include "aq/models.h"

namespace aq::models::detail {

// vit_tiny, vit_small, gpt_small; null for any other name.  Throws
// std::invalid_argument for options that do not fit.
ModelPtr build_transformer(const std::string& arch, int64_t in_channels, int64_t num_classes,
                           const ModelOptions& o);

ModelOptions resolved_shape(const std::string& arch, const ModelOptions& o);
// What build_transformer() would refuse in `o` (heads, dropout, and for a
// ViT with an image size set, a patch size that does not divide it);
// nothing for another architecture.
void check_transformer(const std::string& arch, const ModelOptions& o);
ModelOptions options_from_parameters(const std::string& arch,
                                     const std::vector<std::pair<std::string, torch::Tensor>>& parameters);

}  // namespace aq::models::detail
