"""The C ABI of the installed libfusedopt (fusedopt/fusedopt.h), called through ctypes: options set
by name reach the core as the header says (every algorithm's steps, its per-tensor scalars
included, match the reference in each convention it offers), plans step exactly as fusedopt_step
does, failures come back as status codes with a thread-local message and write nothing, and the
library exports the API and nothing else."""

from __future__ import annotations

import ctypes
import functools
import math
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import fusedopt
from conftest import checksum
from fusedopt import reference

LIBRARY = fusedopt.get_cmake_dir().parent.parent / "libfusedopt.so"

pytestmark = pytest.mark.skipif(
    not LIBRARY.is_file(), reason=f"no {LIBRARY.name} in the installed package (not Linux?)"
)

OK, TYPE_ERROR, VALUE_ERROR = 0, 1, 2
FLOAT32, FLOAT64 = 0, 1
TORCH, KERAS = 0, 1
MAX_STATES, MAX_SCALARS = 3, 2
DTYPES = {np.dtype(np.float32): FLOAT32, np.dtype(np.float64): FLOAT64}
DTYPES[np.dtype(np.float16)] = 3  # FUSEDOPT_FLOAT16
try:
    import ml_dtypes

    DTYPES[np.dtype(ml_dtypes.bfloat16)] = 2  # FUSEDOPT_BFLOAT16
except ImportError:  # the bfloat16 test skips
    pass


class Tensor(ctypes.Structure):
    """fusedopt_tensor, as fusedopt.h lays it out."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("state", ctypes.c_void_p * MAX_STATES),
        ("scalars", ctypes.POINTER(ctypes.c_double)),
        ("size", ctypes.c_int64),
        ("step", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("new_state", ctypes.c_int32),
    ]


class TensorPrecision(ctypes.Structure):
    """fusedopt_tensor_precision."""

    _fields_ = [
        ("state_dtype", ctypes.c_int32),
        ("master", ctypes.c_void_p),
        ("absmax", ctypes.c_void_p * MAX_STATES),
    ]


class Precision(ctypes.Structure):
    """fusedopt_precision."""

    _fields_ = [("stochastic_rounding", ctypes.c_int32), ("seed", ctypes.c_uint64)]


class EwmaOptions(ctypes.Structure):
    _fields_ = [
        ("com", ctypes.c_double),
        ("adjust", ctypes.c_int32),
        ("ignore_na", ctypes.c_int32),
        ("min_periods", ctypes.c_int64),
    ]


# Opaque handles are plain pointers here; so are arrays of them.
HANDLE = ctypes.c_void_p
HANDLES = ctypes.POINTER(ctypes.c_void_p)
DOUBLE_P = ctypes.POINTER(ctypes.c_double)
INT64_P = ctypes.POINTER(ctypes.c_int64)
c_char_p, c_double, c_int32, c_int64 = (
    ctypes.c_char_p,
    ctypes.c_double,
    ctypes.c_int32,
    ctypes.c_int64,
)

# groups, num_groups, tensors, tensor_precision, num_tensors
GROUPS_AND_TENSORS_WITH_PRECISION = [
    HANDLES, c_int64, ctypes.POINTER(Tensor), ctypes.POINTER(TensorPrecision), c_int64
]  # fmt: skip

SIGNATURES = {
    "fusedopt_last_error": (c_char_p, []),
    "fusedopt_status_string": (c_char_p, [ctypes.c_int]),
    "fusedopt_version": (c_char_p, []),
    "fusedopt_algorithm_count": (c_int32, []),
    "fusedopt_algorithm_name": (c_char_p, [c_int32]),
    "fusedopt_options_create": (ctypes.c_int, [c_char_p, HANDLES]),
    "fusedopt_options_copy": (ctypes.c_int, [HANDLE, HANDLES]),
    "fusedopt_options_destroy": (None, [HANDLE]),
    "fusedopt_options_algorithm": (c_char_p, [HANDLE]),
    "fusedopt_options_set": (ctypes.c_int, [HANDLE, c_char_p, c_double]),
    "fusedopt_options_get": (ctypes.c_int, [HANDLE, c_char_p, DOUBLE_P]),
    "fusedopt_option_name": (c_char_p, [HANDLE, c_int32]),
    "fusedopt_options_check": (ctypes.c_int, [HANDLE]),
    "fusedopt_state_name": (c_char_p, [HANDLE, c_int32]),
    "fusedopt_states_used": (ctypes.c_uint32, [HANDLE]),
    "fusedopt_initial_state": (c_double, [HANDLE, c_int32]),
    "fusedopt_scalar_name": (c_char_p, [HANDLE, c_int32]),
    "fusedopt_initial_scalar": (c_double, [HANDLE, c_int32]),
    "fusedopt_takes_grad_scale": (c_int32, [HANDLE]),
    "fusedopt_step": (
        ctypes.c_int,
        [HANDLES, c_int64, ctypes.POINTER(Tensor), c_int64, DOUBLE_P],
    ),
    "fusedopt_plan_create": (
        ctypes.c_int,
        [HANDLES, c_int64, ctypes.POINTER(Tensor), c_int64, HANDLES],
    ),
    "fusedopt_step_with_precision": (
        ctypes.c_int,
        [*GROUPS_AND_TENSORS_WITH_PRECISION, DOUBLE_P, ctypes.POINTER(Precision)],
    ),
    "fusedopt_plan_create_with_precision": (
        ctypes.c_int,
        [*GROUPS_AND_TENSORS_WITH_PRECISION, ctypes.POINTER(Precision), HANDLES],
    ),
    "fusedopt_plan_step": (ctypes.c_int, [HANDLE, HANDLES, DOUBLE_P]),
    "fusedopt_plan_set_options": (ctypes.c_int, [HANDLE, c_int64, HANDLE]),
    "fusedopt_plan_steps": (ctypes.c_int, [HANDLE, INT64_P]),
    "fusedopt_plan_destroy": (None, [HANDLE]),
    "fusedopt_ewma_default_options": (EwmaOptions, []),
    "fusedopt_ewma": (
        ctypes.c_int,
        [DOUBLE_P, DOUBLE_P, c_int64, c_int64, c_int64, c_int64, ctypes.POINTER(EwmaOptions)],
    ),
    "fusedopt_cpu_isa": (c_char_p, []),
    "fusedopt_available_isas": (c_char_p, []),
    "fusedopt_set_cpu_isa": (ctypes.c_int, [c_char_p]),
    "fusedopt_num_threads": (c_int32, []),
    "fusedopt_set_num_threads": (ctypes.c_int, [c_int32]),
}


@functools.cache
def load() -> ctypes.CDLL:
    library = ctypes.CDLL(str(LIBRARY))
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes
    return library


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    return load()


def last_error() -> str:
    return load().fusedopt_last_error().decode()


def algorithms() -> list[str]:
    """fusedopt_algorithm_name's list (empty without the library: the tests skip)."""
    if not LIBRARY.is_file():
        return []
    lib = load()
    return [lib.fusedopt_algorithm_name(i).decode() for i in range(lib.fusedopt_algorithm_count())]


class Options:
    """An options object of the C ABI, destroyed with this wrapper. Values are given as Python
    numbers or bools (a flag); fusedopt's names (csrc/math/<name>.h)."""

    def __init__(self, algorithm: str | None = None, **values: float) -> None:
        self.handle = HANDLE()
        if algorithm is None:  # filled by copy()
            return
        status = load().fusedopt_options_create(algorithm.encode(), ctypes.byref(self.handle))
        assert status == OK, last_error()
        for name, value in values.items():
            self.set(name, value)

    def copy(self) -> Options:
        copied = Options()
        status = load().fusedopt_options_copy(self.handle, ctypes.byref(copied.handle))
        assert status == OK, last_error()
        return copied

    def __del__(self) -> None:
        load().fusedopt_options_destroy(self.handle)

    def set(self, name: str, value: float) -> int:
        return load().fusedopt_options_set(self.handle, name.encode(), float(value))

    def get(self, name: str) -> float:
        value = c_double()
        assert load().fusedopt_options_get(self.handle, name.encode(), ctypes.byref(value)) == OK
        return value.value

    def names(self, function: str) -> list[str]:
        listed, lookup = [], getattr(load(), function)
        while (name := lookup(self.handle, len(listed))) is not None:
            listed.append(name.decode())
        return listed

    @property
    def option_names(self) -> list[str]:
        return self.names("fusedopt_option_name")

    @property
    def state_names(self) -> list[str]:
        return self.names("fusedopt_state_name")

    @property
    def states_used(self) -> int:
        return load().fusedopt_states_used(self.handle)

    def initial_state(self, k: int) -> float:
        return load().fusedopt_initial_state(self.handle, k)

    @property
    def scalar_names(self) -> list[str]:
        return self.names("fusedopt_scalar_name")

    def initial_scalars(self) -> np.ndarray:
        """A new tensor's scalars array (FUSEDOPT_MAX_SCALARS doubles, those past the
        algorithm's count zero)."""
        scalars = np.zeros(MAX_SCALARS)
        for k in range(len(self.scalar_names)):
            scalars[k] = load().fusedopt_initial_scalar(self.handle, k)
        return scalars

    @property
    def takes_grad_scale(self) -> bool:
        return bool(load().fusedopt_takes_grad_scale(self.handle))


