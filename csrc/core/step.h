// The core of every step, generic over the algorithm descriptions (csrc/math/registry.h):
// validate every buffer of the call, compute each tensor's coefficients on the host in double,
// and run the kernels over all tensors in one fork/join. The Python bindings and the C ABI both
// come through here, either once per call (prepare_step) or through a Plan that describes and
// validates the params and states once and checks only the grads at each step.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"
#include "math/rounding.h"

namespace fusedopt {

// One array as the caller holds it; validation decides whether it may take part.
struct BufferInfo {
  bool present = true;  // false: the caller passed None (no such state for this tensor)
  void* data = nullptr;
  std::vector<int64_t> shape;
  int64_t size = 0;            // number of elements
  std::optional<Dtype> dtype;  // empty: a dtype fusedopt does not update
  bool contiguous = false;     // C order, no gaps
  bool writeable = false;
  std::string dtype_name;  // set only for dtypes fusedopt does not update, for messages

  int64_t bytes() const { return dtype ? size * dtype_size(*dtype) : 0; }
  const char* dtype_str() const {
    return dtype ? fusedopt::dtype_name(*dtype) : dtype_name.c_str();
  }
};

// The buffers of one step, by role. states[k] is empty when no tensor keeps state k; otherwise it
// has one entry per param, absent (None) where that tensor's group keeps none.
struct StepBuffers {
  std::vector<BufferInfo> params;
  std::vector<BufferInfo> grads;
  std::vector<std::vector<BufferInfo>> states;
  std::vector<std::string> state_names;  // for messages: "exp_avg"
  // The float32 master copies of 16-bit params: empty, or one per param (absent for a param
  // without one).
  std::vector<BufferInfo> masters;
  // The per-block scales of 8-bit blockwise states: empty, or like `states` (absmax[k][i] for
  // states[k][i], absent where that state is not 8-bit).
  std::vector<std::vector<BufferInfo>> absmax;
  bool grads_written = false;  // grad_scale writes the unscaled gradient back
  // False for device memory (fusedopt.cuda), whose values the host cannot read: the 8-bit scales
  // are then not checked (check_scales).
  bool values_readable = true;
};

// Per-tensor bookkeeping: which hyperparameter group a tensor belongs to, its step number t,
// whether its state buffers were created for this step, and its host scalars.
struct StepSchedule {
  std::vector<int> group_of;
  std::vector<int64_t> steps;      // t, 1 on a tensor's first step
  std::vector<uint8_t> new_state;  // empty: no tensor's state is new
  double* scalars = nullptr;       // num_tensors rows of kMaxScalars, advanced in place
};

struct StepExtras {
  std::optional<double> grad_scale;  // divides the gradient, which is then written back
  // Set: 16-bit params and states are rounded stochastically, keyed by (seed, step).
  std::optional<uint64_t> rounding_seed;
  // A Plan's step skips a tensor whose grad is absent (torch's rule for a param whose grad is
  // None: not updated, its step count and scalars unchanged) instead of refusing it.
  bool skip_absent_grads = false;
};

// Checks every buffer of the call (type, dtype, shape, contiguity, writeability, aliasing) and
// returns the kernel's view of each tensor; throws Error naming the argument otherwise. Without
// grads (a Plan registering its params and states) buffers.grads must be empty.
std::vector<TensorRef> validate_step_buffers(const StepBuffers& buffers, bool with_grads = true);

// Stochastic rounding rounds 16-bit writes only: asked for where no param and no state of the
// call is bfloat16 or float16, it would change nothing, which is a caller's mistake. Refused as
// the Python classes refuse it (Precision.check), for a call's own buffers: the functional API and
// the C ABI. Not in Plan, which the classes use with a device's share of their params, which may
// hold no 16-bit one though the optimizer's do.
void check_rounding_applies(const StepBuffers& buffers, const StepExtras& extras);

// The extents of a validated set of buffers, sorted, for checking later buffers against them
// without sorting everything again (a Plan's grads against its params and states).
class ExtentIndex {
 public:
  struct Extent {
    uintptr_t begin, end;
    std::string name;
  };
  explicit ExtentIndex(std::vector<Extent> extents);
  ExtentIndex() = default;
  // The name of an extent that [begin, end) overlaps, or null. `hint`, when given, is where the
  // search starts (the value it left at the previous call) and is updated.
  const std::string* find_overlap(uintptr_t begin, uintptr_t end, size_t* hint = nullptr) const;

