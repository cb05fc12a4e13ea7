// The _core extension: NumPy arrays in, taken as they are (never converted, so an in-place update
// lands in the caller's memory), described to the core, which validates and runs them with the
// GIL released. Generic over the registry of algorithm descriptions: every algorithm is reached
// by its name, with its options as values in the order of its fields.
#include <dlfcn.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_set>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/ewma.h"
#include "core/step.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"
#include "cuda/launch_plan.h"
#include "math/dynamic_map.h"
#include "python/arrays.h"
#include "python/launcher.h"

namespace py = pybind11;
using namespace fusedopt;

namespace {

bool native_byte_order(const py::detail::PyArrayDescr_Proxy* descr) {
  const char order = descr->byteorder;
  constexpr char native = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '<' : '>';
  return order == '=' || order == '|' || order == native;
}

// NumPy's float16, and ml_dtypes' bfloat16 (the NumPy bfloat16 of JAX and TensorFlow), a
// user-defined dtype whose number depends on import order: known by its scalar type's name.
std::optional<Dtype> numpy_dtype(const py::detail::PyArrayDescr_Proxy* descr) {
  constexpr int npy_half = 23;  // NPY_HALF, part of NumPy's ABI
  switch (descr->type_num) {
    case py::detail::npy_api::NPY_FLOAT_:
      return Dtype::float32;
    case py::detail::npy_api::NPY_DOUBLE_:
      return Dtype::float64;
    case npy_half:
      return Dtype::float16;
    case py::detail::npy_api::NPY_UBYTE_:  // the codes of an 8-bit blockwise state
      return Dtype::blockwise8;
    default:
      break;
  }
  constexpr int npy_userdef = 256;
  if (descr->type_num >= npy_userdef &&
      std::strcmp(reinterpret_cast<PyTypeObject*>(descr->typeobj)->tp_name, "ml_dtypes.bfloat16") ==
          0)
    return Dtype::bfloat16;
  return std::nullopt;
}

// Fills `info` (reused across steps, so its shape keeps its capacity) from a NumPy array's own
// fields: no reference counting, no allocation in the steady state. A ten-thousand-tensor step
// describes fifty thousand buffers, and this was most of its cost. False for what only the
// Python API can describe: not an array (nothing written), or a dtype fusedopt does not update
// (all written but dtype_name, which a message needs). It calls no Python API (`array_type`,
// NumPy's ndarray type, is looked up by the caller: pybind11's lookup may import NumPy and take
// the GIL) and allocates only a shape's first storage, so it may run on the pool's threads while
// this thread holds the GIL and the caller holds every object.
bool describe_quickly(PyObject* object, BufferInfo& info, PyTypeObject* array_type) {
  info.present = object != Py_None;
  if (!info.present) return true;
  if (Py_TYPE(object) != array_type && !PyType_IsSubtype(Py_TYPE(object), array_type)) return false;
  const auto* array = py::detail::array_proxy(object);
  info.data = array->data;
  info.shape.resize(array->nd);  // element-wise: a memmove call per buffer cost 10% of a step
  for (int d = 0; d < array->nd; ++d) info.shape[d] = array->dimensions[d];
  info.size = 1;
  for (int d = 0; d < array->nd; ++d) info.size *= array->dimensions[d];
  info.contiguous = array->flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_;
  info.writeable = array->flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  info.dtype_name.clear();
  const auto* descr = py::detail::array_descriptor_proxy(array->descr);
  info.dtype = native_byte_order(descr) ? numpy_dtype(descr) : std::nullopt;
  return info.dtype.has_value();  // all but the name of a dtype it does not update
}

void describe(py::handle object, const char* role, size_t index, BufferInfo& info) {
  if (describe_quickly(object.ptr(), info, py::detail::npy_api::get().PyArray_Type_)) return;
  if (!py::isinstance<py::array>(object))
    throw Error(ErrorKind::type, std::string(role) + "[" + std::to_string(index) +
                                     "] must be a numpy.ndarray, got " +
                                     std::string(py::str(py::type::of(object).attr("__name__"))));
  // An array of a dtype fusedopt does not update, described but for that dtype's name, which the
  // core's message gives. Formatting a dtype costs more than the rest: only here.
  const auto* array = py::detail::array_proxy(object.ptr());
  info.dtype_name = py::str(py::handle(array->descr));
  if (!native_byte_order(py::detail::array_descriptor_proxy(array->descr)))
    info.dtype_name += " (non-native byte order)";
}

// References taken or dropped on many objects, each object's header fetched `ahead` items
// before: one at a time, each waited for its cache miss (Adam over 10000 x 100 at 2 threads:
// the grads' tuple, made and freed at every step, took a tenth of the step on the thread that
// holds the GIL, and the functional API's 30000 params and states three times that).
constexpr size_t kReferenceAhead = 16;
inline void incref_all(PyObject* const* objects, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (i + kReferenceAhead < n) __builtin_prefetch(objects[i + kReferenceAhead], 1);
    Py_INCREF(objects[i]);
  }
}
// Drops the references in order, each slot emptied first: a last reference frees its object,
// whose deallocation may run code that looks at the slots.
inline void decref_all(PyObject** objects, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (i + kReferenceAhead < n && objects[i + kReferenceAhead])
      __builtin_prefetch(objects[i + kReferenceAhead], 1);
    PyObject* object = objects[i];
    objects[i] = nullptr;
    Py_XDECREF(object);
  }
}

// The items of a list or tuple as a tuple (a tuple itself: its items cannot change): it holds a
// reference to every array for as long as the caller keeps it, so another thread replacing a
// list item cannot free an array that a step, with the GIL released, is reading.
py::tuple items_of(py::handle sequence, const char* role) {
  PyObject* const object = sequence.ptr();
  if (PyTuple_CheckExact(object)) return py::reinterpret_borrow<py::tuple>(sequence);
  if (!PyList_Check(object) && !PyTuple_Check(object))
    throw Error(ErrorKind::type, std::string(role) + " must be a list or tuple of numpy arrays");
  if (!PyList_CheckExact(object))  // a subclass: through its own methods
    return py::reinterpret_steal<py::tuple>(PySequence_Tuple(object));
  while (true) {
    const Py_ssize_t n = PyList_GET_SIZE(object);
    // Allocating may collect garbage, whose finalizers (or a thread taking the GIL then) may
    // change the list: its size is read again once the tuple exists, and nothing runs from there.
    py::tuple items(n);
    if (PyList_GET_SIZE(object) != n) continue;
    PyObject** slots = &PyTuple_GET_ITEM(items.ptr(), 0);
    for (Py_ssize_t i = 0; i < n; ++i) slots[i] = PyList_GET_ITEM(object, i);
    incref_all(slots, static_cast<size_t>(n));
    return items;
  }
}

// Drops the references of a tuple that items_of made, when nothing else holds it, the cache
// misses overlapped (decref_all): at the end of a step, where tupledealloc would drop them one
// miss at a time.
class ItemsReleased {
 public:
  explicit ItemsReleased(py::tuple& items) : items_(items) {}
  ~ItemsReleased() {
    PyObject* const tuple = items_.ptr();
    if (!tuple || Py_REFCNT(tuple) != 1) return;
    // Out of the collector's sight first, as tupledealloc does: a finalizer run by a dropped
    // reference must not find the tuple (gc.get_referrers) with its slots emptied.
    PyObject_GC_UnTrack(tuple);
    decref_all(&PyTuple_GET_ITEM(tuple, 0), static_cast<size_t>(PyTuple_GET_SIZE(tuple)));
  }
  ItemsReleased(const ItemsReleased&) = delete;
  ItemsReleased& operator=(const ItemsReleased&) = delete;

 private:
  py::tuple& items_;
};

// References held in a vector that a caller keeps from one use to the next (`spare`), dropped
// together (decref_all) at the end, the GIL held throughout. Lent out, `spare` is empty, so a
// nested use (Python code run meanwhile that steps again) gets a vector of its own. A step over
// 10000 tensors that reserved room for their grads anew made a large allocation, for which glibc
// first consolidates every small block freed since (the last step's grads among them): 1.0-1.2
// ms of a 9.6 ms fusedopt.torch step (Adam, 10000 x 100, 2 threads).
class LentReferences {
 public:
  explicit LentReferences(std::vector<PyObject*>& spare) : spare_(spare) { objects_.swap(spare); }
  ~LentReferences() {
    clear();
    if (objects_.capacity() > spare_.capacity()) spare_.swap(objects_);
  }
  LentReferences(const LentReferences&) = delete;
  LentReferences& operator=(const LentReferences&) = delete;

  void push_back(py::object object) {
    objects_.push_back(nullptr);  // room first: a failed allocation drops the reference
    objects_.back() = object.release().ptr();
  }
  void clear() {
    decref_all(objects_.data(), objects_.size());
    objects_.clear();
  }
  PyObject* operator[](size_t i) const { return objects_[i]; }

 private:
  std::vector<PyObject*>& spare_;
  std::vector<PyObject*> objects_;
};

// Array objects lie wherever NumPy put them, their shapes in blocks of their own: a loop over
// many reads each object after fetching it `far` items ahead, and its shape, whose address is in
// the object (arrived by then), `near` ahead, so that neither miss waits on the other (Adam over
// 10000 x 100, 1 thread: the registered arrays' checks from 0.49 to 0.38 of the kernels' time).
// `object_at(i)`: item i's object; the shape is read only from an object of type `array_type`.
template <class ObjectAt>
__attribute__((always_inline)) inline void fetch_arrays_ahead(size_t i, size_t end,
                                                              PyTypeObject* array_type,
                                                              ObjectAt object_at) {
  constexpr size_t far = 16, near = 8;
  if (i + far < end) {
    const char* next = reinterpret_cast<const char*>(object_at(i + far));
    __builtin_prefetch(next);
    __builtin_prefetch(next + 64);  // the flags, past the first line of a PyArrayObject
  }
  if (i + near < end) {
    PyObject* object = object_at(i + near);
    if (Py_TYPE(object) == array_type)
      __builtin_prefetch(py::detail::array_proxy(object)->dimensions);
  }
}

// Many items are described on the pool's threads, a slice each; anything describe_quickly
// cannot describe sends every item through describe, in order, so a message names the first.
void describe_items(const py::tuple& items, const char* role, std::vector<BufferInfo>& infos) {
  infos.resize(items.size());
  PyObject* const* objects = &PyTuple_GET_ITEM(items.ptr(), 0);
  // Looked up here, on the thread that holds the GIL: the first lookup imports NumPy, releasing
  // and taking the GIL, which a pool thread must never do (it crashed the first functional call
  // over 3000 arrays).
  PyTypeObject* const array_type = py::detail::npy_api::get().PyArray_Type_;
  const bool described = cpu::all_slices(items.size(), kCheckSlice, [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      fetch_arrays_ahead(i, end, array_type, [&](size_t k) { return objects[k]; });
      if (!describe_quickly(objects[i], infos[i], array_type)) return false;
    }
    return true;
  });
  if (!described)
    for (size_t i = 0; i < items.size(); ++i) describe(items[i], role, i, infos[i]);
}

// Options from their values in the order of the algorithm's fields (bools and the convention as
// numbers): the Python layer has already checked their types and spelled their names.
template <class A>
typename A::Options options_from(py::handle values) {
  const py::tuple items = items_of(values, "options");
  constexpr size_t count = std::size(A::fields);
  if (items.size() != count)
    throw Error(ErrorKind::value, std::string(A::name) + " takes " + std::to_string(count) +
                                      " option values, got " + std::to_string(items.size()));
  typename A::Options o;
  for (size_t i = 0; i < count; ++i) {
    const Field<typename A::Options>& field = A::fields[i];
    const double value = PyFloat_AsDouble(items[i].ptr());
    if (value == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      throw Error(ErrorKind::type, std::string(field.name) + " must be a number");
    }
    if (field.number) {
      o.*field.number = value;
    } else if (field.flag) {
      o.*field.flag = value != 0;
    } else {
      if (value != 0 && value != 1)
        throw Error(ErrorKind::value, "convention must be 0 (torch) or 1 (keras)");
      o.*field.convention = static_cast<Convention>(static_cast<int>(value));
    }
  }
  return o;
}

template <class A>
std::vector<typename A::Options> groups_from(py::handle groups) {
  std::vector<typename A::Options> result;
  for (py::handle g : items_of(groups, "groups")) result.push_back(options_from<A>(g));
  return result;
}

using IndexArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

std::vector<uint8_t> flags_from(py::handle object, size_t count) {
  std::vector<uint8_t> flags;
  if (object.is_none()) return flags;
  for (py::handle f : items_of(object, "new_state")) flags.push_back(py::cast<bool>(f));
  if (flags.size() != count) throw Error(ErrorKind::value, "new_state: one flag per param");
  return flags;
}

std::optional<double> grad_scale_from(py::handle object) {
  if (object.is_none()) return std::nullopt;
  const double value = PyFloat_AsDouble(object.ptr());
  if (value == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw Error(ErrorKind::type, "grad_scale must be a number");
  }
  return value;
}

// The params and states of a step as the core's StepBuffers; the tuples keep every array alive.
// `suffix` follows each state's name in messages ("s": the functional API's argument names).
template <class A>
StepBuffers& describe_registered(const py::tuple& params, const py::tuple& state_lists,
                                 std::vector<py::tuple>& kept, StepBuffers& b,
                                 const char* suffix = "") {
  describe_items(params, "params", b.params);
  if (state_lists.size() != A::state_names.size())
    throw Error(ErrorKind::value, std::string(A::name) + " takes " +
                                      std::to_string(A::state_names.size()) +
                                      " state lists (None for a state no tensor keeps)");
  b.states.resize(A::state_names.size());
  b.state_names.clear();
  for (const char* name : A::state_names) b.state_names.push_back(std::string(name) + suffix);
  for (size_t k = 0; k < A::state_names.size(); ++k) {
    if (state_lists[k].is_none()) {
      b.states[k].clear();
      continue;
    }
    kept.push_back(items_of(state_lists[k], b.state_names[k].c_str()));
    describe_items(kept.back(), b.state_names[k].c_str(), b.states[k]);
  }
  return b;
}

