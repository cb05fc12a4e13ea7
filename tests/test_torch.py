"""fusedopt.torch: drop-in torch.optim optimizers, beside torch.optim itself.

Every algorithm in float32 and float64 follows torch.optim (foreach=False) over trajectories with
a scheduler changing the learning rate and a param whose grad is None on some steps; state dicts
load in both directions mid-run and training continues on the same trajectory; GradScaler's inf
steps are skipped; bad params and grads are refused naming them, with nothing written. The
tests marked with ``device`` run on CUDA tensors too, beside torch.optim on the same device, where
a GPU and fusedopt's CUDA backend are usable (``.ci/gpu-check``), and skip saying why elsewhere;
and on the emulated GPU everywhere ("emulated": CPU tensors stepped by the plans made for CUDA
tensors, with the emulated CUDA backend, conftest.emulate_gpu_plans).
"""

from __future__ import annotations

import copy
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fusedopt._core  # noqa: E402

import fusedopt.cuda  # noqa: E402
import fusedopt.torch as ft  # noqa: E402
from conftest import emulate_gpu_plans, emulation_unavailable, native_options  # noqa: E402

CUDA_UNUSABLE = (
    "torch sees no CUDA device"
    if not torch.cuda.is_available()
    else fusedopt.cuda.unavailable_reason()
    if not fusedopt.cuda.is_available()
    else None
)
needs_cuda = pytest.mark.skipif(CUDA_UNUSABLE is not None, reason=f"no CUDA: {CUDA_UNUSABLE}")
EMULATION_MISSING = emulation_unavailable()
needs_emulation = pytest.mark.skipif(EMULATION_MISSING is not None, reason=str(EMULATION_MISSING))
DEVICES = [
    "cpu",
    pytest.param("emulated", marks=needs_emulation),
    pytest.param("cuda", marks=needs_cuda),
]


def on(device: str) -> str:
    """The torch device of a test's tensors: the emulated GPU's memory is the host's."""
    return "cpu" if device == "emulated" else device


@pytest.fixture(autouse=True)
def _emulated_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test run on the "emulated" device makes its optimizers' plans as for CUDA tensors."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "emulated":
        emulate_gpu_plans(monkeypatch)


# Every test here runs twice: tensors read through libtorch's C shim and through torch's Python
# methods (conftest.tensor_reading).
pytestmark = pytest.mark.usefixtures("tensor_reading")


def test_steps_read_tensors_through_the_shim_where_torch_offers_it(tensor_reading: str) -> None:
    # This torch (2.13, CPython, Linux) exports the shim and lays its tensors out as expected:
    # if that changes, every step silently takes the slower route.
    assert fusedopt._core._torch_shim() == (tensor_reading == "shim")


STEPS = 30
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}  # relative to 1 + |x|

