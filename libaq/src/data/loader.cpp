// The batch loader: batches in an order and with augmentations that depend
// only on (seed, epoch, index), made in next() or ahead by worker threads.
#include "internal.h"

#include <torch/cuda.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>

namespace aq::data {
using namespace detail;

struct Loader::State {
  struct Result {
    std::optional<Batch> batch;
    std::exception_ptr error;
    std::vector<std::string> skipped;  // BadImage messages, counted when delivered
  };

  bool started = false;
  bool pinned = false;
  int64_t epoch = 0;
  std::shared_ptr<const std::vector<int64_t>> order;
  int64_t next_deliver = 0, end = 0;

  // Workers: batches [next_deliver, next_schedule) are being made or wait in
  // `ready`; a new start() bumps `generation`, which voids them.
  std::mutex mu;
  std::condition_variable work_cv, ready_cv;
  std::vector<std::thread> threads;
  bool stop = false;
  std::atomic<uint64_t> generation{0};
  int64_t next_schedule = 0, max_ahead = 0;
  std::map<int64_t, Result> ready;

  // Skipped samples of the delivered batches (next()'s thread only).
  int64_t skipped = 0;
  std::vector<std::string> untaken;
};

namespace {

struct Cancelled {};

// Samples order[lo, lo + B) of a token dataset: inputs and next-token
// targets, each int64 [B, T] (no augmentation; windows cannot be bad).
Batch make_token_batch(const Dataset& ds, bool pinned, const std::vector<int64_t>& order, int64_t lo, int64_t B,
                       const std::atomic<uint64_t>* generation, uint64_t gen) {
  const int64_t T = ds.info().sequence;
  const auto opts = torch::TensorOptions().dtype(torch::kInt64).pinned_memory(pinned);
  Batch batch;
  batch.images = torch::empty({B, T}, opts);
  batch.labels = torch::empty({B, T}, opts);
  batch.indices = torch::empty({B}, torch::kInt64);
  int64_t* in = batch.images.data_ptr<int64_t>();
  int64_t* tg = batch.labels.data_ptr<int64_t>();
  int64_t* idx = batch.indices.data_ptr<int64_t>();
  std::vector<int64_t> window(static_cast<size_t>(T + 1));
  for (int64_t i = 0; i < B; ++i) {
    if (generation && generation->load(std::memory_order_relaxed) != gen) throw Cancelled{};
    idx[i] = order[lo + i];
    ds.get_tokens(idx[i], window.data());
    std::copy_n(window.data(), T, in + i * T);
    std::copy_n(window.data() + 1, T, tg + i * T);
  }
  return batch;
}

// Batch `b` of an epoch, without the samples skipped as bad (their messages
// in `skipped`); throws Cancelled when `generation` moves past `gen`.
Batch make_batch(const Dataset& ds, const LoaderOptions& o, bool pinned, const std::vector<int64_t>& order,
                 int64_t epoch, int64_t b, const std::atomic<uint64_t>* generation, uint64_t gen,
                 std::vector<std::string>& skipped) {
  const int64_t n = static_cast<int64_t>(order.size());
  const int64_t lo = std::min(n, (b * o.shards + o.shard) * o.batch_size), hi = std::min(n, lo + o.batch_size),
                B = hi - lo;
  const Info& info = ds.info();
  if (info.sequence > 0) return make_token_batch(ds, pinned, order, lo, B, generation, gen);
  const int64_t per = info.channels * info.height * info.width;
  Batch batch;
  batch.images = torch::empty({B, info.channels, info.height, info.width},
                              torch::TensorOptions().dtype(torch::kFloat32).pinned_memory(pinned));
  batch.labels = torch::empty({B}, torch::kInt64);
  batch.indices = torch::empty({B}, torch::kInt64);
  float* img = batch.images.data_ptr<float>();
  int64_t* lab = batch.labels.data_ptr<int64_t>();
  int64_t* idx = batch.indices.data_ptr<int64_t>();
  int64_t kept = 0;
  for (int64_t i = 0; i < B; ++i) {
    if (generation && generation->load(std::memory_order_relaxed) != gen) throw Cancelled{};
    const int64_t index = order[lo + i];
    std::mt19937_64 rng(mix(o.seed, static_cast<uint64_t>(epoch), static_cast<uint64_t>(index)));
    try {
      ds.get(index, o.augment, rng, img + kept * per);
    } catch (const BadImage& e) {
      if (o.bad_images != BadImages::kSkip) throw;
      skipped.push_back(e.what());
      continue;
    }
    lab[kept] = ds.label(index);
    idx[kept] = index;
    ++kept;
  }
  if (kept < B) {
    batch.images = batch.images.narrow(0, 0, kept);
    batch.labels = batch.labels.narrow(0, 0, kept);
    batch.indices = batch.indices.narrow(0, 0, kept);
  }
  return batch;
}

}  // namespace

Loader::Loader(std::shared_ptr<const Dataset> dataset, LoaderOptions options)
    : dataset_(std::move(dataset)), options_(options), state_(std::make_unique<State>()) {
  if (!dataset_) bad_arg("loader: no dataset");
  if (options_.batch_size < 1) bad_arg("batch size must be at least 1, not " + std::to_string(options_.batch_size));
  if (options_.shards < 1 || options_.shard < 0 || options_.shard >= options_.shards)
    bad_arg("loader: shard " + std::to_string(options_.shard) + " of " + std::to_string(options_.shards));
  if (options_.workers < 0) bad_arg("workers must be 0 or more, not " + std::to_string(options_.workers));
  State& s = *state_;
  s.pinned = options_.pin_memory && torch::cuda::is_available();
  s.max_ahead = 2 * int64_t{options_.workers};
  try {
    start_workers();
  } catch (const std::system_error& e) {  // the threads started so far must be joined before they go
    const size_t started = s.threads.size();
    stop_workers();
    throw std::runtime_error("loader: cannot start " + std::to_string(options_.workers) + " worker threads (" +
                             std::to_string(started) + " started): " + e.what());
  }
}

void Loader::start_workers() {
  State& s = *state_;
  for (int w = 0; w < options_.workers; ++w)
    s.threads.emplace_back([this] {
      State& s = *state_;
      std::unique_lock<std::mutex> lock(s.mu);
      for (;;) {
        s.work_cv.wait(lock, [&] {
          return s.stop || (s.started && s.next_schedule < s.end && s.next_schedule - s.next_deliver < s.max_ahead);
        });
        if (s.stop) return;
        const int64_t b = s.next_schedule++;
        const uint64_t gen = s.generation.load();
        const int64_t epoch = s.epoch;
        const auto order = s.order;
        lock.unlock();
        State::Result r;
        bool cancelled = false;
        try {
          r.batch = make_batch(*dataset_, options_, s.pinned, *order, epoch, b, &s.generation, gen, r.skipped);
        } catch (const Cancelled&) {
          cancelled = true;
        } catch (...) {
          r.error = std::current_exception();
        }
        lock.lock();
        if (!cancelled && gen == s.generation.load()) {
          s.ready.emplace(b, std::move(r));
          s.ready_cv.notify_all();
        }
      }
    });
}

Loader::~Loader() { stop_workers(); }

void Loader::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
    state_->generation++;
  }
  state_->work_cv.notify_all();
  for (auto& t : state_->threads) t.join();
  state_->threads.clear();
}