def address(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


def make_tensor(param, grad, states=(), *, step=1, group=0, new_state=0, scalars=None) -> Tensor:
    """The C struct of one tensor; a state given as None stays NULL."""
    states = list(states) + [None] * (MAX_STATES - len(states))
    t = Tensor(address(param), address(grad), (ctypes.c_void_p * MAX_STATES)(*map(address, states)))
    t.size, t.step, t.dtype, t.group, t.new_state = (
        param.size,
        step,
        DTYPES[param.dtype],
        group,
        new_state,
    )
    if scalars is not None:
        t.scalars = scalars.ctypes.data_as(DOUBLE_P)
    return t


def handles(groups: list[Options | None]):
    return (ctypes.c_void_p * len(groups))(*[None if g is None else g.handle for g in groups])


def scale(grad_scale: float | None):
    return None if grad_scale is None else ctypes.byref(c_double(grad_scale))


def step(groups: list[Options], tensors: list[Tensor], grad_scale: float | None = None) -> int:
    array = (Tensor * len(tensors))(*tensors)
    return load().fusedopt_step(
        handles(groups), len(groups), array, len(tensors), scale(grad_scale)
    )


class Plan:
    """A plan of the C ABI, destroyed with this wrapper."""

    def __init__(self, groups: list[Options], tensors: list[Tensor]) -> None:
        self.handle, self.size = HANDLE(), len(tensors)
        array = (Tensor * len(tensors))(*tensors)
        status = load().fusedopt_plan_create(
            handles(groups), len(groups), array, len(tensors), ctypes.byref(self.handle)
        )
        assert status == OK, last_error()

    def __del__(self) -> None:
        load().fusedopt_plan_destroy(self.handle)

    def step(self, grads: list[np.ndarray | None], grad_scale: float | None = None) -> int:
        pointers = (ctypes.c_void_p * max(len(grads), 1))(*map(address, grads))
        return load().fusedopt_plan_step(self.handle, pointers, scale(grad_scale))

    def set_options(self, group: int, options: Options) -> int:
        return load().fusedopt_plan_set_options(self.handle, group, options.handle)

    def steps(self) -> list[int]:
        out = (c_int64 * max(self.size, 1))()
        assert load().fusedopt_plan_steps(self.handle, out) == OK, last_error()
        return list(out[: self.size])


# ---- Library -----------------------------------------------------------------------------------


def test_version_and_isas_are_the_python_package_s(lib) -> None:
    assert lib.fusedopt_version().decode() == fusedopt.__version__
    assert lib.fusedopt_available_isas().decode().split(",") == fusedopt.available_isas()
    assert lib.fusedopt_cpu_isa().decode() in fusedopt.available_isas()
    assert lib.fusedopt_status_string(VALUE_ERROR) == b"value error"


# ---- Algorithms, options and their introspection ----------------------------------------------

# torch.optim spells some pairs as one tuple; fusedopt (and the reference) as two options.
TORCH_PAIRS = {
    "betas": ("beta1", "beta2"),
    "etas": ("etaminus", "etaplus"),
    "step_sizes": ("step_size_min", "step_size_max"),
}
# Arguments of torch's implementations, not hyperparameters.
TORCH_IMPLEMENTATION = {"foreach", "fused", "capturable", "differentiable"}
# fusedopt's own options, which torch.optim has no argument for: float32_scalars (NAdam, ASGD)
# says how the per-tensor scalars are stored. Its default, 1 (float32), is what torch does under
# its default dtype, but as a setting it is torch's default dtype, not an optimizer argument.
FUSEDOPT_OWN = {"float32_scalars"}


@pytest.mark.parametrize("algorithm", algorithms())
def test_default_options_are_torch_optim_s(algorithm: str) -> None:
    torch = pytest.importorskip("torch")
    classes = {name.lower(): name for name in dir(torch.optim) if name[:1].isupper()}
    if algorithm not in classes:
        pytest.skip(f"torch.optim has no {algorithm}")
    optimizer = getattr(torch.optim, classes[algorithm])
    defaults = optimizer([torch.zeros(1, requires_grad=True)]).defaults
    expected = {}
    for name, value in defaults.items():
        if name in TORCH_PAIRS:
            expected.update(zip(TORCH_PAIRS[name], value))
        elif name not in TORCH_IMPLEMENTATION:
            expected[name] = float(value)
    options = Options(algorithm)
    names = options.option_names
    assert names[-1] == "convention" and options.get("convention") == TORCH
    compared = [name for name in names[:-1] if name not in FUSEDOPT_OWN]
    assert {name: options.get(name) for name in compared} == expected
    assert all(options.get(name) == 1.0 for name in set(names) & FUSEDOPT_OWN)


def test_algorithms_are_listed_by_index(lib) -> None:
    names = algorithms()
    assert set(names) == set(DESCRIPTIONS)
    assert len(set(names)) == len(names)
    assert lib.fusedopt_algorithm_name(len(names)) is None
    assert lib.fusedopt_algorithm_name(-1) is None
    for name in names:
        assert lib.fusedopt_options_algorithm(Options(name).handle).decode() == name


# csrc/math/<name>.h's fields, states and per-tensor scalars, in order.
DESCRIPTIONS = {
    "sgd": (
        ["lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "convention"],
        ["momentum_buffer"],
        [],
    ),
    "adagrad": (
        ["lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize",
         "convention"],
        ["sum"],
        [],
    ),
    "rmsprop": (
        ["lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize", "convention"],
        ["square_avg", "momentum_buffer", "grad_avg"],
        [],
    ),
    "adam": (
        ["lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize",
         "decoupled_weight_decay", "convention"],
        ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        [],
    ),
    "adadelta": (
        ["lr", "rho", "eps", "weight_decay", "maximize", "convention"],
        ["square_avg", "acc_delta"],
        [],
    ),
    "adamax": (
        ["lr", "beta1", "beta2", "eps", "weight_decay", "maximize", "convention"],
        ["exp_avg", "exp_inf"],
        [],
    ),
    "nadam": (
        ["lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay",
         "decoupled_weight_decay", "maximize", "float32_scalars", "convention"],
        ["exp_avg", "exp_avg_sq"],
        ["mu_product"],
    ),
    "radam": (
        ["lr", "beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay", "maximize",
         "convention"],
        ["exp_avg", "exp_avg_sq"],
        [],
    ),
    "rprop": (
        ["lr", "etaminus", "etaplus", "step_size_min", "step_size_max", "maximize", "convention"],
        ["prev", "step_size"],
        [],
    ),
    "asgd": (
        ["lr", "lambd", "alpha", "t0", "weight_decay", "maximize", "float32_scalars",
         "convention"],
        ["ax"],
        ["eta", "mu"],
    ),
    "lion": (
        ["lr", "beta1", "beta2", "weight_decay", "maximize", "convention"],
        ["exp_avg"],
        [],
    ),
    "lamb": (
        ["lr", "beta1", "beta2", "eps", "weight_decay", "convention"],
        ["exp_avg", "exp_avg_sq"],
        [],
    ),
}  # fmt: skip


@pytest.mark.parametrize("algorithm", sorted(DESCRIPTIONS))
def test_option_state_and_scalar_names_are_the_description_s(lib, algorithm: str) -> None:
    options = Options(algorithm)
    described = (options.option_names, options.state_names, options.scalar_names)
    assert described == DESCRIPTIONS[algorithm]
    assert len(options.state_names) <= MAX_STATES and len(options.scalar_names) <= MAX_SCALARS
    for function in ("fusedopt_option_name", "fusedopt_state_name", "fusedopt_scalar_name"):
        assert getattr(lib, function)(options.handle, -1) is None
        assert getattr(lib, function)(None, 0) is None


@pytest.mark.parametrize("algorithm", algorithms())
def test_every_option_reads_back_what_was_set(algorithm: str) -> None:
    options = Options(algorithm)
    assert options.state_names and len(options.state_names) <= MAX_STATES
    flags = flag_names(algorithm)
    for name in options.option_names:
        value = KERAS if name == "convention" else 1.0 if name in flags else 0.125
        assert options.set(name, value) == OK, last_error()
        assert options.get(name) == value
    assert options.set("convention", TORCH) == OK and options.get("convention") == TORCH


def flag_names(algorithm: str) -> set[str]:
    """The options of `algorithm` that are flags (0 or 1 only), from its native description."""
    from fusedopt._engine import describe

    return {f.name for f in describe(algorithm).fields if f.kind == "flag"}


@pytest.mark.parametrize(
    "algorithm, values, used",
    [
        ("sgd", {}, 0b000),
        ("sgd", {"momentum": 0.9}, 0b001),
        ("adagrad", {}, 0b001),
        ("rmsprop", {}, 0b001),
        ("rmsprop", {"momentum": 0.5}, 0b011),
        ("rmsprop", {"centered": True}, 0b101),
        ("adam", {}, 0b011),
        ("adam", {"amsgrad": True}, 0b111),
        ("adadelta", {}, 0b11),
        ("adamax", {}, 0b11),
        ("nadam", {}, 0b11),
        ("radam", {}, 0b11),
        ("rprop", {}, 0b11),
        ("asgd", {}, 0b1),
        ("lion", {}, 0b1),
        ("lamb", {}, 0b11),
    ],
)
def test_states_used_follow_the_options(lib, algorithm, values, used) -> None:
    assert Options(algorithm, **values).states_used == used
    assert lib.fusedopt_states_used(None) == 0


def test_initial_states_follow_the_options(lib) -> None:
    """Adagrad's sum starts at initial_accumulator_value and Rprop's step_size at lr; every other
    state at zero, a state these options do not use included."""
    assert Options("adagrad").initial_state(0) == 0.0
    assert Options("adagrad", initial_accumulator_value=0.1).initial_state(0) == 0.1
    assert Options("adam").initial_state(2) == 0.0
    rprop = Options("rprop", lr=0.3)
    assert rprop.state_names == ["prev", "step_size"]
    assert (rprop.initial_state(0), rprop.initial_state(1)) == (0.0, 0.3)
    assert Options("rprop").initial_state(1) == 0.01  # torch's default lr


def test_initial_scalars_follow_the_options() -> None:
    """NAdam's mu_product starts at 1; ASGD's eta at lr (rounded to float32 unless
    float32_scalars is 0) and mu at 1."""
    assert Options("nadam").initial_scalars().tolist() == [1.0, 0.0]
    assert Options("asgd", lr=0.1).initial_scalars().tolist() == [float(np.float32(0.1)), 1.0]
    assert Options("asgd", lr=0.1, float32_scalars=False).initial_scalars().tolist() == [0.1, 1.0]
    assert Options("adam").initial_scalars().tolist() == [0.0, 0.0]


@pytest.mark.parametrize("algorithm", algorithms())
def test_initial_values_past_the_last_are_nan(lib, algorithm: str) -> None:
    """fusedopt_initial_state and fusedopt_initial_scalar return a double: for a k that is no
    state (scalar) of the algorithm, or NULL options, it is NaN rather than a plausible value."""
    options = Options(algorithm)
    states, scalars = len(options.state_names), len(options.scalar_names)
    for k in range(states):
        assert not math.isnan(options.initial_state(k))
    for k in (-1, states, MAX_STATES, 1 << 30):
        assert math.isnan(options.initial_state(k)), k
    for k in range(scalars):
        assert not math.isnan(lib.fusedopt_initial_scalar(options.handle, k))
    for k in (-1, scalars, MAX_SCALARS):
        assert math.isnan(lib.fusedopt_initial_scalar(options.handle, k)), k
    assert math.isnan(lib.fusedopt_initial_state(None, 0))
    assert math.isnan(lib.fusedopt_initial_scalar(None, 0))


@pytest.mark.parametrize("algorithm", algorithms())
def test_takes_grad_scale_says_whether_a_step_takes_one(lib, algorithm: str) -> None:
    options = Options(algorithm)
    status = step([options], [], grad_scale=2.0)
    assert options.takes_grad_scale == (status == OK), last_error()
    assert options.takes_grad_scale == (algorithm in ("sgd", "adam"))
    assert lib.fusedopt_takes_grad_scale(None) == 0


@pytest.mark.parametrize("algorithm", algorithms())
def test_a_copy_holds_every_value_and_is_independent(lib, algorithm: str) -> None:
    source = Options(algorithm)
    flags = flag_names(algorithm)
    for i, name in enumerate(source.option_names):
        if name == "convention":
            continue
        default = source.get(name)
        value = 0.0 if default else 1.0 if name in flags else 1.0 + i / 8
        assert source.set(name, value) == OK, last_error()
    copied = source.copy()
    assert copied.handle.value != source.handle.value
    assert lib.fusedopt_options_algorithm(copied.handle).decode() == algorithm
    assert {n: copied.get(n) for n in copied.option_names} == {
        n: source.get(n) for n in source.option_names
    }
    assert copied.set("lr", 0.125) == OK and source.get("lr") != 0.125
    del source  # the copy outlives its source
    assert copied.get("lr") == 0.125


def test_options_copy_refuses_null(lib) -> None:
    handle = HANDLE()
    assert lib.fusedopt_options_copy(None, ctypes.byref(handle)) == TYPE_ERROR
    assert "options is NULL" in last_error()
    assert handle.value is None
    assert lib.fusedopt_options_copy(Options("adam").handle, None) == TYPE_ERROR
    assert "copy is NULL" in last_error()


@pytest.mark.parametrize(("algorithm", "flag"), [("adam", "amsgrad"), ("sgd", "nesterov"),
                                               ("sgd", "maximize")])  # fmt: skip
def test_a_flag_is_exactly_0_or_1(algorithm: str, flag: str) -> None:
    """The header says a flag is 0 or 1, and Python refuses amsgrad=0.5: any other number was
    taken as 1. Now a value error naming the flag, which keeps its value."""
    options = Options(algorithm)
    assert options.set(flag, 1.0) == OK and options.get(flag) == 1.0
    assert options.set(flag, 0.0) == OK and options.get(flag) == 0.0
    for value in (0.5, math.nan, 7.0, -1.0, 2.0, math.inf):
        assert options.set(flag, value) == VALUE_ERROR, value
        assert f"Invalid {flag}: " in last_error() and "a flag is 0 or 1" in last_error()
        assert options.get(flag) == 0.0


def test_options_check_names_the_invalid_hyperparameter(lib) -> None:
    assert lib.fusedopt_options_check(Options("adam").handle) == OK
    options = Options("adam", beta2=1.0)  # set is not checked; a step or check is
    assert lib.fusedopt_options_check(options.handle) == VALUE_ERROR
    assert "Invalid beta2: 1" in last_error()
    assert lib.fusedopt_options_check(None) == TYPE_ERROR


def test_unknown_names_are_refused(lib) -> None:
    handle = HANDLE()
    assert lib.fusedopt_options_create(b"adamm", ctypes.byref(handle)) == VALUE_ERROR
    assert "unknown algorithm 'adamm'" in last_error()
    assert handle.value is None
    assert lib.fusedopt_options_create(None, ctypes.byref(handle)) == TYPE_ERROR
    assert "algorithm is NULL" in last_error()
    assert lib.fusedopt_options_create(b"adam", None) == TYPE_ERROR
    options = Options("adam")
    assert options.set("betas", 0.5) == VALUE_ERROR
    assert "adam has no option 'betas'" in last_error()
    value = c_double(7.0)
    assert lib.fusedopt_options_get(options.handle, b"momentum", ctypes.byref(value)) == VALUE_ERROR
    assert "adam has no option 'momentum'" in last_error()
    assert value.value == 7.0
    assert lib.fusedopt_options_set(None, b"lr", 1.0) == TYPE_ERROR


def test_a_bad_convention_is_refused_when_set() -> None:
    options = Options("sgd")
    assert options.set("convention", 5) == VALUE_ERROR
    assert "convention" in last_error()
    assert options.get("convention") == TORCH


def test_destroying_null_is_a_no_op(lib) -> None:
    lib.fusedopt_options_destroy(None)
    lib.fusedopt_plan_destroy(None)


# ---- Steps against the reference ----------------------------------------------------------------

# fusedopt's option names as Keras spells them (fusedopt.keras), and Keras' names of the states
# and of the scalars.
KERAS_NAMES = {
    "sgd": {"lr": "learning_rate", "momentum": "momentum", "nesterov": "nesterov"},
    "adagrad": {"lr": "learning_rate", "initial_accumulator_value": "initial_accumulator_value",
                "eps": "epsilon"},
    "rmsprop": {"lr": "learning_rate", "alpha": "rho", "momentum": "momentum", "eps": "epsilon",
                "centered": "centered"},
    "adam": {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon",
             "amsgrad": "amsgrad"},
    "adadelta": {"lr": "learning_rate", "rho": "rho", "eps": "epsilon"},
    "adamax": {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon"},
    "nadam": {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon"},
    "lion": {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2"},
    "lamb": {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon"},
}  # fmt: skip
KERAS_STATES = {
    "sgd": ("momentum",),
    "adagrad": ("accumulator",),
    "rmsprop": ("velocity", "momentum", "average_gradient"),
    "adam": ("momentum", "velocity", "velocity_hat"),
    "adadelta": ("accumulated_grad", "accumulated_delta_var"),
    "adamax": ("momentum", "norm"),
    "nadam": ("momentum", "velocity"),
    "lion": ("momentum",),
    "lamb": ("momentum", "velocity"),
}
KERAS_SCALARS = {"nadam": ("u_product",)}
# Native options that Keras' convention takes at one value, which the Keras reference has built
# in: Keras' Nadam is the native nadam with momentum_decay = 1 (fusedopt.keras.Nadam).
KERAS_FIXED = {"nadam": {"momentum_decay": 1.0}}

# (algorithm, group 0's options, group 1's changes to them, grad_scale). Every option is set away
# from its default somewhere, so an option read from the wrong place shows; group 1 changes the
# states used (a group keeping a state next to one keeping none) or a branch of the math.
TORCH_CASES = [
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01, maximize=True),
     dict(momentum=0.0, lr=0.05), 4.0),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
     dict(lr=0.2, nesterov=False), None),
    ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, eps=1e-3, maximize=True,
                     initial_accumulator_value=0.1), dict(lr_decay=0.0, lr=0.05), None),
    ("rmsprop", dict(lr=0.03, alpha=0.9, eps=1e-3, weight_decay=0.01, momentum=0.5),
     dict(momentum=0.0, centered=True), None),
    ("rmsprop", dict(lr=0.01, alpha=0.9, centered=True, maximize=True),
     dict(alpha=0.4), None),  # torch.lerp's other rounding form for grad_avg
    ("adam", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-3, weight_decay=0.1, maximize=True),
     dict(amsgrad=True), 4.0),
    ("adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True, decoupled_weight_decay=True),
     dict(beta1=0.3, amsgrad=False), None),  # and for exp_avg
    ("adadelta", dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.01, maximize=True),
     dict(weight_decay=0.0, rho=0.95), None),
    ("adamax", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-3, weight_decay=0.1, maximize=True),
     dict(beta1=0.3, weight_decay=0.0), None),  # the other lerp form for exp_avg
    ("nadam", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-3, weight_decay=0.1,
                   momentum_decay=0.01, maximize=True),
     dict(decoupled_weight_decay=True), None),  # mu_product stored as float32 values (default)
    ("nadam", dict(lr=0.02, beta1=0.95, weight_decay=0.05, decoupled_weight_decay=True,
                   float32_scalars=False),
     dict(beta1=0.3, weight_decay=0.0), None),  # as float64 values; the other lerp form
    ("radam", dict(lr=0.01, beta1=0.8, eps=1e-3, weight_decay=0.1, maximize=True),
     dict(beta2=0.9, decoupled_weight_decay=True), None),  # rho_t > 5 from t = 6 in both groups
    ("radam", dict(lr=0.01, beta1=0.3, beta2=0.95, weight_decay=0.1, decoupled_weight_decay=True),
     dict(beta1=0.9, weight_decay=0.0), None),  # from t = 5; the other lerp form in group 0
    ("rprop", dict(lr=0.05, etaminus=0.4, etaplus=1.3, step_size_min=0.03, step_size_max=0.08,
                   maximize=True),
     dict(step_size_min=1e-6, step_size_max=50.0), None),  # clamped at both ends, or not
    ("asgd", dict(lr=0.05, lambd=0.01, alpha=0.6, t0=1.0, weight_decay=0.01, maximize=True),
     dict(t0=1e6, weight_decay=0.0), None),  # averaging (mu < 1) from t = 3, or never
    ("asgd", dict(lr=0.1, lambd=0.5, alpha=0.9, t0=0.0, float32_scalars=False),
     dict(lr=0.02), None),  # eta and mu as float64 values
    ("lion", dict(lr=0.01, beta1=0.8, beta2=0.95, weight_decay=0.1, maximize=True),
     dict(beta1=0.3, beta2=0.4, weight_decay=0.0), None),  # the other lerp form for both
]  # fmt: skip
KERAS_CASES = [
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
     dict(momentum=0.0, nesterov=False), None),
    ("adagrad", dict(lr=0.1, initial_accumulator_value=0.1, eps=1e-7, weight_decay=0.004),
     dict(lr=0.3), None),
    ("rmsprop", dict(lr=0.02, alpha=0.8, momentum=0.5, eps=1e-7, centered=True, weight_decay=0.01),
     dict(momentum=0.0, centered=False), None),
    ("adam", dict(lr=0.01, beta1=0.85, beta2=0.99, eps=1e-7, amsgrad=True, weight_decay=0.004),
     dict(amsgrad=False, lr=0.02), None),
    ("adadelta", dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.004),
     dict(weight_decay=0.0, rho=0.95), None),
    ("adamax", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-3, weight_decay=0.004),
     dict(weight_decay=0.0, beta1=0.5), None),
    # One beta1 in both groups: u_product is optimizer-wide, every tensor gets the same. The
    # reference keeps it as a Python float, as Keras does for float64 variables
    # (float32_scalars = 0); Keras (and fusedopt.keras) keep a float32 value for float32 variables
    # (float32_scalars = 1), which the reference does not model: see
    # test_float32_scalars_store_float32_values.
    ("nadam", dict(lr=0.01, beta1=0.85, beta2=0.99, eps=1e-3, weight_decay=0.004,
                   float32_scalars=False, **KERAS_FIXED["nadam"]),
     dict(weight_decay=0.0, lr=0.02, beta2=0.9), None),
    ("lion", dict(lr=0.01, beta1=0.85, beta2=0.95, weight_decay=0.004),
     dict(beta1=1.0, beta2=0.5, weight_decay=0.0), None),
    ("lamb", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-3, weight_decay=0.004),
     dict(weight_decay=0.0, eps=1e-7, lr=0.05), None),
]  # fmt: skip
CASES = [(TORCH, *c) for c in TORCH_CASES] + [(KERAS, *c) for c in KERAS_CASES]
CASE_IDS = [f"{'torch' if c[0] == TORCH else 'keras'}-{c[1]}-{i}" for i, c in enumerate(CASES)]

