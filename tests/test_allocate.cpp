// Tests for the greedy bit allocation (aq/allocate.h, docs/design.md §5).
#include "aq/allocate.h"
#include "aq/adaptive.h"

#include "device_test.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#if __has_include(<c10/cuda/CUDAFunctions.h>) && __has_include(<cuda_runtime_api.h>)
// Header-only (inline) here, so usable without linking c10_cuda.
#include <c10/cuda/CUDAFunctions.h>
#define AQ_TEST_SYNC_DEBUG 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <queue>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using aq::Allocation;
using aq::allocate_bits;
using aq::allocate_bits_tensor;
using aq::allocation_cost;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double q_inv(int b) {
  const double q = std::ldexp(1.0, b) - 1.0;
  return 1.0 / (q * q);
}

// Exhaustive search over bits 1..maxbits for every unit.  best[W] is the least cost of an
// allocation that uses at most W weight (infinity when none fits); best.size() is
// maxbits * sum(w) + 1.
class Brute {
 public:
  Brute(const std::vector<double>& c, const std::vector<int64_t>& w, int maxbits)
      : c_(c), w_(w), maxbits_(maxbits) {
    const int64_t total = std::accumulate(w.begin(), w.end(), int64_t{0});
    best_.assign(static_cast<std::size_t>(maxbits * total + 1), kInf);
    rec(0, 0, 0.0);
    for (std::size_t k = 1; k < best_.size(); ++k) best_[k] = std::min(best_[k], best_[k - 1]);
  }
  // Optimum for an integer budget (budgets past the top are clamped).
  double opt(int64_t budget) const {
    if (budget < 0) return kInf;
    const auto k = std::min<std::size_t>(static_cast<std::size_t>(budget), best_.size() - 1);
    return best_[k];
  }

 private:
  void rec(std::size_t i, int64_t used, double cost) {
    if (i == c_.size()) {
      best_[used] = std::min(best_[used], cost);
      return;
    }
    for (int b = 1; b <= maxbits_; ++b) rec(i + 1, used + w_[i] * b, cost + c_[i] * q_inv(b));
  }
  std::vector<double> c_;
  std::vector<int64_t> w_;
  int maxbits_;
  std::vector<double> best_;
};

// Sensitivities spanning 12 orders of magnitude, with occasional zeros and repeats.
std::vector<double> random_sens(std::mt19937_64& rng, std::size_t n) {
  std::uniform_real_distribution<double> expo(-6.0, 6.0);
  std::uniform_int_distribution<int> pick(0, 19);
  std::vector<double> c(n);
  for (std::size_t i = 0; i < n; ++i) {
    const int p = pick(rng);
    if (p == 0)
      c[i] = 0.0;
    else if (p == 1 && i > 0)
      c[i] = c[i - 1];
    else
      c[i] = std::pow(10.0, expo(rng));
  }
  return c;
}

int64_t sum_wb(const std::vector<int64_t>& w, const std::vector<int>& b) {
  int64_t s = 0;
  for (std::size_t i = 0; i < w.size(); ++i) s += w[i] * b[i];
  return s;
}

// The greedy exactly as docs/design.md §5 states it: a std::priority_queue min-heap on
// (cost increase per unit weight, unit index), popped until the budget holds.  The
// library must return the same bits (it uses an equivalent selection for speed).
std::vector<int> reference_greedy(const std::vector<double>& c, const std::vector<int64_t>& w,
                                  double budget, int ibits) {
  struct E {
    double key;
    std::size_t i;
  };
  auto greater = [](const E& a, const E& b) {
    return a.key > b.key || (a.key == b.key && a.i > b.i);
  };
  std::priority_queue<E, std::vector<E>, decltype(greater)> heap(greater);
  auto key = [&](std::size_t i, int b) {
    return c[i] * (q_inv(b - 1) - q_inv(b)) / static_cast<double>(w[i]);
  };
  std::vector<int> bits(c.size(), ibits);
  int64_t used = 0;
  for (std::size_t i = 0; i < c.size(); ++i) {
    used += w[i] * ibits;
    if (ibits > 1) heap.push({key(i, ibits), i});
  }
  while (static_cast<double>(used) > budget && !heap.empty()) {
    const std::size_t i = heap.top().i;
    heap.pop();
    used -= w[i];
    if (--bits[i] > 1) heap.push({key(i, bits[i]), i});
  }
  return bits;
}

// Invariants every feasible result must satisfy.
void check_result(const Allocation& a, const std::vector<double>& c,
                  const std::vector<int64_t>& w, double budget, int ibits) {
  ASSERT_EQ(a.bits.size(), c.size());
  for (int b : a.bits) {
    ASSERT_GE(b, 1);
    ASSERT_LE(b, ibits);
  }
  EXPECT_EQ(a.used, sum_wb(w, a.bits));
  EXPECT_DOUBLE_EQ(a.cost, allocation_cost(c, a.bits));
  const int64_t total = std::accumulate(w.begin(), w.end(), int64_t{0});
  if (static_cast<double>(total) > budget) {
    EXPECT_FALSE(a.feasible);
    return;
  }
  EXPECT_TRUE(a.feasible);
  EXPECT_LE(static_cast<double>(a.used), budget);
  if (a.used < total * ibits) {
    // Some bit was removed, so before the last removal (of some unit j with
    // bits_j < ibits) the budget did not hold: used + w_j > budget.
    const int64_t wmax = *std::max_element(w.begin(), w.end());
    EXPECT_GT(static_cast<double>(a.used), budget - static_cast<double>(wmax));
    bool some = false;
    for (std::size_t j = 0; j < w.size(); ++j)
      if (a.bits[j] < ibits && static_cast<double>(a.used + w[j]) > budget) some = true;
    EXPECT_TRUE(some) << "more bits removed than needed";
  } else {
    EXPECT_EQ(a.used, total * ibits);
  }
}

bool rel_close(double x, double y, double tol) {
  return std::fabs(x - y) <= tol * std::max(std::fabs(x), std::fabs(y));
}

// --- against brute force ----------------------------------------------------------

