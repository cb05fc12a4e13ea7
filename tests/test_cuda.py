"""The CUDA backend.

Everywhere: the launch plan (host code) covers every element exactly once; ``import fusedopt``
needs no CUDA; device buffers are validated before the first CUDA call; without a GPU the
backend says so clearly. On a GPU: every algorithm x convention x dtype x awkward sizes x
many-tensor lists matches the CPU backend bit for bit and the reference within tolerance, and a
list of more than 2^31 elements is updated whole.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fusedopt
from conftest import DTYPES, SIZES, native_options
from fusedopt import _core, _engine, cuda, reference

LIMITS = _core._cuda_plan_limits
CHUNK = LIMITS["chunk_elements"]
HAS_CUDA_MODULE = importlib.util.find_spec("fusedopt._cuda") is not None
needs_gpu = pytest.mark.skipif(
    not cuda.is_available(), reason=f"no CUDA backend here: {cuda.unavailable_reason()}"
)
needs_no_gpu = pytest.mark.skipif(cuda.is_available(), reason="a GPU is usable here")

# ------------------------------------------------------------------------------- launch plan

FAKE_BASE = 1 << 44  # fake device addresses: the plan never dereferences them


def fake_addresses(sizes: list[int], element_bytes: list[int], misalign: int = 0) -> list[list]:
    """Distinct 256-byte-aligned fake buffers (param, grad, 2 states, no third state)."""
    result, next_address = [], FAKE_BASE
    for size, width in zip(sizes, element_bytes):
        operands = []
        for _ in range(4):
            operands.append(next_address + misalign)
            next_address += (size * width + 511) // 256 * 256
        result.append(operands + [0])
    return result


def build_plan(
    sizes: list[int],
    element_bytes: list[int] | None = None,
    coefficient_ids: list[int] | None = None,
    addresses: list[list[int]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, list]]:
    element_bytes = element_bytes or [4] * len(sizes)
    coefficient_ids = coefficient_ids or [0] * len(sizes)
    addresses = addresses or fake_addresses(sizes, element_bytes)
    inputs = dict(
        sizes=sizes, element_bytes=element_bytes, coefficient_ids=coefficient_ids,
        addresses=addresses,
    )  # fmt: skip
    return _core._cuda_launch_plan(sizes, addresses, element_bytes, coefficient_ids), inputs


def check_plan(plan: list[dict[str, Any]], inputs: dict[str, list]) -> None:
    """Every element of every tensor in exactly one block; every batch within the limits."""
    sizes = inputs["sizes"]
    chunks_seen: dict[int, list[int]] = {i: [] for i in range(len(sizes))}
    widths_in_order = []
    for batch in plan:
        slots = batch["tensor_index"]
        assert 0 < len(slots) <= LIMITS["max_tensors"]
        assert 0 < len(batch["block_tensor"]) <= LIMITS["max_blocks"]
        assert 0 < len(batch["coefficient_ids"]) <= LIMITS["max_coefficient_sets"]
        assert len(set(batch["coefficient_ids"])) == len(batch["coefficient_ids"])
        widths_in_order.append(batch["element_bytes"])
        for slot, i in enumerate(slots):
            assert sizes[i] > 0, "an empty tensor took a slot"
            assert batch["sizes"][slot] == sizes[i]
            assert inputs["element_bytes"][i] == batch["element_bytes"]
            assert batch["addresses"][slot] == inputs["addresses"][i]
            set_index = batch["coefficient_set"][slot]
            assert batch["coefficient_ids"][set_index] == inputs["coefficient_ids"][i]
            aligned = all(a % LIMITS["vector_bytes"] == 0 for a in inputs["addresses"][i])
            assert batch["vectorized"][slot] == aligned
        assert set(batch["block_tensor"]) == set(range(len(slots))), "a slot without blocks"
        for slot, chunk in zip(batch["block_tensor"], batch["block_chunk"]):
            chunks_seen[slots[slot]].append(chunk)
    assert widths_in_order == sorted(widths_in_order), "float32 launches come first"
    for i, size in enumerate(sizes):
        assert sorted(chunks_seen[i]) == list(range(-(-size // CHUNK))), f"tensor {i}"


def random_sizes(rng: np.random.Generator, n: int) -> list[int]:
    kinds = rng.integers(0, 4, n)
    small = rng.integers(0, 70, n)
    medium = rng.integers(1, 5 * CHUNK, n)
    exact = rng.integers(1, 4, n) * CHUNK
    return [int(x) for x in np.choose(kinds, [small * 0, small, medium, exact])]


PLAN_CASES = {
    "awkward sizes": SIZES,
    "all empty": [0, 0, 0],
    "nothing": [],
    "one tensor of one chunk": [CHUNK],
    "10000 x 1000": [1000] * 10000,
    "empties at slot boundaries": ([1] * (LIMITS["max_tensors"] - 1) + [0] * 3 + [5]) * 3,
    "empty first and last": [0] + [17] * 300 + [0],
    "straddling launches": [CHUNK * (LIMITS["max_blocks"] - 1) + 5, 3 * CHUNK, 1, CHUNK + 1],
    "exact launch fill": [CHUNK * LIMITS["max_blocks"], 1, CHUNK * LIMITS["max_blocks"]],
    "over 2^31 elements": [2**31 + 7, 1, 3 * 2**31 + 1, 0, 5],
    "random": random_sizes(np.random.default_rng(7), 3000),
}


@pytest.mark.parametrize("sizes", PLAN_CASES.values(), ids=PLAN_CASES.keys())
def test_launch_plan_covers_every_element_once(sizes: list[int]) -> None:
    plan, inputs = build_plan(sizes)
    check_plan(plan, inputs)


def test_launch_plan_packs_small_tensors_into_few_launches() -> None:
    plan, _ = build_plan([1000] * 10000)
    assert len(plan) == -(-10000 // LIMITS["max_tensors"])


def test_launch_plan_continues_a_large_tensor_in_slot_zero() -> None:
    plan, inputs = build_plan([10, CHUNK * (LIMITS["max_blocks"] + 3)])
    check_plan(plan, inputs)
    assert [b["tensor_index"] for b in plan] == [[0, 1], [1]]
    assert plan[1]["block_chunk"][0] == LIMITS["max_blocks"] - 1


def test_launch_plan_separates_dtypes() -> None:
    sizes = [100, 200, 300, 400, 5]
    plan, inputs = build_plan(sizes, element_bytes=[4, 8, 4, 8, 8])
    check_plan(plan, inputs)
    assert [(b["element_bytes"], b["tensor_index"]) for b in plan] == [(4, [0, 2]), (8, [1, 3, 4])]


def test_launch_plan_limits_coefficient_sets_per_launch() -> None:
    ids = [0, 1, 2, 3, 4, 5, 0, 1, 6, 6, 7, 8]
    plan, inputs = build_plan([33] * len(ids), coefficient_ids=ids)
    check_plan(plan, inputs)
    assert len(plan) == 3


@pytest.mark.parametrize("misalign", [4, 8, 12])
def test_misaligned_pointers_take_the_guarded_path(misalign: int) -> None:
    sizes = [64, 1, CHUNK + 3]
    aligned = fake_addresses(sizes, [4] * 3)
    shifted = fake_addresses(sizes, [4] * 3, misalign=misalign)
    one_state_off = [list(a) for a in aligned]
    one_state_off[1][3] += misalign
    for addresses, expected in [(aligned, True), (shifted, False), (one_state_off, None)]:
        plan, inputs = build_plan(sizes, addresses=addresses)
        check_plan(plan, inputs)
        flags = plan[0]["vectorized"]
        if expected is None:
            assert flags == [True, False, True]
        else:
            assert flags == [expected] * 3


# ---------------------------------------------------------------------- without CUDA / a GPU


def test_import_fusedopt_does_not_load_cuda() -> None:
    code = "import sys, fusedopt; assert 'fusedopt._cuda' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_the_cuda_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fusedopt._cuda", None)  # import fails as if never built
    monkeypatch.setattr(cuda, "_native", None)
    assert cuda.is_available() is False
    assert cuda.device_count() == 0
    assert "built without its CUDA backend" in cuda.unavailable_reason()
    with pytest.raises(RuntimeError, match="built without its CUDA backend"):
        cuda.step("adam", [native_options("adam")], [0], [1], [], [], [None, None, None])


@pytest.mark.skipif(not HAS_CUDA_MODULE, reason="fusedopt._cuda was not built (no nvcc)")
def test_cuda_module_loads_without_gpu_and_reports_it() -> None:
    from fusedopt import _cuda

    count, reason = _cuda.device_count()
    assert count >= 0
    if count == 0:
        assert reason and cuda.is_available() is False


ARCHITECTURE_CASES = [
    # (CMake's list, compute capability, what serves it)
    ("80-real,90-real,90-virtual", (7, 5), "none"),
    ("80-real,90-real,90-virtual", (8, 0), "machine_code"),
    ("80-real,90-real,90-virtual", (8, 9), "machine_code"),
    ("80-real,90-real,90-virtual", (9, 0), "machine_code"),
    ("80-real,90-real,90-virtual", (10, 0), "ptx"),
    ("80-real,90-real,90-virtual", (12, 1), "ptx"),
    ("80-real", (9, 0), "none"),
    ("86", (8, 0), "none"),
    ("86", (8, 6), "machine_code"),
    ("86", (9, 0), "ptx"),
    ("100-real", (10, 3), "machine_code"),
    ("100-real", (12, 0), "none"),
    ("90a-real", (9, 0), "unknown"),
    ("native", (9, 0), "unknown"),
    ("", (9, 0), "unknown"),
    ("80-real,", (8, 0), "unknown"),
]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler (c++) to build the check")
def test_which_images_serve_a_device_is_read_from_the_architecture_list(tmp_path) -> None:
    """cuda::images_for decides without the CUDA runtime whether a GPU is served (asking the
    runtime made a context on every GPU of the machine): machine code of the device's major
    version at its minor or below, else PTX of its capability or below, whose compilation the
    runtime is asked about, as it is for a list not read here."""
    header = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "architectures.h"
    if not header.is_file():
        pytest.skip("the source tree's csrc/ is not beside these tests")
    checks = "".join(
        f'  report("{lst}", {major}, {minor});\n' for lst, (major, minor), _ in ARCHITECTURE_CASES
    )
    program = tmp_path / "check.cpp"
    program.write_text(
        f'#include "{header}"\n#include <cstdio>\nusing fusedopt::cuda::ImagesFor;\n'
        "void report(const char* list, int major, int minor) {\n"
        '  static const char* names[] = {"none", "machine_code", "ptx", "unknown"};\n'
        '  std::printf("%s\\n", names[static_cast<int>(\n'
        "      fusedopt::cuda::images_for(list, major, minor))]);\n}\n"
        f"int main() {{\n{checks}}}\n"
    )
    binary = tmp_path / "check"
    subprocess.run(["c++", "-std=c++17", "-Wall", "-Werror", str(program), "-o", str(binary)],
                   check=True)  # fmt: skip
    answers = subprocess.run([str(binary)], check=True, capture_output=True, text=True)
    assert answers.stdout.split() == [expected for *_, expected in ARCHITECTURE_CASES]


class FakeDeviceArray:
    """A CUDA Array Interface over a fake address: enough for everything before the first CUDA
    call (on a GPU machine the runtime then refuses the address)."""

    _next_address = 1 << 40

    def __init__(self, shape: tuple[int, ...], typestr: str = "<f4", **interface: Any) -> None:
        self.shape = shape
        self.dtype = np.dtype(typestr)
        address = FakeDeviceArray._next_address
        FakeDeviceArray._next_address += 1 << 30
        self.interface = dict(
            shape=shape, typestr=typestr, data=(address, False), strides=None, version=3
        )
        self.interface.update(interface)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return self.interface


class FakeDLPackArray:
    """Claims to be on CUDA but hands out a NumPy (host) capsule."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.dtype = array.dtype
        self.shape = array.shape

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)

    def __dlpack__(self, **kwargs: Any) -> Any:
        kwargs.pop("stream", None)
        return self.array.__dlpack__(**kwargs)