// The per-block scales of 8-bit states: None, or one list per state of the algorithm (None for a
// state no tensor keeps in 8 bits; None items where a tensor's state is not 8-bit). Calls
// describe(k, j, item, info) for item j of state k's list, into b.absmax[k][j].
template <class A, class Describe>
void describe_absmax(py::handle lists, StepBuffers& b, Describe&& describe) {
  b.absmax.clear();
  if (lists.is_none()) return;
  const py::tuple items = items_of(lists, "absmax");
  if (items.size() != A::state_names.size())
    throw Error(ErrorKind::value, "absmax: one list (or None) per state of the algorithm");
  b.absmax.resize(items.size());
  for (size_t k = 0; k < items.size(); ++k) {
    if (items[k].is_none()) continue;
    const py::tuple list = items_of(items[k], "absmax");
    b.absmax[k].resize(list.size());
    for (size_t j = 0; j < list.size(); ++j) describe(k, j, list, b.absmax[k][j]);
  }
}

// For NumPy arrays; `kept` holds the lists while the step runs.
template <class A>
void describe_absmax(py::handle lists, std::vector<py::tuple>& kept, StepBuffers& b) {
  describe_absmax<A>(lists, b, [&](size_t k, size_t j, const py::tuple& list, BufferInfo& info) {
    if (j == 0) kept.push_back(list);
    describe(list[j], (b.state_names[k] + "_absmax").c_str(), j, info);
  });
}

// ---- Plans: the params and states registered once ------------------------------------------

// What can change about an array after it was registered without it being replaced: its data
// (ndarray.resize), shape, flags (writeable) or dtype. Compared field by field at every step,
// which costs a few loads per array; a difference re-registers everything.
struct Fingerprint {
  PyObject* object;
  void* data;
  PyObject* descr;
  int flags;
  int nd;
  // The shape kept inline up to four dimensions: a vector per buffer put one more cache miss in
  // every check (30,000 buffers for Adam over 10,000 tensors, each step).
  std::array<int64_t, 4> dims;
  std::vector<int64_t> more_dims;

  static Fingerprint of(PyObject* object) {
    Fingerprint f{object, nullptr, nullptr, 0, 0, {}, {}};
    if (object == Py_None) return f;
    const auto* array = py::detail::array_proxy(object);
    f.data = array->data;
    f.flags = array->flags;
    f.descr = array->descr;
    f.nd = array->nd;
    for (int d = 0; d < array->nd; ++d)
      (d < 4 ? f.dims[d] : f.more_dims.emplace_back()) = array->dimensions[d];
    return f;
  }

  // `object` must be alive. It may be a new object at the registered one's address (a borrowed
  // plan compares its lists' items by address): it passes only as an array describing the
  // registered memory, which is then what the plan was checked for.
  bool unchanged(PyTypeObject* array_type) const {
    if (object == Py_None) return true;
    if (!PyObject_TypeCheck(object, array_type)) return false;
    const auto* array = py::detail::array_proxy(object);
    if (array->data != data || array->flags != flags || array->descr != descr || array->nd != nd)
      return false;
    for (int d = 0; d < nd; ++d)
      if (array->dimensions[d] != (d < 4 ? dims[d] : more_dims[d - 4])) return false;
    return true;
  }
};

// Whether fingerprints [begin, end) are as registered (see fetch_arrays_ahead).
bool all_unchanged(const Fingerprint* fingerprints, size_t begin, size_t end,
                   PyTypeObject* array_type) {
  for (size_t i = begin; i < end; ++i) {
    fetch_arrays_ahead(i, end, array_type, [&](size_t k) { return fingerprints[k].object; });
    if (!fingerprints[i].unchanged(array_type)) return false;
  }
  return true;
}

// Whether every registered array is as it was registered. Many arrays are compared on the pool's
// threads, a slice each: the comparisons only read the arrays' fields, which nothing changes
// without the GIL this thread holds, and every array is kept alive by the plan.
bool all_unchanged(const std::vector<Fingerprint>& fingerprints) {
  PyTypeObject* const array_type = py::detail::npy_api::get().PyArray_Type_;  // see describe_items
  return cpu::all_slices(fingerprints.size(), 2048, [&](size_t begin, size_t end) {
    return all_unchanged(fingerprints.data(), begin, end, array_type);
  });
}

// Whether every group dict of the list `groups` holds, by identity, the values its tuple in
// `expected` lists for `keys` ((params, lr, ...) for ("params", "lr", ...)): an optimizer's
// step at the hyperparameters its plan was last given, told in one call. Only a plain list of
// plain dicts whose keys are all plain strings: a subclass's own methods would be bypassed, and
// looking a key up among other keys may run their __eq__, user code that could change the
// optimizer (reset it, replace its plan) while it is being checked.
bool groups_hold(py::handle groups, py::handle keys, py::handle expected) {
  if (!PyList_CheckExact(groups.ptr()) || !PyTuple_CheckExact(keys.ptr()) ||
      !PyTuple_CheckExact(expected.ptr()))
    return false;
  const Py_ssize_t count = PyList_GET_SIZE(groups.ptr());
  if (count != PyTuple_GET_SIZE(expected.ptr())) return false;
  const Py_ssize_t key_count = PyTuple_GET_SIZE(keys.ptr());
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* group = PyList_GET_ITEM(groups.ptr(), i);
    PyObject* values = PyTuple_GET_ITEM(expected.ptr(), i);
    if (!PyDict_CheckExact(group) || !PyTuple_CheckExact(values) ||
        PyTuple_GET_SIZE(values) != key_count)
      return false;
    Py_ssize_t position = 0;
    PyObject* key = nullptr;
    while (PyDict_Next(group, &position, &key, nullptr))
      if (!PyUnicode_CheckExact(key)) return false;
    for (Py_ssize_t k = 0; k < key_count; ++k) {
      PyObject* key_k = PyTuple_GET_ITEM(keys.ptr(), k);
      if (!PyUnicode_CheckExact(key_k)) return false;
      PyObject* value = PyDict_GetItemWithError(group, key_k);
      if (value == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if (value != PyTuple_GET_ITEM(values, k)) return false;
    }
  }
  return true;
}

class AnyPlan {
 public:
  virtual ~AnyPlan() = default;
  virtual void set_options(size_t group, py::handle values) = 0;
  virtual void step(py::handle grads, py::handle grad_scale, std::optional<int64_t> step) = 0;
  virtual bool step_if_same(py::handle params, py::handle states, py::handle grads,
                            py::handle grad_scale, std::optional<int64_t> step, py::handle values,
                            py::handle masters) = 0;
  virtual size_t size() const = 0;
};

// A new reference to each of `n` objects for as long as it lives: what a step over arrays the
// plan does not own holds while it runs with the GIL released, so that another thread dropping
// the caller's last reference (replacing a list item) cannot free memory the step reads or
// writes. Counted on this thread, which holds the GIL: an object may be listed twice (a zero-size
// array passes the overlap checks), so counting on the pool's threads lost updates. Each count is
// a cache miss (Adam over 10,000 tensors: about 200 us a call). The pointers are copied into
// `spare`'s storage, lent for the hold as LentReferences does, so that a step does not allocate
// room for them anew (30000 pointers, beyond glibc's threshold for a mapping of its own).
class Held {
 public:
  Held(PyObject* const* objects, size_t n, std::vector<PyObject*>& spare) : spare_(spare) {
    objects_.swap(spare);
    objects_.assign(objects, objects + n);
    incref_all(objects_.data(), n);
  }
  ~Held() {
    decref_all(objects_.data(), objects_.size());
    objects_.clear();
    if (objects_.capacity() > spare_.capacity()) spare_.swap(objects_);
  }
  Held(const Held&) = delete;
  Held& operator=(const Held&) = delete;

 private:
  std::vector<PyObject*>& spare_;
  std::vector<PyObject*> objects_;
};

template <class A>
class PythonPlan : public AnyPlan {
 public:
  // `borrowed`: the plan keeps only weak references to the arrays and steps the lists' items that
  // are the registered objects (step_if_same), or the live referents of its weak references
  // (step), so that a cache of plans never keeps arrays alive.
  // `masters`: None, or one float32 master copy per param (None for a param without one);
  // `rounding_seed`: set, 16-bit params and states are rounded stochastically.
  PythonPlan(py::handle groups, py::handle group_of, py::handle params, py::handle states,
             py::handle step_counts, py::handle new_state, py::handle scalars, bool borrowed,
             py::handle masters, std::optional<uint64_t> rounding_seed, py::handle absmax)
      : groups_(groups_from<A>(groups)),
        group_of_(py::cast<std::vector<int>>(group_of)),
        new_state_(flags_from(new_state, group_of_.size())),
        rounding_seed_(rounding_seed),
        absmax_(absmax.is_none() ? py::object(py::none())
                                 : py::object(py::tuple(items_of(absmax, "absmax")))) {
    if (!masters.is_none())
      for (py::handle m : items_of(masters, "masters")) masters_.push_back(m.ptr());
    if (!absmax_.is_none())
      for (py::handle list : absmax_)
        if (!list.is_none())
          for (py::handle a : items_of(list, "absmax")) absmax_arrays_.push_back(a.ptr());
    const py::tuple param_items = items_of(params, "params");
    for (py::handle p : param_items) params_.push_back(p.ptr());
    for (py::handle list : items_of(states, "states")) {
      if (list.is_none()) {
        states_.emplace_back();
        continue;
      }
      std::vector<PyObject*> items;
      for (py::handle s : items_of(list, "states")) items.push_back(s.ptr());
      states_.push_back(std::move(items));
    }
    const auto n = static_cast<py::ssize_t>(params_.size());
    step_counts_ = writeable_array<int64_t>(step_counts, "step_counts", n);
    scalars_ = writeable_array<double>(scalars, "scalars", n * kMaxScalars);
    if (borrowed && (!step_counts.is_none() || !scalars.is_none()))
      throw Error(ErrorKind::value, "a borrowed plan keeps no step counts or scalars");
    borrowed_ = borrowed;
    // Checked first, so that anything that is not an array is refused naming it (and a borrowed
    // plan's weak references below are made only to arrays).
    register_buffers();
    std::vector<PyObject*>& arrays = objects_;
    arrays = params_;
    for (const auto& list : states_)
      for (PyObject* s : list.value_or(std::vector<PyObject*>{})) arrays.push_back(s);
    arrays.insert(arrays.end(), masters_.begin(), masters_.end());
    arrays.insert(arrays.end(), absmax_arrays_.begin(), absmax_arrays_.end());
    for (PyObject* a : arrays) {
      if (!borrowed || a == Py_None) {
        references_.push_back(py::reinterpret_borrow<py::object>(a));
        continue;
      }
      PyObject* reference = PyWeakref_NewRef(a, nullptr);
      if (!reference) throw py::error_already_set();
      references_.push_back(py::reinterpret_steal<py::object>(reference));
    }
    if (!borrowed) {
      references_.push_back(py::reinterpret_borrow<py::object>(step_counts));
      references_.push_back(py::reinterpret_borrow<py::object>(scalars));
    }
  }

  // For a borrowed plan: a step, when the items of `params` and `states` are, one by one, the
  // objects it registered, with new options for group 0 first unless `values` is None; false, and
  // nothing done, otherwise. Compared by address: an item is alive (its list holds it, and this
  // thread the GIL), while a registered array may have died and a new object been made at its
  // address. The fingerprints, checked before the step, pass such a one only as an array of the
  // registered memory, shape, dtype and flags: the buffer the plan was made for (else the plan
  // registers the items anew). Comparing weak references' referents instead read every weak
  // reference, a cache miss each (Adam over 10000 x 100: 0.25 of a 1.85 ms step).
  bool step_if_same(py::handle params, py::handle states, py::handle grads, py::handle grad_scale,
                    std::optional<int64_t> step, py::handle values, py::handle masters) override {
    if (!borrowed_) throw Error(ErrorKind::value, "step_if_same is for borrowed plans");
    const cpu::StayAwake awake(registered_->plan.uses_pool());
    size_t compared = 0;
    auto same = [&](py::handle list) {
      if (!PyList_Check(list.ptr())) return false;
      const Py_ssize_t n = PyList_GET_SIZE(list.ptr());
      if (static_cast<size_t>(n) > objects_.size() - compared) return false;
      PyObject* const* registered = objects_.data() + compared;
      for (Py_ssize_t i = 0; i < n; ++i)
        if (PyList_GET_ITEM(list.ptr(), i) != registered[i]) return false;
      compared += static_cast<size_t>(n);
      return true;
    };
    if (!same(params) || !PyTuple_Check(states.ptr()) && !PyList_Check(states.ptr())) return false;
    const py::sequence lists = py::reinterpret_borrow<py::sequence>(states);
    if (lists.size() != states_.size()) return false;
    for (size_t i = 0; i < states_.size(); ++i) {
      if (lists[i].is_none() != !states_[i].has_value()) return false;
      if (!lists[i].is_none() && !same(lists[i])) return false;
    }
    if (!masters_.empty() && !same(masters)) return false;
    if (compared != objects_.size()) return false;
    // The lists' items, the registered objects: held from here, before set_options (which may
    // run Python code, a number's __float__, even one that empties the lists) and across the
    // step, which releases the GIL.
    thread_local std::vector<PyObject*> spare;
    const Held held(objects_.data(), objects_.size(), spare);
    if (!values.is_none()) set_options(0, values);
    step_held(grads, grad_scale, step);
    return true;
  }

  void set_options(size_t group, py::handle values) override {
    const typename A::Options o = options_from<A>(values);
    registered_->plan.set_options(group, o);
    groups_[group] = o;
  }

