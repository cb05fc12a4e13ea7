"""fusedopt: fused optimizer update kernels for NumPy arrays.

Every optimizer step is one native pass per tensor (load param, grad and state once, update in
registers, store once), for every tensor of the optimizer in one call, SIMD-vectorized for the
processor it runs on and multi-threaded with the GIL released.

- PyTorch convention (names, defaults and math of ``torch.optim``): :class:`SGD`,
  :class:`Adagrad`, :class:`RMSprop`, :class:`Adam`, :class:`AdamW`, :class:`Adadelta`,
  :class:`Adamax`, :class:`NAdam`, :class:`RAdam`, :class:`Rprop`, :class:`ASGD`, and
  :class:`Lion` (lion-pytorch's form).
- Keras 3 convention: :mod:`fusedopt.keras` (``keras.optimizers.Optimizer`` subclasses for
  Keras models, on the torch backend; imports Keras) and :mod:`fusedopt.keras_numpy` (the same
  math over NumPy arrays, without Keras).
- Functional form, for callers that hold their own state: :mod:`fusedopt.functional`.
- pandas-compatible exponentially weighted mean: :func:`ewma`.
- The learning-rate range test, for choosing a learning rate: :func:`lr_range_test`.
"""

import numbers
import os
import warnings
from pathlib import Path

import numpy as np

from fusedopt import _core, optim
from fusedopt._core import available_isas, cpu_isa, num_threads, set_cpu_isa
from fusedopt._ewma import ewma
from fusedopt._lr_range import LRRangeTestResult, lr_range_test
from fusedopt._state import flatten_state_dict
from fusedopt.optim import *  # noqa: F403 - every optimizer class (optim.__all__)

__version__ = "0.1.0"

# The native core falls back to the best path when FUSEDOPT_CPU_ISA names one this processor
# cannot run (import must not fail on a machine the setting was not meant for); say so.
_requested_isa = os.environ.get("FUSEDOPT_CPU_ISA", "")
if _requested_isa and _requested_isa != cpu_isa():
    warnings.warn(
        f"FUSEDOPT_CPU_ISA={_requested_isa!r} is not available here (available: "
        f"{', '.join(available_isas())}); using {cpu_isa()!r}",
        RuntimeWarning,
        stacklevel=2,
    )


def set_num_threads(n: int) -> None:
    """The number of threads a large step runs on, from 1 to the core's limit (1024,
    csrc/cpu/parallel.h's kMaxThreads; the core raises ValueError outside)."""
    # The binding would take True for 1 and refuse 2.5 without naming n.
    if isinstance(n, bool | np.bool_) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int, got {n!r}")
    if not -(2**31) <= n < 2**31:  # beyond the binding's int: it would raise a bare TypeError
        raise ValueError(f"n must be between 1 and 1024, got {n}")
    _core.set_num_threads(int(n))


def get_cmake_dir() -> Path:
    """The folder of the installed CMake package, for ``find_package(fusedopt CONFIG)``.

    Pass it as ``-Dfusedopt_DIR=...`` or in ``CMAKE_PREFIX_PATH``; the package gives the target
    ``fusedopt::fusedopt`` (the C ABI of ``fusedopt/fusedopt.h`` and the C++ header
    ``fusedopt/fusedopt.hpp``). ``python -m fusedopt --cmake-dir`` prints it.
    """
    return Path(__file__).resolve().parent / "lib" / "cmake" / "fusedopt"


__all__ = [
    *optim.__all__,
    "LRRangeTestResult",
    "available_isas",
    "cpu_isa",
    "ewma",
    "flatten_state_dict",
    "get_cmake_dir",
    "lr_range_test",
    "num_threads",
    "set_cpu_isa",
    "set_num_threads",
]
