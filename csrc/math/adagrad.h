// Adagrad (docs/spec.md section 5): PyTorch puts eps outside the square root, Keras 3 inside.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Adagrad : AlgorithmDefaults {
  static constexpr const char* name = "adagrad";

  struct Options {
    double lr = 1e-2, lr_decay = 0, weight_decay = 0, initial_accumulator_value = 0, eps = 1e-10;
    bool maximize = false;
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),
      number("lr_decay", &Options::lr_decay),
      number("weight_decay", &Options::weight_decay),
      number("initial_accumulator_value", &Options::initial_accumulator_value),
      number("eps", &Options::eps),
      flag("maximize", &Options::maximize),
      convention_field(&Options::convention),
  };

  static constexpr bool uses_step = true;
  static constexpr std::array state_names{"sum"};
  static constexpr unsigned nonnegative_states = 0b1;
  static constexpr unsigned always_used_states = 1;
  static unsigned states_used(const Options&) { return 1; }
  static double initial_state(const Options& o, int) { return o.initial_accumulator_value; }

  static void check(const Options& o) {
    check_non_negative(o.lr, "lr");
    check_non_negative(o.lr_decay, "lr_decay");
    check_non_negative(o.weight_decay, "weight_decay");
    check_non_negative(o.initial_accumulator_value, "initial_accumulator_value");
    check_non_negative(o.eps, "eps");
  }

  struct Coefficients {
    double lr;            // torch: lr / (1 + (step - 1) * lr_decay)
    double weight_decay;  // torch L2
    double decay_factor;  // Keras' decoupled decay
    double eps;
    Convention convention;
    bool maximize, has_weight_decay, has_decoupled_decay;
  };

  static Coefficients coefficients(const Options& o, const StepInput& in) {
    const bool keras = o.convention == Convention::keras;
    Coefficients c{};
    c.lr = keras ? o.lr : o.lr / (1.0 + static_cast<double>(in.step - 1) * o.lr_decay);
    c.weight_decay = o.weight_decay;
    c.decay_factor = decay_factor(o.convention, o.lr, o.weight_decay);
    c.eps = o.eps;
    c.convention = o.convention;
    c.maximize = o.maximize;
    c.has_weight_decay = o.weight_decay != 0 && !keras;
    c.has_decoupled_decay = o.weight_decay != 0 && keras;
    return c;
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

template <class V>
FUSEDOPT_LANE_FN void update(const Adagrad::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& sum = state[0];
  V g = c.maximize ? -grad : grad;
  if (c.convention == Convention::keras) {
    if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);
    sum = sum + g * g;
    param = param - (splat<V>(c.lr) * g) / lane_sqrt(sum + splat<V>(c.eps));
    return;
  }
  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  sum = sum + g * g;
  // addcdiv order: (value * numerator) / denominator.
  param = param + (splat<V>(-c.lr) * g) / (lane_sqrt(sum) + splat<V>(c.eps));
}

FUSEDOPT_MATH_END
