// Tests for the greedy bit allocation (aq/allocate.h, ALGORITHM.md 5).
#include "aq/allocate.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <queue>
#include <random>
#include <stdexcept>
#include <vector>

namespace {

using aq::Allocation;
using aq::allocate_bits;
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

// The greedy exactly as ALGORITHM.md 5 states it: a std::priority_queue min-heap on
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

}  // namespace
