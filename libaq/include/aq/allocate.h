// Bit allocation for adaptive precision (docs/design.md §5): given the
// sensitivity C_i and weight w_i (elements) of each unit (a sample of a
// layer), choose bits b_i in 1..8 that minimise
//     sum_i C_i / (2^b_i - 1)^2     subject to  sum_i w_i b_i <= budget,
// greedily: every unit starts at `ibits`, and the bit whose removal costs
// least per unit of weight is taken away until the budget holds.
#pragma once

#include <ATen/core/Tensor.h>

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

// Same greedy as allocate_bits, computed with tensor ops on cost's device and
// reading nothing back to the host (no synchronisation on CUDA), so it can run
// inside a training step.  The bits equal allocate_bits(cost, weight, target,
// ibits).bits exactly, ties included.
// cost: floating [U] (any float dtype; computed in double); weight: int64 [U]
// on cost's device, or undefined for all ones; target: int64 0-d tensor on
// cost's device (the budget already floored to an integer number of weighted
// bits).  Returns int32 [U] on cost's device.
// allocate_bits's exceptions and feasible flag would need a host decision, so
// instead:
//  - NaN/+Inf sensitivities are treated as allocate_bits treats them (the
//    largest finite value present, 1e300 if none); negative ones (-Inf too)
//    are treated as 0;
//  - a target below sum(w) (infeasible) gives every unit 1 bit, as
//    allocate_bits does with feasible = false;
//  - weights >= 1 and sum(w) * ibits <= INT64_MAX are the caller's to
//    guarantee (unchecked: results are meaningless otherwise).
// Throws std::invalid_argument on bad shapes, dtypes, devices or ibits (all
// known on the host).
at::Tensor allocate_bits_tensor(const at::Tensor& cost, const at::Tensor& weight,
                                const at::Tensor& target, int ibits);
// The same with a host target (written into a device scalar, not copied: no sync).
at::Tensor allocate_bits_tensor(const at::Tensor& cost, const at::Tensor& weight, int64_t target,
                                int ibits);

// dinv[b] = 1/(2^(b-1)-1)^2 - 1/(2^b-1)^2 for b in 2..8: what taking a unit
// from b to b-1 bits costs per unit of sensitivity (the greedy's key before
// dividing by the weight).
double bit_cost_step(int b);

// The objective for given bits (for tests and reports).
double allocation_cost(const std::vector<double>& sensitivity, const std::vector<int>& bits);

}  // namespace aq