 private:
  // By begin. The begins are searched on their own: with the names beside them (48 bytes an
  // extent) a lookup among 30,000 buffers missed the cache at every level of the search.
  std::vector<uintptr_t> begins_;
  std::vector<uintptr_t> furthest_end_;  // furthest_end_[i]: max end of extents_[0..i]
  std::vector<Extent> extents_;
};

// A step's kernels run on the pool from this many elements in all (below it a second thread costs
// more than it saves: the wake-up of a sleeping worker is tens of microseconds; measured by
// bench/), and its per-tensor checks from two slices of this many tensors.
constexpr int64_t kParallelElements = 1 << 16;
constexpr size_t kCheckSlice = 1024;
inline bool uses_pool(size_t num_tensors, int64_t num_elements) {
  return num_elements >= kParallelElements || num_tensors >= 2 * kCheckSlice;
}

// Checks that a grad can be read (and written, for a grad scale) next to its param.
void check_grad(const BufferInfo& grad, size_t index, const BufferInfo& param, bool written);
// The scales of an 8-bit state (its absmax per block of kQuantBlock elements): each is the
// largest |x| of its block, so NaN or a negative one, which would decode the whole block as NaN or
// with its signs flipped, is refused (ValueError naming `state_name`_absmax[index] and the block:
// the name is built only then). Checked at every step: they are the caller's memory (a plan's
// too).
void check_scales(const float* scales, int64_t blocks, const std::string& state_name, size_t index);
void check_schedule(const StepSchedule& schedule, size_t num_tensors, size_t num_groups);
// Where each tensor starts in the concatenation of a step's tensors that its work items split
// (a tensor with 8-bit state on a block), and their total: a plan's is computed once.
struct WorkLayout {
  std::vector<int64_t> starts;
  int64_t total = 0;
};
WorkLayout work_layout(size_t num_tensors, const TensorRef* tensors);
// Runs the kernels over every tensor, in one fork/join when the step is large enough. `layout`:
// the tensors' work_layout, or null to compute it.
void run_work(size_t num_tensors, const TensorRef* tensors,
              void (*run)(void*, size_t, int64_t, int64_t), void* context,
              const WorkLayout* layout = nullptr);

// A validated step, ready for any backend: tensors[i] reads coefficients[coefficient_of[i]],
// one struct per run of tensors sharing (group, step, new state, scalars).
template <class A>
struct PreparedStep {
  std::vector<TensorRef> tensors;
  std::vector<typename A::Coefficients> coefficients;
  std::vector<int> coefficient_of;
};

template <class A>
void check_options(const std::vector<typename A::Options>& groups) {
  for (const typename A::Options& o : groups) A::check(o);
}

// 8-bit state only where the algorithm's states are moments (docs/spec.md section 22): Rprop's
// step sizes and ASGD's average are not, and every entry point refuses them in 8 bits.
template <class A>
void check_storage(const std::vector<TensorRef>& tensors) {
  if constexpr (!A::quantizable_states)
    for (size_t i = 0; i < tensors.size(); ++i)
      if (tensors[i].state_dtype == Dtype::blockwise8)
        throw Error(ErrorKind::value, std::string("the states of params[") + std::to_string(i) +
                                          "] are 8-bit, which " + A::name +
                                          " does not take: its states are not moments");
}

// An algorithm with per-tensor scalars (NAdam's mu_product) needs them for every tensor.
template <class A>
void check_scalars(const double* scalars, size_t num_tensors) {
  if constexpr (A::scalar_names.size() > 0)
    if (!scalars && num_tensors > 0)
      throw Error(ErrorKind::value, std::string("scalars: ") + A::name + " keeps " +
                                        A::scalar_names[0] +
                                        " per tensor; give them (see initial_scalar)");
}

namespace detail {

inline bool same_scalars(const double* a, const double* b) {
  return a == b || (a && b && std::memcmp(a, b, sizeof(double) * kMaxScalars) == 0);
}

// A state the configuration needs must be there; one it does not need is dropped, so the kernel
// neither streams it nor leaves it half-updated.
// `names`: the states' names in messages (the caller's spelling), or null for the description's.
template <class A>
void match_states(TensorRef& t, unsigned used, size_t index,
                  const std::vector<std::string>* names = nullptr) {
  for (int k = 0; k < kMaxStates; ++k) {
    const bool needed = used & (1u << k);
    if (needed && !t.state[k])
      throw Error(ErrorKind::value,
                  (names && k < static_cast<int>(names->size()) ? (*names)[k]
                                                                : std::string(A::state_names[k])) +
                      "[" + std::to_string(index) +
                      "] is missing but this param's options need it");
    if (!needed) t.state[k] = nullptr;
  }
}

// Gives each tensor the coefficients of its (group, step, new state, scalars), computed once per
// run of equal inputs, and its rounding key, then advances the tensors' scalars. Its states were
// matched to its options before (match_states). Everything was validated before: past this
// point nothing can fail, so the scalars are never advanced for a step that does not run.
template <class A>
void compute_coefficients(const std::vector<typename A::Options>& groups,
                          const StepSchedule& schedule, const StepExtras& extras,
                          PreparedStep<A>& step) {
  const size_t n = step.tensors.size();
  step.coefficients.clear();
  step.coefficient_of.resize(n);
  const double* grad_scale = extras.grad_scale ? &*extras.grad_scale : nullptr;
  auto input_of = [&](size_t i) {
    StepInput in;
    in.step = schedule.steps[i];
    in.new_state = !schedule.new_state.empty() && schedule.new_state[i];
    in.grad_scale = grad_scale;
    in.scalars = schedule.scalars ? schedule.scalars + i * kMaxScalars : nullptr;
    return in;
  };
  const bool stochastic = extras.rounding_seed.has_value();
  uint64_t key = 0;
  for (size_t i = 0; i < n; ++i) {
    const StepInput in = input_of(i);
    const bool same_as_previous =
        i > 0 && schedule.group_of[i] == schedule.group_of[i - 1] &&
        in.step == schedule.steps[i - 1] &&
        in.new_state == (!schedule.new_state.empty() && schedule.new_state[i - 1]) &&
        (A::scalar_names.size() == 0 || same_scalars(in.scalars, input_of(i - 1).scalars));
    if (!same_as_previous) {
      step.coefficients.push_back(A::coefficients(groups[schedule.group_of[i]], in));
      key = stochastic ? rounding_key(*extras.rounding_seed, in.step) : 0;
    }
    step.coefficient_of[i] = static_cast<int>(step.coefficients.size()) - 1;
    TensorRef& t = step.tensors[i];
    t.stochastic = stochastic;
    t.rounding_key = key;
  }
  if constexpr (A::scalar_names.size() > 0) {
    if (schedule.scalars)
      for (size_t i = 0; i < n; ++i)
        A::advance_scalars(groups[schedule.group_of[i]], input_of(i),
                           schedule.scalars + i * kMaxScalars);
  }
}

template <class A>
struct KernelContext {
  const AlgorithmKernels<A>* kernels;
  const PreparedStep<A>* step;
};

template <class A>
void run_tensor_range(void* context, size_t i, int64_t begin, int64_t end) {
  const auto& k = *static_cast<const KernelContext<A>*>(context);
  const TensorRef& t = k.step->tensors[i];
  const KernelFn<A> kernel =
      t.staged() ? k.kernels->staged_update : k.kernels->update[static_cast<int>(t.dtype)];
  kernel(t, k.step->coefficients[k.step->coefficient_of[i]], begin, end);
}

}  // namespace detail

// Everything a step does before its kernels run (the CUDA backend launches these itself).
// `last_check` is a caller's own refusal (fusedopt.cuda's device placement), run after the
// checks here and before the first write (the scalars' advance), so it too changes nothing.
template <class A, class LastCheck>
PreparedStep<A> prepare_step(const std::vector<typename A::Options>& groups,
                             const StepSchedule& schedule, const StepBuffers& buffers,
                             const StepExtras& extras, LastCheck&& last_check) {
  check_options<A>(groups);
  if (extras.grad_scale && !A::takes_grad_scale)
    throw Error(ErrorKind::value, std::string("grad_scale: ") + A::name +
                                      " does not take a grad scale (PyTorch's fused SGD and "
                                      "Adam do; unscale the grads before the step)");
  PreparedStep<A> step;
  step.tensors = validate_step_buffers(buffers);
  check_rounding_applies(buffers, extras);
  check_storage<A>(step.tensors);
  check_schedule(schedule, step.tensors.size(), groups.size());
  check_scalars<A>(schedule.scalars, step.tensors.size());
  for (size_t i = 0; i < step.tensors.size(); ++i)
    detail::match_states<A>(step.tensors[i], A::states_used(groups[schedule.group_of[i]]), i,
                            &buffers.state_names);
  last_check();
  detail::compute_coefficients<A>(groups, schedule, extras, step);
  return step;
}

template <class A>
PreparedStep<A> prepare_step(const std::vector<typename A::Options>& groups,
                             const StepSchedule& schedule, const StepBuffers& buffers,
                             const StepExtras& extras) {
  return prepare_step<A>(groups, schedule, buffers, extras, [] {});
}

// Runs the first pass of an algorithm with per-tensor reductions (csrc/math/algorithm.h) over
// every block of every tensor, in one fork/join, and returns each tensor's sums: its blocks'
// partial sums added in block order, the same whatever the thread count or ISA.
std::vector<double> run_reductions(size_t num_tensors, const TensorRef* tensors, int reductions,
                                   void (*run)(void*, size_t, int64_t, int64_t, double*),
                                   void* context);

namespace detail {

template <class A>
void run_tensor_blocks(void* context, size_t i, int64_t first_block, int64_t end_block,
                       double* partials) {
  const auto& k = *static_cast<const KernelContext<A>*>(context);
  const TensorRef& t = k.step->tensors[i];
  const ReduceFn<A> kernel =
      t.staged() ? k.kernels->staged_reduce : k.kernels->reduce[static_cast<int>(t.dtype)];
  kernel(t, k.step->coefficients[k.step->coefficient_of[i]], first_block, end_block, partials);
}

}  // namespace detail

// Runs a prepared step on the CPU kernels of the ISA in use; `layout`: its tensors' work_layout,
// or null.
template <class A>
void run_step(const PreparedStep<A>& step, const WorkLayout* layout = nullptr) {
  // Both passes of a two-pass algorithm: a child forked between them would see states updated
  // and params not.
  const cpu::StepInProgress writing;
  const size_t n = step.tensors.size();
  const AlgorithmKernels<A>* kernels = &kernels_of<A>(cpu::kernels());
  if constexpr (A::reductions > 0) {
    detail::KernelContext<A> first{kernels, &step};
    const std::vector<double> sums =
        run_reductions(n, step.tensors.data(), A::reductions, detail::run_tensor_blocks<A>, &first);
    // The second pass: each tensor's own coefficients, finished with its sums.
    PreparedStep<A> second;
    second.tensors = step.tensors;
    second.coefficient_of.resize(n);
    second.coefficients.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      second.coefficients.push_back(step.coefficients[step.coefficient_of[i]]);
      A::finish(second.coefficients.back(), &sums[i * A::reductions]);
      second.coefficient_of[i] = static_cast<int>(i);
    }
    detail::KernelContext<A> context{kernels, &second};
    run_work(n, second.tensors.data(), detail::run_tensor_range<A>, &context, layout);
  } else {
    detail::KernelContext<A> context{kernels, &step};
    run_work(n, step.tensors.data(), detail::run_tensor_range<A>, &context, layout);
  }
}

