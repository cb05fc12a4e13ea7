// Fits a linear model y = A w + bias by least squares with fusedopt's Adam and prints the result:
// the two parameter tensors and their states are registered once in a plan, and each step gives
// it the two gradients. The data come from known weights and bias plus a little noise, so the fit
// must land near them. tests/test_cmake_consumer.py builds this program against the installed
// package and replays the same problem through fusedopt.reference.torch_adam; keep the data and
// hyperparameters in step with it.
#include <cstdio>
#include <fusedopt/fusedopt.hpp>
#include <vector>

namespace {

constexpr int kRows = 64;
constexpr int kFeatures = 8;
constexpr int kSteps = 200;

// Integer formulas and correctly rounded operations in a fixed order, so that Python builds the
// same problem bit for bit.
double feature(int row, int column) { return ((row * 7 + column * 3) % 11 - 5) / 4.0; }
double true_weight(int column) { return (column - 3.5) / 4.0; }
constexpr double kTrueBias = 0.5;
double target(int row) {
  double y = kTrueBias + ((row * 5) % 13 - 6) / 100.0;
  for (int j = 0; j < kFeatures; ++j) y += feature(row, j) * true_weight(j);
  return y;
}

// Gradient of mean((A w + bias - y)^2), residuals summed in row order.
double mean_squared_error(const std::vector<double>& weights, double bias,
                          std::vector<double>& weights_grad, double& bias_grad) {
  std::vector<double> residual(kRows);
  double loss = 0;
  for (int i = 0; i < kRows; ++i) {
    double prediction = bias;
    for (int j = 0; j < kFeatures; ++j) prediction += feature(i, j) * weights[j];
    residual[i] = prediction - target(i);
    loss += residual[i] * residual[i];
  }
  for (int j = 0; j < kFeatures; ++j) {
    double sum = 0;
    for (int i = 0; i < kRows; ++i) sum += feature(i, j) * residual[i];
    weights_grad[j] = 2.0 * sum / kRows;
  }
  double sum = 0;
  for (int i = 0; i < kRows; ++i) sum += residual[i];
  bias_grad = 2.0 * sum / kRows;
  return loss / kRows;
}

}  // namespace

int main() {
  std::vector<double> weights(kFeatures, 0.0), weights_grad(kFeatures);
  std::vector<double> weights_exp_avg(kFeatures), weights_exp_avg_sq(kFeatures);
  std::vector<double> bias(1, 0.0), bias_grad(1), bias_exp_avg(1), bias_exp_avg_sq(1);

  double loss = 0;
  try {
    // torch.optim.Adam's defaults but the learning rate.
    const fusedopt::Options adam = fusedopt::Options("adam").set("lr", 0.05);
    // The params and Adam's states, registered once (their step numbers start at 1); each step
    // then gives the gradients only.
    fusedopt::Plan plan(adam, {fusedopt::tensor(weights, {}, {weights_exp_avg, weights_exp_avg_sq}),
                               fusedopt::tensor(bias, {}, {bias_exp_avg, bias_exp_avg_sq})});
    for (int step = 1; step <= kSteps; ++step) {
      loss = mean_squared_error(weights, bias[0], weights_grad, bias_grad[0]);
      plan.step({weights_grad, bias_grad});
    }
  } catch (const fusedopt::Error& e) {
    std::fprintf(stderr, "fusedopt: %s (%s)\n", e.what(), fusedopt_status_string(e.status()));
    return 1;
  }

  std::printf("fusedopt %s, isa %s\n", fusedopt_version(), fusedopt::cpu_isa().c_str());
  std::printf("loss before the last step: %.17g\n", loss);
  std::printf("weights:");
  for (double w : weights) std::printf(" %.17g", w);
  std::printf("\nbias: %.17g\n", bias[0]);
  return 0;
}
