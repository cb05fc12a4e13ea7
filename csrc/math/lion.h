// Lion (Chen et al. 2023; docs/spec.md section 20): the param moves by lr times the sign of an
// interpolation of the momentum and the gradient, with decoupled weight decay. Keras' form (and
// optax's) in the Keras convention; lion-pytorch's, with torch's lerp, in the PyTorch one.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Lion : AlgorithmDefaults {
  static constexpr const char* name = "lion";

  struct Options {
    double lr = 1e-4, beta1 = 0.9, beta2 = 0.99, weight_decay = 0;
    bool maximize = false;
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),           number("beta1", &Options::beta1),
      number("beta2", &Options::beta2),     number("weight_decay", &Options::weight_decay),
      flag("maximize", &Options::maximize), convention_field(&Options::convention),
  };

  static constexpr bool uses_step = false;
  static constexpr std::array state_names{"exp_avg"};
  static constexpr unsigned always_used_states = 0b1;
  static unsigned states_used(const Options&) { return 0b1; }

  static void check(const Options& o) {
    check_non_negative(o.lr, "lr");
    // Keras refuses beta_1 = 0 (Lion would be SignSGD); both refuse betas outside [0, 1].
    if (o.convention == Convention::keras)
      check_rule(o.beta1 > 0 && o.beta1 <= 1, "beta1", o.beta1, "must be in (0, 1]");
    check_unit_interval(o.beta1, "beta1");
    check_unit_interval(o.beta2, "beta2");
    check_non_negative(o.weight_decay, "weight_decay");
  }

  struct Coefficients {
    double lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay_factor;
    Convention convention;
    bool lerp_small_weight1, lerp_small_weight2, maximize, has_decay;
  };

  static Coefficients coefficients(const Options& o, const StepInput&) {
    Coefficients c{};
    c.lr = o.lr;
    c.beta1 = o.beta1;
    c.one_minus_beta1 = 1.0 - o.beta1;
    c.beta2 = o.beta2;
    c.one_minus_beta2 = 1.0 - o.beta2;
    c.decay_factor = decay_factor(o.convention, o.lr, o.weight_decay);
    c.convention = o.convention;
    c.lerp_small_weight1 = small_lerp_weight(1.0 - o.beta1);
    c.lerp_small_weight2 = small_lerp_weight(1.0 - o.beta2);
    c.maximize = o.maximize;
    c.has_decay = o.weight_decay != 0;
    return c;
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

template <class V>
FUSEDOPT_LANE_FN void update(const Lion::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& exp_avg = state[0];
  const V g = c.maximize ? -grad : grad;
  if (c.has_decay) param = param * splat<V>(c.decay_factor);
  if (c.convention == Convention::keras) {
    const V direction = exp_avg * splat<V>(c.beta1) + splat<V>(c.one_minus_beta1) * g;
    param = param - lane_sign(direction) * splat<V>(c.lr);
    exp_avg = exp_avg * splat<V>(c.beta2) + splat<V>(c.one_minus_beta2) * g;
    return;
  }
  const V direction = torch_lerp(exp_avg, g, c.one_minus_beta1, c.lerp_small_weight1);
  param = param - splat<V>(c.lr) * lane_sign(direction);
  exp_avg = torch_lerp(exp_avg, g, c.one_minus_beta2, c.lerp_small_weight2);
}

FUSEDOPT_MATH_END
