// aq-variance: the gradient variance that activation compression adds
// (ActNN's "Overall Var"), for one or several configurations measured on
// the same batches of a checkpoint.  ActNN's testing command line works
// with `aq-variance` in place of `python main.py`.  See aq-variance(1).
#include "aq/cli.h"
#include "aq/variance.h"

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/stat.h>

int main(int argc, char** argv) {
  CLI::App app{"aq-variance: gradient variance added by activation compression; TSV on stdout", "aq-variance"};
  app.set_version_flag("--version", AQ_VERSION_STRING);
  aq::cli::OptionTable table(app, aq::cli::kVariance);
  aq::variance::RunOptions o;
  std::string configs;
  app.add_option("--configs", configs,
                 "Configurations to compare: a file with one per line, or a ';'-separated list (default: the -c flags)");
  app.add_option("-K,--batches", o.options.batches, "Batches")->check(aq::cli::Positive)->capture_default_str();
  app.add_option("-S,--samples", o.options.samples, "Quantized gradients per batch (>= 2)")
      ->check(CLI::Range(int64_t(2), int64_t(1000)))->capture_default_str();
  app.add_option("-o,--output", o.output, "Also write the figures to this HDF5 file");
  bool force = false;
  app.add_flag("-f,--force", force, "Replace the -o file if it exists (else refused, exit 2)");
  return aq::cli::run(app, argc, argv, [&]() -> int {
    const auto& v = table.values;
    aq::cli::refuse_existing(o.output, force);
    o.device = table.apply_common();
    o.seed = v.seed_given ? v.seed : 0;
    o.data = v.data;
    o.arch = v.arch;
    o.resume = v.resume;
    o.shape = table.shape();
    o.given = table.given_model();
    o.amp = table.amp();
    if (!v.resume2.empty() && v.resume2 != o.resume)
      throw std::invalid_argument("--resume2 must name the --resume checkpoint (aq measures one model)");
    if (configs.empty()) {
      o.configs = {table.quant()};
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
      o.configs = aq::cli::parse_configs(text);
    }
    aq::cli::print(aq::variance::run(o));
    return aq::cli::kOk;
  });
}
