"""The optimizer classes' device route (fusedopt.optim over CUDA arrays: state made on the device,
masters, 8-bit state, stochastic rounding, state dicts both ways) run end to end without a GPU:
fusedopt.cuda's native module is swapped for fusedopt._cuda_emulated (the CUDA kernels' source
compiled for the CPU, csrc/cuda/emulation.h), and the arrays are a CuPy-like stand-in whose
"device memory" is host memory. Each run is compared bit for bit with the same optimizer over
NumPy arrays, whose step is the CPU backend's."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import types
import weakref
from typing import Any

import numpy as np
import pytest

import fusedopt
from conftest import native_options
from fusedopt import _core, _engine, cuda

emulated = pytest.importorskip(
    "fusedopt._cuda_emulated", reason="fusedopt was built without its CUDA emulation module"
)
torch = pytest.importorskip("torch", reason="bfloat16 arrays reach the emulation by DLPack")

BFLOAT16 = _engine.numpy_dtype("bfloat16")


class EmulatedArray:
    """A device array of the emulated GPU: a host array behind the CUDA Array Interface and a
    DLPack capsule that says CUDA (bfloat16 goes by DLPack: no typestr names it)."""

    def __init__(self, host: np.ndarray) -> None:
        self.host = np.ascontiguousarray(host)

    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)
    size = property(lambda self: self.host.size)
    ndim = property(lambda self: self.host.ndim)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        # No typestr names bfloat16: torch 2.13 says "<V2" (2.5 said "<f2", float16's), which
        # fusedopt.cuda must not take as the array's dtype.
        return {
            "data": (self.host.ctypes.data, False),
            "shape": self.host.shape,
            "typestr": "<f2" if self.host.dtype == BFLOAT16 else self.host.dtype.str,
            "strides": None,
            "version": 3,
        }

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)  # kDLCUDA

    def __dlpack__(self, **_: Any) -> Any:
        if self.host.dtype == BFLOAT16:  # a CPU capsule: the emulated device's memory
            return torch.from_numpy(self.host.view(np.int16)).view(torch.bfloat16).__dlpack__()
        return torch.from_numpy(self.host).__dlpack__()

    def __array_namespace__(self) -> Any:
        return NAMESPACE

    def get(self) -> np.ndarray:  # CuPy's host copy
        return self.host.copy()

    def set(self, values: np.ndarray) -> None:
        np.copyto(self.host, values)

    def copy(self) -> EmulatedArray:
        return EmulatedArray(self.host.copy())

    def astype(self, dtype: Any) -> EmulatedArray:
        return EmulatedArray(self.host.astype(dtype))

    def __setitem__(self, key: Any, value: Any) -> None:
        self.host[key] = value.host if isinstance(value, EmulatedArray) else value


NAMESPACE = types.SimpleNamespace(
    zeros_like=lambda x, dtype=None: EmulatedArray(np.zeros_like(x.host, dtype=dtype)),
    full_like=lambda x, v, dtype=None: EmulatedArray(np.full_like(x.host, v, dtype=dtype)),
    asarray=lambda values: EmulatedArray(np.array(values)),
    float32=np.dtype(np.float32),
    float64=np.dtype(np.float64),
    float16=np.dtype(np.float16),
    bfloat16=BFLOAT16,
    uint8=np.dtype(np.uint8),
)


@pytest.fixture
def emulated_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_native", emulated)


def host_of(x: Any) -> np.ndarray:
    return x.host if isinstance(x, EmulatedArray) else np.asarray(x)


def assert_same_bits(expected: Any, got: Any, what: str) -> None:
    e, g = host_of(expected), host_of(got)
    assert e.dtype == g.dtype and e.shape == g.shape, what
    assert e.tobytes() == g.tobytes(), what


CASES = [
    ("AdamW", dict(lr=0.01, weight_decay=0.1), "bfloat16", dict(master_weights=True)),
    (
        "Adam",
        dict(lr=0.01, amsgrad=True),
        "bfloat16",
        dict(master_weights=True, state_dtype="int8", stochastic_rounding=True, seed=3),
    ),
    ("Adam", dict(lr=0.01), "float32", dict(state_dtype="int8")),
    ("Adam", dict(lr=0.01), "float16", dict(state_dtype="float32", stochastic_rounding=True)),
    ("SGD", dict(lr=0.1, momentum=0.9), "bfloat16", dict(stochastic_rounding=True, seed=1)),
    ("RMSprop", dict(lr=0.01, centered=True), "bfloat16", dict(state_dtype="int8")),
    ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.5), "float16", dict(state_dtype="int8")),
    ("NAdam", dict(lr=0.01), "bfloat16", dict(master_weights=True, state_dtype="bfloat16")),
    ("Lion", dict(lr=0.01), "bfloat16", dict(state_dtype="int8", master_weights=True)),
]
SIZES = [5000, 300, 4096 * 2 + 17]


def make(case: tuple, on_device: bool, rng: np.random.Generator) -> tuple[Any, list[Any]]:
    name, hyper, dtype, precision = case
    host = [rng.standard_normal(s).astype(_engine.numpy_dtype(dtype)) for s in SIZES]
    params = [EmulatedArray(p) for p in host] if on_device else host
    return getattr(fusedopt, name)(params, **hyper, **precision), params


@pytest.mark.usefixtures("emulated_gpu")
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_device_optimizer_matches_the_cpu_bit_for_bit(case: tuple) -> None:
    """Params, every state (8-bit codes and absmax, masters) and the state dict, after three
    steps with new grads each, equal the CPU optimizer's."""
    cpu_opt, cpu_params = make(case, False, np.random.default_rng(1))
    gpu_opt, gpu_params = make(case, True, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(cpu_params[0].dtype) for s in SIZES]
        cpu_opt.step(grads)
        gpu_opt.step([EmulatedArray(g) for g in grads])
    for i, (e, g) in enumerate(zip(cpu_params, gpu_params)):
        assert_same_bits(e, g, f"params[{i}]")
    cpu_state, gpu_state = cpu_opt.state_dict()["state"], gpu_opt.state_dict()["state"]
    assert cpu_state.keys() == gpu_state.keys()
    for i, entry in cpu_state.items():
        assert entry.keys() == gpu_state[i].keys(), f"state[{i}]"
        for key, value in entry.items():
            assert isinstance(gpu_state[i][key], np.ndarray | int | float), "host copies"
            assert_same_bits(value, gpu_state[i][key], f"state[{i}][{key!r}]")


