// SGD, momentum and Nesterov (docs/spec.md sections 2-4): PyTorch's and Keras' forms in one
// function.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Sgd : AlgorithmDefaults {
  static constexpr const char* name = "sgd";

  struct Options {
    double lr = 1e-3, momentum = 0, dampening = 0, weight_decay = 0;
    bool nesterov = false, maximize = false;
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),
      number("momentum", &Options::momentum),
      number("dampening", &Options::dampening),
      number("weight_decay", &Options::weight_decay),
      flag("nesterov", &Options::nesterov),
      flag("maximize", &Options::maximize),
      convention_field(&Options::convention),
  };

  static constexpr bool uses_step = false;
  static constexpr bool uses_new_state = true;
  static constexpr std::array state_names{"momentum_buffer"};
  static constexpr unsigned always_used_states = 0;
  static unsigned states_used(const Options& o) { return o.momentum != 0 ? 1 : 0; }
  static constexpr bool takes_grad_scale = true;

  static void check(const Options& o) {
    check_non_negative(o.lr, "lr");
    check_non_negative(o.momentum, "momentum");
    // torch checks no dampening: any number (a negative one grows the gradient's share).
    check_rule(!std::isnan(o.dampening), "dampening", o.dampening, "must be a number");
    check_non_negative(o.weight_decay, "weight_decay");
    if (o.convention == Convention::keras) check_unit_interval(o.momentum, "momentum");
    if (o.nesterov && o.convention == Convention::torch)
      check_rule(o.momentum > 0 && o.dampening == 0, "nesterov", 1.0,
                 "Nesterov momentum requires a momentum and zero dampening");
  }

  struct Coefficients {
    double lr, weight_decay, decay_factor, momentum, dampening_complement;
    Divisor grad_scale;
    Convention convention;
    bool has_momentum;
    bool first_step;  // torch: a new momentum buffer takes the gradient itself (spec 3)
    bool nesterov, maximize, has_weight_decay, has_decoupled_decay, has_grad_scale;
  };

  static Coefficients coefficients(const Options& o, const StepInput& in) {
    Coefficients c{};
    c.lr = o.lr;
    c.weight_decay = o.weight_decay;
    c.decay_factor = decay_factor(o.convention, o.lr, o.weight_decay);
    c.momentum = o.momentum;
    c.dampening_complement = 1.0 - o.dampening;
    c.grad_scale = divisor(in.grad_scale ? *in.grad_scale : 1.0);
    c.convention = o.convention;
    c.has_momentum = o.momentum != 0;
    c.first_step = in.new_state;
    c.nesterov = o.nesterov;
    c.maximize = o.maximize;
    c.has_weight_decay = o.weight_decay != 0 && o.convention == Convention::torch;
    c.has_decoupled_decay = o.weight_decay != 0 && o.convention == Convention::keras;
    c.has_grad_scale = in.grad_scale != nullptr;
    return c;
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

// grad is in/out: with a grad scale it leaves unscaled, and the caller writes it back as
// PyTorch's fused kernels do.
template <class V>
FUSEDOPT_LANE_FN void update(const Sgd::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& buffer = state[0];
  if (c.has_grad_scale) grad = lane_divide(grad, c.grad_scale);
  V g = c.maximize ? -grad : grad;
  const V lr = splat<V>(c.lr);
  const V momentum = splat<V>(c.momentum);

  if (c.convention == Convention::keras) {
    if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);
    if (!c.has_momentum) {
      param = param - g * lr;
      return;
    }
    // The learning rate lives inside Keras' velocity (spec 3: old rates stay in it).
    buffer = buffer * momentum - g * lr;
    param = c.nesterov ? param + (buffer * momentum - g * lr) : param + buffer;
    return;
  }

  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  if (c.has_momentum) {
    // PyTorch's first momentum step clones the gradient and skips dampening (spec 3).
    buffer = c.first_step ? g : buffer * momentum + g * splat<V>(c.dampening_complement);
    g = c.nesterov ? g + momentum * buffer : buffer;
  }
  param = param + splat<V>(-c.lr) * g;
}

FUSEDOPT_MATH_END
