// The _cuda extension: device arrays in, described by their CUDA Array Interface dict or their
// DLPack capsule (python/fusedopt/cuda.py picks which), validated by the same core as the CPU
// (csrc/core), then launched on the stream cuda.py chose. Validation, DLPack parsing and the
// device-type checks need no GPU, so a machine without one still tests them; the first CUDA call
// comes after every buffer passed.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/step.h"
#include "cuda/backend.h"
#include "python/arrays.h"
#include "python/launcher.h"

namespace py = pybind11;
using namespace fusedopt;

namespace {

// The DLPack ABI (dmlc/dlpack, v1.x), as much of it as a consumer reads.
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};
struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned*);
  uint64_t flags;
  DLTensor dl_tensor;
};
constexpr uint64_t kDLPackFlagReadOnly = 1;
constexpr uint8_t kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4;
constexpr int32_t kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13;

// Where a buffer lives, beyond what the core validates.
struct Placement {
  int32_t device_type = kDLCUDA;
  int32_t device_id = -1;  // -1: ask the runtime (the CUDA Array Interface does not say)
  std::optional<uintptr_t> producer_stream;
};

std::string device_type_name(int32_t type) {
  switch (type) {
    case kDLCPU:
      return "the CPU";
    case kDLCUDAHost:
      return "pinned host memory";
    default:
      return "DLPack device type " + std::to_string(type);
  }
}

bool row_major(const std::vector<int64_t>& shape, const int64_t* strides, int64_t unit) {
  if (!strides) return true;
  int64_t expected = unit;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] == 0) return true;
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

// float32 and float64 (their own kernels); float16 and bfloat16 (computed in float32); uint8, the
// codes of an 8-bit blockwise state.
void set_dtype(BufferInfo& info, bool is_float, bool is_bfloat16, bool is_unsigned, int bits,
               const std::string& name) {
  info.dtype.reset();
  if (is_float && bits == 32) info.dtype = Dtype::float32;
  if (is_float && bits == 64) info.dtype = Dtype::float64;
  if (is_float && bits == 16) info.dtype = Dtype::float16;
  if (is_bfloat16 && bits == 16) info.dtype = Dtype::bfloat16;
  if (is_unsigned && bits == 8) info.dtype = Dtype::blockwise8;
  info.dtype_name = name;
}

int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

void describe_interface(py::dict cai, BufferInfo& info, Placement& placement) {
  const std::string typestr = py::str(cai["typestr"]);
  // A one-byte type has no byte order ('|u1'); the rest must be little-endian, as the GPU is.
  const bool ordered = typestr.size() == 3 && (typestr[0] == '<' || typestr[0] == '=' ||
                                               (typestr[0] == '|' && typestr[2] == '1'));
  // No typestr names bfloat16: a bfloat16 array comes by DLPack.
  set_dtype(info, ordered && typestr[1] == 'f', false, ordered && typestr[1] == 'u',
            std::atoi(typestr.c_str() + 2) * 8, typestr);
  for (py::handle s : py::tuple(cai["shape"])) info.shape.push_back(s.cast<int64_t>());
  info.size = product(info.shape);
  const py::tuple data(cai["data"]);
  info.data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  info.writeable = !data[1].cast<bool>();
  std::vector<int64_t> strides;
  if (cai.contains("strides") && !cai["strides"].is_none())
    for (py::handle s : py::tuple(cai["strides"])) strides.push_back(s.cast<int64_t>());
  const int64_t itemsize = typestr.size() == 3 ? std::atoi(typestr.c_str() + 2) : 1;
  info.contiguous = row_major(info.shape, strides.empty() ? nullptr : strides.data(), itemsize);
  if (cai.contains("mask") && !cai["mask"].is_none()) info.contiguous = false;
  if (cai.contains("stream") && !cai["stream"].is_none())
    placement.producer_stream = cai["stream"].cast<uintptr_t>();
}