CASES = [
    ("SGD", {}),
    ("SGD", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("SGD", {"momentum": 0.9, "nesterov": True, "maximize": True}),
    ("Adagrad", {"lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("RMSprop", {"momentum": 0.5, "centered": True, "weight_decay": 0.01}),
    ("RMSprop", {"alpha": 0.3}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.01}),
    ("Adam", {"decoupled_weight_decay": True, "weight_decay": 0.1, "maximize": True}),
    ("AdamW", {"betas": (0.3, 0.9)}),
    ("Adadelta", {"rho": 0.8, "weight_decay": 0.01}),
    ("Adamax", {"betas": (0.8, 0.99), "weight_decay": 0.01}),
    ("NAdam", {"momentum_decay": 0.1, "decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("RAdam", {"betas": (0.9, 0.9), "weight_decay": 0.01}),
    ("Rprop", {"etas": (0.3, 1.5), "step_sizes": (1e-4, 0.1)}),
    ("ASGD", {"t0": 3.0, "lambd": 0.01}),
]


def case_id(case: tuple[str, dict]) -> str:
    name, options = case
    return "-".join([name, *(f"{k}={v}" for k, v in options.items())])


def assert_close(actual: Any, expected: Any, dtype: Any, what: str) -> None:
    actual, expected = (torch.as_tensor(x, dtype=torch.float64) for x in (actual, expected))
    assert actual.shape == expected.shape, what
    if actual.numel() == 0:
        return
    error = ((actual - expected).abs() / (1 + expected.abs())).max().item()
    assert error <= TOLERANCE[dtype], f"{what}: {error:.3g}"


def model_params(dtype: Any, seed: int = 0, device: Any = "cpu") -> list[Any]:
    """Made on the CPU from a seeded generator, then moved: every device starts alike."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (33,), (1,), (0,), (4, 4)]
    return [
        torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype).to(on(device)))
        for s in shapes
    ]


def grads_for(step: int, params: list[Any]) -> list[Any]:
    generator = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    if step % 3 == 1:
        grads[1] = None  # a param without a grad is skipped, as torch skips it
    return grads


def run(optimizer: Any, params: list[Any], steps: range, scheduler: Any = None) -> None:
    for step in steps:
        for p, g in zip(params, grads_for(step, params)):
            p.grad = None if g is None else g.clone()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def compare(ours: Any, theirs: Any, ours_params: list, their_params: list, dtype: Any) -> None:
    for i, (a, b) in enumerate(zip(ours_params, their_params)):
        assert_close(a.detach(), b.detach(), dtype, f"params[{i}]")
    ours_state, their_state = ours.state_dict()["state"], theirs.state_dict()["state"]
    assert ours_state.keys() == their_state.keys()
    for index, entry in their_state.items():
        assert list(ours_state[index]) == list(entry), index  # the same keys in torch's order
        for key, value in entry.items():
            mine = ours_state[index][key]
            if torch.is_tensor(value):
                assert mine.dtype == value.dtype, (index, key)
                assert mine.device == value.device, (index, key)
                assert_close(mine, value, dtype, f"state[{index}][{key!r}]")
            else:
                assert mine == value, (index, key)


def test_state_buffers_are_allocated_state_by_state(monkeypatch: Any) -> None:
    """Every param's exp_avg, then every param's exp_avg_sq (torch allocates them param by
    param): one state's buffers of consecutive params are allocated one after another, as a
    step streams them. Each param's state keeps torch's keys in torch's order."""
    params = [torch.zeros(1000, requires_grad=True) for _ in range(3)]
    made: list[int] = []
    full_like = torch.full_like

    def recorded(p: Any, *args: Any, **kwargs: Any) -> Any:
        made.append(next(i for i, q in enumerate(params) if q is p))
        return full_like(p, *args, **kwargs)

    monkeypatch.setattr(torch, "full_like", recorded)
    ours = ft.Adam(params, amsgrad=True)
    for p in params:
        p.grad = torch.ones(1000)
    ours.step()
    assert made == [0, 1, 2] * 3
    their_params = [p.detach().clone().requires_grad_() for p in params]
    theirs = torch.optim.Adam(their_params, amsgrad=True, foreach=False)
    for p in their_params:
        p.grad = torch.ones(1000)
    theirs.step()
    assert [list(ours.state[p]) for p in params] == [list(theirs.state[p]) for p in their_params]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_trajectory_matches_torch_optim_with_a_scheduler(case: tuple, dtype: Any, device) -> None:
    name, options = case
    ours_params, their_params = (
        model_params(dtype, device=device),
        model_params(dtype, device=device),
    )
    ours = getattr(ft, name)(ours_params, lr=0.01, **options)
    theirs = getattr(torch.optim, name)(their_params, lr=0.01, foreach=False, **options)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10) for o in (ours, theirs)]
    run(ours, ours_params, range(STEPS), schedulers[0])
    run(theirs, their_params, range(STEPS), schedulers[1])
    compare(ours, theirs, ours_params, their_params, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_state_dicts_interchange_mid_run(case: tuple, direction: str, device: str) -> None:
    name, options = case
    dtype = torch.float64
    first_params = model_params(dtype, device=device)
    reference_params = model_params(dtype, device=device)
    make_first = getattr(torch.optim if direction == "torch_to_fusedopt" else ft, name)
    make_second = getattr(ft if direction == "torch_to_fusedopt" else torch.optim, name)
    first = make_first(first_params, lr=0.01, **options)
    reference = getattr(torch.optim, name)(reference_params, lr=0.01, foreach=False, **options)
    run(first, first_params, range(10))
    run(reference, reference_params, range(20))
    second = make_second(first_params, lr=0.01, **options)
    second.load_state_dict(first.state_dict())
    run(second, first_params, range(10, 20))
    for a, b in zip(first_params, reference_params):
        assert_close(a.detach(), b.detach(), dtype, name)


@pytest.mark.parametrize(
    "dtype, default", [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
def test_nadam_resumed_from_a_checkpoint_computes_mu_product_in_its_loaded_dtype(
    dtype: Any, default: Any
) -> None:
    """torch's load_state_dict casts mu_product to its param's dtype, and NAdam multiplies it in
    place in that dtype from then on: float64 for float64 params, though the step made it
    float32 (the default dtype's scalar dtype), and the reverse under a float64 default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        saver_params = model_params(dtype)
        saver = torch.optim.NAdam(saver_params, lr=0.1, foreach=False)
        run(saver, saver_params, range(2))
        buffer = io.BytesIO()
        torch.save(saver.state_dict(), buffer)
        resumed = []
        for module in (ft, torch.optim):
            params = [torch.nn.Parameter(p.detach().clone()) for p in saver_params]
            optimizer = module.NAdam(params, lr=0.1)
            buffer.seek(0)
            optimizer.load_state_dict(torch.load(buffer, weights_only=True))
            run(optimizer, params, range(2, 40))
            resumed.append((optimizer, params))
    finally:
        torch.set_default_dtype(previous)
    (ours, ours_params), (theirs, their_params) = resumed
    tolerance = 1e-13 if dtype == torch.float64 else 1e-5
    for a, b in zip(ours_params, their_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=tolerance, atol=tolerance)
    for p, q in zip(ours_params, their_params):
        if p in ours.state:
            assert ours.state[p]["mu_product"].dtype == theirs.state[q]["mu_product"].dtype
            assert float(ours.state[p]["mu_product"]) == float(theirs.state[q]["mu_product"])


@pytest.mark.parametrize("device", DEVICES)
def test_a_param_whose_memory_moves_is_followed(device: str) -> None:
    """ZeroRedundancyOptimizer's bucket views replace param.data: the next step must update the
    new memory, not the old."""
    params = model_params(torch.float64, device=device)
    reference = model_params(torch.float64, device=device)
    ours = ft.Adam(params, lr=0.1)
    theirs = torch.optim.Adam(reference, lr=0.1, foreach=False)
    run(ours, params, range(3))
    run(theirs, reference, range(3))
    old = params[0].data
    params[0].data = old.clone()
    frozen = old.clone()
    run(ours, params, range(3, 6))
    run(theirs, reference, range(3, 6))
    assert torch.equal(old, frozen)  # the replaced memory is left alone
    assert_close(params[0].detach(), reference[0].detach(), torch.float64, "moved param")


_SWAPPED_MID_STEP = """
import sys, threading, torch, fusedopt.torch as ft
torch.set_num_threads(1)
p = torch.nn.Parameter(torch.zeros(1 << 16))
state_owner = torch.nn.Parameter(torch.zeros(1 << 16))
optimizer = ft.Adam([p, state_owner])
stop = False
def swap():
    while not stop:
        p.data = torch.zeros(1 << 16)  # the old storage dropped
        optimizer.state[state_owner]["exp_avg"].data = torch.zeros(1 << 16)
thread = threading.Thread(target=swap)
for step in range(400):
    p.grad, state_owner.grad = torch.ones(1 << 16), torch.ones(1 << 16)
    if step == 1:
        thread.start()
    try:
        optimizer.step()
    except (RuntimeError, TypeError, ValueError) as error:
        assert "moved while its plan" in str(error), error  # the race seen, said
stop = True
thread.join()
"""


def test_a_param_or_state_given_other_memory_by_another_thread_mid_step_does_not_crash(
    tensor_reading: str,
) -> None:
    """`p.data = x` keeps the tensor and drops its storage, which a step was writing with the GIL
    released: the process died (a segfault, or `malloc(): corrupted top size`) in every run. The
    plan holds its storages; a step that raced the swap wrote the old memory, and the next
    registers anew. In a subprocess: what fails is the process."""
    env = {**os.environ, "FUSEDOPT_TORCH_SHIM": "1" if tensor_reading == "shim" else "0"}
    subprocess.run([sys.executable, "-c", _SWAPPED_MID_STEP], check=True, env=env, timeout=300)


def test_an_inference_tensor_is_refused_as_a_param_or_state() -> None:
    """torch refuses to update an inference tensor in place outside inference mode."""
    with torch.inference_mode():
        made_there = torch.zeros(4)
    with pytest.raises(ValueError, match=r"params\[1\] of param_groups\[0\] is an inference"):
        ft.Adam([torch.nn.Parameter(torch.zeros(3)), made_there])
    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
    optimizer = ft.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(4)
    optimizer.step()
    saved = optimizer.state_dict()
    with torch.inference_mode():
        saved["state"][1]["exp_avg"] = saved["state"][1]["exp_avg"].clone()
    optimizer.load_state_dict(saved)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] of params\[1\] .* inference"):
        optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("name, key", [("Adam", "step"), ("NAdam", "mu_product")])
def test_a_step_count_or_scalar_state_shared_by_two_params_is_refused(name: str, key: str) -> None:
    """torch advances a shared one once per param, each reading it as it stands; the native step
    read every one first and wrote each back once: a different trajectory, with no error."""
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 30)) for _ in range(3)]
    optimizer = getattr(ft, name)(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones(30)
        optimizer.step()
    optimizer.state[params[2]][key] = optimizer.state[params[0]][key]
    before = [p.detach().clone() for p in params]
    counts = [optimizer.state[p][key].clone() for p in params]
    with pytest.raises(ValueError, match=rf"state\['{key}'\] of params\[2\] .* params\[0\]"):
        optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(torch.equal(optimizer.state[p][key], c) for p, c in zip(params, counts))


def test_a_loaded_state_of_another_shape_is_refused_saying_so() -> None:
    """The message said "not torch.float32 like its param" of a float32 state whose shape was
    the only difference."""
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = ft.Adam([p])
    p.grad = torch.ones(4)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["state"][0]["exp_avg"] = torch.zeros(3)
    optimizer.load_state_dict(saved)
    before = p.detach().clone()
    with pytest.raises(TypeError, match=r"shape \(3,\) on cpu; .* of its param's shape \(4,\)"):
        optimizer.step()
    assert torch.equal(p.detach(), before)


def test_a_device_already_stepped_is_not_stepped_again_when_another_needs_a_new_plan() -> None:
    """One optimizer over two devices keeps one plan per device. When the second plan refuses
    (its params moved) after the first has stepped, the plans are made again: the first
    device's params must not take the step twice. The second device here is a stand-in plan
    (this machine may have no GPU) that refuses, as a CUDA plan whose param moved does."""
    params = model_params(torch.float64)
    reference = model_params(torch.float64)
    ours = ft.Adam(params, lr=0.1)
    theirs = torch.optim.Adam(reference, lr=0.1, foreach=False)
    run(ours, params, range(3))  # steps 2 and 3 give every param a grad: the plan holds
    run(theirs, reference, range(3))

    class Refuses:
        calls = 0

        def step(self, grad_scale: float | None) -> bool:
            Refuses.calls += 1
            return False

    ((device, cpu_plan),) = ours._plans.items()
    refusing = [cpu_plan[0], Refuses(), [], None]  # options, native plan, params, written
    ours._plans = {device: cpu_plan, torch.device("cuda", 0): refusing}
    run(ours, params, range(3, 4))
    run(theirs, reference, range(3, 4))
    assert Refuses.calls == 1
    for mine, torch_param in zip(params, reference):
        assert_close(mine.detach(), torch_param.detach(), torch.float64, "stepped once")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_grad_scaler_skips_an_inf_step_and_unscales_the_others(name: str, device: str) -> None:
    options = {"momentum": 0.9} if name == "SGD" else {}
    results = []
    for module in (ft, torch.optim):
        params = model_params(torch.float32, device=device)
        extra = {} if module is ft else {"fused": True}
        optimizer = getattr(module, name)(params, lr=0.01, **options, **extra)
        scaler = torch.amp.GradScaler(on(device), init_scale=256.0)
        for step in range(6):
            # what scaler.scale(loss) would multiply by
            scale = scaler.scale(torch.ones((), device=on(device))).item()
            for p, g in zip(params, grads_for(step, params)):
                p.grad = None if g is None else g * scale
            if step == 2:
                params[0].grad[0, 0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
        results.append((params, optimizer.state_dict()["state"][0].get("step")))
    (ours, our_step), (theirs, their_step) = results
    for a, b in zip(ours, theirs):
        assert_close(a.detach(), b.detach(), torch.float32, name)
    assert our_step is None or float(our_step) == float(their_step) == 5.0


class Snapshot:
    """Every param, grad and state entry of an optimizer, to prove a refusal modified nothing."""

    def __init__(self, optimizer: Any, params: list[Any]) -> None:
        self.optimizer, self.params = optimizer, params
        self.values = [(p.detach().clone(), _copy(p.grad)) for p in params]
        self.state = {
            id(p): {k: _copy(v) for k, v in entry.items()} for p, entry in optimizer.state.items()
        }
        self.groups = [dict(g, params=list(g["params"])) for g in optimizer.param_groups]

    def assert_unchanged(self) -> None:
        for p, (value, grad) in zip(self.params, self.values):
            assert torch.equal(p.detach(), value)
            assert _same(p.grad, grad)
        now = {id(p): entry for p, entry in self.optimizer.state.items()}
        assert now.keys() == self.state.keys()
        for key, entry in self.state.items():
            assert now[key].keys() == entry.keys()
            for name, value in entry.items():
                assert _same(now[key][name], value), name
        assert len(self.optimizer.param_groups) == len(self.groups)
        for group, saved in zip(self.optimizer.param_groups, self.groups):
            assert group.keys() == saved.keys()
            assert all(a is b for a, b in zip(group["params"], saved["params"]))


def _copy(value: Any) -> Any:
    return value.clone() if torch.is_tensor(value) else value


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.allclose(
            a, b, rtol=0, atol=0, equal_nan=True
        )
    return type(a) is type(b) and a == b


def test_closure_zero_grad_and_hooks_work_as_in_torch() -> None:
    params = model_params(torch.float64)
    optimizer = ft.SGD(params, lr=0.1)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))

    def closure() -> Any:
        optimizer.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    loss = optimizer.step(closure)
    assert float(loss.detach()) > 0 and calls == ["pre", "post"]
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b - 0.1 * 2 * b)


def test_add_param_group_joins_the_next_step() -> None:
    params = model_params(torch.float64)
    reference = model_params(torch.float64)
    ours = ft.Adam(params[:2], lr=0.01)
    theirs = torch.optim.Adam(reference[:2], lr=0.01, foreach=False)
    run(ours, params[:2], range(2))
    run(theirs, reference[:2], range(2))
    ours.add_param_group({"params": params[2:], "lr": 0.05})
    theirs.add_param_group({"params": reference[2:], "lr": 0.05})
    run(ours, params, range(2, 6))
    run(theirs, reference, range(2, 6))
    for a, b in zip(params, reference):
        assert_close(a.detach(), b.detach(), torch.float64, "after add_param_group")


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize(
    ("make", "error", "what"),
    [
        (lambda: torch.zeros(3, dtype=torch.int64), TypeError, "dtype"),
        (lambda: torch.zeros(3, dtype=torch.complex32), TypeError, "dtype"),
        (lambda: torch.zeros(3, 8)[:, ::2], ValueError, "not dense"),
        (lambda: torch.zeros(3).to_sparse(), TypeError, "sparse"),
    ],
    ids=["int64", "complex32", "gaps", "sparse"],
)
def test_a_param_fusedopt_cannot_update_is_refused_naming_it(make: Any, error: type, what) -> None:
    params = [torch.nn.Parameter(torch.zeros(3)), make()]
    with pytest.raises(error, match=r"params\[1\] of param_groups\[0\].*" + what):
        ft.Adam(params)


def test_a_non_contiguous_grad_is_read_as_torch_reads_it() -> None:
    """torch.func.grad gives a grad the strides of its param's use (a transposed one here):
    torch.optim steps it, fusedopt refused it. It is only read, so it is read through a copy laid
    out as its (contiguous) param."""
    params, reference = model_params(torch.float64), model_params(torch.float64)
    ours, theirs = ft.Adam(params, lr=0.1), torch.optim.Adam(reference, lr=0.1, foreach=False)
    for step in range(3):
        for model in (params, reference):
            for p in model:
                p.grad = torch.full_like(p, 0.5 + step)
            model[0].grad = torch.arange(35.0, dtype=torch.float64).reshape(7, 5).t().clone()
            model[0].grad = model[0].grad.t().contiguous().t()  # strides (1, 5)
            assert not model[0].grad.is_contiguous()
        ours.step()
        theirs.step()
    for p, q in zip(params, reference):
        assert_close(p.detach(), q.detach(), torch.float64, "param")


def test_a_non_contiguous_grad_under_a_grad_scale_is_refused_with_nothing_written() -> None:
    """A grad scale writes the unscaled grad back: a copy would take it instead of the grad."""
    params = model_params(torch.float64)
    optimizer = ft.Adam(params, lr=0.1)
    run(optimizer, params, range(2))
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad = torch.ones(params[0].shape[::-1], dtype=torch.float64).t()
    with pytest.raises(
        ValueError, match=r"grad of params\[0\] of param_groups\[0\] is not laid out as its param"
    ):
        # As torch.amp.GradScaler hands them over to a fused optimizer.
        optimizer.grad_scale, optimizer.found_inf = torch.tensor(2.0), torch.tensor(0.0)
        optimizer.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for key, value in state.items():
        assert torch.equal(optimizer.state[params[0]][key], value)


# torch's lazy views: memory holding the elements negated (a negative view: `torch._neg_view`,
# `.imag` of a conjugate view) or conjugated (`.conj()` of a complex tensor), torch applying the
# sign on every read and write. fusedopt read such a grad's memory as it is: the step went the
# wrong way (SGD over a grad of -1s stored as +1s moved the param by -2, torch by +2).
LAZY_GRADS = {
    "negative": lambda g: torch._neg_view(g.neg()),  # g's values, stored negated
    "imag_of_conjugate": lambda g: torch.complex(torch.zeros_like(g), -g).conj().imag,
    "conjugate": lambda g: torch.complex(g, -g).conj(),  # complex values g + gi
}


def _lazy_case(kind: str) -> tuple[Any, Callable[[Any], Any]]:
    """The params' dtype, and the lazy grad of real values g (complex ones: g + gi)."""
    return (torch.complex128 if kind == "conjugate" else torch.float64), LAZY_GRADS[kind]


@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("kind", list(LAZY_GRADS))
def test_a_negative_or_conjugate_grad_is_read_as_its_values(kind: str, name: str) -> None:
    """A lazy grad is read through a copy holding its values, at the first step and once the plan
    is made (the shim's fast path): the same values, bit for bit, as the optimizer given the
    grads resolved, and torch.optim's."""
    dtype, lazy = _lazy_case(kind)
    models = [
        [torch.nn.Parameter(torch.linspace(-1, 1, 12, dtype=dtype)) for _ in range(3)]
        for _ in range(3)
    ]
    options = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.1}
    optimizers = [getattr(ft, name)(models[0], **options), getattr(ft, name)(models[1], **options)]
    optimizers.append(getattr(torch.optim, name)(models[2], **options, foreach=False))
    for step in range(5):
        for k in range(3):
            values = torch.linspace(0.5, 2.0, 12, dtype=torch.float64) * (step - 2 + k)
            grad = lazy(values)
            assert grad.is_neg() or grad.is_conj()
            models[0][k].grad = grad if (step + k) % 2 else grad.resolve_conj().resolve_neg()
            models[1][k].grad = models[2][k].grad = grad.resolve_conj().resolve_neg()
        for optimizer in optimizers:
            optimizer.step()
        for k, (p, q, r) in enumerate(zip(*models)):
            assert torch.equal(p.detach(), q.detach()), (step, k)
            ours, theirs = (torch.view_as_real(t.detach()) if t.is_complex() else t for t in (p, r))
            assert_close(ours.detach(), theirs.detach(), torch.float64, f"{step}, params[{k}]")


@pytest.mark.parametrize("kind", list(LAZY_GRADS))
def test_a_negative_or_conjugate_grad_under_a_grad_scale_is_refused_with_nothing_written(
    kind: str,
) -> None:
    """A grad scale writes the unscaled grad back into the grad's memory."""
    dtype, lazy = _lazy_case(kind)
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 12, dtype=dtype)) for _ in range(2)]
    optimizer = ft.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in optimizer.state[params[1]].items()}
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = lazy(torch.ones(12, dtype=torch.float64))
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(2.0), torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"grad of params\[1\] .*negative or conjugate view"):
        optimizer.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for key, value in state.items():
        assert torch.equal(optimizer.state[params[1]][key], value)