def adam_on_device(params: list, grads: list, states: list | None = None, **kw: Any) -> None:
    states = states or [[FakeDeviceArray(p.shape) for p in params] for _ in range(2)]
    cuda.step(
        "adam", [native_options("adam")], np.zeros(len(params), np.int64),
        np.ones(len(params), np.int64), params, grads, [states[0], states[1], None], **kw,
    )  # fmt: skip


needs_cuda_module = pytest.mark.skipif(not HAS_CUDA_MODULE, reason="fusedopt._cuda not built")


@needs_cuda_module
@needs_no_gpu
def test_a_cuda_call_without_gpu_raises_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        adam_on_device([FakeDeviceArray((10,))], [FakeDeviceArray((10,))])


@needs_cuda_module
@pytest.mark.parametrize(
    "bad, error, message",
    [
        (dict(data=(1 << 50, True)), ValueError, r"params\[0\] is read-only"),
        (dict(strides=(80, 4)), ValueError, r"params\[0\] is not C-contiguous"),
        (dict(typestr="<i4"), TypeError, r"params\[0\] has dtype <i4"),
        (dict(typestr=">f4"), TypeError, r"params\[0\] has dtype >f4"),
        (dict(mask=object()), ValueError, r"params\[0\] is not C-contiguous"),
    ],
    ids=["read-only", "strided", "int32", "big-endian", "masked"],
)
def test_bad_interface_buffers_are_refused_before_any_cuda_call(
    bad: dict, error: type, message: str
) -> None:
    param = FakeDeviceArray((10, 10), **bad)
    with pytest.raises(error, match=message):
        adam_on_device([param], [FakeDeviceArray((10, 10))])