// A step's params and states, described and validated once. Each step then checks only its
// grads (dtype, shape, contiguity, and that none overlaps a registered buffer), computes the
// coefficients and runs. Steps on one plan are serialized by its lock; plans run in parallel.
// The caller keeps every registered buffer alive and in place for the plan's lifetime (the
// Python bindings hold references and check cheaply that nothing moved).
template <class A>
class Plan {
 public:
  using Options = typename A::Options;

  // `registered` holds the params and states (its grads are ignored). step_counts (one per
  // tensor, the steps taken so far, as torch's state["step"]) are advanced by each step run
  // without an explicit step number; null when every step gives one.
  Plan(std::vector<Options> groups, const StepBuffers& registered, std::vector<int> group_of,
       int64_t* step_counts, std::vector<uint8_t> new_state, double* scalars)
      : groups_(std::move(groups)), step_counts_(step_counts) {
    check_options<A>(groups_);
    step_.tensors = validate_step_buffers(registered, false);
    check_storage<A>(step_.tensors);
    check_scalars<A>(scalars, step_.tensors.size());
    state_names_ = registered.state_names;
    state_names_.resize(kMaxStates);
    values_readable_ = registered.values_readable;
    params_ = registered.params;
    for (BufferInfo& p : params_) p.data = nullptr;  // shapes and dtypes only
    schedule_.group_of = std::move(group_of);
    schedule_.steps.assign(step_.tensors.size(), 1);
    schedule_.new_state = std::move(new_state);
    schedule_.scalars = scalars;
    check_schedule(schedule_, step_.tensors.size(), groups_.size());
    // Every state given is registered, a state these options do not use included, so that
    // set_options may switch it on later; each step drops the states its options do not use.
    registered_states_.resize(step_.tensors.size());
    for (size_t i = 0; i < step_.tensors.size(); ++i)
      std::copy(std::begin(step_.tensors[i].state), std::end(step_.tensors[i].state),
                registered_states_[i].begin());
    for (size_t i = 0; i < step_.tensors.size(); ++i)
      detail::match_states<A>(step_.tensors[i], A::states_used(groups_[schedule_.group_of[i]]), i,
                              &state_names_);
    std::vector<ExtentIndex::Extent> extents;
    for (size_t i = 0; i < step_.tensors.size(); ++i) {
      const TensorRef& t = step_.tensors[i];
      if (t.size == 0) continue;
      auto add = [&](void* data, int64_t bytes, const std::string& name) {
        const auto begin = reinterpret_cast<uintptr_t>(data);
        extents.push_back(
            {begin, begin + static_cast<uintptr_t>(bytes), name + "[" + std::to_string(i) + "]"});
      };
      add(t.param, t.size * dtype_size(t.dtype), "params");
      if (t.master) add(t.master, t.size * 4, "masters");
      for (int k = 0; k < kMaxStates; ++k) {
        if (registered_states_[i][k])
          add(registered_states_[i][k], t.size * dtype_size(t.state_dtype), state_names_[k]);
        if (t.absmax[k]) add(t.absmax[k], quant_blocks(t.size) * 4, state_names_[k] + "_absmax");
      }
    }
    registered_extents_ = ExtentIndex(std::move(extents));
    for (const TensorRef& t : step_.tensors) num_elements_ += t.size;
    layout_ = work_layout(step_.tensors.size(), step_.tensors.data());
  }

