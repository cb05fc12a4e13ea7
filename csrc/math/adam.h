// Adam, AdamW and AMSGrad (docs/spec.md sections 7-8). PyTorch: eps next to the bias-corrected
// root, AdamW's decay decoupled, AMSGrad on the raw second moment. Keras 3: eps-hat next to the
// raw root, the bias corrections folded into the step size, decoupled decay always.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Adam : AlgorithmDefaults {
  static constexpr const char* name = "adam";

  struct Options {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
    bool amsgrad = false, maximize = false, decoupled_weight_decay = false;
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),
      number("beta1", &Options::beta1),
      number("beta2", &Options::beta2),
      number("eps", &Options::eps),
      number("weight_decay", &Options::weight_decay),
      flag("amsgrad", &Options::amsgrad),
      flag("maximize", &Options::maximize),
      flag("decoupled_weight_decay", &Options::decoupled_weight_decay),
      convention_field(&Options::convention),
  };

  static constexpr bool uses_step = true;
  static constexpr std::array state_names{"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  static constexpr unsigned nonnegative_states = 0b110;
  static constexpr unsigned always_used_states = 0b011;
  static unsigned states_used(const Options& o) { return o.amsgrad ? 0b111 : 0b011; }
  static constexpr bool takes_grad_scale = true;

  static void check(const Options& o) {
    check_non_negative(o.lr, "lr");
    check_below_one(o.beta1, "beta1");
    check_below_one(o.beta2, "beta2");
    check_non_negative(o.eps, "eps");
    check_non_negative(o.weight_decay, "weight_decay");
  }

  struct Coefficients {
    double beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
    double weight_decay;            // torch L2
    double decay_factor;            // decoupled decay: torch AdamW and every Keras optimizer
    double step_size;               // torch: lr / bc1; Keras: lr * sqrt(bc2) / bc1
    Divisor bias_correction2_sqrt;  // torch: sqrt(1 - beta2^t)
    Divisor grad_scale;
    Convention convention;
    bool lerp_small_weight, amsgrad, maximize, has_weight_decay, has_decoupled_decay;
    bool has_grad_scale;
  };

  static Coefficients coefficients(const Options& o, const StepInput& in) {
    const double t = static_cast<double>(in.step);
    const double bias_correction1 = 1.0 - std::pow(o.beta1, t);
    const double bias_correction2 = 1.0 - std::pow(o.beta2, t);
    const bool keras = o.convention == Convention::keras;
    const bool decoupled = o.decoupled_weight_decay || keras;
    Coefficients c{};
    c.beta1 = o.beta1;
    c.one_minus_beta1 = 1.0 - o.beta1;
    c.beta2 = o.beta2;
    c.one_minus_beta2 = 1.0 - o.beta2;
    c.eps = o.eps;
    c.weight_decay = o.weight_decay;
    c.decay_factor = decay_factor(o.convention, o.lr, o.weight_decay);
    // Keras folds both corrections into the step size and keeps eps-hat next to the raw root.
    c.step_size =
        keras ? o.lr * std::sqrt(bias_correction2) / bias_correction1 : o.lr / bias_correction1;
    c.bias_correction2_sqrt = divisor(std::sqrt(bias_correction2));
    c.grad_scale = divisor(in.grad_scale ? *in.grad_scale : 1.0);
    c.convention = o.convention;
    c.lerp_small_weight = small_lerp_weight(1.0 - o.beta1);
    c.amsgrad = o.amsgrad;
    c.maximize = o.maximize;
    c.has_weight_decay = o.weight_decay != 0 && !decoupled;
    c.has_decoupled_decay = o.weight_decay != 0 && decoupled;
    c.has_grad_scale = in.grad_scale != nullptr;
    return c;
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

// grad is in/out: with a grad scale it leaves unscaled, for the caller to write back (spec 8).
template <class V>
FUSEDOPT_LANE_FN void update(const Adam::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& exp_avg = state[0];
  V& exp_avg_sq = state[1];
  V& max_exp_avg_sq = state[2];
  if (c.has_grad_scale) grad = lane_divide(grad, c.grad_scale);
  V g = c.maximize ? -grad : grad;
  if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);

  if (c.convention == Convention::keras) {
    // Keras' torch_adam form (the generic `v + (g*g - v)(1 - beta2)` turns an overflowed v
    // into NaN at the next step, where Keras on the torch backend keeps it inf).
    exp_avg = exp_avg * splat<V>(c.beta1) + splat<V>(c.one_minus_beta1) * g;
    exp_avg_sq = exp_avg_sq * splat<V>(c.beta2) + splat<V>(c.one_minus_beta2) * (g * g);
    V second_moment = exp_avg_sq;
    if (c.amsgrad) second_moment = max_exp_avg_sq = lane_max_nan(max_exp_avg_sq, exp_avg_sq);
    param =
        param - (exp_avg * splat<V>(c.step_size)) / (lane_sqrt(second_moment) + splat<V>(c.eps));
    return;
  }

  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  exp_avg = torch_lerp(exp_avg, g, c.one_minus_beta1, c.lerp_small_weight);
  exp_avg_sq = exp_avg_sq * splat<V>(c.beta2) + splat<V>(c.one_minus_beta2) * g * g;
  V second_moment = exp_avg_sq;
  if (c.amsgrad) second_moment = max_exp_avg_sq = lane_max_nan(max_exp_avg_sq, exp_avg_sq);
  const V denominator =
      lane_divide(lane_sqrt(second_moment), c.bias_correction2_sqrt) + splat<V>(c.eps);
  param = param + (splat<V>(-c.step_size) * exp_avg) / denominator;
}

FUSEDOPT_MATH_END