@pytest.mark.usefixtures("emulated_gpu")
@pytest.mark.parametrize("direction", ["gpu to cpu", "cpu to gpu"])
def test_state_dicts_move_between_device_and_host_and_training_continues(direction: str) -> None:
    """8-bit state with a master and stochastic rounding, saved on one side and loaded on the
    other: the next steps are the same bits as an uninterrupted run."""
    case = CASES[1]
    rng = np.random.default_rng(7)
    grads = [[rng.standard_normal(s).astype(BFLOAT16) for s in SIZES] for _ in range(4)]
    straight, straight_params = make(case, False, np.random.default_rng(1))
    for g in grads:
        straight.step(g)
    first_on_device = direction == "gpu to cpu"
    before, before_params = make(case, first_on_device, np.random.default_rng(1))
    for g in grads[:2]:
        before.step([EmulatedArray(x) for x in g] if first_on_device else g)
    after, after_params = make(case, not first_on_device, np.random.default_rng(9))
    for p, q in zip(after_params, before_params):  # the model's weights, as a checkpoint has
        p[...] = host_of(q) if first_on_device else q
    after.load_state_dict(before.state_dict())
    for g in grads[2:]:
        after.step(g if first_on_device else [EmulatedArray(x) for x in g])
    for i, (e, got) in enumerate(zip(straight_params, after_params)):
        assert_same_bits(e, got, f"params[{i}]")