void describe_dlpack(py::capsule capsule, BufferInfo& info, Placement& placement) {
  PyObject* object = capsule.ptr();
  const DLTensor* t;
  bool read_only = false;
  if (PyCapsule_IsValid(object, "dltensor_versioned")) {
    auto* managed =
        static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(object, "dltensor_versioned"));
    if (managed->version.major != 1)
      throw Error(ErrorKind::type,
                  "unsupported DLPack major version " + std::to_string(managed->version.major));
    t = &managed->dl_tensor;
    read_only = managed->flags & kDLPackFlagReadOnly;
  } else if (PyCapsule_IsValid(object, "dltensor")) {
    t = &static_cast<DLManagedTensor*>(PyCapsule_GetPointer(object, "dltensor"))->dl_tensor;
  } else {
    throw Error(ErrorKind::type, "not an unconsumed DLPack capsule");
  }
  // The capsule is only read, never consumed: its owner's destructor releases the tensor.
  const bool one_lane = t->dtype.lanes == 1;
  const bool is_float = t->dtype.code == kDLFloat && one_lane;
  const bool bfloat16 = t->dtype.code == kDLBfloat && one_lane;
  const bool is_unsigned = t->dtype.code == kDLUInt && one_lane;
  const std::string bits = std::to_string(t->dtype.bits);
  set_dtype(info, is_float, bfloat16, is_unsigned, t->dtype.bits,
            is_float   ? "float" + bits
            : bfloat16 ? "bfloat" + bits
            : is_unsigned
                ? "uint" + bits
                : "DLPack type code " + std::to_string(t->dtype.code) + " of " + bits + " bits");
  info.shape.assign(t->shape, t->shape + t->ndim);
  info.size = product(info.shape);
  info.data = static_cast<char*>(t->data) + t->byte_offset;
  info.writeable = !read_only;
  info.contiguous = row_major(info.shape, t->strides, 1);
  placement.device_type = t->device.device_type;
  placement.device_id = t->device.device_id;
}

struct DeviceStep {
  StepBuffers buffers;
  // One entry per buffer of `buffers`, in the order params, grads, states.
  std::vector<Placement> placements;
  std::vector<std::string> names;
};

char empty_buffer_address;

void describe_list(py::handle list, const std::string& role, std::vector<BufferInfo>& infos,
                   DeviceStep& step) {
  if (list.is_none()) return;
  for (py::handle item : list) {
    const std::string name = role + "[" + std::to_string(infos.size()) + "]";
    BufferInfo info;
    Placement placement;
    if (item.is_none()) {
      info.present = false;
    } else if (py::isinstance<py::dict>(item) || py::isinstance<py::capsule>(item)) {
      const auto dict = py::reinterpret_borrow<py::object>(item);
      if (py::isinstance<py::capsule>(item)) {
        describe_dlpack(py::reinterpret_borrow<py::capsule>(item), info, placement);
      } else if (dict.contains("dlpack")) {  // a capsule with its producer's stream
        describe_dlpack(py::reinterpret_borrow<py::capsule>(dict["dlpack"]), info, placement);
        if (!dict["stream"].is_none()) placement.producer_stream = dict["stream"].cast<uintptr_t>();
      } else {
        describe_interface(py::reinterpret_borrow<py::dict>(item), info, placement);
      }
      // An empty tensor may have no memory at all (torch's data_ptr 0, in a DLPack capsule
      // too): never read, any address stands in for it, as on the CPU (a null one would be a
      // missing state).
      if (info.size == 0 && !info.data) info.data = &empty_buffer_address;
      // A GPU loads an element only from an address aligned to its size (a misaligned one is
      // an error that ends the CUDA context); the CPU's loads take any.
      if (info.dtype && info.size > 0 &&
          reinterpret_cast<uintptr_t>(info.data) % dtype_size(*info.dtype) != 0)
        throw Error(ErrorKind::value, name + " is not aligned to its element size (" +
                                          std::to_string(dtype_size(*info.dtype)) +
                                          " bytes), which the GPU's loads need");
    } else {
      throw Error(ErrorKind::type, name +
                                       " must be a __cuda_array_interface__ dict or a DLPack "
                                       "capsule (fusedopt.cuda makes them)");
    }
    infos.push_back(std::move(info));
    step.placements.push_back(placement);
    step.names.push_back(name);
  }
}

// The buffers in the order of all_buffers: params, grads, states, masters, absmax.
DeviceStep describe_step(py::handle params, py::handle grads,
                         const std::vector<std::pair<py::handle, std::string>>& states,
                         py::handle masters, py::handle absmax, bool grads_written) {
  DeviceStep step;
  // The scales of 8-bit states are device memory: the host reads none of their values.
  step.buffers.values_readable = false;
  describe_list(params, "params", step.buffers.params, step);
  describe_list(grads, "grads", step.buffers.grads, step);
  for (const auto& [list, name] : states) {
    step.buffers.states.emplace_back();
    step.buffers.state_names.push_back(name);
    describe_list(list, name, step.buffers.states.back(), step);
  }
  describe_list(masters, "masters", step.buffers.masters, step);
  if (!absmax.is_none()) {
    const py::list lists(py::reinterpret_borrow<py::object>(absmax));
    if (lists.size() != states.size())
      throw Error(ErrorKind::value, "absmax: one list (or None) per state of the algorithm");
    for (size_t k = 0; k < states.size(); ++k) {
      step.buffers.absmax.emplace_back();
      describe_list(lists[k], states[k].second + "_absmax", step.buffers.absmax.back(), step);
    }
  }
  step.buffers.grads_written = grads_written;
  return step;
}

