// Adadelta (docs/spec.md section 14): eps inside both square roots, the running average of the
// squared updates kept without the learning rate. PyTorch divides before multiplying by the
// gradient, Keras after; Keras' decay is decoupled.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Adadelta : AlgorithmDefaults {
  static constexpr const char* name = "adadelta";

  struct Options {
    double lr = 1.0, rho = 0.9, eps = 1e-6, weight_decay = 0;
    bool maximize = false;
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),           number("rho", &Options::rho),
      number("eps", &Options::eps),         number("weight_decay", &Options::weight_decay),
      flag("maximize", &Options::maximize), convention_field(&Options::convention),
  };

  static constexpr bool uses_step = false;
  static constexpr std::array state_names{"square_avg", "acc_delta"};
  static constexpr unsigned nonnegative_states = 0b11;
  static constexpr unsigned always_used_states = 0b11;
  static unsigned states_used(const Options&) { return 0b11; }

  static void check(const Options& o) {
    check_non_negative(o.lr, "lr");
    check_unit_interval(o.rho, "rho");
    check_non_negative(o.eps, "eps");
    check_non_negative(o.weight_decay, "weight_decay");
  }

  struct Coefficients {
    double lr, rho, one_minus_rho, eps, weight_decay, decay_factor;
    Convention convention;
    bool maximize, has_weight_decay, has_decoupled_decay;
  };

  static Coefficients coefficients(const Options& o, const StepInput&) {
    const bool keras = o.convention == Convention::keras;
    Coefficients c{};
    c.lr = o.lr;
    c.rho = o.rho;
    c.one_minus_rho = 1.0 - o.rho;
    c.eps = o.eps;
    c.weight_decay = o.weight_decay;
    c.decay_factor = decay_factor(o.convention, o.lr, o.weight_decay);
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
FUSEDOPT_LANE_FN void update(const Adadelta::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& square_avg = state[0];
  V& acc_delta = state[1];
  V g = c.maximize ? -grad : grad;
  const V rho = splat<V>(c.rho);
  const V one_minus_rho = splat<V>(c.one_minus_rho);
  const V eps = splat<V>(c.eps);
  if (c.convention == Convention::keras) {
    if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);
    square_avg = square_avg * rho + one_minus_rho * (g * g);
    const V delta = -((lane_sqrt(acc_delta + eps) * g) / lane_sqrt(square_avg + eps));
    acc_delta = acc_delta * rho + one_minus_rho * (delta * delta);
    param = param + splat<V>(c.lr) * delta;
    return;
  }
  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  square_avg = square_avg * rho + one_minus_rho * g * g;
  const V delta = (lane_sqrt(acc_delta + eps) / lane_sqrt(square_avg + eps)) * g;
  acc_delta = acc_delta * rho + one_minus_rho * delta * delta;
  param = param + splat<V>(-c.lr) * delta;
}

FUSEDOPT_MATH_END