@pytest.mark.parametrize("kind", ["negative", "conjugate"])
@pytest.mark.parametrize("role", ["param", "state"])
def test_a_param_or_state_made_a_negative_or_conjugate_view_is_refused(
    kind: str, role: str
) -> None:
    """Written, it would be updated with the sign reversed: refused when given and when made one
    in place of a registered one (`.data`: the same object and memory), with nothing written."""
    dtype = torch.complex128 if kind == "conjugate" else torch.float64
    make_lazy = torch.conj if kind == "conjugate" else torch._neg_view
    if role == "param":
        lazy_param = torch.nn.Parameter(torch.ones(4, dtype=dtype))
        lazy_param.data = make_lazy(lazy_param.data)
        with pytest.raises(TypeError, match=r"params\[0\] of param_groups\[0\] is a negative"):
            ft.Adam([lazy_param])
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 12, dtype=dtype)) for _ in range(2)]
    optimizer = ft.Adam(params, lr=0.1)
    for _ in range(2):  # the plan made, then stepped through its checks
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    target = params[1] if role == "param" else optimizer.state[params[1]]["exp_avg"]
    with torch.no_grad():
        target.data = make_lazy(target.data)
    assert target.is_neg() or target.is_conj()
    before = [p.detach().resolve_conj().resolve_neg().clone() for p in params]
    state = {
        k: v.resolve_conj().resolve_neg().clone() for k, v in optimizer.state[params[1]].items()
    }
    with pytest.raises(TypeError, match="negative or conjugate view"):
        optimizer.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach().resolve_conj().resolve_neg(), b)
    for key, value in state.items():
        assert torch.equal(optimizer.state[params[1]][key].resolve_conj().resolve_neg(), value)


@pytest.mark.parametrize("flag", ["differentiable", "capturable"])
def test_unsupported_modes_are_refused_and_foreach_fused_accepted(flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        ft.Adam(model_params(torch.float32), **{flag: True})
    ft.Adam(model_params(torch.float32), foreach=True)
    ft.Adam(model_params(torch.float32), fused=True)


def test_a_tensor_learning_rate_is_accepted() -> None:
    """A float64 tensor: torch computes its coefficients in the lr tensor's dtype."""
    params, reference = model_params(torch.float64), model_params(torch.float64)
    lr = torch.tensor(0.01, dtype=torch.float64)
    ours = ft.Adam(params, lr=lr)
    theirs = torch.optim.Adam(reference, lr=lr.clone(), foreach=False)
    run(ours, params, range(4))
    run(theirs, reference, range(4))
    for a, b in zip(params, reference):
        assert_close(a.detach(), b.detach(), torch.float64, "tensor lr")


def test_a_tensor_learning_rate_changed_in_place_by_a_scheduler_takes_effect() -> None:
    """Schedulers fill_ a tensor lr in place: the same tensor holds each new rate."""
    params, reference = model_params(torch.float32), model_params(torch.float32)
    ours = ft.SGD(params, lr=torch.tensor(0.01))
    theirs = torch.optim.SGD(reference, lr=torch.tensor(0.01), foreach=False)
    for optimizer, p in ((ours, params), (theirs, reference)):
        run(optimizer, p, range(6), torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5))
    assert float(ours.param_groups[0]["lr"]) == float(theirs.param_groups[0]["lr"]) < 0.001
    for a, b in zip(params, reference):
        assert_close(a.detach(), b.detach(), torch.float32, "tensor lr under StepLR")


def test_signatures_and_defaults_are_torch_optim_s() -> None:
    import inspect

    for name in ft.__all__:
        if name == "Optimizer" or not hasattr(torch.optim, name):
            continue
        ours, theirs = getattr(ft, name), getattr(torch.optim, name)
        # torch's parameters, then fusedopt's low-precision options, keyword-only.
        mine = list(inspect.signature(ours).parameters.values())
        extra = ["state_dtype", "master_weights", "stochastic_rounding", "seed"]
        assert [q.name for q in mine[-4:]] == extra, name
        assert all(q.kind == inspect.Parameter.KEYWORD_ONLY for q in mine[-4:]), name
        assert inspect.signature(ours).replace(parameters=mine[:-4]) == inspect.signature(theirs), (
            name
        )
        assert issubclass(ours, torch.optim.Optimizer)
        p = [torch.nn.Parameter(torch.zeros(2))]
        assert ours(p).defaults == theirs(p).defaults, name


def test_import_fusedopt_does_not_import_torch() -> None:
    code = "import sys, fusedopt, fusedopt.functional; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_many_tensors_one_step_matches_torch() -> None:
    generator = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(17, generator=generator)) for _ in range(300)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = ft.AdamW(params, lr=0.01)
    theirs = torch.optim.AdamW(reference, lr=0.01, foreach=False)
    for _ in range(3):
        grads = [torch.randn(17, generator=generator) for _ in params]
        for p, q, g in zip(params, reference, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(params, reference):
        assert_close(a.detach(), b.detach(), torch.float32, "300 tensors")
    np.testing.assert_equal(len(ours.state), 300)


# Enough params that the core checks their grads on the pool's threads, a slice each (kCheckSlice,
# 1024), and one spoiled far into the last slice: a moved param or state, a grad of other strides
# or a bad grad sends the step from its fast checks (fusedopt.torch's in two passes, the core's on
# the pool) to the checks in order, which must find it as they find it among a few params; grads
# dropped here and there stay on the fast checks, which skip those params.
MANY = 2600
LATE = 2500


def _move_param(optimizer: Any, params: list) -> None:
    params[LATE].data = params[LATE].data.clone()


def _move_state(optimizer: Any, params: list) -> None:
    state = optimizer.state[params[LATE]]["exp_avg"]
    state.data = state.data.clone()


def _drop_grads(optimizer: Any, params: list) -> None:
    for p in params[5::7]:
        p.grad = None


def _transpose_grad(optimizer: Any, params: list) -> None:
    params[LATE].grad = params[LATE].grad.t().contiguous().t()  # its param's shape, not its strides


@pytest.mark.parametrize("spoil", [_move_param, _move_state, _drop_grads, _transpose_grad])
def test_many_tensors_follow_torch_where_one_far_into_them_changes(spoil: Callable) -> None:
    generator = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(3, 3, generator=generator)) for _ in range(MANY)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = ft.Adam(params, lr=0.01)
    theirs = torch.optim.Adam(reference, lr=0.01, foreach=False)
    for step in range(3):
        grads = [torch.randn(3, 3, generator=generator) for _ in params]
        for p, q, g in zip(params, reference, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 1:
            spoil(ours, params)
            spoil(theirs, reference)
        ours.step()
        theirs.step()
    for i, (a, b) in enumerate(zip(params, reference)):
        assert_close(a.detach(), b.detach(), torch.float32, f"params[{i}]")
        for key, value in theirs.state[b].items():
            assert_close(ours.state[a][key], value, torch.float32, f"state[{i}][{key!r}]")


@pytest.mark.skipif(not hasattr(torch, "_lazy_clone"), reason="this torch has no _lazy_clone")
def test_grads_viewing_one_copy_on_write_tensor_are_read_as_torch_reads_them() -> None:
    """Reading a copy-on-write tensor's data_ptr materializes its copy, which two threads must
    not do at once: many grads viewing one lazily cloned tensor (a step checking them on the
    pool's threads crashed or hung) step as torch.optim steps them, the original untouched.
    Large enough that a copy takes milliseconds: two threads copying at once would overlap."""
    SIZE = 1000
    results = []
    for module in (torch.optim, ft):
        params = [torch.nn.Parameter(torch.zeros(SIZE)) for _ in range(MANY)]
        optimizer = module.SGD(params, lr=1.0)
        for _ in range(2):
            base = torch.arange(MANY * SIZE, dtype=torch.float32)
            flat = torch._lazy_clone(base)
            for i, p in enumerate(params):
                p.grad = flat[i * SIZE : (i + 1) * SIZE]
            optimizer.step()
            assert torch.equal(base, torch.arange(MANY * SIZE, dtype=torch.float32))
        results.append(torch.cat([p.detach() for p in params]))
    assert torch.equal(results[1], results[0])


def _float64_grad(p: Any) -> None:
    p.grad.data = p.grad.data.double()


def _short_grad(p: Any) -> None:
    p.grad.data = p.grad.data[:2]


@pytest.mark.parametrize("spoil", [_float64_grad, _short_grad])
def test_a_bad_grad_among_many_is_refused_naming_it_with_nothing_written(spoil: Callable) -> None:
    params = [torch.nn.Parameter(torch.ones(3, 3)) for _ in range(MANY)]
    optimizer = ft.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(3, 3)
    optimizer.step()
    before = [p.detach().clone() for p in params]
    states = [t.clone() for p in params for t in optimizer.state[p].values()]
    spoil(params[LATE])
    with pytest.raises((TypeError, ValueError), match=rf"params\[{LATE}\] of param_groups\[0\]"):
        optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    after = [t for p in params for t in optimizer.state[p].values()]
    assert all(torch.equal(a, b) for a, b in zip(after, states))


@needs_cuda
@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_one_optimizer_over_cpu_and_cuda_params_steps_each_device_once(name: str) -> None:
    """Params on both devices in one group: each device's params take exactly torch's step."""
    dtype = torch.float64
    ours_params = model_params(dtype, 1, "cpu") + model_params(dtype, 2, "cuda")
    their_params = model_params(dtype, 1, "cpu") + model_params(dtype, 2, "cuda")
    ours = getattr(ft, name)(ours_params, lr=0.01)
    theirs = getattr(torch.optim, name)(their_params, lr=0.01, foreach=False)
    run(ours, ours_params, range(8))
    run(theirs, their_params, range(8))
    for i, (a, b) in enumerate(zip(ours_params, their_params)):
        assert a.device == b.device
        assert_close(a.detach(), b.detach(), dtype, f"params[{i}] on {a.device}")


@needs_cuda
def test_a_cpu_grad_for_a_cuda_param_is_refused_with_nothing_written() -> None:
    params = model_params(torch.float32, device="cuda")
    optimizer = ft.Adam(params, lr=0.1)
    run(optimizer, params, range(2))
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads_for(2, params)):
        p.grad = None if g is None else g.clone()
    # torch refuses such an assignment to .grad, not to .grad.data
    params[2].grad.data = params[2].grad.data.cpu()
    assert params[2].grad.device.type == "cpu"
    with pytest.raises((TypeError, ValueError), match=r"params\[2\]"):
        optimizer.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


# (param shape, grad shape): the same element count in another shape, a transpose, an extra
# dimension, and empty shapes that differ only where an element count of 0 settles nothing.
SHAPE_SPOILS = [
    ((3, 4), (2, 6)),
    ((3, 4), (4, 3)),
    ((3, 4), (3, 4, 1)),
    ((12,), (12, 1)),
    ((), (1,)),
    ((4, 0), (2, 0)),
    ((0, 4), (4, 0)),
    ((2, 3, 0), (3, 2, 0)),
]


@pytest.mark.parametrize("param_shape, grad_shape", SHAPE_SPOILS, ids=str)
def test_a_grad_of_another_shape_is_refused_with_nothing_written(
    param_shape: tuple, grad_shape: tuple
) -> None:
    """torch refuses such a grad when it is assigned to .grad, not through .grad.data; the step
    compares the whole shape, not only the element count and the number of dimensions."""
    params = [torch.ones(5, requires_grad=True), torch.ones(param_shape, requires_grad=True)]
    optimizer = ft.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(p.shape)
    optimizer.step()
    before = [p.detach().clone() for p in params]
    states = [t.clone() for p in params for t in optimizer.state[p].values()]
    params[1].grad.data = torch.ones(grad_shape)
    with pytest.raises(ValueError, match=r"grad of params\[1\] of param_groups\[0\] has shape"):
        optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    after = [t for p in params for t in optimizer.state[p].values()]
    assert all(torch.equal(a, b) for a, b in zip(after, states))


def test_adagrad_fills_every_sum_from_the_constructors_value_as_torch_does() -> None:
    """torch's Adagrad reads no group's initial_accumulator_value: every sum starts at the
    constructor's value, and a param added later starts at its defaults'."""
    optimizers = []
    for make in (ft.Adagrad, torch.optim.Adagrad):
        params = [torch.zeros(2, requires_grad=True) for _ in range(3)]
        groups = [
            {"params": params[:1]},
            {"params": params[1:2], "initial_accumulator_value": 0.25},
        ]
        optimizer = make(groups, lr=0.1, initial_accumulator_value=0.5)
        optimizer.add_param_group({"params": params[2:], "initial_accumulator_value": 0.75})
        for p in params:
            p.grad = torch.ones(2)
        optimizer.step()
        optimizers.append((optimizer, params))
    (ours, our_params), (theirs, their_params) = optimizers
    for p, q in zip(our_params, their_params):
        assert torch.equal(ours.state[p]["sum"], theirs.state[q]["sum"])
        assert torch.equal(p.detach(), q.detach())
    assert torch.equal(theirs.state[their_params[2]]["sum"], torch.full((2,), 1.5))