  void step(py::handle grads, py::handle grad_scale, std::optional<int64_t> step) override {
    if (!borrowed_) return step_held(grads, grad_scale, step);  // references_ holds every array
    // A borrowed plan's arrays, held for the call (the functional API's first call steps its new
    // plan at once: another thread may have emptied the caller's lists since it was made). Taken
    // before the fingerprints are compared, which reads every array.
    std::vector<PyObject*> referents;
    referents.reserve(references_.size());
    for (const py::object& reference : references_) {
      if (reference.is_none()) continue;  // a None item, registered as itself
      PyObject* referent = reinterpret_cast<PyWeakReference*>(reference.ptr())->wr_object;
      if (referent == Py_None)  // what a dead referent's weak reference holds
        throw Error(ErrorKind::value,
                    "an array this borrowed plan registered no longer exists: another thread "
                    "dropped it from the lists since the plan was made");
      referents.push_back(referent);
    }
    thread_local std::vector<PyObject*> spare;
    const Held held(referents.data(), referents.size(), spare);
    step_held(grads, grad_scale, step);
  }

  size_t size() const override { return params_.size(); }

 private:
  struct Registered {
    Plan<A> plan;
    std::vector<Fingerprint> fingerprints;
    // The fingerprints' dtypes (each once), held: the fingerprints compare an array's dtype by
    // address, and a dtype that died (a registered array's own, made with metadata or by
    // unpickling, gone with it) could be followed at its address by another, of another type,
    // which a new array at the registered one's address (see step_if_same) would then pass as.
    std::vector<py::object> dtypes;
  };

  // A step, the caller holding a reference to every registered array (references_ does for a plan
  // that is not borrowed).
  void step_held(py::handle grads, py::handle grad_scale, std::optional<int64_t> step) {
    // First: a grad scale's __float__ is code that may step this plan again (refilling this
    // thread's infos below) or change its arrays after they were checked.
    const StepExtras extras{grad_scale_from(grad_scale), rounding_seed_};
    const cpu::StayAwake awake(registered_->plan.uses_pool());
    py::tuple items = items_of(grads, "grads");
    const ItemsReleased released(items);
    if (!all_unchanged(registered_->fingerprints)) register_buffers();
    thread_local std::vector<BufferInfo> infos;
    describe_items(items, "grads", infos);
    // This frame keeps the grads (items) alive while the GIL is released, and the plan, even if
    // another thread re-registers meanwhile; the registered arrays are kept by references_ or,
    // for a borrowed plan, by the caller (step, step_if_same).
    const std::shared_ptr<Registered> registered = registered_;
    {
      py::gil_scoped_release release;
      registered->plan.step(infos, extras, step);
    }
    std::fill(new_state_.begin(), new_state_.end(), 0);
  }

  void register_buffers() {
    StepBuffers b;
    std::vector<py::tuple> kept;
    py::tuple params(params_.size());
    for (size_t i = 0; i < params_.size(); ++i)
      params[i] = py::reinterpret_borrow<py::object>(params_[i]);
    py::list states;
    for (const auto& list : states_) {
      if (!list) {
        states.append(py::none());
        continue;
      }
      py::list items;
      for (PyObject* s : *list) items.append(py::reinterpret_borrow<py::object>(s));
      states.append(items);
    }
    // A borrowed plan serves the functional API: messages name its arguments (exp_avgs[2]).
    describe_registered<A>(params, py::tuple(states), kept, b, borrowed_ ? "s" : "");
    py::tuple masters(masters_.size());
    for (size_t i = 0; i < masters_.size(); ++i)
      masters[i] = py::reinterpret_borrow<py::object>(masters_[i]);
    describe_items(masters, "masters", b.masters);
    describe_absmax<A>(absmax_, kept, b);
    // Built in place: a Plan holds a mutex and cannot move.
    std::shared_ptr<Registered> registered(
        new Registered{Plan<A>(groups_, b, group_of_, step_counts_, new_state_, scalars_), {}});
    for (PyObject* p : params_) registered->fingerprints.push_back(Fingerprint::of(p));
    for (const auto& list : states_)
      for (PyObject* s : list.value_or(std::vector<PyObject*>{}))
        registered->fingerprints.push_back(Fingerprint::of(s));
    for (PyObject* m : masters_) registered->fingerprints.push_back(Fingerprint::of(m));
    for (PyObject* a : absmax_arrays_) registered->fingerprints.push_back(Fingerprint::of(a));
    std::unordered_set<PyObject*> dtypes;
    for (const Fingerprint& f : registered->fingerprints)
      if (f.descr && dtypes.insert(f.descr).second)
        registered->dtypes.push_back(py::reinterpret_borrow<py::object>(f.descr));
    registered_ = std::move(registered);
  }

  std::vector<typename A::Options> groups_;
  std::vector<int> group_of_;
  std::vector<uint8_t> new_state_;
  std::vector<PyObject*> params_;
  std::vector<std::optional<std::vector<PyObject*>>> states_;
  std::vector<PyObject*> masters_;  // empty, or one per param (Py_None where there is none)
  std::optional<uint64_t> rounding_seed_;
  py::object absmax_;                     // the lists of 8-bit states' scales, or None
  std::vector<PyObject*> absmax_arrays_;  // their items, in order
  // Every array above (and the step counts' and scalars'); only weak references when borrowed.
  std::vector<py::object> references_;
  // The arrays of references_ in its order (params, each state list, masters, absmax), by address.
  std::vector<PyObject*> objects_;
  bool borrowed_ = false;
  int64_t* step_counts_ = nullptr;
  double* scalars_ = nullptr;
  std::shared_ptr<Registered> registered_;
};

// ---- torch tensors ---------------------------------------------------------------------------
// fusedopt.torch steps CPU tensors in their own memory. They are described through their Python
// methods (data_ptr, is_contiguous, ...): nothing of libtorch is linked, so fusedopt builds and
// imports without torch.

// A complex64 or complex128 tensor is stepped as torch.optim steps one (torch.view_as_real): each
// element as two independent real numbers, its real and imaginary parts, of float32 or float64.
// Described by its own shape, so that the shape checks and messages speak of its elements, with
// twice as many values as elements: the core compares shapes and sizes and streams `size` values
// of its dtype from the tensor's memory, where each element's two parts lie side by side.
inline void as_real_pairs(BufferInfo& info) { info.size *= 2; }

struct TorchNames {
  py::object grad = py::str("grad"), dtype = py::str("dtype"), shape = py::str("shape"),
             is_cpu = py::str("is_cpu"), layout = py::str("layout"), to_local = py::str("to_local");
  // The methods themselves, called with the tensor: a step makes four such calls per tensor
  // (about 45 ns each), and skipping the attribute lookup is a third of it.
  py::object data_ptr, is_contiguous, stride, empty_like, is_neg, is_conj;
  // TensorBase's descriptors of the properties a step reads of every grad, read through the
  // descriptor (read_property) for the same reason.
  py::object dtype_property, shape_property, is_cpu_property, grad_property;
  py::object float32, float64, bfloat16, float16, uint8, complex64, complex128, strided;

  static const TorchNames& get() {
    static const TorchNames* names = [] {
      auto* n = new TorchNames;  // leaked on purpose: destroyed after Python at exit otherwise
      const py::module_ torch = py::module_::import("torch");
      const py::object tensor_base = torch.attr("_C").attr("TensorBase");
      n->data_ptr = tensor_base.attr("data_ptr");
      n->is_contiguous = tensor_base.attr("is_contiguous");
      n->stride = tensor_base.attr("stride");
      n->empty_like = torch.attr("empty_like");
      n->is_neg = tensor_base.attr("is_neg");
      n->is_conj = tensor_base.attr("is_conj");
      const py::dict properties = tensor_base.attr("__dict__");
      n->dtype_property = properties["dtype"];
      n->shape_property = properties["shape"];
      n->is_cpu_property = properties["is_cpu"];
      n->grad_property = properties["grad"];
      n->float32 = torch.attr("float32");
      n->float64 = torch.attr("float64");
      n->bfloat16 = torch.attr("bfloat16");
      n->float16 = torch.attr("float16");
      n->uint8 = torch.attr("uint8");
      n->complex64 = torch.attr("complex64");
      n->complex128 = torch.attr("complex128");
      n->strided = torch.attr("strided");
      return n;
    }();
    return *names;
  }
};

py::object call_with(const py::object& method, PyObject* tensor) {
  PyObject* result = PyObject_CallOneArg(method.ptr(), tensor);
  if (!result) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(result);
}

// Whether a tensor is one of torch's lazy views: a negative view (`torch._neg_view`, `.imag` of a
// conjugate view) or a conjugate one (`.conj()` of a complex tensor), whose memory holds its
// elements negated or conjugated, torch applying the sign on every read and write. The kernels
// read and write memory: such a grad is read through a copy that holds its values, and such a
// param or state, which is written, is refused (it would be updated with the sign reversed).
bool torch_is_lazy(PyObject* tensor) {
  const TorchNames& n = TorchNames::get();
  return call_with(n.is_neg, tensor).ptr() == Py_True ||
         call_with(n.is_conj, tensor).ptr() == Py_True;
}

std::string lazy_text(const std::string& name) {
  return name +
         " is a negative or conjugate view (torch's lazy sign: `torch._neg_view`, `.imag` "
         "of a conjugate view, `.conj()` of a complex tensor), whose memory holds its "
         "elements negated or conjugated; fusedopt updates memory: resolve it first "
         "(`.resolve_neg()`, `.resolve_conj()`)";
}

// tensor.<property>, given TensorBase's descriptor of it.
py::object read_property(const py::object& property, PyObject* tensor) {
  PyObject* result =
      Py_TYPE(property.ptr())
          ->tp_descr_get(property.ptr(), tensor, reinterpret_cast<PyObject*>(Py_TYPE(tensor)));
  if (!result) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(result);
}

uintptr_t torch_data_ptr(PyObject* tensor) {
  return PyLong_AsUnsignedLongLong(call_with(TorchNames::get().data_ptr, tensor).ptr());
}

// An empty tensor may have no memory at all (data_ptr 0); it is never read, and any address
// stands in for it, as for the empty buffers of the C ABI.
char empty_tensor_address;

void* torch_address(uintptr_t data_ptr) {
  return data_ptr ? reinterpret_cast<void*>(data_ptr) : &empty_tensor_address;
}

// A tensor's metadata read without a Python call, for the per-step checks of fusedopt.torch.
// Those checks made about ten Python calls per param (data_ptr, stride, dtype, shape, ...):
// Adam over 10000 tensors of 100 elements spent 15 of its 18 ms per step there. libtorch exports
// AOTInductor's C shim (aoti_torch_get_data_ptr, _get_strides, ...: C functions over an
// at::Tensor*, which torch keeps ABI-stable for compiled models), and a torch tensor's Python
// object holds its at::Tensor right after its PyObject header (THPVariable). Neither is linked:
// the functions are looked up in the libtorch torch has loaded, and the header's layout is
// confirmed against the tensor's own `_cdata` (its TensorImpl's address) and the shim's answers
// for a probe tensor. Anything missing or different leaves the fast path off, and every step takes
// the Python calls, as before.
bool dense(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides);

struct TorchShim {
  using Handle = void*;  // an at::Tensor*
  int32_t (*data_ptr)(Handle, void**) = nullptr;
  int32_t (*dim)(Handle, int64_t*) = nullptr;
  int32_t (*sizes)(Handle, int64_t**) = nullptr;
  int32_t (*strides)(Handle, int64_t**) = nullptr;
  int32_t (*dtype)(Handle, int32_t*) = nullptr;
  int32_t (*device_type)(Handle, int32_t*) = nullptr;
  int32_t (*layout)(Handle, int32_t*) = nullptr;
  int32_t (*device_index)(Handle, int32_t*) = nullptr;
  int32_t cpu = -1, cuda = -1, strided = -1;
  // Where a plan's tensors must be: the CPU (index -1), or one CUDA device.
  struct Place {
    int32_t type, index;
  };
  Place cpu_place() const { return {cpu, -1}; }
  // Where a TensorImpl holds its StorageImpl's address, for fetch_ahead only; -1: not fetched.
  int storage_at = -1;
  // Where a TensorImpl holds its DispatchKeySet, and the keys of torch's lazy views in it (see
  // torch_is_lazy), found when the shim loads (key_set_offset): without them, no shim.
  int keys_at = -1;
  uint64_t lazy_keys = 0;
  int32_t dtype_codes[kNumDtypes] = {};  // torch's code of each Dtype (blockwise8: uint8)
  // torch's codes of complex64 and complex128, stepped as float32 and float64 pairs
  // (as_real_pairs); kNoCode where this torch's shim has none.
  static constexpr int32_t kNoCode = std::numeric_limits<int32_t>::min();
  int32_t complex_codes[2] = {kNoCode, kNoCode};
  PyTypeObject* tensor_base = nullptr;
  // torch.Tensor and nn.Parameter: the shim reads params of these classes and grads of the
  // first only. A subclass may define its own grad, __getattribute__ or __torch_function__
  // (which torch's Python methods honour): those are read through torch.
  PyTypeObject* tensor_type = nullptr;
  PyTypeObject* parameter_type = nullptr;
  static constexpr size_t kTensorOffset = sizeof(PyObject);  // THPVariable's cdata

  // The shim, or nullptr where it cannot be used (no torch, another build, FUSEDOPT_TORCH_SHIM=0).
  // Called with the GIL held. Not a function-local static: load() calls torch, which may let
  // another thread take the GIL, and that thread would wait on the static's guard holding the
  // GIL (a deadlock, 11 of 20 runs of two threads making their first plans at once). Two threads
  // may load at once; the first to finish is kept.
  static const TorchShim* get() {
    static const TorchShim* shim = nullptr;
    static bool loaded = false;
    if (!loaded && enabled()) {
      auto* s = new TorchShim;  // leaked on purpose, as TorchNames
      const bool usable = s->load();
      if (!loaded) {
        shim = usable ? s : nullptr;
        loaded = true;
      }
      if (shim != s) delete s;
    }
    return enabled() ? shim : nullptr;
  }
  static bool& enabled() {  // the tests step with it and without it
    static bool on = [] {
      const char* v = std::getenv("FUSEDOPT_TORCH_SHIM");
      return !(v && std::string(v) == "0");
    }();
    return on;
  }

