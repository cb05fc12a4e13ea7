// A thin C++17 layer over fusedopt's C ABI (fusedopt.h): RAII options and plans, views of
// float/double buffers instead of pointer + size, exceptions instead of status codes.
// Header-only, so it adds nothing to the library's ABI; every call is a call of the C functions.
//
//   std::vector<double> w(n), g(n), m(n), v(n);             // param, grad, Adam's two moments
//   fusedopt::Options adam = fusedopt::Options("adam").set("lr", 0.05);   // else torch's defaults
//   fusedopt::Plan plan(adam, {fusedopt::tensor(w, {}, {m, v})});          // registered once
//   for (int64_t step = 1; step <= steps; ++step) {
//     compute_gradient(w, g);
//     plan.step({g});                          // grads only; the plan counts the steps
//   }
//
// Without a plan, fusedopt::step(adam, fusedopt::tensor(w, g, {m, v}, step)) takes every buffer
// (and the step number) at each call. Option and state names are the algorithm's description's
// (csrc/math/<name>.h): Options::option_names() and state_names() list them.
#ifndef FUSEDOPT_FUSEDOPT_HPP
#define FUSEDOPT_FUSEDOPT_HPP

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if __cplusplus >= 202002L && __has_include(<span>)
#include <span>
#endif

#include "fusedopt/fusedopt.h"