# One call's tensors: their sizes, groups and the steps they have taken before (each tensor keeps
# its own t, so one call mixes step numbers). 65537 elements are 17 blocks of LAMB's sums.
SIZES = [0, 1, 17, 33, 65537, 5]
GROUPS = [0, 1, 0, 1, 0, 1]
TAKEN = [0, 0, 0, 3, 5, 0]


def test_every_algorithm_has_reference_cases() -> None:
    covered = {(convention, c[0]) for convention, *c in CASES}
    missing = {(c, a) for a in algorithms() for c in (TORCH, KERAS)} - covered
    # An algorithm offered in one convention only refuses the other: that is its case.
    missing = {(c, a) for c, a in missing if offered(a, c)}
    assert not missing, f"add (convention, algorithm) {sorted(missing)} to CASES in {__file__}"
    # Every option is set away from its default in some case of each convention it offers.
    for convention, algorithm in covered:
        options = Options(algorithm, convention=convention)
        set_here = {
            name
            for c, a, values, changes, _ in CASES
            if (c, a) == (convention, algorithm)
            for given in (values, changes)
            for name, value in given.items()
            if value != options.get(name)
        }
        fixed = set(KERAS_FIXED.get(algorithm, {})) if convention == KERAS else set()
        unset = set(options.option_names) - set_here - fixed - {"convention"}
        if convention == KERAS:  # options of torch's math that Keras' convention does not read
            unset -= {"maximize", "decoupled_weight_decay", "lr_decay", "dampening"}
        assert not unset, (convention, algorithm, sorted(unset))


def test_the_convention_an_algorithm_lacks_is_refused() -> None:
    """RAdam, Rprop and ASGD are PyTorch's only, LAMB Keras' only: options in the other
    convention are refused, naming the convention."""
    only = {"radam": TORCH, "rprop": TORCH, "asgd": TORCH, "lamb": KERAS}
    for algorithm in algorithms():
        for convention in (TORCH, KERAS):
            expected = only.get(algorithm, convention) == convention
            assert offered(algorithm, convention) == expected, (algorithm, convention)
            if not expected:
                assert "convention" in last_error() and "only the" in last_error()


def shares_scalars(convention: int, algorithm: str) -> bool:
    """Keras keeps an algorithm's scalars once for the whole optimizer (Nadam's u_product): every
    tensor of a call is given the same value, and all tensors are at the same step."""
    return convention == KERAS and bool(Options(algorithm).scalar_names)


def reference_step(convention: int, algorithm: str, options: dict, grad_scale):
    """The reference's step for these fusedopt options, as (p, g, state) -> (p, state)."""
    kwargs = dict(options)
    if convention == TORCH:
        function = getattr(reference, f"torch_{algorithm}")
        if "float32_scalars" in kwargs:  # the reference's scalar_dtype
            kwargs["scalar_dtype"] = "float32" if kwargs.pop("float32_scalars") else "float64"
        if grad_scale is not None:
            kwargs["grad_scale"] = grad_scale
    else:
        function = getattr(reference, f"keras_{algorithm}")
        for name, value in KERAS_FIXED.get(algorithm, {}).items():
            assert kwargs.pop(name) == value, f"Keras' {algorithm} takes {name}={value}"
        kwargs.pop("float32_scalars", None)  # the reference's u_product is a float64 value
        names = KERAS_NAMES[algorithm] | {"weight_decay": "weight_decay"}
        kwargs = {names[name]: value for name, value in kwargs.items()}
    return functools.partial(function, **kwargs)


def state_key(convention: int, algorithm: str, options: Options, k: int) -> str:
    return KERAS_STATES[algorithm][k] if convention == KERAS else options.state_names[k]


def scalar_key(convention: int, algorithm: str, options: Options, k: int) -> str:
    return KERAS_SCALARS[algorithm][k] if convention == KERAS else options.scalar_names[k]


class Run(NamedTuple):
    params: list[np.ndarray]
    buffers: list[list[np.ndarray | None]]
    scalars: list[np.ndarray | None]  # each tensor's, as fusedopt left them
    expected: list[np.ndarray]  # the reference's params
    states: list[dict]  # and states
    groups: list[Options]


