// NAdam (PyTorch) and Nadam (Keras), docs/spec.md section 16: Adam with Nesterov momentum and a
// momentum schedule mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay)), whose running product
// is kept per tensor (PyTorch's mu_product; Keras keeps one for the whole optimizer, which its
// front end hands to every tensor). Keras' schedule is momentum_decay = 1.
#pragma once

#include "math/algorithm.h"

namespace fusedopt {

struct Nadam : AlgorithmDefaults {
  static constexpr const char* name = "nadam";

  struct Options {
    double lr = 2e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
    double momentum_decay = 4e-3;
    bool decoupled_weight_decay = false, maximize = false;
    // The product is stored as a float32 value, as torch keeps it by default (its default dtype)
    // and Keras for float32 variables; otherwise in double.
    bool float32_scalars = true;
    Convention convention = Convention::torch;
  };
  static constexpr Field<Options> fields[] = {
      number("lr", &Options::lr),
      number("beta1", &Options::beta1),
      number("beta2", &Options::beta2),
      number("eps", &Options::eps),
      number("weight_decay", &Options::weight_decay),
      number("momentum_decay", &Options::momentum_decay),
      flag("decoupled_weight_decay", &Options::decoupled_weight_decay),
      flag("maximize", &Options::maximize),
      flag("float32_scalars", &Options::float32_scalars),
      convention_field(&Options::convention),
  };

  static constexpr bool uses_step = true;
  static constexpr std::array state_names{"exp_avg", "exp_avg_sq"};
  static constexpr unsigned nonnegative_states = 0b10;
  static constexpr unsigned always_used_states = 0b11;
  static unsigned states_used(const Options&) { return 0b11; }
  static constexpr std::array scalar_names{"mu_product"};
  static double initial_scalar(const Options&, int) { return 1.0; }

  static void check(const Options& o) {
    check_non_negative(o.lr, "lr");
    check_non_negative(o.eps, "eps");
    check_below_one(o.beta1, "beta1");
    check_below_one(o.beta2, "beta2");
    check_non_negative(o.weight_decay, "weight_decay");
    check_non_negative(o.momentum_decay, "momentum_decay");
  }

  // mu_t of the momentum schedule, and the product stored after this step.
  static double momentum_at(const Options& o, double t) {
    return o.beta1 * (1.0 - 0.5 * std::pow(0.96, t * o.momentum_decay));
  }
  static double next_product(const Options& o, const StepInput& in) {
    const double mu = momentum_at(o, static_cast<double>(in.step));
    if (!o.float32_scalars) return in.scalars[0] * mu;
    return to_float32(to_float32(in.scalars[0]) * to_float32(mu));
  }

  struct Coefficients {
    double beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, lr;
    Divisor bias_correction2;
    double grad_coefficient;                            // torch: -lr (1 - mu_t) / (1 - P_t)
    double momentum_coefficient;                        // torch: -lr mu_{t+1} / (1 - P_t mu_{t+1})
    double mu, mu_next;                                 // Keras: u_t, u_{t+1}
    Divisor one_minus_product, one_minus_next_product;  // Keras: 1 - U_t, 1 - U_{t+1}
    Convention convention;
    bool lerp_small_weight, maximize, has_weight_decay, has_decoupled_decay;
  };

  static Coefficients coefficients(const Options& o, const StepInput& in) {
    const bool keras = o.convention == Convention::keras;
    const double t = static_cast<double>(in.step);
    const double mu = momentum_at(o, t);
    const double mu_next = momentum_at(o, t + 1);
    const double product = next_product(o, in);
    double next = product * mu_next;
    if (keras && o.float32_scalars) next = to_float32(next);
    const bool decoupled = o.decoupled_weight_decay || keras;
    Coefficients c{};
    c.beta1 = o.beta1;
    c.one_minus_beta1 = 1.0 - o.beta1;
    c.beta2 = o.beta2;
    c.one_minus_beta2 = 1.0 - o.beta2;
    c.eps = o.eps;
    c.weight_decay = o.weight_decay;
    c.decay_factor = decay_factor(o.convention, o.lr, o.weight_decay);
    c.lr = o.lr;
    c.bias_correction2 = divisor(1.0 - std::pow(o.beta2, t));
    c.grad_coefficient = (-o.lr * (1.0 - mu)) / (1.0 - product);
    c.momentum_coefficient = (-o.lr * mu_next) / (1.0 - product * mu_next);
    c.mu = mu;
    c.mu_next = mu_next;
    c.one_minus_product = divisor(1.0 - product);
    c.one_minus_next_product = divisor(1.0 - next);
    c.convention = o.convention;
    c.lerp_small_weight = small_lerp_weight(1.0 - o.beta1);
    c.maximize = o.maximize;
    c.has_weight_decay = o.weight_decay != 0 && !decoupled;
    c.has_decoupled_decay = o.weight_decay != 0 && decoupled;
    return c;
  }

  static void advance_scalars(const Options& o, const StepInput& in, double* scalars) {
    scalars[0] = next_product(o, in);
  }
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

template <class V>
FUSEDOPT_LANE_FN void update(const Nadam::Coefficients& c, V& param, V& grad,
                             V (&state)[kMaxStates]) {
  V& exp_avg = state[0];
  V& exp_avg_sq = state[1];
  V g = c.maximize ? -grad : grad;
  if (c.has_decoupled_decay) param = param * splat<V>(c.decay_factor);
  if (c.convention == Convention::keras) {
    exp_avg = exp_avg * splat<V>(c.beta1) + splat<V>(c.one_minus_beta1) * g;
    exp_avg_sq = exp_avg_sq * splat<V>(c.beta2) + splat<V>(c.one_minus_beta2) * (g * g);
    const V corrected_momentum =
        lane_divide(exp_avg * splat<V>(c.mu_next), c.one_minus_next_product) +
        lane_divide(g * splat<V>(1.0 - c.mu), c.one_minus_product);
    const V corrected_square = lane_divide(exp_avg_sq, c.bias_correction2);
    param = param -
            (corrected_momentum * splat<V>(c.lr)) / (lane_sqrt(corrected_square) + splat<V>(c.eps));
    return;
  }
  if (c.has_weight_decay) g = g + splat<V>(c.weight_decay) * param;
  exp_avg = torch_lerp(exp_avg, g, c.one_minus_beta1, c.lerp_small_weight);
  exp_avg_sq = exp_avg_sq * splat<V>(c.beta2) + splat<V>(c.one_minus_beta2) * g * g;
  // The division before the root (torch's single-tensor form), and two separate updates of the
  // param, each rounded, as torch's two addcdiv calls.
  const V denominator = lane_sqrt(lane_divide(exp_avg_sq, c.bias_correction2)) + splat<V>(c.eps);
  param = param + (splat<V>(c.grad_coefficient) * g) / denominator;
  param = param + (splat<V>(c.momentum_coefficient) * exp_avg) / denominator;
}

FUSEDOPT_MATH_END
