// Evaluation on a test split, and models from checkpoints.
#pragma once

#include "aq/checkpoint.h"
#include "aq/config.h"
#include "aq/data.h"
#include "aq/models.h"
#include "aq/step.h"

#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace aq::train {

struct EvalResult {
  double loss = 0, top1 = 0, top5 = 0;  // mean loss, accuracies in percent (token models: per token)
  int64_t images = 0;                   // samples
  int64_t tokens = 0;                   // token models: the targets scored; else 0
  double loss_sum = 0;                  // the totals the figures come from
  int64_t correct1 = 0, correct5 = 0;
  bool stopped = false;  // `stop` said so before the last batch: the figures are partial
};
// Evaluates `model` (eval mode, no gradients, the step's autocast) on the
// loader's epoch 0; `max_batches` 0: all.  `stop`, if given, is asked before
// each batch (a signal that must not wait for a whole test set);
// `progress(done, batches)`, if given, is called after each batch.
EvalResult evaluate(models::Model& model, data::Loader& loader, const c10::Device& device, Amp amp,
                    int64_t max_batches = 0, const std::function<bool()>& stop = {},
                    const std::function<void(int64_t done, int64_t batches)>& progress = {});

namespace detail {
class DataParallel;
}

// Ranks that evaluate together, as a launcher started them (torchrun's or
// srun's variables, docs/distributed.md): each evaluates its shard of the
// test set (data::LoaderOptions::shards, shard) and the totals are summed.
class EvalRanks {
 public:
  // Null when no launcher's variables are set.  A CUDA `device` becomes
  // cuda:LOCAL_RANK.  Throws on a bad environment or a rendezvous that
  // fails within `timeout`.
  static std::unique_ptr<EvalRanks> connect(c10::Device& device, std::chrono::milliseconds timeout);
  ~EvalRanks();
  int64_t rank() const;
  int64_t size() const;
  // Every rank's totals summed, the figures from them.  Every rank calls it
  // once per evaluation, `failed` where its own part failed: then it throws
  // std::runtime_error on every rank.
  EvalResult reduce(const EvalResult& mine, bool failed);

 private:
  explicit EvalRanks(std::unique_ptr<detail::DataParallel> dp);
  std::unique_ptr<detail::DataParallel> dp_;
};

// The model a checkpoint describes (arch, in_channels, num_classes from its
// metadata), with its parameters and buffers, converted by `config`.
// Throws std::runtime_error naming `source` and what does not match.
models::ModelPtr model_from_checkpoint(const ckpt::Checkpoint& c, const std::string& source,
                                       const QuantConfig& config);

// What is wrong with the first parameter or buffer of `c` that holds inf or
// NaN, or a batch-norm running variance that holds negative values, with
// its likely cause ("" if none).  model_from_checkpoint() warns about it; a
// resumed run refuses it.
std::string first_bad_values(const ckpt::Checkpoint& c);

// Copies a checkpoint's parameters and buffers into `model`: every name
// must be present with the same shape, and no name may be left over.
void load_state(models::Model& model, const ckpt::Checkpoint& c, const std::string& source);

}  // namespace aq::train
