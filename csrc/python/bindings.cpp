// The _core extension: NumPy arrays in, taken as they are (never converted, so an in-place update
// lands in the caller's memory), described to the core, which validates and runs them with the
// GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/ewma.h"
#include "core/step.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"
#include "cuda/launch_plan.h"

namespace py = pybind11;
using namespace fusedopt;

namespace {

bool native_byte_order(const py::dtype& dtype) {
  const char order = dtype.byteorder();
  constexpr char native = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '<' : '>';
  return order == '=' || order == '|' || order == native;
}

// Fills `info` (reused across steps, so its shape keeps its capacity) from a NumPy array's own
// fields: no reference counting, no allocation in the steady state. A ten-thousand-tensor step
// describes fifty thousand buffers, and this was most of its cost.
void describe(py::handle object, const std::string& role, size_t index, BufferInfo& info) {
  info.present = !object.is_none();
  if (!info.present) return;
  if (!py::isinstance<py::array>(object))
    throw Error(ErrorKind::type, role + "[" + std::to_string(index) +
                                     "] must be a numpy.ndarray, got " +
                                     std::string(py::str(py::type::of(object).attr("__name__"))));
  const auto* array = py::detail::array_proxy(object.ptr());
  const auto* descr = py::detail::array_descriptor_proxy(array->descr);
  const py::dtype dtype = py::reinterpret_borrow<py::dtype>(array->descr);
  const bool native = native_byte_order(dtype);
  info.data = array->data;
  info.shape.resize(array->nd);  // element-wise: a memmove call per buffer cost 10% of a step
  for (int d = 0; d < array->nd; ++d) info.shape[d] = array->dimensions[d];
  info.size = 1;
  for (int d = 0; d < array->nd; ++d) info.size *= array->dimensions[d];
  info.is_float32 = native && descr->type_num == py::detail::npy_api::NPY_FLOAT_;
  info.is_float64 = native && descr->type_num == py::detail::npy_api::NPY_DOUBLE_;
  info.contiguous = array->flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_;
  info.writeable = array->flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  info.dtype_name.clear();
  // Formatting a dtype costs more than the rest of the call: name only the ones a message needs.
  if (!info.is_float32 && !info.is_float64) {
    info.dtype_name = py::str(dtype);
    if (!native) info.dtype_name += " (non-native byte order)";
  }
}

void describe_list(py::handle list, const std::string& role, std::vector<BufferInfo>& infos) {
  if (list.is_none()) {
    infos.clear();
    return;
  }
  if (!PyList_Check(list.ptr()) && !PyTuple_Check(list.ptr()))
    throw Error(ErrorKind::type, role + " must be a list or tuple of numpy arrays");
  const size_t n = static_cast<size_t>(PySequence_Fast_GET_SIZE(list.ptr()));
  PyObject** items = PySequence_Fast_ITEMS(list.ptr());
  infos.resize(n);
  for (size_t i = 0; i < n; ++i) describe(items[i], role, i, infos[i]);
}

// The description of one call's buffers, in storage each thread reuses from step to step.
StepBuffers& describe_step(py::handle params, py::handle grads,
                           const std::vector<std::pair<py::handle, const char*>>& states,
                           bool grads_written) {
  thread_local StepBuffers b;
  describe_list(params, "params", b.params);
  describe_list(grads, "grads", b.grads);
  b.states.resize(states.size());
  b.state_names.resize(states.size());
  size_t k = 0;
  for (const auto& [list, name] : states) {
    b.state_names[k] = name;
    describe_list(list, name, b.states[k]);
    ++k;
  }
  b.grads_written = grads_written;
  return b;
}

using IndexArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// The optimizer's step counts, one per param: the steps taken so far. A step runs with
// t = count + 1, and only once it has run are the counts advanced, in place: the optimizer keeps
// one array and does no NumPy arithmetic per step (each NumPy call costs about a microsecond,
// a fifth of a small step).
class StepCounts {
 public:
  explicit StepCounts(py::handle counts) {
    if (!py::isinstance<py::array>(counts))
      throw Error(ErrorKind::type, "step_counts must be a numpy int64 array");
    array_ = py::reinterpret_borrow<py::array>(counts);
    if (array_.dtype().kind() != 'i' || array_.itemsize() != 8 ||
        !(array_.flags() & py::array::c_style) || !array_.writeable())
      throw Error(ErrorKind::type, "step_counts must be a writeable, C-contiguous int64 array");
  }

