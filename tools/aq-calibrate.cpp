// aq-calibrate: runs K batches of training data forward and backward with an
// adaptive configuration, collects what adaptive precision needs (group
// ranges, per-sample gradient statistics, sensitivities), solves the
// allocation and writes it for `aq-train --calibration`.  TSV on stdout:
// layer, elements, sensitivity, bits, budget, shares.  See aq-calibrate(1).
#include "aq/calibrate.h"
#include "aq/cli.h"

#include <cstdio>

int main(int argc, char** argv) {
  CLI::App app{"aq-calibrate: adaptive-precision statistics and bit allocation from K batches; TSV on stdout",
               "aq-calibrate"};
  app.set_version_flag("--version", AQ_VERSION_STRING);
  aq::cli::OptionTable table(app, aq::cli::kCalibrate);
  aq::calibrate::RunOptions o;
  app.add_option("-o,--output", o.output, "Calibration file to write (HDF5) for aq-train --calibration");
  bool force = false;
  app.add_flag("-f,--force", force, "Replace the -o file if it exists (else refused, exit 2)");
  app.add_option("-K,--batches", o.batches, "Batches")->check(aq::cli::Positive)->capture_default_str();
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
    o.config = table.quant();
    const auto layers = aq::calibrate::run(o);
    std::printf("layer\telements\tsensitivity\tbits\tbudget\tshares\n");
    for (const auto& l : layers)
      std::printf("%s\t%lld\t%.6g\t%.3f\t%.3f\t%s\n", l.name.c_str(), static_cast<long long>(l.elements),
                  l.sensitivity, l.bits, l.budget, l.shares.empty() ? "-" : l.shares.c_str());
    return aq::cli::kOk;
  });
}
