// ASGD (PyTorch; docs/spec.md section 19): SGD with a decaying step eta and a running average ax
// of the params from step t0 on. eta and mu are per-tensor scalars read at the start of a step
// and recomputed at its end from that step's hyperparameters, so an lr change moves the param
// one step late; torch stores them as float32 values by default.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Asgd : AlgorithmDefaults {
  static constexpr const char* name = "asgd";

  struct Options {
    double lr = 1e-2, lambd = 1e-4, alpha = 0.75, t0 = 1e6, weight_decay = 0;
    bool maximize = false;
    bool float32_scalars = true;  // as torch stores eta and mu by default (its default dtype)
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),
      number("lambd", &Options::lambd),
      number("alpha", &Options::alpha),
      number("t0", &Options::t0),
      number("weight_decay", &Options::weight_decay),
      flag("maximize", &Options::maximize),
      flag("float32_scalars", &Options::float32_scalars),
      convention_field(&Options::convention),
  };

  static constexpr bool uses_step = true;
  static constexpr std::array state_names{"ax"};
  static constexpr bool quantizable_states = false;
  static constexpr unsigned always_used_states = 0b1;
  static unsigned states_used(const Options&) { return 0b1; }
  static constexpr std::array scalar_names{"eta", "mu"};
  static double initial_scalar(const Options& o, int k) { return k == 0 ? rounded(o, o.lr) : 1.0; }

  // torch checks lr and weight_decay only; lambd, alpha and t0 may be any number.
  static void check(const Options& o) {
    check_convention(o.convention, {Convention::torch});
    check_non_negative(o.lr, "lr");
    check_non_negative(o.weight_decay, "weight_decay");
    for (const auto& [value, field] :
         {std::pair{o.lambd, "lambd"}, std::pair{o.alpha, "alpha"}, std::pair{o.t0, "t0"}})
      check_rule(!std::isnan(value), field, value, "must be a number");
  }

  static double rounded(const Options& o, double x) {
    return o.float32_scalars ? to_float32(x) : x;
  }

  struct Coefficients {
    double eta, decay_factor, mu, weight_decay;
    bool averaging, maximize, has_weight_decay;
  };

  static Coefficients coefficients(const Options& o, const StepInput& in) {
    Coefficients c{};
    c.eta = in.scalars[0];
    c.decay_factor = 1.0 - o.lambd * c.eta;
    c.mu = in.scalars[1];
    c.weight_decay = o.weight_decay;
    c.averaging = c.mu != 1.0;
    c.maximize = o.maximize;
    c.has_weight_decay = o.weight_decay != 0;
    return c;
  }

  static void advance_scalars(const Options& o, const StepInput& in, double* scalars) {
    const double t = static_cast<double>(in.step);
    scalars[0] = rounded(o, o.lr / std::pow(1.0 + o.lambd * o.lr * t, o.alpha));
    scalars[1] = rounded(o, 1.0 / std::max(1.0, t - o.t0));
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

template <class V>
FUSEDOPT_LANE_FN void update(const Asgd::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& ax = state[0];
  V g = c.maximize ? -grad : grad;
  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  param = param * splat<V>(c.decay_factor);
  param = param + splat<V>(-c.eta) * g;
  ax = c.averaging ? ax + (param - ax) * splat<V>(c.mu) : param;
}

FUSEDOPT_MATH_END
