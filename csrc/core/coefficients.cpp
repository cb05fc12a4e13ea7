// Host-side per-step coefficients, in double, following SPEC.md. Every backend reads these.
#include <cmath>
#include <string>

#include "core/error.h"
#include "core/step.h"

namespace fusedopt {
namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw Error(ErrorKind::value, message);
}

// The `not (x >= 0)` form also rejects NaN. Messages are formatted only on failure: formatting a
// double costs more than a whole step on a small tensor, and every step validates.
void require_non_negative(double x, const char* name) {
  if (!(x >= 0 && std::isfinite(x)))
    require(false, std::string("Invalid ") + name + ": " + std::to_string(x) +
                       " (must be a finite number >= 0)");
}

void require_unit_interval(double x, const char* name) {
  if (!(x >= 0 && x < 1))
    require(false,
            std::string("Invalid ") + name + ": " + std::to_string(x) + " (must be in [0, 1))");
}

// torch.lerp rounds as start + w * (end - start) when |w| < 0.5.
bool small_lerp_weight(double w) { return std::fabs(w) < 0.5; }

}  // namespace

void validate_options(const SgdOptions& o) {
  require_non_negative(o.lr, "lr");
  require_non_negative(o.momentum, "momentum");
  require_non_negative(o.dampening, "dampening");
  require_non_negative(o.weight_decay, "weight_decay");
  if (o.convention == Convention::keras)
    require(o.momentum <= 1, "Invalid momentum: must be in [0, 1]");
  if (o.nesterov && o.convention == Convention::torch)
    require(o.momentum > 0 && o.dampening == 0,
            "Invalid nesterov: Nesterov momentum requires a momentum and zero dampening");
}

void validate_options(const AdagradOptions& o) {
  require_non_negative(o.lr, "lr");
  require_non_negative(o.lr_decay, "lr_decay");
  require_non_negative(o.weight_decay, "weight_decay");
  require_non_negative(o.eps, "eps");
}

void validate_options(const RmspropOptions& o) {
  require_non_negative(o.lr, "lr");
  require_non_negative(o.alpha, "alpha");
  require_non_negative(o.eps, "eps");
  require_non_negative(o.weight_decay, "weight_decay");
  require_non_negative(o.momentum, "momentum");
}

void validate_options(const AdamOptions& o) {
  require_non_negative(o.lr, "lr");
  require_non_negative(o.eps, "eps");
  require_unit_interval(o.beta1, "beta1");
  require_unit_interval(o.beta2, "beta2");
  require_non_negative(o.weight_decay, "weight_decay");
}

SgdCoefficients sgd_coefficients(const SgdOptions& o, int64_t step,
                                 std::optional<double> grad_scale) {
  SgdCoefficients c{};
  c.lr = o.lr;
  c.weight_decay = o.weight_decay;
  c.decay_factor = 1.0 - o.lr * o.weight_decay;
  c.momentum = o.momentum;
  c.dampening_complement = 1.0 - o.dampening;
  c.grad_scale = grad_scale.value_or(1.0);
  c.convention = o.convention;
  c.has_momentum = o.momentum != 0;
  c.first_step = step == 1;
  c.nesterov = o.nesterov;
  c.maximize = o.maximize;
  c.has_weight_decay = o.weight_decay != 0 && o.convention == Convention::torch;
  c.has_decoupled_decay = o.weight_decay != 0 && o.convention == Convention::keras;
  c.has_grad_scale = grad_scale.has_value();
  return c;
}

AdagradCoefficients adagrad_coefficients(const AdagradOptions& o, int64_t step) {
  AdagradCoefficients c{};
  c.lr = o.convention == Convention::torch
             ? o.lr / (1.0 + static_cast<double>(step - 1) * o.lr_decay)
             : o.lr;
  c.weight_decay = o.weight_decay;
  c.decay_factor = 1.0 - o.lr * o.weight_decay;
  c.eps = o.eps;
  c.convention = o.convention;
  c.maximize = o.maximize;
  c.has_weight_decay = o.weight_decay != 0 && o.convention == Convention::torch;
  c.has_decoupled_decay = o.weight_decay != 0 && o.convention == Convention::keras;
  return c;
}

RmspropCoefficients rmsprop_coefficients(const RmspropOptions& o) {
  RmspropCoefficients c{};
  c.lr = o.lr;
  c.alpha = o.alpha;
  c.one_minus_alpha = 1.0 - o.alpha;
  c.lerp_small_weight = small_lerp_weight(1.0 - o.alpha);
  c.eps = o.eps;
  c.momentum = o.momentum;
  c.weight_decay = o.weight_decay;
  c.decay_factor = 1.0 - o.lr * o.weight_decay;
  c.convention = o.convention;
  c.centered = o.centered;
  c.has_momentum = o.momentum > 0;
  c.maximize = o.maximize;
  c.has_weight_decay = o.weight_decay != 0 && o.convention == Convention::torch;
  c.has_decoupled_decay = o.weight_decay != 0 && o.convention == Convention::keras;
  return c;
}

AdamCoefficients adam_coefficients(const AdamOptions& o, int64_t step,
                                   std::optional<double> grad_scale) {
  AdamCoefficients c{};
  const double t = static_cast<double>(step);
  const double bias_correction1 = 1.0 - std::pow(o.beta1, t);
  const double bias_correction2 = 1.0 - std::pow(o.beta2, t);
  c.beta1 = o.beta1;
  c.one_minus_beta1 = 1.0 - o.beta1;
  c.lerp_small_weight = small_lerp_weight(1.0 - o.beta1);
  c.beta2 = o.beta2;
  c.one_minus_beta2 = 1.0 - o.beta2;
  c.eps = o.eps;
  c.weight_decay = o.weight_decay;
  c.decay_factor = 1.0 - o.lr * o.weight_decay;
  c.bias_correction2_sqrt = std::sqrt(bias_correction2);
  // Keras folds both corrections into the step size and keeps eps-hat next to the raw root.
  c.step_size = o.convention == Convention::keras
                    ? o.lr * std::sqrt(bias_correction2) / bias_correction1
                    : o.lr / bias_correction1;
  c.grad_scale = grad_scale.value_or(1.0);
  c.convention = o.convention;
  c.amsgrad = o.amsgrad;
  c.maximize = o.maximize;
  const bool decoupled = o.decoupled_weight_decay || o.convention == Convention::keras;
  c.has_weight_decay = o.weight_decay != 0 && !decoupled;
  c.has_decoupled_decay = o.weight_decay != 0 && decoupled;
  c.has_grad_scale = grad_scale.has_value();
  return c;
}

}  // namespace fusedopt
