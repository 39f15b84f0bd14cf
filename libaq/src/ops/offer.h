// Internal: a result one kernel computed on its way through a tensor, for
// the next step that would otherwise read the tensor again for it (a
// BatchNorm's backward offers the per-sample squared norms of the gradient
// it wrote to the layer before it; its forward offers its input's group
// ranges to the allocation).  One tensor at a time per kind and thread.  The
// tensor is held weakly (its TensorImpl cannot be reused while held) with
// its version, so a tensor freed, replaced or changed in place since does
// not match.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <utility>

namespace aq {

class TensorOffer {
 public:
  // value, computed from t as it is now; tag tells how (a group size, ...).
  void offer(const at::Tensor& t, at::Tensor value, int64_t tag = 0) {
    held_.emplace(t.getIntrusivePtr());
    version_ = t._version();
    value_ = std::move(value);
    tag_ = tag;
  }
  // The value offered for exactly t and tag, else undefined; either way the
  // offer is gone.
  at::Tensor take(const at::Tensor& t, int64_t tag = 0) {
    std::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> held;
    held.swap(held_);
    at::Tensor value = std::move(value_);
    value_ = at::Tensor();
    if (!held || !value.defined() || !t.defined() || tag != tag_) return at::Tensor();
    const auto impl = held->lock();
    if (!impl.defined() || impl.get() != t.unsafeGetTensorImpl() || t._version() != version_) return at::Tensor();
    return value;
  }

 private:
  std::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> held_;
  int64_t version_ = 0, tag_ = 0;
  at::Tensor value_;
};

// Per-sample squared norms [N] of a gradient (BatchNorm backward -> the
// conv or linear layer before it).
TensorOffer& grad_sq_offer();
// Squared group ranges of a layer input as [N, K] parts whose rows sum to
// each sample's ||R_n||^2 (K = its groups, or a LayerNorm's rows' scaled
// ranges), or those sums [N]; tag = group size (BatchNorm forward -> the
// allocation).
TensorOffer& group_range_offer();

// Squared group ranges of the rows of v ([R, D], groups of G along a row,
// the last one shorter), float: one per group [R, K] where `parts` and a
// range kernel gives them, else each row's sum [R].  One pass over v where
// a kernel takes it.
at::Tensor squared_group_ranges(const at::Tensor& v, int64_t G, bool parts);

}  // namespace aq
