// RMSprop, plain, centered and with momentum (docs/spec.md section 6). PyTorch: eps outside the
// root and lr outside the momentum buffer. Keras 3: eps inside the root and lr inside the buffer.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Rmsprop : AlgorithmDefaults {
  static constexpr const char* name = "rmsprop";

  struct Options {
    double lr = 1e-2, alpha = 0.99, eps = 1e-8, weight_decay = 0, momentum = 0;
    bool centered = false, maximize = false;
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),
      number("alpha", &Options::alpha),
      number("eps", &Options::eps),
      number("weight_decay", &Options::weight_decay),
      number("momentum", &Options::momentum),
      flag("centered", &Options::centered),
      flag("maximize", &Options::maximize),
      convention_field(&Options::convention),
  };

  static constexpr bool uses_step = false;
  static constexpr std::array state_names{"square_avg", "momentum_buffer", "grad_avg"};
  static constexpr unsigned nonnegative_states = 0b001;
  static constexpr unsigned always_used_states = 0b001;
  static unsigned states_used(const Options& o) {
    return 0b001 | (o.momentum > 0 ? 0b010 : 0) | (o.centered ? 0b100 : 0);
  }

  static void check(const Options& o) {
    check_non_negative(o.lr, "lr");
    check_non_negative(o.alpha, "alpha");
    check_non_negative(o.eps, "eps");
    check_non_negative(o.weight_decay, "weight_decay");
    check_non_negative(o.momentum, "momentum");
  }

  struct Coefficients {
    double lr, alpha, one_minus_alpha, eps, momentum, weight_decay, decay_factor;
    Convention convention;
    bool lerp_small_weight;  // torch.lerp's form for grad_avg
    bool centered, has_momentum, maximize, has_weight_decay, has_decoupled_decay;
  };

  static Coefficients coefficients(const Options& o, const StepInput&) {
    Coefficients c{};
    c.lr = o.lr;
    c.alpha = o.alpha;
    c.one_minus_alpha = 1.0 - o.alpha;
    c.eps = o.eps;
    c.momentum = o.momentum;
    c.weight_decay = o.weight_decay;
    c.decay_factor = decay_factor(o.convention, o.lr, o.weight_decay);
    c.convention = o.convention;
    c.lerp_small_weight = small_lerp_weight(1.0 - o.alpha);
    c.centered = o.centered;
    c.has_momentum = o.momentum > 0;
    c.maximize = o.maximize;
    c.has_weight_decay = o.weight_decay != 0 && o.convention == Convention::torch;
    c.has_decoupled_decay = o.weight_decay != 0 && o.convention == Convention::keras;
    return c;
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

template <class V>
FUSEDOPT_LANE_FN void update(const Rmsprop::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& square_avg = state[0];
  V& momentum_buffer = state[1];
  V& grad_avg = state[2];
  V g = c.maximize ? -grad : grad;
  const V alpha = splat<V>(c.alpha);
  const V one_minus_alpha = splat<V>(c.one_minus_alpha);

  if (c.convention == Convention::keras) {
    if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);
    square_avg = alpha * square_avg + one_minus_alpha * (g * g);
    V denominator;
    if (c.centered) {
      grad_avg = alpha * grad_avg + one_minus_alpha * g;
      // Keras' torch step adds epsilon before subtracting mg^2 (its generic update_step after):
      // where a steady grad makes ms == mg^2 the two orders differ by far more than rounding.
      denominator = (square_avg + splat<V>(c.eps)) - grad_avg * grad_avg;
    } else {
      denominator = square_avg + splat<V>(c.eps);
    }
    const V increment = (splat<V>(c.lr) * g) / lane_sqrt(denominator);
    if (c.has_momentum) {
      momentum_buffer = splat<V>(c.momentum) * momentum_buffer + increment;
      param = param - momentum_buffer;
    } else {
      param = param - increment;
    }
    return;
  }

  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  square_avg = square_avg * alpha + one_minus_alpha * g * g;
  V avg;
  if (c.centered) {
    grad_avg = torch_lerp(grad_avg, g, c.one_minus_alpha, c.lerp_small_weight);
    avg = lane_sqrt(square_avg - grad_avg * grad_avg) + splat<V>(c.eps);
  } else {
    avg = lane_sqrt(square_avg) + splat<V>(c.eps);
  }
  if (c.has_momentum) {
    momentum_buffer = momentum_buffer * splat<V>(c.momentum) + g / avg;
    param = param + splat<V>(-c.lr) * momentum_buffer;
  } else {
    param = param + (splat<V>(-c.lr) * g) / avg;
  }
}

FUSEDOPT_MATH_END
