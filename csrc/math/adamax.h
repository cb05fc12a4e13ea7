// Adamax (docs/spec.md section 15): Adam with the infinity norm. PyTorch adds eps to |g| inside
// the maximum (so it is stored in exp_inf); Keras adds it to the norm in the denominator only:
// with eps > 0 they are different optimizers.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Adamax : AlgorithmDefaults {
  static constexpr const char* name = "adamax";

  struct Options {
    double lr = 2e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
    bool maximize = false;
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),
      number("beta1", &Options::beta1),
      number("beta2", &Options::beta2),
      number("eps", &Options::eps),
      number("weight_decay", &Options::weight_decay),
      flag("maximize", &Options::maximize),
      convention_field(&Options::convention),
  };

  static constexpr bool uses_step = true;
  static constexpr std::array state_names{"exp_avg", "exp_inf"};
  static constexpr unsigned nonnegative_states = 0b10;
  static constexpr unsigned always_used_states = 0b11;
  static unsigned states_used(const Options&) { return 0b11; }

  static void check(const Options& o) {
    check_non_negative(o.lr, "lr");
    check_non_negative(o.eps, "eps");
    check_below_one(o.beta1, "beta1");
    check_below_one(o.beta2, "beta2");
    check_non_negative(o.weight_decay, "weight_decay");
  }

  struct Coefficients {
    double lr, beta1, one_minus_beta1, beta2, eps, weight_decay, decay_factor;
    double step_size;         // torch: lr / (1 - beta1^t)
    double bias_correction1;  // Keras: 1 - beta1^t
    Convention convention;
    bool lerp_small_weight, maximize, has_weight_decay, has_decoupled_decay;
  };

  static Coefficients coefficients(const Options& o, const StepInput& in) {
    const bool keras = o.convention == Convention::keras;
    const double bias_correction1 = 1.0 - std::pow(o.beta1, static_cast<double>(in.step));
    Coefficients c{};
    c.lr = o.lr;
    c.beta1 = o.beta1;
    c.one_minus_beta1 = 1.0 - o.beta1;
    c.beta2 = o.beta2;
    c.eps = o.eps;
    c.weight_decay = o.weight_decay;
    c.decay_factor = decay_factor(o.convention, o.lr, o.weight_decay);
    c.step_size = o.lr / bias_correction1;
    c.bias_correction1 = bias_correction1;
    c.convention = o.convention;
    c.lerp_small_weight = small_lerp_weight(1.0 - o.beta1);
    c.maximize = o.maximize;
    c.has_weight_decay = o.weight_decay != 0 && !keras;
    c.has_decoupled_decay = o.weight_decay != 0 && keras;
    return c;
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

template <class V>
FUSEDOPT_LANE_FN void update(const Adamax::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& exp_avg = state[0];
  V& exp_inf = state[1];
  V g = c.maximize ? -grad : grad;
  if (c.convention == Convention::keras) {
    if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);
    exp_avg = exp_avg * splat<V>(c.beta1) + splat<V>(c.one_minus_beta1) * g;
    exp_inf = lane_max_nan(exp_inf * splat<V>(c.beta2), lane_abs(g));
    param = param - (exp_avg * splat<V>(c.lr)) /
                        ((exp_inf + splat<V>(c.eps)) * splat<V>(c.bias_correction1));
    return;
  }
  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  exp_avg = torch_lerp(exp_avg, g, c.one_minus_beta1, c.lerp_small_weight);
  exp_inf = lane_max_nan(exp_inf * splat<V>(c.beta2), lane_abs(g) + splat<V>(c.eps));
  param = param + (splat<V>(-c.step_size) * exp_avg) / exp_inf;
}

FUSEDOPT_MATH_END
