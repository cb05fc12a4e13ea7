// RAdam (PyTorch; docs/spec.md section 17): Adam whose adaptive step is rectified by r_t once the
// variance of the adaptive rate is tractable (rho_t > 5, decided per step on the host), and plain
// bias-corrected momentum before that. eps sits next to the uncorrected root.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Radam : AlgorithmDefaults {
  static constexpr const char* name = "radam";

  struct Options {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
    bool decoupled_weight_decay = false, maximize = false;
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),
      number("beta1", &Options::beta1),
      number("beta2", &Options::beta2),
      number("eps", &Options::eps),
      number("weight_decay", &Options::weight_decay),
      flag("decoupled_weight_decay", &Options::decoupled_weight_decay),
      flag("maximize", &Options::maximize),
      convention_field(&Options::convention),
  };

  static constexpr bool uses_step = true;
  static constexpr std::array state_names{"exp_avg", "exp_avg_sq"};
  static constexpr unsigned nonnegative_states = 0b10;
  static constexpr unsigned always_used_states = 0b11;
  static unsigned states_used(const Options&) { return 0b11; }

  static void check(const Options& o) {
    check_convention(o.convention, {Convention::torch});
    check_non_negative(o.lr, "lr");
    check_non_negative(o.eps, "eps");
    check_below_one(o.beta1, "beta1");
    check_below_one(o.beta2, "beta2");
    check_non_negative(o.weight_decay, "weight_decay");
  }

  struct Coefficients {
    double lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor;
    Divisor bias_correction1;
    double bias_correction2_sqrt, rectification;
    bool rectified, lerp_small_weight, maximize, has_weight_decay, has_decoupled_decay;
  };

  static Coefficients coefficients(const Options& o, const StepInput& in) {
    const double t = static_cast<double>(in.step);
    const double beta2_t = std::pow(o.beta2, t);
    const double bias_correction2 = 1.0 - beta2_t;
    const double rho_infinity = 2.0 / (1.0 - o.beta2) - 1.0;
    const double rho_t = rho_infinity - ((2.0 * t) * beta2_t) / bias_correction2;
    Coefficients c{};
    c.lr = o.lr;
    c.beta1 = o.beta1;
    c.one_minus_beta1 = 1.0 - o.beta1;
    c.beta2 = o.beta2;
    c.one_minus_beta2 = 1.0 - o.beta2;
    c.eps = o.eps;
    c.weight_decay = o.weight_decay;
    c.decay_factor = decay_factor(o.convention, o.lr, o.weight_decay);
    c.bias_correction1 = divisor(1.0 - std::pow(o.beta1, t));
    c.bias_correction2_sqrt = std::sqrt(bias_correction2);
    c.rectified = rho_t > 5.0;
    c.rectification = c.rectified ? std::sqrt(((rho_t - 4) * (rho_t - 2) * rho_infinity) /
                                              ((rho_infinity - 4) * (rho_infinity - 2) * rho_t))
                                  : 0.0;
    c.lerp_small_weight = small_lerp_weight(1.0 - o.beta1);
    c.maximize = o.maximize;
    c.has_weight_decay = o.weight_decay != 0 && !o.decoupled_weight_decay;
    c.has_decoupled_decay = o.weight_decay != 0 && o.decoupled_weight_decay;
    return c;
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

template <class V>
FUSEDOPT_LANE_FN void update(const Radam::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& exp_avg = state[0];
  V& exp_avg_sq = state[1];
  V g = c.maximize ? -grad : grad;
  if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);
  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  exp_avg = torch_lerp(exp_avg, g, c.one_minus_beta1, c.lerp_small_weight);
  exp_avg_sq = exp_avg_sq * splat<V>(c.beta2) + splat<V>(c.one_minus_beta2) * g * g;
  const V corrected = lane_divide(exp_avg, c.bias_correction1);
  if (c.rectified) {
    const V adaptive =
        splat<V>(c.bias_correction2_sqrt) / (lane_sqrt(exp_avg_sq) + splat<V>(c.eps));
    param = param - ((corrected * splat<V>(c.lr)) * adaptive) * splat<V>(c.rectification);
  } else {
    param = param - corrected * splat<V>(c.lr);
  }
}

FUSEDOPT_MATH_END
