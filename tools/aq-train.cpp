// aq-train: trains a model with compressed activations; the seed's command
// lines work with `aq-train` in place of `python main.py`.  One TSV line per
// epoch on stdout, logs and progress on stderr, HDF5 checkpoints in the
// workspace.  See aq-train(1).
#include "aq/cli.h"
#include "aq/config.h"
#include "aq/data.h"
#include "aq/log.h"
#include "aq/models.h"
#include "aq/train.h"
#include "aq/variance.h"

#include <stdexcept>
#include <string>

int main(int argc, char** argv) {
  CLI::App app{"aq-train: train a model with activations saved as compressed low-bit copies; TSV on stdout",
               "aq-train"};
  app.set_version_flag("--version", AQ_VERSION_STRING);
  aq::cli::Common common;
  aq::train::Options o;
  std::string amp = "off", schedule = "onecycle", nesterov = "True";
  bool training_only = false;
  std::string resume2;
  const std::string g = "Data and model";
  app.add_option("data_dir", o.data_dir,
                 "Dataset folder (default: Fashion-MNIST from Debian's dataset-fashion-mnist package)");
  app.add_option("--dataset", o.dataset, "fashion-mnist, mnist, cifar10, cifar100, imagenet or synthetic")
      ->capture_default_str()->group(g);
  app.add_option("--arch", o.arch, "preact_resnet20/32/44/56/110/164/1001, resnet18/34/50/101/152")
      ->capture_default_str()->group(g);
  app.add_option("--num-classes", o.num_classes, "Classes (0: the dataset's; --dataset cifar10 --num-classes 100 reads CIFAR-100)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(g);
  app.add_option("-j,--workers", o.workers, "Data loading threads (0: in the training thread)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(g);
  app.add_option("--image-size", o.image_size, "Image side for imagenet and synthetic data")
      ->check(aq::cli::Positive)->capture_default_str()->group(g);
  app.add_option("--val-batches", o.val_batches, "Evaluate on the first N test batches (0: all)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(g);
  aq::QuantOptions quant(app);
  const std::string t = "Training";
  app.add_option("--epochs", o.epochs, "Epochs")->check(aq::cli::Positive)->capture_default_str()->group(t);
  app.add_option("-b,--batch-size", o.batch_size, "Batch size")->check(aq::cli::Positive)->capture_default_str()->group(t);
  app.add_option("--lr", o.lr, "Peak learning rate")->check(aq::cli::NonNegative)->capture_default_str()->group(t);
  app.add_option("--lr-schedule", schedule, "onecycle, cosine, step or constant")->capture_default_str()->group(t);
  app.add_option("--warmup", o.warmup, "Epochs of linear warm-up (cosine, step, constant)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(t);
  app.add_option("--milestones", o.milestones, "Step schedule: epochs where the lr drops 10x (default: 50%, 75%)")
      ->delimiter(',')->group(t);
  app.add_option("--momentum", o.momentum, "SGD momentum")->check(CLI::Range(0.0, 1.0))->capture_default_str()->group(t);
  app.add_option("--nesterov", nesterov, "Nesterov momentum (True/False)")->capture_default_str()->group(t);
  app.add_option("--weight-decay,--wd", o.weight_decay, "Weight decay")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(t);
  app.add_option("--label-smoothing", o.label_smoothing, "Label smoothing")
      ->check(CLI::Range(0.0, 1.0))->capture_default_str()->group(t);
  app.add_option("--amp", amp, "Autocast: off, bf16 or fp16 (fp16 with dynamic loss scaling)")->capture_default_str()->group(t);
  app.add_option("--max-steps", o.max_steps, "Stop after this many optimizer steps in all, with a checkpoint (0: no limit)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(t);
  const std::string r = "Run";
  app.add_option("--workspace", o.workspace, "Folder for checkpoints (created if missing)")->capture_default_str()->group(r);
  app.add_option("--resume", o.resume, "Continue from this checkpoint")->group(r);
  app.add_option("--calibration", o.calibration, "Start adaptive precision from this aq-calibrate file")->group(r);
  app.add_flag("--gather-checkpoints", o.gather_checkpoints, "Keep checkpoint-<epoch>.h5 of every epoch")->group(r);
  app.add_flag("--evaluate,-e", o.evaluate, "Only evaluate (the --resume checkpoint) on the test split")->group(r);
  app.add_flag("--training-only", training_only, "With --evaluate: the seed's gradient-variance measurement (as aq-variance)")->group(r);
  app.add_option("--resume2", resume2, "With --evaluate --training-only: the seed's second checkpoint (the same as --resume)")->group(r);
  aq::cli::add_common(app, common);
  return aq::cli::run(app, argc, argv, [&]() -> int {
    o.device = aq::cli::apply_common(common);
    o.seed = common.seed;
    o.seed_given = common.seed_given;
    o.quant = quant.resolve();
    o.amp = aq::train::parse_amp(amp);
    o.schedule = aq::train::parse_schedule(schedule);
    o.nesterov = aq::parse_bool(nesterov);
    o.progress = common.verbosity >= 0;
    if (training_only) {  // the seed's gradient-variance mode: aq-variance's measurement
      if (!o.evaluate) throw std::invalid_argument("--training-only goes with --evaluate");
      if (!resume2.empty() && resume2 != o.resume)
        throw std::invalid_argument("--resume2 must name the --resume checkpoint (aq measures one model)");
      aq::variance::RunOptions v;
      v.dataset = o.dataset, v.data_dir = o.data_dir, v.arch = o.arch, v.resume = o.resume;
      v.num_classes = o.num_classes, v.batch_size = o.batch_size, v.image_size = o.image_size;
      v.workers = o.workers, v.device = o.device, v.seed = o.seed_given ? o.seed : 0;
      v.configs = {o.quant};
      return aq::variance::run(v);
    }
    if (!resume2.empty()) throw std::invalid_argument("--resume2 goes with --evaluate --training-only");
    if (o.quant.scope == aq::Scope::kSyncBN)
      throw std::invalid_argument("-c qsyncbn needs distributed training, which is not available yet");
    for (int i = 0; i < argc; ++i) o.command += (i ? " " : "") + std::string(argv[i]);
    return aq::train::run(o);
  });
}