def run_case(convention, algorithm, values, changes, grad_scale, dtype, steps=3, compare=True):
    """Steps fusedopt_step and (with compare) the reference side by side."""
    rng = np.random.default_rng(0)
    group_values = [values, values | changes]
    groups = [Options(algorithm, convention=convention, **v) for v in group_values]
    shared = shares_scalars(convention, algorithm)
    taken_before = [0] * len(SIZES) if shared else TAKEN
    params = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    buffers = [
        [
            np.full(n, groups[g].initial_state(k), dtype)
            if groups[g].states_used >> k & 1
            else None
            for k in range(len(groups[g].state_names))
        ]
        for n, g in zip(SIZES, GROUPS)
    ]
    # Each tensor's scalars start at its group's fusedopt_initial_scalar (ASGD's eta: its lr).
    scalars = [groups[g].initial_scalars() if groups[g].scalar_names else None for g in GROUPS]
    expected = [p.astype(np.float64) for p in params]
    states: list[dict] = [{"step": taken} for taken in taken_before]
    steppers = [reference_step(convention, algorithm, v, grad_scale) for v in group_values]
    for call in range(steps):
        grads = [rng.standard_normal(n).astype(dtype) for n in SIZES]
        if shared:  # the optimizer's u_product before this apply, given to every tensor
            for i, s in enumerate(scalars):
                s[:] = scalars[0]
                states[i] = states[i] | {KERAS_SCALARS[algorithm][0]: float(s[0])}
        if compare:
            for i, g in enumerate(grads):
                expected[i], states[i] = steppers[GROUPS[i]](expected[i], g, states[i])
        # An empty tensor may come with NULL buffers (an empty std::vector's data()), but its
        # scalars are still needed.
        tensors = [
            make_tensor(p, g, b, step=call + 1 + t, group=group, new_state=call == 0, scalars=s)
            if p.size
            else Tensor(size=0, step=call + 1 + t, dtype=DTYPES[p.dtype], group=group,
                        scalars=None if s is None else s.ctypes.data_as(DOUBLE_P))
            for p, g, b, s, t, group in zip(params, grads, buffers, scalars, taken_before, GROUPS)
        ]  # fmt: skip
        assert step(groups, tensors, grad_scale) == OK, last_error()
        assert last_error() == ""
        if shared:
            assert all(np.array_equal(s, scalars[0]) for s in scalars), scalars
    return Run(params, buffers, scalars, expected, states, groups)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention, algorithm, values, changes, grad_scale", CASES, ids=CASE_IDS)
def test_each_step_matches_the_reference(
    convention, algorithm, values, changes, grad_scale, dtype
) -> None:
    run = run_case(convention, algorithm, values, changes, grad_scale, dtype)
    tolerance = 5e-6 if dtype == np.float32 else 1e-12
    compared = 0
    for p, e, b, sc, s, g in zip(
        run.params, run.expected, run.buffers, run.scalars, run.states, GROUPS
    ):
        np.testing.assert_allclose(p, e, rtol=tolerance, atol=tolerance)
        for k, buffer in enumerate(b):
            if buffer is not None:
                key = state_key(convention, algorithm, run.groups[g], k)
                np.testing.assert_allclose(buffer, s[key], rtol=tolerance, atol=tolerance)
                compared += 1
        # The scalars are host doubles, computed alike whatever the params' dtype: the same
        # values as the reference's, rounded to float32 where both say so.
        names = run.groups[g].scalar_names
        for k in range(len(names)):
            key = scalar_key(convention, algorithm, run.groups[g], k)
            assert sc[k] == s[key], (key, sc[k], s[key])
        if sc is not None:
            assert not sc[len(names) :].any()  # the unused tail is left alone
            assert not np.array_equal(sc, run.groups[g].initial_scalars())
    assert compared > 0


@pytest.mark.parametrize("algorithm", [a for a in algorithms() if Options(a).scalar_names])
def test_float32_scalars_store_float32_values(algorithm: str) -> None:
    """float32_scalars = 1 (the default) stores every scalar as a float32 value, as torch keeps
    them under its default dtype and Keras for float32 variables; 0 keeps doubles. Either way they
    are close to the float64 reference's."""
    for convention in (c for c in (TORCH, KERAS) if offered(algorithm, c)):
        case = next(c for c in CASES if c[:2] == (convention, algorithm))
        for float32_scalars in (True, False):
            values = case[2] | {"float32_scalars": float32_scalars}
            run = run_case(*case[:2], values, *case[3:], np.float64)
            exact = (convention == TORCH) or not float32_scalars  # as the reference rounds
            for sc, s, g in zip(run.scalars, run.states, GROUPS):
                names = run.groups[g].scalar_names
                for k in range(len(names)):
                    key = scalar_key(convention, algorithm, run.groups[g], k)
                    rounded = float(np.float32(sc[k])) == sc[k]
                    if float32_scalars:
                        assert rounded, (key, sc[k])
                    assert sc[k] == pytest.approx(s[key], rel=0 if exact else 1e-7), key
            # A double product is not a float32 value (mu_product after 3 steps; eta).
            if not float32_scalars:
                assert any(float(np.float32(s[0])) != s[0] for s in run.scalars)


def test_set_cpu_isa_switches_the_kernels_with_identical_bits(lib) -> None:
    previous = lib.fusedopt_cpu_isa()
    results = {}
    try:
        for isa in fusedopt.available_isas():
            assert lib.fusedopt_set_cpu_isa(isa.encode()) == OK
            assert lib.fusedopt_cpu_isa().decode() == isa
            arrays = []
            for case in CASES:
                for dtype in (np.float32, np.float64):
                    run = run_case(*case, dtype, compare=False)
                    arrays += run.params + [b for bs in run.buffers for b in bs if b is not None]
                    arrays += [s for s in run.scalars if s is not None]
            results[isa] = checksum(*arrays)
    finally:
        lib.fusedopt_set_cpu_isa(previous)
    assert len(set(results.values())) == 1, results