  // The at::Tensor of a torch tensor's Python object, or nullptr for anything else.
  Handle handle(PyObject* object) const {
    if (!PyObject_TypeCheck(object, tensor_base)) return nullptr;
    return reinterpret_cast<char*>(object) + kTensorOffset;
  }
  // A loop over many tensors fetches each one's objects ahead, as fetch_arrays_ahead does an
  // array's, in three stages so that no miss waits on the one before it: item k + 16's Python
  // object (`object_at`: its address, not read), k + 8's TensorImpl, which every shim call reads
  // (its address is in the object; `handle_at`: the item's handle, or null), and k + 4's
  // StorageImpl, which data_ptr reads (its address is in the TensorImpl, at `storage_at`).
  template <class ObjectAt, class HandleAt>
  void fetch_ahead(size_t k, size_t n, ObjectAt object_at, HandleAt handle_at) const {
    if (k + 16 < n) __builtin_prefetch(object_at(k + 16));
    if (k + 8 < n)
      if (const Handle h = handle_at(k + 8)) {
        const char* impl = *static_cast<const char* const*>(h);
        for (int line = 0; line < 4; ++line) __builtin_prefetch(impl + 64 * line);
      }
    if (k + 4 < n && storage_at >= 0)
      if (const Handle h = handle_at(k + 4)) {
        const char* impl = *static_cast<const char* const*>(h);
        const char* storage;
        std::memcpy(&storage, impl + storage_at, sizeof storage);
        __builtin_prefetch(storage);
        __builtin_prefetch(storage + 64);
      }
  }
  // Whether a tensor is a negative or conjugate view (torch_is_lazy), from its DispatchKeySet.
  bool lazy(Handle h) const {
    const char* impl = *static_cast<const char* const*>(h);
    uint64_t keys;
    std::memcpy(&keys, impl + keys_at, sizeof keys);
    return (keys & lazy_keys) != 0;
  }

  // The same for a plain torch.Tensor only (a grad).
  Handle plain_handle(PyObject* object) const {
    return Py_TYPE(object) == tensor_type ? reinterpret_cast<char*>(object) + kTensorOffset
                                          : nullptr;
  }

  // What a step checks of a tensor, or false where the shim could not tell (torch then answers,
  // through the Python calls).
  struct Facts {
    void* data;
    int32_t dtype, device_type, layout;
    int64_t dim;
    const int64_t* sizes;
    const int64_t* strides;
  };
  bool read(Handle h, Facts& f, Place place) const {
    int64_t* sizes_at = nullptr;
    int64_t* strides_at = nullptr;
    int32_t index = -1;
    if (dtype(h, &f.dtype) || device_type(h, &f.device_type) || layout(h, &f.layout) ||
        f.device_type != place.type || (place.index >= 0 && device_index(h, &index)) ||
        index != place.index || f.layout != strided || dim(h, &f.dim) || sizes(h, &sizes_at) ||
        strides(h, &strides_at) || data_ptr(h, &f.data))
      return false;
    f.sizes = sizes_at;
    f.strides = strides_at;
    return true;
  }

  // A tensor at `place` as describe_torch describes it, and its strides; false where the shim
  // cannot tell or the tensor is not one fusedopt steps (describe_torch then says why).
  bool describe(PyObject* tensor, BufferInfo& info, std::vector<int64_t>& strides_out,
                Place place) const {
    const Handle h = plain_handle(tensor);
    Facts f;
    if (!h || !read(h, f, place) || lazy(h))
      return false;  // a lazy view: describe_torch refuses it
    int d = 0;
    while (d < kNumDtypes && dtype_codes[d] != f.dtype) ++d;
    const bool complex = f.dtype == complex_codes[0] || f.dtype == complex_codes[1];
    if (complex)
      d = static_cast<int>(f.dtype == complex_codes[0] ? Dtype::float32 : Dtype::float64);
    if (d == kNumDtypes) return false;
    info.present = true;
    info.dtype = static_cast<Dtype>(d);
    info.dtype_name.clear();
    info.shape.assign(f.sizes, f.sizes + f.dim);
    strides_out.assign(f.strides, f.strides + f.dim);
    info.size = 1;
    for (int64_t n : info.shape) info.size *= n;
    if (complex) as_real_pairs(info);
    if (!f.data && info.size > 0) return false;
    info.contiguous = dense(info.shape, strides_out);
    info.writeable = true;
    info.data = torch_address(reinterpret_cast<uintptr_t>(f.data));
    return true;
  }

 private:
  template <class F>
  static bool find(void* library, const char* name, F& function) {
    function = reinterpret_cast<F>(dlsym(library, name));
    return function != nullptr;
  }

  // The offset in a TensorImpl of its StorageImpl's address: the one word of its first 64 bytes
  // (c10 keeps the storage right after the reference counts) that holds it in two tensors, else
  // -1. Used for prefetching only: a wrong offset would cost a useless fetch, nothing else.
  static int storage_offset(const py::object& a, const py::object& b) {
    auto impl_and_storage = [](const py::object& t) {
      return std::pair{t.attr("_cdata").cast<uintptr_t>(),
                       t.attr("untyped_storage")().attr("_cdata").cast<uintptr_t>()};
    };
    uintptr_t impl_a, storage_a, impl_b, storage_b;
    try {
      std::tie(impl_a, storage_a) = impl_and_storage(a);
      std::tie(impl_b, storage_b) = impl_and_storage(b);
    } catch (const py::error_already_set&) {
      return -1;
    }
    int found = -1;
    for (int offset = 0; offset < 64; offset += 8) {
      uintptr_t word_a, word_b;
      std::memcpy(&word_a, reinterpret_cast<const char*>(impl_a) + offset, sizeof word_a);
      std::memcpy(&word_b, reinterpret_cast<const char*>(impl_b) + offset, sizeof word_b);
      if (word_a == storage_a && word_b == storage_b) {
        if (found >= 0) return -1;
        found = offset;
      }
    }
    return found;
  }

  // The offset in a TensorImpl of its DispatchKeySet: the first word that holds, in each probe,
  // the keys torch reports for it (torch._C._dispatch_keys). The probes are a plain tensor, a
  // negative view, a conjugate one and another plain one; the word is searched from the start of
  // the TensorImpl up, so that nothing past it is read where it is found (torch 2.13: at 168, the
  // last field of 176 bytes). -1 where none is found in the first 256 bytes.
  static int key_set_offset(const py::module_& torch, uint64_t negative, uint64_t conjugate) {
    const py::object ones = torch.attr("ones"), keys_of = torch.attr("_C").attr("_dispatch_keys");
    const py::object probes[] = {ones(3), torch.attr("_neg_view")(ones(4)),
                                 ones(2, py::arg("dtype") = torch.attr("complex64")).attr("conj")(),
                                 torch.attr("zeros")(5, 2)};
    std::vector<std::pair<const char*, uint64_t>> expected;
    for (const py::object& probe : probes)
      expected.emplace_back(reinterpret_cast<const char*>(probe.attr("_cdata").cast<uintptr_t>()),
                            keys_of(probe).attr("raw_repr")().cast<uint64_t>());
    if (!(expected[1].second & negative) || !(expected[2].second & conjugate) ||
        (expected[0].second & (negative | conjugate)))
      return -1;
    for (int offset = 0; offset < 256; offset += 8) {
      const bool found = std::all_of(expected.begin(), expected.end(), [&](const auto& e) {
        uint64_t word;
        std::memcpy(&word, e.first + offset, sizeof word);
        return word == e.second;
      });
      if (found) return offset;
    }
    return -1;
  }

  bool load() {
    try {
      const py::module_ torch = py::module_::import("torch");
      void* library = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
      if (!library) return false;
      int32_t (*cpu_type)() = nullptr;
      int32_t (*cuda_type)() = nullptr;
      int32_t (*strided_layout)() = nullptr;
      if (!(find(library, "aoti_torch_get_data_ptr", data_ptr) &&
            find(library, "aoti_torch_get_dim", dim) &&
            find(library, "aoti_torch_get_sizes", sizes) &&
            find(library, "aoti_torch_get_strides", strides) &&
            find(library, "aoti_torch_get_dtype", dtype) &&
            find(library, "aoti_torch_get_device_type", device_type) &&
            find(library, "aoti_torch_get_device_index", device_index) &&
            find(library, "aoti_torch_get_layout", layout) &&
            find(library, "aoti_torch_device_type_cpu", cpu_type) &&
            find(library, "aoti_torch_device_type_cuda", cuda_type) &&
            find(library, "aoti_torch_layout_strided", strided_layout)))
        return false;
      // torch's code of each Dtype, in Dtype's order (8-bit state is stored as uint8).
      const char* const dtype_names[kNumDtypes] = {"float32", "float64", "bfloat16", "float16",
                                                   "uint8"};
      for (int d = 0; d < kNumDtypes; ++d) {
        int32_t (*code)() = nullptr;
        if (!find(library, ("aoti_torch_dtype_" + std::string(dtype_names[d])).c_str(), code))
          return false;
        dtype_codes[d] = code();
      }
      const char* const complex_names[2] = {"complex64", "complex128"};
      for (int c = 0; c < 2; ++c) {
        int32_t (*code)() = nullptr;
        if (find(library, ("aoti_torch_dtype_" + std::string(complex_names[c])).c_str(), code))
          complex_codes[c] = code();
      }
      cpu = cpu_type();
      cuda = cuda_type();
      strided = strided_layout();
      tensor_base = reinterpret_cast<PyTypeObject*>(torch.attr("_C").attr("TensorBase").ptr());
      tensor_type = reinterpret_cast<PyTypeObject*>(torch.attr("Tensor").ptr());
      parameter_type = reinterpret_cast<PyTypeObject*>(torch.attr("nn").attr("Parameter").ptr());
      // Their grad is TensorBase's, read through its descriptor (TorchPlan::read_grads_by_shim).
      const py::object grad = TorchNames::get().grad_property;
      if (!py::object(py::handle(reinterpret_cast<PyObject*>(tensor_type)).attr("grad")).is(grad) ||
          !py::object(py::handle(reinterpret_cast<PyObject*>(parameter_type)).attr("grad"))
               .is(grad) ||
          tensor_type->tp_getattro != PyObject_GenericGetAttr ||
          parameter_type->tp_getattro != PyObject_GenericGetAttr)
        return false;
      // A probe of a shape whose sizes and strides all differ, viewed at an offset.
      const py::object probe = torch.attr("empty")(64)
                                   .attr("__getitem__")(py::slice(4, 64, 1))
                                   .attr("view")(3, 4, 5)
                                   .attr("transpose")(0, 2);
      if (!same_tensor(probe)) return false;
      Facts f;
      if (!read(handle(probe.ptr()), f, cpu_place()) ||
          f.dtype != dtype_codes[static_cast<int>(Dtype::float32)])
        return false;
      const auto shape = probe.attr("shape").cast<std::vector<int64_t>>();
      const auto stride = probe.attr("stride")().cast<std::vector<int64_t>>();
      storage_at = storage_offset(probe, torch.attr("zeros")(3));
      const py::object key_set = torch.attr("_C").attr("DispatchKeySet");
      const py::object key = torch.attr("_C").attr("DispatchKey");
      const auto keys = [&](const char* name) {
        return key_set(key.attr(name)).attr("raw_repr")().cast<uint64_t>();
      };
      const uint64_t negative = keys("Negative"), conjugate = keys("Conjugate");
      lazy_keys = negative | conjugate;
      keys_at = key_set_offset(torch, negative, conjugate);
      if (keys_at < 0) return false;
      return f.dim == 3 && std::equal(shape.begin(), shape.end(), f.sizes) &&
             std::equal(stride.begin(), stride.end(), f.strides) &&
             reinterpret_cast<uintptr_t>(f.data) == probe.attr("data_ptr")().cast<uintptr_t>();
    } catch (const py::error_already_set&) {
      return false;
    }
  }

 public:
  // Whether `tensor`'s object holds its at::Tensor where this reads it: the TensorImpl pointer
  // there is the one torch reports. A pointer compared, nothing read through it.
  bool same_tensor(py::handle tensor) const {
    if (!PyObject_TypeCheck(tensor.ptr(), tensor_base)) return false;
    uintptr_t impl;
    std::memcpy(&impl, reinterpret_cast<const char*>(tensor.ptr()) + kTensorOffset, sizeof impl);
    return impl == tensor.attr("_cdata").cast<uintptr_t>();
  }
};

bool torch_is_contiguous(PyObject* tensor) {
  return PyObject_IsTrue(call_with(TorchNames::get().is_contiguous, tensor).ptr()) == 1;
}

std::vector<int64_t> torch_strides(PyObject* tensor) {
  return call_with(TorchNames::get().stride, tensor).cast<std::vector<int64_t>>();
}

