// The C ABI (csrc/include/fusedopt/fusedopt.h) on top of the core: each call describes the
// caller's buffers to the same validator and step functions the Python bindings use, and turns
// every exception into a status code and a thread-local message.
#include <algorithm>
#include <limits>
#include <memory>
#include <mutex>
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

// `state`: FUSEDOPT_INT8_BLOCKWISE is a state's dtype, not a param's or a grad's.
// Into `info`, whose shape's memory a plan reuses at every step: an allocation per grad (the
// shape, and the name of a dtype no message needed) was a third of a 10,000-tensor plan step.
void describe(void* data, int64_t size, int32_t dtype, bool state, BufferInfo& info) {
  info.data = size == 0 && !data ? &empty_buffer_address : data;
  info.present = info.data != nullptr;
  info.shape.resize(1);
  info.shape[0] = size;
  info.size = size;
  static_assert(static_cast<int>(Dtype::blockwise8) == FUSEDOPT_INT8_BLOCKWISE &&
                    static_cast<int>(Dtype::float16) == FUSEDOPT_FLOAT16,
                "fusedopt_dtype values are the core's Dtype values");
  const bool known =
      dtype >= FUSEDOPT_FLOAT32 && dtype <= (state ? FUSEDOPT_INT8_BLOCKWISE : FUSEDOPT_FLOAT16);
  info.dtype = known ? std::optional(static_cast<Dtype>(dtype)) : std::nullopt;
  info.contiguous = true;
  info.writeable = true;
  info.dtype_name.clear();
  if (dtype == FUSEDOPT_INT8_BLOCKWISE && !state)
    info.dtype_name =
        "FUSEDOPT_INT8_BLOCKWISE (8-bit storage is for states only, never for a "
        "param or a grad)";
  else if (!known)
    info.dtype_name = std::to_string(dtype) + " (not a fusedopt_dtype)";
}

BufferInfo describe(void* data, int64_t size, int32_t dtype, bool state = false) {
  BufferInfo info;
  describe(data, size, dtype, state, info);
  return info;
}

}  // namespace
}  // namespace fusedopt

// An options object: one algorithm's Options, type-erased.
struct fusedopt_options {
  virtual ~fusedopt_options() = default;
  virtual const char* algorithm() const = 0;
  virtual fusedopt_options* copy() const = 0;
  virtual const char* field_name(int32_t index) const = 0;
  virtual void set(const std::string& name, double value) = 0;
  virtual double get(const std::string& name) const = 0;
  virtual void check() const = 0;
  virtual const char* state_name(int32_t index) const = 0;
  virtual uint32_t states_used() const = 0;
  virtual double initial_state(int32_t k) const = 0;
  virtual const char* scalar_name(int32_t index) const = 0;
  virtual double initial_scalar(int32_t k) const = 0;
  virtual bool takes_grad_scale() const = 0;
  virtual void step(const fusedopt_options* const* groups, int64_t num_groups,
                    const fusedopt_tensor* tensors,
                    const fusedopt_tensor_precision* tensor_precision, int64_t num_tensors,
                    const double* grad_scale, const fusedopt_precision* precision) const = 0;
  virtual fusedopt_plan* plan(const fusedopt_options* const* groups, int64_t num_groups,
                              const fusedopt_tensor* tensors,
                              const fusedopt_tensor_precision* tensor_precision,
                              int64_t num_tensors, const fusedopt_precision* precision) const = 0;
};

struct fusedopt_plan {
  virtual ~fusedopt_plan() = default;
  virtual void step(void* const* grads, const double* grad_scale) = 0;
  virtual void set_options(int64_t group, const fusedopt_options* options) = 0;
  virtual void steps(int64_t* out) = 0;
};

