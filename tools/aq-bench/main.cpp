// aq-bench: measured numbers for aq: compression kernels, training-step memory and time.
// TSV on stdout, one line per measurement; logs on stderr.  What is measured
// and how lives in the library (aq/bench.h); this file has the options and
// the output format.
#include "aq/bench.h"
#include "aq/cli.h"
#include "aq/loss.h"
#include "aq/log.h"
#include "aq/models.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

namespace {

namespace bench = aq::bench;
using aq::cli::OptionTable;

constexpr double MB = 1048576.0;

// A TSV written beside stdout (--profile, --ops): FILE, or stderr for "-",
// its header first; finish() reports whatever did not reach the file.
class SideTsv {
 public:
  SideTsv(const std::string& path, const char* header) : path_(path) {
    if (path.empty()) return;
    f_ = path == "-" ? stderr : std::fopen(path.c_str(), "w");
    if (!f_) throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
    std::fputs(header, f_);
  }
  ~SideTsv() {
    if (f_ && f_ != stderr) std::fclose(f_);
  }
  SideTsv(const SideTsv&) = delete;
  SideTsv& operator=(const SideTsv&) = delete;
  std::FILE* get() const { return f_; }
  void finish() {
    std::FILE* f = f_;
    f_ = nullptr;
    if (f && f != stderr && std::fclose(f) != 0)
      throw std::runtime_error("cannot write " + path_ + ": " + std::strerror(errno));
  }

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

class Kernels {
 public:
  explicit Kernels(CLI::App& app)
      : sub_(app.add_subcommand("kernels",
                                "Compress/decompress throughput against the device's copy bandwidth, same run")),
        table_(*sub_, /*tool=*/0) {  // no model: the common options only
    auto& k = *sub_;
    auto& o = options_;
    k.add_option("--sizes", o.sizes, "Input sizes in bytes (K, M, G suffixes)")->delimiter(',')->capture_default_str();
    k.add_option("--dtypes", o.dtypes, "Input dtypes: fp32, bf16, fp16")->delimiter(',')->capture_default_str();
    k.add_option("--bits", o.bits, "Bits per element, 1..8")
        ->delimiter(',')
        ->check(CLI::Range(1, 8))
        ->capture_default_str();
    k.add_option("--group-size", o.group_size, "Elements per quantization group (power of two, 32 .. 2^20)")
        ->capture_default_str();
    k.add_option("--samples", o.samples, "Samples (first dimension) of the input")
        ->check(aq::cli::Positive)
        ->capture_default_str();
    k.add_option("--reps", o.reps, "Timed batches, median reported (0: 5 on CUDA, 3 on CPU)")
        ->check(aq::cli::NonNegative);
    k.add_option("--inner", o.inner, "Calls per timed batch (0: 10 on CUDA, 1 on CPU)")->check(aq::cli::NonNegative);
  }
  bool parsed() const { return sub_->parsed(); }

  int run() {
    const auto dev = table_.apply_common();
    const std::string d = dev.str();
    bench::bench_kernels(
        options_, dev,
        {[] {
           std::printf("device\tdtype\tinput_bytes\tbits\top\tmedian_ms\tGB_per_s\tcopy_GB_per_s\tratio_to_copy"
                       "\tpacked_bytes\n");
         },
         [&](const bench::KernelRow& r) {
           std::printf("%s\t%s\t%lld\t%d\t%s\t%.4f\t%.3f\t%.3f\t%.4f\t%lld\n", d.c_str(), r.dtype.c_str(),
                       static_cast<long long>(r.input_bytes), r.bits, r.op.c_str(), r.seconds * 1e3,
                       r.bytes_per_s / 1e9, r.copy_bytes_per_s / 1e9, r.bytes_per_s / r.copy_bytes_per_s,
                       static_cast<long long>(r.packed_bytes));
           std::fflush(stdout);
         }});
    return aq::cli::kOk;
  }