  StepSchedule schedule(const IndexArray& group_of) const {
    StepSchedule s;
    s.group_of.assign(group_of.data(), group_of.data() + group_of.size());
    const auto* counts = static_cast<const int64_t*>(array_.data());
    s.steps.resize(static_cast<size_t>(array_.size()));
    for (size_t i = 0; i < s.steps.size(); ++i) s.steps[i] = counts[i] + 1;
    return s;
  }

  void advance() {
    auto* counts = static_cast<int64_t*>(array_.mutable_data());
    for (py::ssize_t i = 0; i < array_.size(); ++i) ++counts[i];
  }

 private:
  py::array array_;
};

Convention convention_of(const std::string& name) {
  if (name == "torch") return Convention::torch;
  if (name == "keras") return Convention::keras;
  throw Error(ErrorKind::value, "convention must be 'torch' or 'keras', got '" + name + "'");
}

// Every options class gets `convention` ("torch" or "keras") and `validate()`, which raises
// ValueError naming the first invalid hyperparameter.
template <class Options>
void bind_common_options(py::class_<Options>& cls) {
  cls.def("validate", [](const Options& o) { validate_options(o); });
  cls.def_property(
      "convention",
      [](const Options& o) { return o.convention == Convention::keras ? "keras" : "torch"; },
      [](Options& o, const std::string& name) { o.convention = convention_of(name); });
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fusedopt's native CPU core (private: use the fusedopt package)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      PyErr_SetString(e.kind == ErrorKind::type ? PyExc_TypeError : PyExc_ValueError, e.what());
    }
  });

  py::class_<SgdOptions> sgd(m, "SgdOptions");
  sgd.def(py::init<>())
      .def_readwrite("lr", &SgdOptions::lr)
      .def_readwrite("momentum", &SgdOptions::momentum)
      .def_readwrite("dampening", &SgdOptions::dampening)
      .def_readwrite("weight_decay", &SgdOptions::weight_decay)
      .def_readwrite("nesterov", &SgdOptions::nesterov)
      .def_readwrite("maximize", &SgdOptions::maximize);
  bind_common_options(sgd);

  py::class_<AdagradOptions> adagrad(m, "AdagradOptions");
  adagrad.def(py::init<>())
      .def_readwrite("lr", &AdagradOptions::lr)
      .def_readwrite("lr_decay", &AdagradOptions::lr_decay)
      .def_readwrite("weight_decay", &AdagradOptions::weight_decay)
      .def_readwrite("eps", &AdagradOptions::eps)
      .def_readwrite("maximize", &AdagradOptions::maximize);
  bind_common_options(adagrad);

  py::class_<RmspropOptions> rmsprop(m, "RmspropOptions");
  rmsprop.def(py::init<>())
      .def_readwrite("lr", &RmspropOptions::lr)
      .def_readwrite("alpha", &RmspropOptions::alpha)
      .def_readwrite("eps", &RmspropOptions::eps)
      .def_readwrite("weight_decay", &RmspropOptions::weight_decay)
      .def_readwrite("momentum", &RmspropOptions::momentum)
      .def_readwrite("centered", &RmspropOptions::centered)
      .def_readwrite("maximize", &RmspropOptions::maximize);
  bind_common_options(rmsprop);

  py::class_<AdamOptions> adam(m, "AdamOptions");
  adam.def(py::init<>())
      .def_readwrite("lr", &AdamOptions::lr)
      .def_readwrite("beta1", &AdamOptions::beta1)
      .def_readwrite("beta2", &AdamOptions::beta2)
      .def_readwrite("eps", &AdamOptions::eps)
      .def_readwrite("weight_decay", &AdamOptions::weight_decay)
      .def_readwrite("amsgrad", &AdamOptions::amsgrad)
      .def_readwrite("maximize", &AdamOptions::maximize)
      .def_readwrite("decoupled_weight_decay", &AdamOptions::decoupled_weight_decay);
  bind_common_options(adam);

  m.def(
      "sgd_step",
      [](const std::vector<SgdOptions>& groups, const IndexArray& group_of, py::handle step_counts,
         py::object params, py::object grads, py::object momentum_buffers,
         std::optional<double> grad_scale) {
        StepBuffers& b = describe_step(params, grads, {{momentum_buffers, "momentum_buffers"}},
                                       grad_scale.has_value());
        StepCounts counts(step_counts);
        StepSchedule s = counts.schedule(group_of);
        {
          py::gil_scoped_release release;
          sgd_step(groups, s, b, grad_scale);
        }
        counts.advance();
      },
      py::arg("groups"), py::arg("group_of"), py::arg("step_counts"), py::arg("params"),
      py::arg("grads"), py::arg("momentum_buffers"), py::arg("grad_scale") = py::none());

  m.def(
      "adagrad_step",
      [](const std::vector<AdagradOptions>& groups, const IndexArray& group_of,
         py::handle step_counts, py::object params, py::object grads, py::object sums) {
        StepBuffers& b = describe_step(params, grads, {{sums, "state_sums"}}, false);
        StepCounts counts(step_counts);
        StepSchedule s = counts.schedule(group_of);
        {
          py::gil_scoped_release release;
          adagrad_step(groups, s, b);
        }
        counts.advance();
      },
      py::arg("groups"), py::arg("group_of"), py::arg("step_counts"), py::arg("params"),
      py::arg("grads"), py::arg("state_sums"));

  m.def(
      "rmsprop_step",
      [](const std::vector<RmspropOptions>& groups, const IndexArray& group_of,
         py::handle step_counts, py::object params, py::object grads, py::object square_avgs,
         py::object momentum_buffers, py::object grad_avgs) {
        StepBuffers& b = describe_step(params, grads,
                                       {{square_avgs, "square_avgs"},
                                        {momentum_buffers, "momentum_buffers"},
                                        {grad_avgs, "grad_avgs"}},
                                       false);
        StepCounts counts(step_counts);
        StepSchedule s = counts.schedule(group_of);
        {
          py::gil_scoped_release release;
          rmsprop_step(groups, s, b);
        }
        counts.advance();
      },
      py::arg("groups"), py::arg("group_of"), py::arg("step_counts"), py::arg("params"),
      py::arg("grads"), py::arg("square_avgs"), py::arg("momentum_buffers"), py::arg("grad_avgs"));

  m.def(
      "adam_step",
      [](const std::vector<AdamOptions>& groups, const IndexArray& group_of, py::handle step_counts,
         py::object params, py::object grads, py::object exp_avgs, py::object exp_avg_sqs,
         py::object max_exp_avg_sqs, std::optional<double> grad_scale) {
        StepBuffers& b = describe_step(params, grads,
                                       {{exp_avgs, "exp_avgs"},
                                        {exp_avg_sqs, "exp_avg_sqs"},
                                        {max_exp_avg_sqs, "max_exp_avg_sqs"}},
                                       grad_scale.has_value());
        StepCounts counts(step_counts);
        StepSchedule s = counts.schedule(group_of);
        {
          py::gil_scoped_release release;
          adam_step(groups, s, b, grad_scale);
        }
        counts.advance();
      },
      py::arg("groups"), py::arg("group_of"), py::arg("step_counts"), py::arg("params"),
      py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
      py::arg("grad_scale") = py::none());

  m.def(
      "stream_add",
      [](py::object params, py::object grads, py::object states) {
        std::vector<std::pair<py::handle, const char*>> lists;
        for (py::handle list : states) lists.emplace_back(list, "states");
        StepBuffers& b = describe_step(params, grads, lists, false);
        py::gil_scoped_release release;
        stream_add_step(b);
      },
      "The bench's bandwidth ceiling: param += grad and each state += grad, in one pass.",
      py::arg("params"), py::arg("grads"), py::arg("states"));

  m.def(
      "ewma",
      [](py::array_t<double, py::array::c_style> x, py::array_t<double, py::array::c_style> out,
         int64_t length, int64_t num_series, int64_t time_stride, int64_t series_stride, double com,
         bool adjust, bool ignore_na, int64_t min_periods) {
        if (x.size() != length * num_series || out.size() != x.size())
          throw Error(ErrorKind::value, "ewma: layout does not match the arrays");
        const double* in = x.data();
        double* result = out.mutable_data();
        py::gil_scoped_release release;
        ewma(in, result, length, num_series, time_stride, series_stride, com, adjust, ignore_na,
             min_periods);
      },
      py::arg("x"), py::arg("out"), py::arg("length"), py::arg("num_series"),
      py::arg("time_stride"), py::arg("series_stride"), py::arg("com"), py::arg("adjust"),
      py::arg("ignore_na"), py::arg("min_periods"));

  m.def("available_isas", &cpu::available_isas);
  m.def("cpu_isa", &cpu::current_isa);
  m.def("set_cpu_isa", [](const std::string& isa) {
    try {
      cpu::set_isa(isa);
    } catch (const std::invalid_argument& e) {
      throw Error(ErrorKind::value, e.what());
    }
  });
  m.def("num_threads", &cpu::num_threads);
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw Error(ErrorKind::value, "n must be >= 1, got " + std::to_string(n));
    cpu::set_num_threads(n);
  });
  m.attr("built_isas") = FUSEDOPT_BUILT_ISAS;

  // The CUDA launch plan is host code: built into every _core, so tests/test_cuda.py can check it
  // on machines without a GPU or nvcc. Tensor i has sizes[i] elements of element_bytes[i] bytes at
  // addresses[i] (param, grad, states; 0 for none) and reads coefficient set coefficient_ids[i].
  m.def(
      "_cuda_launch_plan",
      [](const std::vector<int64_t>& sizes, const std::vector<std::vector<uintptr_t>>& addresses,
         const std::vector<int>& element_bytes, const std::vector<int>& coefficient_ids) {
        const size_t n = sizes.size();
        if (addresses.size() != n || element_bytes.size() != n || coefficient_ids.size() != n)
          throw Error(ErrorKind::value, "one address list, dtype size and coefficient id per size");
        std::vector<cuda::PlanTensor> tensors(n);
        for (size_t i = 0; i < n; ++i) {
          if (addresses[i].size() != cuda::kMaxOperands)
            throw Error(ErrorKind::value, "addresses: param, grad and 3 states per tensor");
          for (int k = 0; k < cuda::kMaxOperands; ++k)
            tensors[i].addresses[k] = reinterpret_cast<void*>(addresses[i][k]);
          tensors[i].size = sizes[i];
          tensors[i].element_bytes = element_bytes[i];
          tensors[i].coefficient_id = coefficient_ids[i];
        }
        py::list batches;
        for (const cuda::LaunchBatch& b : cuda::build_launch_plan(tensors)) {
          const cuda::LaunchMetadata& m = b.metadata;
          const int t = m.num_tensors, blocks = m.num_blocks;
          py::list slot_addresses, vectorized;
          for (int slot = 0; slot < t; ++slot) {
            py::list operands;
            for (int k = 0; k < cuda::kMaxOperands; ++k)
              operands.append(reinterpret_cast<uintptr_t>(m.addresses[k][slot]));
            slot_addresses.append(operands);
            vectorized.append(bool(m.flags[slot] & cuda::kVectorized));
          }
          py::dict batch;
          batch["element_bytes"] = b.element_bytes;
          batch["coefficient_ids"] =
              std::vector<int>(b.coefficient_ids, b.coefficient_ids + b.num_coefficient_sets);
          batch["tensor_index"] = std::vector<int32_t>(b.tensor_index, b.tensor_index + t);
          batch["addresses"] = slot_addresses;
          batch["sizes"] = std::vector<int64_t>(m.sizes, m.sizes + t);
          batch["coefficient_set"] = std::vector<int>(m.coefficient_set, m.coefficient_set + t);
          batch["vectorized"] = vectorized;
          batch["block_tensor"] = std::vector<int>(m.block_tensor, m.block_tensor + blocks);
          batch["block_chunk"] = std::vector<int32_t>(m.block_chunk, m.block_chunk + blocks);
          batches.append(batch);
        }
        return batches;
      },
      py::arg("sizes"), py::arg("addresses"), py::arg("element_bytes"), py::arg("coefficient_ids"));
  m.attr("_cuda_plan_limits") =
      py::dict(py::arg("chunk_elements") = cuda::kChunkElements,
               py::arg("max_tensors") = cuda::kMaxTensorsPerLaunch,
               py::arg("max_blocks") = cuda::kMaxBlocksPerLaunch,
               py::arg("max_coefficient_sets") = cuda::kMaxCoefficientSetsPerLaunch,
               py::arg("vector_bytes") = cuda::kVectorBytes);

  // ---- Test hook for the thread pool (hardening branch; carry over as is) ----
  // How many distinct threads ran a parallel_for of `count` items of ~1 ms: tests/test_threads.py
  // checks with it that a forked child has working pool threads.
  m.def("_threads_used_by_parallel_for", &cpu::threads_used_by_parallel_for, py::arg("count"),
        py::call_guard<py::gil_scoped_release>());
}