// Whether a tensor's elements fill one block of memory from its data_ptr, each once, in some
// order (contiguous, channels_last, any permutation of a contiguous tensor): c10's
// non-overlapping-and-dense test, which torch has no Python method for. An element-wise step
// streams that block as a flat buffer, provided every tensor streamed with it walks the same
// order (same_order).
bool dense(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of 2+ elements
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 0) return true;
    if (shape[d] > 1) dims.emplace_back(strides[d], shape[d]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

// Whether two tensors of `shape` with these strides walk their elements in the same memory order:
// the same stride in every dimension of more than one element (an empty tensor walks none).
bool same_order(const std::vector<int64_t>& shape, const int64_t* a, size_t a_size,
                const std::vector<int64_t>& b) {
  if (a_size != shape.size() || b.size() != shape.size()) return false;
  for (int64_t n : shape)
    if (n == 0) return true;
  for (size_t d = 0; d < shape.size(); ++d)
    if (shape[d] > 1 && a[d] != b[d]) return false;
  return true;
}
bool same_order(const std::vector<int64_t>& shape, const std::vector<int64_t>& a,
                const std::vector<int64_t>& b) {
  return same_order(shape, a.data(), a.size(), b);
}

std::string strides_text(const std::vector<int64_t>& strides) {
  std::string text = "(";
  for (size_t d = 0; d < strides.size(); ++d) text += (d ? ", " : "") + std::to_string(strides[d]);
  return text + (strides.size() == 1 ? ",)" : ")");
}

// A tensor as the core sees an array: dtype, shape, its own memory, and whether that memory is
// one dense block (`contiguous` to the core, which streams it flat; the plan checks that the
// tensors streamed together have one memory order). On the CPU, or on `device` (a torch.device)
// where given: a device plan's.
void describe_torch(PyObject* tensor, const std::string& name, BufferInfo& info,
                    py::handle device = py::handle()) {
  const TorchNames& n = TorchNames::get();
  info.present = tensor != Py_None;
  if (!info.present) return;
  const py::handle t(tensor);
  if (device ? !py::object(t.attr("device")).equal(device) : !t.attr(n.is_cpu).cast<bool>())
    throw Error(ErrorKind::value,
                name + " is not on " + (device ? std::string(py::str(device)) : "the CPU") + " (" +
                    std::string(py::str(t.attr("device"))) + "); one step serves one device");
  if (!py::object(t.attr(n.layout)).is(n.strided))
    throw Error(ErrorKind::type, name + " is a " + std::string(py::str(t.attr(n.layout))) +
                                     " tensor; fusedopt updates dense (strided) tensors");
  if (torch_is_lazy(tensor)) throw Error(ErrorKind::type, lazy_text(name));
  const py::object dtype = t.attr(n.dtype);
  const bool complex = dtype.is(n.complex64) || dtype.is(n.complex128);
  info.dtype = dtype.is(n.float32) || dtype.is(n.complex64)    ? std::optional(Dtype::float32)
               : dtype.is(n.float64) || dtype.is(n.complex128) ? std::optional(Dtype::float64)
               : dtype.is(n.bfloat16)                          ? std::optional(Dtype::bfloat16)
               : dtype.is(n.float16)                           ? std::optional(Dtype::float16)
               : dtype.is(n.uint8)                             ? std::optional(Dtype::blockwise8)
                                                               : std::nullopt;
  info.dtype_name = info.dtype ? "" : std::string(py::str(dtype));
  info.shape.clear();
  info.size = 1;
  for (py::handle d : t.attr(n.shape)) {
    info.shape.push_back(d.cast<int64_t>());
    info.size *= info.shape.back();
  }
  if (complex) as_real_pairs(info);
  info.contiguous = torch_is_contiguous(tensor) || dense(info.shape, torch_strides(tensor));
  info.writeable = true;
  const uintptr_t data_ptr = torch_data_ptr(tensor);
  // A tensor subclass that keeps its data elsewhere (DTensor, a wrapper subclass) says 0: it
  // has no memory of its own to update, and its elements must never be read from the stand-in.
  if (data_ptr == 0 && info.size > 0)
    throw Error(ErrorKind::type,
                name + " (" + std::string(py::str(py::type::handle_of(t).attr("__name__"))) +
                    ") has no memory of its own; fusedopt updates a tensor's own memory");
  info.data = torch_address(data_ptr);
}

// A host value kept in a 0-dim tensor (torch's state["step"], NAdam's mu_product): read into and
// written back from the core's int64 counts or double scalars around each step.
struct ScalarSlot {
  void* address;
  bool is_float32;
  double read() const {
    if (is_float32) return *static_cast<const float*>(address);
    return *static_cast<const double*>(address);
  }
  void write(double value) const {
    if (is_float32)
      *static_cast<float*>(address) = static_cast<float>(value);
    else
      *static_cast<double*>(address) = value;
  }
};

ScalarSlot scalar_slot(py::handle tensor, const std::string& name) {
  BufferInfo info;
  const py::str& is_cpu = TorchNames::get().is_cpu;
  if (py::hasattr(tensor, is_cpu) && !tensor.attr(is_cpu).cast<bool>())
    throw Error(ErrorKind::value, name + " is on " + std::string(py::str(tensor.attr("device"))) +
                                      "; fusedopt keeps step counts and scalar states in host "
                                      "memory, as torch's optimizers do unless fused or "
                                      "capturable");
  describe_torch(tensor.ptr(), name, info);
  if (info.size != 1 || !(info.dtype == Dtype::float32 || info.dtype == Dtype::float64))
    throw Error(ErrorKind::type, name + " must be a one-element float32 or float64 tensor");
  return {info.data, info.dtype == Dtype::float32};
}

// The plan of a fusedopt.torch optimizer: every param of its groups, of which those with a grad
// at registration are stepped (the "active" ones, with their states). Each step reads every
// param's grad itself; when the params with a grad are not the active ones, or a param's memory
// moved (ZeroRedundancyOptimizer's bucket views replace param.data), it steps nothing and says
// so, and the optimizer registers again; so it does when a state tensor it holds is no longer in
// its entry of optimizer.state (`kept`: (entry, key, tensor) triples), as when a user or
// ZeroRedundancyOptimizer.load_state_dict replaced it. A param flagged `local` is a DTensor:
// the plan steps its local tensor, param.to_local(), with its grad's, param.grad.to_local(); the
// optimizer gives it the local tensors of the states. Given a `launcher` (fusedopt._cuda's, see
// python/launcher.h), the plan's tensors are on the device of its first param and its checked
// steps are launched there; its step counts and scalars stay in host tensors. A param without a
// grad is skipped as on the CPU: the launch is of the others (the tables are made again when
// the set stepped changes).
class AnyTorchPlan {
 public:
  virtual ~AnyTorchPlan() = default;
  virtual void set_options(size_t group, py::handle values) = 0;
  virtual bool step(py::handle grad_scale) = 0;
  virtual bool step_grads(py::handle grads, int64_t step) = 0;
  // The steps whose kernels ran: counted in C++, where no signal interrupts, so that the
  // optimizer tells a KeyboardInterrupt raised as a step returns from one raised before it.
  int64_t steps_taken = 0;
  // How many active params the last step skipped, their grad None (as torch.optim skips them),
  // and how many of them it skipped at the last kDormantSteps steps in a row (dormant_params():
  // their indices among the active ones).
  size_t skipped = 0;
  size_t dormant = 0;
  virtual std::vector<size_t> dormant_params() const = 0;
  // A param skipped this many steps in a row (a frozen layer, more than a mixture of experts' idle
  // expert) costs its checks at every step, about 1 us (9000 frozen params of 10000: 10 ms a step
  // against 1-2 ms for a plan without them); the optimizer's next plan leaves it out, at a cost of
  // the order of a hundred skipped steps.
  static constexpr uint32_t kDormantSteps = 100;
};

template <class A>
class TorchPlan : public AnyTorchPlan {
 public:
  // `masters`: None, or one float32 master copy per active param (None where there is none);
  // `rounding_seed`: set, 16-bit params and states are rounded stochastically; `checked`
  // false: the options' ranges are never checked (fusedopt.torch: torch checks them in its
  // constructors only, and uses a value set later in param_groups as it is).
  TorchPlan(py::handle groups, py::handle group_of, py::handle params, py::handle active,
            py::handle states, py::handle steps, py::handle scalars, py::handle new_state,
            py::handle local, py::handle kept, py::handle masters,
            std::optional<uint64_t> rounding_seed, py::handle absmax, bool checked,
            py::handle launcher)
      : groups_(groups_from<A>(groups)), rounding_seed_(rounding_seed), checked_(checked) {
    const std::vector<int> all_groups = py::cast<std::vector<int>>(group_of);
    for (py::handle p : items_of(params, "params"))
      params_.push_back(py::reinterpret_borrow<py::object>(p));
    active_ = py::cast<std::vector<bool>>(active);
    local_ = local.is_none() ? std::vector<bool>(params_.size(), false)
                             : py::cast<std::vector<bool>>(local);
    if (active_.size() != params_.size() || all_groups.size() != params_.size() ||
        local_.size() != params_.size())
      throw Error(ErrorKind::value, "one group, one active flag and one local flag per param");
    if (!kept.is_none())
      for (py::handle item : items_of(kept, "kept")) {
        const py::tuple triple = items_of(item, "kept");
        if (triple.size() != 3 || !PyDict_Check(triple[0].ptr()))
          throw Error(ErrorKind::type, "kept holds (dict, key, tensor) triples");
        kept_.push_back({triple[0], triple[1], triple[2]});
      }
    StepBuffers b;
    std::vector<int> group_of_active;
    if (!launcher.is_none()) {
      launcher_ = py::reinterpret_borrow<py::object>(launcher);
      b.values_readable = false;  // the 8-bit states' scales are device memory: never read here
      for (size_t i = 0; i < params_.size(); ++i)
        if (active_[i] && !device_) device_ = memory_of(i, params_[i]).attr("device");
      if (device_) {
        device_type_ = py::str(device_.attr("type"));
        const py::object index = device_.attr("index");
        device_index_ = index.is_none() ? -1 : index.cast<int32_t>();
      }
    }
    // Messages name an active param by its index among the active ones, as the core's do; the
    // optimizer says which param of which group that is.
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!active_[i]) continue;
      const std::string name = "params[" + std::to_string(index_.size()) + "]";
      const py::object memory = memory_of(i, params_[i]);
      b.params.emplace_back();
      describe_torch(memory.ptr(), name, b.params.back(), device_);
      pin_storage(memory);
      addresses_.push_back(torch_data_ptr(memory.ptr()));
      // Its layout: every tensor streamed with it must walk its elements in its memory order.
      param_stride_objects_.push_back(call_with(TorchNames::get().stride, memory.ptr()));
      param_strides_.push_back(param_stride_objects_.back().cast<std::vector<int64_t>>());
      param_shapes_.push_back(b.params.back().shape);
      grad_dtypes_.push_back(memory.attr(TorchNames::get().dtype));
      grad_shapes_.push_back(memory.attr(TorchNames::get().shape));
      group_of_active.push_back(all_groups[i]);
      index_.push_back(i);
    }
    const size_t n = index_.size();
    const py::tuple state_lists = items_of(states, "states");
    if (state_lists.size() != A::state_names.size())
      throw Error(ErrorKind::value, "one state list per state of the algorithm");
    b.states.resize(A::state_names.size());
    b.state_names.assign(A::state_names.begin(), A::state_names.end());
    for (size_t k = 0; k < A::state_names.size(); ++k) {
      if (state_lists[k].is_none()) continue;
      const py::tuple items = items_of(state_lists[k], A::state_names[k]);
      for (size_t j = 0; j < items.size(); ++j) {
        b.states[k].emplace_back();
        const std::string state_name =
            std::string(A::state_names[k]) + "[" + std::to_string(j) + "]";
        describe_torch(items[j].ptr(), state_name, b.states[k].back(), device_);
        check_layout(items[j], j, state_name, b.states[k].back());
        pin_storage(items[j]);
        references_.push_back(py::reinterpret_borrow<py::object>(items[j]));
      }
    }
    if (!masters.is_none()) {
      const py::tuple items = items_of(masters, "masters");
      for (size_t j = 0; j < items.size(); ++j) {
        b.masters.emplace_back();
        const std::string master_name = "state['master'] of params[" + std::to_string(j) + "]";
        describe_torch(items[j].ptr(), master_name, b.masters.back(), device_);
        check_layout(items[j], j, master_name, b.masters.back());
        pin_storage(items[j]);
        references_.push_back(py::reinterpret_borrow<py::object>(items[j]));
      }
    }
    describe_absmax<A>(absmax, b, [&](size_t k, size_t j, const py::tuple& list, BufferInfo& info) {
      describe_torch(list[j].ptr(),
                     std::string(A::state_names[k]) + "_absmax[" + std::to_string(j) + "]", info,
                     device_);
      pin_storage(list[j]);
      references_.push_back(py::reinterpret_borrow<py::object>(list[j]));
    });
    const py::tuple step_items = items_of(steps, "steps");
    for (size_t j = 0; j < step_items.size(); ++j) {
      step_slots_.push_back(
          scalar_slot(step_items[j], "state['step'] of params[" + std::to_string(j) + "]"));
      references_.push_back(py::reinterpret_borrow<py::object>(step_items[j]));
    }
    if (!step_slots_.empty() && step_slots_.size() != n)
      throw Error(ErrorKind::value, "one step tensor per active param");
    if (!scalars.is_none()) {
      for (py::handle row : items_of(scalars, "scalars")) {
        std::vector<ScalarSlot> slots;
        for (py::handle s : items_of(row, "scalars")) {
          slots.push_back(scalar_slot(s, "a scalar state"));
          references_.push_back(py::reinterpret_borrow<py::object>(s));
        }
        scalar_slots_.push_back(std::move(slots));
      }
      if (scalar_slots_.size() != n)
        throw Error(ErrorKind::value, "one row of scalars per active param");
    }
    counts_.assign(n, 0);
    skipped_for_.assign(n, 0);
    scalar_rows_.assign(n * kMaxScalars, 0.0);
    const RangeChecks ranges(checked_);
    plan_ = std::make_unique<Plan<A>>(
        groups_, b, group_of_active, step_slots_.empty() ? nullptr : counts_.data(),
        flags_from(new_state, n), scalar_slots_.empty() ? nullptr : scalar_rows_.data());
    if (launcher_) launch_with(launcher_);
    // A grad has its param's dtype, shape and device: torch refuses any other in autograd and in
    // the grad setter, but `param.grad.data = x` or `param.data = x` gets past both. Each step
    // checks the grad's dtype, shape, device and layout and reads its memory.
    infos_ = b.params;
    for (const py::object& tensor : references_)
      reference_addresses_.push_back(tensor.is_none() ? 0 : torch_data_ptr(tensor.ptr()));
    use_shim();
  }

  void set_options(size_t group, py::handle values) override {
    const typename A::Options o = options_from<A>(values);
    const RangeChecks ranges(checked_);
    plan_->set_options(group, o);
    groups_[group] = o;
  }

  bool step(py::handle grad_scale) override {
    for (const Kept& k : kept_) {  // a state tensor replaced in its entry: register again
      PyObject* now = PyDict_GetItemWithError(k.entry.ptr(), k.key.ptr());
      if (!now && PyErr_Occurred()) throw py::error_already_set();
      if (now != k.tensor.ptr()) return false;
    }
    if (!registered_memory_unchanged()) return false;
    StepExtras extras{grad_scale_from(grad_scale), rounding_seed_};
    extras.skip_absent_grads = true;
    LentReferences grads(spare_grads_);  // kept alive while the GIL is released
    const Grads read = shim_ ? read_grads_by_shim(grads) : Grads::unread;
    if (read == Grads::moved || (read == Grads::unread && !read_grads(grads, extras))) return false;
    for (size_t k = 0; k < step_slots_.size(); ++k) {
      if (!infos_[k].present) continue;  // skipped: its count is neither read nor advanced
      // A float out of int64's range (NaN, 1e30 filled in place) has no conversion (undefined
      // behaviour); the front end names the param when this refuses.
      const double taken = step_slots_[k].read();
      if (!(taken >= 0 && taken < 0x1p63))
        throw Error(ErrorKind::value, "a step count is not in [0, 2**63)");
      counts_[k] = static_cast<int64_t>(taken);
    }
    read_scalars(false);
    {
      py::gil_scoped_release release;
      plan_->step(infos_, extras, std::nullopt);
    }
    ++steps_taken;
    for (size_t k = 0; k < step_slots_.size(); ++k)
      if (infos_[k].present) step_slots_[k].write(static_cast<double>(counts_[k]));
    write_scalars(false);
    skipped = dormant = 0;
    for (size_t j = 0; j < infos_.size(); ++j) {
      uint32_t& streak = skipped_for_[j];
      streak = infos_[j].present ? 0 : std::min(streak + 1, kDormantSteps);
      skipped += !infos_[j].present;
      dormant += streak == kDormantSteps;
    }
    return true;
  }

  std::vector<size_t> dormant_params() const override {
    std::vector<size_t> indices;
    for (size_t j = 0; j < skipped_for_.size(); ++j)
      if (skipped_for_[j] == kDormantSteps) indices.push_back(j);
    return indices;
  }

 private:
  enum class Grads { read, moved, unread };

  // Each active param's grad, checked by the shim (TorchShim): `moved` where a param's memory or
  // layout moved or the params with a grad are not the active ones, `unread` where anything is
  // not as the plan expects (read_grads then checks it through torch and names what is wrong).
  Grads read_grads_by_shim(LentReferences& grads) {
    if (!fell_back_ && read_grads_in_two_passes(grads)) return Grads::read;
    grads.clear();
    const Grads read = read_grads_in_order(grads);
    // A plan whose every step ends in torch's checks (a grad of other strides each time, as
    // torch.func gives) goes straight to the order they take, until a step passes it.
    fell_back_ = read != Grads::read;
    return read;
  }

  // read_grads_by_shim for a step where all is as registered: every param's grad read first,
  // then each active param checked and its grad read by the shim, the objects of the params and
  // grads further on fetched ahead (TorchShim::fetch_ahead; each shim call waited on a few cache
  // misses on torch's objects: one param and grad after another, 3.7 ms of a 9.6 ms step over
  // 10000 x 100). On this thread, not the pool's: data_ptr materializes a copy-on-write storage,
  // which two threads must not do at once (two grads viewing one lazily cloned tensor crashed).
  // False at the first thing that is not as registered, which read_grads_in_order then finds in
  // order.
  bool read_grads_in_two_passes(LentReferences& grads) {
    const py::object& grad_property = TorchNames::get().grad_property;
    const size_t n = params_.size();
    for (size_t i = 0; i < n; ++i) {
      shim_->fetch_ahead(
          i, n, [&](size_t k) { return params_[k].ptr(); },
          [&](size_t k) {
            return Py_TYPE(params_[k].ptr()) == param_types_[k] ? shim_->handle(params_[k].ptr())
                                                                : nullptr;
          });
      if (Py_TYPE(params_[i].ptr()) != param_types_[i]) return false;
      py::object grad = read_property(grad_property, params_[i].ptr());
      if (!active_[i]) {
        if (!grad.is_none()) return false;
        continue;
      }
      grads.push_back(std::move(grad));  // None too: grads[j] is active param j's
    }
    const TorchShim& shim = *shim_;
    const size_t active = index_.size();
    TorchShim::Facts g;
    for (size_t j = 0; j < active; ++j) {
      shim.fetch_ahead(
          j, active, [&](size_t k) { return param_handles_[k]; },
          [&](size_t k) { return param_handles_[k]; });
      shim.fetch_ahead(
          j, active, [&](size_t k) { return grads[k]; },
          [&](size_t k) { return shim.plain_handle(grads[k]); });
      infos_[j].present = grads[j] != Py_None;
      const std::optional<bool> same = param_as_registered_by_shim(j);
      if (!same || !*same) return false;
      if (!infos_[j].present) continue;
      if (!grad_as_param(shim, grads[j], j, g)) return false;
      infos_[j].data = torch_address(reinterpret_cast<uintptr_t>(g.data));
    }
    return true;
  }

  // Whether grad `grad` of active param j has the param's dtype, shape and memory order and its
  // own memory, read by the shim into `g`.
  bool grad_as_param(const TorchShim& shim, PyObject* grad, size_t j, TorchShim::Facts& g) const {
    const std::vector<int64_t>& shape = param_shapes_[j];
    const TorchShim::Handle h = shim.plain_handle(grad);
    return h && shim.read(h, g, shim_place_) && !shim.lazy(h) && g.dtype == param_dtypes_[j] &&
           g.dim == static_cast<int64_t>(shape.size()) &&
           std::equal(shape.begin(), shape.end(), g.sizes) &&
           same_order(shape, g.strides, shape.size(), param_strides_[j]) &&
           (g.data || infos_[j].size == 0);
  }

  Grads read_grads_in_order(LentReferences& grads) {
    const TorchShim& shim = *shim_;
    const py::object& grad_property = TorchNames::get().grad_property;
    TorchShim::Facts g;
    size_t j = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      // param.grad, through TensorBase's descriptor: the param is still of the class use_shim
      // found (torch.Tensor or nn.Parameter, whose grad that is; `__class__` can be assigned).
      if (Py_TYPE(params_[i].ptr()) != param_types_[i]) return Grads::unread;
      py::object grad = read_property(grad_property, params_[i].ptr());
      if (!active_[i]) {
        if (!grad.is_none()) return Grads::moved;  // a param without state has a grad now
        continue;
      }
      infos_[j].present = !grad.is_none();
      // A param without a grad is skipped, as torch skips it; but its registered memory bounds
      // the grads (none may overlap it), so one that moved makes the plan anew: its old memory
      // may be another tensor's grad by now.
      const std::optional<bool> same = param_as_registered_by_shim(j);
      if (!same) return Grads::unread;
      if (!*same) return Grads::moved;
      if (!infos_[j].present) {
        ++j;
        continue;
      }
      if (!grad_as_param(shim, grad.ptr(), j, g)) return Grads::unread;
      infos_[j].data = torch_address(reinterpret_cast<uintptr_t>(g.data));
      grads.push_back(std::move(grad));
      ++j;
    }
    return Grads::read;
  }

  // Whether active param j still has the memory, shape and (2+ dimensions) layout it was
  // registered with: param.data moved, given another shape in the same memory (`p.data =
  // p.data[:2]`) or laid out anew there (`p.data = p.data.t()` of a square param) would have its
  // states and grads streamed in the old order; the plan registers again. By the shim (nullopt
  // where it cannot tell), or through torch (`memory`: the param, or a DTensor's local tensor).
  std::optional<bool> param_as_registered_by_shim(size_t j) const {
    const std::vector<int64_t>& shape = param_shapes_[j];
    const std::vector<int64_t>& strides = param_strides_[j];
    void* data;
    int64_t dim, *sizes_now, *strides_now;
    const TorchShim::Handle p = param_handles_[j];
    if (shim_->data_ptr(p, &data) || shim_->dim(p, &dim) || shim_->sizes(p, &sizes_now) ||
        shim_->strides(p, &strides_now))
      return std::nullopt;
    return !shim_->lazy(p) && reinterpret_cast<uintptr_t>(data) == addresses_[j] &&
           dim == static_cast<int64_t>(shape.size()) &&
           std::equal(shape.begin(), shape.end(), sizes_now) &&
           (dim <= 1 || std::equal(strides.begin(), strides.end(), strides_now));
  }
  bool param_as_registered_by_torch(size_t j, const py::object& memory) const {
    const TorchNames& names = TorchNames::get();
    return !torch_is_lazy(memory.ptr()) && torch_data_ptr(memory.ptr()) == addresses_[j] &&
           read_property(names.shape_property, memory.ptr()).equal(grad_shapes_[j]) &&
           (param_shapes_[j].size() <= 1 ||
            call_with(names.stride, memory.ptr()).equal(param_stride_objects_[j]));
  }

  // The same through torch's Python methods, naming what is wrong.
  bool read_grads(LentReferences& grads, const StepExtras& extras) {
    const TorchNames& names = TorchNames::get();
    grads.clear();
    size_t j = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      py::object grad =
          py::reinterpret_steal<py::object>(PyObject_GetAttr(params_[i].ptr(), names.grad.ptr()));
      if (!grad) throw py::error_already_set();
      if (!active_[i]) {
        if (!grad.is_none()) return false;  // a param without state has a grad now
        continue;
      }
      infos_[j].present = !grad.is_none();
      const py::object memory = memory_of(i, params_[i]);
      if (!param_as_registered_by_torch(j, memory)) return false;  // see read_grads_by_shim
      if (!infos_[j].present) {
        ++j;
        continue;
      }
      if (local_[i]) grad = memory_of(i, grad);
      const auto name = [j] { return "grads[" + std::to_string(j) + "]"; };  // for errors only
      const py::object dtype = read_property(names.dtype_property, grad.ptr());
      if (!dtype.is(grad_dtypes_[j]))
        throw Error(ErrorKind::type, name() + " has dtype " + std::string(py::str(dtype)) +
                                         ", not its param's " +
                                         std::string(py::str(grad_dtypes_[j])));
      const py::object shape = read_property(names.shape_property, grad.ptr());
      if (!shape.equal(grad_shapes_[j]))
        throw Error(ErrorKind::value, name() + " has shape " + std::string(py::str(shape)) +
                                          ", not its param's " +
                                          std::string(py::str(grad_shapes_[j])));
      if (device_ ? !py::object(grad.attr("device")).equal(device_)
                  : read_property(names.is_cpu_property, grad.ptr()).ptr() != Py_True)
        throw Error(ErrorKind::value, name() + " is on " +
                                          std::string(py::str(grad.attr("device"))) +
                                          ", not on its param's " +
                                          (device_ ? std::string(py::str(device_)) : "CPU"));
      uintptr_t address = 0;
      py::object strides;
      try {
        address = torch_data_ptr(grad.ptr());
        strides = call_with(names.stride, grad.ptr());
      } catch (const py::error_already_set&) {  // no storage (a sparse grad): say what it is
        BufferInfo described;
        describe_torch(grad.ptr(), name(), described, device_);
        throw;
      }
      // Only read, so a grad laid out otherwise than its param, or a lazy view (see
      // torch_is_lazy), is read from a copy in its param's layout that holds its values (walking
      // the param's elements in its memory order), as torch.optim reads any strides (torch.func
      // gives a grad its param's use's strides) and any view; unless a grad scale writes the
      // unscaled grad back, which would then land in the copy.
      const bool lazy = torch_is_lazy(grad.ptr());
      if (lazy && extras.grad_scale) throw Error(ErrorKind::value, lazy_text(name()));
      bool copied = lazy;
      if (!lazy && !strides.equal(param_stride_objects_[j])) {
        const auto grad_strides = strides.cast<std::vector<int64_t>>();
        copied = !same_order(param_shapes_[j], grad_strides, param_strides_[j]);
        if (copied && extras.grad_scale)
          throw Error(ErrorKind::value,
                      name() + " is not laid out as its param (strides " +
                          strides_text(grad_strides) + ", its param's " +
                          strides_text(param_strides_[j]) +
                          "); a grad scale writes the unscaled grad back into it, which "
                          "needs its own memory in its param's memory order");
      }
      if (copied) {
        py::object copy = call_with(names.empty_like, memory.ptr());
        copy.attr("copy_")(grad);
        grad = std::move(copy);
        address = torch_data_ptr(grad.ptr());
      }
      if (address == 0 && infos_[j].size > 0)
        throw Error(ErrorKind::type, name() +
                                         " has no memory of its own; fusedopt reads a "
                                         "grad's own memory");
      infos_[j].data = torch_address(address);
      grads.push_back(std::move(grad));
      ++j;
    }
    return true;
  }

 public:
  // fusedopt.keras: one step over the grads given (a list, one per active param, in order) at
  // t = `step` for every tensor (Keras' global count, iterations + 1), instead of over each
  // param's .grad with its own count; the step tensors, if any, are left alone. These grads are
  // whatever Keras' pipeline made (clipped, unscaled, averaged), not autograd's, so each is
  // described in full (device, layout, dtype, shape, contiguity) and the core checks them all
  // before it writes anything. False, having done nothing, when a param's memory moved since
  // the plan was made.
  bool step_grads(py::handle grads, int64_t step) override {
    py::tuple items = items_of(grads, "grads");  // keeps them alive, GIL released
    const ItemsReleased released(items);
    const size_t n = index_.size();
    if (items.size() != n)
      throw Error(ErrorKind::value, "grads: expected " + std::to_string(n) +
                                        " tensors (one per param), got " +
                                        std::to_string(items.size()));
    for (size_t j = 0; j < n; ++j) {  // by the shim where it reads the param, else by torch
      const std::optional<bool> same =
          shim_ ? param_as_registered_by_shim(j) : std::optional<bool>();
      if (!(same ? *same
                 : param_as_registered_by_torch(j, memory_of(index_[j], params_[index_[j]]))))
        return false;
    }
    if (!registered_memory_unchanged()) return false;
    given_grads_.resize(n);
    std::vector<int64_t> strides;
    for (size_t j = 0; j < n; ++j) {
      const std::string name = "grads[" + std::to_string(j) + "]";
      if (shim_ && shim_->describe(items[j].ptr(), given_grads_[j], strides, shim_place_)) {
        check_layout(items[j], j, name, given_grads_[j], &strides);
      } else {  // torch describes it, and names what fusedopt cannot step
        describe_torch(items[j].ptr(), name, given_grads_[j], device_);
        check_layout(items[j], j, name, given_grads_[j]);
      }
    }
    read_scalars(true);
    {
      py::gil_scoped_release release;
      plan_->step(given_grads_, StepExtras{std::nullopt, rounding_seed_}, step);
    }
    ++steps_taken;
    write_scalars(true);
    return true;
  }

 private:
  // Whether every registered state, master, scale and scalar tensor still has the memory it was
  // registered with: `tensor.data = other` (or a Keras slot's) keeps the object and frees its old
  // memory, which the plan would otherwise go on writing.
  bool registered_memory_unchanged() const {
    // On this thread (data_ptr may materialize a copy-on-write storage: see
    // read_grads_in_two_passes), each tensor's objects fetched ahead where the shim reads them
    // (30000 tensors, Adam's states and step counts over 10000 params: 0.9 ms one after another).
    const size_t n = references_.size();
    for (size_t k = 0; k < n; ++k) {
      if (shim_)
        shim_->fetch_ahead(
            k, n, [&](size_t i) { return reference_handles_[i]; },
            [&](size_t i) { return reference_handles_[i]; });
      if (references_[k].is_none()) continue;
      void* data;  // by the shim where it reads this tensor, else by torch
      const bool by_shim = shim_ && !shim_->data_ptr(reference_handles_[k], &data);
      const uintptr_t now =
          by_shim ? reinterpret_cast<uintptr_t>(data) : torch_data_ptr(references_[k].ptr());
      if (now != reference_addresses_[k]) return false;
      // Made a lazy view in the same memory (`state.data = state.data.conj()`): refused anew.
      if (by_shim ? shim_->lazy(reference_handles_[k]) : torch_is_lazy(references_[k].ptr()))
        return false;
    }
    // ... and the layout it was registered with (`state.data = state.data.t()` keeps the memory)
    for (const Layout& l : layouts_) {
      int64_t dim, *strides;
      const TorchShim::Handle h = shim_ ? shim_->handle(l.tensor.ptr()) : nullptr;
      if (h && !shim_->dim(h, &dim) && !shim_->strides(h, &strides)) {
        if (dim != static_cast<int64_t>(l.values.size()) ||
            !std::equal(l.values.begin(), l.values.end(), strides))
          return false;
      } else if (!call_with(TorchNames::get().stride, l.tensor.ptr()).equal(l.strides)) {
        return false;
      }
    }
    return true;
  }

  void pin_storage(py::handle tensor) {
    if (!tensor.is_none()) storages_.push_back(tensor.attr("untyped_storage")());
  }

  // The shim checks this plan's steps when every tensor it registered is read where it expects
  // (TorchShim::same_tensor); DTensors' local tensors, which change, are read through torch.
  void use_shim() {
    const TorchShim* shim = TorchShim::get();
    if (!shim) return;
    shim_place_ = shim->cpu_place();
    if (device_type_ == "cuda")  // else the CPU's, or the emulated GPU's (the CPU)
      shim_place_ = {shim->cuda, std::max(device_index_, 0)};
    else if (device_ && device_type_ != "cpu")
      return;
    for (const py::object& param : params_) {  // each param's grad is read: every param's class
      PyTypeObject* type = Py_TYPE(param.ptr());
      if (type != shim->tensor_type && type != shim->parameter_type) return;
      param_types_.push_back(type);
    }
    for (size_t j = 0; j < index_.size(); ++j) {
      const py::object& param = params_[index_[j]];
      TorchShim::Facts facts;
      if (local_[index_[j]] || !shim->same_tensor(param) ||
          !shim->read(shim->handle(param.ptr()), facts, shim_place_))
        return;
      param_handles_.push_back(shim->handle(param.ptr()));
      param_dtypes_.push_back(facts.dtype);
    }
    for (const py::object& tensor : references_) {
      if (!tensor.is_none() && !shim->same_tensor(tensor)) return;
      reference_handles_.push_back(tensor.is_none() ? nullptr : shim->handle(tensor.ptr()));
    }
    shim_ = shim;
  }

  // A state, master or given grad of active param j is streamed with it: it must walk the
  // param's elements in the param's memory order (the same strides, but in dimensions of one
  // element). Another shape is left to the core, which names it. A state or master of more than
  // one dimension is checked again at each step (its layout may change in the same memory).
  // `known`: the tensor's strides, read by the shim (a given grad's), else read here.
  void check_layout(py::handle tensor, size_t j, const std::string& name, const BufferInfo& info,
                    const std::vector<int64_t>* known = nullptr) {
    if (tensor.is_none() || j >= param_shapes_.size() || info.shape != param_shapes_[j]) return;
    const bool grad = name.rfind("grads[", 0) == 0;
    const py::object strides =
        known && grad ? py::none() : call_with(TorchNames::get().stride, tensor.ptr());
    const auto values = known && grad ? *known : strides.cast<std::vector<int64_t>>();
    if (!same_order(param_shapes_[j], values, param_strides_[j]))
      throw Error(ErrorKind::value, name + " is not laid out as its param (strides " +
                                        strides_text(values) + ", its param's " +
                                        strides_text(param_strides_[j]) +
                                        "); fusedopt streams it in its param's memory order");
    if (info.shape.size() > 1 && !grad)
      layouts_.push_back({py::reinterpret_borrow<py::object>(tensor), strides, values});
  }

  // The scalars of the params stepped (`all`: every active one; else those with a grad): a
  // skipped param's are neither read nor written, as torch leaves them.
  void read_scalars(bool all) {
    for (size_t k = 0; k < scalar_slots_.size(); ++k)
      if (all || infos_[k].present)
        for (size_t r = 0; r < scalar_slots_[k].size(); ++r)
          scalar_rows_[k * kMaxScalars + r] = scalar_slots_[k][r].read();
  }

  void write_scalars(bool all) {
    for (size_t k = 0; k < scalar_slots_.size(); ++k)
      if (all || infos_[k].present)
        for (size_t r = 0; r < scalar_slots_[k].size(); ++r)
          scalar_slots_[k][r].write(scalar_rows_[k * kMaxScalars + r]);
  }

  // The tensor whose memory is stepped for params_[i]: the param itself, or a DTensor's local
  // tensor (the same object at every step, as DTensor keeps it, unless its memory moved).
  py::object memory_of(size_t i, const py::object& tensor) const {
    if (!local_[i]) return tensor;
    PyObject* local = PyObject_CallMethodNoArgs(tensor.ptr(), TorchNames::get().to_local.ptr());
    if (!local) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(local);
  }

  void launch_with(const py::object& launcher) {
    const py::object capsule = launcher.attr("entry")();
    if (!PyCapsule_IsValid(capsule.ptr(), LaunchEntry::kCapsuleName))
      throw Error(ErrorKind::type, "launcher.entry() must give a fusedopt launch entry");
    const auto* entry = static_cast<const LaunchEntry*>(
        PyCapsule_GetPointer(capsule.ptr(), LaunchEntry::kCapsuleName));
    if (entry->version != LaunchEntry::kVersion || std::string(entry->algorithm) != A::name ||
        entry->prepared_size != sizeof(PreparedStep<A>) ||
        entry->tensor_size != sizeof(TensorRef) ||
        entry->coefficients_size != sizeof(typename A::Coefficients))
      throw Error(ErrorKind::type, std::string("the launcher is not of this build's ") + A::name);
    // Where it launches: the emulated GPU's memory is the host's, a GPU's its own.
    if (device_) {
      const bool same = entry->emulated ? device_type_ == "cpu"
                                        : device_type_ == "cuda" && device_index_ == entry->device;
      if (!same)
        throw Error(ErrorKind::value,
                    "the launcher (" +
                        (entry->emulated ? std::string("emulated")
                                         : "cuda:" + std::to_string(entry->device)) +
                        ") does not serve the params' " + std::string(py::str(device_)));
    }
    launch_entry_ = capsule;
    plan_->run_with([entry](const PreparedStep<A>& prepared) {
      std::string error;  // a GPU's failure, not a refusal of the step: RuntimeError
      if (!entry->launch(entry->launcher, &prepared, &error)) throw std::runtime_error(error);
    });
  }

  // Null for a CPU plan. The launcher holds the entry's memory; the capsule is kept with it.
  // device_ (a torch.device: the first param's) is where every tensor must be, its type and
  // index (-1: none) read once; as the shim reads it, shim_place_.
  py::object launcher_, launch_entry_, device_;
  std::string device_type_;
  int32_t device_index_ = -1;
  TorchShim::Place shim_place_{};
  std::vector<typename A::Options> groups_;
  std::vector<py::object> params_;
  std::vector<bool> active_;
  struct Kept {
    py::object entry, key, tensor;  // optimizer.state[param][key] was tensor at registration
  };
  std::vector<Kept> kept_;
  std::vector<bool> local_;              // a DTensor: its local tensor is stepped
  std::vector<py::object> grad_dtypes_;  // each active param's dtype and shape, which its grad
  std::vector<py::object> grad_shapes_;  // must have
  std::vector<size_t> index_;            // the param index of each active tensor
  std::vector<uintptr_t> addresses_;     // each active param's memory at registration
  std::vector<py::object> param_stride_objects_;     // and its strides (a tuple) ...
  std::vector<std::vector<int64_t>> param_strides_;  // ... as numbers
  std::vector<std::vector<int64_t>> param_shapes_;   // and its shape
  struct Layout {
    py::object tensor, strides;   // a state or master of 2+ dimensions, its strides then
    std::vector<int64_t> values;  // (as numbers)
  };
  std::vector<Layout> layouts_;
  std::vector<py::object> references_;  // the registered states and scalar tensors
  // The storages of the registered params (their local tensors), states, masters and scales: a
  // step writes them with the GIL released, while another thread may give a param or state other
  // memory (`p.data = x` keeps the tensor and drops its storage; holding the tensor does not hold
  // the storage). Held, the old memory stays while the step writes it (the update lands there, as
  // if the step had come first), and the next step finds the tensor moved and registers again.
  // A thread swapping `p.data` beside 3000 steps corrupted the heap, 2 runs of 2. The cost: a
  // param's old memory after `p.data = x` lives until the next step makes the new plan.
  std::vector<py::object> storages_;
  std::vector<uintptr_t> reference_addresses_;  // their memory at registration
  std::vector<ScalarSlot> step_slots_;
  std::vector<std::vector<ScalarSlot>> scalar_slots_;
  std::vector<int64_t> counts_;
  std::vector<double> scalar_rows_;
  std::vector<BufferInfo> infos_;
  std::vector<uint32_t> skipped_for_;    // per active param: the steps it was skipped in a row
  std::vector<BufferInfo> given_grads_;  // step_grads' grads, described at each step
  std::optional<uint64_t> rounding_seed_;
  bool checked_;  // whether the options' ranges are checked
  std::unique_ptr<Plan<A>> plan_;
  // Set where the shim reads this plan's tensors (use_shim): each active param's at::Tensor and
  // dtype code, and the registered tensors' (nullptr for None).
  const TorchShim* shim_ = nullptr;
  std::vector<TorchShim::Handle> param_handles_;
  std::vector<PyTypeObject*> param_types_;  // each param's class (all params, not just active)
  std::vector<int32_t> param_dtypes_;
  std::vector<TorchShim::Handle> reference_handles_;
  std::vector<PyObject*> spare_grads_;  // the vector the last step held its grads in
  bool fell_back_ = false;  // the last step's grads were not all as registered (read_grads_by_shim)
};