 private:
  CLI::App* sub_;
  OptionTable table_;
  bench::KernelOptions options_;
};

// A subcommand over a model: the option table's shared options, defaulted
// from the library's options for this benchmark, and the model options only
// aq-bench has.
class ModelCommand {
 public:
  ModelCommand(CLI::App& app, const std::string& name, const std::string& what, bench::ModelOptions& options,
               std::optional<int64_t> batch_size = std::nullopt)
      : sub_(app.add_subcommand(name, what)), options_(options), micro_batch_mb_(options.micro_batch_bytes >> 20) {
    aq::cli::Values v;
    v.arch = options.arch;
    v.data.num_classes = options.classes;
    v.data.image_size = options.image_size;
    if (batch_size) v.data.batch_size = *batch_size;
    v.amp = aq::train::to_string(options.amp);
    table_ = std::make_unique<OptionTable>(*sub_, batch_size ? aq::cli::kBench : aq::cli::kBenchMaxBatch, v);
    const std::string g = "Data and model";
    sub_->add_option("--channels", options.channels, "Input channels")
        ->check(aq::cli::Positive)
        ->capture_default_str()
        ->group(g);
    sub_->add_option("--levels", options.levels, "Levels besides the exact model: L0, L1, L2, L3, L3.1, L4, L5, and ckpt (the exact "
                     "model with every block recomputed in backward)")
        ->delimiter(',')
        ->capture_default_str()
        ->group(g);
    sub_->add_option("--micro-batch-mb", micro_batch_mb_,
                     "Restored input per backward micro-batch, MiB (L3.1, L4, L5)")
        ->check(aq::cli::Positive)
        ->capture_default_str()
        ->group(g);
    sub_->add_option("--attention-bits", options.attention_bits,
                     "Self-attention's q, k, v at these bits, uniform, 0..8, at every level (0: as every layer; "
                     "default: the level's)")
        ->group(g);
    sub_->add_option("--cabits", options.cabits,
                     "Average bits per activation element at every level, 1..8, as aq-train's --cabits (the "
                     "level's initial bits stay; default: the level's, on transformers 3 from L3 up)")
        ->check(CLI::Range(1, 8))
        ->group(g);
    sub_->add_option("--channels-last", channels_last_, "auto (on CUDA), True or False")
        ->capture_default_str()
        ->group(g);
  }
  CLI::App& app() { return *sub_; }
  bool parsed() const { return sub_->parsed(); }

  // After parsing: the common options applied and the device; the table's
  // values in the options.
  c10::Device apply() {
    const auto dev = table_->apply_common();
    const auto& v = table_->values;
    options_.arch = v.arch;
    options_.classes = v.data.num_classes;
    options_.image_size = v.data.image_size;
    options_.context = v.data.context;
    const aq::models::ModelOptions shape = table_->shape();
    aq::models::check_options(v.arch, shape);
    options_.layers = v.layers, options_.width = v.width, options_.heads = v.heads, options_.dropout = v.dropout;
    options_.class_token = shape.class_token;
    // Token models: the vocabulary is bytes unless --classes says otherwise,
    // and the output's image column holds the sequence length.
    if (aq::train::takes_tokens(options_.arch)) {
      if (sub_->count("--classes") == 0) options_.classes = 256;
      options_.image_size = options_.context;
    }
    options_.amp = table_->amp();
    options_.micro_batch_bytes = micro_batch_mb_ << 20;
    if (channels_last_ != "auto") options_.channels_last = aq::parse_bool(channels_last_);
    return dev;
  }
  int64_t batch_size() const { return table_->values.data.batch_size; }
  // --amp as given, for the output's amp column.
  const std::string& amp() const { return table_->values.amp; }

 private:
  CLI::App* sub_;
  bench::ModelOptions& options_;
  std::unique_ptr<OptionTable> table_;
  int64_t micro_batch_mb_;
  std::string channels_last_ = "auto";
};

class Memory {
 public:
  explicit Memory(CLI::App& app)
      : cmd_(app, "memory", "Activation and peak memory of a training step: exact model and each level", options_,
             options_.batch_size) {
    cmd_.app().add_option("--ops", ops_path_,
                          "Write each operation's memory (before it, peak while it ran, after; forward and "
                          "backward) as TSV to FILE (-: stderr)");
  }
  bool parsed() const { return cmd_.parsed(); }

  int run() {
    const auto dev = cmd_.apply();
    options_.batch_size = cmd_.batch_size();
    options_.trace_ops = !ops_path_.empty();
    std::optional<SideTsv> ops;
    bench::bench_memory(options_, dev,
                        {[&] {
                           ops.emplace(ops_path_, "level\tseq\tpass\top\tbefore_MB\tpeak_MB\tafter_MB\n");
                           std::printf("device\tarch\tbatch\timage\tamp\tlevel\tact_MB\tpeak_MB\taq_saved_MB"
                                       "\tact_ratio\tpeak_ratio\tstep_ms\n");
                         },
                         [&](const bench::MemoryRow& r) { print(dev, r, ops->get()); }});
    ops->finish();
    return aq::cli::kOk;
  }