def test_a_one_element_array_hyperparameter_changed_in_place_takes_effect() -> None:
    """The options cache keys a value that can change in place by its number, as the NumPy
    classes' cache does: an array lr changed in place steps with the new rate."""
    ours_params, expected_params = model_params(torch.float64), model_params(torch.float64)
    lr = np.array(0.1)
    ours = ft.SGD(ours_params, lr=lr, momentum=0.9)
    expected = ft.SGD(expected_params, lr=0.1, momentum=0.9)
    run(ours, ours_params, range(2))
    run(expected, expected_params, range(2))
    lr[...] = 0.05
    expected.param_groups[0]["lr"] = 0.05
    run(ours, ours_params, range(2, 4))
    run(expected, expected_params, range(2, 4))
    for a, b in zip(ours_params, expected_params):
        assert torch.equal(a.detach(), b.detach())


def test_hyperparameters_set_back_to_earlier_objects_step_as_torch_optim() -> None:
    """A group at the very value objects of its last step reuses that step's options without
    rebuilding their key; lr a -> b -> a and betas swapped between two tuples must still step
    with the values they hold, as torch.optim does."""
    ours_params, their_params = model_params(torch.float64), model_params(torch.float64)
    ours = ft.Adam(ours_params, lr=0.1)
    theirs = torch.optim.Adam(their_params, lr=0.1, foreach=False)
    a, b = 0.1, 0.025
    fast, slow = (0.9, 0.999), (0.5, 0.9)
    schedule = [(a, fast), (a, fast), (b, fast), (b, slow), (a, slow), (a, fast), (a, fast)]
    for step, (lr, betas) in enumerate(schedule):
        for optimizer in (ours, theirs):
            optimizer.param_groups[0]["lr"] = lr
            optimizer.param_groups[0]["betas"] = betas
        run(ours, ours_params, range(step, step + 1))
        run(theirs, their_params, range(step, step + 1))
        for p, q in zip(ours_params, their_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "step"])
def test_a_state_given_new_memory_is_followed_not_written_after_free(key: str) -> None:
    """`state[key].data = other` keeps the tensor object (and its entry in optimizer.state) and
    frees its old memory: the plan went on writing the freed memory. Every registered tensor's
    memory is now checked at each step, and a moved one gets a new plan, as torch follows it."""
    results = []
    for module in (torch.optim, ft):
        p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 6))
        opt = module.Adam([p], lr=0.1)
        for step in range(3):
            p.grad = torch.full((6,), 0.5 + step)
            opt.step()
            if step == 0:
                state = opt.state[p][key]
                state.data = state.detach().clone()
        results.append([p.detach().clone(), *(v.clone() for v in opt.state[p].values())])
    for fused, expected in zip(results[1], results[0]):
        torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flag", ["differentiable", "capturable"])
def test_unsupported_modes_are_refused_in_an_added_group_with_nothing_modified(flag: str) -> None:
    params = model_params(torch.float32)
    optimizer = ft.Adam(params[:2], lr=0.01)
    run(optimizer, params[:2], range(2))
    snapshot = Snapshot(optimizer, params)
    with pytest.raises(ValueError, match=rf"{flag}=True is not supported.*param_groups\[1\]"):
        optimizer.add_param_group({"params": params[2:], flag: True})
    snapshot.assert_unchanged()


@pytest.mark.parametrize("flag", ["differentiable", "capturable"])
def test_unsupported_modes_set_in_a_group_later_are_refused_at_the_step(flag: str) -> None:
    params = model_params(torch.float32)
    optimizer = ft.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.01)
    run(optimizer, params, range(2))
    optimizer.param_groups[1][flag] = True
    for p, g in zip(params, grads_for(2, params)):
        p.grad = g
    snapshot = Snapshot(optimizer, params)
    with pytest.raises(ValueError, match=rf"{flag}=True is not supported.*param_groups\[1\]"):
        optimizer.step()
    snapshot.assert_unchanged()


def _append(params: list, extra: list) -> list:
    params.append(extra[0])  # a layer unfrozen: its params join a group
    return params


def _pop(params: list, extra: list) -> list:
    params.pop(0)
    return params


def _replace_an_item(params: list, extra: list) -> list:
    params[1] = extra[0]
    return params


def _replace_the_list(params: list, extra: list) -> list:
    return [params[0], *extra]


@pytest.mark.parametrize("edit", [_append, _pop, _replace_an_item, _replace_the_list])
def test_a_group_s_params_edited_after_a_step_are_stepped_as_listed(edit: Callable) -> None:
    """torch.optim steps the lists as they are at each step; so does fusedopt.torch."""
    results = []
    for module in (ft, torch.optim):
        params = model_params(torch.float64)
        extra = {"foreach": False} if module is torch.optim else {}
        groups = [{"params": params[:2]}, {"params": params[3:4], "lr": 0.1}]
        optimizer = module.Adam(groups, lr=0.01, **extra)
        for step in range(5):
            if step == 2:
                group = optimizer.param_groups[0]
                group["params"] = edit(group["params"], [params[4], params[2]])
            for p in params:  # every param has a grad at every step: only the lists change
                p.grad = torch.full_like(p, step + 1.0)
            optimizer.step()
        results.append(params)
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a.detach(), b.detach(), torch.float64, f"params[{i}]")


@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_a_step_refused_while_registering_leaves_no_new_state(first: bool) -> None:
    """The native plan refuses a grad that is its param's own memory once the state is made:
    the state that registration created is taken back."""
    params = model_params(torch.float32)
    optimizer = ft.Adam([{"params": params[:2]}, {"params": params[2:4], "lr": 0.1}], lr=0.01)
    if not first:
        run(optimizer, params[:4], range(2))
    optimizer.add_param_group({"params": params[4:]})
    for p, g in zip(params, grads_for(2, params)):
        p.grad = g
    params[4].grad = params[4].detach()
    snapshot = Snapshot(optimizer, params)
    with pytest.raises(ValueError, match="overlaps"):
        optimizer.step()
    snapshot.assert_unchanged()


def test_a_param_listed_twice_is_refused_naming_both_with_nothing_modified() -> None:
    """torch.optim warns and updates it twice; one fused pass updates each tensor once."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        optimizer = ft.Adam([{"params": [b]}, {"params": [a, a]}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    snapshot = Snapshot(optimizer, [a, b])
    expected = r"params\[1\] of param_groups\[1\] is the same tensor as params\[0\] of param_gr"
    with pytest.raises(ValueError, match=expected):
        optimizer.step()
    snapshot.assert_unchanged()


def test_params_that_share_memory_are_refused_naming_both_with_nothing_modified() -> None:
    base = torch.zeros(6)
    params = [torch.nn.Parameter(x) for x in (torch.zeros(2), base[2:], base[:4])]
    optimizer = ft.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    params[0].grad = torch.ones(2)
    optimizer.step()
    for p in params:
        p.grad = torch.ones_like(p)
    snapshot = Snapshot(optimizer, params)
    expected = r"params\[0\] of param_groups\[1\] overlaps params\[1\] of param_groups\[1\]"
    with pytest.raises(ValueError, match=expected):
        optimizer.step()
    snapshot.assert_unchanged()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), 1e30, -3.0, float("inf")])
@pytest.mark.parametrize("how", ["loaded", "filled in place"])
def test_a_step_count_out_of_range_is_refused_naming_it_with_nothing_modified(
    value: float, how: str, device: str
) -> None:
    params = model_params(torch.float32, device=device)
    optimizer = ft.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], lr=0.01)
    run(optimizer, params, range(2))
    if how == "loaded":
        state_dict = optimizer.state_dict()
        state_dict["state"][2]["step"] = torch.tensor(value)
        optimizer.load_state_dict(state_dict)
    else:
        optimizer.state[params[2]]["step"].fill_(value)
    for p, g in zip(params, grads_for(2, params)):
        p.grad = g
    snapshot = Snapshot(optimizer, params)
    stored = torch.tensor(value).item()  # as the float32 step holds it
    expected = rf"state\['step'\] of params\[0\] of param_groups\[1\] is {re.escape(str(stored))}"
    with pytest.raises(ValueError, match=expected):
        optimizer.step()
    snapshot.assert_unchanged()


def _keys_torch_restores(name: str) -> set[str]:
    """The group keys torch.optim.<name>.__setstate__ adds to a checkpoint of an older torch."""
    optimizer = getattr(torch.optim, name)([torch.nn.Parameter(torch.zeros(1))])
    optimizer.__setstate__({"param_groups": [{"params": []}]})
    return set(optimizer.param_groups[0]) - {"params"}


@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_a_checkpoint_of_an_older_torch_loads_and_resumes_as_in_torch(case: tuple) -> None:
    """Older torch saved fewer group keys (no decoupled_weight_decay, foreach, ...) and scalar
    states as Python numbers (an int step, a float mu_product or eta): torch's __setstate__
    restores both, and so does fusedopt.torch's."""
    name, options = case
    params = model_params(torch.float64)
    saver = getattr(torch.optim, name)(params, lr=0.01, **options)
    run(saver, params, range(3))
    checkpoint = saver.state_dict()
    old_keys = _keys_torch_restores(name)
    for group in checkpoint["param_groups"]:
        for key in old_keys:
            group.pop(key)
    for entry in checkpoint["state"].values():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() == 0:
                entry[key] = int(value) if key == "step" else float(value)
    resumed = []
    for module in (ft, torch.optim):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        optimizer = getattr(module, name)(copies, lr=0.01)
        optimizer.load_state_dict(copy.deepcopy(checkpoint))  # its step tensors are stepped
        run(optimizer, copies, range(3, 6))
        resumed.append((optimizer, copies))
    (ours, ours_params), (theirs, their_params) = resumed
    compare(ours, theirs, ours_params, their_params, torch.float64)


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_a_checkpoint_of_a_channels_last_model_resumes_as_in_torch(name: str) -> None:
    """torch keeps a channels_last param's state channels_last; loaded for contiguous params,
    the state is converted into the params' layout, contiguous (each element by its logical
    index), and training goes on along torch.optim's trajectory."""
    torch.manual_seed(0)
    options = {"lr": 0.01, **({"momentum": 0.9} if name != "Adam" else {})}
    inputs = [torch.randn(2, 3, 8, 8) for _ in range(5)]
    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    saver = getattr(torch.optim, name)(model.parameters(), **options)
    for x in inputs[:2]:
        saver.zero_grad()
        model(x.to(memory_format=torch.channels_last)).square().sum().backward()
        saver.step()
    checkpoint = saver.state_dict()
    weight_state = [v for k, v in checkpoint["state"][0].items() if k != "step"]
    assert not any(v.is_contiguous() for v in weight_state)  # channels_last
    results = []
    for module in (ft, torch.optim):
        resumed = torch.nn.Conv2d(3, 4, 3)
        resumed.load_state_dict(model.state_dict())
        optimizer = getattr(module, name)(resumed.parameters(), **options)
        optimizer.load_state_dict(copy.deepcopy(checkpoint))
        for x in inputs[2:]:
            optimizer.zero_grad()
            resumed(x).square().sum().backward()
            optimizer.step()
        results.append((optimizer, list(resumed.parameters())))
    (ours, ours_params), (theirs, their_params) = results
    compare(ours, theirs, ours_params, their_params, torch.float32)


def test_a_refused_load_state_dict_leaves_the_optimizer_as_it_was() -> None:
    """torch's load ran first and fusedopt's conversions after it: a refusal there (8-bit state
    saved without its absmax) left the new state loaded. The next step is now the one a twin
    that never saw the refused load takes."""
    results = []
    for refused in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5000))
        opt = ft.Adam([p], lr=0.01, state_dtype="int8")
        p.grad = torch.randn(5000)
        opt.step()
        if refused:
            saved = opt.state_dict()
            saved["state"][0] = {k: v.clone() for k, v in saved["state"][0].items()}
            saved["state"][0]["exp_avg"].fill_(7)
            del saved["state"][0]["exp_avg_absmax"]
            saved["param_groups"][0]["lr"] = 0.5
            with pytest.raises(ValueError, match="exp_avg_absmax"):
                opt.load_state_dict(saved)
            assert opt.param_groups[0]["lr"] == 0.01
        p.grad = torch.ones(5000)
        opt.step()
        results.append([p.detach().clone(), *(v.clone() for v in opt.state[p].values())])
    for after_refusal, expected in zip(results[1], results[0]):
        assert torch.equal(after_refusal, expected)


def _reset_states(optimizer: Any, saved: dict) -> dict:
    """A load pre-hook that returns a new dict: every state zero, mu_product 1."""
    saved = copy.deepcopy(saved)
    for entry in saved["state"].values():
        for key, value in entry.items():
            if torch.is_tensor(value):
                entry[key] = (
                    torch.ones_like(value) if key == "mu_product" else torch.zeros_like(value)
                )
    return saved


