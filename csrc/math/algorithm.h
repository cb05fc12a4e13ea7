// What an algorithm's description is made of, and the helpers descriptions share.
//
// Each algorithm is described once, in csrc/math/<name>.h, next to its math, by a struct with:
//
//   name                     how every layer knows it: "adam" (C ABI, Python, error messages)
//   Options                  the hyperparameters of one group of tensors; defaults are
//   torch.optim's fields                   each option's name and member (the C ABI and Python set
//   them by name) state_names              its per-element state buffers, in the order the update
//   takes them always_used_states       bit k set: every configuration uses state k (kernel fast
//   paths) states_used(options)     bit k set: this configuration reads and writes state k
//   initial_state(options, k)          the value a new buffer of state k is filled with
//   scalar_names             per-tensor host values kept between steps (NAdam's mu_product), or {}
//   initial_scalar(options, k)         their starting values
//   uses_step                whether the update depends on the step number t (bias corrections)
//   uses_new_state           whether it depends on the state being new (PyTorch SGD's first
//                            momentum step copies the gradient)
//   takes_grad_scale         whether a step may divide the gradient by a GradScaler's scale (and
//                            write the unscaled gradient back, as PyTorch's fused kernels do)
//   nonnegative_states, quantizable_states   how 8-bit blockwise state stores the states
//   check(options)           throws OptionError naming the first invalid hyperparameter
//   Coefficients             what the kernels read: computed once per (group, step) on the host,
//                            in double, and read by every backend
//   coefficients(options, input)       computes them
//   advance_scalars(options, input, scalars)   the scalars' update, when there are any
//   reductions               per-tensor sums a first pass computes (LAMB's norms), or 0; with
//                            finish(coefficients, sums), which makes the second pass's
//                            coefficients from them
//
// and, in the per-ISA namespace (FUSEDOPT_MATH_BEGIN), the per-element update over a lane type V:
//
//   template <class V> void update(const Coefficients&, V& param, V& grad, V (&state)[kMaxStates])
//
// With reductions, a first pass runs reduce(coefficients, param, grad, state, summed) over every
// tensor (it updates the states and yields the values whose squares are summed, per tensor, in an
// order fixed by the tensor alone), then update runs with the finished coefficients; it reads the
// states and writes only the param. reduce is advance(coefficients, grad, state), the states'
// update, then reduced(coefficients, param, state, summed), the summed values from the states:
// on 16-bit or 8-bit state the states are stored between the two, so the sums are those of the
// update the second pass computes from the stored states.
//
// The registry (csrc/math/registry.h) lists the descriptions; every layer is generic over it.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <tuple>

#include "core/error.h"
#include "math/common.h"

namespace fusedopt {

// Host code that the CUDA kernels call too (LAMB's finish, between its two passes).
#if defined(__CUDACC__)
#define FUSEDOPT_HOST_DEVICE __host__ __device__
#else
#define FUSEDOPT_HOST_DEVICE
#endif

// Per-element state buffers an algorithm may keep (RMSprop and Adam keep three).
constexpr int kMaxStates = 3;
// Per-tensor host scalars (NAdam's mu_product; ASGD's eta and mu).
constexpr int kMaxScalars = 2;

enum class Convention : int { torch = 0, keras = 1 };

// One hyperparameter: its name and where it lives in Options. Options hold doubles, flags and the
// convention only, so the C ABI and Python can set any of them from a double.
template <class Options>
struct Field {
  const char* name;
  double Options::*number;
  bool Options::*flag;
  Convention Options::*convention;

  double get(const Options& o) const {
    if (number) return o.*number;
    if (flag) return o.*flag ? 1.0 : 0.0;
    return static_cast<double>(o.*convention);
  }
  bool is_flag() const { return flag != nullptr || convention != nullptr; }
};

template <class Options>
constexpr Field<Options> number(const char* name, double Options::*member) {
  return {name, member, nullptr, nullptr};
}
template <class Options>
constexpr Field<Options> flag(const char* name, bool Options::*member) {
  return {name, nullptr, member, nullptr};
}
template <class Options>
constexpr Field<Options> convention_field(Convention Options::*member) {
  return {"convention", nullptr, nullptr, member};
}

// What a step knows of one tensor besides its group's options.
struct StepInput {
  int64_t step = 1;                    // t: 1 on the tensor's first step
  bool new_state = false;              // its state buffers were created for this step
  const double* grad_scale = nullptr;  // the gradient is divided by *grad_scale when set
  const double* scalars = nullptr;     // its scalars before this step (kMaxScalars of them)
};

// What a description leaves out: no scalars, states that start at zero, no grad scale. A
// description derives from this and says only what differs.
struct AlgorithmDefaults {
  static constexpr std::array<const char*, 0> scalar_names{};
  template <class Options>
  static double initial_state(const Options&, int) {
    return 0.0;
  }
  template <class Options>
  static double initial_scalar(const Options&, int) {
    return 0.0;
  }
  template <class Options>
  static void advance_scalars(const Options&, const StepInput&, double*) {}
  static constexpr bool takes_grad_scale = false;
  static constexpr bool uses_new_state = false;
  static constexpr int reductions = 0;
  // 8-bit blockwise state (docs/spec.md section 22): bit k set, state k is never negative and
  // takes the unsigned dynamic map; `quantizable_states` false refuses 8-bit state (states that
  // are not moments: ASGD's averaged param, Rprop's step sizes).
  static constexpr unsigned nonnegative_states = 0;
  static constexpr bool quantizable_states = true;
};

// ---- Hyperparameter checks (the same rules as torch.optim and Keras) -------------------------
// The `!(x >= 0)` forms also refuse NaN.

// Whether the range checks below refuse, on this thread: yes but within a RangeChecks(false)
// scope. torch.optim checks its hyperparameters in its constructors only (docs/spec.md,
// "Hyperparameters"): a value set later in param_groups is used as is, and a negative lr or a
// beta2 of 1 gives what torch's arithmetic gives (inf and NaN included). fusedopt.torch builds
// and updates its plans in such a scope. The values are only arithmetic: no range protects
// memory. The convention check is no range check and still refuses.
class RangeChecks {
 public:
  explicit RangeChecks(bool on) : previous_(on_) { on_ = on; }
  ~RangeChecks() { on_ = previous_; }
  RangeChecks(const RangeChecks&) = delete;
  RangeChecks& operator=(const RangeChecks&) = delete;
  static bool on() { return on_; }

