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

// Returns the chosen index for each layer. Throws InvalidInput when no choice meets the budget.
std::vector<size_t> plan_budget(const std::vector<std::vector<Candidate>>& layers, const Budget& budget);

}  // namespace solar
