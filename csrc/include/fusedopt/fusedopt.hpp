// A thin C++17 layer over fusedopt's C ABI (fusedopt.h): views of float/double buffers instead
// of pointer + size, exceptions instead of status codes. Header-only, so it adds nothing to the
// library's ABI; every call is one call of the C functions.
//
//   std::vector<float> w(n), g(n), m(n), v(n);
//   fusedopt_adam_options options = fusedopt_adam_default_options();
//   options.lr = 0.05;
//   for (int64_t step = 1; step <= steps; ++step) {
//     compute_gradient(w, g);
//     fusedopt::adam_step(options, fusedopt::adam_tensor(w, g, m, v, step));
//   }
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
// with contiguous data() and size().
template <class T>
class Span {
 public:
  constexpr Span() noexcept = default;
  constexpr Span(T* data, std::size_t size) noexcept : data_(data), size_(size) {}
  template <class Container, class = std::enable_if_t<std::is_convertible_v<
                                 decltype(std::declval<Container&>().data()), T*>>>
  constexpr Span(Container& container) noexcept  // NOLINT: implicit, as std::span's
      : data_(container.data()), size_(container.size()) {}
  constexpr T* data() const noexcept { return data_; }
  constexpr std::size_t size() const noexcept { return size_; }
  constexpr bool empty() const noexcept { return size_ == 0; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};
#endif

namespace detail {

template <class T>
constexpr int32_t dtype_of() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "fusedopt updates float and double buffers");
  return std::is_same_v<T, float> ? FUSEDOPT_FLOAT32 : FUSEDOPT_FLOAT64;
}

// Every buffer of a tensor has the param's size; an empty optional state stays NULL.
template <class T>
int64_t common_size(Span<T> param, std::initializer_list<std::pair<const char*, Span<T>>> others) {
  for (const auto& [name, buffer] : others)
    if (!buffer.empty() && buffer.size() != param.size())
      throw Error(FUSEDOPT_STATUS_VALUE_ERROR,
                  std::string(name) + " has " + std::to_string(buffer.size()) +
                      " elements but param has " + std::to_string(param.size()));
  return static_cast<int64_t>(param.size());
}

template <class T>
void* address(Span<T> buffer) {
  return buffer.empty() ? nullptr : static_cast<void*>(buffer.data());
}

template <class T>
fusedopt_sgd_tensor sgd_tensor(Span<T> param, Span<T> grad, Span<T> momentum_buffer, int64_t step,
                               int32_t group) {
  const int64_t size = common_size(param, {{"grad", grad}, {"momentum_buffer", momentum_buffer}});
  return {param.data(), grad.data(), address(momentum_buffer), size, step, dtype_of<T>(), group};
}

template <class T>
fusedopt_adagrad_tensor adagrad_tensor(Span<T> param, Span<T> grad, Span<T> sum, int64_t step,
                                       int32_t group) {
  const int64_t size = common_size(param, {{"grad", grad}, {"sum", sum}});
  return {param.data(), grad.data(), address(sum), size, step, dtype_of<T>(), group};
}

template <class T>
fusedopt_rmsprop_tensor rmsprop_tensor(Span<T> param, Span<T> grad, Span<T> square_avg,
                                       Span<T> momentum_buffer, Span<T> grad_avg, int64_t step,
                                       int32_t group) {
  const int64_t size = common_size(param, {{"grad", grad},
                                           {"square_avg", square_avg},
                                           {"momentum_buffer", momentum_buffer},
                                           {"grad_avg", grad_avg}});
  return {param.data(),
          grad.data(),
          address(square_avg),
          address(momentum_buffer),
          address(grad_avg),
          size,
          step,
          dtype_of<T>(),
          group};
}

template <class T>
fusedopt_adam_tensor adam_tensor(Span<T> param, Span<T> grad, Span<T> exp_avg, Span<T> exp_avg_sq,
                                 Span<T> max_exp_avg_sq, int64_t step, int32_t group) {
  const int64_t size = common_size(param, {{"grad", grad},
                                           {"exp_avg", exp_avg},
                                           {"exp_avg_sq", exp_avg_sq},
                                           {"max_exp_avg_sq", max_exp_avg_sq}});
  return {param.data(),
          grad.data(),
          address(exp_avg),
          address(exp_avg_sq),
          address(max_exp_avg_sq),
          size,
          step,
          dtype_of<T>(),
          group};
}

inline const double* scale_pointer(const std::optional<double>& grad_scale) {
  return grad_scale ? &*grad_scale : nullptr;
}

}  // namespace detail

// ---- Tensors: one param's buffers, its step count (1 on its first step) and its group -------
// Overloads for float and double, so a std::vector (or std::array) converts to the view. An
// optional state is an empty view where the options keep none.

inline fusedopt_sgd_tensor sgd_tensor(Span<float> param, Span<float> grad,
                                      Span<float> momentum_buffer, int64_t step,
                                      int32_t group = 0) {
  return detail::sgd_tensor(param, grad, momentum_buffer, step, group);
}
inline fusedopt_sgd_tensor sgd_tensor(Span<double> param, Span<double> grad,
                                      Span<double> momentum_buffer, int64_t step,
                                      int32_t group = 0) {
  return detail::sgd_tensor(param, grad, momentum_buffer, step, group);
}