std::vector<const BufferInfo*> all_buffers(const StepBuffers& b) {
  std::vector<const BufferInfo*> all;
  for (const BufferInfo& x : b.params) all.push_back(&x);
  for (const BufferInfo& x : b.grads) all.push_back(&x);
  for (const auto& list : b.states)
    for (const BufferInfo& x : list) all.push_back(&x);
  for (const BufferInfo& x : b.masters) all.push_back(&x);
  for (const auto& list : b.absmax)
    for (const BufferInfo& x : list) all.push_back(&x);
  return all;
}

// Every non-empty buffer must sit on the same CUDA device. DLPack says where a buffer is, so a
// host buffer is refused before the runtime is touched; the CUDA Array Interface does not, and
// the runtime is asked. Returns the device.
int check_placement(const DeviceStep& step) {
  const std::vector<const BufferInfo*> buffers = all_buffers(step.buffers);
  for (size_t i = 0; i < buffers.size(); ++i) {
    const int32_t type = step.placements[i].device_type;
#if defined(FUSEDOPT_CUDA_EMULATION)
    if (type == kDLCPU) continue;  // the emulated device's memory is the host's
#endif
    if (buffers[i]->present && type != kDLCUDA && type != kDLCUDAManaged)
      throw Error(ErrorKind::value,
                  step.names[i] + " is in " + device_type_name(type) + ", not on a CUDA device");
  }
  cuda::require_device();
  int device = -1;
  size_t first = 0;
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (!buffers[i]->present || buffers[i]->size == 0) continue;
    const Placement& p = step.placements[i];
    const int here =
        p.device_id >= 0 ? p.device_id : cuda::device_of(buffers[i]->data, step.names[i]);
    if (device < 0) {
      device = here;
      first = i;
    } else if (here != device) {
      throw Error(ErrorKind::value, step.names[i] + " is on cuda:" + std::to_string(here) +
                                        " but " + step.names[first] +
                                        " is on cuda:" + std::to_string(device));
    }
  }
  return device;
}

using IndexArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// The distinct producer streams of `step`'s buffers, added to `producers`: usually one stream.
void add_producers(const DeviceStep& step, std::vector<void*>& producers) {
  for (const Placement& p : step.placements) {
    if (!p.producer_stream) continue;
    void* producer = cuda::stream_from_handle(*p.producer_stream);
    if (std::find(producers.begin(), producers.end(), producer) == producers.end())
      producers.push_back(producer);
  }
}

// `launch(stream)` on `stream` of `device`, ordered after the producers' work and before their
// next. Once it has launched, nothing may fail (a plan would undo the scalars and counts of a
// step that ran): the producers then wait for the whole device instead.
template <class Launch>
void launch_on(int device, uintptr_t stream_handle, const std::vector<void*>& producers,
               Launch&& launch) {
  cuda::DeviceGuard guard(device);
  void* stream = cuda::stream_from_handle(stream_handle);
  cuda::wait_for_streams(stream, producers);
  launch(stream);
  try {
    cuda::signal_streams(stream, producers);
  } catch (const std::exception&) {
    cuda::synchronize_device();
  }
}

// The state lists of `A`, each with its name; ValueError unless there is one per state.
template <class A>
std::vector<std::pair<py::handle, std::string>> state_lists_of(py::handle states) {
  std::vector<std::pair<py::handle, std::string>> lists;
  for (py::handle list : states) {
    if (lists.size() == A::state_names.size()) break;
    lists.emplace_back(list, A::state_names[lists.size()]);
  }
  if (lists.size() != A::state_names.size() || py::len(states) != lists.size())
    throw Error(ErrorKind::value, std::string(A::name) + " takes " +
                                      std::to_string(A::state_names.size()) + " state lists");
  return lists;
}