int64_t Loader::batches_per_epoch() const {
  const int64_t n = dataset_->size(), bs = options_.batch_size * options_.shards;
  return options_.drop_last ? n / bs : (n + bs - 1) / bs;
}

void Loader::start(int64_t epoch, int64_t first_batch) {
  const int64_t nb = batches_per_epoch();
  if (epoch < 0) bad_arg("loader: epoch must be 0 or more, not " + std::to_string(epoch));
  if (first_batch < 0 || first_batch > nb)
    bad_arg("loader: first batch " + std::to_string(first_batch) + " is not in 0.." + std::to_string(nb));
  auto order = std::make_shared<std::vector<int64_t>>(dataset_->size());
  for (size_t i = 0; i < order->size(); ++i) (*order)[i] = static_cast<int64_t>(i);
  if (options_.shuffle) {  // Fisher-Yates from (seed, epoch) only
    std::mt19937_64 rng(mix(options_.seed, 0x5eedULL, static_cast<uint64_t>(epoch)));
    for (int64_t i = static_cast<int64_t>(order->size()) - 1; i > 0; --i)
      std::swap((*order)[i], (*order)[below(rng, i + 1)]);
  }
  State& s = *state_;
  std::map<int64_t, State::Result> old;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.generation++;
    s.started = true;
    s.epoch = epoch;
    s.order = std::move(order);
    s.end = nb;
    s.next_deliver = s.next_schedule = first_batch;
    old.swap(s.ready);  // freed outside the lock
  }
  s.skipped = 0;
  s.untaken.clear();
  s.work_cv.notify_all();
}

