// RMSprop, plain, centered and with momentum (SPEC section 6). PyTorch: eps outside the root and
// lr outside the momentum buffer. Keras 3: eps inside the root and lr inside the buffer.
#pragma once

#include "math/coefficients.h"
#include "math/common.h"

FUSEDOPT_MATH_BEGIN

template <class V>
FUSEDOPT_LANE_FN void rmsprop_update(const RmspropCoefficients& c, V& param, V grad, V& square_avg,
                                     V& momentum_buffer, V& grad_avg) {
  V g = c.maximize ? -grad : grad;
  const V alpha = splat<V>(c.alpha);
  const V one_minus_alpha = splat<V>(c.one_minus_alpha);

  if (c.convention == Convention::keras) {
    if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);
    square_avg = alpha * square_avg + one_minus_alpha * (g * g);
    V denominator;
    if (c.centered) {
      grad_avg = alpha * grad_avg + one_minus_alpha * g;
      denominator = square_avg - grad_avg * grad_avg + splat<V>(c.eps);
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