namespace fusedopt {

// A failed call: status() is the C ABI's code, what() the message naming the argument.
class Error : public std::runtime_error {
 public:
  Error(fusedopt_status status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  fusedopt_status status() const noexcept { return status_; }

 private:
  fusedopt_status status_;
};

inline void check(fusedopt_status status) {
  if (status != FUSEDOPT_STATUS_OK) throw Error(status, fusedopt_last_error());
}

#if defined(__cpp_lib_span)
template <class T>
using Span = std::span<T>;
#else
// The part of std::span this header needs, for C++17: a pointer and a size, from any container
// with contiguous data() and size(), or from a C array.
template <class T>
class Span {
 public:
  constexpr Span() noexcept = default;
  constexpr Span(T* data, std::size_t size) noexcept : data_(data), size_(size) {}
  template <std::size_t N>
  constexpr Span(T (&array)[N]) noexcept : data_(array), size_(N) {}  // NOLINT: as std::span's
  // A temporary container only for a view of const elements (an argument), as std::span.
  template <class Container,
            class = std::enable_if_t<
                std::is_convertible_v<decltype(std::declval<Container&>().data()), T*> &&
                (std::is_lvalue_reference_v<Container> || std::is_const_v<T>)>>
  constexpr Span(Container&& container) noexcept  // NOLINT: implicit, as std::span's
      : data_(container.data()), size_(container.size()) {}
  constexpr T* data() const noexcept { return data_; }
  constexpr std::size_t size() const noexcept { return size_; }
  constexpr bool empty() const noexcept { return size_ == 0; }
  constexpr T* begin() const noexcept { return data_; }
  constexpr T* end() const noexcept { return data_ + size_; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};
#endif

// The algorithms this library has, by name ("sgd", "adam", ...).
inline std::vector<std::string> algorithms() {
  std::vector<std::string> names;
  for (int32_t i = 0; i < fusedopt_algorithm_count(); ++i)
    names.emplace_back(fusedopt_algorithm_name(i));
  return names;
}

// ---- Options: one group's hyperparameters, set by name, starting at torch.optim's defaults ---
// A value type: a copy is fusedopt_options_copy's, every value included. Value semantics let a
// program keep a vector of groups and derive one group's options from another's.
class Options {
 public:
  explicit Options(const std::string& algorithm) {
    fusedopt::check(fusedopt_options_create(algorithm.c_str(), &handle_));
  }
  Options(const Options& other) { fusedopt::check(fusedopt_options_copy(other.handle_, &handle_)); }
  Options(Options&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Options& operator=(Options other) noexcept {  // copy-and-swap: a failed copy changes nothing
    std::swap(handle_, other.handle_);
    return *this;
  }
  ~Options() { fusedopt_options_destroy(handle_); }

  // Sets one hyperparameter (flags are 0 or 1; "convention" is FUSEDOPT_CONVENTION_TORCH or
  // _KERAS) and returns *this, so calls chain. An unknown name throws; a value is checked when
  // a step or a plan takes it (or by check()).
  Options& set(const std::string& name, double value) & {
    fusedopt::check(fusedopt_options_set(handle_, name.c_str(), value));
    return *this;
  }
  Options&& set(const std::string& name, double value) && { return std::move(set(name, value)); }
  double get(const std::string& name) const {
    double value = 0;
    fusedopt::check(fusedopt_options_get(handle_, name.c_str(), &value));
    return value;
  }
  // Throws naming the first invalid hyperparameter.
  void check() const { fusedopt::check(fusedopt_options_check(handle_)); }

  std::string algorithm() const {
    const char* name = fusedopt_options_algorithm(handle_);
    return name ? name : "";  // "" once moved from
  }
  std::vector<std::string> option_names() const { return names(fusedopt_option_name); }
  // The per-element state buffers, in the order of fusedopt_tensor.state and tensor()'s states.
  std::vector<std::string> state_names() const { return names(fusedopt_state_name); }
  // Whether these options read and write state k (its buffer must then be given).
  bool uses_state(int k) const { return (fusedopt_states_used(handle_) >> k) & 1u; }
  // The value a new buffer of state k starts at (NaN past the last state).
  double initial_state(int k) const { return fusedopt_initial_state(handle_, k); }
  // The per-tensor scalars (fusedopt_tensor.scalars) and their starting values (NaN past the
  // last scalar).
  std::vector<std::string> scalar_names() const { return names(fusedopt_scalar_name); }
  double initial_scalar(int k) const { return fusedopt_initial_scalar(handle_, k); }
  // Whether a step may be given a grad_scale.
  bool takes_grad_scale() const { return fusedopt_takes_grad_scale(handle_) != 0; }

  const fusedopt_options* handle() const noexcept { return handle_; }

 private:
  std::vector<std::string> names(const char* (*name_of)(const fusedopt_options*, int32_t)) const {
    std::vector<std::string> result;
    for (int32_t i = 0; const char* name = name_of(handle_, i); ++i) result.emplace_back(name);
    return result;
  }

  fusedopt_options* handle_ = nullptr;
};

// ---- Tensors: one param's buffers, its step number (1 on its first step) and its group -------
// states are the algorithm's state buffers in Options::state_names() order; an empty view (or
// a shorter list) leaves a state the options do not keep NULL. grad may be empty for a Plan,
// which takes its grads at each step. Set .scalars (algorithms with per-tensor scalars) and
// .new_state (the states were created for this step: PyTorch's SGD starts its momentum from the
// gradient) on the result where they apply.

namespace detail {

template <class T>
fusedopt_tensor tensor(Span<T> param, Span<T> grad, std::initializer_list<Span<T>> states,
                       int64_t step, int32_t group) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  auto check_size = [&](Span<T> buffer, const std::string& name) {
    if (!buffer.empty() && buffer.size() != param.size())
      throw Error(FUSEDOPT_STATUS_VALUE_ERROR, name + " has " + std::to_string(buffer.size()) +
                                                   " elements but param has " +
                                                   std::to_string(param.size()));
  };
  if (states.size() > FUSEDOPT_MAX_STATES)
    throw Error(FUSEDOPT_STATUS_VALUE_ERROR, std::to_string(states.size()) +
                                                 " states given; a tensor has at most " +
                                                 std::to_string(FUSEDOPT_MAX_STATES));
  fusedopt_tensor t{};
  check_size(grad, "grad");
  t.param = param.data();
  t.grad = grad.empty() ? nullptr : grad.data();
  int k = 0;
  for (Span<T> state : states) {
    check_size(state, "state[" + std::to_string(k) + "]");
    t.state[k++] = state.empty() ? nullptr : state.data();
  }
  t.size = static_cast<int64_t>(param.size());
  t.step = step;
  t.dtype = std::is_same_v<T, float> ? FUSEDOPT_FLOAT32 : FUSEDOPT_FLOAT64;
  t.group = group;
  return t;
}

inline const double* scale_pointer(const std::optional<double>& grad_scale) {
  return grad_scale ? &*grad_scale : nullptr;
}

inline std::vector<const fusedopt_options*> handles(Span<const Options> groups) {
  std::vector<const fusedopt_options*> result;
  result.reserve(groups.size());
  for (const Options& o : groups) result.push_back(o.handle());
  return result;
}

}  // namespace detail

// Overloads for float and double, so a std::vector (or std::array) converts to the view.
inline fusedopt_tensor tensor(Span<float> param, Span<float> grad,
                              std::initializer_list<Span<float>> states = {}, int64_t step = 1,
                              int32_t group = 0) {
  return detail::tensor(param, grad, states, step, group);
}
inline fusedopt_tensor tensor(Span<double> param, Span<double> grad,
                              std::initializer_list<Span<double>> states = {}, int64_t step = 1,
                              int32_t group = 0) {
  return detail::tensor(param, grad, states, step, group);
}

// ---- Steps: every tensor of the call in one native pass --------------------------------------
// groups[g] are the options of group g (tensor.group indexes them), all for one algorithm; or
// one Options for tensors that all have group 0. grad_scale divides the gradients (and writes
// them back unscaled) where the algorithm takes one (torch's fused SGD and Adam).

inline void step(Span<const Options> groups, Span<const fusedopt_tensor> tensors,
                 std::optional<double> grad_scale = std::nullopt) {
  const std::vector<const fusedopt_options*> handles = detail::handles(groups);
  check(fusedopt_step(handles.data(), static_cast<int64_t>(handles.size()), tensors.data(),
                      static_cast<int64_t>(tensors.size()), detail::scale_pointer(grad_scale)));
}
inline void step(const Options& options, Span<const fusedopt_tensor> tensors,
                 std::optional<double> grad_scale = std::nullopt) {
  step(Span<const Options>(&options, 1), tensors, grad_scale);
}
inline void step(const Options& options, const fusedopt_tensor& tensor,
                 std::optional<double> grad_scale = std::nullopt) {
  step(Span<const Options>(&options, 1), Span<const fusedopt_tensor>(&tensor, 1), grad_scale);
}

// ---- Plan: params and states registered (and validated) once, each step given grads only ----
// The tensors' step fields are t of the plan's first step; the plan counts from there. Keep
// every param, state and scalar buffer alive and in place while the plan lives; each step reads
// the scalars as they are then and writes them back advanced. Move-only: it
// owns a native plan, and two plans updating the same buffers would make no sense. Steps on one
// plan are serialized (by the library); different plans may step in parallel.
class Plan {
 public:
  Plan(Span<const Options> groups, Span<const fusedopt_tensor> tensors) {
    const std::vector<const fusedopt_options*> handles = detail::handles(groups);
    for (const fusedopt_tensor& t : tensors) sizes_.push_back({t.size, t.dtype});
    // Last: nothing may throw once the native plan exists (no destructor would free it).
    check(fusedopt_plan_create(handles.data(), static_cast<int64_t>(handles.size()), tensors.data(),
                               static_cast<int64_t>(tensors.size()), &handle_));
  }
  Plan(const Options& options, Span<const fusedopt_tensor> tensors)
      : Plan(Span<const Options>(&options, 1), tensors) {}
  Plan(const Options& options, std::initializer_list<fusedopt_tensor> tensors)
      : Plan(options, Span<const fusedopt_tensor>(tensors.begin(), tensors.size())) {}
  Plan(Plan&& other) noexcept
      : handle_(std::exchange(other.handle_, nullptr)), sizes_(std::move(other.sizes_)) {}
  Plan& operator=(Plan&& other) noexcept {
    std::swap(handle_, other.handle_);
    std::swap(sizes_, other.sizes_);
    return *this;
  }
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() { fusedopt_plan_destroy(handle_); }

