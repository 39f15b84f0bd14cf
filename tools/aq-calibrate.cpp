// aq-calibrate: runs K batches of training data forward and backward with an
// adaptive configuration, collects what adaptive precision needs (group
// ranges, per-sample gradient statistics, sensitivities), solves the
// allocation and writes it for `aq-train --calibration`.  TSV on stdout:
// layer, elements, sensitivity, bits, budget.  See aq-calibrate(1).
#include "aq/cli.h"
#include "aq/config.h"
#include "aq/variance.h"

int main(int argc, char** argv) {
  CLI::App app{"aq-calibrate: adaptive-precision statistics and bit allocation from K batches; TSV on stdout",
               "aq-calibrate"};
  app.set_version_flag("--version", AQ_VERSION_STRING);
  aq::cli::Common common;
  aq::calibrate::RunOptions o;
  app.add_option("data_dir", o.data_dir, "Dataset folder (default: the dataset's default location)");
  app.add_option("--resume", o.resume, "Checkpoint to calibrate (default: a freshly initialised --arch)");
  app.add_option("-o,--output", o.output, "Calibration file to write (HDF5) for aq-train --calibration");
  app.add_option("-K,--batches", o.batches, "Batches")->check(aq::cli::Positive)->capture_default_str();
  app.add_option("--dataset", o.dataset, "Dataset when no checkpoint is given")->capture_default_str();
  app.add_option("--arch", o.arch, "Architecture when no checkpoint is given")->capture_default_str();
  app.add_option("--num-classes", o.num_classes, "Classes (0: the dataset's)");
  app.add_option("-j,--workers", o.workers, "Data loading threads")->capture_default_str();
  app.add_option("-b,--batch-size", o.batch_size, "Batch size")->check(aq::cli::Positive)->capture_default_str();
  app.add_option("--image-size", o.image_size, "Image side for imagenet and synthetic data");
  aq::QuantOptions quant(app);
  aq::cli::add_common(app, common);
  return aq::cli::run(app, argc, argv, [&]() -> int {
    o.device = aq::cli::apply_common(common);
    o.seed = common.seed_given ? common.seed : 0;
    o.config = quant.resolve();
    return aq::calibrate::run(o);
  });
}