@needs_cuda_module
def test_a_bfloat16_dlpack_buffer_is_described_as_bfloat16() -> None:
    """bfloat16 comes by DLPack only (no typestr names it); a float32 grad for it is refused
    as the CPU refuses it, naming both dtypes."""
    torch = pytest.importorskip("torch")
    param = FakeDLPackArray(torch.zeros(16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype float32 but params\[0\]"):
        adam_on_device([param], [FakeDeviceArray((16,))])


def nadam_on_device(scalars: Any) -> None:
    params, grads = [FakeDeviceArray((8,))], [FakeDeviceArray((8,))]
    states = [[FakeDeviceArray((8,))] for _ in range(2)]
    cuda.step(
        "nadam", [native_options("nadam")], np.zeros(1, np.int64), np.ones(1, np.int64), params,
        grads, states, scalars=scalars,
    )  # fmt: skip


@needs_cuda_module
@pytest.mark.parametrize(
    "scalars, error, message",
    [
        (np.ones((1, _core.max_scalars), np.float32), TypeError, "numpy array of float64"),
        ([[1.0] * _core.max_scalars], TypeError, "numpy array of float64"),
        (np.ones((1, 1)), ValueError, f"hold {_core.max_scalars} values"),
        (np.ones((1, _core.max_scalars))[:, ::-1], ValueError, "C-contiguous"),
    ],
    ids=["float32", "list", "too few", "reversed"],
)
def test_scalars_the_step_writes_are_checked_as_on_the_cpu(scalars, error, message) -> None:
    """NAdam's mu_product is advanced in place: an array of another dtype or size was written
    past its end (16 bytes into a 4-byte float32 array), a list read as if it were one."""
    with pytest.raises(error, match=f"scalars must be .*{message}"):
        nadam_on_device(scalars)


@needs_cuda_module
@needs_no_gpu
def test_a_step_refused_for_its_device_leaves_the_scalars_as_they_were() -> None:
    """The device is checked before NAdam's mu_product advances (it went from 1.0 to 0.45)."""
    scalars = np.ones((1, _core.max_scalars))
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        nadam_on_device(scalars)
    assert np.array_equal(scalars, np.ones((1, _core.max_scalars)))


@needs_cuda_module
@needs_no_gpu
def test_the_functional_api_takes_low_precision_options_to_the_device() -> None:
    """Masters and stochastic rounding reach the CUDA backend (they were dropped on the way
    once, then refused): without a GPU the step stops at the device check, after the buffers'
    own checks passed. tests/test_cuda_emulated_precision.py runs the kernels."""
    from fusedopt import functional

    params, grads, m, v = ([FakeDeviceArray((4,), typestr="<f2")] for _ in range(4))
    masters = [FakeDeviceArray((4,))]
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        functional.adam_(
            params, grads, m, v, None, step=1, lr=0.1, masters=masters, stochastic_rounding=True
        )


@needs_cuda_module
def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(9,\)"):
        adam_on_device(
            [FakeDeviceArray((8,)), FakeDeviceArray((8,))],
            [FakeDeviceArray((8,)), FakeDeviceArray((9,))],
        )


@needs_cuda_module
def test_host_buffer_behind_dlpack_is_refused_as_wrong_device() -> None:
    host = FakeDLPackArray(np.zeros(16, np.float32))
    with pytest.raises(ValueError, match=r"grads\[0\] is in the CPU, not on a CUDA device"):
        adam_on_device([FakeDeviceArray((16,))], [host])


@needs_cuda_module
def test_a_cpu_torch_tensor_in_a_device_step_is_refused_naming_it() -> None:
    """torch answers __dlpack__(stream=...) on a CPU tensor with an AssertionError: the device
    is checked first, and the buffer named."""
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"grads\[0\] is in the CPU, not on a CUDA device"):
        adam_on_device([FakeDeviceArray((16,))], [torch.zeros(16)])


@needs_cuda_module
def test_read_only_and_strided_dlpack_buffers_are_refused() -> None:
    read_only = np.zeros(16, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        adam_on_device([FakeDLPackArray(read_only)], [FakeDeviceArray((16,))])
    strided = np.zeros((4, 8), np.float32)[:, ::2]
    with pytest.raises(ValueError, match=r"params\[0\] is not C-contiguous"):
        adam_on_device([FakeDLPackArray(strided)], [FakeDeviceArray((4, 4))])


def test_numpy_array_in_a_device_step_is_refused_as_host_memory() -> None:
    """A mixed-device step: the host buffer is named, before any CUDA call."""
    if not HAS_CUDA_MODULE:
        pytest.skip("fusedopt._cuda not built")
    with pytest.raises(ValueError, match=r"grads\[0\] is in the CPU, not on a CUDA device"):
        adam_on_device([FakeDeviceArray((4,))], [np.zeros(4, np.float32)])


def test_mixing_host_and_device_params_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"params\[1\] is a CUDA device array"):
        fusedopt.Adam([np.zeros(3, np.float32), FakeDeviceArray((3,))])
    with pytest.raises(TypeError, match=r"params\[1\] is a host array"):
        fusedopt.Adam([FakeDeviceArray((3,)), np.zeros(3, np.float32)])


def test_device_arrays_are_told_apart_from_host_arrays() -> None:
    assert cuda.is_device_array(FakeDeviceArray((2,)))
    assert cuda.is_device_array(FakeDLPackArray(np.zeros(2)))
    assert not cuda.is_device_array(np.zeros(2))
    assert not cuda.is_device_array([1.0, 2.0])


# ----------------------------------------------------------------------------------- on a GPU


def device_libraries() -> list[str]:
    libraries = []
    for name in ("torch", "cupy"):
        if importlib.util.find_spec(name) is None:
            continue
        if name == "torch":
            import torch

            if not torch.cuda.is_available():
                continue
        libraries.append(name)
    return libraries


def to_device(array: np.ndarray, library: str) -> Any:
    if library == "torch":
        import torch

        return torch.from_numpy(array.copy()).cuda()
    import cupy

    return cupy.asarray(array)


# (algorithm, options, state names) with both conventions; each runs several steps.
GPU_CASES = [
    ("sgd", dict(lr=0.1), 0),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01), 1),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True), 1),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, convention="keras"), 1),
    ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01), 1),
    ("adagrad", dict(lr=0.1, eps=1e-7, convention="keras"), 1),
    ("rmsprop", dict(lr=0.01), 1),
    ("rmsprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01), 3),
    ("rmsprop", dict(lr=0.01, momentum=0.5, centered=True, convention="keras"), 3),
    ("adam", dict(lr=0.01, weight_decay=0.01), 2),
    ("adam", dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True, amsgrad=True), 3),
    ("adam", dict(lr=0.01, maximize=True), 2),
    ("adam", dict(lr=0.01, weight_decay=0.004, amsgrad=True, convention="keras"), 3),
    ("adadelta", dict(lr=0.5, rho=0.8, weight_decay=0.01, maximize=True), 2),
    ("adadelta", dict(lr=0.5, weight_decay=0.01, convention="keras"), 2),
    ("adamax", dict(lr=0.01, beta1=0.3, weight_decay=0.01), 2),
    ("adamax", dict(lr=0.01, eps=1e-3, convention="keras"), 2),
    ("nadam", dict(lr=0.01, momentum_decay=0.5, decoupled_weight_decay=True, weight_decay=0.1), 2),
    ("nadam", dict(lr=0.01, momentum_decay=1.0, convention="keras"), 2),
    ("radam", dict(lr=0.01, beta2=0.9, weight_decay=0.01), 2),
    ("rprop", dict(lr=0.01, etaminus=0.3, step_size_max=0.05, maximize=True), 2),
    ("asgd", dict(lr=0.01, t0=1.0, lambd=0.1, weight_decay=0.01), 1),
    ("lion", dict(lr=0.01, beta1=0.3, weight_decay=0.1), 1),
    ("lion", dict(lr=0.01, weight_decay=0.1, convention="keras"), 1),
]
LISTS = {
    "awkward sizes": SIZES,
    "many small": [1 + (i * 37) % 300 for i in range(700)],
    "straddling": [CHUNK * 3 + 5, 0, CHUNK - 1, 2 * CHUNK + 9],
    "one flat buffer": [5 * CHUNK + 3],
}


