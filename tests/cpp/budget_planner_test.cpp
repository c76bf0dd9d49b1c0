// The planner's layer balance on hand-made rate-distortion curves.
#include <cmath>

#include <gtest/gtest.h>

#include "../../src/budget_planner.hpp"
#include "solar/error.hpp"

namespace solar {
namespace {

// A layer whose update has energy e: dropping it loses e; each further 10 bytes halve the error.
std::vector<Candidate> curve(double e) {
  std::vector<Candidate> c;
  for (int j = 0; j <= 12; ++j) c.push_back({e * std::pow(0.5, j), static_cast<size_t>(10 * j), {j}});
  return c;
}

TEST(BudgetPlanner, BalanceOneGivesEveryLayerTheSameRelativeError) {
  // Two layers alike but for scale (energies 1 and 1/1024): by absolute error the small one is
  // hardly worth a byte; by relative error both get the same share.
  for (double balance : {0.0, 1.0}) {
    std::vector<std::vector<Candidate>> layers{curve(1.0), curve(1.0 / 1024)};
    std::vector<double> energies{1.0, 1.0 / 1024};
    balance_layers(layers, energies, balance);
    const std::vector<size_t> pick = plan_budget(layers, Budget{size_t{120}, std::nullopt});
    if (balance == 0) {
      EXPECT_EQ(pick[0], pick[1] + 10) << "the large layer's halvings are worth 1024x more";
    } else {
      EXPECT_EQ(pick[0], pick[1]);
      EXPECT_DOUBLE_EQ(energies[0], 1.0);
      EXPECT_DOUBLE_EQ(energies[1], 1.0);
    }
  }
}

TEST(BudgetPlanner, BalanceKeepsZeroLayersAndFloorsTinyOnes) {
  std::vector<std::vector<Candidate>> layers{curve(1.0), curve(0.0), curve(1e-12)};
  std::vector<double> energies{1.0, 0.0, 1e-12};
  balance_layers(layers, energies, 1.0);
  EXPECT_EQ(energies[1], 0.0);
  EXPECT_DOUBLE_EQ(energies[2], 1e-12 / 1e-6) << "a layer a millionth of the largest counts as that floor";
  EXPECT_DOUBLE_EQ(layers[2][1].distortion, 0.5 * 1e-12 / 1e-6);
}

TEST(BudgetPlanner, BalanceOutOfRangeIsRefused) {
  std::vector<std::vector<Candidate>> layers{curve(1.0)};
  std::vector<double> energies{1.0};
  EXPECT_THROW(balance_layers(layers, energies, -0.5), Error);
  EXPECT_THROW(balance_layers(layers, energies, std::nan("")), Error);
  EXPECT_THROW(balance_layers(layers, energies, 4.5), Error);
  std::vector<double> wrong{1.0, 1.0};
  EXPECT_THROW(balance_layers(layers, wrong, 1.0), Error);
}

}  // namespace
}  // namespace solar