  // One step: grads[i] for tensor i, of its dtype and size (unchecked here: the library checks
  // what it can, a NULL grad and one that overlaps a registered buffer).
  void step(Span<void* const> grads, std::optional<double> grad_scale = std::nullopt) {
    if (grads.size() != sizes_.size())
      throw Error(FUSEDOPT_STATUS_VALUE_ERROR, "grads: expected " + std::to_string(sizes_.size()) +
                                                   " (one per tensor), got " +
                                                   std::to_string(grads.size()));
    check(fusedopt_plan_step(handle_, grads.data(), detail::scale_pointer(grad_scale)));
  }
  // The same with typed views, each checked against its tensor's dtype and size.
  void step(std::initializer_list<Span<float>> grads,
            std::optional<double> grad_scale = std::nullopt) {
    const std::vector<void*> pointers = addresses(grads, FUSEDOPT_FLOAT32);
    step(pointers, grad_scale);
  }
  void step(std::initializer_list<Span<double>> grads,
            std::optional<double> grad_scale = std::nullopt) {
    const std::vector<void*> pointers = addresses(grads, FUSEDOPT_FLOAT64);
    step(pointers, grad_scale);
  }

  // New hyperparameters for one group (a learning-rate schedule); the plan keeps a copy.
  void set_options(int64_t group, const Options& options) {
    check(fusedopt_plan_set_options(handle_, group, options.handle()));
  }
  // The step number t that each tensor's next step will have.
  std::vector<int64_t> steps() const {
    std::vector<int64_t> result(sizes_.size());
    check(fusedopt_plan_steps(handle_, result.data()));
    return result;
  }
  std::size_t size() const noexcept { return sizes_.size(); }
  fusedopt_plan* handle() const noexcept { return handle_; }