def run_step(device: bool, algorithm: str, values: tuple, arrays: dict[str, Any], step: int,
             grad_scale: float | None) -> None:  # fmt: skip
    n = len(arrays["params"])
    group_of, steps = np.zeros(n, np.int64), np.full(n, step, np.int64)
    description = _engine.describe(algorithm)
    states = [arrays[f"s{k}"] for k in range(len(description.states))]
    new_state = [step == 1] * n if description.uses_new_state else None
    scalars = arrays.get("scalars")
    if device:
        cuda.step(algorithm, [values], group_of, steps, arrays["params"], arrays["grads"], states,
                  new_state=new_state, scalars=scalars, grad_scale=grad_scale)  # fmt: skip
    else:
        _core.step(algorithm, [values], group_of, steps, arrays["params"], arrays["grads"], states,
                   new_state, scalars, grad_scale)  # fmt: skip


def initial_scalars(algorithm: str, values: tuple, n: int) -> np.ndarray | None:
    description = _engine.describe(algorithm)
    if not description.scalars:
        return None
    rows = np.zeros((n, _core.max_scalars))
    rows[:, : len(description.scalars)] = description.initial_values(values)[1]
    return rows


@needs_gpu
@pytest.mark.parametrize("library", device_libraries() or ["torch"])
@pytest.mark.parametrize("sizes", LISTS.values(), ids=LISTS.keys())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(GPU_CASES)])
def test_gpu_matches_cpu_bit_for_bit(
    case: tuple, dtype: type, sizes: list[int], library: str
) -> None:
    algorithm, hyper, num_states = case
    values = native_options(algorithm, **hyper)
    rng = np.random.default_rng(len(sizes))
    host = {
        "params": [rng.standard_normal(s).astype(dtype) for s in sizes],
        "grads": [rng.standard_normal(s).astype(dtype) for s in sizes],
    }
    for k in range(3):
        states = [np.abs(rng.standard_normal(s)).astype(dtype) for s in sizes]
        host[f"s{k}"] = states if k < num_states else None
    device: dict[str, Any] = {
        k: None if v is None else [to_device(a, library) for a in v] for k, v in host.items()
    }
    host["scalars"] = initial_scalars(algorithm, values, len(sizes))
    device["scalars"] = None if host["scalars"] is None else host["scalars"].copy()
    grad_scale = (
        2.0 if algorithm in ("sgd", "adam") and hyper.get("convention") != "keras" else None
    )
    for step in range(1, 4):
        run_step(False, algorithm, values, host, step, grad_scale)
        run_step(True, algorithm, values, device, step, grad_scale)
    for key, arrays in host.items():
        if key == "scalars":
            np.testing.assert_array_equal(device[key], arrays)  # host values, advanced alike
            continue
        for i, expected in enumerate(arrays or []):
            np.testing.assert_array_equal(cuda.to_numpy(device[key][i]), expected, f"{key}[{i}]")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_lamb_matches_cpu_within_rounding(dtype: type) -> None:
    """LAMB's per-tensor sums add in another order on the GPU (threads, then a tree per block,
    then chunk by chunk): equal to the CPU's up to the rounding of those sums."""
    import torch

    values = native_options("lamb", "keras", lr=0.01, weight_decay=0.01)
    sizes = [1, 17, 5 * CHUNK + 3, 4097, 0]
    rng = np.random.default_rng(11)
    host = {
        "params": [rng.standard_normal(s).astype(dtype) for s in sizes],
        "grads": [rng.standard_normal(s).astype(dtype) for s in sizes],
        "s0": [np.zeros(s, dtype) for s in sizes],
        "s1": [np.zeros(s, dtype) for s in sizes],
    }
    device = {k: [torch.from_numpy(a.copy()).cuda() for a in v] for k, v in host.items()}
    for step in range(1, 4):
        run_step(False, "lamb", values, host, step, None)
        run_step(True, "lamb", values, device, step, None)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    for key in ("params", "s0", "s1"):
        for i, expected in enumerate(host[key]):
            np.testing.assert_allclose(cuda.to_numpy(device[key][i]), expected, **tolerance)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_adam_optimizer_matches_the_reference(dtype: type) -> None:
    import torch

    rng = np.random.default_rng(3)
    sizes = [1, 17, 65537, 4097]
    params = [rng.standard_normal(s).astype(dtype) for s in sizes]
    expected = [p.astype(np.float64) for p in params]
    states: list[dict] = [{} for _ in sizes]
    device_params = [torch.nn.Parameter(torch.from_numpy(p.copy()).cuda()) for p in params]
    opt = fusedopt.AdamW(device_params, lr=0.01, weight_decay=0.1)
    for _ in range(4):
        grads = [rng.standard_normal(s).astype(dtype) for s in sizes]
        opt.step([torch.from_numpy(g).cuda() for g in grads])
        for i, g in enumerate(grads):
            expected[i], states[i] = reference.torch_adam(
                expected[i], g, states[i], lr=0.01, weight_decay=0.1, decoupled_weight_decay=True
            )
    tolerance = dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    for p, e in zip(device_params, expected):
        np.testing.assert_allclose(cuda.to_numpy(p), e, **tolerance)
    assert isinstance(opt.state_dict()["state"][0]["exp_avg"], np.ndarray)