std::optional<Batch> Loader::next() {
  State& s = *state_;
  if (!s.started) start(0);
  for (;;) {
    State::Result r;
    if (s.threads.empty()) {
      if (s.next_deliver >= s.end) return std::nullopt;
      try {
        r.batch = make_batch(*dataset_, options_, s.pinned, *s.order, s.epoch, s.next_deliver++, nullptr, 0, r.skipped);
      } catch (...) {
        r.error = std::current_exception();
      }
    } else {
      {
        std::unique_lock<std::mutex> lock(s.mu);
        if (s.next_deliver >= s.end) return std::nullopt;
        s.ready_cv.wait(lock, [&] { return s.ready.count(s.next_deliver) > 0; });
        auto it = s.ready.find(s.next_deliver);
        r = std::move(it->second);
        s.ready.erase(it);
        s.next_deliver++;
      }
      s.work_cv.notify_all();
    }
    s.skipped += static_cast<int64_t>(r.skipped.size());
    for (auto& m : r.skipped) s.untaken.push_back(std::move(m));
    if (r.error) std::rethrow_exception(r.error);
    if (r.batch && r.batch->labels.size(0) > 0) return std::move(r.batch);
  }
}

int64_t Loader::skipped() const { return state_->skipped; }

std::vector<std::string> Loader::take_skipped() {
  std::vector<std::string> out;
  out.swap(state_->untaken);
  return out;
}

BadImages parse_bad_images(const std::string& text) {
  if (text == "skip") return BadImages::kSkip;
  if (text == "fail") return BadImages::kFail;
  bad_arg("--bad-images: skip or fail, not '" + text + "'");
}

CheckResult check(const Dataset& ds, int workers, const std::function<void(int64_t)>& progress) {
  const Info& info = ds.info();
  const int64_t n = ds.size(), per = info.channels * info.height * info.width;
  CheckResult result;
  result.images = n;
  std::mutex mu;
  std::atomic<int64_t> next{0}, done{0};
  std::exception_ptr error;
  auto work = [&] {
    std::vector<float> buf(static_cast<size_t>(per));
    for (int64_t i; (i = next++) < n;) {
      std::mt19937_64 rng(static_cast<uint64_t>(i));
      try {
        ds.get(i, false, rng, buf.data());
      } catch (const BadImage& e) {
        std::lock_guard<std::mutex> lock(mu);
        result.bad.emplace_back(i, e.what());
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        next = n;
      }
      ++done;
    }
  };
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) threads.emplace_back(work);
  if (threads.empty()) {
    work();
  } else {
    while (done.load() < n && next.load() < n) {
      if (progress) progress(done.load());
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
  }
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
  if (progress) progress(done.load());
  std::sort(result.bad.begin(), result.bad.end());
  return result;
}

}  // namespace aq::data
