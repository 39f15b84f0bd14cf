// aq-eval: evaluates checkpoints on the test split of the data they were
// trained on.  TSV on stdout: file, loss, top1, top5, images; for text
// checkpoints per token: file, loss, ppl, acc, top5, tokens.  See aq-eval(1).
#include "aq/checkpoint.h"
#include "aq/cli.h"
#include "aq/data.h"
#include "aq/evaluate.h"
#include "aq/log.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace {
struct StdoutError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"aq-eval: evaluate aq checkpoints on the test split; TSV on stdout", "aq-eval"};
  app.set_version_flag("--version", AQ_VERSION_STRING);
  aq::cli::Values defaults;
  defaults.data.dataset = "";  // the checkpoint's
  aq::cli::OptionTable table(app, aq::cli::kEval, defaults);
  std::vector<std::string> files;
  int64_t max_batches = 0;
  double dist_timeout_s = 600;
  app.add_option("checkpoints", files, "HDF5 checkpoints written by aq-train ('-': standard input)");
  app.add_option("--max-batches", max_batches, "Evaluate the first N batches only (0: all)")
      ->check(aq::cli::NonNegative)->capture_default_str();
  app.add_option("--dist-timeout", dist_timeout_s,
                 "Under torchrun or srun: seconds the rendezvous or any collective may take before the run fails")
      ->check(CLI::PositiveNumber)->capture_default_str();
  return aq::cli::run(app, argc, argv, [&]() -> int {
    auto dev = table.apply_common();
    const auto a = table.amp();
    const auto& v = table.values;
    const std::string& dataset = v.data.dataset;
    if (!v.resume.empty()) files.insert(files.begin(), v.resume);  // ActNN's --evaluate --resume FILE
    if (files.empty()) throw std::invalid_argument("give the checkpoints to evaluate (or ActNN's --resume FILE)");
    const bool image_size_given = app.count("--image-size") > 0;
    if (std::count(files.begin(), files.end(), "-") > 1)
      throw std::invalid_argument("standard input ('-') can be read only once");
    // Under torchrun or srun the ranks share each checkpoint's test set;
    // rank 0 prints.
    const auto ranks =
        aq::train::EvalRanks::connect(dev, std::chrono::milliseconds(static_cast<int64_t>(dist_timeout_s * 1000)));
    const bool main_rank = !ranks || ranks->rank() == 0;
    if (ranks && std::count(files.begin(), files.end(), "-"))
      throw std::invalid_argument("standard input ('-') cannot be shared by the ranks of a launcher");
    aq::QuantConfig exact;
    exact.scope = aq::Scope::kNone;
    std::map<std::string, std::shared_ptr<const aq::data::Dataset>> sets;
    // The header follows the first checkpoint read: images or text.  The
    // other kind after it cannot share its columns.
    int kind = -1;  // -1: no header yet, 0: images, 1: text
    auto header = [&](int k) {
      kind = k;
      if (!main_rank) return;
      std::printf(k ? "file\tloss\tppl\tacc\ttop5\ttokens\n" : "file\tloss\ttop1\ttop5\timages\n");
      try {
        aq::cli::flush_stdout();
      } catch (const std::runtime_error& e) {
        throw StdoutError(e.what());  // not one file's error: the run ends
      }
    };
    int status = aq::cli::kOk;
    for (const auto& f : files) {
      aq::train::EvalResult r;
      bool failed = true;
      auto fail = [&](const std::string& line) {
        std::cerr << "aq-eval: " << line << "\n";
        status = aq::cli::kRuntime;
      };
      try {
        const auto c = aq::ckpt::load(f);
        auto model = aq::train::model_from_checkpoint(c, f, exact);
        model->to(dev);
        const std::string ds = dataset.empty() ? c.meta.at("dataset") : dataset;
        const int k = ds == "text";
        if (kind < 0) header(k);
        if (k != kind)
          throw std::runtime_error(f + ": a " + (k ? "text" : "image") + " checkpoint among " +
                                   (kind ? "text" : "image") + " ones: evaluate them in separate calls");
        aq::data::OpenOptions oo;
        if (auto ctx = c.counters.find("context"); ctx != c.counters.end()) oo.context = ctx->second;
        auto sz = c.counters.find("image_size");
        oo.image_size = image_size_given ? v.data.image_size : sz != c.counters.end() ? sz->second : 224;
        oo.synthetic_classes = c.counters.at("num_classes");
        const std::string key = ds + "\n" + std::to_string(oo.image_size) + "\n" + std::to_string(oo.synthetic_classes) +
                                "\n" + std::to_string(oo.context);
        if (!sets.count(key)) sets[key] = aq::data::open(ds, v.data.data_dir, aq::data::Split::kTest, oo);
        const auto& info = sets[key]->info();
        if (info.num_classes != c.counters.at("num_classes") || info.channels != c.counters.at("in_channels"))
          throw std::runtime_error(f + ": model has " + std::to_string(c.counters.at("num_classes")) + " classes and " +
                                   std::to_string(c.counters.at("in_channels")) + " input channels, " + ds + " " +
                                   std::to_string(info.num_classes) + " and " + std::to_string(info.channels));
        aq::data::LoaderOptions lo;
        lo.batch_size = v.data.batch_size;
        lo.shuffle = lo.augment = false;
        lo.workers = v.data.workers;
        lo.pin_memory = dev.is_cuda();
        lo.bad_images = v.data.bad_images;
        if (ranks) lo.shards = ranks->size(), lo.shard = ranks->rank();
        aq::data::Loader loader(sets[key], lo);
        r = aq::train::evaluate(*model, loader, dev, a, max_batches);
        for (const auto& m : loader.take_skipped()) aq::log().warn("skipped: {}", m);
        failed = false;
      } catch (const StdoutError&) {
        throw;
      } catch (const std::out_of_range&) {
        fail(f + ": checkpoint lacks dataset/num_classes/in_channels metadata");
      } catch (const std::invalid_argument& e) {
        fail(f + ": " + e.what());
      } catch (const std::runtime_error& e) {
        const std::string m = e.what();
        fail(m.substr(0, m.find('\n')));
      } catch (const std::exception& e) {  // LibTorch's errors among them: the next file is still evaluated
        const std::string m = e.what();
        fail(f + ": " + m.substr(0, m.find('\n')));
      }
      if (ranks) {
        try {
          r = ranks->reduce(r, failed);
        } catch (const std::runtime_error& e) {
          if (!failed) fail(f + ": " + e.what());
          continue;
        }
      }
      if (failed || !main_rank) continue;
      if (kind)
        std::printf("%s\t%.6f\t%.4f\t%.2f\t%.2f\t%lld\n", f.c_str(), r.loss, std::exp(r.loss), r.top1, r.top5,
                    static_cast<long long>(r.tokens));
      else
        std::printf("%s\t%.6f\t%.2f\t%.2f\t%lld\n", f.c_str(), r.loss, r.top1, r.top5, static_cast<long long>(r.images));
      std::fflush(stdout);  // a write error: exit 1 at the end, every file still evaluated
    }
    if (kind < 0) header(0);
    return status;
  });
}