namespace fusedopt {
namespace {

template <class A>
struct TypedOptions;

// The groups of a call as A's Options: every one must be for A and valid. A message names
// groups[g], or `single` (a function's one options argument) when given.
template <class A>
std::vector<typename A::Options> typed_groups(const fusedopt_options* const* groups, int64_t count,
                                              const char* single = nullptr) {
  check_count(groups, count, "groups");
  std::vector<typename A::Options> result;
  result.reserve(count);
  for (int64_t g = 0; g < count; ++g) {
    auto name = [&] { return single ? std::string(single) : indexed("groups", g); };
    if (!groups[g]) throw Error(ErrorKind::type, name() + " is NULL");
    const auto* typed = dynamic_cast<const TypedOptions<A>*>(groups[g]);
    if (!typed)
      throw Error(ErrorKind::value,
                  name() + " holds options for " + groups[g]->algorithm() + ", not " + A::name);
    try {
      A::check(typed->options);
    } catch (const OptionError& e) {
      throw Error(ErrorKind::value, name() + ": " + e.what());
    }
    result.push_back(typed->options);
  }
  return result;
}

// The tensors of a call as the core's buffers and schedule.
template <class A>
void describe_tensors(const fusedopt_tensor* tensors, const fusedopt_tensor_precision* precision,
                      int64_t count, bool with_grads, StepBuffers& buffers, StepSchedule& schedule,
                      std::vector<double*>& scalars) {
  check_count(tensors, count, "tensors");
  buffers.states.resize(A::state_names.size());
  buffers.state_names.assign(A::state_names.begin(), A::state_names.end());
  if (precision) buffers.absmax.resize(A::state_names.size());
  for (int64_t i = 0; i < count; ++i) {
    const fusedopt_tensor& t = tensors[i];
    if (t.size < 0)
      throw Error(ErrorKind::value,
                  indexed("tensors", i) + ".size must be >= 0, got " + std::to_string(t.size));
    if (t.size > 0 && !t.param)
      throw Error(ErrorKind::type, indexed("tensors", i) + ".param is NULL");
    if (with_grads && t.size > 0 && !t.grad)
      throw Error(ErrorKind::type, indexed("tensors", i) + ".grad is NULL");
    if (A::scalar_names.size() > 0 && !t.scalars)
      throw Error(ErrorKind::type, indexed("tensors", i) + ".scalars is NULL but " + A::name +
                                       " keeps " + A::scalar_names[0] + " per tensor");
    buffers.params.push_back(describe(t.param, t.size, t.dtype));
    if (with_grads) buffers.grads.push_back(describe(t.grad, t.size, t.dtype));
    const int32_t state_dtype = precision ? precision[i].state_dtype : t.dtype;
    if (precision && (state_dtype < 0 || state_dtype >= kNumDtypes))  // named as the caller set it
      throw Error(ErrorKind::type, indexed("tensor_precision", i) + ".state_dtype is " +
                                       std::to_string(state_dtype) + ", not a fusedopt_dtype");
    for (size_t k = 0; k < A::state_names.size(); ++k)
      buffers.states[k].push_back(describe(t.state[k], t.size, state_dtype, true));
    if (precision) {
      // The core checks them: a master only for a 16-bit param, an absmax exactly for 8-bit
      // states, of one float per block.
      buffers.masters.push_back(describe(precision[i].master, t.size, FUSEDOPT_FLOAT32));
      buffers.masters.back().present = precision[i].master != nullptr;
      const int64_t blocks = quant_blocks(t.size);
      for (size_t k = 0; k < A::state_names.size(); ++k) {
        buffers.absmax[k].push_back(describe(precision[i].absmax[k], blocks, FUSEDOPT_FLOAT32));
        buffers.absmax[k].back().present = precision[i].absmax[k] != nullptr;
      }
    }
    schedule.group_of.push_back(t.group);
    schedule.steps.push_back(t.step);
    schedule.new_state.push_back(t.new_state != 0);
    // An algorithm without scalars never reads or writes the pointer (it may be anything).
    scalars.push_back(A::scalar_names.size() > 0 ? t.scalars : nullptr);
  }
}

// The per-tensor scalars are written back after the kernels have run, so they are checked like
// a written buffer: a row (FUSEDOPT_MAX_SCALARS doubles) may be shared whole by several tensors
// (Keras' optimizer-wide u_product), but may not overlap another row in part, nor any param,
// grad, state, master or scale of the call. Returns the rows, for a plan's grads at each step.
ExtentIndex scalar_rows(const std::vector<double*>& scalars) {
  std::vector<std::pair<uintptr_t, size_t>> rows;  // (address, first tensor with it)
  for (size_t i = 0; i < scalars.size(); ++i)
    if (scalars[i]) rows.push_back({reinterpret_cast<uintptr_t>(scalars[i]), i});
  std::stable_sort(rows.begin(), rows.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  constexpr uintptr_t bytes = kMaxScalars * sizeof(double);
  std::vector<ExtentIndex::Extent> extents;
  for (const auto& [address, i] : rows) {
    if (!extents.empty() && extents.back().begin == address) continue;  // shared whole
    if (address > std::numeric_limits<uintptr_t>::max() - bytes)
      throw Error(ErrorKind::value, indexed("tensors", static_cast<int64_t>(i)) +
                                        ".scalars reaches past the end of the address space");
    const std::string name = indexed("tensors", static_cast<int64_t>(i)) + ".scalars";
    if (!extents.empty() && address < extents.back().end)
      throw Error(ErrorKind::value, name + " overlaps " + extents.back().name +
                                        " in part; tensors may share a row of scalars only whole");
    extents.push_back({address, address + bytes, name});
  }
  return ExtentIndex(std::move(extents));
}

void check_apart_from_scalars(const ExtentIndex& rows, const BufferInfo& buffer, const char* role,
                              size_t index) {
  const int64_t bytes = buffer.present ? buffer.bytes() : 0;
  if (bytes == 0) return;
  const auto begin = reinterpret_cast<uintptr_t>(buffer.data);
  if (const std::string* row = rows.find_overlap(begin, begin + static_cast<uintptr_t>(bytes)))
    throw Error(ErrorKind::value, *row + " overlaps " + indexed(role, static_cast<int64_t>(index)) +
                                      " in memory; the scalars are written after the step");
}

// Every buffer of a validated call against the scalar rows.
void check_apart_from_scalars(const ExtentIndex& rows, const StepBuffers& b) {
  for (size_t i = 0; i < b.params.size(); ++i) {
    check_apart_from_scalars(rows, b.params[i], "params", i);
    if (i < b.grads.size()) check_apart_from_scalars(rows, b.grads[i], "grads", i);
    if (i < b.masters.size()) check_apart_from_scalars(rows, b.masters[i], "masters", i);
    for (size_t k = 0; k < b.states.size(); ++k) {
      if (i < b.states[k].size())
        check_apart_from_scalars(rows, b.states[k][i], b.state_names[k].c_str(), i);
      if (k < b.absmax.size() && i < b.absmax[k].size())
        check_apart_from_scalars(rows, b.absmax[k][i], "absmax", i);
    }
  }
}

std::optional<uint64_t> rounding_seed_of(const fusedopt_precision* precision) {
  if (!precision || !precision->stochastic_rounding) return std::nullopt;
  return precision->seed;
}

// The core reads each tensor's scalars from one array of kMaxScalars per tensor: copied in from
// the callers' pointers before a step and back after it. The rows are sized once and copied into
// in place, so a plan's core may keep their address.
struct ScalarRows {
  std::vector<double> rows;
  explicit ScalarRows(size_t count = 0) : rows(count * kMaxScalars, 0.0) {}
  void gather(const std::vector<double*>& sources) {
    rows.resize(sources.size() * kMaxScalars);  // no change after the first call
    for (size_t i = 0; i < sources.size(); ++i)
      if (sources[i])
        std::copy(sources[i], sources[i] + kMaxScalars, rows.begin() + i * kMaxScalars);
  }
  void scatter(const std::vector<double*>& targets) const {
    for (size_t i = 0; i < targets.size(); ++i)
      if (targets[i])
        std::copy(rows.begin() + i * kMaxScalars, rows.begin() + (i + 1) * kMaxScalars, targets[i]);
  }
};

template <class A>
class TypedPlan : public fusedopt_plan {
 public:
  TypedPlan(std::vector<typename A::Options> groups, const fusedopt_tensor* tensors,
            const fusedopt_tensor_precision* tensor_precision, int64_t count,
            std::optional<uint64_t> rounding_seed)
      : rounding_seed_(rounding_seed) {
    StepBuffers buffers;
    StepSchedule schedule;
    describe_tensors<A>(tensors, tensor_precision, count, false, buffers, schedule,
                        scalar_sources_);
    for (size_t i = 0; i < schedule.steps.size(); ++i)
      if (schedule.steps[i] < 1)
        throw Error(ErrorKind::value, indexed("tensors", static_cast<int64_t>(i)) +
                                          ".step must be >= 1 (the first step is 1)");
    counts_.resize(schedule.steps.size());
    for (size_t i = 0; i < counts_.size(); ++i) counts_[i] = schedule.steps[i] - 1;
    sizes_.reserve(buffers.params.size());
    for (const BufferInfo& p : buffers.params) sizes_.push_back({p.size, *p.dtype});
    scalars_ = ScalarRows(scalar_sources_.size());  // read from the caller's at each step
    plan_ = std::make_unique<Plan<A>>(std::move(groups), buffers, schedule.group_of, counts_.data(),
                                      schedule.new_state,
                                      A::scalar_names.size() ? scalars_.rows.data() : nullptr);
    check_rounding_applies(buffers, StepExtras{std::nullopt, rounding_seed_});
    if constexpr (A::scalar_names.size() > 0) {
      scalar_rows_ = scalar_rows(scalar_sources_);
      check_apart_from_scalars(scalar_rows_, buffers);
    }
  }

  // The lock covers the scalars' copies, in from the caller's arrays before the core's step (a
  // value the caller set since the last step is the one used) and back after it, and reads of
  // the counts. Every holder of the lock holds off fork() (StepInProgress, taken first: it may
  // wait for a fork to end, which must not happen with the lock held): a child forked while
  // another thread held the lock inherited it locked, and hung at its first use of the plan.
  void step(void* const* grads, const double* grad_scale) override {
    const cpu::StepInProgress writing;  // until the scalars are copied back, after the step
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t n = static_cast<int64_t>(sizes_.size());
    if (n > 0 && !grads)  // one per tensor of the plan: no count of the caller's to name
      throw Error(ErrorKind::type,
                  "grads is NULL but the plan has " + std::to_string(n) + " tensors");
    // The workers are kept awake from here: many grads are described on the pool (a failure is
    // found again on this thread, in order), then the core's step checks them there.
    const cpu::StayAwake awake(plan_->uses_pool());
    grad_infos_.resize(n);
    auto describe_grads = [&](size_t begin, size_t end) {
      for (auto i = static_cast<int64_t>(begin); i < static_cast<int64_t>(end); ++i) {
        if (!grads[i] && sizes_[i].size > 0)
          throw Error(ErrorKind::type, indexed("grads", i) + " is NULL");
        describe(grads[i], sizes_[i].size, static_cast<int32_t>(sizes_[i].dtype), false,
                 grad_infos_[i]);
        if constexpr (A::scalar_names.size() > 0)
          check_apart_from_scalars(scalar_rows_, grad_infos_[i], "grads", static_cast<size_t>(i));
      }
    };
    const bool described =
        cpu::all_slices(static_cast<size_t>(n), kCheckSlice, [&](size_t begin, size_t end) {
          describe_grads(begin, end);
          return true;
        });
    if (!described) describe_grads(0, static_cast<size_t>(n));
    StepExtras extras;
    if (grad_scale) extras.grad_scale = *grad_scale;
    extras.rounding_seed = rounding_seed_;
    scalars_.gather(scalar_sources_);
    plan_->step(grad_infos_, extras, std::nullopt);
    scalars_.scatter(scalar_sources_);
  }

  void set_options(int64_t group, const fusedopt_options* options) override {
    const auto groups = typed_groups<A>(&options, 1, "options");
    if (group < 0) throw Error(ErrorKind::value, "group must be >= 0");
    const cpu::StepInProgress writing;  // see step()
    std::lock_guard<std::mutex> lock(mutex_);
    plan_->set_options(static_cast<size_t>(group), groups[0]);
  }

  void steps(int64_t* out) override {
    const cpu::StepInProgress writing;  // see step(): it writes the caller's array
    std::lock_guard<std::mutex> lock(mutex_);
    if (!out && !counts_.empty()) throw Error(ErrorKind::type, "steps is NULL");
    for (size_t i = 0; i < counts_.size(); ++i)
      if (counts_[i] == std::numeric_limits<int64_t>::max())
        throw Error(ErrorKind::value, indexed("tensors", static_cast<int64_t>(i)) +
                                          " has taken step 2**63 - 1, the last: it has no next");
    for (size_t i = 0; i < counts_.size(); ++i) out[i] = counts_[i] + 1;
  }

 private:
  struct Size {
    int64_t size;
    Dtype dtype;
  };
  std::optional<uint64_t> rounding_seed_;
  std::vector<Size> sizes_;
  std::vector<BufferInfo> grad_infos_;  // the grads of the step in progress (under the lock)
  std::vector<int64_t> counts_;
  std::vector<double*> scalar_sources_;
  ExtentIndex scalar_rows_;  // the callers' scalar rows, which no grad may overlap
  ScalarRows scalars_;
  std::unique_ptr<Plan<A>> plan_;
  std::mutex mutex_;
};

template <class A>
struct TypedOptions : fusedopt_options {
  typename A::Options options;

  const char* algorithm() const override { return A::name; }
  fusedopt_options* copy() const override { return new TypedOptions(*this); }
  const char* field_name(int32_t index) const override {
    return index >= 0 && static_cast<size_t>(index) < std::size(A::fields) ? A::fields[index].name
                                                                           : nullptr;
  }
  const Field<typename A::Options>& field(const std::string& name) const {
    for (const auto& f : A::fields)
      if (name == f.name) return f;
    throw Error(ErrorKind::value, std::string(A::name) + " has no option '" + name + "'");
  }
  void set(const std::string& name, double value) override {
    const auto& f = field(name);
    if (f.number) {
      options.*f.number = value;
    } else if (f.flag) {
      // Exactly 0 or 1, as the header says: 0.5 or NaN is a caller's mistake (Python refuses
      // amsgrad=0.5 too), not a request for the flag.
      if (value != 0 && value != 1) throw OptionError(name, value, "a flag is 0 or 1");
      options.*f.flag = value != 0;
    } else {
      if (value != FUSEDOPT_CONVENTION_TORCH && value != FUSEDOPT_CONVENTION_KERAS)
        throw Error(ErrorKind::value,
                    "convention must be FUSEDOPT_CONVENTION_TORCH or FUSEDOPT_CONVENTION_KERAS");
      options.*f.convention = static_cast<Convention>(static_cast<int>(value));
    }
  }
  double get(const std::string& name) const override { return field(name).get(options); }
  void check() const override { A::check(options); }
  const char* state_name(int32_t index) const override {
    return index >= 0 && static_cast<size_t>(index) < A::state_names.size() ? A::state_names[index]
                                                                            : nullptr;
  }
  uint32_t states_used() const override { return A::states_used(options); }
  double initial_state(int32_t k) const override {
    return k >= 0 && static_cast<size_t>(k) < A::state_names.size()
               ? A::initial_state(options, k)
               : std::numeric_limits<double>::quiet_NaN();
  }
  const char* scalar_name(int32_t index) const override {
    if constexpr (A::scalar_names.size() > 0)
      if (index >= 0 && static_cast<size_t>(index) < A::scalar_names.size())
        return A::scalar_names[index];
    return nullptr;
  }
  double initial_scalar(int32_t k) const override {
    return k >= 0 && static_cast<size_t>(k) < A::scalar_names.size()
               ? A::initial_scalar(options, k)
               : std::numeric_limits<double>::quiet_NaN();
  }
  bool takes_grad_scale() const override { return A::takes_grad_scale; }

  void step(const fusedopt_options* const* groups, int64_t num_groups,
            const fusedopt_tensor* tensors, const fusedopt_tensor_precision* tensor_precision,
            int64_t num_tensors, const double* grad_scale,
            const fusedopt_precision* precision) const override {
    const auto typed = typed_groups<A>(groups, num_groups);
    StepBuffers buffers;
    StepSchedule schedule;
    std::vector<double*> sources;
    describe_tensors<A>(tensors, tensor_precision, num_tensors, true, buffers, schedule, sources);
    StepExtras extras;
    if (grad_scale) extras.grad_scale = *grad_scale;
    extras.rounding_seed = rounding_seed_of(precision);
    buffers.grads_written = grad_scale != nullptr;
    // Until the scalars are copied back to the caller's arrays, after the kernels.
    const cpu::StepInProgress writing;
    ScalarRows scalars;
    scalars.gather(sources);
    if (A::scalar_names.size() > 0) schedule.scalars = scalars.rows.data();
    const PreparedStep<A> prepared = prepare_step<A>(typed, schedule, buffers, extras);
    if constexpr (A::scalar_names.size() > 0)
      check_apart_from_scalars(scalar_rows(sources), buffers);
    run_step(prepared);
    scalars.scatter(sources);
  }

  fusedopt_plan* plan(const fusedopt_options* const* groups, int64_t num_groups,
                      const fusedopt_tensor* tensors,
                      const fusedopt_tensor_precision* tensor_precision, int64_t num_tensors,
                      const fusedopt_precision* precision) const override {
    return new TypedPlan<A>(typed_groups<A>(groups, num_groups), tensors, tensor_precision,
                            num_tensors, rounding_seed_of(precision));
  }
};

const fusedopt_options& first_group(const fusedopt_options* const* groups, int64_t count) {
  check_count(groups, count, "groups");
  if (count == 0) throw Error(ErrorKind::value, "num_groups must be >= 1");
  if (!groups[0]) throw Error(ErrorKind::type, "groups[0] is NULL");
  return *groups[0];
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

int32_t fusedopt_algorithm_count(void) { return Algorithms::size; }

const char* fusedopt_algorithm_name(int32_t index) {
  const char* name = nullptr;
  int32_t i = 0;
  Algorithms::for_each([&](auto tag) {
    if (i++ == index) name = decltype(tag)::type::name;
  });
  return name;
}

fusedopt_status fusedopt_options_create(const char* algorithm, fusedopt_options** options) {
  return guarded([&] {
    if (!algorithm) throw Error(ErrorKind::type, "algorithm is NULL");
    if (!options) throw Error(ErrorKind::type, "options is NULL");
    fusedopt_options* created = nullptr;
    Algorithms::visit(
        algorithm, [&](auto tag) { created = new TypedOptions<typename decltype(tag)::type>(); });
    if (!created)
      throw Error(ErrorKind::value, std::string("unknown algorithm '") + algorithm + "'");
    *options = created;
  });
}

fusedopt_status fusedopt_options_copy(const fusedopt_options* options, fusedopt_options** copy) {
  return guarded([&] {
    if (!options || !copy)
      throw Error(ErrorKind::type, !options ? "options is NULL" : "copy is NULL");
    *copy = options->copy();
  });
}

void fusedopt_options_destroy(fusedopt_options* options) { delete options; }

const char* fusedopt_options_algorithm(const fusedopt_options* options) {
  return options ? options->algorithm() : nullptr;
}

fusedopt_status fusedopt_options_set(fusedopt_options* options, const char* name, double value) {
  return guarded([&] {
    if (!options || !name)
      throw Error(ErrorKind::type, !options ? "options is NULL" : "name is NULL");
    options->set(name, value);
  });
}

fusedopt_status fusedopt_options_get(const fusedopt_options* options, const char* name,
                                     double* value) {
  return guarded([&] {
    if (!options || !name || !value)
      throw Error(ErrorKind::type, !options ? "options is NULL"
                                   : !name  ? "name is NULL"
                                            : "value is NULL");
    *value = options->get(name);
  });
}

const char* fusedopt_option_name(const fusedopt_options* options, int32_t index) {
  return options ? options->field_name(index) : nullptr;
}

fusedopt_status fusedopt_options_check(const fusedopt_options* options) {
  return guarded([&] {
    if (!options) throw Error(ErrorKind::type, "options is NULL");
    options->check();
  });
}

const char* fusedopt_state_name(const fusedopt_options* options, int32_t index) {
  return options ? options->state_name(index) : nullptr;
}

uint32_t fusedopt_states_used(const fusedopt_options* options) {
  return options ? options->states_used() : 0;
}

double fusedopt_initial_state(const fusedopt_options* options, int32_t k) {
  return options ? options->initial_state(k) : std::numeric_limits<double>::quiet_NaN();
}

const char* fusedopt_scalar_name(const fusedopt_options* options, int32_t index) {
  return options ? options->scalar_name(index) : nullptr;
}

double fusedopt_initial_scalar(const fusedopt_options* options, int32_t k) {
  return options ? options->initial_scalar(k) : std::numeric_limits<double>::quiet_NaN();
}

int32_t fusedopt_takes_grad_scale(const fusedopt_options* options) {
  return options && options->takes_grad_scale() ? 1 : 0;
}

fusedopt_status fusedopt_step(const fusedopt_options* const* groups, int64_t num_groups,
                              const fusedopt_tensor* tensors, int64_t num_tensors,
                              const double* grad_scale) {
  return fusedopt_step_with_precision(groups, num_groups, tensors, nullptr, num_tensors, grad_scale,
                                      nullptr);
}

fusedopt_status fusedopt_step_with_precision(const fusedopt_options* const* groups,
                                             int64_t num_groups, const fusedopt_tensor* tensors,
                                             const fusedopt_tensor_precision* tensor_precision,
                                             int64_t num_tensors, const double* grad_scale,
                                             const fusedopt_precision* precision) {
  return guarded([&] {
    first_group(groups, num_groups)
        .step(groups, num_groups, tensors, tensor_precision, num_tensors, grad_scale, precision);
  });
}

fusedopt_status fusedopt_plan_create(const fusedopt_options* const* groups, int64_t num_groups,
                                     const fusedopt_tensor* tensors, int64_t num_tensors,
                                     fusedopt_plan** plan) {
  return fusedopt_plan_create_with_precision(groups, num_groups, tensors, nullptr, num_tensors,
                                             nullptr, plan);
}

fusedopt_status fusedopt_plan_create_with_precision(
    const fusedopt_options* const* groups, int64_t num_groups, const fusedopt_tensor* tensors,
    const fusedopt_tensor_precision* tensor_precision, int64_t num_tensors,
    const fusedopt_precision* precision, fusedopt_plan** plan) {
  return guarded([&] {
    if (!plan) throw Error(ErrorKind::type, "plan is NULL");
    *plan = first_group(groups, num_groups)
                .plan(groups, num_groups, tensors, tensor_precision, num_tensors, precision);
  });
}

fusedopt_status fusedopt_plan_step(fusedopt_plan* plan, void* const* grads,
                                   const double* grad_scale) {
  return guarded([&] {
    if (!plan) throw Error(ErrorKind::type, "plan is NULL");
    plan->step(grads, grad_scale);
  });
}

fusedopt_status fusedopt_plan_set_options(fusedopt_plan* plan, int64_t group,
                                          const fusedopt_options* options) {
  return guarded([&] {
    if (!plan || !options) throw Error(ErrorKind::type, !plan ? "plan is NULL" : "options is NULL");
    plan->set_options(group, options);
  });
}

fusedopt_status fusedopt_plan_steps(fusedopt_plan* plan, int64_t* steps) {
  return guarded([&] {
    if (!plan) throw Error(ErrorKind::type, "plan is NULL");
    plan->steps(steps);
  });
}

void fusedopt_plan_destroy(fusedopt_plan* plan) { delete plan; }

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