def lamb_call(sizes: list[int], dtype=np.float64, seed: int = 4, zero: int | None = None):
    """Params, grads and states of one LAMB call; param `zero` all zeros (its norm is 0)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    if zero is not None:
        params[zero][:] = 0
    grads = [[rng.standard_normal(n).astype(dtype) for n in sizes] for _ in range(3)]
    states = [[np.zeros(n, dtype), np.zeros(n, dtype)] for n in sizes]
    return params, grads, states


def step_lamb(options: Options, params, grads, states) -> None:
    for call, g in enumerate(grads):
        tensors = [make_tensor(p, gi, s, step=call + 1) for p, gi, s in zip(params, g, states)]
        assert step([options], tensors) == OK, last_error()


def test_lamb_s_trust_ratio_comes_from_each_whole_tensor(lib) -> None:
    """LAMB's norms are sums over each tensor (in blocks of 4096 elements, added in block order):
    a tensor of many blocks steps as the reference steps the whole variable, to the same bits
    alone or next to other tensors, on one thread or several; a zero param takes ratio 1."""
    options = Options("lamb", convention=KERAS, lr=0.01, weight_decay=0.004)
    sizes = [3, 4 * 4096 + 1, 5, 70001, 12, 0]
    params, grads, states = lamb_call(sizes, zero=2)
    expected = [(p.copy(), {}) for p in params]
    threads = lib.fusedopt_num_threads()
    try:
        assert lib.fusedopt_set_num_threads(4) == OK
        step_lamb(options, params, grads, states)
        for g in grads:
            expected = [
                reference.keras_lamb(p, gi, s, learning_rate=0.01, weight_decay=0.004)
                for (p, s), gi in zip(expected, g)
            ]
        for p, s, (e, es) in zip(params, states, expected):
            np.testing.assert_allclose(p, e, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(s[1], es["velocity"], rtol=1e-12, atol=1e-12)
        assert params[2].any()  # the zero param moved, by lr * update
        for threads_now in (1, 3):
            assert lib.fusedopt_set_num_threads(threads_now) == OK
            for i in (1, 2, 3):  # each tensor alone
                p, g, s = lamb_call(sizes, zero=2)
                step_lamb(options, [p[i]], [[gi[i]] for gi in g], [s[i]])
                assert checksum(p[i], *s[i]) == checksum(params[i], *states[i]), (threads_now, i)
    finally:
        lib.fusedopt_set_num_threads(threads)


def test_a_grad_scale_is_refused_by_an_algorithm_that_takes_none() -> None:
    p, g, s = np.ones(4), np.ones(4), np.zeros(4)
    before = checksum(p, g, s)
    assert step([Options("adagrad")], [make_tensor(p, g, [s])], grad_scale=2.0) == VALUE_ERROR
    assert "grad_scale: adagrad does not take a grad scale" in last_error()
    assert checksum(p, g, s) == before


# ---- Bad calls ----------------------------------------------------------------------------------


def amsgrad_arrays(n: int = 33) -> list[np.ndarray]:
    """param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq: the buffers of one AMSGrad tensor."""
    rng = np.random.default_rng(1)
    return [rng.standard_normal(n) for _ in range(5)]


def spoil(field: str, value) -> Callable:
    return lambda tensors, groups: setattr(tensors[1], field, value)


def spoil_state(k: int, value: Callable) -> Callable:
    def change(tensors, groups):
        tensors[1].state[k] = value(tensors)

    return change


def second_group(options: Options) -> Callable:
    def change(tensors, groups):
        groups.append(options)
        tensors[1].group = 1

    return change


def unscaled(change: Callable | None = None) -> Callable:
    """A call with a grad scale, so the grads are written too."""

    def apply(tensors, groups):
        if change:
            change(tensors, groups)
        return 2.0

    return apply


BAD_CALLS = [
    (spoil_state(2, lambda t: None), VALUE_ERROR, "max_exp_avg_sq[1] is missing"),
    (spoil("dtype", 7), TYPE_ERROR, "params[1] has dtype 7"),
    (spoil("grad", None), TYPE_ERROR, "tensors[1].grad is NULL"),
    (spoil("param", None), TYPE_ERROR, "tensors[1].param is NULL"),
    (spoil("group", 1), VALUE_ERROR, "group index of params[1]"),
    (spoil("group", -1), VALUE_ERROR, "group index of params[1]"),
    (spoil("step", 0), VALUE_ERROR, "step of params[1]"),
    (spoil("size", -1), VALUE_ERROR, "tensors[1].size"),
    (spoil_state(0, lambda t: t[0].param), VALUE_ERROR, "overlaps"),
    (spoil_state(1, lambda t: t[1].state[0]), VALUE_ERROR, "overlaps"),
    (lambda t, g: setattr(t[1], "grad", t[0].grad), OK, ""),  # grads only read may be shared
    (unscaled(lambda t, g: setattr(t[1], "grad", t[0].grad)), VALUE_ERROR,
     "grads[1] overlaps grads[0]"),  # grads written back may not
    (second_group(Options("adam", amsgrad=True, beta2=1.0)), VALUE_ERROR,
     "groups[1]: Invalid beta2: 1"),
    (second_group(Options("sgd")), VALUE_ERROR, "groups[1] holds options for sgd, not adam"),
    (second_group(None), TYPE_ERROR, "groups[1] is NULL"),
]  # fmt: skip


@pytest.mark.parametrize("change, status, message", BAD_CALLS)
def test_a_bad_call_returns_its_status_and_writes_nothing(change, status, message) -> None:
    arrays = [amsgrad_arrays(), amsgrad_arrays()]
    before = checksum(*arrays[0], *arrays[1])
    tensors = [make_tensor(a[0], a[1], a[2:], step=1) for a in arrays]
    groups = [Options("adam", amsgrad=True)]
    grad_scale = change(tensors, groups)
    assert step(groups, tensors, grad_scale) == status
    assert message in last_error()
    if status != OK:
        assert message
        assert checksum(*arrays[0], *arrays[1]) == before


def test_a_call_without_tensors_or_groups_is_refused(lib) -> None:
    options = Options("adam")
    assert step([options], []) == OK
    assert lib.fusedopt_step(handles([options]), 0, None, 0, None) == VALUE_ERROR
    assert "num_groups must be >= 1" in last_error()
    assert lib.fusedopt_step(None, 1, None, 0, None) == TYPE_ERROR
    assert "groups is NULL" in last_error()
    assert lib.fusedopt_step(handles([options]), 1, None, 2, None) == TYPE_ERROR
    assert "tensors is NULL but num_tensors is 2" in last_error()
    assert lib.fusedopt_step(handles([options]), 1, None, -1, None) == VALUE_ERROR
    assert "num_tensors must be >= 0" in last_error()


def test_the_last_error_belongs_to_the_thread_and_clears_on_success() -> None:
    options = Options("adam")
    assert step([options], [Tensor(size=-1, step=1)]) == VALUE_ERROR
    seen_by_other_thread = []
    worker = threading.Thread(target=lambda: seen_by_other_thread.append(last_error()))
    worker.start()
    worker.join()
    assert seen_by_other_thread == [""]
    assert last_error() != ""
    a = amsgrad_arrays()
    assert step([options], [make_tensor(a[0], a[1], a[2:4], step=1)]) == OK
    assert last_error() == ""


# ---- Plans -------------------------------------------------------------------------------------


# Options that use every state of an algorithm.
EVERY_STATE = {
    "sgd": dict(momentum=0.5),
    "adagrad": dict(initial_accumulator_value=0.1),
    "rmsprop": dict(momentum=0.5, centered=True),
    "adam": dict(amsgrad=True),
}


def offered(algorithm: str, convention: int) -> bool:
    return step([Options(algorithm, convention=convention)], []) == OK


def plan_case(algorithm: str, dtype=np.float64, **values):
    """Tensors in two groups (group 1 in Keras' convention where the algorithm offers it), their
    buffers for every state the options use and their scalars, and how to copy them: one copy
    for fusedopt_step, one for a plan."""
    keras = KERAS if offered(algorithm, KERAS) else TORCH
    groups = [
        Options(algorithm, lr=0.01, **values),
        Options(algorithm, lr=0.03, convention=keras, **values),
    ]
    rng = np.random.default_rng(3)
    sizes, group_of, taken = [5, 300, 0, 17], [0, 1, 0, 0], [0, 4, 0, 2]
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    buffers = [
        [
            np.full(n, groups[g].initial_state(k), dtype)
            if groups[g].states_used >> k & 1
            else None
            for k in range(len(groups[g].state_names))
        ]
        for n, g in zip(sizes, group_of)
    ]
    scalars = [groups[g].initial_scalars() if groups[g].scalar_names else None for g in group_of]

    def tensors(params, buffers, call=0, grads=None, scalars=None):
        grads = grads or [None] * len(sizes)
        scalars = scalars or [None] * len(sizes)
        return [
            make_tensor(p, g, b, step=call + 1 + t, group=group, new_state=call == 0, scalars=s)
            for p, g, b, s, t, group in zip(params, grads, buffers, scalars, taken, group_of)
        ]

    def copy():
        return (
            [p.copy() for p in params],
            [[None if b is None else b.copy() for b in bs] for bs in buffers],
            [None if s is None else s.copy() for s in scalars],
        )

    def grads(call):
        r = np.random.default_rng(100 + call)
        return [r.standard_normal(n).astype(dtype) for n in sizes]

    return groups, copy, tensors, grads, taken


@pytest.mark.parametrize("grad_scale", [None, 0.5])
@pytest.mark.parametrize("algorithm", algorithms())
def test_a_plan_steps_bit_for_bit_as_fusedopt_step(algorithm: str, grad_scale) -> None:
    groups, copy, tensors, grads, taken = plan_case(algorithm, **EVERY_STATE.get(algorithm, {}))
    if grad_scale is not None and not groups[0].takes_grad_scale:
        pytest.skip(f"{algorithm} takes no grad scale")
    direct_params, direct_buffers, direct_scalars = copy()
    planned_params, planned_buffers, planned_scalars = copy()
    plan = Plan(groups, tensors(planned_params, planned_buffers, scalars=planned_scalars))
    assert plan.steps() == [1 + t for t in taken]
    for call in range(4):
        direct_grads, planned_grads = grads(call), grads(call)
        call_tensors = tensors(direct_params, direct_buffers, call, direct_grads, direct_scalars)
        assert step(groups, call_tensors, grad_scale) == OK, last_error()
        assert plan.step(planned_grads, grad_scale) == OK, last_error()
        assert last_error() == ""
        assert plan.steps() == [call + 2 + t for t in taken]
        # A grad scale writes the unscaled gradient back, the same in both.
        assert checksum(*direct_grads) == checksum(*planned_grads)
        # The scalars (NAdam's mu_product, ASGD's eta and mu) after every step.
        assert [None if s is None else s.tolist() for s in direct_scalars] == [
            None if s is None else s.tolist() for s in planned_scalars
        ]
    assert checksum(*direct_params) == checksum(*planned_params)
    flat = [[b for bs in buffers for b in bs if b is not None] for buffers in
            (direct_buffers, planned_buffers)]  # fmt: skip
    assert checksum(*flat[0]) == checksum(*flat[1])
    initial_params, _, initial_scalars = copy()
    assert checksum(*direct_params) != checksum(*initial_params)
    if groups[0].scalar_names:
        assert all(not np.array_equal(s, i) for s, i in zip(planned_scalars, initial_scalars))


def test_a_plan_holds_its_own_copy_of_the_options_and_set_options_changes_them() -> None:
    groups, copy, tensors, grads, _ = plan_case("sgd")
    params, buffers, _ = copy()
    plan = Plan(groups, tensors(params, buffers))
    groups[0].set("lr", 0.0)  # the plan took a copy: no effect
    before = checksum(params[0])
    assert plan.step(grads(0)) == OK
    assert checksum(params[0]) != before
    # lr = 0 for group 0 now: its params stay, group 1's move.
    assert plan.set_options(0, Options("sgd", lr=0.0)) == OK
    before = [checksum(p) for p in params]
    assert plan.step(grads(1)) == OK
    after = [checksum(p) for p in params]
    assert [b == a for b, a in zip(before, after)] == [True, False, True, True]
    # Back to lr 0.01: the same bits as fusedopt_step with the plan's first options.
    assert plan.set_options(0, Options("sgd", lr=0.01)) == OK
    groups[0].set("lr", 0.01)
    expected = [p.copy() for p in params]
    g = grads(2)
    assert step(groups, tensors(expected, buffers, 2, g)) == OK
    assert plan.step(g) == OK
    assert checksum(*expected) == checksum(*params)


def test_set_options_is_refused_when_it_cannot_apply() -> None:
    groups, copy, tensors, grads, _ = plan_case("adam")
    params, buffers, _ = copy()
    plan = Plan(groups, tensors(params, buffers))
    assert plan.set_options(2, Options("adam")) == VALUE_ERROR
    assert "group 2 is out of range" in last_error()
    assert plan.set_options(-1, Options("adam")) == VALUE_ERROR
    assert plan.set_options(0, Options("sgd")) == VALUE_ERROR
    assert "holds options for sgd, not adam" in last_error()
    assert plan.set_options(0, Options("adam", eps=-1.0)) == VALUE_ERROR
    assert "Invalid eps: -1" in last_error()
    # These tensors were registered without max_exp_avg_sq.
    assert plan.set_options(0, Options("adam", amsgrad=True)) == VALUE_ERROR
    assert "max_exp_avg_sq[0] is missing" in last_error()
    assert load().fusedopt_plan_set_options(plan.handle, 0, None) == TYPE_ERROR
    # Nothing changed: the plan still steps with the options it was created with.
    expected_params, expected_buffers, _ = copy()
    g = grads(0)
    assert step(groups, tensors(expected_params, expected_buffers, 0, g)) == OK
    assert plan.step(g) == OK
    assert checksum(*expected_params) == checksum(*params)


def test_set_options_may_use_a_state_registered_for_later() -> None:
    """A state buffer given at creation that the options do not use yet (AMSGrad's max, switched
    on later) stays registered, and is updated once options that use it are set."""
    groups, copy, tensors, grads, _ = plan_case("adam")
    params, buffers, _ = copy()
    for bs, p in zip(buffers, params):
        bs[2] = np.zeros_like(p)
    plan = Plan(groups, tensors(params, buffers))
    assert plan.step(grads(0)) == OK
    assert not buffers[0][2].any()
    assert plan.set_options(0, Options("adam", lr=0.01, amsgrad=True)) == OK, last_error()
    assert plan.step(grads(1)) == OK
    assert buffers[0][2].any() and not buffers[1][2].any()  # group 1 keeps its options
    # A grad may not overlap it either.
    assert plan.step([buffers[3][2]] + grads(2)[1:]) == VALUE_ERROR
    assert "grads[0] overlaps max_exp_avg_sq[3]" in last_error()


@pytest.mark.parametrize(
    "grads, status, message",
    [
        (lambda g, p, b: [b[3][0], g[1], g[2], g[3]], VALUE_ERROR, "grads[0] overlaps exp_avg[3]"),
        (lambda g, p, b: [g[0], g[1], g[2], p[3]], VALUE_ERROR, "grads[3] overlaps params[3]"),
        (lambda g, p, b: [g[0], g[1], g[2], b[1][1][:17]], VALUE_ERROR,
         "grads[3] overlaps exp_avg_sq[1]"),
        (lambda g, p, b: [g[0], None, g[2], g[3]], TYPE_ERROR, "grads[1] is NULL"),
        # It said "grads is NULL but num_grads is 4": there is no num_grads argument.
        (lambda g, p, b: None, TYPE_ERROR, "grads is NULL but the plan has 4 tensors"),
    ],
)  # fmt: skip
def test_a_bad_plan_step_is_refused_and_writes_nothing(grads, status, message) -> None:
    groups, copy, tensors, make_grads, taken = plan_case("adam")
    params, buffers, _ = copy()
    plan = Plan(groups, tensors(params, buffers))
    assert plan.step(make_grads(0)) == OK
    arrays = params + [b for bs in buffers for b in bs if b is not None]
    g = grads(make_grads(1), params, buffers)
    before = checksum(*arrays)
    if g is None:
        assert load().fusedopt_plan_step(plan.handle, None, None) == status
    else:
        assert plan.step(g) == status
    assert message in last_error()
    assert checksum(*arrays) == before
    assert plan.steps() == [2 + t for t in taken]  # a refused step is not counted


def test_written_grads_of_a_plan_may_not_overlap_one_another() -> None:
    groups, copy, tensors, grads, taken = plan_case("adam")
    params, buffers, _ = copy()
    plan = Plan(groups, tensors(params, buffers))
    g = grads(0)
    shared = [g[0], g[1], g[2], g[1][:17]]
    assert plan.step(shared) == OK  # read only: a grad may be shared
    before = checksum(*params, *g)
    assert plan.step(shared, grad_scale=2.0) == VALUE_ERROR
    assert "grads[1] overlaps grads[3]" in last_error() or "grads[3] overlaps grads[1]" in (
        last_error()
    )
    assert checksum(*params, *g) == before


@pytest.mark.parametrize(
    "spoil, status, message",
    [
        (lambda t: setattr(t[1], "dtype", 7), TYPE_ERROR, "params[1] has dtype 7"),
        (lambda t: setattr(t[1], "step", 0), VALUE_ERROR, "tensors[1].step must be >= 1"),
        (lambda t: setattr(t[1], "group", 2), VALUE_ERROR, "group index of params[1]"),
        (lambda t: t[1].state.__setitem__(1, None), VALUE_ERROR, "exp_avg_sq[1] is missing"),
        (lambda t: t[1].state.__setitem__(1, t[0].param), VALUE_ERROR, "overlaps"),
        (lambda t: setattr(t[1], "size", -2), VALUE_ERROR, "tensors[1].size must be >= 0"),
    ],
)
def test_a_plan_over_bad_tensors_is_refused(lib, spoil, status, message) -> None:
    groups, copy, tensors, _, _ = plan_case("adam")
    params, buffers, _ = copy()
    spoiled = tensors(params, buffers)
    spoil(spoiled)
    handle = HANDLE()
    array = (Tensor * 4)(*spoiled)
    assert lib.fusedopt_plan_create(handles(groups), 2, array, 4, ctypes.byref(handle)) == status
    assert message in last_error()
    assert handle.value is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_while_another_thread_steps_a_plan_can_step_it() -> None:
    """A plan's lock was taken before the guard that holds fork() off while a step writes, so a
    fork while another thread stepped the plan (ctypes releases the GIL) gave the child the lock
    held by a thread it does not have: its first use of the plan hung (94 children of 100). The
    guard comes first now, and no thread holds the lock across a fork."""
    params, grads, momenta = np.ones(64), np.full(64, 1e-3), np.zeros(64)
    plan = Plan([Options("sgd", lr=1e-9, momentum=0.9)], [make_tensor(params, grads, [momenta])])
    stop = threading.Event()

    def keep_stepping() -> None:
        while not stop.is_set():
            assert plan.step([grads]) == OK

    stepper = threading.Thread(target=keep_stepping)
    stepper.start()
    outcomes = []
    try:
        for _ in range(30):
            pid = os.fork()
            if pid == 0:  # the child: its own step, then the plan's, or SIGALRM ends it
                import signal

                signal.alarm(5)
                os._exit(0 if plan.step([grads]) == OK else 2)
            outcomes.append(os.waitpid(pid, 0)[1])
    finally:
        stop.set()
        stepper.join()
    assert outcomes == [0] * 30, [os.waitstatus_to_exitcode(s) for s in outcomes]


def test_a_plan_without_tensors_steps(lib) -> None:
    plan = Plan([Options("sgd")], [])
    assert lib.fusedopt_plan_step(plan.handle, None, None) == OK
    assert lib.fusedopt_plan_steps(plan.handle, None) == OK
    assert lib.fusedopt_plan_step(None, None, None) == TYPE_ERROR
    assert "plan is NULL" in last_error()


def test_a_plan_s_grads_take_the_registered_dtype() -> None:
    """A plan's grads are addresses: their dtype is the one each tensor was registered with (a
    float32 plan reads float32 grads), checked once, at creation."""
    p32, p64 = np.ones(8, np.float32), np.ones(8)
    plan = Plan([Options("sgd", lr=0.5)], [make_tensor(p32, None), make_tensor(p64, None)])
    assert plan.step([np.full(8, 2, np.float32), np.full(8, 2.0)]) == OK
    assert (p32 == 0).all() and (p64 == 0).all()


SCALAR_ALGORITHMS = [a for a in algorithms() if Options(a).scalar_names]


def test_nadam_and_asgd_keep_per_tensor_scalars() -> None:
    assert SCALAR_ALGORITHMS == ["nadam", "asgd"]


@pytest.mark.parametrize("algorithm", SCALAR_ALGORITHMS)
def test_scalars_advance_alike_in_steps_and_plans(lib, algorithm: str) -> None:
    options = Options(algorithm)
    count = len(options.scalar_names)
    assert 0 < count <= MAX_SCALARS
    initial = options.initial_scalars()
    n = 9
    rng = np.random.default_rng(5)
    param, grads = rng.standard_normal(n), [rng.standard_normal(n) for _ in range(3)]
    used = options.states_used

    def buffers():
        return [
            np.full(n, options.initial_state(k)) if used >> k & 1 else None
            for k in range(len(options.state_names))
        ]

    direct_param, direct_states, direct_scalars = param.copy(), buffers(), initial.copy()
    planned_param, planned_states, planned_scalars = param.copy(), buffers(), initial.copy()
    # Without scalars the call is refused, and nothing written.
    before = checksum(direct_param)
    refused = make_tensor(direct_param, grads[0], direct_states, new_state=1)
    assert step([options], [refused]) == TYPE_ERROR
    assert "tensors[0].scalars is NULL" in last_error()
    assert checksum(direct_param) == before
    handle = HANDLE()
    array = (Tensor * 1)(make_tensor(planned_param, None, planned_states))
    assert lib.fusedopt_plan_create(handles([options]), 1, array, 1, ctypes.byref(handle)) == (
        TYPE_ERROR
    )
    assert f"tensors[0].scalars is NULL but {algorithm} keeps" in last_error()
    assert handle.value is None
    plan = Plan(
        [options],
        [make_tensor(planned_param, None, planned_states, new_state=1, scalars=planned_scalars)],
    )
    for call, g in enumerate(grads):
        tensor = make_tensor(
            direct_param, g, direct_states, step=call + 1, new_state=call == 0,
            scalars=direct_scalars,
        )  # fmt: skip
        assert step([options], [tensor]) == OK, last_error()
        assert plan.step([g.copy()]) == OK, last_error()
        assert checksum(direct_scalars) == checksum(planned_scalars)
    assert checksum(direct_param) == checksum(planned_param)
    assert not np.array_equal(direct_scalars[:count], initial[:count])


@pytest.mark.parametrize("algorithm", SCALAR_ALGORITHMS)
def test_a_plan_reads_the_caller_s_scalars_at_each_step(algorithm: str) -> None:
    """The scalars stay the caller's: each plan step reads them as they are then and writes them
    back advanced, as fusedopt_step does, so a value the caller sets between steps is the one
    used. A refused step writes none."""
    groups, copy, tensors, grads, _ = plan_case(algorithm)
    direct_params, direct_buffers, direct_scalars = copy()
    planned_params, planned_buffers, planned_scalars = copy()
    plan = Plan(groups, tensors(planned_params, planned_buffers, scalars=planned_scalars))
    count = len(groups[0].scalar_names)
    for call in range(3):
        assert plan.step(grads(call)) == OK, last_error()
        g = grads(call)  # alive while the tensors point at it
        call_tensors = tensors(direct_params, direct_buffers, call, g, direct_scalars)
        assert step(groups, call_tensors) == OK, last_error()
        # The caller's own values for the next step (NAdam's product halved; ASGD's eta halved
        # and mu < 1, so that it averages), in both.
        for scalars in (direct_scalars, planned_scalars):
            for s in scalars:
                s[:count] *= 0.5
        assert checksum(*direct_params) == checksum(*planned_params)
        assert checksum(*direct_scalars) == checksum(*planned_scalars)
    # What the last values set lead to: the same bits again, different from a plan that was not
    # told (the values were used).
    unchanged_params, unchanged_buffers, unchanged_scalars = copy()
    unchanged = Plan(
        groups, tensors(unchanged_params, unchanged_buffers, 0, None, unchanged_scalars)
    )
    for call in range(3):
        assert unchanged.step(grads(call)) == OK
    assert checksum(*unchanged_params) != checksum(*planned_params)
    # A refused step (a NULL grad) writes nothing, the scalars included.
    before = checksum(*planned_params, *planned_scalars)
    assert plan.step([None] + grads(3)[1:]) == TYPE_ERROR
    assert checksum(*planned_params, *planned_scalars) == before


def test_keras_nadam_plans_share_the_optimizer_s_u_product() -> None:
    """Keras' Nadam keeps one u_product for the whole optimizer. Two plans over parts of its
    variables, each given the optimizer's value before a step (as fusedopt.keras does), step as
    one fusedopt_step over every variable with the value given to all, and as the reference."""
    options = Options("nadam", convention=KERAS, momentum_decay=1.0, lr=0.01, weight_decay=0.004)
    rng = np.random.default_rng(8)
    sizes = [7, 300, 1, 40]
    params = [rng.standard_normal(n) for n in sizes]
    grads = [[rng.standard_normal(n) for n in sizes] for _ in range(4)]

    def fresh():
        return (
            [p.copy() for p in params],
            [[np.zeros(n), np.zeros(n)] for n in sizes],
            [options.initial_scalars() for _ in sizes],
        )

    planned_params, planned_states, planned_scalars = fresh()
    plans = [
        Plan([options], [make_tensor(planned_params[i], None, planned_states[i],
                                     scalars=planned_scalars[i]) for i in part])
        for part in ([0, 2], [1, 3])
    ]  # fmt: skip
    direct_params, direct_states, direct_scalars = fresh()
    u_product = options.initial_scalars()
    expected = [(p.copy(), {}) for p in params]
    for call, g in enumerate(grads):
        for scalars in planned_scalars + direct_scalars:
            scalars[:] = u_product
        for plan, part in zip(plans, ([0, 2], [1, 3])):
            assert plan.step([g[i] for i in part]) == OK, last_error()
        tensors = [
            make_tensor(p, gi, s, step=call + 1, scalars=sc)
            for p, gi, s, sc in zip(direct_params, g, direct_states, direct_scalars)
        ]
        assert step([options], tensors) == OK, last_error()
        expected = [
            reference.keras_nadam(p, gi, s | {"u_product": float(u_product[0])},
                                  learning_rate=0.01, weight_decay=0.004)
            for (p, s), gi in zip(expected, g)
        ]  # fmt: skip
        # Every tensor comes out with the optimizer's new value (float32 here, as Keras keeps it
        # for float32 variables; the reference's is a double).
        assert len({s.tobytes() for s in planned_scalars + direct_scalars}) == 1
        u_product = planned_scalars[0].copy()
        assert u_product[0] == float(np.float32(u_product[0]))
        assert u_product[0] == pytest.approx(expected[0][1]["u_product"], rel=1e-7)
    assert checksum(*planned_params) == checksum(*direct_params)
    for p, (e, _) in zip(planned_params, expected):
        np.testing.assert_allclose(p, e, rtol=1e-6, atol=1e-9)


# ---- Plans on several threads ------------------------------------------------------------------


def big_plan(seed: int, n: int = 1 << 18):
    """An Adam plan over a few large float32 tensors (long enough steps to overlap in time)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    states = [[np.zeros(n, np.float32) for _ in range(2)] for _ in params]
    grads = [rng.standard_normal(n).astype(np.float32) for _ in params]
    plan = Plan(
        [Options("adam", lr=0.01)], [make_tensor(p, None, s) for p, s in zip(params, states)]
    )
    return plan, params, states, grads