@pytest.mark.usefixtures("emulated_gpu")
def test_float32_state_loads_into_a_device_optimizer_with_8_bit_state() -> None:
    """Loading float state into an int8 optimizer quantizes it (on the host) and puts the codes
    and scales on the device: the same as the CPU optimizer loading it."""
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal(s).astype(np.float32) for s in SIZES]
    source = fusedopt.Adam([rng.standard_normal(s).astype(np.float32) for s in SIZES], lr=0.01)
    source.step(grads)
    saved = source.state_dict()
    cpu = fusedopt.Adam([np.ones(s, np.float32) for s in SIZES], lr=0.01, state_dtype="int8")
    gpu_params = [EmulatedArray(np.ones(s, np.float32)) for s in SIZES]
    gpu = fusedopt.Adam(gpu_params, lr=0.01, state_dtype="int8")
    cpu.load_state_dict(saved)
    gpu.load_state_dict(saved)
    for i in range(len(SIZES)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert isinstance(gpu.state[i][key], EmulatedArray), "kept on the device"
            assert_same_bits(cpu.state[i][key], gpu.state[i][key], f"state[{i}][{key!r}]")
    cpu.step(grads)
    gpu.step([EmulatedArray(g) for g in grads])
    for i, p in enumerate(gpu_params):
        assert_same_bits(cpu.param_groups[0]["params"][i], p, f"params[{i}]")


@pytest.mark.usefixtures("emulated_gpu")
def test_lamb_with_low_precision_on_the_device_advances_its_states_as_the_cpu() -> None:
    """LAMB over bfloat16 arrays through fusedopt.cuda's per-step route: its moments stored as
    the CPU stores them, bit for bit; its param moved by a trust ratio whose sums add in the
    GPU's order (within two of its units in the last place, few elements differing)."""
    rng = np.random.default_rng(3)
    start = [rng.standard_normal(5000).astype(BFLOAT16) for _ in range(4)]  # param, grad, m, v
    start[3] = np.abs(start[3])
    description = _engine.describe("lamb")
    values = tuple(f.default for f in description.fields)
    cpu = [a.copy() for a in start]
    _core.step("lamb", [values], np.zeros(1, np.int64), np.ones(1, np.int64), [cpu[0]], [cpu[1]],
               [[cpu[2]], [cpu[3]]])  # fmt: skip
    gpu = [EmulatedArray(a.copy()) for a in start]
    cuda.step("lamb", [values], np.zeros(1, np.int64), np.ones(1, np.int64), [gpu[0]], [gpu[1]],
              [[gpu[2]], [gpu[3]]])  # fmt: skip
    for name, k in (("exp_avg", 2), ("exp_avg_sq", 3)):
        assert_same_bits(cpu[k], gpu[k], name)
    expected, got = cpu[0].astype(np.float64), gpu[0].host.astype(np.float64)
    assert not np.array_equal(expected, start[0].astype(np.float64)), "the param did not move"
    ulp = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64) * 2.0**16
    assert np.all(np.abs(got - expected) <= 2 * ulp)
    assert np.count_nonzero(got != expected) <= expected.size // 100