inline fusedopt_adagrad_tensor adagrad_tensor(Span<float> param, Span<float> grad, Span<float> sum,
                                              int64_t step, int32_t group = 0) {
  return detail::adagrad_tensor(param, grad, sum, step, group);
}
inline fusedopt_adagrad_tensor adagrad_tensor(Span<double> param, Span<double> grad,
                                              Span<double> sum, int64_t step, int32_t group = 0) {
  return detail::adagrad_tensor(param, grad, sum, step, group);
}

inline fusedopt_rmsprop_tensor rmsprop_tensor(Span<float> param, Span<float> grad,
                                              Span<float> square_avg, int64_t step,
                                              Span<float> momentum_buffer = {},
                                              Span<float> grad_avg = {}, int32_t group = 0) {
  return detail::rmsprop_tensor(param, grad, square_avg, momentum_buffer, grad_avg, step, group);
}
inline fusedopt_rmsprop_tensor rmsprop_tensor(Span<double> param, Span<double> grad,
                                              Span<double> square_avg, int64_t step,
                                              Span<double> momentum_buffer = {},
                                              Span<double> grad_avg = {}, int32_t group = 0) {
  return detail::rmsprop_tensor(param, grad, square_avg, momentum_buffer, grad_avg, step, group);
}

inline fusedopt_adam_tensor adam_tensor(Span<float> param, Span<float> grad, Span<float> exp_avg,
                                        Span<float> exp_avg_sq, int64_t step,
                                        Span<float> max_exp_avg_sq = {}, int32_t group = 0) {
  return detail::adam_tensor(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, group);
}
inline fusedopt_adam_tensor adam_tensor(Span<double> param, Span<double> grad, Span<double> exp_avg,
                                        Span<double> exp_avg_sq, int64_t step,
                                        Span<double> max_exp_avg_sq = {}, int32_t group = 0) {
  return detail::adam_tensor(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, group);
}

// ---- Steps: every tensor of the call in one native pass --------------------------------------
// Each takes the options of every group (tensor.group indexes them), or one options struct for
// a call whose tensors all have group 0, and a whole list of tensors or a single one.

inline void sgd_step(Span<const fusedopt_sgd_options> groups,
                     Span<const fusedopt_sgd_tensor> tensors,
                     std::optional<double> grad_scale = std::nullopt) {
  check(fusedopt_sgd_step(groups.data(), static_cast<int64_t>(groups.size()), tensors.data(),
                          static_cast<int64_t>(tensors.size()), detail::scale_pointer(grad_scale)));
}
inline void sgd_step(const fusedopt_sgd_options& options, Span<const fusedopt_sgd_tensor> tensors,
                     std::optional<double> grad_scale = std::nullopt) {
  sgd_step({&options, 1}, tensors, grad_scale);
}
inline void sgd_step(const fusedopt_sgd_options& options, const fusedopt_sgd_tensor& tensor,
                     std::optional<double> grad_scale = std::nullopt) {
  sgd_step({&options, 1}, {&tensor, 1}, grad_scale);
}

inline void adagrad_step(Span<const fusedopt_adagrad_options> groups,
                         Span<const fusedopt_adagrad_tensor> tensors) {
  check(fusedopt_adagrad_step(groups.data(), static_cast<int64_t>(groups.size()), tensors.data(),
                              static_cast<int64_t>(tensors.size())));
}
inline void adagrad_step(const fusedopt_adagrad_options& options,
                         Span<const fusedopt_adagrad_tensor> tensors) {
  adagrad_step({&options, 1}, tensors);
}
inline void adagrad_step(const fusedopt_adagrad_options& options,
                         const fusedopt_adagrad_tensor& tensor) {
  adagrad_step({&options, 1}, {&tensor, 1});
}

inline void rmsprop_step(Span<const fusedopt_rmsprop_options> groups,
                         Span<const fusedopt_rmsprop_tensor> tensors) {
  check(fusedopt_rmsprop_step(groups.data(), static_cast<int64_t>(groups.size()), tensors.data(),
                              static_cast<int64_t>(tensors.size())));
}
inline void rmsprop_step(const fusedopt_rmsprop_options& options,
                         Span<const fusedopt_rmsprop_tensor> tensors) {
  rmsprop_step({&options, 1}, tensors);
}
inline void rmsprop_step(const fusedopt_rmsprop_options& options,
                         const fusedopt_rmsprop_tensor& tensor) {
  rmsprop_step({&options, 1}, {&tensor, 1});
}

inline void adam_step(Span<const fusedopt_adam_options> groups,
                      Span<const fusedopt_adam_tensor> tensors,
                      std::optional<double> grad_scale = std::nullopt) {
  check(fusedopt_adam_step(groups.data(), static_cast<int64_t>(groups.size()), tensors.data(),
                           static_cast<int64_t>(tensors.size()),
                           detail::scale_pointer(grad_scale)));
}
inline void adam_step(const fusedopt_adam_options& options,
                      Span<const fusedopt_adam_tensor> tensors,
                      std::optional<double> grad_scale = std::nullopt) {
  adam_step({&options, 1}, tensors, grad_scale);
}
inline void adam_step(const fusedopt_adam_options& options, const fusedopt_adam_tensor& tensor,
                      std::optional<double> grad_scale = std::nullopt) {
  adam_step({&options, 1}, {&tensor, 1}, grad_scale);
}

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