// With equal weights the greedy is optimal (separable convex costs, unit steps).
// Brute force enumerates bits 1..ibits: the greedy only removes bits, so ibits is the cap.
TEST(AllocateGreedy, EqualWeightsMatchBruteForce) {
  std::mt19937_64 rng(12345);
  int checked = 0;
  for (int inst = 0; inst < 300; ++inst) {
    const std::size_t n = 1 + rng() % 6;
    const int ibits = (inst % 3 == 0) ? 2 + static_cast<int>(rng() % 7) : 8;
    const int64_t wv = (inst % 2 == 0) ? 1 : 1 + static_cast<int64_t>(rng() % 5);
    const std::vector<double> c = random_sens(rng, n);
    const std::vector<int64_t> w(n, wv);
    const Brute brute(c, w, ibits);
    const int64_t lo = static_cast<int64_t>(n) * wv, hi = ibits * lo;
    for (int64_t budget = lo; budget <= hi; ++budget) {
      const Allocation a = allocate_bits(c, w, static_cast<double>(budget), ibits);
      check_result(a, c, w, static_cast<double>(budget), ibits);
      const double opt = brute.opt(budget);
      ASSERT_TRUE(rel_close(a.cost, opt, 1e-12) || a.cost == opt)
          << "inst " << inst << " n " << n << " ibits " << ibits << " budget " << budget
          << ": greedy " << a.cost << " optimum " << opt;
      ++checked;
    }
  }
  EXPECT_GT(checked, 3000);
}

// With unequal weights the greedy is not always optimal, but it is at least as good as
// the optimum at the budget reduced by the largest weight (its result is the optimum of
// the continuous relaxation at its own usage, which exceeds budget - max w).  Over the
// 200 instances here (n <= 6, weights 1..20, ibits 8 or random 2..8, every integer
// budget from sum w to ibits * sum w: 46,078 budgets) the greedy cost equals the
// brute-force optimum (within 1e-12 relative) in 28,312 cases (~61%); the bound check
// applies where budget - max w is still feasible (42,971 budgets).
TEST(AllocateGreedy, UnequalWeightsWithinGreedyBound) {
  std::mt19937_64 rng(777);
  long budgets = 0, optimal = 0, bounded = 0;
  for (int inst = 0; inst < 200; ++inst) {
    const std::size_t n = 1 + rng() % 6;
    const int ibits = (inst % 3 == 0) ? 2 + static_cast<int>(rng() % 7) : 8;
    const std::vector<double> c = random_sens(rng, n);
    std::vector<int64_t> w(n);
    for (auto& x : w) x = 1 + static_cast<int64_t>(rng() % 20);
    const int64_t total = std::accumulate(w.begin(), w.end(), int64_t{0});
    const int64_t wmax = *std::max_element(w.begin(), w.end());
    const Brute brute(c, w, ibits);
    for (int64_t budget = total; budget <= ibits * total; ++budget) {
      const Allocation a = allocate_bits(c, w, static_cast<double>(budget), ibits);
      check_result(a, c, w, static_cast<double>(budget), ibits);
      const double opt = brute.opt(budget);
      // Never better than the optimum (sanity of both sides).
      ASSERT_GE(a.cost, opt * (1 - 1e-12));
      ++budgets;
      if (rel_close(a.cost, opt, 1e-12) || a.cost == opt) ++optimal;
      if (budget - wmax >= total) {
        const double reduced = brute.opt(budget - wmax);
        ASSERT_LE(a.cost, reduced * (1 + 1e-12))
            << "inst " << inst << " budget " << budget << ": greedy " << a.cost
            << " optimum at budget - max w " << reduced;
        ++bounded;
      }
    }
  }
  EXPECT_GT(bounded, 1000);
  EXPECT_GT(optimal, 0);
  EXPECT_GT(budgets, 0);
}

// --- budget ----------------------------------------------------------------------

TEST(AllocateBudget, ExactOnLargerRandomProblems) {
  std::mt19937_64 rng(99);
  for (int inst = 0; inst < 200; ++inst) {
    const std::size_t n = 1 + rng() % 500;
    const int ibits = 1 + static_cast<int>(rng() % 8);
    const std::vector<double> c = random_sens(rng, n);
    std::vector<int64_t> w(n);
    const int64_t wcap = (inst % 2 == 0) ? 1 : 1000;
    for (auto& x : w) x = 1 + static_cast<int64_t>(rng() % wcap);
    const double total = static_cast<double>(std::accumulate(w.begin(), w.end(), int64_t{0}));
    // Budgets from below all-ones to above ibits, including fractional ones.
    std::uniform_real_distribution<double> avg(0.8, ibits + 0.5);
    for (int k = 0; k < 5; ++k) {
      double budget = avg(rng) * total;
      if (k == 0) budget = std::floor(budget);
      const Allocation a = allocate_bits(c, w, budget, ibits);
      check_result(a, c, w, budget, ibits);
    }
  }
}

TEST(AllocateBudget, FractionalBudget) {
  const std::vector<double> c = {1, 2, 3, 4, 5, 6, 7};
  const std::vector<int64_t> w(7, 1);
  const Allocation a = allocate_bits(c, w, 2.5 * 7, 8);  // 17.5
  EXPECT_TRUE(a.feasible);
  EXPECT_EQ(a.used, 17);
  check_result(a, c, w, 17.5, 8);
  // Same as the integer budget floor(17.5).
  EXPECT_EQ(a.bits, allocate_bits(c, w, 17.0, 8).bits);
  // Weighted: budget 2.5 * total weight.
  const std::vector<int64_t> w2 = {3, 1, 4, 1, 5, 9, 2};
  const double b2 = 2.5 * 25;
  const Allocation a2 = allocate_bits(c, w2, b2, 8);
  check_result(a2, c, w2, b2, 8);
}

// --- monotonicity ------------------------------------------------------------------

TEST(AllocateMonotone, MoreSensitiveNeverFewerBits) {
  std::mt19937_64 rng(4242);
  std::uniform_real_distribution<double> expo(-8.0, 8.0);
  for (int inst = 0; inst < 50; ++inst) {
    const std::size_t n = 2 + rng() % 300;
    std::vector<double> c(n);
    for (auto& x : c) x = std::pow(10.0, expo(rng));
    if (inst % 5 == 0) c[0] = 0.0;
    const int64_t wv = 1 + static_cast<int64_t>(rng() % 100);
    const std::vector<int64_t> w(n, wv);
    const int ibits = 2 + static_cast<int>(rng() % 7);
    std::uniform_real_distribution<double> avg(1.0, ibits);
    const double budget = avg(rng) * static_cast<double>(n * wv);
    const Allocation a = allocate_bits(c, w, budget, ibits);
    check_result(a, c, w, budget, ibits);
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = 0; j < n; ++j)
        if (c[i] > c[j]) {
          ASSERT_GE(a.bits[i], a.bits[j]) << "C " << c[i] << " vs " << c[j];
        }
  }
}