@pytest.mark.usefixtures("emulated_gpu")
def test_an_optimizer_over_device_arrays_steps_through_its_plan_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The classes' steps after the first go through plan.step_if_unchanged, which the device
    plan has too: one registration, each step through it, a changed lr by set_options."""
    steps, registrations = [], []
    step, register = cuda.Plan.step, cuda.Plan._register
    monkeypatch.setattr(cuda.Plan, "step", lambda self, *a: steps.append(1) or step(self, *a))
    monkeypatch.setattr(
        cuda.Plan, "_register", lambda self: registrations.append(1) or register(self)
    )
    param = EmulatedArray(np.ones(3, np.float32))
    opt = fusedopt.SGD([param], lr=0.1)
    for lr in (0.1, 0.1, 0.2, 0.2):
        opt.param_groups[0]["lr"] = lr
        opt.step([EmulatedArray(np.ones(3, np.float32))])
    assert len(steps) == 4 and len(registrations) == 1
    assert isinstance(opt._plan, cuda.Plan) and opt._plan._groups[0][0] == 0.2
    expected = np.float32(1)
    for lr in (0.1, 0.1, 0.2, 0.2):
        expected = np.float32(expected - np.float32(lr) * np.float32(1))
    assert np.all(param.host == expected)


@pytest.mark.parametrize("change", ["data", "resize", "set"])
def test_a_torch_tensor_whose_memory_moved_in_place_is_told_apart(change: str) -> None:
    """What makes a device plan register its arrays anew (tests/test_cuda.py steps through
    it on a GPU): the same tensor object with other memory or another size."""
    tensor = torch.ones(5000)
    before = cuda._memory_mark(tensor)
    if change == "data":
        tensor.data = tensor.clone()
    elif change == "resize":
        tensor.resize_(10)
    else:
        tensor.set_(torch.ones(5000).untyped_storage())
    assert cuda._memory_mark(tensor) != before


def test_an_array_given_other_memory_under_its_interface_is_told_apart() -> None:
    """Numba's gpu_data, PyCUDA's gpudata (and this stand-in's host) can be reassigned: the
    CUDA Array Interface's address, shape, strides and type are the array's mark."""
    array = EmulatedArray(np.ones(3, np.float32))
    before = cuda._memory_mark(array)
    assert cuda._memory_mark(array) == before
    array.host = np.ones(3, np.float32)
    assert cuda._memory_mark(array) != before


@pytest.mark.usefixtures("emulated_gpu")
def test_the_functional_api_steps_8_bit_state_and_masters_on_the_device() -> None:
    """functional.adam_ over device arrays with 8-bit states (their scales), masters and
    stochastic rounding: the host call's bits (device codes are not read for their scales' check,
    which the step cannot do in device memory)."""
    from fusedopt import functional

    rng = np.random.default_rng(8)
    sizes = [5000, 4096 * 3 + 5]
    host = {
        "params": [rng.standard_normal(s).astype(BFLOAT16) for s in sizes],
        "exp_avgs": [_engine.quantized_full((s,), 0.0, False)[0] for s in sizes],
        "exp_avg_sqs": [_engine.quantized_full((s,), 0.0, True)[0] for s in sizes],
    }
    host["masters"] = [p.astype(np.float32) for p in host["params"]]
    scales = {
        name: [_engine.quantized_full((s,), 0.0, name == "exp_avg_sqs")[1] for s in sizes]
        for name in ("exp_avgs", "exp_avg_sqs")
    }
    device = {k: [EmulatedArray(a.copy()) for a in v] for k, v in host.items()}
    device_scales = {k: [EmulatedArray(a.copy()) for a in v] for k, v in scales.items()}
    for step in range(1, 4):
        grads = [rng.standard_normal(s).astype(BFLOAT16) for s in sizes]
        for arrays, absmax, g in ((host, scales, grads), (device, device_scales, None)):
            functional.adam_(
                arrays["params"], g or [EmulatedArray(x) for x in grads], arrays["exp_avgs"],
                arrays["exp_avg_sqs"], None, step=step, lr=0.01, masters=arrays["masters"],
                absmax=absmax, stochastic_rounding=True, seed=5,
            )  # fmt: skip
    for name in host:
        for i, (e, got) in enumerate(zip(host[name], device[name])):
            assert_same_bits(e, got, f"{name}[{i}]")
    for name in scales:
        for i, (e, got) in enumerate(zip(scales[name], device_scales[name])):
            assert_same_bits(e, got, f"absmax[{name!r}][{i}]")


def _functional_arrays(rng: np.random.Generator, sizes: list[int]) -> dict[str, list]:
    return {
        "params": [rng.standard_normal(s).astype(np.float32) for s in sizes],
        "exp_avgs": [np.zeros(s, np.float32) for s in sizes],
        "exp_avg_sqs": [np.zeros(s, np.float32) for s in sizes],
    }


def _functional_adam(arrays: dict[str, list], grads: list, step: int) -> None:
    from fusedopt import functional

    functional.adam_(
        arrays["params"], grads, arrays["exp_avgs"], arrays["exp_avg_sqs"], None, step=step,
        lr=0.01, weight_decay=0.1,
    )  # fmt: skip


@pytest.mark.usefixtures("emulated_gpu")
def test_the_functional_api_caches_a_device_plan_that_holds_no_array() -> None:
    """Issue 12's functional item on the GPU: a loop's calls over the same device arrays step
    through one cached plan (registered once, its tables on the device), the NumPy call's bits;
    a state replaced in its list is registered anew; the cache keeps no array alive."""
    from fusedopt import functional

    rng = np.random.default_rng(9)
    sizes = [300, 7, 1000]
    host = _functional_arrays(rng, sizes)
    device = {k: [EmulatedArray(a.copy()) for a in v] for k, v in host.items()}
    plans = []
    for step in range(1, 6):
        grads = [rng.standard_normal(s).astype(np.float32) for s in sizes]
        if step == 4:
            device["exp_avgs"][1] = EmulatedArray(device["exp_avgs"][1].host.copy())
        _functional_adam(host, grads, step)
        _functional_adam(device, [EmulatedArray(g) for g in grads], step)
        plans.append(functional._cache.last[1])
    assert isinstance(plans[0], cuda._CachedPlan)
    assert plans[1] is plans[0] and plans[2] is plans[0]  # one plan while the arrays stay
    assert plans[3] is not plans[0] and plans[4] is plans[3]  # a state replaced: a new one
    for name in host:
        for i, (e, got) in enumerate(zip(host[name], device[name])):
            assert_same_bits(e, got, f"{name}[{i}]")
    param = weakref.ref(device["params"][0])
    del device
    gc.collect()
    assert param() is None


@pytest.mark.usefixtures("emulated_gpu")
@pytest.mark.parametrize("route", ["functional", "class"])
def test_a_device_array_given_other_memory_is_registered_anew(route: str) -> None:
    """The same array object, its buffer replaced (``gpu_data =``): the next step writes the new
    buffer, never the old one."""
    rng = np.random.default_rng(11)
    sizes = [40, 9]
    host = _functional_arrays(rng, sizes)
    device = {k: [EmulatedArray(a.copy()) for a in v] for k, v in host.items()}
    if route == "class":
        ours = fusedopt.Adam(device["params"], lr=0.01, weight_decay=0.1)
        theirs = fusedopt.Adam(host["params"], lr=0.01, weight_decay=0.1)
    for step in range(1, 5):
        grads = [rng.standard_normal(s).astype(np.float32) for s in sizes]
        if step == 3:
            old = device["params"][1].host
            device["params"][1].host = old.copy()  # other memory, the same values
            frozen = old.copy()
        if route == "class":
            theirs.step(grads)
            ours.step([EmulatedArray(g) for g in grads])
        else:
            _functional_adam(host, grads, step)
            _functional_adam(device, [EmulatedArray(g) for g in grads], step)
    assert old.tobytes() == frozen.tobytes()  # the old buffer left alone
    for i, (e, got) in enumerate(zip(host["params"], device["params"])):
        assert_same_bits(e, got, f"params[{i}]")


@pytest.mark.usefixtures("emulated_gpu")
def test_the_functional_api_refuses_a_bad_device_grad_through_its_cached_plan() -> None:
    from fusedopt import functional

    rng = np.random.default_rng(10)
    sizes = [64, 5]
    device = {k: [EmulatedArray(a) for a in v] for k, v in _functional_arrays(rng, sizes).items()}
    for step in (1, 2):
        _functional_adam(device, [EmulatedArray(np.ones(s, np.float32)) for s in sizes], step)
    assert isinstance(functional._cache.last[1], cuda._CachedPlan)
    before = {k: [a.host.copy() for a in v] for k, v in device.items()}
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        bad = [EmulatedArray(np.ones(s + (i == 1), np.float32)) for i, s in enumerate(sizes)]
        _functional_adam(device, bad, 3)
    for name, arrays in device.items():
        for a, b in zip(arrays, before[name]):
            assert a.host.tobytes() == b.tobytes(), name
    for step in (3, 4):  # the calls after it: a new plan, then its own fast path
        _functional_adam(device, [EmulatedArray(np.ones(s, np.float32)) for s in sizes], step)
        assert isinstance(functional._cache.last[1], cuda._CachedPlan)
    assert not np.array_equal(device["params"][0].host, before["params"][0])


@pytest.mark.usefixtures("emulated_gpu")
@pytest.mark.parametrize("grads_kept", [True, False], ids=["same grad arrays", "new grad arrays"])
def test_a_registered_plan_updates_every_kind_of_tensor_in_one_launch(
    grads_kept: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table kernel over a registered plan's tables (kept on the device; a step copies only
    the records that changed): float32, float64 (some not 16-byte aligned) and bfloat16 tensors
    with masters, over 60 tensors and a tensor of two chunks, the CPU's bits at every step."""
    registrations = []
    register = cuda.Plan._register
    monkeypatch.setattr(
        cuda.Plan, "_register", lambda self: registrations.append(1) or register(self)
    )
    rng = np.random.default_rng(12)
    dtypes = [np.float32, np.float64, BFLOAT16]
    sizes = [(i * 37) % 200 for i in range(60)] + [70000]
    host = [rng.standard_normal(s).astype(dtypes[i % 3]) for i, s in enumerate(sizes)]
    device = [EmulatedArray(p.copy()) for p in host]
    cpu = fusedopt.AdamW(host, lr=0.01, weight_decay=0.1, amsgrad=True, master_weights=True)
    gpu = fusedopt.AdamW(device, lr=0.01, weight_decay=0.1, amsgrad=True, master_weights=True)
    kept = [EmulatedArray(np.zeros(s, p.dtype)) for s, p in zip(sizes, host)]
    for step in range(4):
        grads = [rng.standard_normal(s).astype(p.dtype) for s, p in zip(sizes, host)]
        if grads_kept:
            for k, g in zip(kept, grads):
                k.host[...] = g
            device_grads = kept
        else:
            device_grads = [EmulatedArray(g) for g in grads]
        cpu.step(grads)
        gpu.step(device_grads)
        for i, (e, got) in enumerate(zip(host, device)):
            assert_same_bits(e, got, f"step {step}: params[{i}]")
    assert len(registrations) == 1, "registered once, its tables kept"


