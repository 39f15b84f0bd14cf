// Bit allocation for adaptive precision (ALGORITHM.md 5): given the
// sensitivity C_i and weight w_i (elements) of each unit (a sample of a
// layer), choose bits b_i in 1..8 that minimise
//     sum_i C_i / (2^b_i - 1)^2     subject to  sum_i w_i b_i <= budget,
// greedily: every unit starts at `ibits`, and the bit whose removal costs
// least per unit of weight is taken away until the budget holds.
#pragma once

#include <cstdint>
#include <vector>

namespace aq {

struct Allocation {
  std::vector<int> bits;   // per unit, 1..8
  double cost = 0;         // sum_i C_i / (2^b_i - 1)^2
  int64_t used = 0;        // sum_i w_i b_i (<= budget unless infeasible)
  bool feasible = true;    // false: even 1 bit everywhere exceeds the budget
};

// sensitivity.size() == weight.size(); sensitivities >= 0 (NaN/Inf are
// treated as the largest finite value); weights >= 1; ibits in 1..8.
// The budget is never exceeded when it can be met (every unit at 1 bit fits);
// otherwise every unit gets 1 bit and feasible is false.  Ties are broken by
// unit index, so the result is deterministic.  Throws std::invalid_argument
// on mismatched sizes, bad weights or ibits.
Allocation allocate_bits(const std::vector<double>& sensitivity, const std::vector<int64_t>& weight,
                         double budget, int ibits);

// The objective for given bits (for tests and reports).
double allocation_cost(const std::vector<double>& sensitivity, const std::vector<int>& bits);

}  // namespace aq