// --- edge cases --------------------------------------------------------------------

TEST(AllocateEdge, AllZeroSensitivitiesDeterministic) {
  const std::vector<double> c(4, 0.0);
  const std::vector<int64_t> w(4, 1);
  // 32 -> 20: twelve bits go, lowest index first (ties by index): unit 0 to 1 bit
  // (7 bits), then unit 1 loses 5.
  const Allocation a = allocate_bits(c, w, 20, 8);
  EXPECT_TRUE(a.feasible);
  EXPECT_EQ(a.used, 20);
  EXPECT_EQ(a.bits, (std::vector<int>{1, 3, 8, 8}));
  EXPECT_EQ(a.cost, 0.0);
  EXPECT_EQ(allocate_bits(c, w, 20, 8).bits, a.bits);
  // Weighted zeros still meet the budget exactly when it is reachable.
  const std::vector<int64_t> w2 = {2, 2, 2, 2};
  const Allocation a2 = allocate_bits(c, w2, 40, 8);
  EXPECT_EQ(a2.used, 40);
  check_result(a2, c, w2, 40, 8);
}

TEST(AllocateEdge, EqualSensitivitiesTieByIndex) {
  const std::vector<double> c(3, 5.0);
  const std::vector<int64_t> w(3, 1);
  // 24 -> 22: unit 0 goes 8->7, then units 1 (8->7) since its key is now the lowest.
  EXPECT_EQ(allocate_bits(c, w, 22, 8).bits, (std::vector<int>{7, 7, 8}));
  EXPECT_EQ(allocate_bits(c, w, 21, 8).bits, (std::vector<int>{7, 7, 7}));
  EXPECT_EQ(allocate_bits(c, w, 20, 8).bits, (std::vector<int>{6, 7, 7}));
}

TEST(AllocateEdge, OneUnit) {
  const std::vector<double> c = {3.0};
  const std::vector<int64_t> w = {10};
  for (int b = 1; b <= 8; ++b) {
    const Allocation a = allocate_bits(c, w, 10.0 * b + 9.5, 8);
    EXPECT_TRUE(a.feasible);
    EXPECT_EQ(a.bits, std::vector<int>{b});
    EXPECT_EQ(a.used, 10 * b);
    EXPECT_DOUBLE_EQ(a.cost, 3.0 * q_inv(b));
  }
  const Allocation bad = allocate_bits(c, w, 9.99, 8);
  EXPECT_FALSE(bad.feasible);
  EXPECT_EQ(bad.bits, std::vector<int>{1});
  EXPECT_EQ(bad.used, 10);
}

TEST(AllocateEdge, BudgetAtIbitsRemovesNothing) {
  const std::vector<double> c = {1e-3, 5.0, 0.0, 2e4};
  const std::vector<int64_t> w = {7, 1, 100, 33};
  for (int ibits = 1; ibits <= 8; ++ibits) {
    for (double budget : {141.0 * ibits, 141.0 * ibits + 0.5, 1e30, kInf}) {
      const Allocation a = allocate_bits(c, w, budget, ibits);
      EXPECT_TRUE(a.feasible);
      EXPECT_EQ(a.bits, std::vector<int>(4, ibits));
      EXPECT_EQ(a.used, 141 * ibits);
    }
  }
}

TEST(AllocateEdge, BelowAllOnesIsInfeasible) {
  const std::vector<double> c = {1.0, 2.0, 3.0};
  const std::vector<int64_t> w = {5, 6, 7};
  for (double budget : {17.999, 0.0, -5.0, -kInf}) {
    const Allocation a = allocate_bits(c, w, budget, 8);
    EXPECT_FALSE(a.feasible);
    EXPECT_EQ(a.bits, std::vector<int>(3, 1));
    EXPECT_EQ(a.used, 18);
    EXPECT_DOUBLE_EQ(a.cost, 6.0);
  }
  const Allocation exact = allocate_bits(c, w, 18.0, 8);
  EXPECT_TRUE(exact.feasible);
  EXPECT_EQ(exact.bits, std::vector<int>(3, 1));
}

TEST(AllocateEdge, IbitsOne) {
  const std::vector<double> c = {4.0, 1.0};
  const std::vector<int64_t> w = {2, 3};
  const Allocation a = allocate_bits(c, w, 5, 1);
  EXPECT_TRUE(a.feasible);
  EXPECT_EQ(a.bits, (std::vector<int>{1, 1}));
  EXPECT_EQ(a.used, 5);
  EXPECT_DOUBLE_EQ(a.cost, 5.0);
  EXPECT_FALSE(allocate_bits(c, w, 4.5, 1).feasible);
}

TEST(AllocateEdge, EmptyInput) {
  const Allocation a = allocate_bits({}, {}, 0.0, 8);
  EXPECT_TRUE(a.feasible);
  EXPECT_TRUE(a.bits.empty());
  EXPECT_EQ(a.used, 0);
  EXPECT_EQ(a.cost, 0.0);
}

TEST(AllocateEdge, NonFiniteSensitivities) {
  const std::vector<int64_t> w(4, 1);
  // NaN and +Inf act as the largest finite value present (5).
  const std::vector<double> c = {kNaN, 1.0, 5.0, kInf};
  const std::vector<double> same = {5.0, 1.0, 5.0, 5.0};
  for (int budget = 4; budget <= 32; ++budget) {
    const Allocation a = allocate_bits(c, w, budget, 8);
    const Allocation b = allocate_bits(same, w, budget, 8);
    EXPECT_EQ(a.bits, b.bits);
    EXPECT_EQ(a.cost, b.cost);
    EXPECT_TRUE(std::isfinite(a.cost));
    EXPECT_EQ(allocation_cost(c, a.bits), a.cost);
  }
  // None finite: 1e300 each, ties by index.
  const std::vector<double> none = {kNaN, kInf};
  const Allocation n2 = allocate_bits(none, {1, 1}, 14, 8);
  EXPECT_EQ(n2.bits, (std::vector<int>{7, 7}));
  EXPECT_DOUBLE_EQ(n2.cost, 2e300 * q_inv(7));
}

