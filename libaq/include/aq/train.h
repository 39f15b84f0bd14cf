// Training as aq-train runs it: ActNN's recipe (SGD with momentum, weight
// decay, label smoothing, LR schedules) over aq's models and datasets, the
// one training step (aq/step.h), HDF5 checkpoints, pre-emption handling and
// the memory figures of each epoch.
#pragma once

#include "aq/config.h"
#include "aq/data.h"
#include "aq/evaluate.h"
#include "aq/optim.h"
#include "aq/step.h"

#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace aq::train {

struct Options {
  data::DataOptions data;
  int64_t val_batches = 0;       // evaluate on the first N test batches; 0: all
  // Model and quantization.
  std::string arch = "preact_resnet20";
  // Transformers' shape (models::ModelOptions; 0: the architecture's own).
  int64_t layers = 0, width = 0, heads = 0;
  double dropout = 0;
  std::string pool = "cls";  // ViTs: cls or mean (models::ModelOptions::class_token)
  QuantConfig quant;
  // Optimisation.
  int64_t epochs = 20;
  double lr = 0.1, momentum = 0.9, weight_decay = 1e-4, label_smoothing = 0.0;
  bool nesterov = true;
  OptimizerKind optimizer = OptimizerKind::kSGD;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // AdamW
  double clip_grad_norm = 0;         // clip gradients to this global L2 norm; 0: no clipping
  Schedule schedule = Schedule::kOneCycle;
  double warmup = 0;                 // epochs of linear warm-up (cosine, step, constant)
  int64_t warmup_steps = 0;          // steps of linear warm-up, in place of `warmup` when > 0
  std::vector<double> milestones;    // step schedule: epochs where lr drops 10x (default 50%, 75%)
  Amp amp = Amp::kOff;
  int64_t max_steps = 0;             // stop (with a checkpoint) after this many steps in all; 0: no limit
  // Run.
  std::string workspace = ".";
  std::string resume;                // checkpoint to continue from; "auto": the workspace's, if any
  bool overwrite = false;            // a fresh run may replace the workspace's checkpoint and metrics
  int64_t checkpoint_interval = 0;   // also write the checkpoint every N steps; 0: at epoch ends only
  std::string calibration;           // aq-calibrate's file: adaptive statistics to start from
  // Starting weights (aq/weights.h: init_from): an aq checkpoint or a
  // safetensors file; not with a resume of a given checkpoint (with "auto",
  // used only when there is nothing to resume).  reset_head: the classifier
  // starts afresh (another class count).
  std::string init_from;
  bool reset_head = false;
  bool gather_checkpoints = false;   // also keep checkpoint-<epoch>.h5
  bool evaluate = false;             // evaluate only
  c10::Device device{c10::kCPU};
  uint64_t seed = 0;
  bool seed_given = false;
  // What aq-bench measures with, on by default on CUDA (unset: on CUDA).
  std::optional<bool> channels_last;    // parameters and batches in NHWC
  std::optional<bool> cudnn_benchmark;  // cuDNN autotuning of convolution algorithms
  std::optional<bool> cuda_graphs;      // the step captured and replayed (StepOptions::cuda_graphs)
  int64_t graph_refresh = 200;          // steps between captures of an adaptive model's graph
  bool progress = true;              // progress bar on stderr when it is a terminal
  int64_t log_interval = -1;         // a log line every N steps; 0: none; -1: 100 when stderr is no terminal, else none
  std::string command;               // recorded in checkpoints
  // Under torchrun or srun (aq/dist.h): seconds the rendezvous, and any
  // later collective, may take before the run fails.
  double dist_timeout = 600;
  // Settings given on the command line, by option name ("--batch-size",
  // "--epochs", "--lr", "--momentum", "--weight-decay", "--label-smoothing",
  // "--lr-schedule", "--warmup", "--warmup-steps", "--milestones", "--nesterov",
  // "--amp", "--optimizer", "--betas", "--eps", "--clip-grad-norm", "--context", "--layers",
  // "--width", "--heads", "--dropout", "--pool", and
  // "quantization" for any quantization flag).  With --resume the run keeps
  // the checkpoint's settings: one given here that differs is refused
  // (std::invalid_argument), except --epochs, which moves the end of the run
  // (and is logged).
  std::set<std::string> given;
};

// One epoch's figures (a row of aq-train's TSV and of the checkpoint's
// metrics history).  A text run's row is per token: loss and accuracy over
// the tokens, perplexity exp(loss), tokens per second, and its columns say
// so (train_ppl, val_ppl, val_acc, tok_per_s in place of val_top1, val_top5,
// img_per_s).
struct EpochRow {
  bool text = false;
  int64_t epoch = 0, step = 0;
  double lr = 0, train_loss = 0, train_acc = 0, val_loss = 0, val_top1 = 0, val_top5 = 0, img_per_s = 0;
  double act_mb = 0, peak_mb = 0;  // mean activation memory of a step, peak of the epoch
  static const std::vector<std::string>& columns(bool text = false);
  std::vector<double> values() const;  // in the order of columns(text)
  static EpochRow from_values(const std::vector<double>& values, bool text);
  std::string tsv() const;  // one line of values, as aq-train prints and metrics.tsv holds
};

// Where run() hands its results as they come (any may be empty).
struct Observer {
  std::function<void()> training;                   // setup done, the first step comes next
  std::function<void(const EpochRow&)> epoch;       // after each epoch's evaluation
  std::function<void(const std::string& checkpoint, const EvalResult&)> evaluated;  // --evaluate
};

// Trains (or evaluates) as Options say, logs on stderr, appends each epoch's
// row to metrics.tsv in the workspace (header once; a resumed run's file is
// rewritten from the checkpoint's history first).  A fresh run (no resume)
// throws std::invalid_argument when the workspace holds checkpoint.h5 or
// metrics.tsv, unless `overwrite`.  Returns the exit status: 0, or 128 +
// signal number after SIGINT, SIGTERM or SIGUSR1 (the current step finishes
// and a checkpoint is written first).  Throws on bad input.
int run(const Options& options, const Observer& observer);

}  // namespace aq::train
