// Training and evaluation, as aq-train and aq-eval run them: the seed's
// recipe (SGD with momentum, weight decay, label smoothing, LR schedules)
// over aq's models and datasets, HDF5 checkpoints, pre-emption handling and
// the memory figures of each epoch.
#pragma once

#include "aq/checkpoint.h"
#include "aq/config.h"
#include "aq/data.h"
#include "aq/models.h"

#include <c10/core/Device.h>
#include <torch/optim/sgd.h>

#include <cstdint>
#include <string>
#include <vector>

namespace aq::train {

enum class Amp { kOff, kBFloat16, kFloat16 };
Amp parse_amp(const std::string& s);  // off, bf16, fp16
std::string to_string(Amp a);

// Autocast on for a device's type while in scope (off: nothing changes);
// the previous state comes back, and the cast cache is cleared, on exit.
class AutocastScope {
 public:
  AutocastScope(const c10::Device& device, Amp amp);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType type_;
  bool on_, prev_enabled_ = false;
  c10::ScalarType prev_dtype_ = c10::kBFloat16;
};

// LibTorch's SGD (momentum, dampening, Nesterov, weight decay: the same
// options, the same state, so checkpoints do not change) with the update
// made by LibTorch's multi-tensor kernels (at::_foreach_*), as PyTorch's
// own SGD makes it by default: a few launches per step for all the
// parameters of a device and dtype instead of two or three per parameter.
// Gradients are not modified.
class SGD : public torch::optim::SGD {
 public:
  using torch::optim::SGD::SGD;
  torch::Tensor step(LossClosure closure = nullptr) override;
};

// Which dataset --dataset means: the seed runs CIFAR-100 as
// "--dataset cifar10 --num-classes 100" (and CIFAR-10 the other way round).
std::string resolve_dataset(const std::string& dataset, int64_t num_classes);

enum class Schedule { kOneCycle, kCosine, kStep, kConstant };
Schedule parse_schedule(const std::string& s);  // onecycle, cosine, step, constant
std::string to_string(Schedule s);

struct Options {
  // Data.
  std::string dataset = "fashion-mnist";
  std::string data_dir;          // empty: data::default_root(dataset)
  int64_t num_classes = 0;       // 0: the dataset's
  int workers = 0;               // -j
  int64_t image_size = 224;      // imagenet, synthetic
  int64_t val_batches = 0;       // evaluate on the first N test batches; 0: all
  // Model and quantization.
  std::string arch = "preact_resnet20";
  QuantConfig quant;
  // Optimisation.
  int64_t epochs = 20;
  int64_t batch_size = 128;
  double lr = 0.1, momentum = 0.9, weight_decay = 1e-4, label_smoothing = 0.0;
  bool nesterov = true;
  Schedule schedule = Schedule::kOneCycle;
  double warmup = 0;                 // epochs of linear warm-up (cosine, step, constant)
  std::vector<double> milestones;    // step schedule: epochs where lr drops 10x (default 50%, 75%)
  Amp amp = Amp::kOff;
  int64_t max_steps = 0;             // stop (with a checkpoint) after this many steps in all; 0: no limit
  // Run.
  std::string workspace = ".";
  std::string resume;                // checkpoint to continue from
  std::string calibration;           // aq-calibrate's file: adaptive statistics to start from
  bool gather_checkpoints = false;   // also keep checkpoint-<epoch>.h5
  bool evaluate = false;             // evaluate only
  c10::Device device{c10::kCPU};
  uint64_t seed = 0;
  bool seed_given = false;
  bool progress = true;              // progress bar on stderr when it is a terminal
  std::string command;               // recorded in checkpoints
};

// Trains (or evaluates) as Options say: TSV on stdout (a header, then one
// line per epoch), logs on stderr.  Returns the exit status: 0, or 128 +
// signal number after SIGINT/SIGTERM (the current step finishes and a
// checkpoint is written first).  Throws on bad input.
int run(const Options& options);

struct EvalResult {
  double loss = 0, top1 = 0, top5 = 0;  // mean loss, accuracies in percent
  int64_t images = 0;
};
// Evaluates `model` (eval mode, no gradients) on the loader's epoch 0;
// `max_batches` 0: all.
EvalResult evaluate(models::Model& model, data::Loader& loader, const c10::Device& device, Amp amp,
                    int64_t max_batches = 0);

// The model a checkpoint describes (arch, in_channels, num_classes from its
// metadata), with its parameters and buffers, converted by `config`.
// Throws std::runtime_error naming `source` and what does not match.
models::ModelPtr model_from_checkpoint(const ckpt::Checkpoint& c, const std::string& source,
                                       const QuantConfig& config);

// Copies a checkpoint's parameters and buffers into `model`: every name
// must be present with the same shape, and no name may be left over.
void load_state(models::Model& model, const ckpt::Checkpoint& c, const std::string& source);

// Memory held on a device: the CUDA caching allocator's statistics, or on
// the CPU those of a counting wrapper around LibTorch's CPU allocator
// (install_cpu_memory_counter(), called by run()).
struct Memory {
  int64_t allocated = 0, peak = 0;
};
void install_cpu_memory_counter();
Memory memory(const c10::Device& device);
void reset_peak(const c10::Device& device);

// Has LibTorch's CUDA caching allocator grow its segments in place
// (expandable_segments), unless PYTORCH_CUDA_ALLOC_CONF or
// PYTORCH_ALLOC_CONF already set that key (their other keys are kept).  At
// large batches, compressed activations and the activation-size tensors of
// backward are allocated and freed in turn, and fixed segments end up with
// gigabytes reserved in pieces too small for the next large tensor
// (H100, ResNet-50 fp32 at L3: the largest batch that trains goes from 4619
// to 5471; the exact model's stays at 966).  The tools call it for a CUDA
// device; a library user may too, before or after CUDA's first use (it
// applies to segments made from then on).  Returns whether expandable
// segments are on.
bool use_expandable_segments();

// Where a step's memory goes: each outermost operator, aq scope or
// autograd node (forward and backward, in the order they ran) with the
// memory allocated before it, the allocator's peak while it ran and what it
// left allocated.  Recorded between construction and destruction, through
// LibTorch's RecordFunction callbacks; one trace at a time.
struct OpMemory {
  std::string name;
  bool backward = false;
  int64_t before = 0, peak = 0, after = 0;
};
class OpMemoryTrace {
 public:
  explicit OpMemoryTrace(const c10::Device& device);
  ~OpMemoryTrace();
  OpMemoryTrace(const OpMemoryTrace&) = delete;
  OpMemoryTrace& operator=(const OpMemoryTrace&) = delete;
  std::vector<OpMemory> ops() const;

 private:
  uint64_t handle_ = 0;
};

// One training step's memory (and time) on `device`: a warm-up step, then
// a measured one.  activations: bytes the forward pass allocated and left for
// backward; peak: the allocator's peak over the step, above what was
// allocated before it; aq_saved: what aq's layers report keeping.
struct StepMemory {
  int64_t activations = 0, peak = 0, aq_saved = 0;
  double seconds = 0;
  std::vector<OpMemory> ops;  // with trace_ops: the measured step's operations
};
StepMemory measure_step(models::Model& model, const torch::Tensor& images, const torch::Tensor& labels,
                        const c10::Device& device, Amp amp, bool trace_ops = false);

}  // namespace aq::train