def run_together(*bodies: Callable[[], None]) -> None:
    barrier = threading.Barrier(len(bodies))
    errors: list[BaseException] = []

    def run(body):
        try:
            barrier.wait()
            body()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def stepper(plan: Plan, grads: list[np.ndarray], steps: int) -> Callable[[], None]:
    def body():
        for _ in range(steps):
            assert plan.step(grads) == OK, last_error()

    return body


def test_two_plans_step_at_once_as_they_step_one_after_the_other() -> None:
    steps = 5
    sequential = [big_plan(1), big_plan(2)]
    for plan, _, _, grads in sequential:
        stepper(plan, grads, steps)()
    parallel = [big_plan(1), big_plan(2)]
    run_together(*(stepper(plan, grads, steps) for plan, _, _, grads in parallel))
    for (_, p1, s1, _), (_, p2, s2, _) in zip(sequential, parallel):
        assert checksum(*p1, *s1[0], *s1[1], *s1[2]) == checksum(*p2, *s2[0], *s2[1], *s2[2])


def test_two_threads_on_one_plan_take_turns() -> None:
    """Steps on one plan are serialized: two threads stepping it (with equal grads, so the order
    does not matter) leave what as many steps one after the other leave."""
    steps = 4
    plan, params, states, grads = big_plan(3)
    other_grads = [g.copy() for g in grads]
    run_together(stepper(plan, grads, steps), stepper(plan, other_grads, steps))
    assert plan.steps() == [2 * steps + 1] * 3
    expected_plan, expected_params, expected_states, expected_grads = big_plan(3)
    stepper(expected_plan, expected_grads, 2 * steps)()
    assert checksum(*params, *states[0], *states[1], *states[2]) == checksum(
        *expected_params, *expected_states[0], *expected_states[1], *expected_states[2]
    )


# ---- EWMA, ISA and threads, exports ------------------------------------------------------------


@pytest.mark.parametrize("adjust, ignore_na, min_periods", [(1, 0, 0), (0, 1, 2)])
def test_ewma_matches_the_reference_on_series_with_gaps(
    lib, adjust: int, ignore_na: int, min_periods: int
) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 3))
    x[[0, 7, 8, 30], [0, 1, 1, 2]] = np.nan
    out = np.empty_like(x)
    defaults = lib.fusedopt_ewma_default_options()
    assert (defaults.com, defaults.adjust, defaults.ignore_na, defaults.min_periods) == (0, 1, 0, 0)
    options = EwmaOptions(1.5, adjust, ignore_na, min_periods)
    # Column s of a C-order (50, 3) block: element t at s + 3 t.
    status = lib.fusedopt_ewma(
        x.ctypes.data_as(DOUBLE_P), out.ctypes.data_as(DOUBLE_P), 50, 3, 3, 1,
        ctypes.byref(options),
    )  # fmt: skip
    assert status == OK, last_error()
    expected = reference.ewma(
        x, com=1.5, adjust=bool(adjust), ignore_na=bool(ignore_na), min_periods=min_periods
    )
    np.testing.assert_allclose(out, expected, rtol=1e-14, atol=0, equal_nan=True)


