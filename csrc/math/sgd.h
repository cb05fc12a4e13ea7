// SGD, momentum and Nesterov (SPEC sections 2-4): PyTorch's and Keras' forms in one function.
#pragma once

#include "math/coefficients.h"
#include "math/common.h"

FUSEDOPT_MATH_BEGIN

// grad is in/out: with a grad scale it leaves unscaled, and the caller writes it back as
// PyTorch's fused kernels do.
template <class V>
FUSEDOPT_LANE_FN void sgd_update(const SgdCoefficients& c, V& param, V& grad, V& buffer) {
  if (c.has_grad_scale) grad = grad / splat<V>(c.grad_scale);
  V g = c.maximize ? -grad : grad;
  const V lr = splat<V>(c.lr);
  const V momentum = splat<V>(c.momentum);

  if (c.convention == Convention::keras) {
    if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);
    if (!c.has_momentum) {
      param = param - g * lr;
      return;
    }
    // The learning rate lives inside Keras' velocity (SPEC 3: old rates stay in it).
    buffer = buffer * momentum - g * lr;
    param = c.nesterov ? param + (buffer * momentum - g * lr) : param + buffer;
    return;
  }

  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  if (c.has_momentum) {
    // PyTorch's first momentum step clones the gradient and skips dampening (SPEC 3).
    buffer = c.first_step ? g : buffer * momentum + g * splat<V>(c.dampening_complement);
    g = c.nesterov ? g + momentum * buffer : buffer;
  }
  param = param + splat<V>(-c.lr) * g;
}

FUSEDOPT_MATH_END
