// Adagrad (SPEC section 5): PyTorch puts eps outside the square root, Keras 3 inside.
#pragma once

#include "math/coefficients.h"
#include "math/common.h"

FUSEDOPT_MATH_BEGIN

template <class V>
FUSEDOPT_LANE_FN void adagrad_update(const AdagradCoefficients& c, V& param, V grad, V& sum) {
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