@needs_gpu
@pytest.mark.parametrize("sizes", [[2**31 + 3, 17], [2**31 + 5]], ids=["multi-tensor", "flat"])
def test_gpu_list_over_2_31_elements_is_updated_whole(sizes: list[int]) -> None:
    import torch

    params = [torch.full((s,), 1.0, device="cuda") for s in sizes]
    grads = [torch.full((s,), 0.5, device="cuda") for s in sizes]
    exp_avgs = [torch.zeros(s, device="cuda") for s in sizes]
    exp_avg_sqs = [torch.zeros(s, device="cuda") for s in sizes]
    values = native_options("adam")
    n = len(sizes)
    cuda.step("adam", [values], np.zeros(n, np.int64), np.ones(n, np.int64), params, grads,
              [exp_avgs, exp_avg_sqs, None])  # fmt: skip
    host = [np.ones(1, np.float32), np.full(1, 0.5, np.float32), np.zeros(1, np.float32),
            np.zeros(1, np.float32)]  # fmt: skip
    _core.step("adam", [values], np.zeros(1, np.int64), np.ones(1, np.int64), [host[0]],
               [host[1]], [[host[2]], [host[3]], None])  # fmt: skip
    torch.cuda.synchronize()
    for p in params:
        assert bool((p == float(host[0][0])).all()), "an element was missed or updated twice"