 private:
  void print(const c10::Device& dev, const bench::MemoryRow& r, std::FILE* ops_out) const {
    const std::string what = fmt::format("{}\t{}\t{}\t{}\t{}\t{}", dev.str(), options_.arch, options_.batch_size,
                                         options_.image_size, cmd_.amp(), r.level);
    if (!r.fits) {
      std::printf("%s\tNA\tNA\tNA\tNA\tNA\tNA\n", what.c_str());
      std::fflush(stdout);
      return;
    }
    const auto& m = r.memory;
    if (ops_out) {
      size_t top = 0;
      for (size_t i = 0; i < m.ops.size(); ++i) {
        const auto& op = m.ops[i];
        std::fprintf(ops_out, "%s\t%zu\t%s\t%s\t%.2f\t%.2f\t%.2f\n", r.level.c_str(), i,
                     op.backward ? "backward" : "forward", op.name.c_str(), op.before / MB, op.peak / MB,
                     op.after / MB);
        if (op.peak > m.ops[top].peak) top = i;
      }
      if (!m.ops.empty())
        aq::log().info("{}: the step's peak, {:.1f} MB, is in {} ({} #{}, {:.1f} MB allocated before it)", r.level,
                       m.ops[top].peak / MB, m.ops[top].name, m.ops[top].backward ? "backward" : "forward", top,
                       m.ops[top].before / MB);
    }
    const auto ratio = [](const std::optional<double>& v) {
      return v ? fmt::format("{:.2f}", *v) : std::string("NA");
    };
    std::printf("%s\t%.2f\t%.2f\t%.2f\t%s\t%s\t%.1f\n", what.c_str(), m.activations / MB, m.peak / MB,
                m.aq_saved / MB, ratio(r.act_ratio).c_str(), ratio(r.peak_ratio).c_str(), m.seconds * 1e3);
    std::fflush(stdout);
  }

  bench::MemoryOptions options_;
  ModelCommand cmd_;
  std::string ops_path_;  // per-operation memory TSV (-: stderr)
};

class Step {
 public:
  explicit Step(CLI::App& app)
      : cmd_(app, "step", "Training-step time and memory: exact model and each level, same process", options_,
             options_.batch_size) {
    auto& st = cmd_.app();
    st.add_option("--steps", options_.steps, "Timed steps, median reported (0: 20 on CUDA, 3 on CPU)")
        ->check(aq::cli::NonNegative);
    st.add_option("--warmup", options_.warmup, "Untimed steps first")
        ->check(aq::cli::NonNegative)
        ->capture_default_str();
    st.add_option("--profile-steps", options_.profile_steps,
                  "Steps run under the profiler after the timed ones, for the breakdown columns (0: none)")
        ->check(aq::cli::NonNegative)
        ->capture_default_str();
    st.add_option("--profile", profile_path_,
                  "Write the per-scope and per-kernel breakdown as TSV to FILE (-: stderr)");
    st.add_option("--trace", options_.trace_dir, "Write each level's profiler trace (Chrome JSON) into this folder")
        ->check(CLI::ExistingDirectory);
    st.add_option("--cuda-graphs", options_.cuda_graphs,
                  "Each model eagerly and as a CUDA graph (both: on CUDA), or only off or on")
        ->check(CLI::IsMember({"both", "off", "on"}))
        ->capture_default_str();
    st.add_option("--graph-refresh", options_.graph_refresh,
                  "Steps between captures of an adaptive level's graph (its per-layer reallocation)")
        ->check(aq::cli::Positive)
        ->capture_default_str();
  }
  bool parsed() const { return cmd_.parsed(); }

  int run() {
    const auto dev = cmd_.apply();
    options_.batch_size = cmd_.batch_size();
    std::optional<SideTsv> prof;
    bench::bench_step(options_, dev,
                      {[&] {
                         prof.emplace(profile_path_, "level\tkind\tname\tcalls_per_step\tms_per_step\tshare_of_step\n");
                         std::printf("device\tarch\tbatch\timage\tamp\tlevel\tmedian_ms\timg_per_s\tact_MB\tpeak_MB"
                                     "\tspeed_ratio\tact_ratio\tpeak_ratio\tsyncs_per_step\tdevice_busy\tcompress_ms"
                                     "\tdecompress_ms\talloc_ms\talloc_share\tgraph\tcapture_ms\n");
                       },
                       [&](const bench::StepRow& r) { print(dev, r, prof->get()); }});
    prof->finish();
    return aq::cli::kOk;
  }

