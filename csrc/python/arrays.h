// NumPy arrays the core writes through, checked the same way by both extension modules (_core and
// _cuda): a wrong one is refused by name instead of being written past its end.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <type_traits>

#include "core/error.h"

namespace fusedopt {

// A writeable, C-contiguous array of one dtype with `count` elements, whose memory the core
// updates in place (step counts, scalars); or null for None.
template <class T>
T* writeable_array(pybind11::handle object, const char* name, pybind11::ssize_t count) {
  namespace py = pybind11;
  if (object.is_none()) return nullptr;
  if (!py::isinstance<py::array_t<T>>(object))
    throw Error(ErrorKind::type,
                std::string(name) + " must be a numpy array of " +
                    (sizeof(T) == 8 && std::is_integral_v<T> ? "int64" : "float64"));
  auto array = py::reinterpret_borrow<py::array>(object);
  if (!(array.flags() & py::array::c_style) || !array.writeable() || array.size() != count)
    throw Error(ErrorKind::value, std::string(name) + " must be writeable, C-contiguous and hold " +
                                      std::to_string(count) + " values");
  return static_cast<T*>(array.mutable_data());
}

}  // namespace fusedopt
