"""Shared fixtures: run a test under every ISA this processor offers, and data helpers."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import pytest

# Keras must pick its backend before it is first imported; CI installs torch for it.
os.environ.setdefault("KERAS_BACKEND", "torch")

import fusedopt  # noqa: E402

ISAS = fusedopt.available_isas()
SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 4097, 65535, 65536, 65537]
DTYPES = [np.float32, np.float64]


# Tests that take minutes (they build the package) run first: pytest-xdist (README's `-n auto`)
# hands out tests in collection order, and one of these collected last would run alone at the end.
BUILDS_THE_PACKAGE = ("test_wheel.py", "test_cmake_consumer.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in BUILDS_THE_PACKAGE)


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test with the kernels of one ISA, then restores the default."""
    previous = fusedopt.cpu_isa()
    fusedopt.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        fusedopt.set_cpu_isa(previous)


def checksum(*arrays: np.ndarray) -> str:
    """Digest of the bytes of every array, to prove a failed call wrote nothing."""
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def native_options(
    algorithm: str, convention: str = "torch", *, check: bool = True, **hyper: float
) -> tuple:
    """The native option values of ``algorithm`` (its fields' order, what fusedopt._core.step
    and fusedopt.cuda.step take) from its fields' names, the rest at their defaults; unknown
    names fail here, and, with ``check``, values the algorithm refuses."""
    from fusedopt import _core

    values = {"convention": 1.0 if convention == "keras" else 0.0}
    values.update({k: float(v) for k, v in hyper.items()})
    fields = _core.algorithm_info(algorithm)["fields"]
    unknown = set(values) - {name for name, _, _ in fields} - {"convention"}
    assert not unknown, f"{algorithm} has no option {unknown}"
    result = tuple(values.get(name, default) for name, default, _ in fields)
    assert not check or _core.check_options(algorithm, result) is None, (algorithm, hyper)
    return result


@pytest.fixture(scope="module", params=["shim", "python"])
def tensor_reading(request: pytest.FixtureRequest) -> Iterator[str]:
    """fusedopt.torch and fusedopt.keras plans made with their per-step checks reading tensors
    through libtorch's C shim (the default where it is usable: TorchShim in bindings.cpp), and
    through torch's Python methods (where it is not, and wherever the shim finds a tensor not as
    expected)."""
    from fusedopt import _core as core

    was = core._torch_shim()
    core._torch_shim(request.param == "shim")
    yield request.param
    core._torch_shim(was)


def emulation_unavailable() -> str | None:
    """Why the emulated GPU's routes do not run here, or None. Its module is the build's code, as
    in the installed wheel: test_wheel.py's run of the wheel (FUSEDOPT_TEST_IN_WHEEL) leaves these
    routes to the main run, as it leaves the test files listed in SAME_CODE_ELSEWHERE."""
    if os.environ.get("FUSEDOPT_TEST_IN_WHEEL") == "1":
        return "the emulated GPU's routes run in the main suite, not again against the wheel"
    try:
        import fusedopt._cuda_emulated  # noqa: F401
    except ImportError:
        return "fusedopt was built without its CUDA emulation module"
    return None


def emulate_gpu_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """fusedopt.torch's plans made as for CUDA tensors, over CPU tensors: _core.TorchPlan with the
    launcher of fusedopt._cuda_emulated (the CUDA kernels' source compiled for the CPU, whose
    device memory is the host's, csrc/cuda/emulation.h), on a stream handle it ignores."""
    import fusedopt._cuda_emulated as emulated

    import fusedopt.torch as ft
    from fusedopt import cuda

    monkeypatch.setattr(cuda, "_native", emulated)
    monkeypatch.setattr(ft, "_native_plan", lambda device: ft._DevicePlan)
    monkeypatch.setattr(cuda, "_torch_stream", lambda tensor: 0)


@pytest.fixture(params=["cpu", "emulated-gpu"])
def plan_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The plan a torch-backed step (fusedopt.torch, fusedopt.keras) runs through: the CPU's, or
    a CUDA device's (the same TorchPlan with fusedopt._cuda's launcher: one kernel of csrc/cuda a
    step), here the emulated GPU's over the CPU tensors (emulate_gpu_plans)."""
    if request.param == "emulated-gpu":
        if reason := emulation_unavailable():
            pytest.skip(reason)
        emulate_gpu_plans(monkeypatch)
    return request.param