  size_t size() const { return step_.tensors.size(); }
  // Whether a step runs any of its work on the pool.
  bool uses_pool() const {
    return !runner_ && fusedopt::uses_pool(step_.tensors.size(), num_elements_);
  }

  // What runs a checked step: the CPU kernels (run_step) unless set; fusedopt.cuda's plans
  // launch it on the GPU. Set before the first step.
  using Runner = std::function<void(const PreparedStep<A>&)>;
  void run_with(Runner runner) { runner_ = std::move(runner); }

  // New hyperparameters for a group; refused (and nothing changed) when invalid or when they
  // need a state the group's tensors were registered without.
  void set_options(size_t group, const Options& options) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (group >= groups_.size())
      throw Error(ErrorKind::value, "group " + std::to_string(group) + " is out of range");
    A::check(options);
    const unsigned used = A::states_used(options);
    for (size_t i = 0; i < step_.tensors.size(); ++i)
      if (static_cast<size_t>(schedule_.group_of[i]) == group)
        for (int k = 0; k < kMaxStates; ++k)
          if ((used & (1u << k)) && !registered_states_[i][k])
            throw Error(ErrorKind::value, state_names_[k] + "[" + std::to_string(i) +
                                              "] is missing but this param's options need it");
    groups_[group] = options;
  }

  // One step: grads[i] for tensor i (absent: tensor i skipped, where extras say so). `step`, when
  // given, is t for every tensor (Keras' global iteration count) and the step counts are left
  // alone; otherwise each tensor's count is advanced and used, as torch does.
  void step(const std::vector<BufferInfo>& grads, const StepExtras& extras,
            std::optional<int64_t> step) {
    std::lock_guard<std::mutex> lock(mutex_);
    const cpu::StayAwake awake(uses_pool());
    // The kernels, the scalars advanced and the step counts: a fork waits for all of them.
    const cpu::StepInProgress writing;
    const size_t n = step_.tensors.size();
    if (grads.size() != n)
      throw Error(ErrorKind::value, "grads: expected " + std::to_string(n) +
                                        " arrays (one per param), got " +
                                        std::to_string(grads.size()));
    if (extras.grad_scale && !A::takes_grad_scale)
      throw Error(ErrorKind::value,
                  std::string("grad_scale: ") + A::name + " does not take a grad scale");
    const bool written = extras.grad_scale.has_value();
    // Each grad checked against its param and the registered buffers, then each tensor given its
    // grad, states and step (the plan's own fields: nothing the caller sees), many on the pool's
    // threads (Adam over 10000 x 100, 2 threads: 3-5% of the step it took on this thread). After a
    // failure the checks run again on this thread, in order, so that the error names the first bad
    // grad, and the tensors are filled only once the step's other checks have passed.
    const bool skips = extras.skip_absent_grads;
    auto check_grads = [&](size_t begin, size_t end) {
      size_t hint = 0;
      for (size_t i = begin; i < end; ++i)
        if (!skips || grads[i].present) check_grad_apart(grads[i], i, written, hint);
    };
    auto fill_tensors = [&](size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i)
        if (!skips || grads[i].present) fill_tensor(i, grads[i], written, step);
    };
    const bool checked = cpu::all_slices(n, kCheckSlice, [&](size_t begin, size_t end) {
      check_grads(begin, end);  // a throw is a failed slice
      fill_tensors(begin, end);
      return true;
    });
    if (!checked) check_grads(0, n);
    if (written) {
      std::vector<ExtentIndex::Extent> written_grads;
      for (size_t i = 0; i < n; ++i) {
        const auto begin = reinterpret_cast<uintptr_t>(grads[i].data);
        if (grads[i].present && grads[i].bytes() > 0)
          written_grads.push_back({begin, begin + static_cast<uintptr_t>(grads[i].bytes()),
                                   "grads[" + std::to_string(i) + "]"});
      }
      check_grads_apart(std::move(written_grads));
    }
    if (step && *step < 1)
      throw Error(ErrorKind::value,
                  "step must be >= 1 (the first step is 1), got " + std::to_string(*step));
    if (!checked) fill_tensors(0, n);
    const bool all_present =
        !skips || std::all_of(grads.begin(), grads.end(), [](const auto& g) { return g.present; });
    if (all_present && runner_) {
      // The GPU's launch may fail after the scalars advanced: they are put back.
      std::vector<double> scalars;
      if (schedule_.scalars) scalars.assign(schedule_.scalars, schedule_.scalars + n * kMaxScalars);
      detail::compute_coefficients<A>(groups_, schedule_, extras, step_);
      try {
        runner_(step_);
      } catch (...) {
        std::copy(scalars.begin(), scalars.end(), schedule_.scalars);
        throw;
      }
    } else if (all_present) {
      detail::compute_coefficients<A>(groups_, schedule_, extras, step_);
      run_step(step_, &layout_);
    } else {
      run_present(grads, extras);
    }
    if (!step && step_counts_)
      for (size_t i = 0; i < n; ++i)
        if (grads[i].present) step_counts_[i] = schedule_.steps[i];  // a skipped one kept
    std::fill(schedule_.new_state.begin(), schedule_.new_state.end(), 0);
  }

 private:
  // A step over the tensors whose grad is present only: their refs, schedule and scalars copied
  // out (the scalars copied back once advanced), so that a skipped tensor is neither updated nor
  // advanced. torch.optim skips a param whose grad is None; a plan over every param with state
  // steps the ones with a grad, instead of being made anew whenever that set changes (mixture of
  // experts, a layer frozen for some steps).
  void run_present(const std::vector<BufferInfo>& grads, const StepExtras& extras) {
    PreparedStep<A> present;
    StepSchedule schedule;
    std::vector<size_t> index;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].present) continue;
      index.push_back(i);
      present.tensors.push_back(step_.tensors[i]);
      schedule.group_of.push_back(schedule_.group_of[i]);
      schedule.steps.push_back(schedule_.steps[i]);
      if (!schedule_.new_state.empty()) schedule.new_state.push_back(schedule_.new_state[i]);
    }
    if (index.empty()) return;  // no grad at all: nothing to run (nor a GPU's tables to make)
    std::vector<double> scalars;
    if (schedule_.scalars) {
      for (size_t i : index)
        scalars.insert(scalars.end(), schedule_.scalars + i * kMaxScalars,
                       schedule_.scalars + (i + 1) * kMaxScalars);
      schedule.scalars = scalars.data();
    }
    detail::compute_coefficients<A>(groups_, schedule, extras, present);
    if (runner_)
      runner_(present);  // (a failure leaves the plan's scalars: these are copies)
    else
      run_step(present);
    if (schedule_.scalars)
      for (size_t j = 0; j < index.size(); ++j)
        std::copy_n(scalars.data() + j * kMaxScalars, kMaxScalars,
                    schedule_.scalars + index[j] * kMaxScalars);
  }

  // Tensor i's grad, its registered states that its group's options use, and its step: t for
  // every tensor when `step` is given, else its count advanced (refused past the last).
  void fill_tensor(size_t i, const BufferInfo& grad, bool written, std::optional<int64_t> step) {
    TensorRef& t = step_.tensors[i];
    t.grad = grad.data;
    t.write_grad = written;
    std::copy(registered_states_[i].begin(), registered_states_[i].end(), std::begin(t.state));
    detail::match_states<A>(t, A::states_used(groups_[schedule_.group_of[i]]), i, &state_names_);
    for (int k = 0; k < kMaxStates; ++k)
      if (values_readable_ && t.state[k] && t.absmax[k])
        check_scales(t.absmax[k], quant_blocks(t.size), state_names_[k], i);
    if (step) {
      schedule_.steps[i] = *step;
    } else if (step_counts_) {
      const int64_t taken = step_counts_[i];
      if (taken < 0 || taken == INT64_MAX)
        throw Error(ErrorKind::value, "the step count of params[" + std::to_string(i) + "] is " +
                                          std::to_string(taken) + "; it must be in [0, 2**63 - 1)");
      schedule_.steps[i] = taken + 1;
    } else {
      schedule_.steps[i] = 1;
    }
  }

  // A grad that can be read (and written, when `written`) next to param i and shares no memory
  // with a registered buffer; `hint` carries the overlap search from one grad to the next.
  void check_grad_apart(const BufferInfo& grad, size_t i, bool written, size_t& hint) const {
    check_grad(grad, i, params_[i], written);
    const int64_t bytes = grad.bytes();
    if (bytes == 0) return;
    const auto begin = reinterpret_cast<uintptr_t>(grad.data);
    const auto end = begin + static_cast<uintptr_t>(bytes);
    if (const std::string* clash = registered_extents_.find_overlap(begin, end, &hint))
      throw Error(ErrorKind::value, "grads[" + std::to_string(i) + "] overlaps " + *clash +
                                        " in memory; every param, grad and state must be its "
                                        "own buffer");
  }

  // Grads that are written back must not overlap one another.
  static void check_grads_apart(std::vector<ExtentIndex::Extent> extents) {
    // Stable, so that of two grads at one address the message names them in grad order.
    std::stable_sort(extents.begin(), extents.end(),
                     [](const auto& a, const auto& b) { return a.begin < b.begin; });
    for (size_t i = 1; i < extents.size(); ++i)
      if (extents[i].begin < extents[i - 1].end)
        throw Error(ErrorKind::value, extents[i].name + " overlaps " + extents[i - 1].name +
                                          " in memory; grads written back must not share memory");
  }

  std::mutex mutex_;
  std::vector<std::string> state_names_;  // the caller's spelling, for messages
  std::vector<Options> groups_;
  PreparedStep<A> step_;
  std::vector<BufferInfo> params_;  // shapes and dtypes, for checking grads
  std::vector<std::array<void*, kMaxStates>> registered_states_;
  StepSchedule schedule_;
  int64_t* step_counts_;
  ExtentIndex registered_extents_;
  int64_t num_elements_ = 0;
  WorkLayout layout_;
  bool values_readable_ = true;  // false: device memory (the 8-bit scales are not checked)
  Runner runner_;
};

}  // namespace fusedopt
