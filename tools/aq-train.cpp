// aq-train: trains a model with compressed activations; ActNN's command
// lines work with `aq-train` in place of `python main.py`.  One TSV line per
// epoch on stdout, logs and progress on stderr, HDF5 checkpoints in the
// workspace.  See aq-train(1).
#include "aq/cli.h"
#include "aq/data.h"
#include "aq/log.h"
#include "aq/train.h"
#include "aq/variance.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <thread>
#include <stdexcept>
#include <string>

namespace {

// --check-data: every sample of both splits read once; exit 1 when one fails
// and --bad-images is fail.
int check(const aq::data::DataOptions& d, bool progress) {
  const std::string name = aq::data::resolve_name(d.dataset, d.num_classes);
  aq::data::OpenOptions oo;
  oo.image_size = d.image_size;
  oo.context = d.context;
  if (d.num_classes > 0) oo.synthetic_classes = d.num_classes;
  const int workers = d.workers > 0 ? d.workers : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const bool bar = progress && isatty(STDERR_FILENO);
  std::printf("split\timages\tbad\n");
  int64_t bad = 0;
  for (auto split : {aq::data::Split::kTrain, aq::data::Split::kTest}) {
    const char* label = split == aq::data::Split::kTrain ? "train" : "test";
    const auto set = aq::data::open(name, d.data_dir, split, oo);
    const auto r = aq::data::check(*set, workers, [&](int64_t done) {
      if (bar) std::fprintf(stderr, "\r\033[Kchecking %s: %lld/%lld", label, static_cast<long long>(done),
                            static_cast<long long>(set->size()));
    });
    if (bar) std::fprintf(stderr, "\r\033[K");
    for (const auto& [index, message] : r.bad) aq::log().warn("bad image: {}", message);
    std::printf("%s\t%lld\t%zu\n", label, static_cast<long long>(r.images), r.bad.size());
    std::fflush(stdout);
    bad += static_cast<int64_t>(r.bad.size());
  }
  if (bad > 0 && d.bad_images == aq::data::BadImages::kFail) {
    aq::log().error("{} image(s) cannot be read (--bad-images fail)", bad);
    return aq::cli::kRuntime;
  }
  return aq::cli::kOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"aq-train: train a model with activations saved as compressed low-bit copies; TSV on stdout",
               "aq-train"};
  app.set_version_flag("--version", AQ_VERSION_STRING);
  aq::cli::OptionTable table(app, aq::cli::kTrain);
  aq::train::Options o;
  std::string schedule = "onecycle", nesterov = "True";
  const std::string t = "Training", r = "Run";
  app.add_option("--lr-schedule", schedule,
                 "onecycle, cosine (from --lr to 0 after the warm-up), step or constant")->capture_default_str()->group(t);
  app.add_option("--warmup", o.warmup, "Epochs of linear warm-up (cosine, step, constant)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(t);
  // One argument per use ("5,3"): a list option would also take the data
  // folder after it.
  app.add_option("--milestones", o.milestones, "Step schedule: epochs where the lr drops 10x (default: 50%, 75%)")
      ->delimiter(',')->allow_extra_args(false)->check(aq::cli::NonNegative)->group(t);
  app.add_option("--nesterov", nesterov, "Nesterov momentum (True/False)")->capture_default_str()->group(t);
  std::string optimizer = "sgd";
  std::vector<double> betas = {0.9, 0.999};
  app.add_option("--optimizer", optimizer, "sgd (with --momentum, --nesterov) or adamw (with --betas, --eps)")
      ->capture_default_str()->group(t);
  app.add_option("--betas", betas, "AdamW: the moments' decay rates, BETA1,BETA2 in [0, 1)")
      ->delimiter(',')->expected(2)->allow_extra_args(false)
      ->default_str("0.9,0.999")->group(t);
  app.add_option("--eps", o.eps, "AdamW: added to the denominator")->check(aq::cli::Positive)->capture_default_str()->group(t);
  app.add_option("--warmup-steps", o.warmup_steps,
                 "Optimizer steps of linear warm-up, in place of --warmup (cosine, step, constant)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(t);
  app.add_option("--clip-grad-norm", o.clip_grad_norm,
                 "Scale the gradients to this global L2 norm at most before each update (0: no clipping)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(t);
  app.add_option("--max-steps", o.max_steps, "Stop after this many optimizer steps in all, with a checkpoint (0: no limit)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(t);
  app.add_option("--val-batches", o.val_batches, "Evaluate on the first N test batches (0: all)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(r);
  app.add_option("--calibration", o.calibration, "Start adaptive precision from this aq-calibrate file")->group(r);
  app.add_option("--init-from", o.init_from,
                 "Start from these weights: an aq checkpoint or a safetensors file (not with --resume FILE)")
      ->group(r);
  app.add_flag("--reset-head", o.reset_head, "With --init-from: start the classifier afresh (another class count)")
      ->group(r);
  bool check_data = false, overwrite = false;
  int64_t checkpoint_interval = 0, log_interval = -1;
  app.add_option("--log-interval", log_interval,
                 "A timestamped log line every N steps (0: none; default 100 when stderr is not a terminal, else none)")
      ->check(aq::cli::NonNegative)->group(r);
  std::string channels_last = "auto", cudnn_benchmark = "auto", cuda_graphs = "auto";
  int64_t graph_refresh = 200;
  const std::string sp = "Speed (aq-bench's settings)";
  app.add_option("--channels-last", channels_last, "Channels-last (NHWC) model and batches: auto (on CUDA), True or False")
      ->capture_default_str()->group(sp);
  app.add_option("--cudnn-benchmark", cudnn_benchmark, "cuDNN autotuning: auto (on CUDA), True or False")
      ->capture_default_str()->group(sp);
  app.add_option("--cuda-graphs", cuda_graphs,
                 "Capture the training step as a CUDA graph and replay it: auto (on CUDA), True or False")
      ->capture_default_str()->group(sp);
  app.add_option("--graph-refresh", graph_refresh,
                 "With CUDA graphs: steps between per-layer reallocations of adaptive bits (each one a new capture)")
      ->check(aq::cli::Positive)->capture_default_str()->group(sp);
  app.add_flag("--overwrite", overwrite,
               "Without --resume: replace the workspace's checkpoint.h5 and metrics.tsv (else refused, exit 2)")
      ->group(r);
  app.add_option("--checkpoint-interval", checkpoint_interval,
                 "Also write the checkpoint every N steps within an epoch (0: at epoch ends only)")
      ->check(aq::cli::NonNegative)->capture_default_str()->group(r);
  app.add_option("--dist-timeout", o.dist_timeout,
                 "Under torchrun or srun: seconds the rendezvous or any collective may take before the run fails")
      ->check(CLI::PositiveNumber)->capture_default_str()->group(r);
  app.add_flag("--check-data", check_data,
               "Only read every image of both splits and report those that fail (TSV: split, images, bad)")
      ->group(r);
  return aq::cli::run(app, argc, argv, [&]() -> int {
    const auto& v = table.values;
    o.device = table.apply_common();
    o.seed = v.seed;
    o.seed_given = v.seed_given;
    o.data = v.data;
    o.arch = v.arch;
    o.layers = v.layers, o.width = v.width, o.heads = v.heads, o.dropout = v.dropout, o.pool = v.pool;
    o.quant = table.quant();
    o.amp = table.amp();
    o.epochs = v.epochs;
    o.lr = v.lr;
    o.momentum = v.momentum;
    o.weight_decay = v.weight_decay;
    o.label_smoothing = v.label_smoothing;
    o.workspace = v.workspace;
    o.resume = v.resume;
    o.gather_checkpoints = v.gather_checkpoints;
    o.evaluate = v.evaluate;
    o.schedule = aq::train::parse_schedule(schedule);
    o.nesterov = aq::parse_bool(nesterov);
    o.optimizer = aq::train::parse_optimizer(optimizer);
    for (double b : betas)
      if (!(b >= 0 && b < 1)) {
        std::ostringstream text;
        text << b;
        throw std::invalid_argument("--betas: each must be in [0, 1), not " + text.str());
      }
    o.beta1 = betas.at(0), o.beta2 = betas.at(1);
    if (o.warmup_steps > 0 && o.warmup > 0) throw std::invalid_argument("--warmup and --warmup-steps: give one");
    o.progress = v.verbosity >= 0;
    o.given = table.given({"--batch-size", "--epochs", "--lr", "--momentum", "--weight-decay", "--label-smoothing",
                           "--lr-schedule", "--warmup", "--milestones", "--nesterov", "--amp", "--optimizer", "--betas",
                           "--eps", "--warmup-steps", "--clip-grad-norm", "--context", "--layers", "--width", "--heads",
                           "--dropout", "--pool"});
    if (!table.given({"--qconfig", "--level", "--ca", "--cabits", "--ibits", "--pergroup", "--perlayer", "--usegradient",
                      "--group-size", "--attention-bits", "--range-dtype", "--rounding"})
             .empty())
      o.given.insert("quantization");
    o.overwrite = overwrite;
    o.checkpoint_interval = checkpoint_interval;
    o.log_interval = log_interval;
    if (channels_last != "auto") o.channels_last = aq::parse_bool(channels_last);
    if (cudnn_benchmark != "auto") o.cudnn_benchmark = aq::parse_bool(cudnn_benchmark);
    if (cuda_graphs != "auto") o.cuda_graphs = aq::parse_bool(cuda_graphs);
    o.graph_refresh = graph_refresh;
    // JPEG decoding is the bottleneck of a GPU step: load ahead unless -j says otherwise.
    if (app.get_option("--workers")->count() == 0 && aq::data::resolve_name(o.data.dataset, o.data.num_classes) == "imagenet")
      o.data.workers = static_cast<int>(std::min(16u, std::max(1u, std::thread::hardware_concurrency())));
    if (check_data) return check(o.data, v.verbosity >= 0);
    if (v.training_only) {  // ActNN's gradient-variance mode: aq-variance's measurement
      if (!o.evaluate) throw std::invalid_argument("--training-only goes with --evaluate");
      if (!v.resume2.empty() && v.resume2 != o.resume)
        throw std::invalid_argument("--resume2 must name the --resume checkpoint (aq measures one model)");
      aq::variance::RunOptions vo;
      vo.data = o.data, vo.arch = o.arch, vo.resume = o.resume, vo.amp = o.amp, vo.shape = table.shape();
      vo.given = table.given_model();
      vo.device = o.device, vo.seed = o.seed_given ? o.seed : 0;
      vo.configs = {o.quant};
      aq::cli::print(aq::variance::run(vo));
      return aq::cli::kOk;
    }
    if (!v.resume2.empty()) throw std::invalid_argument("--resume2 goes with --evaluate --training-only");
    for (int i = 0; i < argc; ++i) o.command += (i ? " " : "") + std::string(argv[i]);
    aq::train::Observer obs;
    const bool text = aq::data::resolve_name(o.data.dataset, o.data.num_classes) == "text";
    obs.training = [text] {
      const auto& c = aq::train::EpochRow::columns(text);
      for (size_t i = 0; i < c.size(); ++i) std::printf("%s%s", i ? "\t" : "", c[i].c_str());
      std::printf("\n");
      aq::cli::flush_stdout();
    };
    obs.epoch = [](const aq::train::EpochRow& e) {
      std::fputs(e.tsv().c_str(), stdout);
      aq::cli::flush_stdout();
    };
    obs.evaluated = [](const std::string& file, const aq::train::EvalResult& e) {
      std::printf("file\tloss\ttop1\ttop5\timages\n%s\t%.6f\t%.2f\t%.2f\t%lld\n", file.c_str(), e.loss, e.top1, e.top5,
                  static_cast<long long>(e.images));
      std::fflush(stdout);
    };
    return aq::train::run(o, obs);
  });
}