// new_state's flags (None: none); their count is the core's check (check_schedule).
std::vector<uint8_t> new_state_flags(py::handle flags) {
  std::vector<uint8_t> result;
  if (!flags.is_none())
    for (py::handle f : flags) result.push_back(f.cast<bool>());
  return result;
}

// Validation (core), placement, then the launch on `stream`, after the producers' streams.
template <class A>
void run(const DeviceStep& step, const std::vector<typename A::Options>& groups,
         const StepSchedule& schedule, const StepExtras& extras, uintptr_t stream_handle) {
  int device = -1;
  // Placement is checked after the buffers are validated, before the scalars advance: a step
  // refused for its device leaves NAdam's and ASGD's scalars as they were.
  auto prepared = prepare_step<A>(groups, schedule, step.buffers, extras,
                                  [&] { device = check_placement(step); });
  if (device < 0) return;  // every tensor is empty
  std::vector<void*> producers;
  add_producers(step, producers);
  py::gil_scoped_release release;
  // From the launch to the producers' ordering: a fork waits for it (the CPU's steps do too).
  const cpu::StepInProgress writing;
  launch_on(device, stream_handle, producers,
            [&](void* stream) { cuda::launch_step(prepared, stream); });
}

// Options from their values in the order of the algorithm's fields (see _core's bindings).
template <class A>
std::vector<typename A::Options> groups_from(py::handle groups) {
  std::vector<typename A::Options> result;
  for (py::handle values : groups) {
    typename A::Options o;
    const py::tuple items = py::tuple(py::reinterpret_borrow<py::object>(values));
    if (items.size() != std::size(A::fields))
      throw Error(ErrorKind::value, std::string(A::name) + ": wrong number of option values");
    for (size_t i = 0; i < items.size(); ++i) {
      const auto& field = A::fields[i];
      const double value = items[i].cast<double>();
      if (field.number)
        o.*field.number = value;
      else if (field.flag)
        o.*field.flag = value != 0;
      else
        o.*field.convention = static_cast<Convention>(static_cast<int>(value));
    }
    result.push_back(o);
  }
  return result;
}

}  // namespace

// A plan on the GPU (issue 12): the params, states, masters and 8-bit scales described and
// checked once (csrc/core/step.h's Plan, whose checked steps this launches instead of running
// the CPU kernels); each step describes and checks its grads only. The caller keeps every
// registered array alive and in place (fusedopt.cuda.Plan holds them and registers anew when a
// torch tensor's memory moved); the step counts and scalars are NumPy arrays it advances.
class AnyDevicePlan {
 public:
  virtual ~AnyDevicePlan() = default;
  virtual void set_options(size_t group, py::handle values) = 0;
  virtual void step(py::handle grads, std::optional<double> grad_scale, std::optional<int64_t> step,
                    uintptr_t stream, std::optional<uintptr_t> producer) = 0;
  virtual size_t size() const = 0;
};

template <class A>
class DevicePlan : public AnyDevicePlan {
 public:
  DevicePlan(py::handle groups, const IndexArray& group_of, py::handle params, py::handle states,
             py::handle masters, py::handle absmax, py::object step_counts, py::handle new_state,
             py::object scalars, std::optional<uint64_t> rounding_seed)
      : step_counts_(std::move(step_counts)),
        scalars_(std::move(scalars)),
        rounding_seed_(rounding_seed) {
    const DeviceStep registered =
        describe_step(params, py::none(), state_lists_of<A>(states), masters, absmax, false);
    const size_t n = registered.buffers.params.size();
    int64_t* counts = nullptr;
    if (!step_counts_.is_none())
      counts = writeable_array<int64_t>(step_counts_, "step_counts", static_cast<py::ssize_t>(n));
    double* rows =
        writeable_array<double>(scalars_, "scalars", static_cast<py::ssize_t>(n) * kMaxScalars);
    std::vector<int> groups_of(group_of.data(), group_of.data() + group_of.size());
    plan_ =
        std::make_unique<Plan<A>>(groups_from<A>(groups), registered.buffers, std::move(groups_of),
                                  counts, new_state_flags(new_state), rows);
    device_ = check_placement(registered);
    plan_->run_with([this](const PreparedStep<A>& prepared) {
      if (device_ < 0) return;  // every registered tensor is empty
      launch_on(device_, stream_, producers_,
                [&](void* stream) { tables_.launch(prepared, stream); });
    });
  }

