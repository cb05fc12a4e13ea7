// Step entry points: validate, compute coefficients, run every tensor in one fork/join.
#include "core/step.h"

#include <algorithm>

#include "core/error.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"

namespace fusedopt {
namespace {

// Below this many elements a second thread costs more than it saves (the wake-up of a sleeping
// worker is tens of microseconds); measured by bench/.
constexpr int64_t kParallelThreshold = 1 << 16;
// Work item size: small enough to balance two threads on 1e5 elements, large enough that the
// shared counter is touched rarely. A multiple of 16 so items start on cache lines.
constexpr int64_t kChunkElements = 1 << 14;

struct Work {
  const KernelFn* kernel;
  const std::vector<TensorRef>* tensors;
  std::vector<int64_t> starts;  // starts[i]: index of tensor i's first element in the whole step
  int64_t total;
};

// One item is a run of kChunkElements consecutive elements of the concatenation of all tensors,
// so a thousand small tensors make a few items and a large one many.
void run_item(void* context, int64_t item) {
  const Work& w = *static_cast<const Work*>(context);
  const int64_t begin = item * kChunkElements;
  const int64_t end = std::min(begin + kChunkElements, w.total);
  size_t i = std::upper_bound(w.starts.begin(), w.starts.end(), begin) - w.starts.begin() - 1;
  for (int64_t position = begin; position < end; ++i) {
    const TensorRef& t = (*w.tensors)[i];
    const int64_t local_begin = position - w.starts[i];
    const int64_t local_end = std::min(t.size, end - w.starts[i]);
    if (local_end > local_begin) w.kernel[static_cast<int>(t.dtype)](t, local_begin, local_end);
    position = w.starts[i] + t.size;
  }
}

void check_schedule(const StepSchedule& s, size_t num_tensors, size_t num_groups) {
  if (s.group_of.size() != num_tensors || s.steps.size() != num_tensors)
    throw Error(ErrorKind::value, "steps: expected one group index and one step per param");
  for (size_t i = 0; i < num_tensors; ++i) {
    if (s.group_of[i] < 0 || static_cast<size_t>(s.group_of[i]) >= num_groups)
      throw Error(ErrorKind::value,
                  "group index of params[" + std::to_string(i) + "] is out of range");
    if (s.steps[i] < 1)
      throw Error(ErrorKind::value, "step of params[" + std::to_string(i) + "] must be >= 1");
  }
}

// Which states (bit k: state k) a tensor's configuration reads and writes.
unsigned states_used(const SgdCoefficients& c) { return c.has_momentum ? 1u : 0u; }
unsigned states_used(const AdagradCoefficients&) { return 1u; }
unsigned states_used(const RmspropCoefficients& c) {
  return 1u | (c.has_momentum ? 2u : 0u) | (c.centered ? 4u : 0u);
}
unsigned states_used(const AdamCoefficients& c) { return 3u | (c.amsgrad ? 4u : 0u); }

// A state the configuration needs must be there; one it does not need is dropped, so the kernel
// neither streams it nor leaves it half-updated.
template <class Coefficients>
void match_states(TensorRef& t, const Coefficients& c, const StepBuffers& b, size_t i) {
  const unsigned used = states_used(c);
  for (int k = 0; k < kMaxStates; ++k) {
    const bool needed = used & (1u << k);
    if (needed && !t.state[k])
      throw Error(
          ErrorKind::value,
          (k < static_cast<int>(b.state_names.size()) ? b.state_names[k] : std::string("state")) +
              "[" + std::to_string(i) + "] is missing but this param's options need it");
    if (!needed) t.state[k] = nullptr;
  }
}

// Validates everything, then gives each tensor the coefficients of its (group, step), computed
// once per distinct pair in a row.
template <class Options, class Coefficients, class Compute>
PreparedStep<Coefficients> prepare_step(const std::vector<Options>& groups,
                                        const StepSchedule& schedule, const StepBuffers& buffers,
                                        Compute compute) {
  for (const Options& o : groups) validate_options(o);
  PreparedStep<Coefficients> step;
  std::vector<TensorRef>& tensors = step.tensors;
  tensors = validate_step_buffers(buffers);
  check_schedule(schedule, tensors.size(), groups.size());
  step.coefficients.reserve(tensors.size());
  step.coefficient_of.resize(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const bool same_as_previous = i > 0 && schedule.group_of[i] == schedule.group_of[i - 1] &&
                                  schedule.steps[i] == schedule.steps[i - 1];
    if (!same_as_previous)
      step.coefficients.push_back(compute(groups[schedule.group_of[i]], schedule.steps[i]));
    step.coefficient_of[i] = static_cast<int>(step.coefficients.size()) - 1;
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Coefficients& c = step.coefficients[step.coefficient_of[i]];
    tensors[i].coefficients = &c;
    match_states(tensors[i], c, buffers, i);
  }
  return step;
}

}  // namespace

void run_kernels(const KernelFn (&kernel)[kNumDtypes], const std::vector<TensorRef>& tensors) {
  Work w{kernel, &tensors, {}, 0};
  w.starts.reserve(tensors.size());
  for (const TensorRef& t : tensors) {
    w.starts.push_back(w.total);
    w.total += t.size;
  }
  if (w.total < kParallelThreshold || cpu::num_threads() <= 1) {
    for (const TensorRef& t : tensors)
      if (t.size > 0) kernel[static_cast<int>(t.dtype)](t, 0, t.size);
    return;
  }
  const int64_t items = (w.total + kChunkElements - 1) / kChunkElements;
  cpu::parallel_for(items, run_item, &w);
}

PreparedStep<SgdCoefficients> prepare_sgd_step(const std::vector<SgdOptions>& groups,
                                               const StepSchedule& schedule,
                                               const StepBuffers& buffers,
                                               std::optional<double> grad_scale) {
  return prepare_step<SgdOptions, SgdCoefficients>(
      groups, schedule, buffers,
      [&](const SgdOptions& o, int64_t step) { return sgd_coefficients(o, step, grad_scale); });
}

PreparedStep<AdagradCoefficients> prepare_adagrad_step(const std::vector<AdagradOptions>& groups,
                                                       const StepSchedule& schedule,
                                                       const StepBuffers& buffers) {
  return prepare_step<AdagradOptions, AdagradCoefficients>(groups, schedule, buffers,
                                                           adagrad_coefficients);
}

PreparedStep<RmspropCoefficients> prepare_rmsprop_step(const std::vector<RmspropOptions>& groups,
                                                       const StepSchedule& schedule,
                                                       const StepBuffers& buffers) {
  return prepare_step<RmspropOptions, RmspropCoefficients>(
      groups, schedule, buffers,
      [](const RmspropOptions& o, int64_t) { return rmsprop_coefficients(o); });
}

PreparedStep<AdamCoefficients> prepare_adam_step(const std::vector<AdamOptions>& groups,
                                                 const StepSchedule& schedule,
                                                 const StepBuffers& buffers,
                                                 std::optional<double> grad_scale) {
  return prepare_step<AdamOptions, AdamCoefficients>(
      groups, schedule, buffers,
      [&](const AdamOptions& o, int64_t step) { return adam_coefficients(o, step, grad_scale); });
}

void sgd_step(const std::vector<SgdOptions>& groups, const StepSchedule& schedule,
              const StepBuffers& buffers, std::optional<double> grad_scale) {
  run_kernels(cpu::kernels().sgd, prepare_sgd_step(groups, schedule, buffers, grad_scale).tensors);
}

void adagrad_step(const std::vector<AdagradOptions>& groups, const StepSchedule& schedule,
                  const StepBuffers& buffers) {
  run_kernels(cpu::kernels().adagrad, prepare_adagrad_step(groups, schedule, buffers).tensors);
}

void rmsprop_step(const std::vector<RmspropOptions>& groups, const StepSchedule& schedule,
                  const StepBuffers& buffers) {
  run_kernels(cpu::kernels().rmsprop, prepare_rmsprop_step(groups, schedule, buffers).tensors);
}

void adam_step(const std::vector<AdamOptions>& groups, const StepSchedule& schedule,
               const StepBuffers& buffers, std::optional<double> grad_scale) {
  run_kernels(cpu::kernels().adam,
              prepare_adam_step(groups, schedule, buffers, grad_scale).tensors);
}

void stream_add_step(const StepBuffers& buffers) {
  run_kernels(cpu::kernels().stream_add, validate_step_buffers(buffers));
}

}  // namespace fusedopt
