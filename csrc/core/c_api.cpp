// The C ABI (csrc/include/fusedopt/fusedopt.h) on top of the core: each call describes the
// caller's buffers to the same validator and step functions the Python bindings use, and turns
// every exception into a status code and a thread-local message.
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/ewma.h"
#include "core/step.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"
#include "fusedopt/fusedopt.h"

namespace fusedopt {
namespace {

thread_local std::string last_error;

fusedopt_status fail(fusedopt_status status, const char* message) noexcept {
  try {
    last_error = message;
  } catch (...) {
    last_error.clear();  // no memory for the message; the status still says what went wrong
  }
  return status;
}

// Runs body(); no exception leaves, each becomes a status with its message kept for
// fusedopt_last_error().
template <class Body>
fusedopt_status guarded(Body body) noexcept {
  try {
    body();
    last_error.clear();
    return FUSEDOPT_STATUS_OK;
  } catch (const Error& e) {
    return fail(
        e.kind == ErrorKind::type ? FUSEDOPT_STATUS_TYPE_ERROR : FUSEDOPT_STATUS_VALUE_ERROR,
        e.what());
  } catch (const std::invalid_argument& e) {
    return fail(FUSEDOPT_STATUS_VALUE_ERROR, e.what());
  } catch (const std::bad_alloc&) {
    return fail(FUSEDOPT_STATUS_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return fail(FUSEDOPT_STATUS_INTERNAL_ERROR, e.what());
  } catch (...) {
    return fail(FUSEDOPT_STATUS_INTERNAL_ERROR, "unknown exception");
  }
}

std::string indexed(const char* name, int64_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

Convention convention_of(int32_t value, const std::string& name) {
  if (value == FUSEDOPT_CONVENTION_TORCH) return Convention::torch;
  if (value == FUSEDOPT_CONVENTION_KERAS) return Convention::keras;
  throw Error(ErrorKind::value, name +
                                    ".convention must be FUSEDOPT_CONVENTION_TORCH or "
                                    "FUSEDOPT_CONVENTION_KERAS, got " +
                                    std::to_string(value));
}

void check_count(const void* array, int64_t count, const char* name) {
  if (count < 0)
    throw Error(ErrorKind::value,
                std::string("num_") + name + " must be >= 0, got " + std::to_string(count));
  if (count > 0 && !array)
    throw Error(ErrorKind::type,
                std::string(name) + " is NULL but num_" + name + " is " + std::to_string(count));
}

// An empty std::vector may hand out a null data(): an empty tensor's buffers are never read, so
// any address stands in for them and the tensor is skipped like any other empty one.
char empty_buffer_address;

BufferInfo describe(void* data, int64_t size, int32_t dtype) {
  BufferInfo info;
  info.data = size == 0 && !data ? &empty_buffer_address : data;
  info.present = info.data != nullptr;
  info.shape = {size};
  info.size = size;
  info.is_float32 = dtype == FUSEDOPT_FLOAT32;
  info.is_float64 = dtype == FUSEDOPT_FLOAT64;
  info.contiguous = true;
  info.writeable = true;
  info.dtype_name = info.is_float32   ? "float32"
                    : info.is_float64 ? "float64"
                                      : std::to_string(dtype) + " (not a fusedopt_dtype)";
  return info;
}

// The parts every tensor struct shares, gathered into the core's StepBuffers and StepSchedule;
// state_members are the struct's state pointers in the order the core's kernels expect.
template <class Tensor, size_t NumStates>
void describe_tensors(const Tensor* tensors, int64_t count,
                      void* Tensor::*const (&state_members)[NumStates],
                      const char* const (&state_names)[NumStates], bool grads_written,
                      StepBuffers& buffers, StepSchedule& schedule) {
  check_count(tensors, count, "tensors");
  buffers.grads_written = grads_written;
  buffers.states.resize(NumStates);
  for (const char* name : state_names) buffers.state_names.emplace_back(name);
  for (int64_t i = 0; i < count; ++i) {
    const Tensor& t = tensors[i];
    if (t.size < 0)
      throw Error(ErrorKind::value,
                  indexed("tensors", i) + ".size must be >= 0, got " + std::to_string(t.size));
    if (t.size > 0 && !t.param)
      throw Error(ErrorKind::type, indexed("tensors", i) + ".param is NULL");
    if (t.size > 0 && !t.grad)
      throw Error(ErrorKind::type, indexed("tensors", i) + ".grad is NULL");
    buffers.params.push_back(describe(t.param, t.size, t.dtype));
    buffers.grads.push_back(describe(t.grad, t.size, t.dtype));
    for (size_t k = 0; k < NumStates; ++k)
      buffers.states[k].push_back(describe(t.*state_members[k], t.size, t.dtype));
    schedule.group_of.push_back(t.group);
    schedule.steps.push_back(t.step);
  }
}

template <class Options, class CGroup, class Convert>
std::vector<Options> convert_groups(const CGroup* groups, int64_t count, Convert convert) {
  check_count(groups, count, "groups");
  std::vector<Options> converted;
  converted.reserve(count);
  for (int64_t g = 0; g < count; ++g) converted.push_back(convert(groups[g], indexed("groups", g)));
  return converted;
}

std::optional<double> optional_scale(const double* grad_scale) {
  if (!grad_scale) return std::nullopt;
  return *grad_scale;
}

}  // namespace
}  // namespace fusedopt

using namespace fusedopt;

extern "C" {

const char* fusedopt_last_error(void) { return last_error.c_str(); }

const char* fusedopt_status_string(fusedopt_status status) {
  switch (status) {
    case FUSEDOPT_STATUS_OK:
      return "ok";
    case FUSEDOPT_STATUS_TYPE_ERROR:
      return "type error";
    case FUSEDOPT_STATUS_VALUE_ERROR:
      return "value error";
    case FUSEDOPT_STATUS_OUT_OF_MEMORY:
      return "out of memory";
    case FUSEDOPT_STATUS_INTERNAL_ERROR:
      return "internal error";
  }
  return "unknown status";
}

const char* fusedopt_version(void) { return FUSEDOPT_VERSION; }

fusedopt_sgd_options fusedopt_sgd_default_options(void) {
  const SgdOptions d;
  return {d.lr,
          d.momentum,
          d.dampening,
          d.weight_decay,
          d.nesterov,
          d.maximize,
          FUSEDOPT_CONVENTION_TORCH};
}

fusedopt_adagrad_options fusedopt_adagrad_default_options(void) {
  const AdagradOptions d;
  return {d.lr, d.lr_decay, d.weight_decay, d.eps, d.maximize, FUSEDOPT_CONVENTION_TORCH};
}

fusedopt_rmsprop_options fusedopt_rmsprop_default_options(void) {
  const RmspropOptions d;
  return {d.lr,       d.alpha,    d.eps,      d.weight_decay,
          d.momentum, d.centered, d.maximize, FUSEDOPT_CONVENTION_TORCH};
}

fusedopt_adam_options fusedopt_adam_default_options(void) {
  const AdamOptions d;
  return {d.lr,
          d.beta1,
          d.beta2,
          d.eps,
          d.weight_decay,
          d.amsgrad,
          d.maximize,
          d.decoupled_weight_decay,
          FUSEDOPT_CONVENTION_TORCH};
}

fusedopt_status fusedopt_sgd_step(const fusedopt_sgd_options* groups, int64_t num_groups,
                                  const fusedopt_sgd_tensor* tensors, int64_t num_tensors,
                                  const double* grad_scale) {
  return guarded([&] {
    auto options = convert_groups<SgdOptions>(
        groups, num_groups, [](const fusedopt_sgd_options& c, const std::string& name) {
          SgdOptions o;
          o.lr = c.lr;
          o.momentum = c.momentum;
          o.dampening = c.dampening;
          o.weight_decay = c.weight_decay;
          o.nesterov = c.nesterov != 0;
          o.maximize = c.maximize != 0;
          o.convention = convention_of(c.convention, name);
          return o;
        });
    static void* fusedopt_sgd_tensor::*const states[] = {&fusedopt_sgd_tensor::momentum_buffer};
    static const char* const names[] = {"momentum_buffer"};
    StepBuffers buffers;
    StepSchedule schedule;
    describe_tensors(tensors, num_tensors, states, names, grad_scale != nullptr, buffers, schedule);
    sgd_step(options, schedule, buffers, optional_scale(grad_scale));
  });
}

fusedopt_status fusedopt_adagrad_step(const fusedopt_adagrad_options* groups, int64_t num_groups,
                                      const fusedopt_adagrad_tensor* tensors, int64_t num_tensors) {
  return guarded([&] {
    auto options = convert_groups<AdagradOptions>(
        groups, num_groups, [](const fusedopt_adagrad_options& c, const std::string& name) {
          AdagradOptions o;
          o.lr = c.lr;
          o.lr_decay = c.lr_decay;
          o.weight_decay = c.weight_decay;
          o.eps = c.eps;
          o.maximize = c.maximize != 0;
          o.convention = convention_of(c.convention, name);
          return o;
        });
    static void* fusedopt_adagrad_tensor::*const states[] = {&fusedopt_adagrad_tensor::sum};
    static const char* const names[] = {"sum"};
    StepBuffers buffers;
    StepSchedule schedule;
    describe_tensors(tensors, num_tensors, states, names, false, buffers, schedule);
    adagrad_step(options, schedule, buffers);
  });
}

fusedopt_status fusedopt_rmsprop_step(const fusedopt_rmsprop_options* groups, int64_t num_groups,
                                      const fusedopt_rmsprop_tensor* tensors, int64_t num_tensors) {
  return guarded([&] {
    auto options = convert_groups<RmspropOptions>(
        groups, num_groups, [](const fusedopt_rmsprop_options& c, const std::string& name) {
          RmspropOptions o;
          o.lr = c.lr;
          o.alpha = c.alpha;
          o.eps = c.eps;
          o.weight_decay = c.weight_decay;
          o.momentum = c.momentum;
          o.centered = c.centered != 0;
          o.maximize = c.maximize != 0;
          o.convention = convention_of(c.convention, name);
          return o;
        });
    static void* fusedopt_rmsprop_tensor::*const states[] = {
        &fusedopt_rmsprop_tensor::square_avg, &fusedopt_rmsprop_tensor::momentum_buffer,
        &fusedopt_rmsprop_tensor::grad_avg};
    static const char* const names[] = {"square_avg", "momentum_buffer", "grad_avg"};
    StepBuffers buffers;
    StepSchedule schedule;
    describe_tensors(tensors, num_tensors, states, names, false, buffers, schedule);
    rmsprop_step(options, schedule, buffers);
  });
}

fusedopt_status fusedopt_adam_step(const fusedopt_adam_options* groups, int64_t num_groups,
                                   const fusedopt_adam_tensor* tensors, int64_t num_tensors,
                                   const double* grad_scale) {
  return guarded([&] {
    auto options = convert_groups<AdamOptions>(
        groups, num_groups, [](const fusedopt_adam_options& c, const std::string& name) {
          AdamOptions o;
          o.lr = c.lr;
          o.beta1 = c.beta1;
          o.beta2 = c.beta2;
          o.eps = c.eps;
          o.weight_decay = c.weight_decay;
          o.amsgrad = c.amsgrad != 0;
          o.maximize = c.maximize != 0;
          o.decoupled_weight_decay = c.decoupled_weight_decay != 0;
          o.convention = convention_of(c.convention, name);
          return o;
        });
    static void* fusedopt_adam_tensor::*const states[] = {&fusedopt_adam_tensor::exp_avg,
                                                          &fusedopt_adam_tensor::exp_avg_sq,
                                                          &fusedopt_adam_tensor::max_exp_avg_sq};
    static const char* const names[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
    StepBuffers buffers;
    StepSchedule schedule;
    describe_tensors(tensors, num_tensors, states, names, grad_scale != nullptr, buffers, schedule);
    adam_step(options, schedule, buffers, optional_scale(grad_scale));
  });
}

fusedopt_ewma_options fusedopt_ewma_default_options(void) { return {0.0, 1, 0, 0}; }

fusedopt_status fusedopt_ewma(const double* x, double* out, int64_t length, int64_t num_series,
                              int64_t time_stride, int64_t series_stride,
                              const fusedopt_ewma_options* options) {
  return guarded([&] {
    if (!options) throw Error(ErrorKind::type, "options is NULL");
    if (length < 0 || num_series < 0)
      throw Error(ErrorKind::value, "length and num_series must be >= 0");
    if (time_stride < 0 || series_stride < 0)
      throw Error(ErrorKind::value, "time_stride and series_stride must be >= 0");
    if (options->min_periods < 0) throw Error(ErrorKind::value, "min_periods must be >= 0");
    if (length > 0 && num_series > 0 && (!x || !out))
      throw Error(ErrorKind::type, !x ? "x is NULL" : "out is NULL");
    ewma(x, out, length, num_series, time_stride, series_stride, options->com, options->adjust != 0,
         options->ignore_na != 0, options->min_periods);
  });
}

// The first call detects the CPU, which allocates; out of memory there is reported as "".
const char* fusedopt_cpu_isa(void) {
  try {
    return cpu::kernels().isa;
  } catch (...) {
    return "";
  }
}

const char* fusedopt_available_isas(void) {
  try {
    static const std::string joined = [] {
      std::string names;
      for (const std::string& isa : cpu::available_isas())
        names += (names.empty() ? "" : ",") + isa;
      return names;
    }();
    return joined.c_str();
  } catch (...) {
    return "";
  }
}

fusedopt_status fusedopt_set_cpu_isa(const char* isa) {
  return guarded([&] {
    if (!isa) throw Error(ErrorKind::type, "isa is NULL");
    cpu::set_isa(isa);
  });
}

int32_t fusedopt_num_threads(void) { return cpu::num_threads(); }

fusedopt_status fusedopt_set_num_threads(int32_t n) {
  return guarded([&] {
    if (n < 1) throw Error(ErrorKind::value, "n must be >= 1, got " + std::to_string(n));
    cpu::set_num_threads(n);
  });
}

}  // extern "C"
