"""The C ABI of the installed libfusedopt (fusedopt/fusedopt.h), called through ctypes: every
algorithm's options and buffers reach the core as the header says (results match the reference),
failures come back as status codes with a thread-local message and write nothing, and the
library exports the API and nothing else."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

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
DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}


def options_struct(doubles: str, flags: str) -> type[ctypes.Structure]:
    fields = [(name, ctypes.c_double) for name in doubles.split()]
    fields += [(name, ctypes.c_int32) for name in flags.split()]
    return type("Options", (ctypes.Structure,), {"_fields_": fields})


def tensor_struct(states: tuple[str, ...]) -> type[ctypes.Structure]:
    fields = [(name, ctypes.c_void_p) for name in ("param", "grad", *states)]
    fields += [("size", ctypes.c_int64), ("step", ctypes.c_int64)]
    fields += [("dtype", ctypes.c_int32), ("group", ctypes.c_int32)]
    return type("Tensor", (ctypes.Structure,), {"_fields_": fields})


class Algorithm:
    """The C structs of one algorithm, as fusedopt.h lays them out, and its reference step."""

    def __init__(self, name: str, doubles: str, flags: str, states: tuple[str, ...], step):
        self.name, self.states, self.reference_step = name, states, step
        self.options = options_struct(doubles, flags + " convention")
        self.tensor = tensor_struct(states)
        self.takes_grad_scale = name in ("sgd", "adam")


SGD = Algorithm(
    "sgd", "lr momentum dampening weight_decay", "nesterov maximize", ("momentum_buffer",),
    reference.torch_sgd,
)  # fmt: skip
ADAGRAD = Algorithm(
    "adagrad", "lr lr_decay weight_decay eps", "maximize", ("sum",), reference.torch_adagrad
)
RMSPROP = Algorithm(
    "rmsprop", "lr alpha eps weight_decay momentum", "centered maximize",
    ("square_avg", "momentum_buffer", "grad_avg"), reference.torch_rmsprop,
)  # fmt: skip
ADAM = Algorithm(
    "adam", "lr beta1 beta2 eps weight_decay", "amsgrad maximize decoupled_weight_decay",
    ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), reference.torch_adam,
)  # fmt: skip


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    library = ctypes.CDLL(str(LIBRARY))
    for name in ("last_error", "version", "cpu_isa", "available_isas"):
        getattr(library, f"fusedopt_{name}").restype = ctypes.c_char_p
    library.fusedopt_set_cpu_isa.argtypes = [ctypes.c_char_p]
    for algorithm in (SGD, ADAGRAD, RMSPROP, ADAM):
        getattr(library, f"fusedopt_{algorithm.name}_default_options").restype = algorithm.options
        step = getattr(library, f"fusedopt_{algorithm.name}_step")
        step.argtypes = [
            ctypes.POINTER(algorithm.options),
            ctypes.c_int64,
            ctypes.POINTER(algorithm.tensor),
            ctypes.c_int64,
        ] + ([ctypes.POINTER(ctypes.c_double)] if algorithm.takes_grad_scale else [])
    return library


def address(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


def make_tensor(algorithm: Algorithm, param, grad, states, *, step: int, group: int = 0):
    """The C struct of one tensor; a state given as None stays NULL."""
    pointers = [address(param), address(grad)] + [address(s) for s in states]
    return algorithm.tensor(*pointers, param.size, step, DTYPES[param.dtype], group)


def call_step(lib, algorithm: Algorithm, options, tensors: list, grad_scale=None) -> int:
    array = (algorithm.tensor * len(tensors))(*tensors)
    extra = []
    if algorithm.takes_grad_scale:
        extra = [None if grad_scale is None else ctypes.byref(ctypes.c_double(grad_scale))]
    step = getattr(lib, f"fusedopt_{algorithm.name}_step")
    return step(ctypes.byref(options), 1, array, len(tensors), *extra)


def default_options(lib, algorithm: Algorithm, **changes):
    options = getattr(lib, f"fusedopt_{algorithm.name}_default_options")()
    for name, value in changes.items():
        setattr(options, name, value)
    return options


def test_version_and_isas_are_the_python_package_s(lib: ctypes.CDLL) -> None:
    assert lib.fusedopt_version().decode() == fusedopt.__version__
    assert lib.fusedopt_available_isas().decode().split(",") == fusedopt.available_isas()
    assert lib.fusedopt_cpu_isa().decode() in fusedopt.available_isas()


def test_default_options_are_torch_optim_s(lib: ctypes.CDLL) -> None:
    adam = default_options(lib, ADAM)
    assert (adam.lr, adam.beta1, adam.beta2, adam.eps, adam.weight_decay) == (
        1e-3, 0.9, 0.999, 1e-8, 0.0,
    )  # fmt: skip
    assert (adam.amsgrad, adam.decoupled_weight_decay, adam.convention) == (0, 0, 0)
    rmsprop = default_options(lib, RMSPROP)
    assert (rmsprop.lr, rmsprop.alpha, rmsprop.eps) == (1e-2, 0.99, 1e-8)
    adagrad = default_options(lib, ADAGRAD)
    assert (adagrad.lr, adagrad.eps) == (1e-2, 1e-10)
    assert default_options(lib, SGD).lr == 1e-3


# Every option set away from its default, so a field read from the wrong place shows.
CASES = [
    (SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01, maximize=1), 4.0),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=1, weight_decay=0.01), None),
    (ADAGRAD, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, eps=1e-3, maximize=1), None),
    (RMSPROP, dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.01, momentum=0.5), None),
    (RMSPROP, dict(lr=0.01, alpha=0.9, centered=1, maximize=1), None),
    (ADAM, dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-3, weight_decay=0.1, maximize=1), 4.0),
    (ADAM, dict(lr=0.01, weight_decay=0.1, amsgrad=1, decoupled_weight_decay=1), None),
]


def run_against_reference(lib, algorithm: Algorithm, changes: dict, grad_scale, dtype) -> None:
    rng = np.random.default_rng(0)
    sizes = [0, 1, 17, 65537]
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    buffers = [[np.zeros(n, dtype) for _ in algorithm.states] for n in sizes]
    expected = [p.astype(np.float64) for p in params]
    states: list[dict] = [{} for _ in sizes]
    options = default_options(lib, algorithm, **changes)
    hyperparameters = {name: bool(v) if isinstance(v, int) else v for name, v in changes.items()}
    if grad_scale is not None:
        hyperparameters["grad_scale"] = grad_scale
    for step in (1, 2, 3):
        grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
        for i, g in enumerate(grads):
            expected[i], states[i] = algorithm.reference_step(
                expected[i], g, states[i], **hyperparameters
            )
        # An empty tensor may come with NULL buffers (an empty std::vector's data()).
        tensors = [
            make_tensor(algorithm, p, g, b, step=step)
            if p.size
            else algorithm.tensor(size=0, step=step)
            for p, g, b in zip(params, grads, buffers)
        ]
        status = call_step(lib, algorithm, options, tensors, grad_scale)
        assert status == OK, lib.fusedopt_last_error()
        assert lib.fusedopt_last_error() == b""
    tolerance = 5e-6 if dtype == np.float32 else 1e-12
    for p, e, b, s in zip(params, expected, buffers, states):
        np.testing.assert_allclose(p, e, rtol=tolerance, atol=tolerance)
        for name, buffer in zip(algorithm.states, b):
            if s.get(name) is not None:
                np.testing.assert_allclose(buffer, s[name], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "algorithm, changes, grad_scale", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)]
)
def test_each_step_matches_the_reference(lib, algorithm, changes, grad_scale, dtype) -> None:
    run_against_reference(lib, algorithm, changes, grad_scale, dtype)


@pytest.mark.parametrize("isa", fusedopt.available_isas())
def test_set_cpu_isa_switches_the_kernels_and_each_matches(lib, isa: str) -> None:
    previous = lib.fusedopt_cpu_isa()
    assert lib.fusedopt_set_cpu_isa(isa.encode()) == OK
    try:
        assert lib.fusedopt_cpu_isa().decode() == isa
        run_against_reference(lib, ADAM, dict(lr=0.01, amsgrad=1), 2.0, np.float32)
    finally:
        lib.fusedopt_set_cpu_isa(previous)


def adam_arrays(n: int = 33) -> list[np.ndarray]:
    """param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq: the buffers of one AMSGrad tensor."""
    rng = np.random.default_rng(1)
    return [rng.standard_normal(n) for _ in range(5)]


def spoil(field: str, value) -> Callable:
    return lambda tensors, options: setattr(tensors[1], field, value)


@pytest.mark.parametrize(
    "change, status, message",
    [
        (spoil("max_exp_avg_sq", None), VALUE_ERROR, "max_exp_avg_sq[1] is missing"),
        (spoil("dtype", 7), TYPE_ERROR, "params[1] has dtype 7"),
        (spoil("grad", None), TYPE_ERROR, "tensors[1].grad is NULL"),
        (spoil("group", 1), VALUE_ERROR, "group index of params[1]"),
        (spoil("step", 0), VALUE_ERROR, "step of params[1]"),
        (spoil("size", -1), VALUE_ERROR, "tensors[1].size"),
        (lambda t, o: setattr(t[1], "exp_avg", t[0].param), VALUE_ERROR, "overlaps"),
        (lambda t, o: setattr(o, "beta1", 1.5), VALUE_ERROR, "beta"),
        (lambda t, o: setattr(o, "convention", 5), VALUE_ERROR, "groups[0].convention"),
    ],
)
def test_a_bad_call_returns_its_status_and_writes_nothing(lib, change, status, message) -> None:
    arrays = [adam_arrays(), adam_arrays()]
    before = checksum(*arrays[0], *arrays[1])
    tensors = [make_tensor(ADAM, a[0], a[1], a[2:], step=1) for a in arrays]
    options = default_options(lib, ADAM, amsgrad=1)
    change(tensors, options)
    assert call_step(lib, ADAM, options, tensors) == status
    assert message in lib.fusedopt_last_error().decode()
    assert checksum(*arrays[0], *arrays[1]) == before


def test_the_last_error_belongs_to_the_thread_and_clears_on_success(lib) -> None:
    options = default_options(lib, ADAM)
    assert call_step(lib, ADAM, options, [ADAM.tensor(size=-1, step=1)]) == VALUE_ERROR
    seen_by_other_thread = []
    worker = threading.Thread(target=lambda: seen_by_other_thread.append(lib.fusedopt_last_error()))
    worker.start()
    worker.join()
    assert seen_by_other_thread == [b""]
    assert lib.fusedopt_last_error() != b""
    a = adam_arrays()
    assert call_step(lib, ADAM, options, [make_tensor(ADAM, a[0], a[1], a[2:], step=1)]) == OK
    assert lib.fusedopt_last_error() == b""


class EwmaOptions(ctypes.Structure):
    _fields_ = [
        ("com", ctypes.c_double),
        ("adjust", ctypes.c_int32),
        ("ignore_na", ctypes.c_int32),
        ("min_periods", ctypes.c_int64),
    ]


@pytest.mark.parametrize("adjust, ignore_na, min_periods", [(1, 0, 0), (0, 1, 2)])
def test_ewma_matches_the_reference_on_series_with_gaps(
    lib, adjust: int, ignore_na: int, min_periods: int
) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 3))
    x[[0, 7, 8, 30], [0, 1, 1, 2]] = np.nan
    out = np.empty_like(x)
    options = EwmaOptions(1.5, adjust, ignore_na, min_periods)
    # Column s of a C-order (50, 3) block: element t at s + 3 t.
    status = lib.fusedopt_ewma(
        ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(50),
        ctypes.c_int64(3), ctypes.c_int64(3), ctypes.c_int64(1), ctypes.byref(options),
    )  # fmt: skip
    assert status == OK, lib.fusedopt_last_error()
    expected = reference.ewma(
        x, com=1.5, adjust=bool(adjust), ignore_na=bool(ignore_na), min_periods=min_periods
    )
    np.testing.assert_allclose(out, expected, rtol=1e-14, atol=0, equal_nan=True)


def test_set_cpu_isa_and_threads_reject_bad_values(lib) -> None:
    assert lib.fusedopt_set_cpu_isa(b"neon") == VALUE_ERROR
    assert b"not available" in lib.fusedopt_last_error()
    assert lib.fusedopt_set_num_threads(0) == VALUE_ERROR
    threads = lib.fusedopt_num_threads()
    assert lib.fusedopt_set_num_threads(1) == OK
    assert lib.fusedopt_num_threads() == 1
    assert lib.fusedopt_set_num_threads(threads) == OK


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_only_the_c_api_is_exported() -> None:
    listing = subprocess.run(
        ["nm", "-D", "--defined-only", str(LIBRARY)], check=True, capture_output=True, text=True
    ).stdout
    exported = {line.split()[-1] for line in listing.splitlines() if line.strip()}
    assert exported, "no dynamic symbols found"
    assert {name for name in exported if not name.startswith("fusedopt_")} == set()
    assert {"fusedopt_adam_step", "fusedopt_last_error", "fusedopt_ewma"} <= exported


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the version script is Linux's")
def test_the_python_modules_export_only_their_entry_points() -> None:
    package = Path(fusedopt.__file__).parent
    modules = sorted(package.glob("_core*.so")) + sorted(package.glob("_cuda*.so"))
    assert modules, "no extension module found in the installed package"
    for module in modules:
        listing = subprocess.run(
            ["nm", "-D", "--defined-only", str(module)], check=True, capture_output=True, text=True
        ).stdout
        exported = {line.split()[-1] for line in listing.splitlines() if line.strip()}
        assert all(name.startswith("PyInit_") for name in exported), (module.name, exported)