@pytest.mark.parametrize(
    "name, dtype, options",
    [
        ("NAdam", torch.bfloat16, {}),
        ("Adam", torch.bfloat16, {"state_dtype": "float32"}),
        ("Adam", torch.float32, {"state_dtype": "bfloat16"}),
        ("Adam", torch.bfloat16, {"master_weights": True}),
    ],
    ids=["nadam-bfloat16", "bfloat16-float32-state", "float32-bfloat16-state", "master"],
)
def test_load_hooks_see_and_change_what_is_loaded(name: str, dtype: Any, options: dict) -> None:
    """The dict a load pre-hook returns is the one loaded, and what a post-hook changes stays:
    fusedopt's conversions (a state kept in another dtype than its param's, a master, the scalar
    states of 16-bit params) ran after torch's load from the dict given, hooks included, and
    undid both."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 8, dtype=dtype))
    opt = getattr(ft, name)([p], lr=0.1, **options)
    for k in range(3):
        p.grad = torch.full_like(p, 0.5 + k)
        opt.step()
    handle = opt.register_load_state_dict_pre_hook(_reset_states)
    opt.load_state_dict(opt.state_dict())
    for key, value in opt.state[p].items():
        expected = 1.0 if key == "mu_product" else 0.0
        assert torch.all(value.float() == expected), key
    handle.remove()

    def post_hook(optimizer: Any) -> None:
        for value in optimizer.state[p].values():
            value.fill_(0.25)

    opt.register_load_state_dict_post_hook(post_hook)
    opt.load_state_dict(opt.state_dict())
    for key, value in opt.state[p].items():
        assert torch.all(value.float() == 0.25), key


def test_load_post_hooks_do_not_run_for_a_refused_load() -> None:
    p = torch.nn.Parameter(torch.randn(8))
    opt = ft.Adam([p], lr=0.01)
    p.grad = torch.randn(8)
    opt.step()
    calls = []
    opt.register_load_state_dict_post_hook(lambda optimizer: calls.append(optimizer))
    saved = copy.deepcopy(opt.state_dict())
    del saved["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.load_state_dict(saved)
    assert calls == []
    opt.load_state_dict(opt.state_dict())
    assert calls == [opt]


@pytest.mark.parametrize("name, missing", [("Adam", "exp_avg_sq"), ("NAdam", "mu_product"),
                                           ("Adam", "step"), ("Adagrad", "sum")])  # fmt: skip
def test_a_loaded_entry_missing_a_state_it_keeps_is_refused(name: str, missing: str) -> None:
    """fusedopt.torch made the missing state again at the next step (a zero second moment under
    a trained first moment), where torch raises KeyError: refused at the load, as the NumPy
    classes refuse it, naming the param and the state, nothing loaded."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = getattr(ft, name)([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    del saved["state"][0][missing]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=rf"params\[0\] of param_groups\[0\] has no '{missing}'"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"][0].items():
        assert torch.equal(after["state"][0][key], value)


TORCH_NAMES = [name for name in ft.__all__ if hasattr(torch.optim, name) and name != "Optimizer"]


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_a_step_bumps_autograd_versions_as_torch_s_in_place_updates_do(name: str) -> None:
    """A graph that saved a param before the step refuses its backward after it, as with
    torch.optim: the native step bumps the version of every param it wrote (not its states':
    no model's graph saves them, and over many tensors the bumps cost a third of a step)."""
    for module in (torch.optim, ft):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(3, 3))
        optimizer = getattr(module, name)([w])
        x = torch.randn(2, 3, requires_grad=True)
        (x @ w).sum().backward()
        optimizer.step()  # the state exists from here on
        y = (x @ w).square().sum()  # saves w for the backward wrt x
        before = w._version
        optimizer.step()
        assert w._version > before
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


@pytest.fixture
def registrations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One item per plan fusedopt.torch's optimizers make (each call of _register) in the test."""
    made: list[int] = []
    register = ft.Optimizer._register
    monkeypatch.setattr(
        ft.Optimizer, "_register", lambda self, o: (made.append(1), register(self, o))
    )
    return made


EXPERT_CASES = [
    ("SGD", {}),
    ("Adam", {"amsgrad": True}),
    ("NAdam", {"momentum_decay": 0.1}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("Adagrad", {"lr_decay": 0.01}),
    ("Rprop", {}),
    ("ASGD", {"t0": 2.0}),
    ("RMSprop", {"centered": True}),
]


def expert_grads(step: int, params: list[Any]) -> list[Any]:
    """A mixture of experts' grads: each step two of the six params get none (a different two
    every step), and params[5] gets none before step 4."""
    generator = torch.Generator().manual_seed(2000 + step)
    grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    for i in (step % 5, (step + 2) % 5):
        grads[i] = None
    if step < 4:
        grads[5] = None
    return grads


@pytest.mark.parametrize("case", EXPERT_CASES, ids=map(case_id, EXPERT_CASES))
def test_params_losing_and_regaining_grads_keep_their_plan(
    case: tuple, registrations: list
) -> None:
    """A param whose grad is None is skipped, as torch skips it (its state and step count
    unchanged), by the plan it is in: a plan is made anew only when a param without state gets a
    grad (once made for every param, it served every later step, where a new plan at every change
    of the set of grads cost 100 µs a param)."""
    name, options = case
    results = []
    for module in (ft, torch.optim):
        generator = torch.Generator().manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64))
            for s in [(3, 4), (7,), (1,), (2, 2), (5,), (6,)]
        ]
        extra = {} if module is ft else {"foreach": False}
        optimizer = getattr(module, name)(params, lr=0.05, **options, **extra)
        for step in range(12):
            for p, g in zip(params, expert_grads(step, params)):
                p.grad = g
            optimizer.step()
        results.append((optimizer, params))
    (ours, ours_params), (theirs, their_params) = results
    compare(ours, theirs, ours_params, their_params, torch.float64)
    # Step 0 (params 1, 4 and 5 without state), step 1 (param 1 with a grad), step 4 (param 5);
    # torch's Adagrad makes every param's state in its constructor, and SGD without momentum
    # keeps none: every param is in the first plan, which serves every step.
    assert len(registrations) == (1 if name == "Adagrad" or (name, options) == ("SGD", {}) else 3)


def test_a_param_without_a_grad_is_not_written_and_keeps_its_version() -> None:
    """A param in the plan whose grad is None now is not written: its version stays, so a graph
    that saved it still runs its backward, as under torch.optim."""
    for module in (torch.optim, ft):
        w, v = (torch.nn.Parameter(torch.randn(3, 3)) for _ in range(2))
        optimizer = module.Adam([w, v], lr=0.1)
        w.grad, v.grad = torch.ones(3, 3), torch.ones(3, 3)
        optimizer.step()  # both have state from here on
        x = torch.randn(2, 3, requires_grad=True)
        y = (x @ v).square().sum()  # saves v
        w.grad, v.grad = torch.ones(3, 3), None
        before_w, before_v, value_v = w._version, v._version, v.detach().clone()
        optimizer.step()
        assert w._version > before_w and v._version == before_v, module
        assert torch.equal(v.detach(), value_v)
        assert float(optimizer.state[v]["step"]) == 1.0 and float(optimizer.state[w]["step"]) == 2.0
        y.backward()


def test_a_param_long_without_a_grad_leaves_the_plan_until_it_has_one(registrations: list) -> None:
    """A param skipped at many steps in a row (a frozen layer) costs its checks at every step: a
    plan without it is made then (TorchPlan.kDormantSteps, 100), and it joins again with a
    grad; every step as torch's."""
    results = []
    for module in (ft, torch.optim):
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, generator=generator)) for _ in range(3)]
        optimizer = module.Adam(params, lr=0.01)
        for step in range(115):
            for i, p in enumerate(params):
                frozen = i == 2 and 0 < step < 110
                p.grad = None if frozen else torch.randn(5, generator=generator)
            optimizer.step()
        results.append((optimizer, params))
    (ours, ours_params), (theirs, their_params) = results
    compare(ours, theirs, ours_params, their_params, torch.float32)
    assert float(ours.state[ours_params[2]]["step"]) == 6.0
    # Step 0; step 101, after params[2] was skipped at steps 1-100; step 110, its grad back.
    assert len(registrations) == 3


def test_a_param_without_a_grad_whose_memory_moved_is_not_in_the_way_of_a_grad() -> None:
    """A param skipped at a step whose memory moved (``p.data = ...``) since the plan was made:
    its old memory, now another param's grad, is stepped as torch steps it (the plan is made anew;
    its old extent would have refused the grad as overlapping it)."""
    results = []
    for module in (ft, torch.optim):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(64))
        optimizer = module.Adam([a, b], lr=0.1)
        a.grad, b.grad = torch.ones(64), torch.ones(64)
        optimizer.step()
        old = b.data
        b.data = torch.randn(64)
        a.grad, b.grad = old.fill_(0.5), None  # b's old memory as a's grad
        optimizer.step()
        optimizer.step()
        results.append((a.detach().clone(), b.detach().clone()))
    for ours, theirs in zip(*results):
        assert_close(ours, theirs, torch.float32, "params")


@pytest.mark.parametrize("value", [0.0, [0.0] * 4], ids=["float", "list"])
def test_a_state_that_is_no_tensor_of_a_param_without_a_grad_is_left_alone(value: Any) -> None:
    """torch never looks at the state of a param without a grad; nor does a plan, which leaves
    such a param out."""
    results = []
    for module in (ft, torch.optim):
        a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
        optimizer = module.Adam([a, b], lr=0.1)
        a.grad, b.grad = torch.ones(4), torch.ones(4)
        optimizer.step()
        optimizer.state[b]["exp_avg"] = value
        a.grad, b.grad = torch.ones(4), None
        optimizer.step()
        results.append(a.detach().clone())
    assert_close(results[0], results[1], torch.float32, "a")


