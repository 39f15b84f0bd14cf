// What aq-bench measures, as data: compression-kernel throughput, one
// training step's memory, training-step time with a profiler breakdown of
// where the device's time goes, and the largest batch that trains.  Every
// training step here is aq::train::Step, the step aq-train runs, so that a
// benchmark measures what training does.  Each bench_* function checks its
// options, calls `start` (where a tool prints its header, so that a usage
// error leaves its output empty), then hands each row to `row` as soon as it
// is measured, and returns them all.
#pragma once

#include "aq/config.h"
#include "aq/memory.h"
#include "aq/models.h"
#include "aq/step.h"

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace aq::bench {

template <typename Row>
struct Report {
  std::function<void()> start;          // options checked, nothing measured yet
  std::function<void(const Row&)> row;  // each row once measured
};

// ---- Compression kernels -------------------------------------------------

struct KernelOptions {
  std::vector<std::string> sizes = {"256M", "1G"};  // bytes, K/M/G suffixes (binary)
  std::vector<std::string> dtypes = {"fp32", "bf16"};  // fp32, bf16, fp16
  std::vector<int> bits = {2, 4};
  int64_t group_size = 256;
  int64_t samples = 256;  // first dimension of each input
  int reps = 0;           // timed batches, median kept; 0: 5 on CUDA, 3 on CPU
  int inner = 0;          // calls per timed batch; 0: 10 on CUDA, 1 on CPU
};

// One op at one size, dtype and bit width, with the device's own copy of the
// same input timed in the same run.
struct KernelRow {
  std::string dtype;  // as given in KernelOptions::dtypes
  int64_t input_bytes = 0;
  int bits = 0;
  std::string op;                 // compress or decompress
  double seconds = 0;             // median per call
  double bytes_per_s = 0;         // input bytes per second
  double copy_bytes_per_s = 0;    // the copy's bytes read + written per second
  int64_t packed_bytes = 0;       // what the compressed tensor holds
};

// Every size and dtype is parsed before `start` (std::invalid_argument).
std::vector<KernelRow> bench_kernels(const KernelOptions& options, const c10::Device& device,
                                     const Report<KernelRow>& report = {});

// ---- Models --------------------------------------------------------------

// The model the step benchmarks measure, its input, and the levels compared
// with the exact model.
struct ModelOptions {
  std::string arch = "resnet50";
  int64_t image_size = 224, channels = 3, classes = 1000;
  // Token models (gpt_*, aq/loss.h's takes_tokens): random tokens of this
  // many per sample, `classes` the vocabulary; image_size and channels unused.
  int64_t context = 1024;
  // Transformers' shape (models::ModelOptions; 0: the architecture's own).
  int64_t layers = 0, width = 0, heads = 0;
  double dropout = 0;
  bool class_token = true;  // ViTs: false classifies the mean of the patch tokens
  // Besides the exact model: L0 .. L5, and ckpt (the exact model with every
  // block recomputed in backward: activation checkpointing, aq/recompute.h).
  std::vector<std::string> levels;
  train::Amp amp = train::Amp::kOff;
  int64_t micro_batch_bytes = QuantConfig().micro_batch_bytes;  // L3.1, L4, L5
  std::optional<int> attention_bits;  // QuantConfig::attention_bits of every level; unset: the level's
  std::optional<int> cabits;  // QuantConfig::cabits of every level, as aq-train's --cabits; unset: the level's
  std::optional<bool> channels_last;  // unset: on CUDA, as a CNN is run on a GPU
};

bool channels_last(const ModelOptions& options, const c10::Device& device);

struct NamedConfig {
  std::string name;  // exact, ckpt, or the level's name
  QuantConfig config;
  bool recompute_blocks = false;  // ckpt
};
// The exact model first (the baseline of every ratio), then each level in
// the order given; throws std::invalid_argument for an unknown level.
std::vector<NamedConfig> exact_and_levels(const ModelOptions& options);

// The model every benchmark measures for one configuration: built from seed
// 0 (so that every level starts from the same weights), on `device`,
// channels-last where asked, in training mode.
models::ModelPtr bench_model(const ModelOptions& options, const NamedConfig& config, const c10::Device& device);

// Runs f and says whether it fit in device memory: false when it ran out
// (LibTorch's error, or cuBLAS's and cuDNN's own allocation failures, which
// they report as errors of their own), with the error's first line logged
// at debug level; other errors propagate.  The device's cached blocks are
// given back either way, so that the next try starts from free memory.
bool fits_in_memory(const c10::Device& device, const std::function<void()>& f);

// ---- One step's memory ---------------------------------------------------

// activations: bytes the forward and loss left allocated for backward;
// peak: the allocator's peak over the step above what was allocated before
// it; aq_saved: what aq's layers report keeping; seconds: the step's time.
struct StepMemory {
  int64_t activations = 0, peak = 0, aq_saved = 0;
  double seconds = 0;
  std::vector<OpMemory> ops;  // with trace_ops: the measured step's operations, relative to its start
};
// A warm-up step (cuDNN plans, allocator caches, gradient buffers), then a
// measured one, both train::Step with `options` (no optimizer: its state
// would count as the step's).  Gradients are freed before each step, so that
// the peak counts the ones backward makes.
StepMemory measure_step(models::Model& model, const torch::Tensor& images, const torch::Tensor& labels,
                        const torch::Tensor& indices, const c10::Device& device, train::StepOptions options,
                        bool trace_ops = false);

struct MemoryOptions : ModelOptions {
  int64_t batch_size = 32;
  bool trace_ops = false;  // MemoryRow::memory.ops
  MemoryOptions() { levels = {"L1", "L2", "L3", "L3.1"}; }
};
struct MemoryRow {
  std::string level;
  bool fits = false;  // false: out of device memory, no figures
  StepMemory memory;
  // The exact model's figures over this row's; unset when the exact model
  // did not fit.
  std::optional<double> act_ratio, peak_ratio;
};
// The exact model, then each level, one measure_step each on one random
// batch (samples 0..N-1); a model that does not fit gets a row without
// figures and the others are still measured (a batch too large for the
// exact model is what the levels are for).
std::vector<MemoryRow> bench_memory(const MemoryOptions& options, const c10::Device& device,
                                    const Report<MemoryRow>& report = {});

// ---- Step time and its breakdown -----------------------------------------

// Counts the synchronising CUDA calls LibTorch makes between start() and
// stop(): its sync debug mode reports each as a warning, which this handler
// counts instead of passing on.  Warnings from autograd's device threads are
// replayed on the thread that called backward(), so backward is counted too.
// On the CPU (cuda false) it counts nothing.
class SyncCounter : public c10::WarningHandler {
 public:
  explicit SyncCounter(bool cuda);
  ~SyncCounter() override;
  SyncCounter(const SyncCounter&) = delete;
  SyncCounter& operator=(const SyncCounter&) = delete;
  void start();
  void stop();
  void process(const c10::Warning& w) override;
  int64_t count = 0;

 private:
  bool cuda_;
  c10::WarningHandler* prev_;
};

// Where a step's device time goes, from LibTorch's (Kineto) profiler: each
// device activity (a CUDA kernel, copy or fill; on the CPU, each outermost
// operator) is charged to the innermost aq:: scope around the call that
// launched it (aq::compress, aq::decompress, aq::allocate, aq::statistics,
// aq::mask, ...) or to "torch" (LibTorch's own layers, loss and optimizer).
struct Breakdown {
  struct Item {
    double ms = 0;  // per step
    int64_t calls = 0;  // over all profiled steps
  };
  bool ok = false;  // false: not profiled (no steps, or the profiler is unavailable)
  int steps = 0;
  double device_ms = 0;                 // all device activity, per step
  std::map<std::string, Item> scopes;   // device time per scope
  std::map<std::string, Item> kernels;  // device time per kernel name
  std::map<std::string, double> host;   // host ms per step inside outermost aq:: scopes
  double scope_ms(const std::string& scope) const;
};
// Runs `step` `steps` times under the profiler; with trace_path, also saves
// the profiler's Chrome trace there.
Breakdown profile_steps(const c10::Device& device, int steps, const std::function<void()>& step,
                        const std::string& trace_path = "");

// The breakdown as rows: all device time, then each scope, the host time in
// each outermost aq:: scope, and the `top` largest kernels.
struct BreakdownRow {
  std::string kind;  // all, scope, host, kernel
  std::string name;
  double calls_per_step = 0, ms_per_step = 0, share_of_step = 0;
};
std::vector<BreakdownRow> breakdown_rows(const Breakdown& breakdown, double step_ms, size_t top = 25);

struct StepBenchOptions : ModelOptions {
  int64_t batch_size = 64;
  int steps = 0;  // timed, median kept; 0: 20 on CUDA, 3 on CPU
  int warmup = 3;
  int profile_steps = 3;  // after the timed ones, for the breakdown (0: none)
  std::string trace_dir;  // each level's profiler trace as DIR/LEVEL.json
  // Each model eagerly and/or as a CUDA graph (train::StepOptions::cuda_graphs):
  // "both" (CUDA; eager alone on the CPU), "off" or "on" (CUDA only).
  std::string cuda_graphs = "both";
  int64_t graph_refresh = 200;
  StepBenchOptions() { levels = {"L3"}; }
};
struct StepRow {
  std::string level;
  double seconds = 0;        // median step time
  double images_per_s = 0;
  int64_t activations = 0;   // the first timed step's
  double peak = 0;           // bytes, over the timed steps above what was allocated before them
  std::string graph = "off";  // on: replayed as a CUDA graph; fallback: asked for, not possible (the log says why)
  double capture_ms = 0;     // graph: the step that captured it (reallocation, capture, replay)
  double speed_ratio = 0;    // images/s over the exact model's, eager
  double act_ratio = 0, peak_ratio = 0;  // the exact model's over this row's
  double syncs_per_step = 0;  // 0 on the CPU
  Breakdown breakdown;
};
// Training-step time and memory: the exact model, then each level, on one
// synthetic batch (samples 0..N-1), as a user would run them: SGD with
// momentum, cuDNN autotuning (switched on for the process) and channels-last
// on CUDA, adaptive levels reallocating bits after each step (as CUDA
// graphs: at each capture); each eagerly and replayed as a CUDA graph, ratios
// to the eager exact model from the same process.
std::vector<StepRow> bench_step(const StepBenchOptions& options, const c10::Device& device,
                                const Report<StepRow>& report = {});

// ---- Largest batch -------------------------------------------------------

struct MaxBatchOptions : ModelOptions {
  int64_t start = 16;       // first batch tried, then doubled
  int64_t limit_bytes = 0;  // also require each step's peak within this (0: none; required on the CPU)
  int64_t resolution = 1;   // stop bisecting once fits and fails are this close
  int steps = 3;  // per trial: adaptive levels' third step runs on the budgets the first set (they apply a step late)
  MaxBatchOptions() { levels = {"L3", "L5"}; }
};
struct MaxBatchRow {
  std::string level;
  int64_t max_batch = 0;  // 0: not even batch 1 fits
  double ratio = 0;       // over the exact model's (0 when that is 0)
  int trials = 0;         // batches tried in the search
};
// Largest batch whose training steps (forward, backward, SGD step) fit: the
// exact model and each level; doubling from `start`, then bisection.  Each
// trial starts from a fresh model and runs `steps` steps, so that what it
// finds does not depend on the trials before it (adaptive levels move bits
// between layers after every step, which moves the peak).  On CUDA "fits"
// means no out-of-memory error (and, with a limit, a peak within it); on
// the CPU the limit is required (std::invalid_argument without it).
std::vector<MaxBatchRow> bench_max_batch(const MaxBatchOptions& options, const c10::Device& device,
                                         const Report<MaxBatchRow>& report = {});

}  // namespace aq::bench