  void set_options(size_t group, py::handle values) override {
    const std::vector<typename A::Options> options = groups_from<A>(py::make_tuple(values));
    py::gil_scoped_release release;  // a step may hold the plan's lock through GPU waits
    plan_->set_options(group, options[0]);
  }

  void step(py::handle grads, std::optional<double> grad_scale, std::optional<int64_t> step,
            uintptr_t stream, std::optional<uintptr_t> producer) override {
    DeviceStep given;
    describe_list(grads, "grads", given.buffers.grads, given);
    if (!given.buffers.grads.empty()) {
      const int device = check_placement(given);
      if (device >= 0 && device_ >= 0 && device != device_)
        throw Error(ErrorKind::value, "the grads are on cuda:" + std::to_string(device) +
                                          " but the params on cuda:" + std::to_string(device_));
    }
    // The streams producing this step's arrays: the grads', and the params' producer now
    // (`producer`: torch's current stream, or the stream a param's interface names now).
    std::vector<void*> producers;
    if (producer) producers.push_back(cuda::stream_from_handle(*producer));
    add_producers(given, producers);
    const StepExtras extras{grad_scale, rounding_seed_};
    py::gil_scoped_release release;  // first: a thread waiting for the lock holds no GIL
    std::lock_guard<std::mutex> lock(mutex_);
    producers_ = std::move(producers);  // what the runner launches with, under the lock
    stream_ = stream;
    plan_->step(given.buffers.grads, extras, step);
  }

  size_t size() const override { return plan_->size(); }

 private:
  py::object step_counts_, scalars_;  // the arrays the plan advances, kept alive
  std::optional<uint64_t> rounding_seed_;
  std::unique_ptr<Plan<A>> plan_;
  cuda::RegisteredTables tables_;  // after plan_: destroyed first, while the plan lives
  int device_ = -1;                // -1: every registered tensor is empty
  std::mutex mutex_;               // one step at a time: the runner reads these two
  std::vector<void*> producers_;
  uintptr_t stream_ = 0;
};

// fusedopt.torch's launches on one device: the tables of one _core TorchPlan, kept on the GPU
// (python/launcher.h). The plan checks the tensors and calls `entry` from its step; the stream
// and the producers' stream are set before each step, under the optimizer's lock.
class AnyLauncher {
 public:
  virtual ~AnyLauncher() = default;
  virtual py::capsule entry() = 0;
  void set_streams(uintptr_t stream, std::optional<uintptr_t> producer) {
    stream_ = stream;
    producers_.clear();
    if (producer) producers_.push_back(cuda::stream_from_handle(*producer));
  }

 protected:
  int device_ = 0;
  uintptr_t stream_ = 0;
  std::vector<void*> producers_;
};

template <class A>
class Launcher : public AnyLauncher {
 public:
  explicit Launcher(int device) {
    cuda::require_device();
    device_ = device;
#if defined(FUSEDOPT_CUDA_EMULATION)
    constexpr bool emulated = true;
#else
    constexpr bool emulated = false;
#endif
    entry_ = {LaunchEntry::kVersion,
              A::name,
              sizeof(PreparedStep<A>),
              sizeof(TensorRef),
              sizeof(typename A::Coefficients),
              emulated,
              device,
              this,
              &Launcher::launch};
  }

  py::capsule entry() override { return py::capsule(&entry_, LaunchEntry::kCapsuleName); }

 private:
  static bool launch(void* self, const void* prepared, std::string* error) {
    auto* l = static_cast<Launcher*>(self);
    try {
      launch_on(l->device_, l->stream_, l->producers_, [&](void* stream) {
        l->tables_.launch(*static_cast<const PreparedStep<A>*>(prepared), stream);
      });
      return true;
    } catch (const std::exception& e) {  // no exception crosses into the other module
      *error = e.what();
      return false;
    }
  }

  LaunchEntry entry_;
  cuda::RegisteredTables tables_;
};

// _cuda, or _cuda_emulated: the same bindings over the emulated kernels and runtime
// (csrc/cuda/emulation.h), which tests compare with the CPU backend on machines without a GPU.
#ifndef FUSEDOPT_CUDA_MODULE
#define FUSEDOPT_CUDA_MODULE _cuda
#endif