class DeletableArray(EmulatedArray):
    """A JAX-like array whose memory can be freed under the object (``delete()``, donation)."""

    deleted = False

    def is_deleted(self) -> bool:
        return self.deleted

    def delete(self) -> None:
        self.deleted = True

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        if self.deleted:
            raise RuntimeError("Array has been deleted")
        return super().__cuda_array_interface__

    def __dlpack__(self, **kwargs: Any) -> Any:
        if self.deleted:
            raise RuntimeError("Array has been deleted")
        return super().__dlpack__(**kwargs)


@pytest.mark.usefixtures("emulated_gpu")
def test_a_deleted_registered_array_is_never_written_through_its_old_address() -> None:
    """A plan's registered array deleted since (its memory freed): the next step registers
    anew, which refuses it, and nothing is written."""
    params = [DeletableArray(np.ones(8, np.float32)), DeletableArray(np.ones(8, np.float32))]
    opt = fusedopt.SGD(params, lr=0.1)
    opt.step([EmulatedArray(np.ones(8, np.float32)) for _ in params])
    before = [p.host.copy() for p in params]
    params[1].delete()
    with pytest.raises(RuntimeError, match="deleted"):
        opt.step([EmulatedArray(np.ones(8, np.float32)) for _ in params])
    for b, p in zip(before, params):
        assert b.tobytes() == p.host.tobytes()


