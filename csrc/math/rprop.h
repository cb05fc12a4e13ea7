// Rprop (PyTorch; docs/spec.md section 18): only the sign of the gradient moves the param, by a
// per-element step size that grows while the sign holds and shrinks when it flips. The step sizes
// start at the lr of the first step, which is never read again.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Rprop : AlgorithmDefaults {
  static constexpr const char* name = "rprop";

  struct Options {
    double lr = 1e-2, etaminus = 0.5, etaplus = 1.2, step_size_min = 1e-6, step_size_max = 50;
    bool maximize = false;
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),
      number("etaminus", &Options::etaminus),
      number("etaplus", &Options::etaplus),
      number("step_size_min", &Options::step_size_min),
      number("step_size_max", &Options::step_size_max),
      flag("maximize", &Options::maximize),
      convention_field(&Options::convention),
  };

  static constexpr bool uses_step = false;
  static constexpr std::array state_names{"prev", "step_size"};
  static constexpr bool quantizable_states = false;
  static constexpr unsigned always_used_states = 0b11;
  static unsigned states_used(const Options&) { return 0b11; }
  static double initial_state(const Options& o, int k) { return k == 1 ? o.lr : 0.0; }

  // torch checks lr and the etas; it accepts any step sizes, which clamp as torch.clamp does.
  static void check(const Options& o) {
    check_convention(o.convention, {Convention::torch});
    check_non_negative(o.lr, "lr");
    check_rule(o.etaminus > 0 && o.etaminus < 1, "etaminus", o.etaminus,
               "must satisfy 0 < etaminus < 1 < etaplus");
    check_rule(o.etaplus > 1, "etaplus", o.etaplus, "must satisfy 0 < etaminus < 1 < etaplus");
    check_rule(!std::isnan(o.step_size_min) && !std::isnan(o.step_size_max), "step_sizes",
               std::isnan(o.step_size_min) ? o.step_size_min : o.step_size_max, "must be numbers");
  }

  struct Coefficients {
    double etaminus, etaplus, step_size_min, step_size_max;
    bool maximize;
  };

  static Coefficients coefficients(const Options& o, const StepInput&) {
    return {o.etaminus, o.etaplus, o.step_size_min, o.step_size_max, o.maximize};
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

template <class V>
FUSEDOPT_LANE_FN void update(const Rprop::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& prev = state[0];
  V& step_size = state[1];
  V g = c.maximize ? -grad : grad;
  const V zero = splat<V>(0.0);
  // The sign of the rounded product, as torch takes it: an underflow counts as no sign.
  const V product = g * prev;
  const auto flipped = product < zero;
  const V factor = lane_select(product > zero, splat<V>(c.etaplus),
                               lane_select(flipped, splat<V>(c.etaminus), splat<V>(1.0)));
  step_size = lane_clamp(step_size * factor, splat<V>(c.step_size_min), splat<V>(c.step_size_max));
  // After a flip the element does not move, and its next factor is 1.
  g = lane_select(flipped, zero, g);
  // A NaN gradient does not move the param (torch.sign(NaN) is 0), and a NaN product above takes
  // the factor 1.
  param = param - lane_sign(g) * step_size;
  prev = g;
}

FUSEDOPT_MATH_END