@needs_gpu
def test_gpu_refuses_bad_buffers_before_writing() -> None:
    import torch

    param = torch.ones(64, 64, device="cuda")
    before = param.clone()
    with pytest.raises(ValueError, match="not C-contiguous"):
        adam_on_device([param], [torch.ones(64, 64, device="cuda").t()],
                       [[torch.zeros_like(param)], [torch.zeros_like(param)]])  # fmt: skip
    with pytest.raises((TypeError, ValueError)):
        adam_on_device([param], [torch.ones(64, 64)],
                       [[torch.zeros_like(param)], [torch.zeros_like(param)]])  # fmt: skip
    assert torch.equal(param, before)


@needs_gpu
def test_gpu_runs_on_an_explicit_stream() -> None:
    import torch

    stream = torch.cuda.Stream()
    param = torch.ones(1 << 20, device="cuda")
    grad = torch.full_like(param, 0.5)
    opt = fusedopt.SGD([param], lr=0.1)
    torch.cuda.synchronize()
    with cuda.use_stream(stream):
        opt.step([grad])
    stream.synchronize()
    assert bool((param == 1.0 - np.float32(0.1) * np.float32(0.5)).all())


# Low precision on the GPU (csrc/cuda/staged.cuh): the same bits as the CPU backend.
# (algorithm, options, param dtype, state dtype, master, seed)
GPU_PRECISION_CASES = [
    (
        "adam",
        dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True),
        "bfloat16",
        None,
        True,
        None,
    ),
    ("adam", dict(lr=0.01, amsgrad=True), "bfloat16", "int8", True, 3),
    ("adam", dict(lr=0.01), "float32", "int8", False, None),
    ("adam", dict(lr=0.01, maximize=True), "float16", "float32", True, 5),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True), "bfloat16", "bfloat16", False, 7),
    ("rmsprop", dict(lr=0.01, momentum=0.5, centered=True), "bfloat16", "int8", True, None),
    ("adagrad", dict(lr=0.1, weight_decay=0.01), "float16", "int8", True, 1),
    ("lion", dict(lr=0.01, weight_decay=0.1), "bfloat16", "int8", False, 2),
    ("nadam", dict(lr=0.01, momentum_decay=0.5), "bfloat16", "bfloat16", True, None),
    ("asgd", dict(lr=0.01, t0=1.0, lambd=0.1), "float16", "float32", True, 9),
    ("adadelta", dict(lr=0.5, convention="keras"), "bfloat16", "float32", False, 4),
    ("lamb", dict(lr=0.01, weight_decay=0.01, convention="keras"), "bfloat16", "int8", True, 3),
    ("lamb", dict(lr=0.01, convention="keras"), "float16", "bfloat16", False, None),
]