def test_set_cpu_isa_and_threads_reject_bad_values(lib) -> None:
    assert lib.fusedopt_set_cpu_isa(b"neon") == VALUE_ERROR
    assert "not available" in last_error()
    assert lib.fusedopt_set_cpu_isa(None) == TYPE_ERROR
    assert lib.fusedopt_set_num_threads(0) == VALUE_ERROR
    assert "n must be >= 1, got 0" in last_error()
    threads = lib.fusedopt_num_threads()
    assert lib.fusedopt_set_num_threads(1) == OK
    assert lib.fusedopt_num_threads() == 1
    assert lib.fusedopt_set_num_threads(threads) == OK


def exported_symbols(library: Path) -> set[str]:
    listing = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], check=True, capture_output=True, text=True
    ).stdout
    return {line.split()[-1] for line in listing.splitlines() if line.strip()}


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_only_the_c_api_is_exported() -> None:
    exported = exported_symbols(LIBRARY)
    assert exported, "no dynamic symbols found"
    assert {name for name in exported if not name.startswith("fusedopt_")} == set()
    # Every function of fusedopt.h, and none of the per-algorithm ABI it replaced.
    assert set(SIGNATURES) <= exported
    assert not {name for name in exported if name.endswith(("_default_options", "_step"))} - {
        "fusedopt_step", "fusedopt_plan_step", "fusedopt_ewma_default_options",
    }  # fmt: skip


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the version script is Linux's")
def test_the_python_modules_export_only_their_entry_points() -> None:
    package = Path(fusedopt.__file__).parent
    modules = sorted(package.glob("_core*.so")) + sorted(package.glob("_cuda*.so"))
    assert modules, "no extension module found in the installed package"
    for module in modules:
        exported = exported_symbols(module)
        assert all(name.startswith("PyInit_") for name in exported), (module.name, exported)


@pytest.mark.parametrize("dtype_value", [2, 3], ids=["bfloat16", "float16"])
def test_16_bit_tensors_step_as_the_python_classes_do(lib, dtype_value: int) -> None:
    """FUSEDOPT_BFLOAT16 and FUSEDOPT_FLOAT16 buffers (state in the param's dtype, rounded to
    nearest): the same bits as fusedopt.Adam over the same arrays, by fusedopt_step and by a
    plan."""
    storage = np.dtype(np.float16)
    if dtype_value == 2:
        storage = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    rng = np.random.default_rng(21)
    values = rng.standard_normal(1000).astype(np.float32)
    grads = [rng.standard_normal(1000).astype(storage) for _ in range(3)]
    expected = values.astype(storage)
    reference_opt = fusedopt.Adam([expected], lr=0.01)
    for g in grads:
        reference_opt.step([g])
    options = Options("adam", lr=0.01)
    for route in ("step", "plan"):
        param = values.astype(storage)
        m, v = np.zeros_like(param), np.zeros_like(param)
        if route == "step":
            for t, g in enumerate(grads, start=1):
                assert step([options], [make_tensor(param, g, (m, v), step=t)]) == OK, last_error()
        else:
            plan = Plan([options], [make_tensor(param, grads[0], (m, v))])
            for g in grads:
                assert plan.step([g]) == OK, last_error()
        assert np.array_equal(param.view(np.uint16), expected.view(np.uint16)), route
        assert np.array_equal(
            v.view(np.uint16), reference_opt.state[0]["exp_avg_sq"].view(np.uint16)
        )


INT8_BLOCKWISE = 4  # FUSEDOPT_INT8_BLOCKWISE, a state's dtype only
PRECISION_CASES = [
    # (param dtype, state_dtype option, C state dtype, master, stochastic rounding)
    ("bfloat16", "float32", FLOAT32, True, True),
    ("bfloat16", "int8", INT8_BLOCKWISE, False, False),
    ("float16", "bfloat16", 2, True, True),
    ("float32", "int8", INT8_BLOCKWISE, False, False),
    ("bfloat16", None, 2, False, True),
]


@pytest.mark.parametrize(
    ("dtype", "state_dtype", "state_value", "master", "stochastic"),
    PRECISION_CASES,
    ids=[f"{c[0]}-{c[1]}-master{c[3]:d}-sr{c[4]:d}" for c in PRECISION_CASES],
)
def test_precision_options_step_as_the_python_classes_do(
    lib, dtype: str, state_dtype: str | None, state_value: int, master: bool, stochastic: bool
) -> None:
    """fusedopt_step_with_precision and a plan made with precision: the same bits as
    fusedopt.AdamW with the same state_dtype, master_weights, stochastic_rounding and seed, for
    the param, its master and every state (8-bit codes and scales included), over 3 steps."""
    from fusedopt._engine import numpy_dtype, quantized_full

    storage = numpy_dtype(dtype)
    rng = np.random.default_rng(31)
    n = 5000  # 8-bit state needs 4096 elements or more; a partial last block
    values = rng.standard_normal(n).astype(storage)
    grads = [rng.standard_normal(n).astype(storage) for _ in range(3)]
    options = dict(state_dtype=state_dtype, master_weights=master, stochastic_rounding=stochastic,
                   seed=7)  # fmt: skip
    expected = values.copy()
    python = fusedopt.AdamW([expected], lr=0.01, weight_decay=0.1, **options)
    for g in grads:
        python.step([g])
    names = ("exp_avg", "exp_avg_sq")
    for route in ("step", "plan"):
        param = values.copy()
        states, absmax = [], []
        for name in names:
            if state_value == INT8_BLOCKWISE:
                codes, scales = quantized_full((n,), 0.0, name == "exp_avg_sq")
                states.append(codes)
                absmax.append(scales)
            else:
                state_storage = np.float32 if state_value == FLOAT32 else numpy_dtype("bfloat16")
                states.append(np.zeros(n, state_storage))
        master_copy = param.astype(np.float32) if master else None
        extra = TensorPrecision(state_value, address(master_copy),
                                (ctypes.c_void_p * MAX_STATES)(*map(address, absmax)))  # fmt: skip
        precision = Precision(int(stochastic), 7)
        adamw = Options("adam", lr=0.01, weight_decay=0.1, decoupled_weight_decay=1)
        if route == "step":
            for t, g in enumerate(grads, start=1):
                tensor = make_tensor(param, g, states, step=t)
                status = lib.fusedopt_step_with_precision(
                    handles([adamw]), 1, ctypes.byref(tensor), ctypes.byref(extra), 1, None,
                    ctypes.byref(precision),
                )  # fmt: skip
                assert status == OK, last_error()
        else:
            plan = HANDLE()
            tensor = make_tensor(param, grads[0], states)
            status = lib.fusedopt_plan_create_with_precision(
                handles([adamw]), 1, ctypes.byref(tensor), ctypes.byref(extra), 1,
                ctypes.byref(precision), ctypes.byref(plan),
            )  # fmt: skip
            assert status == OK, last_error()
            try:
                for g in grads:
                    pointers = (ctypes.c_void_p * 1)(address(g))
                    assert lib.fusedopt_plan_step(plan, pointers, None) == OK, last_error()
            finally:
                lib.fusedopt_plan_destroy(plan)
        state = python.state[0]
        assert bits_equal(param, expected), route
        if master:
            assert bits_equal(master_copy, state["master"]), route
        for k, name in enumerate(names):
            assert bits_equal(states[k], state[name]), (route, name)
            if absmax:
                assert bits_equal(absmax[k], state[name + "_absmax"]), (route, name)


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_precision_that_does_not_fit_is_refused_and_nothing_changes(lib) -> None:
    """8-bit states without their scales, a master for a float32 param, and
    FUSEDOPT_INT8_BLOCKWISE as a param's dtype: refused naming the buffer, nothing written."""
    n = 5000
    param, grad = np.ones(n, np.float32), np.ones(n, np.float32)
    codes = [np.zeros(n, np.uint8), np.zeros(n, np.uint8)]
    adam = Options("adam", lr=0.1)
    before = checksum(param, *codes)
    no_scales = TensorPrecision(INT8_BLOCKWISE, None, (ctypes.c_void_p * MAX_STATES)())
    tensor = make_tensor(param, grad, codes)
    status = lib.fusedopt_step_with_precision(
        handles([adam]), 1, ctypes.byref(tensor), ctypes.byref(no_scales), 1, None, None
    )
    assert status != OK and "absmax" in last_error()
    master = np.ones(n, np.float32)
    with_master = TensorPrecision(FLOAT32, address(master), (ctypes.c_void_p * MAX_STATES)())
    states = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
    tensor = make_tensor(param, grad, states)
    status = lib.fusedopt_step_with_precision(
        handles([adam]), 1, ctypes.byref(tensor), ctypes.byref(with_master), 1, None, None
    )
    assert status != OK and "master" in last_error()
    tensor.dtype = INT8_BLOCKWISE
    assert step([adam], [tensor]) == TYPE_ERROR
    # A fusedopt_dtype, of states only: it was called "dtype 4 (not a fusedopt_dtype)".
    assert "params[0] has dtype FUSEDOPT_INT8_BLOCKWISE" in last_error()
    assert "states only" in last_error() and "not a fusedopt_dtype" not in last_error()
    assert checksum(param, *codes) == before and not any(s.any() for s in states)
    assert (master == 1).all()
    # A state_dtype that is no fusedopt_dtype, named as set (it was "exp_avg[0] has dtype 99").
    for bad in (99, -5):
        unknown = TensorPrecision(bad, None, (ctypes.c_void_p * MAX_STATES)())
        status = lib.fusedopt_step_with_precision(
            handles([adam]), 1, ctypes.byref(tensor), ctypes.byref(unknown), 1, None, None
        )
        assert status == TYPE_ERROR
        assert f"tensor_precision[0].state_dtype is {bad}, not a fusedopt_dtype" in last_error()


def test_a_dtype_the_c_abi_does_not_offer_is_refused(lib) -> None:
    param = np.zeros(8, np.float32)
    t = make_tensor(param, np.ones(8, np.float32))
    options = Options("sgd")
    for dtype in (5, -1):
        t.dtype = dtype
        assert step([options], [t]) == TYPE_ERROR
        assert f"params[0] has dtype {dtype} (not a fusedopt_dtype)" in last_error()
    assert not param.any()


@pytest.mark.parametrize("route", ["step", "plan"])
def test_stochastic_rounding_with_nothing_in_16_bits_is_refused(lib, route: str) -> None:
    """As every Python front end refuses it: no param and no state of the call is bfloat16 or
    float16, so nothing would be rounded. It was accepted (status 0); now a value error naming
    stochastic_rounding, with nothing written (NAdam's scalars included) and no plan made. One
    16-bit buffer in the call (a bfloat16 state of a float32 param) is something to round."""
    bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
    n = 300
    nadam = Options("nadam", lr=0.1)
    precision = Precision(1, 7)
    for dtype, state_dtype, refused in [
        (np.float32, np.float32, True),
        (np.float64, np.float64, True),
        (np.float32, bfloat16, False),
    ]:
        param, grad = np.ones(n, dtype), np.ones(n, dtype)
        states = [np.zeros(n, state_dtype), np.zeros(n, state_dtype)]
        scalars = nadam.initial_scalars()
        before = checksum(param, grad, *states, scalars)
        tensor = make_tensor(param, grad, states, scalars=scalars)
        extra = TensorPrecision(DTYPES[np.dtype(state_dtype)], None,
                                (ctypes.c_void_p * MAX_STATES)())  # fmt: skip
        plan = HANDLE()
        if route == "step":
            status = lib.fusedopt_step_with_precision(
                handles([nadam]), 1, ctypes.byref(tensor), ctypes.byref(extra), 1, None,
                ctypes.byref(precision),
            )  # fmt: skip
        else:
            status = lib.fusedopt_plan_create_with_precision(
                handles([nadam]), 1, ctypes.byref(tensor), ctypes.byref(extra), 1,
                ctypes.byref(precision), ctypes.byref(plan),
            )  # fmt: skip
            if status == OK:
                pointers = (ctypes.c_void_p * 1)(address(grad))
                status = lib.fusedopt_plan_step(plan, pointers, None)
                lib.fusedopt_plan_destroy(plan)
        if refused:
            assert status == VALUE_ERROR, dtype
            assert "stochastic_rounding: nothing is stored in 16 bits" in last_error()
            assert checksum(param, grad, *states, scalars) == before
            assert plan.value is None
        else:
            assert status == OK, last_error()
            assert (param != 1).all()


