// Adam, AdamW and AMSGrad (SPEC sections 7-8). PyTorch: eps next to the bias-corrected root,
// AdamW decay decoupled, AMSGrad on the raw second moment. Keras 3: eps-hat next to the raw root,
// the bias corrections folded into the step size, decoupled decay always.
#pragma once

#include "math/coefficients.h"
#include "math/common.h"

FUSEDOPT_MATH_BEGIN

// grad is in/out: with a grad scale it leaves unscaled, for the caller to write back (SPEC 8).
template <class V>
FUSEDOPT_LANE_FN void adam_update(const AdamCoefficients& c, V& param, V& grad, V& exp_avg,
                                  V& exp_avg_sq, V& max_exp_avg_sq) {
  if (c.has_grad_scale) grad = grad / splat<V>(c.grad_scale);
  V g = c.maximize ? -grad : grad;
  if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);

  if (c.convention == Convention::keras) {
    exp_avg = exp_avg + (g - exp_avg) * splat<V>(c.one_minus_beta1);
    exp_avg_sq = exp_avg_sq + (g * g - exp_avg_sq) * splat<V>(c.one_minus_beta2);
    V second_moment = exp_avg_sq;
    if (c.amsgrad) second_moment = max_exp_avg_sq = lane_max(max_exp_avg_sq, exp_avg_sq);
    param =
        param - (exp_avg * splat<V>(c.step_size)) / (lane_sqrt(second_moment) + splat<V>(c.eps));
    return;
  }

  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  exp_avg = torch_lerp(exp_avg, g, c.one_minus_beta1, c.lerp_small_weight);
  exp_avg_sq = exp_avg_sq * splat<V>(c.beta2) + splat<V>(c.one_minus_beta2) * g * g;
  V second_moment = exp_avg_sq;
  if (c.amsgrad) second_moment = max_exp_avg_sq = lane_max(max_exp_avg_sq, exp_avg_sq);
  const V denominator =
      lane_sqrt(second_moment) / splat<V>(c.bias_correction2_sqrt) + splat<V>(c.eps);
  param = param + (splat<V>(-c.step_size) * exp_avg) / denominator;
}

FUSEDOPT_MATH_END
