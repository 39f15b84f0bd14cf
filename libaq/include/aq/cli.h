// What every aq tool shares: one table of the options several tools take
// (common, data, model, training, run and quantization options), so that
// each is spelt, checked, described and defaulted the same way everywhere;
// logging to stderr; and the one place where errors turn into a message and
// an exit status.
//
// Exit status, for every tool: 0 success, 1 runtime failure (bad input file,
// out of memory, ...), 2 usage error (unknown option, bad value).
#pragma once

#include "aq/config.h"
#include "aq/data.h"
#include "aq/models.h"
#include "aq/step.h"
#include "aq/variance.h"

#include <CLI/CLI.hpp>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <set>
#include <string>
#include <vector>

namespace aq::cli {

enum Exit : int { kOk = 0, kRuntime = 1, kUsage = 2 };

// CLI11's PositiveNumber and NonNegativeNumber (same names in --help),
// with errors that read "--epochs: must be positive, not -1" instead of
// CLI11's range message, which spells out DBL_MAX in full.
extern const CLI::Validator Positive;
extern const CLI::Validator NonNegative;

// The tools, as the option table knows them (0: the common options only).
enum Tool : unsigned {
  kTrain = 1u << 0,
  kEval = 1u << 1,
  kVariance = 1u << 2,
  kCalibrate = 1u << 3,
  kBench = 1u << 4,          // aq-bench memory and step
  kBenchMaxBatch = 1u << 5,  // aq-bench max-batch: searches for the batch size, takes none
};

// The quantization options in ActNN's spelling (-c, --ca, --cabits, --ibits,
// --pergroup, --perlayer, --usegradient) plus aq's (--level, --group-size,
// --range-dtype, --rounding).  After parsing, `resolve()` gives the
// configuration: the level's defaults with every flag given on the command
// line applied.
class QuantOptions {
 public:
  // ignored: accepted (ActNN's command lines) and not used.
  explicit QuantOptions(CLI::App& app, bool ignored = false);
  QuantConfig resolve() const;

 private:
  CLI::App& app_;
  std::string scope_ = "quantize", level_ = "L3", ca_, cabits_, ibits_, pergroup_, perlayer_,
              usegradient_, group_size_, attention_bits_, range_dtype_, rounding_;
};

// Configurations from text: one per line (or separated by ';'), in ActNN's
// spelling ("-c quantize --ca=True --cabits=2 ..."); blank lines and '#'
// comments are skipped.  Throws std::invalid_argument naming a bad line.
std::vector<QuantConfig> parse_configs(const std::string& text);

// Every option that more than one tool takes, with its value after parsing.
struct Values {
  // Common (every tool).
  std::string device = "auto";  // auto: cuda if a GPU is visible, else cpu
  int threads = 0;              // 0: LibTorch's default
  int verbosity = 0;            // -v raises, -q lowers
  uint64_t seed = 0;
  bool seed_given = false;
  // Data and model.
  data::DataOptions data;
  std::string arch = "preact_resnet20";
  std::string amp = "off";
  // Transformers' shape (models::ModelOptions; 0: the architecture's own).
  int64_t layers = 0, width = 0, heads = 0;
  double dropout = 0;
  std::string pool = "cls";  // ViTs: cls (the class token) or mean (of the patch tokens)
  // Training (aq-train; ActNN's data configuration, accepted by the others).
  int64_t epochs = 20;
  double lr = 0.1, momentum = 0.9, weight_decay = 1e-4, label_smoothing = 0.0;
  // Run.
  std::string workspace = ".", resume, resume2;
  bool gather_checkpoints = false, evaluate = false, training_only = false;
};

// Adds to `app` every shared option `tool` uses, each with its one name,
// check, help text and default (a tool may change a default in `values`
// before constructing the table); and, for the tools that take ActNN's
// command lines (aq-train, aq-eval, aq-variance, aq-calibrate), every
// option of ActNN's main.py that the tool does not use, accepted and
// ignored, so that the whole "<data config> <quantize config>" string works
// with each of them.
class OptionTable {
 public:
  OptionTable(CLI::App& app, unsigned tool, Values defaults = {});
  OptionTable(const OptionTable&) = delete;
  OptionTable& operator=(const OptionTable&) = delete;

  Values values;
  // After parsing: the log level, threads and seed applied; the device
  // (throws std::invalid_argument for an unknown or unavailable one).
  c10::Device apply_common() const;
  QuantConfig quant() const;  // the tool must take the quantization options
  train::Amp amp() const;
  // A transformer's shape from --layers, --width, --heads, --dropout and
  // --pool (the others at ModelOptions' defaults).
  models::ModelOptions shape() const;
  // Those of `names` the command line gave.
  std::set<std::string> given(std::initializer_list<const char*> names) const;
  // Those the command line gave of the options a --resume checkpoint
  // records of its model and data (--arch, --dataset, --context and the
  // shape's): what aq::variance and aq::calibrate check against it.
  std::set<std::string> given_model() const;

 private:
  template <typename T>
  CLI::Option* add(unsigned users, bool actnn, const std::string& names, T& value, const std::string& help,
                   const std::string& group, const CLI::Validator* check = nullptr);
  CLI::Option* flag(unsigned users, bool actnn, const std::string& names, bool& value, const std::string& help,
                    const std::string& group);
  bool ignores_actnn() const;

  CLI::App& app_;
  unsigned tool_;
  std::unique_ptr<QuantOptions> quant_;
  std::string ignored_;  // what ignored options write into
  bool ignored_flag_ = false;
};

// aq-variance's TSV on stdout (config, layer, overall_var, bias, sample_var;
// a "total" row per configuration), as aq-variance and aq-train
// --evaluate --training-only print it.
void print(const variance::Report& report);

// Flushes standard output; throws std::runtime_error ("standard output:
// Broken pipe", ...) when it cannot be written.  Tools call it after each
// line they must not lose; run() checks once more at the end.
void flush_stdout();

// An output file the user already has is kept unless --force says
// otherwise: std::invalid_argument "PATH exists: replace it with --force"
// (exit 2) when `path` (not "-" or empty) exists and `force` is false.
// Checked before the work, which may take minutes.
void refuse_existing(const std::string& path, bool force);

// Parses argv, runs body, and maps what it throws to one line on stderr
// prefixed with the tool's name, and to the exit status above.  SIGPIPE is
// ignored (a closed stdout is a write error, exit 1); output that could not
// be written is exit 1 even when body returned 0.
int run(CLI::App& app, int argc, char** argv, const std::function<int()>& body);

}  // namespace aq::cli
