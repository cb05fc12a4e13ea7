"""The runtime API: ISA dispatch and its overrides, threads, the released GIL, edge sizes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fusedopt
import fusedopt.functional as F
import fusedopt.keras_numpy as fk


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def run_python(code: str, **env: str) -> str:
    """Runs ``code`` in a fresh interpreter (the overrides are read once, at import)."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# ------------------------------------------------------------------------------------- ISA


def test_current_isa_is_available_and_scalar_always_is() -> None:
    assert fusedopt.cpu_isa() in fusedopt.available_isas()
    assert fusedopt.available_isas()[0] == "scalar"
    assert set(fusedopt.available_isas()) <= {"scalar", "avx2", "avx512"}


def test_default_isa_is_the_best_available() -> None:
    assert (
        run_python("import fusedopt; print(fusedopt.cpu_isa())", FUSEDOPT_CPU_ISA="")
        == (fusedopt.available_isas()[-1])
    )


@pytest.mark.skipif(
    "avx512f" not in cpu_flags(), reason="this CPU has no AVX-512 (no avx512f in /proc/cpuinfo)"
)
def test_avx512_is_the_default_on_an_avx512_machine() -> None:
    assert "avx512" in fusedopt.available_isas()
    assert run_python("import fusedopt; print(fusedopt.cpu_isa())", FUSEDOPT_CPU_ISA="") == "avx512"


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="this CPU has no AVX2")
def test_avx2_is_available_on_an_avx2_machine() -> None:
    assert "avx2" in fusedopt.available_isas()


@pytest.mark.parametrize("isa", fusedopt.available_isas())
def test_environment_variable_forces_a_lower_path(isa: str) -> None:
    assert run_python("import fusedopt; print(fusedopt.cpu_isa())", FUSEDOPT_CPU_ISA=isa) == isa


def test_unknown_isa_in_the_environment_falls_back_to_the_best_path() -> None:
    """A typo in the environment must not break import; cpu_isa() says what runs."""
    assert (
        run_python("import fusedopt; print(fusedopt.cpu_isa())", FUSEDOPT_CPU_ISA="bogus")
        == (fusedopt.available_isas()[-1])
    )


def test_unknown_isa_in_the_environment_is_warned_about() -> None:
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "try:\n    import fusedopt\nexcept RuntimeWarning as w:\n    print(w)"
    )
    message = run_python(code, FUSEDOPT_CPU_ISA="bogus")
    assert "FUSEDOPT_CPU_ISA='bogus' is not available" in message
    assert run_python(code, FUSEDOPT_CPU_ISA="scalar") == ""


def test_set_cpu_isa_switches_and_rejects_unknown_names(isa: str) -> None:
    assert fusedopt.cpu_isa() == isa  # the conftest fixture set it
    with pytest.raises(ValueError, match="bogus") as raised:
        fusedopt.set_cpu_isa("bogus")
    assert "scalar" in str(raised.value)  # the message lists what is available
    assert fusedopt.cpu_isa() == isa


def test_set_cpu_isa_of_a_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        fusedopt.set_cpu_isa(2)  # type: ignore[arg-type]


def test_every_isa_runs_a_step_with_the_same_result_as_scalar(isa: str) -> None:
    rng = np.random.default_rng(0)
    start = rng.standard_normal(1000).astype(np.float32)
    g = rng.standard_normal(1000).astype(np.float32)
    p, q = start.copy(), start.copy()
    fusedopt.Adam([p], lr=0.1).step([g])
    fusedopt.set_cpu_isa("scalar")  # the fixture restores the default afterwards
    fusedopt.Adam([q], lr=0.1).step([g])
    np.testing.assert_array_equal(p, q)


# ------------------------------------------------------------------------------------- threads


def test_num_threads_environment_variable() -> None:
    assert (
        run_python("import fusedopt; print(fusedopt.num_threads())", FUSEDOPT_NUM_THREADS="3")
        == "3"
    )
    assert (
        run_python("import fusedopt; print(fusedopt.num_threads())", FUSEDOPT_NUM_THREADS="1")
        == "1"
    )


def test_invalid_num_threads_environment_variable_falls_back_to_the_default() -> None:
    default = run_python("import fusedopt; print(fusedopt.num_threads())", FUSEDOPT_NUM_THREADS="")
    assert int(default) >= 1
    assert (
        run_python("import fusedopt; print(fusedopt.num_threads())", FUSEDOPT_NUM_THREADS="0")
        == default
    )


def test_set_num_threads() -> None:
    previous = fusedopt.num_threads()
    try:
        fusedopt.set_num_threads(3)
        assert fusedopt.num_threads() == 3
        for bad in (0, -2):
            with pytest.raises(ValueError, match="n must be >= 1"):
                fusedopt.set_num_threads(bad)
        # Beyond a C int the binding raised TypeError; README promises ValueError.
        for bad in (1025, 2**31, 10**10, -(2**40)):
            with pytest.raises(ValueError, match="n must be between 1 and 1024"):
                fusedopt.set_num_threads(bad)
        assert fusedopt.num_threads() == 3
    finally:
        fusedopt.set_num_threads(previous)