def test_the_scalars_of_a_param_without_a_grad_are_neither_read_nor_written() -> None:
    """NAdam's mu_product of a skipped param keeps its very bits (a float32 signalling NaN would
    come back quieted from a write through a double)."""
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    optimizer = ft.NAdam([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    optimizer.step()
    mu_product = optimizer.state[b]["mu_product"]
    assert mu_product.dtype == torch.float32
    mu_product.view(torch.int32).fill_(0x7F800001)
    a.grad, b.grad = torch.ones(4), None
    optimizer.step()
    assert int(optimizer.state[b]["mu_product"].view(torch.int32)) == 0x7F800001
    assert float(optimizer.state[b]["step"]) == 1.0 and float(optimizer.state[a]["step"]) == 2.0


def test_params_sharing_memory_without_grads_are_left_out_of_the_plan() -> None:
    """Two params over one memory, never both with a grad in a step (torch steps that), each
    with state: a plan over both is refused as overlapping, so the one without a grad is left out
    and each step follows torch's."""
    results = []
    for module in (ft, torch.optim):
        base = torch.arange(6, dtype=torch.float64)
        a, b = torch.nn.Parameter(base), torch.nn.Parameter(base)  # one memory
        optimizer = module.Adam([a, b], lr=0.1)
        for step in range(6):
            grad = torch.full((6,), 1.0 if step % 2 else -2.0, dtype=torch.float64)
            a.grad, b.grad = (grad, None) if step % 2 else (None, grad)
            optimizer.step()
        results.append((a.detach().clone(), optimizer.state_dict()["state"]))
    (ours, our_state), (theirs, their_state) = results
    assert_close(ours, theirs, torch.float64, "params")
    for index in (0, 1):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert_close(our_state[index][key], their_state[index][key], torch.float64, key)


def test_grads_unscaled_by_a_grad_scale_have_their_version_bumped() -> None:
    """Under a GradScaler the step writes the unscaled grads back, as torch's fused step does."""
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = ft.Adam([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(p.sum()).backward()
    before = p.grad._version
    scaler.step(optimizer)
    assert torch.equal(p.grad, torch.ones(3)) and p.grad._version > before


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_a_lazy_module_is_taken_and_trained_as_torch_trains_it(name: str) -> None:
    """torch.optim takes a lazy module's UninitializedParameters; they are checked at the first
    step after the first forward materialized them."""
    trained = []
    for module in (torch.optim, ft):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Tanh(), torch.nn.LazyLinear(2))
        optimizer = getattr(module, name)(model.parameters(), lr=0.1)
        data = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            optimizer.zero_grad()
            model(data).square().sum().backward()
            optimizer.step()
        trained.append([p.detach().clone() for p in model.parameters()])
    for ours, theirs in zip(trained[1], trained[0]):
        assert_close(ours, theirs, torch.float32, f"{name} over a lazy module")


def test_a_lazy_param_is_checked_once_materialized() -> None:
    """A lazy param materialized as something fusedopt cannot update (here not dense) is
    refused at its first step, naming it, with nothing written."""
    model = torch.nn.LazyLinear(3)
    optimizer = ft.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    model.weight.data = torch.ones(3, 8)[:, ::2]
    model.weight.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"params\[0\] of param_groups\[0\] is not dense"):
        optimizer.step()
    assert torch.equal(model.weight.detach(), torch.ones(3, 4)) and not optimizer.state


CONSTRUCTOR_ARGUMENTS = [
    ("Adam", {"lr": -1.0}), ("Adam", {"eps": -1e-8}), ("Adam", {"betas": (1.0, 0.9)}),
    ("Adam", {"betas": (0.9,)}), ("Adam", {"betas": (torch.tensor(0.9), 0.999)}),
    ("Adam", {"fused": True, "foreach": True}),
    ("Adam", {"foreach": True, "lr": torch.tensor(0.01)}),
    ("Adam", {"maximize": "yes"}), ("Adam", {"lr": float("inf")}), ("Adam", {"lr": float("nan")}),
    ("Adam", {"lr": torch.tensor([0.1, 0.2])}), ("SGD", {"lr": float("nan")}),
    ("SGD", {"weight_decay": float("nan")}), ("SGD", {"nesterov": True}),
    ("SGD", {"momentum": -0.1}), ("Rprop", {"etas": (1.5, 0.5)}),
    ("Rprop", {"step_sizes": (1, 0.1)}),
    ("Adadelta", {"rho": 1.5}), ("Adagrad", {"initial_accumulator_value": -0.1}),
    ("RMSprop", {"alpha": -0.1}), ("NAdam", {"momentum_decay": -0.1}), ("ASGD", {"lambd": -1.0}),
    ("RAdam", {"betas": (float("nan"), 0.9)}), ("Adamax", {"betas": (0.9, 1.0)}),
]  # fmt: skip


@pytest.mark.parametrize("name, arguments", CONSTRUCTOR_ARGUMENTS, ids=str)
def test_constructor_arguments_are_checked_as_torch_checks_them(name: str, arguments: dict) -> None:
    """What torch's constructor refuses, with its exception type and message, and nothing else
    (it takes an inf or NaN lr, maximize='yes')."""
    outcomes = []
    for module in (torch.optim, ft):
        try:
            getattr(module, name)([torch.nn.Parameter(torch.ones(3))], **arguments)
            outcomes.append(None)
        except Exception as error:  # noqa: BLE001 - compared with torch's
            outcomes.append((type(error), str(error)))
    assert outcomes[1] == outcomes[0]


LATER_VALUES = [
    ("SGD", {"momentum": 0.9}, {"lr": -0.1}),
    ("SGD", {"momentum": 0.9}, {"nesterov": True, "dampening": 0.5}),
    ("SGD", {}, {"lr": float("inf")}),
    ("Adam", {}, {"eps": -1e-3}),
    ("Adam", {}, {"weight_decay": -0.1}),
    ("Adam", {}, {"betas": (0.9, 1.0)}),
    ("Adam", {}, {"betas": (-0.5, 0.999)}),
    ("Adamax", {}, {"betas": (0.9, 1.0)}),
    ("NAdam", {}, {"momentum_decay": -1.0}),
    ("RAdam", {}, {"betas": (0.9, 1.5)}),
    ("Rprop", {}, {"etas": (1.5, 0.5)}),
    ("Adadelta", {}, {"rho": 1.5}),
    ("Adagrad", {}, {"lr_decay": -0.1}),
    ("RMSprop", {}, {"alpha": -0.5}),
    ("ASGD", {}, {"lr": float("nan")}),
]


@pytest.mark.parametrize("name, arguments, change", LATER_VALUES, ids=str)
def test_a_value_set_later_in_param_groups_is_used_as_torch_uses_it(
    name: str, arguments: dict, change: dict
) -> None:
    """torch checks its constructor's arguments only: a value set later is stepped with,
    whatever its arithmetic gives (inf and NaN included)."""
    trajectories = []
    for module in (torch.optim, ft):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64))
        kwargs = {"foreach": False} if module is torch.optim else {}
        optimizer = getattr(module, name)([p], lr=0.1, **arguments, **kwargs)
        for t in range(4):
            p.grad = torch.tensor([0.5, 1.0, -0.3, 0.0], dtype=torch.float64) * (t + 1)
            if t == 1:
                optimizer.param_groups[0].update(change)
            optimizer.step()
        trajectories.append(p.detach().clone())
    ours, theirs = trajectories[1], trajectories[0]
    assert torch.equal(ours.isnan(), theirs.isnan()), (ours, theirs)
    finite = theirs.isfinite()
    assert torch.equal(ours[~finite & ~theirs.isnan()], theirs[~finite & ~theirs.isnan()])
    assert_close(ours[finite], theirs[finite], torch.float64, f"{name} with {change}")


def test_a_group_added_with_values_torch_never_checks_is_taken() -> None:
    """torch's add_param_group checks no value: a group's lr of -1 is taken and stepped with."""
    results = []
    for module in (torch.optim, ft):
        a, b = (torch.nn.Parameter(torch.ones(2)) for _ in range(2))
        optimizer = module.Adam([{"params": [a]}, {"params": [b], "lr": -1.0}])
        a.grad, b.grad = torch.ones(2), torch.ones(2)
        optimizer.step()
        results.append(b.detach().clone())
    assert torch.allclose(results[1], results[0])


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_defaults_and_param_groups_keep_torch_s_key_order(name: str) -> None:
    for module_params in ([torch.nn.Parameter(torch.zeros(2))],):
        ours, theirs = getattr(ft, name)(module_params), getattr(torch.optim, name)(module_params)
        assert list(ours.defaults) == list(theirs.defaults)
        assert list(ours.param_groups[0]) == list(theirs.param_groups[0])


def test_adamw_switches_to_l2_decay_when_its_group_says_so_as_torch_does() -> None:
    """torch's Adam step reads decoupled_weight_decay from the group, AdamW's too."""
    trajectories = []
    for module in (torch.optim, ft):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
        kwargs = {"foreach": False} if module is torch.optim else {}
        optimizer = module.AdamW([p], lr=0.1, **kwargs)
        for t in range(3):
            p.grad = torch.tensor([0.5, 1.0, -0.3], dtype=torch.float64) * (t + 1)
            if t == 1:
                optimizer.param_groups[0]["decoupled_weight_decay"] = False
            optimizer.step()
        trajectories.append(p.detach().clone())
    assert_close(trajectories[1], trajectories[0], torch.float64, "AdamW turned to L2")


def _spoil_exp_avg_strides(optimizer: Any, p: Any) -> None:
    optimizer.state[p]["exp_avg"] = optimizer.state[p]["exp_avg"].t().contiguous().t()


def _grad_sharing_its_param(optimizer: Any, p: Any) -> None:
    p.grad = p.detach()


def _int64_step(optimizer: Any, p: Any) -> None:
    optimizer.state[p]["step"] = torch.tensor(3)


def _float_step(optimizer: Any, p: Any) -> None:
    optimizer.state[p]["step"] = 3.0


@pytest.mark.parametrize(
    "spoil", [_spoil_exp_avg_strides, _grad_sharing_its_param, _int64_step, _float_step]
)
def test_refusals_below_the_python_checks_name_the_param_and_its_group(spoil: Callable) -> None:
    """The refusals the native plan makes name params[i] of param_groups[g] too, nothing
    written (the first param has no grad: the flat index is not the param's)."""
    a, b, c, d = (torch.nn.Parameter(torch.randn(2, 3)) for _ in range(4))
    optimizer = ft.Adam([{"params": [a, b]}, {"params": [c, d], "lr": 0.1}])
    for p in (a, b, c, d):
        p.grad = torch.randn(2, 3)
    optimizer.step()
    a.grad = None
    spoil(optimizer, d)
    before = d.detach().clone()
    with pytest.raises((TypeError, ValueError), match=r"params\[1\] of param_groups\[1\]"):
        optimizer.step()
    assert torch.equal(d.detach(), before)


# ------------------------------------------------------------------ memory layouts (channels_last)

LAYOUT_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}  # relative to 1 + |x|


def cnn_params(dtype: Any, seed: int = 0) -> list[Any]:
    """A small CNN's params: a Conv2d weight in channels_last, a Conv3d weight in
    channels_last_3d (both not contiguous), and their biases."""
    generator = torch.Generator().manual_seed(seed)
    conv2d = torch.randn(4, 3, 3, 3, generator=generator, dtype=dtype)
    conv3d = torch.randn(3, 4, 2, 2, 2, generator=generator, dtype=dtype)
    params = [
        torch.nn.Parameter(conv2d.to(memory_format=torch.channels_last)),
        torch.nn.Parameter(torch.randn(4, generator=generator, dtype=dtype)),
        torch.nn.Parameter(conv3d.to(memory_format=torch.channels_last_3d)),
        torch.nn.Parameter(torch.randn(3, generator=generator, dtype=dtype)),
    ]
    assert not params[0].is_contiguous() and not params[2].is_contiguous()
    return params