PYBIND11_MODULE(FUSEDOPT_CUDA_MODULE, m) {
  m.doc() = "fusedopt's CUDA backend (private: use fusedopt.cuda)";

  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      PyErr_SetString(e.kind == ErrorKind::type ? PyExc_TypeError : PyExc_ValueError, e.what());
    }
  });

  m.def(
      "device_count",
      [] {
        std::string reason;
        const int count = cuda::device_count(&reason);
        return py::make_tuple(count, reason);
      },
      "(number of usable CUDA devices, the runtime's reason when there are none); never raises.");

  // Module-local: _cuda and _cuda_emulated both define it, and pybind11's registry is global.
  py::class_<AnyDevicePlan>(m, "Plan", py::module_local(),
                            "A step's device arrays registered once (see fusedopt.cuda.Plan).")
      .def(py::init([](const std::string& name, py::handle groups, const IndexArray& group_of,
                       py::handle params, py::handle states, py::handle masters, py::handle absmax,
                       py::object step_counts, py::handle new_state, py::object scalars,
                       std::optional<uint64_t> rounding_seed) {
             std::unique_ptr<AnyDevicePlan> plan;
             const bool found = Algorithms::visit(name, [&](auto tag) {
               using A = typename decltype(tag)::type;
               plan = std::make_unique<DevicePlan<A>>(groups, group_of, params, states, masters,
                                                      absmax, step_counts, new_state, scalars,
                                                      rounding_seed);
             });
             if (!found) throw Error(ErrorKind::value, "unknown algorithm '" + name + "'");
             return plan;
           }),
           py::arg("algorithm"), py::arg("groups"), py::arg("group_of"), py::arg("params"),
           py::arg("states"), py::arg("masters"), py::arg("absmax"), py::arg("step_counts"),
           py::arg("new_state"), py::arg("scalars"), py::arg("rounding_seed"))
      .def("set_options", &AnyDevicePlan::set_options, py::arg("group"), py::arg("values"))
      .def("step", &AnyDevicePlan::step, py::arg("grads"), py::arg("grad_scale"), py::arg("step"),
           py::arg("stream"), py::arg("producer") = py::none())
      .def("__len__", &AnyDevicePlan::size);

  py::class_<AnyLauncher>(m, "Launcher", py::module_local(),
                          "The launches of one fusedopt._core.TorchPlan over CUDA tensors.")
      .def(py::init([](const std::string& name, int device) {
             std::unique_ptr<AnyLauncher> launcher;
             const bool found = Algorithms::visit(name, [&](auto tag) {
               launcher = std::make_unique<Launcher<typename decltype(tag)::type>>(device);
             });
             if (!found) throw Error(ErrorKind::value, "unknown algorithm '" + name + "'");
             return launcher;
           }),
           py::arg("algorithm"), py::arg("device"))
      .def("entry", &AnyLauncher::entry, "A capsule of its LaunchEntry, valid while it lives.")
      .def("set_streams", &AnyLauncher::set_streams, py::arg("stream"), py::arg("producer"));

  m.def(
      "step",
      [](const std::string& name, py::handle groups, const IndexArray& group_of,
         const IndexArray& steps, py::handle params, py::handle grads, py::handle states,
         py::handle new_state, py::handle scalars, std::optional<double> grad_scale,
         uintptr_t stream, bool checked, py::handle masters, py::handle absmax,
         std::optional<uint64_t> rounding_seed) {
        bool found = Algorithms::visit(name, [&](auto tag) {
          using A = typename decltype(tag)::type;
          const DeviceStep d = describe_step(params, grads, state_lists_of<A>(states), masters,
                                             absmax, grad_scale.has_value());
          StepSchedule s;
          s.group_of.assign(group_of.data(), group_of.data() + group_of.size());
          s.steps.assign(steps.data(), steps.data() + steps.size());
          s.new_state = new_state_flags(new_state);
          s.scalars = writeable_array<double>(
              scalars, "scalars", static_cast<py::ssize_t>(d.buffers.params.size()) * kMaxScalars);
          const RangeChecks ranges(checked);  // false: fusedopt.torch, as TorchPlan's
          run<A>(d, groups_from<A>(groups), s, StepExtras{grad_scale, rounding_seed}, stream);
        });
        if (!found) throw Error(ErrorKind::value, "unknown algorithm '" + name + "'");
      },
      "One step on device arrays (see fusedopt._core.step), launched on `stream`.",
      py::arg("algorithm"), py::arg("groups"), py::arg("group_of"), py::arg("steps"),
      py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("new_state"),
      py::arg("scalars"), py::arg("grad_scale"), py::arg("stream"), py::arg("checked") = true,
      py::arg("masters") = py::none(), py::arg("absmax") = py::none(),
      py::arg("rounding_seed") = py::none());
}
