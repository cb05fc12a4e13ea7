// LAMB as keras.optimizers.Lamb (docs/spec.md section 21): Adam's bias-corrected update u, scaled
// per tensor by the trust ratio ||param|| / ||u|| (1 unless both norms are > 0). The first
// algorithm with per-tensor reductions: a first pass updates the moments and sums param^2 and u^2
// over each tensor, the host turns the sums into the ratio, and a second pass moves the param.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Lamb : AlgorithmDefaults {
  static constexpr const char* name = "lamb";

  struct Options {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-7, weight_decay = 0;
    Convention convention = Convention::keras;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),
      number("beta1", &Options::beta1),
      number("beta2", &Options::beta2),
      number("eps", &Options::eps),
      number("weight_decay", &Options::weight_decay),
      convention_field(&Options::convention),
  };

  static constexpr bool uses_step = true;
  static constexpr std::array state_names{"exp_avg", "exp_avg_sq"};
  static constexpr unsigned nonnegative_states = 0b10;
  static constexpr unsigned always_used_states = 0b11;
  static unsigned states_used(const Options&) { return 0b11; }
  // The sums of each tensor the first pass computes: of param^2 and of u^2.
  static constexpr int reductions = 2;

  static void check(const Options& o) {
    check_convention(o.convention, {Convention::keras});
    check_non_negative(o.lr, "lr");
    check_below_one(o.beta1, "beta1");
    check_below_one(o.beta2, "beta2");
    check_non_negative(o.eps, "eps");
    check_non_negative(o.weight_decay, "weight_decay");
  }

  struct Coefficients {
    double one_minus_beta1, one_minus_beta2, eps;
    Divisor bias_correction1, bias_correction2;
    double decay_factor, lr;
    double step_size;  // ratio * lr, once the tensor's sums are known (finish)
    bool has_decay;
  };

  static Coefficients coefficients(const Options& o, const StepInput& in) {
    const double t = static_cast<double>(in.step);
    Coefficients c{};
    // Keras' generic update_step hands these Python numbers to keras.ops: float32 tensors.
    c.one_minus_beta1 = keras_float(1.0 - o.beta1);
    c.one_minus_beta2 = keras_float(1.0 - o.beta2);
    c.eps = keras_float(o.eps);
    c.bias_correction1 = divisor(1.0 - std::pow(o.beta1, t));
    c.bias_correction2 = divisor(1.0 - std::pow(o.beta2, t));
    c.decay_factor = decay_factor(o.convention, o.lr, o.weight_decay);
    c.lr = o.lr;
    c.has_decay = o.weight_decay != 0;
    return c;
  }

  // Between the passes: the trust ratio from the tensor's sums. A NaN norm compares false and
  // takes ratio 1, as Keras' nested where does.
  FUSEDOPT_HOST_DEVICE static void finish(Coefficients& c, const double* sums) {
    const double param_norm = sqrt(sums[0]);
    const double update_norm = sqrt(sums[1]);
    const double ratio = param_norm > 0 && update_norm > 0 ? param_norm / update_norm : 1.0;
    c.step_size = ratio * c.lr;
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

// The param after Keras' decoupled decay, and the update u from the (new) moments: the same
// operations in both passes, so the norm is taken of exactly the update that is applied.
template <class V>
FUSEDOPT_LANE_FN void lamb_direction(const Lamb::Coefficients& c, V param,
                                     const V (&state)[kMaxStates], V& decayed, V& direction) {
  decayed = c.has_decay ? param * splat<V>(c.decay_factor) : param;
  const V corrected_momentum = lane_divide(state[0], c.bias_correction1);
  const V root = lane_sqrt(lane_divide(state[1], c.bias_correction2)) + splat<V>(c.eps);
  direction = corrected_momentum / root;
}

// The moments, advanced by the grad.
template <class V>
FUSEDOPT_LANE_FN void advance(const Lamb::Coefficients& c, V grad, V (&state)[kMaxStates]) {
  state[0] = state[0] + (grad - state[0]) * splat<V>(c.one_minus_beta1);
  state[1] = state[1] + (grad * grad - state[1]) * splat<V>(c.one_minus_beta2);
}

// The values whose squares are summed per tensor, from the advanced moments. On 16-bit or 8-bit
// state the moments are stored between advance() and this (docs/spec.md section 22), so that the
// norm is taken of the update the second pass computes from them.
template <class V>
FUSEDOPT_LANE_FN void reduced(const Lamb::Coefficients& c, V param, const V (&state)[kMaxStates],
                              V (&summed)[Lamb::reductions]) {
  lamb_direction(c, param, state, summed[0], summed[1]);
}

// First pass on float32 and float64 state: the moments, and the values whose squares are summed.
template <class V>
FUSEDOPT_LANE_FN void reduce(const Lamb::Coefficients& c, V param, V grad, V (&state)[kMaxStates],
                             V (&summed)[Lamb::reductions]) {
  advance(c, grad, state);
  reduced(c, param, state, summed);
}

// Second pass: reads the moments, moves the param.
template <class V>
FUSEDOPT_LANE_FN void update(const Lamb::Coefficients& c, V& param, V&, V (&state)[kMaxStates]) {
  V decayed, direction;
  lamb_direction(c, param, state, decayed, direction);
  param = decayed - splat<V>(c.step_size) * direction;
}

FUSEDOPT_MATH_END