def cnn_backward(params: list[Any], step: int, scaler: Any = None) -> None:
    """The grads of a CNN's loss over a seeded batch (autograd gives them the params' layout)."""
    generator = torch.Generator().manual_seed(100 + step)
    dtype = params[0].dtype
    x = torch.randn(2, 3, 6, 6, generator=generator, dtype=dtype)
    x = x.to(memory_format=torch.channels_last)
    for p in params:
        p.grad = None
    h = torch.tanh(torch.nn.functional.conv2d(x, params[0], params[1]))  # (2, 4, 4, 4)
    h = h.unsqueeze(2).expand(2, 4, 3, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    y = torch.nn.functional.conv3d(h, params[2], params[3])
    loss = y.square().mean() + y.sin().mean()
    (loss if scaler is None else scaler.scale(loss)).backward()


def assert_layouts_match(ours: Any, theirs: Any, ours_params: list, their_params: list, dtype):
    """Params and states equal by logical index, and each state laid out as torch's (which
    is its param's)."""
    for i, (a, b) in enumerate(zip(ours_params, their_params)):
        assert a.stride() == b.stride(), f"params[{i}] strides"
        assert_close_within(a.detach(), b.detach(), dtype, f"params[{i}]")
    for i, (a, b) in enumerate(zip(ours_params, their_params)):
        mine, expected = ours.state[a], theirs.state[b]
        assert list(mine) == list(expected), i
        for key, value in expected.items():
            if torch.is_tensor(value):
                assert mine[key].stride() == value.stride(), (i, key)
                assert_close_within(mine[key], value, dtype, f"state[{i}][{key!r}]")


def assert_close_within(actual: Any, expected: Any, dtype: Any, what: str) -> None:
    actual, expected = (torch.as_tensor(x).to(torch.float64) for x in (actual, expected))
    assert actual.shape == expected.shape, what
    if actual.numel():
        error = ((actual - expected).abs() / (1 + expected.abs())).max().item()
        assert error <= LAYOUT_TOLERANCE[dtype], f"{what}: {error:.3g}"


def layout_optimizer(module: Any, name: str, params: list, **options: Any) -> Any:
    """fusedopt.torch's class or torch.optim's (foreach=False, its reference loop)."""
    kwargs = {"foreach": False} if module is torch.optim else {}
    return getattr(module, name)(params, **options, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_channels_last_cnn_trains_as_in_torch(case: tuple[str, dict], dtype: Any) -> None:
    """Conv2d and Conv3d weights in channels_last / channels_last_3d: every class steps them
    along torch.optim's trajectory, with its states laid out as torch's (the params')."""
    name, options = case
    ours_params, their_params = cnn_params(dtype), cnn_params(dtype)
    ours = layout_optimizer(ft, name, ours_params, **options)
    theirs = layout_optimizer(torch.optim, name, their_params, **options)
    for step in range(5):
        for optimizer, params in ((ours, ours_params), (theirs, their_params)):
            cnn_backward(params, step)
            optimizer.step()
    assert_layouts_match(ours, theirs, ours_params, their_params, dtype)


def test_a_channels_last_step_under_a_grad_scaler_follows_torch() -> None:
    """GradScaler hands Adam its scale (divided inside the pass, the unscaled grads written back
    in place, in the params' layout) and torch.optim's Adam is unscaled by the scaler first."""
    trained = []
    for module in (ft, torch.optim):
        params = cnn_params(torch.float32)
        optimizer = layout_optimizer(module, "Adam", params, lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(4):
            cnn_backward(params, step, scaler)
            scaler.step(optimizer)
            scaler.update()
        trained.append((optimizer, params))
    (ours, ours_params), (theirs, their_params) = trained
    assert_layouts_match(ours, theirs, ours_params, their_params, torch.float32)
    for a, b in zip(ours_params, their_params):
        assert a.grad.stride() == a.stride()
        assert_close_within(a.grad, b.grad, torch.float32, "unscaled grad")


@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
@pytest.mark.parametrize("name", ["Adam", "SGD", "Adadelta", "ASGD"])
def test_channels_last_state_dicts_interchange_mid_run(name: str, direction: str) -> None:
    """A channels_last model's state dict, saved by one and loaded by the other mid-run: the
    loaded states are laid out as the params, and training goes on along torch's trajectory."""
    options = {"lr": 0.01, **({"momentum": 0.9} if name == "SGD" else {})}
    first, second = (ft, torch.optim) if direction == "fusedopt_to_torch" else (torch.optim, ft)

    reference_params = cnn_params(torch.float64)
    reference = layout_optimizer(torch.optim, name, reference_params, **options)
    params = cnn_params(torch.float64)
    optimizer = layout_optimizer(first, name, params, **options)
    for step in range(3):
        cnn_backward(params, step)
        optimizer.step()
        cnn_backward(reference_params, step)
        reference.step()
    saved = copy.deepcopy(optimizer.state_dict())
    resumed = layout_optimizer(second, name, params, **options)
    resumed.load_state_dict(saved)
    for step in range(3, 6):
        cnn_backward(params, step)
        resumed.step()
        cnn_backward(reference_params, step)
        reference.step()
    assert_layouts_match(resumed, reference, params, reference_params, torch.float64)


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "Adagrad"])
def test_a_contiguous_checkpoint_loads_into_channels_last_params(name: str) -> None:
    """A checkpoint of a contiguous model (an older one) loaded for the same model in
    channels_last: its states are converted into the params' layout by logical index (not by
    memory order), and training goes on as torch's."""
    params = [p.detach().contiguous().requires_grad_() for p in cnn_params(torch.float64)]
    saver = getattr(torch.optim, name)(params, lr=0.01, foreach=False)
    for step in range(2):
        cnn_backward(params, step)
        saver.step()
    checkpoint = saver.state_dict()
    assert all(v.is_contiguous() for e in checkpoint["state"].values() for v in e.values())
    results = []
    for module in (ft, torch.optim):
        resumed = cnn_params(torch.float64)
        with torch.no_grad():
            for p, q in zip(resumed, params):
                p.copy_(q)
        optimizer = layout_optimizer(module, name, resumed, lr=0.01)
        optimizer.load_state_dict(copy.deepcopy(checkpoint))
        for p in resumed:
            for value in optimizer.state[p].values():
                if module is ft and value.dim():
                    assert value.stride() == p.stride(), name
        for step in range(2, 5):
            cnn_backward(resumed, step)
            optimizer.step()
        results.append((optimizer, resumed))
    (ours, ours_params), (theirs, their_params) = results
    for i, (a, b) in enumerate(zip(ours_params, their_params)):
        assert_close_within(a.detach(), b.detach(), torch.float64, f"params[{i}]")
        for key, value in theirs.state[b].items():
            assert_close_within(ours.state[a][key], value, torch.float64, f"{i}: {key}")


def test_a_grad_of_another_layout_is_read_through_a_copy_in_its_params_layout() -> None:
    """A contiguous grad for a channels_last param (torch.func's, or one set by hand) is only
    read: through a copy laid out as its param, so it walks the param's elements in order."""
    trained = []
    for module in (ft, torch.optim):
        params = cnn_params(torch.float64)
        optimizer = layout_optimizer(module, "Adam", params, lr=0.01)
        for step in range(4):
            cnn_backward(params, step)
            params[0].grad = params[0].grad.contiguous()
            params[2].grad = params[2].grad.contiguous()
            assert params[0].grad.stride() != params[0].stride()
            before = params[0].grad.clone()
            optimizer.step()
            assert torch.equal(params[0].grad, before)  # only read
        trained.append((optimizer, params))
    (ours, ours_params), (theirs, their_params) = trained
    assert_layouts_match(ours, theirs, ours_params, their_params, torch.float64)


def test_low_precision_state_of_a_channels_last_param_is_laid_out_as_it() -> None:
    """A bfloat16 channels_last param: its float32 master and 8-bit codes are laid out as the
    param, the codes one per element in its memory order, blocks of 256 consecutive elements in
    memory: the run is exactly that of a 1-D param holding its elements in memory order."""
    shape = (16, 8, 6, 6)  # 4608 elements: 8-bit state (4096 or more), 18 blocks
    trained = []
    for flat in (False, True):
        generator = torch.Generator().manual_seed(3)
        weight = torch.randn(shape, generator=generator).to(torch.bfloat16)
        weight = weight.contiguous(memory_format=torch.channels_last)
        p = torch.nn.Parameter(weight.permute(0, 2, 3, 1).reshape(-1) if flat else weight)
        optimizer = ft.Adam([p], lr=0.01, state_dtype="int8", master_weights=True)
        for _ in range(3):
            grad = torch.randn(shape, generator=generator).to(torch.bfloat16)
            grad = grad.contiguous(memory_format=torch.channels_last)
            p.grad = grad.permute(0, 2, 3, 1).reshape(-1) if flat else grad
            optimizer.step()
        state = optimizer.state[p]
        assert state["exp_avg"].dtype == torch.uint8
        for key in ("exp_avg", "exp_avg_sq", "master"):
            assert state[key].stride() == p.stride(), key
        trained.append((p, state, optimizer))
    (p, state, optimizer), (q, reference, _) = trained
    in_memory_order = p.detach().permute(0, 2, 3, 1).reshape(-1)
    assert torch.equal(in_memory_order, q.detach())
    for key in ("exp_avg", "exp_avg_sq", "master"):
        assert torch.equal(state[key].permute(0, 2, 3, 1).reshape(-1), reference[key]), key
    for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.equal(state[key], reference[key]), key
    # A state dict round trip keeps the codes exactly, in the param's layout.
    loaded = ft.Adam([p], lr=0.01, state_dtype="int8", master_weights=True)
    loaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert loaded.state[p]["exp_avg"].stride() == p.stride()
    assert torch.equal(loaded.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])


def _snapshot(optimizer: Any, params: list) -> list:
    return [p.detach().clone() for p in params] + [
        (key, value.clone())
        for p in params
        for key, value in optimizer.state.get(p, {}).items()
        if torch.is_tensor(value)
    ]


def _assert_unchanged(before: list, after: list) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        if isinstance(a, tuple):
            assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
        else:
            assert torch.equal(a, b)


def _gapped(p: Any) -> None:  # a slice with gaps, of the param's shape
    p.data = torch.zeros(*p.shape[:-1], 2 * p.shape[-1], dtype=p.dtype)[..., ::2]


def _expanded(p: Any) -> None:  # one element seen everywhere
    p.data = torch.zeros(1, dtype=p.dtype).expand(p.shape)


def _relaid(p: Any) -> None:  # p.data = p.data.contiguous(): its states are channels_last
    p.data = p.data.contiguous()


def _grad_of_other_strides(p: Any) -> None:  # under the grad scale below
    p.grad = p.grad.contiguous()


@pytest.mark.parametrize(
    ("spoil", "what"),
    [
        (_gapped, r"params\[0\] of param_groups\[1\] is not dense"),
        (_expanded, r"params\[0\] of param_groups\[1\] is not dense"),
        (_relaid, r"of params\[0\] of param_groups\[1\] is not laid out as its param"),
        (_grad_of_other_strides, r"grad of params\[0\] of param_groups\[1\] is not laid out"),
    ],
    ids=["gapped", "expanded", "relaid", "grad-under-a-grad-scale"],
)
def test_a_layout_fusedopt_cannot_stream_is_refused_naming_it(spoil: Callable, what: str) -> None:
    """A param not dense in memory (gaps, an expanded one), a param laid out anew whose states
    keep the old layout, and a grad of other strides under a grad scale (which writes it back):
    refused, naming the param and its group, with nothing written."""
    params = cnn_params(torch.float32)
    optimizer = ft.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}])
    for step in range(2):
        cnn_backward(params, step)
        optimizer.step()
    cnn_backward(params, 2)
    spoil(params[2])
    if spoil is _grad_of_other_strides:
        optimizer.grad_scale, optimizer.found_inf = torch.tensor(2.0), torch.tensor(0.0)
    before = _snapshot(optimizer, params)
    grads = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match=what):
        optimizer.step()
    _assert_unchanged(before, _snapshot(optimizer, params))
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(4, 6)[:, ::2],
        lambda: torch.zeros(4, 1).expand(4, 3),
        lambda: torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last)[:, :, :, :2],
    ],
    ids=["gaps", "expanded", "channels-last-slice"],
)
def test_a_param_not_dense_in_memory_is_refused_when_added(make: Any) -> None:
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(make())]
    with pytest.raises(ValueError, match=r"params\[1\] of param_groups\[0\] is not dense"):
        ft.Adam(params)


def test_a_square_param_transposed_in_its_memory_is_not_stepped_in_the_old_order() -> None:
    """``p.data = p.data.t()`` keeps a square param's memory and changes its layout: the cached
    plan notices (strides, not only addresses) and its states, laid out the old way, are
    refused rather than streamed in the wrong order."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = ft.Adam([p], lr=0.1)
    p.grad = torch.randn(4, 4)
    optimizer.step()
    p.data = p.data.t()
    p.grad = torch.randn(4, 4)
    before = _snapshot(optimizer, [p])
    with pytest.raises(ValueError, match=r"params\[0\] of param_groups\[0\] is not laid out"):
        optimizer.step()
    _assert_unchanged(before, _snapshot(optimizer, [p]))


def test_a_param_given_a_smaller_shape_in_its_memory_is_refused_as_torch_refuses_it() -> None:
    """``p.data = p.data[:2]`` keeps the memory's start: the plan notices the shape, not only the
    address, and the full-size grad is refused as torch.optim refuses it, nothing written."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = ft.SGD([p], lr=0.1)
    p.grad = torch.ones(4, 3)
    optimizer.step()
    p.data = p.data[:2]
    q = torch.nn.Parameter(torch.randn(4, 3))
    q.grad = torch.ones(4, 3)
    q.data = q.data[:2]
    with pytest.raises(RuntimeError):
        torch.optim.SGD([q], lr=0.1, foreach=False).step()
    before = _snapshot(optimizer, [p])
    with pytest.raises(ValueError, match=r"grad of params\[0\] of param_groups\[0\] has shape"):
        optimizer.step()
    _assert_unchanged(before, _snapshot(optimizer, [p]))


class _HundredGrad(torch.nn.Parameter):
    """A param class with a grad of its own: 100 everywhere."""

    @property
    def grad(self) -> Any:
        return torch.full(self.shape, 100.0)

    @grad.setter
    def grad(self, value: Any) -> None:
        torch.Tensor.grad.__set__(self, value)


class _HundredGetattr(torch.nn.Parameter):
    """The same through __getattribute__ (the class's grad is TensorBase's)."""

    def __getattribute__(self, name: str) -> Any:
        if name == "grad":
            return torch.full(self.shape, 100.0)
        return super().__getattribute__(name)


@pytest.mark.parametrize("late", [False, True], ids=["from-the-start", "class-assigned-later"])
@pytest.mark.parametrize("cls", [_HundredGrad, _HundredGetattr])
def test_a_param_class_s_own_grad_is_the_grad_stepped_as_in_torch(cls: type, late: bool) -> None:
    def trained(optimizer_class: type) -> list[float]:
        p = torch.nn.Parameter(torch.zeros(3)) if late else cls(torch.zeros(3))
        torch.Tensor.grad.__set__(p, torch.ones(3))
        optimizer = optimizer_class([p], lr=0.1)
        optimizer.step()
        if late:
            p.__class__ = cls
        optimizer.step()
        return p.detach().tolist()

    assert trained(ft.SGD) == trained(lambda ps, lr: torch.optim.SGD(ps, lr=lr, foreach=False))


class _NoRawAccess(torch.Tensor):
    """A grad class whose __torch_function__ refuses raw memory access (and nothing else)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.data_ptr:
            raise RuntimeError("raw memory access refused")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_grad_subclass_is_read_through_torch_s_methods_as_it_asks() -> None:
    """A grad of a torch.Tensor subclass goes through torch's Python methods (its
    __torch_function__ among them), whichever way the plan reads plain tensors."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    optimizer = ft.SGD([p], lr=0.1)
    optimizer.step()
    p.grad = torch.ones(3).as_subclass(_NoRawAccess)
    with pytest.raises(RuntimeError, match="raw memory access refused"):
        optimizer.step()
    assert p.detach().tolist() == pytest.approx([-0.1] * 3)