 private:
  struct Size {
    int64_t size;
    int32_t dtype;
  };

  static const char* dtype_name(int32_t dtype) {
    return dtype == FUSEDOPT_FLOAT32 ? "float32" : "float64";
  }

  template <class T>
  std::vector<void*> addresses(std::initializer_list<Span<T>> grads, int32_t dtype) const {
    std::vector<void*> result;
    std::size_t i = 0;
    for (Span<T> g : grads) {
      if (i < sizes_.size()) {
        const std::string index = "[" + std::to_string(i) + "]";
        if (sizes_[i].dtype != dtype)
          throw Error(FUSEDOPT_STATUS_TYPE_ERROR, "grads" + index + " is " + dtype_name(dtype) +
                                                      " but params" + index + " is " +
                                                      dtype_name(sizes_[i].dtype));
        if (static_cast<int64_t>(g.size()) != sizes_[i].size)
          throw Error(FUSEDOPT_STATUS_VALUE_ERROR, "grads" + index + " has " +
                                                       std::to_string(g.size()) +
                                                       " elements but params" + index + " has " +
                                                       std::to_string(sizes_[i].size));
      }
      result.push_back(g.data());
      ++i;
    }
    return result;
  }

  fusedopt_plan* handle_ = nullptr;
  std::vector<Size> sizes_;
};

// ---- EWMA, ISA and threads -------------------------------------------------------------------

// One series: out[t] = pandas' ewm(com=options.com, ...).mean() of x[:t + 1].
inline void ewma(Span<const double> x, Span<double> out, const fusedopt_ewma_options& options) {
  if (out.size() != x.size())
    throw Error(FUSEDOPT_STATUS_VALUE_ERROR, "out has " + std::to_string(out.size()) +
                                                 " elements but x has " + std::to_string(x.size()));
  check(fusedopt_ewma(x.data(), out.data(), static_cast<int64_t>(x.size()), 1, 1, 0, &options));
}

inline std::string cpu_isa() { return fusedopt_cpu_isa(); }

inline std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  const std::string joined = fusedopt_available_isas();
  for (std::size_t begin = 0; begin < joined.size();) {
    const std::size_t comma = std::min(joined.find(',', begin), joined.size());
    names.push_back(joined.substr(begin, comma - begin));
    begin = comma + 1;
  }
  return names;
}

inline void set_cpu_isa(const std::string& isa) { check(fusedopt_set_cpu_isa(isa.c_str())); }

inline int num_threads() { return fusedopt_num_threads(); }

inline void set_num_threads(int n) { check(fusedopt_set_num_threads(n)); }

}  // namespace fusedopt

#endif  // FUSEDOPT_FUSEDOPT_HPP
