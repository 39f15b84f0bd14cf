// Greedy bit allocation (docs/design.md §5); see aq/allocate.h for the contract.
#include "aq/allocate.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <map>
#include <mutex>
#include <queue>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace aq {
namespace {

constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;

// inv[b] = 1 / (2^b - 1)^2 for b = 1..8 (index 0 unused).
struct Tables {
  double inv[kMaxBits + 1];
  double dinv[kMaxBits + 1];  // dinv[b] = inv[b-1] - inv[b]: cost increase of going b -> b-1
  Tables() {
    inv[0] = 0;
    for (int b = 1; b <= kMaxBits; ++b) {
      const double q = static_cast<double>((1 << b) - 1);
      inv[b] = 1.0 / (q * q);
    }
    dinv[0] = dinv[1] = 0;
    for (int b = 2; b <= kMaxBits; ++b) dinv[b] = inv[b - 1] - inv[b];
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

// Replaces NaN and +Inf by the largest finite sensitivity present (1e300 if there is
// none); throws on negative values (including -Inf).
std::vector<double> sanitize(const std::vector<double>& s, const char* who) {
  bool any_finite = false;
  double max_finite = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const double c = s[i];
    if (c < 0)
      throw std::invalid_argument(std::string(who) + ": sensitivity[" + std::to_string(i) +
                                  "] = " + std::to_string(c) + " is negative");
    if (std::isfinite(c)) {
      if (!any_finite || c > max_finite) max_finite = c;
      any_finite = true;
    }
  }
  const double repl = any_finite ? max_finite : 1e300;
  std::vector<double> out(s);
  for (double& c : out)
    if (!std::isfinite(c)) c = repl;
  return out;
}

double cost_of(const std::vector<double>& c, const std::vector<int>& bits) {
  const Tables& t = tables();
  double sum = 0;
  for (std::size_t i = 0; i < c.size(); ++i) sum += c[i] * t.inv[bits[i]];
  return sum;
}

// Key of removing the bit that takes unit i from b to b-1 bits: the cost increase per
// unit of weight.  Both removal strategies below compute it with this one expression, so
// they see bit-identical keys.
inline double removal_key(double c, int b, int64_t w) {
  return c * tables().dinv[b] / static_cast<double>(w);
}

// The greedy removes bits in increasing (key, unit index) order.  Each unit's keys grow
// as its bits fall (the cost is convex in b), so the sequence of removals the heap pops
// is exactly the list of all candidate removals (unit i, b -> b-1 for b = ibits..2)
// sorted by (key, index, b descending), cut at the first prefix whose weight covers the
// excess.  Two equivalent implementations:
//  - remove_by_heap: the min-heap (std::priority_queue) of docs/design.md §5; O(n) memory
//    but O(removals * log n) latency-bound heap steps.
//  - remove_by_selection: a weighted quickselect over all n * (ibits - 1) candidates;
//    several times faster, but needs 16 bytes per candidate.
// Both leave used <= target, with used + (weight of the last removal) > target.

struct Entry {
  double key;       // cost increase per unit weight of removing the unit's next bit
  std::size_t idx;  // unit index (tie-break: lower first)
};
struct EntryGreater {  // makes std::priority_queue a min-heap on (key, idx)
  bool operator()(const Entry& a, const Entry& b) const {
    return a.key > b.key || (a.key == b.key && a.idx > b.idx);
  }
};

void remove_by_heap(const std::vector<double>& c, const std::vector<int64_t>& weight,
                    int ibits, int64_t target, std::vector<int>& bits, int64_t& used) {
  const std::size_t n = c.size();
  std::vector<Entry> init;
  init.reserve(n);
  for (std::size_t i = 0; i < n; ++i) init.push_back({removal_key(c[i], ibits, weight[i]), i});
  std::priority_queue<Entry, std::vector<Entry>, EntryGreater> heap(EntryGreater(),
                                                                    std::move(init));
  // Terminates before the heap empties: the all-ones usage fits the target.
  while (used > target) {
    const std::size_t i = heap.top().idx;
    heap.pop();
    const int b = --bits[i];
    used -= weight[i];
    if (b > kMinBits) heap.push({removal_key(c[i], b, weight[i]), i});
  }
}

struct Cand {
  double key;
  uint32_t idx;  // unit
  uint32_t b;    // removal takes the unit from b to b-1 bits
};
// Strict total order of the greedy's removals: (key, unit index, b descending).
inline bool cand_less(const Cand& x, const Cand& y) {
  if (x.key != y.key) return x.key < y.key;
  if (x.idx != y.idx) return x.idx < y.idx;
  return x.b > y.b;
}

// Candidate count up to which remove_by_selection is used (16 bytes each: 32 MiB).
constexpr std::size_t kMaxSelectCandidates = std::size_t{1} << 21;

void remove_by_selection(const std::vector<double>& c, const std::vector<int64_t>& weight,
                         int ibits, int64_t target, std::vector<int>& bits, int64_t& used) {
  const std::size_t n = c.size();
  std::vector<Cand> a;
  a.reserve(n * static_cast<std::size_t>(ibits - 1));
  for (std::size_t i = 0; i < n; ++i)
    for (int b = ibits; b > kMinBits; --b)
      a.push_back({removal_key(c[i], b, weight[i]), static_cast<uint32_t>(i),
                   static_cast<uint32_t>(b)});

  // Find the shortest prefix (in cand_less order) whose weight reaches `need`; on exit
  // a[0, k) holds exactly that prefix (in some order).  [lo, hi) is the undecided range;
  // everything before lo is taken, everything from hi on is not.
  int64_t need = used - target;  // > 0
  std::size_t lo = 0, hi = a.size(), k = 0;
  int rounds_left = 64;  // introselect-style guard against degenerate pivots
  for (;;) {
    if (hi - lo <= 32 || rounds_left-- == 0) {
      std::sort(a.begin() + static_cast<std::ptrdiff_t>(lo),
                a.begin() + static_cast<std::ptrdiff_t>(hi), cand_less);
      std::size_t j = lo;
      while (need > 0) need -= weight[a[j++].idx];  // j < hi: the total covers need
      k = j;
      break;
    }
    // Median of three, moved to hi - 1, as the pivot.
    const std::size_t mid = lo + (hi - lo) / 2;
    if (cand_less(a[mid], a[lo])) std::swap(a[mid], a[lo]);
    if (cand_less(a[hi - 1], a[mid])) std::swap(a[hi - 1], a[mid]);
    if (cand_less(a[mid], a[lo])) std::swap(a[mid], a[lo]);
    std::swap(a[mid], a[hi - 1]);
    const Cand pivot = a[hi - 1];
    const std::size_t p = static_cast<std::size_t>(
        std::partition(a.begin() + static_cast<std::ptrdiff_t>(lo),
                       a.begin() + static_cast<std::ptrdiff_t>(hi - 1),
                       [&pivot](const Cand& x) { return cand_less(x, pivot); }) -
        a.begin());
    std::swap(a[p], a[hi - 1]);
    int64_t wl = 0;
    for (std::size_t j = lo; j < p; ++j) wl += weight[a[j].idx];
    if (wl >= need) {
      hi = p;
      continue;
    }
    need -= wl + weight[a[p].idx];
    if (need <= 0) {
      k = p + 1;
      break;
    }
    lo = p + 1;
  }
  for (std::size_t j = 0; j < k; ++j) {
    --bits[a[j].idx];
    used -= weight[a[j].idx];
  }
}

}  // namespace

Allocation allocate_bits(const std::vector<double>& sensitivity, const std::vector<int64_t>& weight,
                         double budget, int ibits) {
  const std::size_t n = sensitivity.size();
  if (weight.size() != n)
    throw std::invalid_argument("allocate_bits: sensitivity has " + std::to_string(n) +
                                " entries but weight has " + std::to_string(weight.size()));
  if (ibits < kMinBits || ibits > kMaxBits)
    throw std::invalid_argument("allocate_bits: ibits = " + std::to_string(ibits) +
                                " is outside 1..8");
  if (std::isnan(budget)) throw std::invalid_argument("allocate_bits: budget is NaN");

  int64_t total_w = 0;  // sum_i w_i (the all-ones usage)
  for (std::size_t i = 0; i < n; ++i) {
    if (weight[i] < 1)
      throw std::invalid_argument("allocate_bits: weight[" + std::to_string(i) + "] = " +
                                  std::to_string(weight[i]) + " must be >= 1");
    if (__builtin_add_overflow(total_w, weight[i], &total_w))
      throw std::invalid_argument("allocate_bits: total weight overflows int64");
  }
  int64_t used = 0;
  if (__builtin_mul_overflow(total_w, static_cast<int64_t>(ibits), &used))
    throw std::invalid_argument("allocate_bits: total weight * ibits overflows int64");

  const std::vector<double> c = sanitize(sensitivity, "allocate_bits");

  // used is an integer, so used <= budget  <=>  used <= floor(budget).
  int64_t target;
  if (budget >= 9223372036854775807.0)  // >= 2^63
    target = std::numeric_limits<int64_t>::max();
  else if (budget < -9223372036854775807.0)
    target = std::numeric_limits<int64_t>::min();
  else
    target = static_cast<int64_t>(std::floor(budget));

  Allocation a;
  if (total_w > target) {  // even 1 bit everywhere does not fit
    a.bits.assign(n, kMinBits);
    a.used = total_w;
    a.feasible = false;
    a.cost = cost_of(c, a.bits);
    return a;
  }

  a.bits.assign(n, ibits);
  // ibits > 1 here: ibits == 1 means used == total_w <= target.
  if (used > target) {
    if (n * static_cast<std::size_t>(ibits - 1) <= kMaxSelectCandidates)
      remove_by_selection(c, weight, ibits, target, a.bits, used);
    else
      remove_by_heap(c, weight, ibits, target, a.bits, used);
  }
  a.used = used;
  a.feasible = true;
  a.cost = cost_of(c, a.bits);
  return a;
}

namespace {
// dinv[ibits], ..., dinv[2] as a double tensor on `dev`, cached: a training
// step asks for it once per layer.
at::Tensor dinv_table(const at::Device& dev, int ibits) {
  static std::mutex mu;
  static std::map<std::pair<std::string, int>, at::Tensor> cache;
  std::lock_guard<std::mutex> lock(mu);
  at::Tensor& t = cache[{dev.str(), ibits}];
  if (!t.defined()) {
    at::NoGradGuard no_grad;
    t = at::empty({ibits - 1}, at::TensorOptions().dtype(at::kDouble).device(dev));
    for (int j = 0; j < ibits - 1; ++j) t.narrow(0, j, 1).fill_(tables().dinv[ibits - j]);
  }
  return t;
}
}  // namespace

// The device version lays the candidate removals out unit-major with b descending
// (flat index f = i * (ibits - 1) + (ibits - b)), so a stable sort of their keys yields
// exactly the (key, unit index, b descending) order of cand_less, and the greedy's
// removals are the shortest prefix of that order whose weight covers the excess.  Every
// step is an elementwise op, a reduction, a sort, a cumsum or a gather: nothing is read
// back, and no scatter is needed (atomics, or a sync under deterministic algorithms).
at::Tensor allocate_bits_tensor(const at::Tensor& cost, const at::Tensor& weight,
                                const at::Tensor& target, int ibits) {
  if (ibits < kMinBits || ibits > kMaxBits)
    throw std::invalid_argument("allocate_bits_tensor: ibits = " + std::to_string(ibits) +
                                " is outside 1..8");
  if (!cost.defined() || cost.dim() != 1 || !cost.is_floating_point())
    throw std::invalid_argument("allocate_bits_tensor: cost must be a 1-d floating tensor");
  const int64_t n = cost.size(0);
  const at::Device dev = cost.device();
  if (weight.defined() && (weight.dim() != 1 || weight.size(0) != n ||
                           weight.scalar_type() != at::kLong || weight.device() != dev))
    throw std::invalid_argument("allocate_bits_tensor: weight must be int64 [" +
                                std::to_string(n) + "] on " + dev.str());
  if (!target.defined() || target.dim() != 0 || target.scalar_type() != at::kLong ||
      target.device() != dev)
    throw std::invalid_argument("allocate_bits_tensor: target must be an int64 0-d tensor on " +
                                dev.str());

  at::NoGradGuard no_grad;
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(dev);
  // ibits == 1 leaves no choice: 1 bit everywhere, feasible or not (as allocate_bits).
  if (n == 0 || ibits == kMinBits) return at::full({n}, kMinBits, lopts.dtype(at::kInt));
  const int64_t m = ibits - 1;  // candidates per unit

  // sanitize() without the throw.  `c <= 0` also turns -0.0 into +0.0: CUDA's radix sort
  // may order the two zeros by their bits, where cand_less sees equal keys.  NaN fails
  // the comparison, so it survives to be replaced along with +Inf below.  Finite values are
  // now >= 0, so a negative maximum means that none is finite.
  at::Tensor c = cost.to(at::kDouble);
  c = at::where(c <= 0, 0.0, c);
  const at::Tensor finite = at::isfinite(c);
  const at::Tensor maxf = at::where(finite, c, -1.0).max();
  c = at::where(finite, c, at::where(maxf < 0, 1e300, maxf));

  // dinv[ibits], ..., dinv[2], filled from the host table rather than copied (a copy
  // from pageable host memory synchronises) or recomputed on the device (which would
  // have to round exactly like the host); made once per device and ibits.
  const at::Tensor dinv = dinv_table(dev, ibits);

  const at::Tensor w = weight.defined() ? weight : at::ones({n}, lopts);
  // removal_key's (c * dinv[b]) / w, each op rounded once as on the host.  w is a device
  // tensor: CUDA divides by a host scalar through its reciprocal, which rounds twice.
  // (Unit weights: dividing by 1 is exact, so it is skipped.)
  at::Tensor key = c.unsqueeze(1) * dinv.unsqueeze(0);
  if (weight.defined()) key = key.div(w.to(at::kDouble).unsqueeze(1));
  key = key.reshape({-1});
  const at::Tensor excess = w.sum() * ibits - target.clamp_min(0);  // clamp: no overflow

  at::Tensor skey, perm;
  std::tie(skey, perm) = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor ws = w.index_select(0, at::div(perm, m, "floor"));
  // Sorted candidate j is removed iff the removals before it still fall short; with
  // positive weights that is a prefix, of length k.  A target below sum(w) makes excess
  // exceed the weight of all candidates, so all go: 1 bit everywhere, as on the host.
  const at::Tensor k = ((ws.cumsum(0) - ws) < excess).sum();
  // Map the prefix back to candidate order by comparing with its last element (key K,
  // flat index F) in the strict (key, f) order, instead of scattering through perm.
  const at::Tensor last = (k - 1).clamp_min(0).reshape({1});
  const at::Tensor K = skey.index_select(0, last);
  const at::Tensor F = perm.index_select(0, last);
  const at::Tensor f = at::arange(n * m, lopts);
  const at::Tensor removed = (k > 0) & ((key < K) | ((key == K) & (f <= F)));
  return at::rsub(removed.view({n, m}).sum(1), ibits).to(at::kInt);
}

at::Tensor allocate_bits_tensor(const at::Tensor& cost, const at::Tensor& weight, int64_t target,
                                int ibits) {
  if (!cost.defined())
    throw std::invalid_argument("allocate_bits_tensor: cost must be a 1-d floating tensor");
  // A fill, not a copy from the host: no synchronisation.
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(cost.device());
  return allocate_bits_tensor(cost, weight, at::full({}, target, lopts), ibits);
}

double bit_cost_step(int b) {
  if (b < 2 || b > kMaxBits) throw std::invalid_argument("bit_cost_step: b = " + std::to_string(b) + " is outside 2..8");
  return tables().dinv[b];
}

double allocation_cost(const std::vector<double>& sensitivity, const std::vector<int>& bits) {
  if (sensitivity.size() != bits.size())
    throw std::invalid_argument("allocation_cost: sensitivity has " +
                                std::to_string(sensitivity.size()) + " entries but bits has " +
                                std::to_string(bits.size()));
  for (std::size_t i = 0; i < bits.size(); ++i)
    if (bits[i] < kMinBits || bits[i] > kMaxBits)
      throw std::invalid_argument("allocation_cost: bits[" + std::to_string(i) + "] = " +
                                  std::to_string(bits[i]) + " is outside 1..8");
  return cost_of(sanitize(sensitivity, "allocation_cost"), bits);
}

}  // namespace aq