# ---------------------------------------------------- the plans made for CUDA tensors
# On the emulated GPU everywhere, on a GPU where there is one. (A parameter named other than
# "device" where a test emulates the GPU itself, after its CPU run.)
GPU_DEVICES = [
    pytest.param("emulated", marks=needs_emulation),
    pytest.param("cuda", marks=needs_cuda),
]


def fresh_grads(params: list[Any], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_a_gpu_plan_is_made_once_and_steps_new_grads_at_every_step(device: str) -> None:
    """Registered once (issue 12): steps over new grad tensors each time reuse the plan, whose
    tables stay on the device, and follow torch.optim."""
    params = model_params(torch.float32, device=device)
    reference = model_params(torch.float32, device=device)
    ours = ft.Adam(params, lr=0.01, weight_decay=0.1)
    theirs = torch.optim.Adam(reference, lr=0.01, weight_decay=0.1, foreach=False)
    plans = []
    for step in range(4):
        fresh_grads(params, step)
        fresh_grads(reference, step)
        ours.step()
        theirs.step()
        ((_, plan, _, _),) = ours._plans.values()
        plans.append(plan)
    assert isinstance(plans[0], ft._DevicePlan)
    assert all(plan is plans[0] for plan in plans) and plans[0].steps_taken == 4
    compare(ours, theirs, params, reference, torch.float32)


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)), ("AdamW", dict(lr=0.01)),
     ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)), ("RMSprop", dict(centered=True)),
     ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.5)), ("Rprop", {})],
)  # fmt: skip
def test_complex_params_on_a_gpu_follow_torch_optim(device: str, name: str, kwargs: dict) -> None:
    """complex64 params on the GPU, read as the real pairs torch.optim's view_as_real steps, in
    the GPU plan (with a param without a grad on some steps), as torch.optim on the same device;
    the states complex as torch's."""
    generator = torch.Generator().manual_seed(4)
    made = [torch.randn(s, generator=generator, dtype=torch.complex64) for s in [(5, 7), (33,)]]
    params = [torch.nn.Parameter(p.to(on(device), copy=True)) for p in made]
    reference = [torch.nn.Parameter(p.to(on(device), copy=True)) for p in made]
    ours = getattr(ft, name)(params, **kwargs)
    theirs = getattr(torch.optim, name)(reference, foreach=False, **kwargs)
    for step in range(5):
        for group in (params, reference):
            for p, g in zip(group, grads_for(step, group)):
                p.grad = g
        ours.step()
        theirs.step()
    ((_, plan, _, _),) = ours._plans.values()
    assert isinstance(plan, ft._DevicePlan)
    assert all(v.dtype == torch.complex64 for s in ours.state.values() for k, v in s.items()
               if k != "step")  # fmt: skip
    compare(ours, theirs, params, reference, torch.float32)


def _grad_of_float64(params: list) -> None:
    params[2].grad.data = params[2].grad.data.double()


def _grad_of_fewer_elements(params: list) -> None:
    params[0].grad.data = params[0].grad.data[:2]


def _grad_is_its_param(params: list) -> None:
    params[2].grad = params[2].detach()


def _grad_of_a_state(params: list, optimizer: Any) -> None:
    params[2].grad = optimizer.state[params[2]]["exp_avg"]


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize(
    "spoil, error, expected",
    [
        (_grad_of_float64, TypeError, r"params\[2\] of param_groups\[0\].*dtype"),
        (_grad_of_fewer_elements, ValueError, r"params\[0\] of param_groups\[0\].*shape"),
        (_grad_is_its_param, ValueError, r"params\[2\] of param_groups\[0\].*overlaps"),
        (_grad_of_a_state, ValueError, r"params\[2\] of param_groups\[0\].*overlaps"),
    ],
    ids=["float64", "fewer-elements", "its-param", "a-state"],
)
def test_a_bad_grad_on_a_gpu_plan_is_refused_naming_it_with_nothing_modified(
    device: str, spoil: Callable, error: type, expected: str
) -> None:
    params = model_params(torch.float32, device=device)
    optimizer = ft.Adam(params, lr=0.1)
    fresh_grads(params, 0)
    optimizer.step()
    fresh_grads(params, 1)
    if spoil is _grad_of_a_state:
        spoil(params, optimizer)
    else:
        spoil(params)
    snapshot = Snapshot(optimizer, params)
    with pytest.raises(error, match=expected):
        optimizer.step()
    snapshot.assert_unchanged()


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_a_gpu_plan_follows_a_state_given_other_memory_and_a_param_losing_its_grad(
    device: str,
) -> None:
    """A state whose memory moved in place (``.data =``, ``resize_``) is registered anew, never
    written through its old address; a param without a grad is skipped, the others stepped
    (one launch of theirs, the plan kept)."""
    params = model_params(torch.float64, device=device)
    reference = model_params(torch.float64, device=device)
    ours = ft.Adam(params, lr=0.1)
    theirs = torch.optim.Adam(reference, lr=0.1, foreach=False)
    plans = []
    for step in range(6):
        for group in (params, reference):
            fresh_grads(group, step)
            if step == 4:
                group[1].grad = None
        if step == 2:
            state = ours.state[params[0]]["exp_avg"]
            old = state.data
            state.data = old.clone()
            frozen = old.clone()
        if step == 3:
            state = ours.state[params[4]]["exp_avg_sq"]
            values = state.clone()
            state.resize_(64).resize_(values.shape).copy_(values)  # other memory, same values
        ours.step()
        theirs.step()
        plans.append(next(iter(ours._plans.values()))[1])
        if step == 2:
            assert torch.equal(old, frozen)  # the replaced memory is left alone
    assert plans[1] is plans[0] and plans[2] is not plans[1] and plans[3] is not plans[2]
    assert plans[4] is plans[3] and plans[5] is plans[3]  # the grad of None: skipped
    compare(ours, theirs, params, reference, torch.float64)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_a_gpu_step_where_no_param_has_a_grad_changes_nothing(device: str) -> None:
    params = model_params(torch.float32, device=device)
    ours = ft.Adam(params, lr=0.1)
    fresh_grads(params, 0)
    ours.step()
    ((_, plan, _, _),) = ours._plans.values()
    before = [p.detach().clone() for p in params]
    steps = [float(ours.state[p]["step"]) for p in params]
    for p in params:
        p.grad = None
    ours.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert [float(ours.state[p]["step"]) for p in params] == steps
    fresh_grads(params, 1)
    ours.step()
    assert next(iter(ours._plans.values()))[1] is plan  # kept through it
    assert [float(ours.state[p]["step"]) for p in params] == [s + 1 for s in steps]


@needs_emulation
def test_a_gpu_plan_never_reads_its_8_bit_scales_on_the_host(monkeypatch: Any) -> None:
    """An 8-bit state's scales are device memory on a GPU: a GPU plan does not check them before
    a step as the CPU's does (a host read of device memory would crash). On the emulated GPU,
    whose memory the host could read, a NaN scale goes through unread, where the CPU refuses."""
    plans = {}
    for where in ("cpu", "emulated"):
        if where == "emulated":
            emulate_gpu_plans(monkeypatch)
        params = [torch.nn.Parameter(torch.ones(5000))]
        optimizer = ft.Adam(params, lr=0.1, state_dtype="int8")
        fresh_grads(params, 0)
        optimizer.step()
        optimizer.state[params[0]]["exp_avg_absmax"][0] = float("nan")
        fresh_grads(params, 1)
        if where == "cpu":
            with pytest.raises(ValueError, match="exp_avg_absmax"):
                optimizer.step()
        else:
            optimizer.step()
        plans[where] = next(iter(optimizer._plans.values()))[1]
    assert isinstance(plans["emulated"], ft._DevicePlan)


@needs_emulation
def test_a_launcher_of_another_algorithm_is_refused() -> None:
    import fusedopt._cuda_emulated as emulated

    params = [torch.ones(3)]
    options = [native_options("sgd", lr=0.1)]
    arguments = (options, [0], params, [True], [None], [], None, None)
    fusedopt._core.TorchPlan("sgd", *arguments, launcher=emulated.Launcher("sgd", 0))
    with pytest.raises(TypeError, match="launcher is not of this build's sgd"):
        fusedopt._core.TorchPlan("sgd", *arguments, launcher=emulated.Launcher("adam", 0))


@pytest.mark.parametrize("gpu", GPU_DEVICES)
@pytest.mark.parametrize(
    "name, precision",
    [
        ("AdamW", dict(master_weights=True)),
        ("AdamW", dict(master_weights=True, state_dtype="int8", stochastic_rounding=True, seed=3)),
        ("SGD", dict(stochastic_rounding=True, seed=5)),
        ("RMSprop", dict(state_dtype="int8")),
        ("Adagrad", dict(master_weights=True, state_dtype="int8")),
    ],
    ids=["master", "master-int8-sr", "sgd-sr", "rmsprop-int8", "adagrad-master-int8"],
)
def test_low_precision_on_the_gpu_is_the_cpu_s_bit_for_bit(
    name: str, precision: dict, gpu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 params on the GPU (csrc/cuda/staged.cuh) with masters, 8-bit state and
    stochastic rounding take the CPU's steps exactly: params and every state after a few steps,
    a checkpoint saved on the GPU loading on the CPU."""
    generator = torch.Generator().manual_seed(4)
    shapes = [(64, 80), (300,), (5000,), (3,)]
    host = [torch.randn(s, generator=generator).to(torch.bfloat16) for s in shapes]
    grads = [[torch.randn(s, generator=generator).to(torch.bfloat16) for s in shapes]]
    grads *= 4  # the same values at each step, in new tensors (their addresses change)
    options = dict(lr=0.01, momentum=0.9) if name in ("SGD", "RMSprop") else dict(lr=0.01)

    def steps(params: list, optimizer: Any, which: range) -> None:
        for k in which:
            for p, g in zip(params, grads[k]):
                p.grad = g.to(p.device, copy=True)
            optimizer.step()

    cpu_params = [torch.nn.Parameter(t.clone()) for t in host]
    cpu = getattr(ft, name)(cpu_params, **options, **precision)
    steps(cpu_params, cpu, range(3))
    if gpu == "emulated":
        emulate_gpu_plans(monkeypatch)
    gpu_params = [torch.nn.Parameter(t.clone().to(on(gpu))) for t in host]
    on_gpu = getattr(ft, name)(gpu_params, **options, **precision)
    steps(gpu_params, on_gpu, range(3))
    assert isinstance(next(iter(on_gpu._plans.values()))[1], ft._DevicePlan)
    if gpu == "cuda":
        torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(cpu_params, gpu_params)):
        assert torch.equal(a.detach().view(torch.int16), b.detach().cpu().view(torch.int16)), i
    for a, b in zip(cpu_params, gpu_params):
        for key, value in cpu.state[a].items():
            got = on_gpu.state[b][key]
            assert got.dtype == value.dtype and got.shape == value.shape, key
            assert got.device.type == ("cpu" if key == "step" else on(gpu)), key
            flat = value.reshape(-1).view(torch.uint8)  # the bits (a step count is 0-d)
            assert torch.equal(flat, got.cpu().reshape(-1).view(torch.uint8)), key
    restored_params = [torch.nn.Parameter(p.detach().cpu()) for p in gpu_params]
    restored = getattr(ft, name)(restored_params, **options, **precision)
    restored.load_state_dict(on_gpu.state_dict())
    steps(restored_params, restored, range(3, 4))
    steps(gpu_params, on_gpu, range(3, 4))
    for i, (a, b) in enumerate(zip(restored_params, gpu_params)):
        assert torch.equal(a.detach().view(torch.int16), b.detach().cpu().view(torch.int16)), i


@needs_cuda
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_a_checkpoint_of_torch_s_fused_cuda_optimizer_resumes_with_host_step_counts(
    name: str,
) -> None:
    """torch's fused (and capturable) optimizers keep their step counts on the params' device,
    and torch's load puts them there; fusedopt keeps them in host memory, as torch's others do,
    and continues torch's trajectory."""
    options = {"momentum": 0.9} if name == "SGD" else {}
    params = model_params(torch.float32, device="cuda")
    reference = model_params(torch.float32, device="cuda")
    saver = getattr(torch.optim, name)(params, lr=0.01, fused=True, **options)
    theirs = getattr(torch.optim, name)(reference, lr=0.01, fused=True, **options)
    run(saver, params, range(3))
    run(theirs, reference, range(6))
    ours = getattr(ft, name)(params, lr=0.01, fused=True, **options)
    ours.load_state_dict(saver.state_dict())
    run(ours, params, range(3, 6))
    for p in params:
        assert "step" not in ours.state[p] or ours.state[p]["step"].device.type == "cpu"
    for i, (a, b) in enumerate(zip(params, reference)):
        assert_close(a.detach(), b.detach(), torch.float32, f"params[{i}]")
