// Per-step coefficients, computed once on the host in double (csrc/core/coefficients.cpp) and
// read by every backend. Plain structs outside the per-ISA namespaces: the host code and every
// kernel compile share one layout.
#pragma once

#include <cstdint>

namespace fusedopt {

enum class Convention : int { torch = 0, keras = 1 };

struct SgdCoefficients {
  double lr;
  double weight_decay;  // torch: L2 coefficient folded into the gradient
  double decay_factor;  // keras: 1 - lr * weight_decay, applied to the param first
  double momentum;
  double dampening_complement;  // 1 - dampening
  double grad_scale;            // the gradient is divided by this when has_grad_scale
  Convention convention;
  bool has_momentum;
  bool first_step;  // torch: a new momentum buffer takes the gradient itself
  bool nesterov;
  bool maximize;
  bool has_weight_decay;     // L2 (torch)
  bool has_decoupled_decay;  // keras
  bool has_grad_scale;
};

struct AdagradCoefficients {
  double lr;            // torch: lr / (1 + (step - 1) * lr_decay)
  double weight_decay;  // torch L2
  double decay_factor;  // keras decoupled decay
  double eps;
  Convention convention;
  bool maximize;
  bool has_weight_decay;
  bool has_decoupled_decay;
};

struct RmspropCoefficients {
  double lr;
  double alpha;  // torch alpha, keras rho
  double one_minus_alpha;
  bool lerp_small_weight;  // torch.lerp form for grad_avg
  double eps;
  double momentum;
  double weight_decay;
  double decay_factor;
  Convention convention;
  bool centered;
  bool has_momentum;
  bool maximize;
  bool has_weight_decay;
  bool has_decoupled_decay;
};

struct AdamCoefficients {
  double beta1;
  double one_minus_beta1;
  bool lerp_small_weight;
  double beta2;
  double one_minus_beta2;
  double eps;
  double weight_decay;           // torch L2
  double decay_factor;           // decoupled decay: torch AdamW and every keras optimizer
  double step_size;              // torch: lr / bc1; keras: lr * sqrt(bc2) / bc1
  double bias_correction2_sqrt;  // torch: sqrt(1 - beta2^t)
  double grad_scale;
  Convention convention;
  bool amsgrad;
  bool maximize;
  bool has_weight_decay;  // L2
  bool has_decoupled_decay;
  bool has_grad_scale;
};

// pandas' ewm(...).mean(), from the center of mass com (SPEC section 9).
struct EwmaCoefficients {
  double old_weight_factor;  // 1 - alpha, alpha = 1 / (1 + com)
  double new_weight;         // 1 if adjust else alpha
  bool adjust;
  bool ignore_na;
  int64_t min_periods;  // already max(min_periods, 1)
};

}  // namespace fusedopt
