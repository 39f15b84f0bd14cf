// What aq-train does differently when a launcher started several ranks
// (docs/distributed.md): the group, the gradient reducer hooked into the
// step, the model made rank 0's, figures summed over the ranks.
#pragma once

#include "aq/checkpoint.h"
#include "aq/dist.h"
#include "aq/evaluate.h"
#include "aq/models.h"
#include "aq/step.h"

#include <torch/optim/sgd.h>

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace aq::train::detail {

class DataParallel {
 public:
  // The launcher's group, or null when no launcher's variables are set.
  // A CUDA `device` becomes cuda:LOCAL_RANK.  Throws on a bad environment or
  // a rendezvous that fails within `timeout`.
  static std::unique_ptr<DataParallel> connect(c10::Device& device, std::chrono::milliseconds timeout);
  ~DataParallel();

  int64_t rank() const { return group_->rank(); }
  int64_t size() const { return group_->size(); }
  bool main() const { return rank() == 0; }
  dist::Group& group() { return *group_; }

  // Rank 0's parameters, buffers and momentum buffers on every rank.
  void make_equal(models::Model& model, torch::optim::Optimizer& opt);
  // Rank 0's buffers (running statistics) on every rank.
  void equal_buffers(models::Model& model);
  // The step's gradients averaged over the ranks while backward runs; its
  // adaptive statistics and per-layer budgets decided from every rank's.
  void hook(models::Model& model, StepOptions& options);
  // The first entry of an adaptive state (aq/adaptive.h) in which some rank
  // differs from rank 0 (compared by size and sum, NaN equal to NaN); ""
  // when all agree.  A collective.
  std::string differing(const std::vector<std::pair<std::string, at::Tensor>>& adaptive_state);
  // The largest of the ranks' values (stop signals): every rank the same.
  int agree(int value);
  // Sums over the ranks, in place (CPU doubles).
  void sum(std::vector<double>& values);
  // An evaluation's totals summed over the ranks, its figures from them.
  EvalResult reduce(const EvalResult& mine);
  // Each rank's generator states in a checkpoint under "<key>.rank<r>"
  // (rank 0's stay under "cpu"/"cuda"); the entries are rank 0's only.
  void gather_rng(ckpt::Checkpoint& c, const c10::Device& device);
  // This rank's generators from the checkpoint when it holds them (a run of
  // the same world size), else seeded from (seed, rank, step).
  void restore_rng(const ckpt::Checkpoint* c, const c10::Device& device, uint64_t seed, int64_t step);

 private:
  explicit DataParallel(std::shared_ptr<dist::Group> g) : group_(std::move(g)) {}
  std::shared_ptr<dist::Group> group_;
  std::unique_ptr<dist::GradientReducer> reducer_;
};

}  // namespace aq::train::detail