def test_the_gil_is_released_during_a_step() -> None:
    """A Python thread keeps running while the main thread is inside a large native step.

    The helper records a timestamp per loop iteration. Holding the GIL through the native call
    would leave no timestamps inside it, except within one switch interval (5 ms) of its start or
    end, so only the middle half of the step is counted (the step takes tens of milliseconds)."""
    size = 50_000_000  # 200 MB per float32 array; with momentum, 600 MB in all
    params = np.ones(size, np.float32)
    grads = np.full(size, 0.5, np.float32)
    opt = fusedopt.SGD([params], lr=0.1, momentum=0.9)
    stamps: list[float] = []
    running, stop = threading.Event(), threading.Event()

    def count() -> None:
        running.set()
        while not stop.is_set():
            stamps.append(time.perf_counter())

    helper = threading.Thread(target=count, daemon=True)
    previous = fusedopt.num_threads()
    fusedopt.set_num_threads(1)  # leave a core for the helper on a small machine
    try:
        helper.start()
        running.wait(5)
        windows = []
        for _ in range(3):
            start = time.perf_counter()
            opt.step([grads])
            end = time.perf_counter()
            windows.append((start + (end - start) / 4, end - (end - start) / 4))
    finally:
        stop.set()
        helper.join(5)
        fusedopt.set_num_threads(previous)
    inside = [sum(lo < s < hi for s in stamps) for lo, hi in windows]
    assert sum(inside) > 0, f"no Python progress during the native steps: {windows}"
    np.testing.assert_allclose(params[:3], 1 - 0.1 * 0.5 * (1 + 1.9 + 2.71), rtol=1e-6)


# ------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "cls", [fusedopt.SGD, fusedopt.Adagrad, fusedopt.RMSprop, fusedopt.Adam, fusedopt.AdamW]
)
def test_empty_tensors_step_and_keep_state(cls: type) -> None:
    params = [np.zeros(0, np.float32), np.zeros((0, 3)), np.zeros((4, 0), np.float32)]
    opt = cls(params, lr=0.1)
    opt.step([np.zeros_like(p) for p in params])
    opt.step([np.zeros_like(p) for p in params])
    for i, p in enumerate(params):
        for value in opt.state.get(i, {}).values():
            if isinstance(value, np.ndarray):
                assert value.shape == p.shape and value.dtype == p.dtype


def test_empty_and_non_empty_tensors_mix() -> None:
    p = np.ones(5)
    empty = np.zeros(0)
    opt = fusedopt.SGD([empty, p, np.zeros(0)], lr=0.5)
    opt.step([np.zeros(0), np.ones(5), np.zeros(0)])
    np.testing.assert_array_equal(p, 0.5)


def test_keras_empty_variables() -> None:
    v = np.zeros(0, np.float32)
    opt = fk.Adam()
    assert opt.apply([np.zeros(0, np.float32)], [v]) == 1


def test_zero_dimensional_params() -> None:
    p = np.array(2.0)
    fusedopt.SGD([p], lr=0.5).step([np.array(1.0)])
    assert p == 1.5


def test_sizes_beyond_32_bits_reach_the_core_intact(tmp_path: Path) -> None:
    """Sizes and shapes travel as 64-bit integers: a param of 2**32 + 1 float32 elements (16 GiB,
    a sparse file that is never touched) is described with its true shape. A 32-bit size would
    read it as 1 element and accept a 1-element grad. Validation refuses before any write, so the
    test needs no memory; a step over more than 2**31 elements that does run would need 8 GiB
    or more and is left out."""
    size = 2**32 + 1
    path = tmp_path / "sparse.bin"
    try:
        with open(path, "wb") as f:
            f.truncate(4 * size)
        big = np.memmap(path, np.float32, mode="r+", shape=(size,))
    except (OSError, ValueError) as error:
        pytest.skip(f"cannot map a 16 GiB sparse file here: {error}")
    try:
        with pytest.raises(ValueError, match=r"params\[0\] has shape \(4294967297,\)"):
            F.sgd_([big], [np.zeros(1, np.float32)], lr=0.1)
        # Two one-element views 16 GiB apart: byte offsets past 2**32 are neither an overlap
        # nor a problem for the step.
        F.sgd_([big[:1], big[size - 1 :]], [np.ones(1, np.float32)] * 2, lr=0.5)
        assert big[0] == big[size - 1] == -0.5
    finally:
        del big


# ------------------------------------------------------------------------------------- package


def test_public_names() -> None:
    for name in (
        "SGD",
        "Adagrad",
        "RMSprop",
        "Adam",
        "AdamW",
        "ewma",
        "flatten_state_dict",
        "cpu_isa",
        "available_isas",
        "set_cpu_isa",
        "num_threads",
        "set_num_threads",
    ):
        assert name in fusedopt.__all__ and hasattr(fusedopt, name)
    assert isinstance(fusedopt.__version__, str)
    for module, names in (
        (F, ("sgd_", "adagrad_", "rmsprop_", "adam_")),
        (fk, ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW")),
    ):
        for name in names:
            assert callable(getattr(module, name))


def test_optimizer_repr_lists_the_groups() -> None:
    text = repr(fusedopt.Adam([np.zeros(2)], lr=0.5))
    assert text.startswith("Adam (") and "lr: 0.5" in text and "Parameter Group 0" in text
