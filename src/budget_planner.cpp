#include "budget_planner.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <limits>

#include "solar/error.hpp"

namespace solar {
namespace {

struct Totals {
  double distortion = 0;
  size_t bytes = 0;
};

Totals totals(const std::vector<std::vector<Candidate>>& layers, const std::vector<size_t>& pick) {
  Totals t;
  for (size_t l = 0; l < layers.size(); ++l) {
    t.distortion += layers[l][pick[l]].distortion;
    t.bytes += layers[l][pick[l]].bytes;
  }
  return t;
}

std::vector<size_t> pick_for(const std::vector<std::vector<Candidate>>& layers, double lambda) {
  std::vector<size_t> pick(layers.size(), 0);
  for (size_t l = 0; l < layers.size(); ++l) {
    double best = std::numeric_limits<double>::infinity();
    for (size_t j = 0; j < layers[l].size(); ++j) {
      const Candidate& c = layers[l][j];
      const double cost = c.distortion + lambda * static_cast<double>(c.bytes);
      // Ties go to fewer bytes, then to the lower index: deterministic.
      if (cost < best || (cost == best && c.bytes < layers[l][pick[l]].bytes)) {
        best = cost;
        pick[l] = j;
      }
    }
  }
  return pick;
}

bool fits(const Totals& t, const Budget& b) {
  return (!b.payload_bytes || t.bytes <= *b.payload_bytes) && (!b.max_distortion || t.distortion <= *b.max_distortion);
}

}  // namespace

std::vector<double> balance_scales(const std::vector<double>& energies, double balance) {
  if (!(balance >= 0 && balance <= 4)) throw Error(ErrorKind::InvalidInput, "planner", "balance must be in [0, 4]");
  std::vector<double> scales(energies.size(), 1.0);
  const double largest = energies.empty() ? 0.0 : *std::max_element(energies.begin(), energies.end());
  if (balance == 0 || !(largest > 0)) return scales;  // nothing to code anywhere
  for (size_t l = 0; l < energies.size(); ++l)
    if (energies[l] > 0)  // an update of zero costs nothing to drop: keep it at zero
      scales[l] = std::pow(std::max(energies[l], 1e-6 * largest), -balance);
  return scales;
}

void balance_layers(std::vector<std::vector<Candidate>>& layers, std::vector<double>& energies, double balance) {
  if (layers.size() != energies.size()) throw Error(ErrorKind::InvalidInput, "planner", "one energy per layer");
  const std::vector<double> scales = balance_scales(energies, balance);
  for (size_t l = 0; l < layers.size(); ++l) {
    if (scales[l] == 1.0) continue;
    for (Candidate& c : layers[l]) c.distortion *= scales[l];
    energies[l] *= scales[l];
  }
}

std::vector<size_t> pareto_indices(const std::vector<Candidate>& c) {
  if (c.empty()) return {};
  std::vector<size_t> order(c.size() - 1);
  std::iota(order.begin(), order.end(), size_t{1});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return c[a].bytes != c[b].bytes ? c[a].bytes < c[b].bytes : c[a].distortion < c[b].distortion;
  });
  std::vector<size_t> front;
  double best = c[0].distortion;
  for (size_t i : order)
    if (c[i].distortion < best) {
      best = c[i].distortion;
      front.push_back(i);
    }
  return front;
}

std::vector<size_t> plan_budget(const std::vector<std::vector<Candidate>>& layers, const Budget& budget) {
  for (const auto& l : layers)
    if (l.empty()) throw Error(ErrorKind::InvalidInput, "budget", "a layer has no operating point");
  // Large lambda favours bytes, small lambda favours quality. For a byte budget we want the
  // smallest lambda that fits; for an error budget the largest lambda that still meets it.
  double lo = -60, hi = 60;  // log2(lambda)
  const bool want_quality = budget.payload_bytes.has_value();
  std::vector<size_t> best = pick_for(layers, std::exp2(hi));
  if (!fits(totals(layers, best), budget) && want_quality)
    throw Error(ErrorKind::InvalidInput, "budget",
                "the byte budget is below the smallest encoding (" + std::to_string(totals(layers, best).bytes) + " payload bytes)");
  if (!want_quality) best = pick_for(layers, std::exp2(lo));
  for (int it = 0; it < 80; ++it) {
    const double mid = 0.5 * (lo + hi);
    const auto pick = pick_for(layers, std::exp2(mid));
    const bool ok = fits(totals(layers, pick), budget);
    if (want_quality) {
      if (ok) { best = pick; hi = mid; } else { lo = mid; }
    } else {
      if (ok) { best = pick; lo = mid; } else { hi = mid; }
    }
  }
  if (!fits(totals(layers, best), budget))
    throw Error(ErrorKind::InvalidInput, "budget", "no encoding meets the error budget");
  if (budget.payload_bytes) {
    // Spend the slack the convex hull leaves: best distortion drop per extra byte first.
    for (bool improved = true; improved;) {
      improved = false;
      const Totals t = totals(layers, best);
      double best_gain = 0;
      size_t bl = 0, bj = 0;
      for (size_t l = 0; l < layers.size(); ++l) {
        const Candidate& cur = layers[l][best[l]];
        for (size_t j = 0; j < layers[l].size(); ++j) {
          const Candidate& c = layers[l][j];
          if (c.distortion >= cur.distortion) continue;
          const long extra = static_cast<long>(c.bytes) - static_cast<long>(cur.bytes);
          if (t.bytes + extra > *budget.payload_bytes) continue;
          const double gain = (cur.distortion - c.distortion) / static_cast<double>(std::max(1L, extra));
          if (gain > best_gain) { best_gain = gain; bl = l; bj = j; }
        }
      }
      if (best_gain > 0) { best[bl] = bj; improved = true; }
    }
  }
  return best;
}

}  // namespace solar
