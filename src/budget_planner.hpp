// Picks one candidate per layer so that the whole adapter meets a byte or error budget
// (Lagrangian relaxation over the layers' rate-distortion points, then greedy use of the slack).
#pragma once
#include <cstddef>
#include <functional>
#include <optional>
#include <vector>

#include "solar/codec.hpp"

namespace solar {

struct Budget {
  std::optional<size_t> payload_bytes;   // sum of the chosen candidates' bytes must not exceed it
  std::optional<double> max_distortion;  // sum of the chosen distortions must not exceed it
};

// Indices of a layer's points that no other point beats on both bytes and distortion (a plan
// never picks the others), candidate 0 (drop the layer) left out; ascending bytes.
std::vector<size_t> pareto_indices(const std::vector<Candidate>& c);

// Shares an error budget between layers by relative rather than absolute error: divides each
// layer's distortions (and its energy, the distortion of dropping it) by energy^balance.
// balance 0 leaves them as they are; 1 makes every layer's relative error count the same.
// Energies below 1e-6 of the largest count as that floor, so a layer that barely moved does not
// claim a full share of the bytes.
void balance_layers(std::vector<std::vector<Candidate>>& layers, std::vector<double>& energies, double balance);
// The factor balance_layers scales each layer by: energy^-balance (the energy floored at 1e-6 of
// the largest), 1 for balance 0 and for layers of zero energy.
std::vector<double> balance_scales(const std::vector<double>& energies, double balance);

// Returns the chosen index for each layer. Throws InvalidInput when no choice meets the budget.
std::vector<size_t> plan_budget(const std::vector<std::vector<Candidate>>& layers, const Budget& budget);

}  // namespace solar