 private:
  void print(const c10::Device& dev, const bench::StepRow& r, std::FILE* prof_out) const {
    const auto& br = r.breakdown;
    const double step_ms = r.seconds * 1e3;
    if (prof_out && br.ok)
      for (auto row : bench::breakdown_rows(br, step_ms)) {
        std::replace(row.name.begin(), row.name.end(), '\t', ' ');
        std::fprintf(prof_out, "%s\t%s\t%s\t%.2f\t%.3f\t%.4f\n", r.level.c_str(), row.kind.c_str(), row.name.c_str(),
                     row.calls_per_step, row.ms_per_step, row.share_of_step);
      }
    // The breakdown's columns read NA without a profile.
    auto na = [&](int decimals, double v) { return br.ok ? fmt::format("{:.{}f}", v, decimals) : std::string("NA"); };
    std::printf("%s\t%s\t%lld\t%lld\t%s\t%s\t%.2f\t%.1f\t%.2f\t%.2f\t%.3f\t%.2f\t%.2f\t%.1f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
                dev.str().c_str(), options_.arch.c_str(), static_cast<long long>(options_.batch_size),
                static_cast<long long>(options_.image_size), cmd_.amp().c_str(), r.level.c_str(), step_ms,
                r.images_per_s, r.activations / MB, r.peak / MB, r.speed_ratio, r.act_ratio, r.peak_ratio,
                r.syncs_per_step, na(3, br.device_ms / step_ms).c_str(),
                na(3, br.scope_ms("aq::compress")).c_str(), na(3, br.scope_ms("aq::decompress")).c_str(),
                na(3, br.scope_ms("aq::allocate")).c_str(),
                na(4, br.scope_ms("aq::allocate") / step_ms).c_str(), r.graph.c_str(),
                r.graph == "off" ? "NA" : fmt::format("{:.2f}", r.capture_ms).c_str());
    std::fflush(stdout);
  }

  bench::StepBenchOptions options_;
  ModelCommand cmd_;
  std::string profile_path_;
};

class MaxBatch {
 public:
  explicit MaxBatch(CLI::App& app)
      : cmd_(app, "max-batch", "Largest batch whose training step fits: exact model and each level", options_) {
    auto& mx = cmd_.app();
    mx.add_option("--start", options_.start, "First batch tried (then doubled)")
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 22))
        ->capture_default_str();
    mx.add_option("--limit-mb", limit_mb_, "Also require the step's peak within this many MiB (required on the CPU)")
        ->check(aq::cli::NonNegative)
        ->capture_default_str();
    mx.add_option("--steps", options_.steps,
                  "Training steps per trial, each trial from a fresh model; a batch fits when all of them do")
        ->check(CLI::Range(1, 1000))
        ->capture_default_str();
    mx.add_option("--resolution", options_.resolution,
                  "Stop bisecting once the largest batch that fits and the smallest that does not are this close")
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 22))
        ->capture_default_str();
  }
  bool parsed() const { return cmd_.parsed(); }

  int run() {
    const auto dev = cmd_.apply();
    options_.limit_bytes = limit_mb_ << 20;
    bench::bench_max_batch(options_, dev,
                           {[] { std::printf("device\tarch\timage\tamp\tlevel\tmax_batch\tratio\ttrials\n"); },
                            [&](const bench::MaxBatchRow& r) {
                              std::printf("%s\t%s\t%lld\t%s\t%s\t%lld\t%.2f\t%d\n", dev.str().c_str(),
                                          options_.arch.c_str(), static_cast<long long>(options_.image_size),
                                          cmd_.amp().c_str(), r.level.c_str(), static_cast<long long>(r.max_batch),
                                          r.ratio, r.trials);
                              std::fflush(stdout);
                            }});
    return aq::cli::kOk;
  }

 private:
  bench::MaxBatchOptions options_;
  ModelCommand cmd_;
  int64_t limit_mb_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"aq-bench: measure aq's compression kernels and training steps; TSV on stdout", "aq-bench"};
  app.set_version_flag("--version", AQ_VERSION_STRING);
  app.require_subcommand(1);
  Kernels kernels(app);
  Memory memory(app);
  Step step(app);
  MaxBatch max_batch(app);
  return aq::cli::run(app, argc, argv, [&] {
    if (kernels.parsed()) return kernels.run();
    if (memory.parsed()) return memory.run();
    if (step.parsed()) return step.run();
    if (max_batch.parsed()) return max_batch.run();
    return static_cast<int>(aq::cli::kUsage);
  });
}