def host_to_torch_device(array: np.ndarray) -> Any:
    import torch

    if array.dtype == _engine.numpy_dtype("bfloat16"):
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).cuda()
    return torch.from_numpy(array.copy()).cuda()


@needs_gpu
@pytest.mark.parametrize(
    "case", GPU_PRECISION_CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in GPU_PRECISION_CASES]
)
def test_gpu_low_precision_matches_cpu_bit_for_bit(case: tuple) -> None:
    """16-bit params and grads, masters, 16-bit and 8-bit states, stochastic rounding: every
    buffer equal to the CPU's after three steps (the kernels' rounding and 8-bit coding are the
    CPU's, keyed alike). LAMB's params and masters move by per-tensor sums that add in another
    order on the GPU: within 2 units in their last place there, its states bit for bit."""
    algorithm, hyper, param_dtype, state_dtype, master, seed = case
    values = native_options(algorithm, **hyper)
    description = _engine.describe(algorithm)
    sizes = [3, 4096 + 17, 2 * CHUNK + 300, 700]
    n = len(sizes)
    rng = np.random.default_rng(21)
    dtype = _engine.numpy_dtype(param_dtype)
    host: dict[str, Any] = {"params": [rng.standard_normal(s).astype(dtype) for s in sizes]}
    states, absmax = [], []
    for name in description.states:
        if state_dtype == "int8":
            made = [_engine.quantized_full((s,), 0.0, description.nonnegative(name)) for s in sizes]
            states.append([c for c, _ in made])
            absmax.append([a.astype(np.float32) for _, a in made])
        else:
            state = _engine.numpy_dtype(state_dtype or param_dtype)
            states.append([np.zeros(s, state) for s in sizes])
    host["masters"] = [p.astype(np.float32) for p in host["params"]] if master else None
    host["scalars"] = initial_scalars(algorithm, values, n)
    device = {
        "params": [host_to_torch_device(p) for p in host["params"]],
        "masters": None if not master else [host_to_torch_device(m) for m in host["masters"]],
        "scalars": None if host["scalars"] is None else host["scalars"].copy(),
    }
    device_states = [[host_to_torch_device(s) for s in lst] for lst in states]
    device_absmax = [[host_to_torch_device(a) for a in lst] for lst in absmax] or None
    group_of = np.zeros(n, np.int64)
    for step in range(1, 4):
        grads = [rng.standard_normal(s).astype(dtype) for s in sizes]
        steps = np.full(n, step, np.int64)
        new_state = [step == 1] * n if description.uses_new_state else None
        _core.step(algorithm, [values], group_of, steps, host["params"], [g.copy() for g in grads],
                   states, new_state, host["scalars"], None, masters=host["masters"],
                   rounding_seed=seed, absmax=absmax or None)  # fmt: skip
        cuda.step(algorithm, [values], group_of, steps, device["params"],
                  [host_to_torch_device(g) for g in grads], device_states, new_state=new_state,
                  scalars=device["scalars"], masters=device["masters"], absmax=device_absmax,
                  rounding_seed=seed)  # fmt: skip
    pairs = [("params", host["params"], device["params"])]
    pairs += [(f"state {k}", a, b) for k, (a, b) in enumerate(zip(states, device_states))]
    pairs += [(f"absmax {k}", a, b) for k, (a, b) in enumerate(zip(absmax, device_absmax or []))]
    if master:
        pairs.append(("masters", host["masters"], device["masters"]))
    for what, expected, got in pairs:
        for i, (e, g) in enumerate(zip(expected, got)):
            if algorithm == "lamb" and what in ("params", "masters"):
                apart = cuda.to_numpy(g).astype(np.float64) - e.astype(np.float64)
                ulp = np.spacing(np.abs(e).astype(np.float32)).astype(np.float64)
                ulp *= 2.0 ** (23 - np.finfo(e.dtype).nmant)
                assert np.all(np.abs(apart) <= 2 * ulp + 1e-6 * np.abs(e)), f"{what}[{i}]"
                continue
            assert cuda.to_numpy(g).tobytes() == e.tobytes(), f"{what}[{i}]"
    if host["scalars"] is not None:
        np.testing.assert_array_equal(device["scalars"], host["scalars"])