TEST(AllocateEdge, InvalidInputsThrow) {
  const std::vector<double> c = {1.0, 2.0};
  const std::vector<int64_t> w = {1, 1};
  EXPECT_THROW(allocate_bits(c, {1}, 4, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits({1.0}, w, 4, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits(c, {1, 0}, 4, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits(c, {-3, 1}, 4, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits(c, w, 4, 0), std::invalid_argument);
  EXPECT_THROW(allocate_bits(c, w, 4, 9), std::invalid_argument);
  EXPECT_THROW(allocate_bits(c, w, 4, -1), std::invalid_argument);
  EXPECT_THROW(allocate_bits({1.0, -1e-9}, w, 4, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits({1.0, -kInf}, w, 4, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits(c, w, kNaN, 8), std::invalid_argument);
  const int64_t big = std::numeric_limits<int64_t>::max() / 4;
  EXPECT_THROW(allocate_bits(c, {big, big}, 4, 8), std::invalid_argument);  // sum w * 8 overflows
  EXPECT_THROW(allocation_cost(c, {1}), std::invalid_argument);
  EXPECT_THROW(allocation_cost(c, {1, 9}), std::invalid_argument);
  EXPECT_THROW(allocation_cost(c, {0, 1}), std::invalid_argument);
  EXPECT_THROW(allocation_cost({-1.0, 1.0}, {1, 1}), std::invalid_argument);
  try {
    allocate_bits(c, {1}, 4, 8);
    FAIL() << "no throw";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("weight"), std::string::npos) << e.what();
  }
}

TEST(AllocateCost, Objective) {
  EXPECT_DOUBLE_EQ(allocation_cost({9.0, 225.0, 0.0}, {2, 4, 8}), 1.0 + 1.0);
  EXPECT_DOUBLE_EQ(allocation_cost({65025.0}, {8}), 1.0);
  EXPECT_EQ(allocation_cost({}, {}), 0.0);
}

// --- same as the heap greedy ---------------------------------------------------------

TEST(AllocateReference, SameBitsAsPriorityQueueGreedy) {
  std::mt19937_64 rng(31337);
  for (int inst = 0; inst < 400; ++inst) {
    const std::size_t n = 1 + rng() % 400;
    const int ibits = 2 + static_cast<int>(rng() % 7);
    std::vector<double> c = random_sens(rng, n);
    if (inst % 4 == 0)  // heavy ties: few distinct values
      for (auto& x : c) x = static_cast<double>(rng() % 3);
    std::vector<int64_t> w(n);
    const int64_t wcap = (inst % 3 == 0) ? 1 : (inst % 3 == 1) ? 7 : 100000;
    for (auto& x : w) x = 1 + static_cast<int64_t>(rng() % wcap);
    const double total = static_cast<double>(std::accumulate(w.begin(), w.end(), int64_t{0}));
    std::uniform_real_distribution<double> avg(1.0, ibits);
    const double budget = avg(rng) * total;
    const Allocation a = allocate_bits(c, w, budget, ibits);
    ASSERT_EQ(a.bits, reference_greedy(c, w, budget, ibits)) << "instance " << inst;
    check_result(a, c, w, budget, ibits);
  }
}

// Past 2^21 candidate removals (units * (ibits - 1)) the library switches from the
// selection to the heap itself; check that path too.
TEST(AllocateReference, LargeProblemUsesHeapPathSameBits) {
  std::mt19937_64 rng(5);
  const std::size_t n = 310000;  // 310000 * 7 > 2^21
  // Few distinct (sensitivity, weight) pairs, so the cut falls inside a tie group and
  // the index tie-break decides which units lose the bit.
  std::vector<double> c(n);
  std::vector<int64_t> w(n);
  for (std::size_t i = 0; i < n; ++i) {
    c[i] = static_cast<double>(rng() % 3);
    w[i] = 1 + static_cast<int64_t>(rng() % 3);
  }
  const double total = static_cast<double>(std::accumulate(w.begin(), w.end(), int64_t{0}));
  const double budget = 5.5 * total + 0.5;
  const Allocation a = allocate_bits(c, w, budget, 8);
  ASSERT_EQ(a.bits, reference_greedy(c, w, budget, 8));
  check_result(a, c, w, budget, 8);
}

// --- large ---------------------------------------------------------------------------

// The performance-sized case (30,000 units, weights 1e4..1e6, 8 bits down to a mean of
// 2): only correctness is asserted here; no timing.
TEST(AllocateLarge, ThirtyThousandUnits) {
  std::mt19937_64 rng(2024);
  const std::size_t n = 30000;
  std::uniform_int_distribution<int64_t> wd(10000, 1000000);
  std::uniform_real_distribution<double> expo(-6.0, 6.0);
  std::vector<double> c(n);
  std::vector<int64_t> w(n);
  for (std::size_t i = 0; i < n; ++i) {
    w[i] = wd(rng);
    c[i] = std::pow(10.0, expo(rng));
  }
  const int64_t total = std::accumulate(w.begin(), w.end(), int64_t{0});
  const double budget = 2.0 * static_cast<double>(total);
  const Allocation a = allocate_bits(c, w, budget, 8);
  ASSERT_TRUE(a.feasible);
  EXPECT_LE(static_cast<double>(a.used), budget);
  EXPECT_GT(static_cast<double>(a.used), budget - 1e6);
  EXPECT_EQ(a.used, sum_wb(w, a.bits));
  EXPECT_NEAR(static_cast<double>(a.used) / static_cast<double>(total), 2.0, 1e-3);
  EXPECT_DOUBLE_EQ(a.cost, allocation_cost(c, a.bits));
  EXPECT_TRUE(std::isfinite(a.cost));
}

// --- on the device: allocate_bits_tensor -----------------------------------------------

// Run per device like DeviceTest, but named Allocate/... so that the 'allocate' unit
// test's Allocate* filter picks these cases up.
class AllocateTensor : public DeviceTest {
 protected:
  // allocate_bits_tensor's bits on the host.  cost is given as doubles and stored as
  // `dt`; unit_weights passes an undefined weight (w must then be all ones).
  std::vector<int> device_bits(const std::vector<double>& c, const std::vector<int64_t>& w,
                               int64_t target, int ibits, torch::Dtype dt = torch::kDouble,
                               bool unit_weights = false) const {
    const torch::Tensor cost = torch::tensor(c, torch::kDouble).to(opts(dt));
    const torch::Tensor weight = unit_weights ? torch::Tensor() : torch::tensor(w).to(dev());
    const torch::Tensor t = torch::full({}, target, opts(torch::kLong));
    const torch::Tensor out = allocate_bits_tensor(cost, weight, t, ibits);
    EXPECT_EQ(out.scalar_type(), torch::kInt);
    EXPECT_EQ(out.device().type(), dev().type());
    EXPECT_EQ(out.dim(), 1);
    EXPECT_EQ(out.size(0), static_cast<int64_t>(c.size()));
    const torch::Tensor h = out.cpu().contiguous();
    return std::vector<int>(h.data_ptr<int>(), h.data_ptr<int>() + h.numel());
  }
  // The doubles that allocate_bits must see for the device's `dt` cost.
  static std::vector<double> as_dtype(const std::vector<double>& c, torch::Dtype dt) {
    const torch::Tensor r = torch::tensor(c, torch::kDouble).to(dt).to(torch::kDouble);
    return std::vector<double>(r.data_ptr<double>(), r.data_ptr<double>() + r.numel());
  }
};

INSTANTIATE_TEST_SUITE_P(Allocate, AllocateTensor, ::testing::Values("cpu", "cuda"),
                         [](const auto& info) { return std::string(info.param); });

// Many random problems, every kind of weight and tie, budgets from below all-ones to
// above ibits: the bits must equal allocate_bits' exactly.
TEST_P(AllocateTensor, SameBitsAsAllocateBitsRandom) {
  std::mt19937_64 rng(2718);
  int compared = 0, removals = 0, partial = 0;
  for (int inst = 0; inst < 600; ++inst) {
    const std::size_t n = 1 + rng() % ((inst % 10 == 0) ? 3000 : 300);
    const int ibits = 1 + static_cast<int>(rng() % 8);
    std::vector<double> c = random_sens(rng, n);
    switch (inst % 6) {
      case 0:  // heavy ties: few distinct values
        for (auto& x : c) x = static_cast<double>(rng() % 3);
        break;
      case 1:  // all zero
        std::fill(c.begin(), c.end(), 0.0);
        break;
      case 2:  // NaN and +Inf among finite values
        for (auto& x : c)
          if (rng() % 8 == 0) x = (rng() % 2) ? kNaN : kInf;
        break;
      case 3:  // repeated values in runs
        for (std::size_t i = 1; i < n; ++i)
          if (rng() % 2) c[i] = c[i - 1];
        break;
      default:
        break;
    }
    const bool unit = inst % 3 == 0;
    const int64_t wcap = unit ? 1 : (inst % 3 == 1) ? 7 : 100000;
    std::vector<int64_t> w(n);
    for (auto& x : w) x = 1 + static_cast<int64_t>(rng() % wcap);
    const int64_t total = std::accumulate(w.begin(), w.end(), int64_t{0});
    const torch::Dtype dt = (inst % 7 == 0) ? torch::kFloat : (inst % 11 == 0) ? torch::kHalf
                                                                               : torch::kDouble;
    const std::vector<double> cref = as_dtype(c, dt);
    std::uniform_real_distribution<double> avg(0.9, ibits + 0.2);
    for (int k = 0; k < 3; ++k) {
      const auto target = static_cast<int64_t>(std::floor(avg(rng) * static_cast<double>(total)));
      const Allocation a = allocate_bits(cref, w, static_cast<double>(target), ibits);
      ASSERT_EQ(device_bits(c, w, target, ibits, dt, unit && k != 1), a.bits)
          << "instance " << inst << " n " << n << " ibits " << ibits << " target " << target;
      ++compared;
      if (a.feasible && a.used < total * ibits) ++removals;
      if (a.feasible && a.used < total * ibits && a.used > total) ++partial;
    }
  }
  EXPECT_EQ(compared, 1800);
  EXPECT_GT(removals, 900);  // the comparisons mostly exercise actual removals
  EXPECT_GT(partial, 900);
}

// Small problems, every integer target: each cut position of the removal order, with
// ties across units and within a unit's own bits.
TEST_P(AllocateTensor, SameBitsEveryTargetSmall) {
  std::mt19937_64 rng(161803);
  long compared = 0;
  for (int inst = 0; inst < 60; ++inst) {
    const std::size_t n = 1 + rng() % 6;
    const int ibits = 2 + static_cast<int>(rng() % 7);
    std::vector<double> c = random_sens(rng, n);
    if (inst % 3 == 0)
      for (auto& x : c) x = static_cast<double>(rng() % 2);
    std::vector<int64_t> w(n);
    for (auto& x : w) x = 1 + static_cast<int64_t>(rng() % ((inst % 2) ? 1 : 5));
    const int64_t total = std::accumulate(w.begin(), w.end(), int64_t{0});
    for (int64_t target = total - 2; target <= ibits * total + 2; ++target) {
      ASSERT_EQ(device_bits(c, w, target, ibits),
                allocate_bits(c, w, static_cast<double>(target), ibits).bits)
          << "instance " << inst << " target " << target;
      ++compared;
    }
  }
  EXPECT_GT(compared, 1000);
}

// With unit weights every reachable target is met exactly: sum(bits) == target.
TEST_P(AllocateTensor, UnitWeightsBudgetExact) {
  std::mt19937_64 rng(1414);
  for (int inst = 0; inst < 40; ++inst) {
    const std::size_t n = 1 + rng() % 200;
    const int ibits = 2 + static_cast<int>(rng() % 7);
    const std::vector<double> c = random_sens(rng, n);
    const std::vector<int64_t> w(n, 1);
    const auto nn = static_cast<int64_t>(n);
    for (int64_t target : {nn, nn + 1, (nn * (ibits + 1)) / 2, ibits * nn - 1, ibits * nn}) {
      const std::vector<int> b = device_bits(c, w, target, ibits, torch::kFloat, true);
      EXPECT_EQ(std::accumulate(b.begin(), b.end(), int64_t{0}), target);
      for (int x : b) {
        ASSERT_GE(x, 1);
        ASSERT_LE(x, ibits);
      }
    }
  }
}

// The candidate count that takes CUDA's sort to its large-input path (more than 4096 per
// segment), with ties: few distinct (sensitivity, weight) pairs, so the cut falls inside
// a tie group and the unit index decides.
TEST_P(AllocateTensor, SameBitsLargeWithTies) {
  std::mt19937_64 rng(5);
  const std::size_t n = 200000;
  std::vector<double> c(n);
  std::vector<int64_t> w(n);
  for (std::size_t i = 0; i < n; ++i) {
    c[i] = static_cast<double>(rng() % 3);
    w[i] = 1 + static_cast<int64_t>(rng() % 3);
  }
  const int64_t total = std::accumulate(w.begin(), w.end(), int64_t{0});
  for (int64_t target : {total * 11 / 2 + 1, total * 3 - 7}) {
    const Allocation a = allocate_bits(c, w, static_cast<double>(target), 8);
    ASSERT_TRUE(a.feasible);
    EXPECT_EQ(device_bits(c, w, target, 8), a.bits) << "target " << target;
  }
}

TEST_P(AllocateTensor, KnownTieOrders) {
  // Zeros: lowest index first, each unit down to 1 bit before the next.
  EXPECT_EQ(device_bits({0, 0, 0, 0}, {1, 1, 1, 1}, 20, 8), (std::vector<int>{1, 3, 8, 8}));
  EXPECT_EQ(device_bits({0, 0, 0, 0}, {1, 1, 1, 1}, 20, 8, torch::kFloat, true),
            (std::vector<int>{1, 3, 8, 8}));
  // -0.0 ties with +0.0.
  EXPECT_EQ(device_bits({0.0, -0.0, 0.0, -0.0}, {1, 1, 1, 1}, 20, 8),
            (std::vector<int>{1, 3, 8, 8}));
  // Equal values: round robin by index.
  EXPECT_EQ(device_bits({5, 5, 5}, {1, 1, 1}, 22, 8), (std::vector<int>{7, 7, 8}));
  EXPECT_EQ(device_bits({5, 5, 5}, {1, 1, 1}, 20, 8), (std::vector<int>{6, 7, 7}));
}

TEST_P(AllocateTensor, NonFiniteAndNegativeSensitivities) {
  const std::vector<int64_t> w = {1, 2, 1, 3};
  // NaN and +Inf act as the largest finite value present (5); negatives (-Inf too) as 0.
  const std::vector<double> c = {kNaN, -1.0, 5.0, kInf};
  const std::vector<double> same = {5.0, 0.0, 5.0, 5.0};
  const std::vector<double> neg = {-kInf, 1.0, -3.0, 2.0};
  const std::vector<double> neg_same = {0.0, 1.0, 0.0, 2.0};
  for (int64_t target = 6; target <= 56; ++target) {
    EXPECT_EQ(device_bits(c, w, target, 8), allocate_bits(same, w, target, 8).bits);
    EXPECT_EQ(device_bits(c, w, target, 8, torch::kFloat), allocate_bits(same, w, target, 8).bits);
    EXPECT_EQ(device_bits(neg, w, target, 8), allocate_bits(neg_same, w, target, 8).bits);
  }
  // None finite: 1e300 each, ties by index.
  EXPECT_EQ(device_bits({kNaN, kInf}, {1, 1}, 14, 8), (std::vector<int>{7, 7}));
  EXPECT_EQ(device_bits({kNaN, kInf, -kInf}, {1, 1, 1}, 14, 8),
            allocate_bits({kNaN, kInf, 0.0}, {1, 1, 1}, 14, 8).bits);
}

TEST_P(AllocateTensor, TargetOutsideRange) {
  const std::vector<double> c = {1.0, 2.0, 3.0};
  const std::vector<int64_t> w = {5, 6, 7};  // all ones: 18; all eights: 144
  const std::vector<int> ones(3, 1), eights(3, 8);
  // Below all-ones: allocate_bits' infeasible answer.
  for (int64_t target : {int64_t{17}, int64_t{0}, int64_t{-5},
                         std::numeric_limits<int64_t>::min()}) {
    EXPECT_EQ(device_bits(c, w, target, 8), ones) << target;
    EXPECT_FALSE(allocate_bits(c, w, static_cast<double>(target), 8).feasible);
  }
  EXPECT_EQ(device_bits(c, w, 18, 8), ones);
  EXPECT_EQ(device_bits(c, w, 19, 8), allocate_bits(c, w, 19, 8).bits);
  // At or above all-ibits: nothing removed.
  for (int64_t target : {int64_t{144}, int64_t{145}, std::numeric_limits<int64_t>::max()})
    EXPECT_EQ(device_bits(c, w, target, 8), eights) << target;
  EXPECT_NE(device_bits(c, w, 143, 8), eights);
}

TEST_P(AllocateTensor, IbitsOneAndEmpty) {
  for (int64_t target : {int64_t{-1}, int64_t{4}, int64_t{5}, int64_t{100}})
    EXPECT_EQ(device_bits({4.0, 1.0}, {2, 3}, target, 1), (std::vector<int>{1, 1}));
  for (int ibits = 1; ibits <= 8; ++ibits) {
    EXPECT_TRUE(device_bits({}, {}, 0, ibits).empty());
    EXPECT_TRUE(device_bits({}, {}, -3, ibits, torch::kFloat, true).empty());
  }
  // 2 -> 1 only: the two least sensitive units lose their bit.
  EXPECT_EQ(device_bits({1.0, 2.0, 0.5}, {1, 1, 1}, 4, 2), (std::vector<int>{1, 2, 1}));
  EXPECT_EQ(device_bits({1.0, 2.0, 0.5}, {1, 1, 1}, 4, 2),
            allocate_bits({1.0, 2.0, 0.5}, {1, 1, 1}, 4, 2).bits);
}

TEST_P(AllocateTensor, HostTargetAndStridedCost) {
  std::mt19937_64 rng(8);
  const std::vector<double> c = random_sens(rng, 100);
  std::vector<int64_t> w(50);
  for (auto& x : w) x = 1 + static_cast<int64_t>(rng() % 9);
  const torch::Tensor all = torch::tensor(c, torch::kDouble).to(dev());
  const torch::Tensor strided = all.slice(0, 0, 100, 2);  // every other value
  std::vector<double> cs;
  for (std::size_t i = 0; i < 100; i += 2) cs.push_back(c[i]);
  const torch::Tensor wt = torch::tensor(w).to(dev());
  const int64_t total = std::accumulate(w.begin(), w.end(), int64_t{0});
  for (int64_t target : {total, total * 3, total * 5 + 1}) {
    const torch::Tensor a = allocate_bits_tensor(strided, wt, target, 7);
    const torch::Tensor b =
        allocate_bits_tensor(strided, wt, torch::full({}, target, opts(torch::kLong)), 7);
    EXPECT_TRUE(torch::equal(a, b));
    const torch::Tensor h = a.cpu();
    EXPECT_EQ(std::vector<int>(h.data_ptr<int>(), h.data_ptr<int>() + h.numel()),
              allocate_bits(cs, w, static_cast<double>(target), 7).bits);
  }
}

TEST_P(AllocateTensor, InvalidArgumentsThrow) {
  const torch::Tensor c = torch::ones({3}, opts(torch::kFloat));
  const torch::Tensor w = torch::ones({3}, opts(torch::kLong));
  const torch::Tensor t = torch::full({}, 6, opts(torch::kLong));
  EXPECT_NO_THROW(allocate_bits_tensor(c, w, t, 8));
  EXPECT_THROW(allocate_bits_tensor(c, w, t, 0), std::invalid_argument);
  EXPECT_THROW(allocate_bits_tensor(c, w, t, 9), std::invalid_argument);
  EXPECT_THROW(allocate_bits_tensor(c.view({1, 3}), w, t, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits_tensor(w, w, t, 8), std::invalid_argument);  // integer cost
  EXPECT_THROW(allocate_bits_tensor(torch::Tensor(), w, t, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits_tensor(torch::Tensor(), w, 6, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits_tensor(c, w.to(torch::kInt), t, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits_tensor(c, w.slice(0, 0, 2), t, 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits_tensor(c, w, t.view({1}), 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits_tensor(c, w, t.to(torch::kInt), 8), std::invalid_argument);
  EXPECT_THROW(allocate_bits_tensor(c, w, torch::Tensor(), 8), std::invalid_argument);
  if (dev().is_cuda()) {
    EXPECT_THROW(allocate_bits_tensor(c, w.cpu(), t, 8), std::invalid_argument);
    EXPECT_THROW(allocate_bits_tensor(c, w, t.cpu(), 8), std::invalid_argument);
  }
}

// The point of the device version: no host synchronisation.  LibTorch's sync debug
// mode makes every synchronising call (item(), a copy to the host, a stream sync)
// throw.
TEST_P(AllocateTensor, NoHostSynchronisation) {
  if (!dev().is_cuda()) GTEST_SKIP() << "synchronisation is a CUDA matter";
#ifndef AQ_TEST_SYNC_DEBUG
  GTEST_SKIP() << "c10/cuda headers not available to the tests";
#else
  std::mt19937_64 rng(3);
  const std::size_t n = 20000;  // 140,000 candidates: CUDA's large sort path
  const std::vector<double> c = random_sens(rng, n);
  std::vector<int64_t> w(n);
  for (auto& x : w) x = 1 + static_cast<int64_t>(rng() % 1000);
  const int64_t total = std::accumulate(w.begin(), w.end(), int64_t{0});
  const torch::Tensor cost = torch::tensor(c, torch::kDouble).to(opts(torch::kFloat));
  const torch::Tensor weight = torch::tensor(w).to(dev());
  const torch::Tensor t = torch::full({}, total * 3, opts(torch::kLong));
  const torch::Tensor small = cost.slice(0, 0, 10);
  torch::cuda::synchronize();
  auto& ws = c10::cuda::warning_state();
  // Check that the mode is live here: a read-back must throw.
  ws.set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  bool probe_threw = false;
  try {
    (void)t.item<int64_t>();
  } catch (const c10::Error&) {
    probe_threw = true;
  }
  torch::Tensor a, b, d, e;
  try {
    a = allocate_bits_tensor(cost, weight, t, 8);
    b = allocate_bits_tensor(cost, torch::Tensor(), static_cast<int64_t>(n) * 3, 8);
    d = allocate_bits_tensor(small, torch::Tensor(), int64_t{0}, 5);  // infeasible
    e = allocate_bits_tensor(cost.slice(0, 0, 0), torch::Tensor(), int64_t{0}, 8);
  } catch (...) {
    ws.set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
    throw;
  }
  ws.set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  EXPECT_TRUE(probe_threw) << "sync debug mode had no effect";
  const torch::Tensor ha = a.cpu();
  std::vector<double> cf(c.size());
  const torch::Tensor cd = cost.to(torch::kDouble).cpu();
  std::copy(cd.data_ptr<double>(), cd.data_ptr<double>() + cd.numel(), cf.begin());
  EXPECT_EQ(std::vector<int>(ha.data_ptr<int>(), ha.data_ptr<int>() + ha.numel()),
            allocate_bits(cf, w, static_cast<double>(total * 3), 8).bits);
  EXPECT_EQ(b.cpu().sum().item<int64_t>(), static_cast<int64_t>(n) * 3);
  EXPECT_TRUE(torch::equal(d.cpu(), torch::ones({10}, torch::kInt)));
  EXPECT_EQ(e.numel(), 0);
#endif
}

}  // namespace

// choose_bits, the per-sample allocation of a layer's forward: one fused
// kernel on CUDA, tensor ops elsewhere.  Both must give allocate_bits' bits
// for the layer's sensitivities (every kind of gradient statistic, ties from
// repeated ranges, zeros, NaN), sum to the layer's budget, and (CUDA) give
// the word offsets quantize() would compute.
TEST_P(AllocateTensor, ChooseBitsIsTheGreedyOnTheSensitivities) {
  std::mt19937_64 rng(99);
  // 16 and 73: the CUDA kernel's path for at most 512 candidate removals.
  for (int trial = 0; trial < 80; ++trial) {
    const int64_t n = std::vector<int64_t>{1, 2, 7, 16, 64, 73, 256, 513, 1000, 4096}[trial % 10];
    const int64_t c_in = 4, hw = trial % 3 == 0 ? 40 : 64;  // 40: not a multiple of 32 per sample
    aq::QuantConfig c = aq::QuantConfig::for_level(aq::Level::L3);
    c.ibits = 2 + trial % 7;
    c.usegradient = trial % 2 == 0;
    aq::LayerState st;
    st.in_channels = c_in;
    st.kernel_area = 9;
    st.conv_groups = 1 + trial % 2;
    st.batch_norm = trial % 11 == 3;
    st.budget = trial % 4 == 0 ? 0.0 : 1.0 + static_cast<double>(rng() % 700) / 100.0;
    auto x = torch::randn({n, c_in, hw}, opts());
    if (trial % 5 == 1) x.narrow(0, 0, n / 2).copy_(x.narrow(0, n - n / 2, n / 2));  // repeated samples: ties
    if (trial % 7 == 2) x.narrow(0, 0, (n + 1) / 2).zero_();                         // zero ranges
    if (trial % 13 == 4) x[0][0][0] = std::numeric_limits<float>::quiet_NaN();
    const auto idx = torch::randperm(3 * n, torch::kLong).narrow(0, 0, n);
    if (trial % 3 == 1) {  // statistics: seen samples get small exact values, others are unseen
      st.sample_stat = torch::full({3 * n}, -1.0, opts(torch::kFloat));
      st.sample_stat.index_put_({idx.narrow(0, 0, n - n / 3).to(dev())},
                                torch::randint(0, 64, {n - n / 3}, opts(torch::kFloat)) / 8);
    }
    if (trial % 3 == 2) st.grad_mean = torch::full({}, 0.375, opts(torch::kFloat));
    aq::set_batch_indices(idx);
    int64_t total = -1;
    torch::Tensor offsets;
    const auto bits = aq::choose_bits(st, c, x, &total, &offsets);
    aq::set_batch_indices(torch::Tensor());
    ASSERT_EQ(bits.device().type(), dev().type());
    const auto cn = aq::sensitivities(st, c, st.range_sq, st.sample_elements, idx);
    const auto want = allocate_bits(cn, std::vector<int64_t>(n, 1), static_cast<double>(total), c.ibits);
    const auto got = bits.cpu().to(torch::kLong);
    ASSERT_EQ(got.numel(), n);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(got[i].item<int64_t>(), want.bits[i]) << "trial " << trial << " sample " << i;
    EXPECT_EQ(got.sum().item<int64_t>(), total) << trial;
    if (offsets.defined()) {
      const auto w = got * ((c_in * hw + 31) / 32);
      EXPECT_TRUE(torch::equal(offsets.cpu(), w.cumsum(0) - w)) << trial;
    }
  }
}

// Per-sample gradient statistics (the moving average keyed by dataset
// index, and the batch mean) as plain tensor ops compute them: unseen
// samples (-1), NaN, a statistic that grows, up to kAllocMaxSamples and past it.
TEST_P(AllocateTensor, GradientStatisticsMatchTheReference) {
  for (int64_t n : {1, 5, 256, 4096, 5000}) {
    aq::LayerState st;
    const int64_t size = 2 * n;
    st.sample_stat = torch::full({size}, -1.0, opts(torch::kFloat));
    const auto seen = torch::randperm(size, torch::kLong).narrow(0, 0, n);
    st.sample_stat.index_put_({seen.to(dev())}, torch::rand({n}, opts(torch::kFloat)));
    if (n > 1) st.sample_stat[seen[0].item<int64_t>()] = std::numeric_limits<float>::quiet_NaN();
    auto idx = torch::randperm(size, torch::kLong).narrow(0, 0, n).contiguous();
    if (n == 5) idx[4] = size + 3;  // past the statistic's end: it grows
    const auto g = torch::rand({n}, opts(torch::kFloat)) * 10;
    // The reference, on the CPU.
    auto want = st.sample_stat.cpu();
    if (want.size(0) < idx.max().item<int64_t>() + 1) {
      auto grown = torch::full({std::max<int64_t>(idx.max().item<int64_t>() + 1, 2 * want.size(0))}, -1.0);
      grown.narrow(0, 0, want.size(0)).copy_(want);
      want = grown;
    }
    const auto gc = g.cpu();
    const auto old = want.index({idx});
    want.index_put_({idx}, torch::where(old >= 0, 0.5 * old + 0.5 * gc, gc));
    aq::update_gradient_stats(st, /*usegradient=*/true, g, idx);
    ASSERT_EQ(st.sample_stat.device().type(), dev().type());
    EXPECT_TRUE(torch::allclose(st.sample_stat.cpu(), want, 0, 0, /*equal_nan=*/true)) << n;
    EXPECT_NEAR(st.grad_mean.item<double>(), gc.mean().item<double>(), 1e-6 * gc.mean().item<double>()) << n;
  }
}

// The group ranges choose_bits reads (||R_n||^2, grouped in memory order):
// every dtype, channels_last, groups cut short, a NaN, as plain tensor ops
// compute them.
TEST_P(AllocateTensor, GroupRangesMatchTheReference) {
  aq::QuantConfig c = aq::QuantConfig::for_level(aq::Level::L3);
  for (auto dt : {torch::kFloat, torch::kBFloat16, torch::kHalf, torch::kDouble}) {
    for (const auto& shape : std::vector<std::vector<int64_t>>{{5, 3, 10, 10}, {4, 64, 7, 7}, {3, 37}, {2, 1000}}) {
      for (bool cl : {false, true}) {
        if (cl && shape.size() != 4) continue;
        auto x = torch::randn(shape, opts(dt)) * 3;
        if (cl) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
        if (shape[1] == 37) x.view(-1)[40] = std::numeric_limits<double>::quiet_NaN();
        aq::LayerState st;
        st.in_channels = shape[1];
        aq::choose_bits(st, c, x);
        // Reference: memory order, groups of 256 (the last one shorter), in double.
        const int64_t n = shape[0], d = x.numel() / n, g = c.group_size;
        const auto v = x.as_strided({n, d}, {d, 1}).to(torch::kDouble).cpu();
        auto want = torch::zeros({n}, torch::kDouble);
        for (int64_t b = 0; b < d; b += g) {
          const auto part = v.narrow(1, b, std::min(g, d - b));
          want += (std::get<0>(part.max(1)).to(torch::kFloat).to(torch::kDouble) -
                   std::get<0>(part.min(1)).to(torch::kFloat).to(torch::kDouble))
                      .pow(2);
        }
        const auto got = st.range_sq.cpu().to(torch::kDouble);
        ASSERT_EQ(got.numel(), n);
        for (int64_t i = 0; i < n; ++i) {
          const double w = want[i].item<double>(), o = got[i].item<double>();
          if (std::isnan(w)) {
            EXPECT_TRUE(std::isnan(o)) << dt << " sample " << i;
          } else {
            EXPECT_NEAR(o, w, 1e-5 * w + 1e-6) << dt << " " << cl << " sample " << i;
          }
        }
      }
    }
  }
}