@pytest.mark.usefixtures("emulated_gpu")
def test_a_dlpack_buffer_carries_its_producer_stream() -> None:
    """bfloat16 goes by DLPack, whose capsule names no stream: the producer's (torch's current
    stream) goes with it, as the interface dict's "stream" does, for the step to wait on and
    signal; the step takes that form."""
    host = [np.ones(8, BFLOAT16), np.full(8, 100.0, BFLOAT16)]  # param, grad
    param, grad = (EmulatedArray(x.copy()) for x in host)
    described = cuda._describe(param, "params[0]", 1, 0x5EED)
    assert isinstance(described, dict) and described["stream"] == 0x5EED
    grad_described = cuda._describe(grad, "grads[0]", 1, 0x5EED)
    values = native_options("sgd")
    one, first = np.zeros(1, np.int64), np.ones(1, np.int64)
    emulated.step("sgd", [values], one, first, [described], [grad_described], [None], None, None,
                  None, 1, True)  # fmt: skip
    _core.step("sgd", [values], one, first, [host[0]], [host[1]], [None])
    assert_same_bits(host[0], param, "params[0]")
    assert not np.all(host[0] == 1), "the step moved the param"


@pytest.mark.usefixtures("emulated_gpu")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_child_forked_during_another_thread_s_step_can_step() -> None:
    """A step over device arrays is in progress from its launch to its streams' ordering: a fork
    waits for it (a child forked inside it inherited the emulation's launch lock held, and its
    first step hung), as the CPU's steps make it wait."""
    values = native_options("sgd")

    def step() -> None:
        params = [EmulatedArray(np.ones(300000, BFLOAT16))]
        grads = [EmulatedArray(np.ones(300000, BFLOAT16))]
        one = np.zeros(1, np.int64)
        cuda.step("sgd", [values], one, one + 1, params, grads, [None])

    step()
    stop = threading.Event()
    busy = threading.Thread(target=lambda: [step() for _ in iter(stop.is_set, True)])
    busy.start()
    try:
        time.sleep(0.2)
        pid = os.fork()
        if pid == 0:  # the child: a step, or killed by the alarm
            signal.alarm(20)
            step()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    finally:
        stop.set()
        busy.join()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