@needs_gpu
def test_gpu_optimizer_class_low_precision_matches_the_cpu() -> None:
    """fusedopt.AdamW over bfloat16 CUDA tensors with a master, 8-bit state and stochastic
    rounding: the CPU class's bits over the same values, its state dict included."""
    import torch

    rng = np.random.default_rng(5)
    bfloat16 = _engine.numpy_dtype("bfloat16")
    sizes = [5000, 300, CHUNK + 1]
    host = [rng.standard_normal(s).astype(bfloat16) for s in sizes]
    device = [host_to_torch_device(p) for p in host]
    precision = dict(master_weights=True, state_dtype="int8", stochastic_rounding=True, seed=11)
    cpu_opt = fusedopt.AdamW(host, lr=0.01, weight_decay=0.1, **precision)
    gpu_opt = fusedopt.AdamW(device, lr=0.01, weight_decay=0.1, **precision)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(bfloat16) for s in sizes]
        cpu_opt.step(grads)
        gpu_opt.step([host_to_torch_device(g) for g in grads])
    torch.cuda.synchronize()
    for i, (p, d) in enumerate(zip(host, device)):
        assert cuda.to_numpy(d).tobytes() == p.tobytes(), f"params[{i}]"
    cpu_state, gpu_state = cpu_opt.state_dict()["state"], gpu_opt.state_dict()["state"]
    for i in cpu_state:
        for key, value in cpu_state[i].items():
            got = np.asarray(gpu_state[i][key])  # state dicts hold host copies
            assert got.tobytes() == np.asarray(value).tobytes(), f"state[{i}][{key!r}]"


@needs_gpu
def test_gpu_plan_registers_anew_a_state_whose_memory_moved() -> None:
    """exp_avg given new memory in place (``.data =``): the plan describes it again before the
    next step writes, which then updates the new memory, as the CPU's optimizer does."""
    import torch

    param = torch.ones(5000, device="cuda")
    ours = fusedopt.Adam([param], lr=0.1)
    host = fusedopt.Adam([np.ones(5000, np.float32)], lr=0.1)
    grad = np.full(5000, 0.5, np.float32)
    for step in range(3):
        if step == 2:
            exp_avg = ours.state[0]["exp_avg"]
            exp_avg.data = exp_avg.clone()
        ours.step([torch.from_numpy(grad).cuda()])
        host.step([grad])
    np.testing.assert_array_equal(cuda.to_numpy(ours.state[0]["exp_avg"]), host.state[0]["exp_avg"])
    np.testing.assert_array_equal(cuda.to_numpy(param), host.param_groups[0]["params"][0])