# ---- Found by an outside review of the C ABI ----------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "negative", "float_state", "no_state"])
@pytest.mark.parametrize("route", ["step", "plan"])
def test_scales_that_no_8_bit_state_can_have_are_refused(lib, bad: str, route: str) -> None:
    """An absmax is the largest |x| of its block: a NaN one decoded its whole block as NaN, a
    negative one with its signs flipped (status 0; the Python API refused them). Scales given for
    a state that is not 8-bit, or for no state, were ignored. Refused now, at a plan's every
    step too (the scales are the caller's memory), naming the scale; nothing written."""
    from fusedopt._engine import quantized_full

    n = 5000
    param, grad = np.ones(n, np.float32), np.full(n, 0.5, np.float32)
    (c0, a0), (c1, a1) = quantized_full((n,), 0.1, False), quantized_full((n,), 0.1, True)
    states, scales = [c0, c1], [address(a0), address(a1), None]
    dtype = INT8_BLOCKWISE
    if bad == "float_state":
        states, dtype = [np.zeros(n, np.float32), np.zeros(n, np.float32)], FLOAT32
    elif bad == "no_state":
        scales[2] = address(a1.copy())
    precision = TensorPrecision(dtype, None, (ctypes.c_void_p * MAX_STATES)(*scales))
    tensor, adam = make_tensor(param, grad, states), Options("adam", lr=0.1)
    if route == "plan":
        handle = HANDLE()
        status = lib.fusedopt_plan_create_with_precision(
            handles([adam]), 1, ctypes.byref(tensor), ctypes.byref(precision), 1, None,
            ctypes.byref(handle),
        )  # fmt: skip
        if bad in ("nan", "negative"):  # the plan is made over good scales, spoiled later
            assert status == OK, last_error()
    if bad == "nan":
        a1[3] = np.nan
    elif bad == "negative":
        a0[7] = -0.5
    before = checksum(param, *states, a0, a1)
    if route == "plan" and bad in ("nan", "negative"):
        pointers = (ctypes.c_void_p * 1)(address(grad))
        status = lib.fusedopt_plan_step(handle, pointers, None)
        lib.fusedopt_plan_destroy(handle)
    elif route == "step":
        status = lib.fusedopt_step_with_precision(
            handles([adam]), 1, ctypes.byref(tensor), ctypes.byref(precision), 1, None, None
        )
    assert status == VALUE_ERROR, last_error()
    expected = {
        "nan": "exp_avg_sq_absmax[0] holds a NaN or negative value (block 3",
        "negative": "exp_avg_absmax[0] holds a NaN or negative value (block 7",
        "float_state": "exp_avg_absmax[0] is given but exp_avg[0] is not 8-bit state",
        "no_state": "max_exp_avg_sq_absmax[0] is given but max_exp_avg_sq[0] is not",
    }[bad]
    assert expected in last_error(), last_error()
    assert checksum(param, *states, a0, a1) == before


def test_an_8_bit_scale_in_an_overlap_is_named_not_read_after_free(lib) -> None:
    """The absmax role's name lived in the state loop while the overlap check, after the loop,
    kept a pointer to it: a clash with a scale was named from freed memory (garbage bytes)."""
    from fusedopt._engine import quantized_full

    n = 5000
    param, grad = np.ones(n, np.float32), np.ones(n, np.float32)
    (c0, a0), (c1, a1) = quantized_full((n,), 0.0, False), quantized_full((n,), 0.0, True)
    before = checksum(param, c0, c1, a0, a1)
    shared = TensorPrecision(
        INT8_BLOCKWISE, None, (ctypes.c_void_p * MAX_STATES)(*[address(a1)] * 2)
    )
    tensor, adam = make_tensor(param, grad, (c0, c1)), Options("adam", lr=0.1)
    status = lib.fusedopt_step_with_precision(
        handles([adam]), 1, ctypes.byref(tensor), ctypes.byref(shared), 1,
        None, None,
    )  # fmt: skip
    assert status == VALUE_ERROR
    message = last_error()
    assert "exp_avg_sq_absmax[0] overlaps exp_avg_absmax[0]" in message, message
    assert checksum(param, c0, c1, a0, a1) == before


@pytest.mark.parametrize("size", [2**61, 2**62 - 1, 2**63 - 1])
def test_a_size_whose_bytes_overflow_is_refused(lib, size: int) -> None:
    """Such a size wrapped the extents the overlap check compares: a step reported success
    having done nothing, named separate arrays as overlapping, or wrote through memory."""
    param, grad, momentum = np.ones(16), np.ones(16), np.zeros(16)
    before = checksum(param, grad, momentum)
    tensor = make_tensor(param, grad, (momentum,))
    tensor.size = size
    options = Options("sgd", lr=0.1, momentum=0.9)
    assert step([options], [tensor]) == VALUE_ERROR
    assert "params[0] has" in last_error() and "address space" in last_error()
    handle = HANDLE()
    status = lib.fusedopt_plan_create(handles([options]), 1, ctypes.byref(tensor), 1,
                                      ctypes.byref(handle))  # fmt: skip
    assert status == VALUE_ERROR and "address space" in last_error()
    assert checksum(param, grad, momentum) == before


@pytest.mark.parametrize("where", ["param", "grad", "exp_avg", "another row in part"])
def test_scalars_overlapping_a_buffer_are_refused_by_a_step_and_a_plan(lib, where: str) -> None:
    """NAdam writes its per-tensor mu_product back after the step: a row inside a buffer of
    the call (even the grad, only read) corrupted it, with status OK."""
    arrays = [[np.ones(8), np.full(8, 0.5), np.zeros(8), np.zeros(8)] for _ in range(2)]
    rows = np.ones(4)
    scalars = [rows[:2], rows[2:]]
    target = {"param": arrays[1][0], "grad": arrays[1][1], "exp_avg": arrays[1][2],
              "another row in part": rows[1:]}[where]  # fmt: skip
    scalars[1] = target[:2]
    before = checksum(*arrays[0], *arrays[1], rows)
    tensors = [make_tensor(a[0], a[1], a[2:], scalars=s) for a, s in zip(arrays, scalars)]
    options = Options("nadam", lr=0.1)
    assert step([options], tensors) == VALUE_ERROR
    assert "tensors[" in last_error() and ".scalars" in last_error(), last_error()
    assert checksum(*arrays[0], *arrays[1], rows) == before
    if where == "grad":  # a plan registers no grad: it meets the row at its step
        plan = Plan([options], [make_tensor(a[0], None, a[2:], scalars=s)
                                for a, s in zip(arrays, scalars)])  # fmt: skip
        assert plan.step([arrays[0][1], arrays[1][1]]) == VALUE_ERROR
        assert ".scalars overlaps grads[1]" in last_error()
    else:
        handle = HANDLE()
        array = (Tensor * 2)(*tensors)
        assert lib.fusedopt_plan_create(handles([options]), 1, array, 2,
                                        ctypes.byref(handle)) == VALUE_ERROR  # fmt: skip
    assert checksum(*arrays[0], *arrays[1], rows) == before


def test_a_shared_row_of_scalars_and_an_ignored_pointer_are_accepted() -> None:
    """A row shared whole (Keras' u_product) steps; an algorithm without scalars never reads
    or writes the pointer, which may then point anywhere (here into the param)."""
    arrays = [[np.ones(8), np.full(8, 0.5), np.zeros(8), np.zeros(8)] for _ in range(2)]
    row = np.array([1.0, 0.0])
    tensors = [make_tensor(a[0], a[1], a[2:], scalars=row) for a in arrays]
    assert step([Options("nadam", lr=0.1, convention=KERAS)], tensors) == OK, last_error()
    param, grad = np.ones(8), np.ones(8)
    expected = param - 0.1
    tensor = make_tensor(param, grad, scalars=param)
    assert step([Options("sgd", lr=0.1)], [tensor]) == OK, last_error()
    np.testing.assert_array_equal(param, expected)


def test_the_steps_after_the_last_step_number_are_refused_not_wrapped(lib) -> None:
    param, grad = np.ones(4), np.ones(4)
    plan = Plan([Options("sgd", lr=0.1)], [make_tensor(param, None, step=2**63 - 1)])
    assert plan.steps() == [2**63 - 1]
    assert plan.step([grad]) == OK
    out = (c_int64 * 1)(7)
    assert lib.fusedopt_plan_steps(plan.handle, out) == VALUE_ERROR
    assert "2**63 - 1" in last_error() and out[0] == 7
    assert plan.step([grad]) == VALUE_ERROR


@pytest.mark.parametrize("last", [2500, 4999])
def test_a_step_past_the_last_step_number_among_many_tensors_writes_nothing(lib, last) -> None:
    """Over thousands of tensors each is given its step on the pool's threads, a slice at a time:
    a tensor past the last step number, in a slice of its own, must still refuse the whole step
    before any kernel runs, naming that tensor."""
    count = 5000
    params = [np.ones(4) for _ in range(count)]
    grads = [np.ones(4) for _ in range(count)]
    steps = [2**63 - 1 if i == last else 1 for i in range(count)]
    tensors = [make_tensor(p, None, step=s) for p, s in zip(params, steps)]
    plan = Plan([Options("sgd", lr=0.1)], tensors)
    assert plan.step(grads) == OK, last_error()  # tensor `last` takes step 2**63 - 1
    before = [p.copy() for p in params]
    assert plan.step(grads) == VALUE_ERROR
    assert f"params[{last}]" in last_error() and "2**63 - 1" in last_error()
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)


def test_an_empty_8_bit_tensor_needs_no_scales(lib) -> None:
    """The header: an empty tensor may have NULL buffers. Its absmax (0 floats) was required."""
    tensor = Tensor()
    tensor.size, tensor.step = 0, 1
    no_scales = TensorPrecision(INT8_BLOCKWISE, None, (ctypes.c_void_p * MAX_STATES)())
    adam = Options("adam")  # kept: a handle of a collected Options is freed memory
    status = lib.fusedopt_step_with_precision(
        handles([adam]), 1, ctypes.byref(tensor), ctypes.byref(no_scales), 1, None, None
    )
    assert status == OK, last_error()
    handle = HANDLE()
    status = lib.fusedopt_plan_create_with_precision(
        handles([adam]), 1, ctypes.byref(tensor), ctypes.byref(no_scales), 1, None,
        ctypes.byref(handle),
    )  # fmt: skip
    assert status == OK, last_error()
    lib.fusedopt_plan_destroy(handle)


@pytest.mark.parametrize("algorithm", ["rprop", "asgd"])
def test_8_bit_state_is_refused_where_the_states_are_not_moments(lib, algorithm: str) -> None:
    """The classes and the functional API refuse it; the core (so the C ABI) stepped it."""
    n = 4096
    param, grad = np.ones(n, np.float32), np.ones(n, np.float32)
    states = [np.zeros(n, np.uint8) for _ in range(2 if algorithm == "rprop" else 1)]
    scales = [np.zeros(n // 256, np.float32) for _ in states]
    before = checksum(param, *states, *scales)
    row = np.array([0.01, 1.0])
    options = Options(algorithm, lr=0.01)
    tensor = make_tensor(param, grad, states, scalars=row if algorithm == "asgd" else None)
    precision = TensorPrecision(
        INT8_BLOCKWISE, None, (ctypes.c_void_p * MAX_STATES)(*map(address, scales))
    )
    status = lib.fusedopt_step_with_precision(
        handles([options]), 1, ctypes.byref(tensor), ctypes.byref(precision), 1, None, None
    )
    assert status == VALUE_ERROR and "not moments" in last_error(), last_error()
    assert checksum(param, *states, *scales) == before
