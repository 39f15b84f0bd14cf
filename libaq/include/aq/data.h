// Datasets and the batch loader of aq-train, aq-eval and the other tools.
//
// Datasets: Fashion-MNIST and MNIST (IDX files, gzipped or not), CIFAR-10
// and CIFAR-100 (their binary distribution), an ImageNet-style folder of
// class subfolders of JPEG and PNG files (decoded by content, whatever their
// name says), a synthetic dataset for benchmarks, and text: the bytes of a
// folder of text files as windows of tokens for language models.
// Each knows its shape, class count, normalisation and augmentation.
//
// The loader yields batches of normalised float images with their labels and
// dataset indices (the adaptive scheme keys per-sample statistics by index).
// The order and every random augmentation depend only on (seed, epoch,
// index), so a resumed run sees exactly the batches of an uninterrupted one,
// whatever the number of worker threads.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace aq::data {

enum class Split { kTrain, kTest };

// An image file that cannot be read or decoded (the message names it).
// Datasets throw it from get(); the loader may skip such samples.
class BadImage : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What the loader does with a sample whose get() throws BadImage: fail (the
// exception reaches next()'s caller) or skip it (the batch is one smaller).
enum class BadImages { kFail, kSkip };
BadImages parse_bad_images(const std::string& text);  // "fail" or "skip"; throws std::invalid_argument

// What a model needs to know about a dataset.
struct Info {
  std::string name;          // fashion-mnist, mnist, cifar10, cifar100, imagenet, synthetic, text
  int64_t channels = 0;      // of the images the loader yields (text: 1)
  int64_t height = 0, width = 0;  // (text: 1 and the sequence length)
  int64_t num_classes = 0;   // (text: the vocabulary, 256 bytes)
  // Token datasets: tokens per sample the model sees (the window is one
  // longer: inputs are its first `sequence`, targets its last).  0: images.
  int64_t sequence = 0;
  std::vector<double> mean, std;  // per channel, applied after augmentation
};

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual const Info& info() const = 0;
  virtual int64_t size() const = 0;
  virtual int64_t label(int64_t index) const = 0;
  // Writes sample `index` as normalised float CHW (info().channels x height x
  // width) to `out`, augmented with randomness from `rng` when `augment`
  // (training transforms), else the evaluation transform.  Thread-safe.
  virtual void get(int64_t index, bool augment, std::mt19937_64& rng, float* out) const = 0;
  // Token datasets (info().sequence > 0): writes sample `index`'s window of
  // sequence + 1 tokens to `out`.  Thread-safe.
  virtual void get_tokens(int64_t index, int64_t* out) const;
};

struct OpenOptions {
  // synthetic: samples, classes, image side (ImageNet-like 3 x 224 x 224).
  int64_t synthetic_size = 10000;
  int64_t synthetic_classes = 1000;
  int64_t image_size = 224;  // imagenet and synthetic: side of the crop the model sees
  int64_t context = 1024;    // text: tokens per sample the model sees
};

// Opens `name` (see Info::name; "fmnist" and "fashion_mnist" are accepted
// too) from `root` (empty: default_root(name)).  A missing or malformed
// dataset throws std::runtime_error with one line naming the files expected
// (and, for Fashion-MNIST, the Debian package that provides them); an
// unknown name throws std::invalid_argument.
std::shared_ptr<const Dataset> open(const std::string& name, const std::string& root, Split split,
                                    const OpenOptions& options = {});

// Where a dataset is looked for when no folder is given: Fashion-MNIST from
// Debian's dataset-fashion-mnist package, /usr/share/datasets/fashion-mnist;
// the others have none ("").
std::string default_root(const std::string& name);

// The dataset a name means with a class count: ActNN's command lines run
// CIFAR-100 as "--dataset cifar10 --num-classes 100" (and CIFAR-10 the
// other way round); other names are returned as they are.
std::string resolve_name(const std::string& dataset, int64_t num_classes);

// The dataset names open() knows, canonical spelling.
const std::vector<std::string>& names();

// What the dataset, the loader and the model are built from by the tools (aq-train,
// aq-variance, aq-calibrate).
struct DataOptions {
  std::string dataset = "fashion-mnist";
  std::string data_dir;          // empty: default_root(dataset)
  int64_t num_classes = 0;       // 0: the dataset's
  int workers = 0;               // -j
  int64_t image_size = 224;      // imagenet, synthetic
  int64_t context = 1024;        // text: tokens per sample
  int64_t batch_size = 128;
  BadImages bad_images = BadImages::kSkip;
};

struct Batch {
  torch::Tensor images;   // float [B, C, H, W], normalised (token datasets: int64 inputs [B, T])
  torch::Tensor labels;   // int64 [B] (token datasets: next-token targets [B, T])
  torch::Tensor indices;  // int64 [B], dataset indices
};

struct LoaderOptions {
  int64_t batch_size = 128;
  bool shuffle = true;    // a new permutation each epoch
  bool augment = true;    // training transforms
  bool drop_last = false;
  int workers = 0;        // threads preparing batches ahead; 0: in next()
  uint64_t seed = 0;
  bool pin_memory = false;  // batches in pinned host memory (for CUDA)
  BadImages bad_images = BadImages::kFail;
  // Data parallel: the epoch's batches are global batches of
  // batch_size * shards samples, and this loader yields part `shard` of each
  // (samples shard*batch_size .. +batch_size of it; none past the end).
  int64_t shards = 1, shard = 0;
};

class Loader {
 public:
  Loader(std::shared_ptr<const Dataset> dataset, LoaderOptions options);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  int64_t batches_per_epoch() const;
  const Dataset& dataset() const { return *dataset_; }
  // Begins epoch `epoch` at its batch `first_batch` (resume).
  void start(int64_t epoch, int64_t first_batch = 0);
  // The next batch of the epoch, nullopt at its end.  With BadImages::kSkip
  // a batch may be smaller than the batch size; one left empty is passed over.
  std::optional<Batch> next();
  // Samples skipped as bad in the batches next() returned since start().
  int64_t skipped() const;
  // The BadImage messages of those skipped samples not taken yet, in order.
  std::vector<std::string> take_skipped();

 private:
  void start_workers();
  void stop_workers();  // joins them
  struct State;
  std::shared_ptr<const Dataset> dataset_;
  LoaderOptions options_;
  std::unique_ptr<State> state_;
};

// What check() found: the dataset's size and every sample that failed.
struct CheckResult {
  int64_t images = 0;
  std::vector<std::pair<int64_t, std::string>> bad;  // index, BadImage message; by index
};

// Reads every sample of `dataset` (the evaluation transform), on `workers`
// threads (0: the calling one), and reports those that throw BadImage; any
// other exception propagates.  `progress(done)` is called from the calling
// thread now and then.
CheckResult check(const Dataset& dataset, int workers, const std::function<void(int64_t done)>& progress = {});

}  // namespace aq::data