// Runs f(AlgorithmTag<A>{}) for the algorithm called `name`.
template <class F>
void with_algorithm(const std::string& name, F&& f) {
  if (!Algorithms::visit(name, f))
    throw Error(ErrorKind::value, "unknown algorithm '" + name + "'");
}

py::dict algorithm_info(const std::string& name) {
  py::dict info;
  with_algorithm(name, [&](auto tag) {
    using A = typename decltype(tag)::type;
    const typename A::Options defaults;
    py::list fields;
    for (const auto& f : A::fields)
      fields.append(py::make_tuple(f.name, f.get(defaults),
                                   f.number ? "number"
                                   : f.flag ? "flag"
                                            : "convention"));
    info["fields"] = fields;
    info["states"] =
        py::tuple(py::cast(std::vector<std::string>(A::state_names.begin(), A::state_names.end())));
    info["scalars"] = py::tuple(
        py::cast(std::vector<std::string>(A::scalar_names.begin(), A::scalar_names.end())));
    info["always_used_states"] = A::always_used_states;
    info["takes_grad_scale"] = A::takes_grad_scale;
    info["uses_step"] = A::uses_step;
    info["uses_new_state"] = A::uses_new_state;
    info["quantizable_states"] = A::quantizable_states;
    info["nonnegative_states"] = A::nonnegative_states;
  });
  return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fusedopt's native CPU core (private: use the fusedopt package)";

  static py::exception<OptionError> option_error(m, "OptionError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OptionError& e) {
      PyErr_SetString(option_error.ptr(), e.what());
    } catch (const Error& e) {
      PyErr_SetString(e.kind == ErrorKind::type ? PyExc_TypeError : PyExc_ValueError, e.what());
    }
  });

  m.def("algorithms", [] {
    std::vector<std::string> names;
    Algorithms::for_each([&](auto tag) { names.push_back(decltype(tag)::type::name); });
    return names;
  });
  m.def("algorithm_info", &algorithm_info,
        "The description of an algorithm: fields (name, default, kind), states, scalars, ...");

  m.def(
      "check_options",
      [](const std::string& name, py::handle values) -> py::object {
        py::object problem = py::none();
        with_algorithm(name, [&](auto tag) {
          using A = typename decltype(tag)::type;
          try {
            A::check(options_from<A>(values));
          } catch (const OptionError& e) {
            problem = py::make_tuple(e.field, e.rule, e.what());
          }
        });
        return problem;
      },
      "None when the options are valid, else (field, rule, message) of the first invalid one.");

  m.def("states_used", [](const std::string& name, py::handle values) {
    unsigned used = 0;
    with_algorithm(name, [&](auto tag) {
      using A = typename decltype(tag)::type;
      used = A::states_used(options_from<A>(values));
    });
    return used;
  });

  m.def(
      "dynamic_map",
      [](bool nonnegative) {
        const float* map = nonnegative ? kUnsignedDynamicMap : kSignedDynamicMap;
        return std::vector<float>(map, map + 256);
      },
      "bitsandbytes' dynamic map of 8-bit states: the unsigned one for non-negative states.",
      py::arg("nonnegative"));

  m.def("initial_values", [](const std::string& name, py::handle values) {
    std::vector<double> states, scalars;
    with_algorithm(name, [&](auto tag) {
      using A = typename decltype(tag)::type;
      const typename A::Options o = options_from<A>(values);
      for (size_t k = 0; k < A::state_names.size(); ++k)
        states.push_back(A::initial_state(o, static_cast<int>(k)));
      for (size_t k = 0; k < A::scalar_names.size(); ++k)
        scalars.push_back(A::initial_scalar(o, static_cast<int>(k)));
    });
    return py::make_tuple(states, scalars);
  });

  m.def(
      "step",
      [](const std::string& name, py::handle groups, py::handle group_of, py::handle steps,
         py::handle params, py::handle grads, py::handle states, py::handle new_state,
         py::handle scalars, py::handle grad_scale, py::handle masters,
         std::optional<uint64_t> rounding_seed, py::handle absmax) {
        with_algorithm(name, [&](auto tag) {
          using A = typename decltype(tag)::type;
          const auto options = groups_from<A>(groups);
          thread_local StepBuffers b;
          std::vector<py::tuple> kept;
          const py::tuple param_items = items_of(params, "params");
          const py::tuple grad_items = items_of(grads, "grads");
          // Messages name the functional API's arguments: exp_avgs[2], not exp_avg[2].
          describe_registered<A>(param_items, items_of(states, "states"), kept, b, "s");
          describe_items(grad_items, "grads", b.grads);
          if (masters.is_none()) {
            b.masters.clear();
          } else {
            kept.push_back(items_of(masters, "masters"));
            describe_items(kept.back(), "masters", b.masters);
          }
          describe_absmax<A>(absmax, kept, b);
          const StepExtras extras{grad_scale_from(grad_scale), rounding_seed};
          b.grads_written = extras.grad_scale.has_value();
          StepSchedule s;
          // None: every tensor in group 0; an int: the same t for every tensor.
          if (group_of.is_none()) {
            s.group_of.assign(param_items.size(), 0);
          } else {
            const auto groups_of = py::cast<IndexArray>(group_of);
            s.group_of.assign(groups_of.data(), groups_of.data() + groups_of.size());
          }
          if (PyLong_Check(steps.ptr())) {
            s.steps.assign(param_items.size(), py::cast<int64_t>(steps));
          } else {
            const auto each = py::cast<IndexArray>(steps);
            s.steps.assign(each.data(), each.data() + each.size());
          }
          s.new_state = flags_from(new_state, param_items.size());
          s.scalars = writeable_array<double>(
              scalars, "scalars", static_cast<py::ssize_t>(param_items.size()) * kMaxScalars);
          py::gil_scoped_release release;
          // From the scalars' advance (prepare_step) to the kernels' last write; the GIL released
          // first, as StepInProgress requires.
          const cpu::StepInProgress writing;
          run_step(prepare_step<A>(options, s, b, extras));
        });
      },
      "One step over arrays described now (the functional API): options of each group, the group "
      "of each tensor, t of each tensor, params, grads, one list per state (or None).",
      py::arg("algorithm"), py::arg("groups"), py::arg("group_of"), py::arg("steps"),
      py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("new_state") = py::none(),
      py::arg("scalars") = py::none(), py::arg("grad_scale") = py::none(),
      py::arg("masters") = py::none(), py::arg("rounding_seed") = py::none(),
      py::arg("absmax") = py::none());

  m.def("groups_hold", &groups_hold, py::arg("groups"), py::arg("keys"), py::arg("expected"),
        "Whether each group dict holds, by identity, the values expected[i] lists for keys (see "
        "Plan.step_if_unchanged)");

  py::class_<AnyPlan>(m, "Plan",
                      "An optimizer's params and states, registered once; each step checks the "
                      "grads and that no registered array moved.")
      .def(py::init([](const std::string& name, py::handle groups, py::handle group_of,
                       py::handle params, py::handle states, py::handle step_counts,
                       py::handle new_state, py::handle scalars, bool borrowed, py::handle masters,
                       std::optional<uint64_t> rounding_seed, py::handle absmax) {
             std::unique_ptr<AnyPlan> plan;
             with_algorithm(name, [&](auto tag) {
               using A = typename decltype(tag)::type;
               plan = std::make_unique<PythonPlan<A>>(groups, group_of, params, states, step_counts,
                                                      new_state, scalars, borrowed, masters,
                                                      rounding_seed, absmax);
             });
             return plan;
           }),
           py::arg("algorithm"), py::arg("groups"), py::arg("group_of"), py::arg("params"),
           py::arg("states"), py::arg("step_counts") = py::none(),
           py::arg("new_state") = py::none(), py::arg("scalars") = py::none(),
           py::arg("borrowed") = false, py::arg("masters") = py::none(),
           py::arg("rounding_seed") = py::none(), py::arg("absmax") = py::none())
      .def("set_options", &AnyPlan::set_options, py::arg("group"), py::arg("values"))
      .def("step", &AnyPlan::step, py::arg("grads"), py::arg("grad_scale") = py::none(),
           py::arg("step") = py::none())
      .def("step_if_same", &AnyPlan::step_if_same, py::arg("params"), py::arg("states"),
           py::arg("grads"), py::arg("grad_scale") = py::none(), py::arg("step") = py::none(),
           py::arg("values") = py::none(), py::arg("masters") = py::none())
      .def(
          "step_if_unchanged",
          [](AnyPlan& plan, py::handle groups, py::handle keys, py::handle expected,
             py::handle grads, py::handle grad_scale) {
            if (!groups_hold(groups, keys, expected)) return false;
            plan.step(grads, grad_scale, std::nullopt);
            return true;
          },
          py::arg("groups"), py::arg("keys"), py::arg("expected"), py::arg("grads"),
          py::arg("grad_scale") = py::none(),
          "step(grads, grad_scale) when groups_hold(groups, keys, expected) (see there); false, "
          "and nothing done, otherwise")
      .def("__len__", &AnyPlan::size);

  py::class_<AnyTorchPlan>(m, "TorchPlan",
                           "The plan of a fusedopt.torch optimizer over CPU tensors (or one CUDA "
                           "device's, given fusedopt._cuda's launcher); step() "
                           "returns False, having done nothing, when the params with a grad or "
                           "their memory changed since it was made.")
      .def(py::init([](const std::string& name, py::handle groups, py::handle group_of,
                       py::handle params, py::handle active, py::handle states, py::handle steps,
                       py::handle scalars, py::handle new_state, py::handle local, py::handle kept,
                       py::handle masters, std::optional<uint64_t> rounding_seed, py::handle absmax,
                       bool checked, py::handle launcher) {
             std::unique_ptr<AnyTorchPlan> plan;
             with_algorithm(name, [&](auto tag) {
               using A = typename decltype(tag)::type;
               plan = std::make_unique<TorchPlan<A>>(
                   groups, group_of, params, active, states, steps, scalars, new_state, local, kept,
                   masters, rounding_seed, absmax, checked, launcher);
             });
             return plan;
           }),
           py::arg("algorithm"), py::arg("groups"), py::arg("group_of"), py::arg("params"),
           py::arg("active"), py::arg("states"), py::arg("steps"), py::arg("scalars"),
           py::arg("new_state"), py::arg("local") = py::none(), py::arg("kept") = py::none(),
           py::arg("masters") = py::none(), py::arg("rounding_seed") = py::none(),
           py::arg("absmax") = py::none(), py::arg("checked") = true,
           py::arg("launcher") = py::none())
      .def("set_options", &AnyTorchPlan::set_options, py::arg("group"), py::arg("values"))
      .def("step", &AnyTorchPlan::step, py::arg("grad_scale") = py::none())
      .def_readonly("steps_taken", &AnyTorchPlan::steps_taken)
      .def_readonly("skipped", &AnyTorchPlan::skipped)
      .def_readonly("dormant", &AnyTorchPlan::dormant)
      .def("dormant_params", &AnyTorchPlan::dormant_params)
      .def("step_grads", &AnyTorchPlan::step_grads, py::arg("grads"), py::arg("step"),
           "One step over these grads (one per active param) at t = step for every tensor, as "
           "fusedopt.keras steps; False, having done nothing, when a param's memory moved.");

  m.def(
      "stream_add",
      [](py::handle params, py::handle grads, py::handle states) {
        thread_local StepBuffers b;
        const py::tuple param_items = items_of(params, "params");
        const py::tuple grad_items = items_of(grads, "grads");
        std::vector<py::tuple> kept;
        describe_items(param_items, "params", b.params);
        describe_items(grad_items, "grads", b.grads);
        b.states.clear();
        b.state_names.clear();
        for (py::handle list : items_of(states, "states")) {
          kept.push_back(items_of(list, "states"));
          b.states.emplace_back();
          b.state_names.emplace_back("states");
          describe_items(kept.back(), "states", b.states.back());
        }
        b.grads_written = false;
        struct Context {
          const StreamAddFn* kernel;
          std::vector<TensorRef> tensors;
        } context{cpu::kernels().stream_add, validate_step_buffers(b)};
        py::gil_scoped_release release;
        const cpu::StepInProgress writing;
        run_work(
            context.tensors.size(), context.tensors.data(),
            [](void* c, size_t i, int64_t begin, int64_t end) {
              const auto& k = *static_cast<const Context*>(c);
              k.kernel[static_cast<int>(k.tensors[i].dtype)](k.tensors[i], begin, end);
            },
            &context);
      },
      "The bench's bandwidth ceiling: param += grad and each state += grad, in one pass.",
      py::arg("params"), py::arg("grads"), py::arg("states"));

  m.def(
      "ewma",
      [](py::array_t<double, py::array::c_style> x, py::array_t<double, py::array::c_style> out,
         int64_t length, int64_t num_series, int64_t time_stride, int64_t series_stride, double com,
         bool adjust, bool ignore_na, int64_t min_periods) {
        // fusedopt.ewma builds a valid layout; checked anyway, since any caller reaches this
        // (a stride past the arrays read and wrote out of bounds).
        if (length < 0 || num_series < 0 || time_stride < 0 || series_stride < 0 || min_periods < 0)
          throw Error(ErrorKind::value, "ewma: the layout's counts and strides must be >= 0");
        if (x.size() != length * num_series || out.size() != x.size())
          throw Error(ErrorKind::value, "ewma: layout does not match the arrays");
        if (length > 0 && num_series > 0) {
          const auto last = static_cast<__int128>(length - 1) * time_stride +
                            static_cast<__int128>(num_series - 1) * series_stride;
          if (last >= x.size())
            throw Error(ErrorKind::value, "ewma: the layout reaches past the arrays");
        }
        const double* in = x.data();
        double* result = out.mutable_data();
        py::gil_scoped_release release;
        ewma(in, result, length, num_series, time_stride, series_stride, com, adjust, ignore_na,
             min_periods);
      },
      // out is written: never a converted copy (its result would be lost).
      py::arg("x"), py::arg("out").noconvert(), py::arg("length"), py::arg("num_series"),
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
  m.def("_cgroup_cpu_limit", &cpu::cgroup_cpu_limit);  // for tests
  // fusedopt.torch's layout rules, the plans' own, for its checks and conversions in Python.
  m.def("_dense_layout", &dense, py::arg("shape"), py::arg("strides"));
  m.def("_same_order",
        static_cast<bool (*)(const std::vector<int64_t>&, const std::vector<int64_t>&,
                             const std::vector<int64_t>&)>(&same_order),
        py::arg("shape"), py::arg("a"), py::arg("b"));
  // For tests: switch the torch shim on or off for the plans made from now on (None: leave it);
  // whether plans made now use it.
  m.def(
      "_torch_shim",
      [](std::optional<bool> enable) {
        if (enable) TorchShim::enabled() = *enable;
        return TorchShim::get() != nullptr;
      },
      py::arg("enable") = py::none());
  m.attr("built_isas") = FUSEDOPT_BUILT_ISAS;
  m.attr("max_states") = kMaxStates;
  m.attr("max_scalars") = kMaxScalars;

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