 private:
  static inline thread_local bool on_ = true;
  bool previous_;
};

inline void check_rule(bool ok, const char* name, double x, const char* rule) {
  if (!ok && RangeChecks::on()) throw OptionError(name, x, rule);
}

inline void check_non_negative(double x, const char* name) {
  check_rule(x >= 0 && std::isfinite(x), name, x, "must be a finite number >= 0");
}

inline void check_positive(double x, const char* name) {
  check_rule(x > 0 && std::isfinite(x), name, x, "must be a finite number > 0");
}

// [0, 1): betas and other decay rates that divide by 1 - x^t.
inline void check_below_one(double x, const char* name) {
  check_rule(x >= 0 && x < 1, name, x, "must be in [0, 1)");
}

// [0, 1].
inline void check_unit_interval(double x, const char* name) {
  check_rule(x >= 0 && x <= 1, name, x, "must be in [0, 1]");
}

// An algorithm offered in one convention only refuses the other.
inline void check_convention(Convention c, std::initializer_list<Convention> offered) {
  for (Convention o : offered)
    if (c == o) return;
  throw OptionError("convention", static_cast<double>(c),
                    offered.size() == 1 && *offered.begin() == Convention::keras
                        ? "only the Keras convention (1) is offered"
                        : "only the PyTorch convention (0) is offered");
}

// x rounded to float32, for values a framework stores as float32 (torch's scalar states, Keras'
// floatx tensors). Through a volatile: GCC 12's SLP vectorizer dropped the rounding of a plain
// static_cast<float> in a function like LAMB's coefficients (found by its Keras tests; gone with
// -fno-tree-vectorize).
inline double to_float32(double x) {
  volatile float rounded = static_cast<float>(x);
  return rounded;
}

// Keras on the torch backend turns Python numbers into floatx (float32) tensors: its learning
// rate is a float32 variable, and the decoupled decay 1 - lr * weight_decay is computed in float32
// from it (spec section 1), whatever the variable's dtype. PyTorch's decay factor is a double.
inline double keras_float(double x) { return to_float32(x); }
inline double decay_factor(Convention convention, double lr, double weight_decay) {
  if (convention == Convention::keras)
    return to_float32(1.0 - to_float32(to_float32(lr) * to_float32(weight_decay)));
  return 1.0 - lr * weight_decay;
}

// torch.lerp rounds as start + w * (end - start) when |w| < 0.5, otherwise as
// end - (end - start) * (1 - w): the host picks the form once per step.
inline bool small_lerp_weight(double w) { return std::fabs(w) < 0.5; }

// ---- The registry's type list -----------------------------------------------------------------

template <class A>
struct AlgorithmTag {
  using type = A;
};

template <class... Algorithms>
struct AlgorithmList {
  static constexpr int size = sizeof...(Algorithms);
  using First = std::tuple_element_t<0, std::tuple<Algorithms...>>;
  // f(AlgorithmTag<A>{}) for every algorithm, in order.
  template <class F>
  static void for_each(F&& f) {
    (f(AlgorithmTag<Algorithms>{}), ...);
  }
  // f(AlgorithmTag<A>{}) for the algorithm called `name`; false when there is none.
  template <class F>
  static bool visit(const std::string& name, F&& f) {
    return ((name == Algorithms::name && (f(AlgorithmTag<Algorithms>{}), true)) || ...);
  }
  // std::tuple<W<A>...>: one W per algorithm, found again with std::get<W<A>>.
  template <template <class> class W>
  using map = std::tuple<W<Algorithms>...>;
};

}  // namespace fusedopt
