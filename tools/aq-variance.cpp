// aq-variance: the gradient variance that activation compression adds
// (the seed's "Overall Var"), for one or several configurations measured on
// the same batches of a checkpoint.  The seed's testing command line works
// with `aq-variance` in place of `python main.py`.  See aq-variance(1).
#include "aq/cli.h"
#include "aq/config.h"
#include "aq/log.h"
#include "aq/variance.h"

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/stat.h>

int main(int argc, char** argv) {
  CLI::App app{"aq-variance: gradient variance added by activation compression; TSV on stdout", "aq-variance"};
  app.set_version_flag("--version", AQ_VERSION_STRING);
  aq::cli::Common common;
  aq::variance::RunOptions o;
  std::string configs, workspace, resume2;
  bool evaluate = false, training_only = false;
  int64_t epochs = 0;
  double weight_decay = 0, label_smoothing = 0;
  app.add_option("data_dir", o.data_dir, "Dataset folder (default: the dataset's default location)");
  app.add_option("--resume", o.resume, "Checkpoint to measure (default: a freshly initialised --arch)");
  app.add_option("--resume2", resume2, "The seed's second checkpoint; must be the same as --resume");
  app.add_option("--configs", configs,
                 "Configurations to compare: a file with one per line, or a ';'-separated list (default: the -c flags)");
  app.add_option("-K,--batches", o.options.batches, "Batches")->check(aq::cli::Positive)->capture_default_str();
  app.add_option("-S,--samples", o.options.samples, "Quantized gradients per batch (>= 2)")
      ->check(CLI::Range(int64_t(2), int64_t(1000)))->capture_default_str();
  app.add_option("-o,--output", o.output, "Also write the figures to this HDF5 file");
  const std::string d = "The seed's data configuration";
  app.add_option("--dataset", o.dataset, "Dataset when no checkpoint is given")->capture_default_str()->group(d);
  app.add_option("--arch", o.arch, "Architecture when no checkpoint is given")->capture_default_str()->group(d);
  app.add_option("--num-classes", o.num_classes, "Classes (0: the dataset's)")->group(d);
  app.add_option("-j,--workers", o.workers, "Data loading threads")->capture_default_str()->group(d);
  app.add_option("-b,--batch-size", o.batch_size, "Batch size")->check(aq::cli::Positive)->capture_default_str()->group(d);
  app.add_option("--image-size", o.image_size, "Image side for imagenet and synthetic data")->group(d);
  app.add_option("--epochs", epochs, "Accepted and ignored (seed command lines)")->group(d);
  app.add_option("--weight-decay,--wd", weight_decay, "Accepted and ignored (seed command lines)")->group(d);
  app.add_option("--label-smoothing", label_smoothing, "Accepted and ignored (seed command lines)")->group(d);
  app.add_option("--workspace", workspace, "Accepted and ignored: nothing is written there (see -o)")->group(d);
  app.add_flag("--evaluate,-e", evaluate, "Accepted (the seed's testing mode)")->group(d);
  app.add_flag("--training-only", training_only, "Accepted (the seed's testing mode)")->group(d);
  aq::QuantOptions quant(app);
  aq::cli::add_common(app, common);
  return aq::cli::run(app, argc, argv, [&]() -> int {
    o.device = aq::cli::apply_common(common);
    o.seed = common.seed_given ? common.seed : 0;
    if (!resume2.empty() && resume2 != o.resume)
      throw std::invalid_argument("--resume2 must name the --resume checkpoint (aq measures one model)");
    if (configs.empty()) {
      o.configs = {quant.resolve()};
    } else {
      struct stat st {};
      std::string text = configs;
      if (::stat(configs.c_str(), &st) == 0) {
        std::ifstream in(configs);
        std::stringstream ss;
        ss << in.rdbuf();
        if (!in && !in.eof()) throw std::runtime_error(configs + ": cannot read");
        text = ss.str();
      }
      o.configs = aq::variance::parse_configs(text);
    }
    return aq::variance::run(o);
  });
}
