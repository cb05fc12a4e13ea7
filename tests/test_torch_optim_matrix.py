"""torch's own optimizer test matrix, run against fusedopt.torch.

PyTorch's optimizer tests (test/test_optim.py) draw their option combinations from the
``optim_inputs_func_<name>`` functions of ``torch/testing/_internal/common_optimizers.py`` (as
torch 2.13.0 installs it; the module imports ``expecttest``, a test-only package, so its lists
are transcribed: each CPU list here is torch 2.13's, in its order, compared once with the module
loaded beside a stand-in). ``CPU_INPUTS`` transcribes each function's CPU list (kwargs and
``desc``), ``CUDA_ONLY_INPUTS`` its ``cuda_supported_configs`` (every one sets
``capturable=True``), and ``IMPLS`` the ``supported_impls`` of its ``OptimizerInfo`` (``fused``
only where ``supports_fused_on`` names the CPU). As
``_get_optim_inputs_including_global_cliquey_kwargs`` does, every input runs with those flags
all False and once with each one True.

For every combination, in float32 and float64, the same params (a 0-d one, an empty one, one of
more than 16 elements) run 20 steps with changing grads and a StepLR schedule under
``torch.optim`` (``foreach=False``) and ``fusedopt.torch`` side by side, and the params and the
state dicts (state keys, dtypes and values; the param groups) must agree within the project's
targets. A torch.optim state dict loaded into fusedopt.torch mid-run must continue torch's
trajectory. ``torch.tensor`` learning rates, as torch's ``test_tensor_lr`` makes them from every
input, run too.

What fusedopt does not do is refused, as README.md says ("Accepted and ignored: foreach, fused.
Refused: differentiable=True, capturable=True"): the refusal must be a ValueError naming the flag.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import fusedopt.torch as ft  # noqa: E402

STEPS = 20
RESUME_AT = 10
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}  # relative to 1 + |x|
DTYPES = [torch.float32, torch.float64]
SHAPES = [(5, 7), (33,), (), (0,), (4, 4)]


def _tensor_lr() -> Any:
    return torch.tensor(0.001)


# optim_inputs_func_<name>(device="cpu"): (desc, kwargs), in torch's order.
CPU_INPUTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "Adadelta": [
        ("default", {}),
        ("non-default lr", {"lr": 0.01}),
        ("nonzero weight_decay", {"weight_decay": 0.1}),
        ("maximize", {"maximize": True}),
        ("maximize, weight_decay", {"weight_decay": 0.1, "maximize": True}),
        ("rho", {"rho": 0.95, "weight_decay": 0.9}),
    ],
    "Adagrad": [
        ("default", {}),
        ("nonzero weight_decay", {"weight_decay": 0.1}),
        ("maximize", {"weight_decay": 0.1, "maximize": True}),
        ("non-default lr", {"lr": 0.1}),
        ("initial_accumulator_value", {"initial_accumulator_value": 0.1, "weight_decay": 0.1}),
        ("lr_decay", {"lr": 0.1, "lr_decay": 0.5, "weight_decay": 0.1}),
        ("Tensor lr", {"lr": _tensor_lr}),
    ],
    "Adam": [
        ("default", {}),
        ("non-default lr", {"lr": 0.01}),
        ("nonzero weight_decay", {"weight_decay": 0.1}),
        ("maximize", {"weight_decay": 0.1, "maximize": True}),
        ("amsgrad", {"weight_decay": 0.1, "amsgrad": True}),
    ],
    "Adamax": [
        ("default", {}),
        ("non-default lr", {"lr": 0.1}),
        ("nonzero weight_decay", {"weight_decay": 0.1}),
        ("maximize", {"maximize": True}),
        ("maximize, weight_decay", {"weight_decay": 0.1, "maximize": True}),
    ],
    "ASGD": [
        ("default", {}),
        ("non-default lambd", {"lambd": 0.1}),
        ("non-default lr", {"lr": 0.02}),
        ("t0", {"t0": 100}),
        ("maximize", {"maximize": True}),
        ("nonzero weight_decay", {"weight_decay": 0.1}),
        ("maximize, nonzero weight_decay", {"weight_decay": 0.1, "maximize": True}),
    ],
    "NAdam": [
        ("default", {}),
        ("non-default lr", {"lr": 1e-3}),
        ("non-zero momentum_decay", {"momentum_decay": 6e-3}),
        ("weight_decay", {"weight_decay": 0.1}),
        ("weight_decay, momentum_decay", {"weight_decay": 0.1, "momentum_decay": 6e-3}),
        (
            "decoupled_weight_decay",
            {"weight_decay": 0.1, "momentum_decay": 6e-3, "decoupled_weight_decay": True},
        ),
        ("maximize", {"weight_decay": 0.1, "maximize": True}),
    ],
    "RAdam": [
        ("default", {}),
        ("non-default lr", {"lr": 2e-3}),
        ("non-default eps", {"eps": 1e-6}),
        ("nonzero weight_decay", {"weight_decay": 0.1}),
        ("decoupled_weight_decay", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
        ("maximize", {"weight_decay": 0.1, "maximize": True}),
    ],
    "RMSprop": [
        ("default", {}),
        ("non-default lr", {"lr": 1e-3}),
        ("nonzero weight_decay", {"weight_decay": 0.1}),
        ("maximize", {"maximize": True}),
        ("centered", {"weight_decay": 0.1, "centered": True}),
        ("maximize, weight_decay", {"maximize": True, "weight_decay": 0.1}),
        ("momentum", {"weight_decay": 0.1, "centered": True, "momentum": 0.1}),
        (
            "maximize, centered, weight_decay, w/ momentum",
            {"weight_decay": 0.1, "centered": True, "momentum": 0.1, "maximize": True},
        ),
    ],
    "Rprop": [
        ("default", {}),
        ("non-default lr", {"lr": 2e-4}),
        ("non-default etas", {"etas": (0.5, 1.5)}),
        ("non-default step_sizes", {"step_sizes": (2e-6, 100)}),
        ("maximize", {"maximize": True}),
    ],
    "SGD": [
        ("default", {}),
        ("non-default lr", {"lr": 1e-2}),
        ("tensor lr", {"lr": _tensor_lr}),
        ("non-zero weight_decay", {"weight_decay": 0.5}),
        ("momentum", {"momentum": 0.9}),
        ("maximize", {"weight_decay": 0.1, "maximize": True}),
        ("dampening", {"momentum": 0.9, "dampening": 0.5}),
        ("weight_decay w/ momentum", {"momentum": 0.9, "weight_decay": 0.1}),
        ("nesterov", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ],
}
CPU_INPUTS["AdamW"] = CPU_INPUTS["Adam"]  # optim_inputs_func_adamw returns Adam's

# The cuda_supported_configs of the same functions: capturable, which fusedopt refuses.
CUDA_ONLY_INPUTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "Adadelta": [
        ("capturable", {"capturable": True}),
        ("capturable with weight decay", {"weight_decay": 0.1, "capturable": True}),
        ("Tensor lr with capturable", {"lr": _tensor_lr, "capturable": True}),
    ],
    "Adam": [
        ("capturable", {"capturable": True}),
        ("capturable, amsgrad", {"weight_decay": 0.1, "amsgrad": True, "capturable": True}),
        (
            "Tensor lr with capturable and amsgrad",
            {"lr": _tensor_lr, "amsgrad": True, "capturable": True},
        ),
    ],
    "Adamax": [
        ("capturable", {"capturable": True}),
        (
            "capturable, maximize, weight_decay",
            {"weight_decay": 0.9, "maximize": True, "capturable": True},
        ),
        ("capturable, maximize", {"weight_decay": 0, "maximize": True, "capturable": True}),
        (
            "capturable, weight_decay",
            {"weight_decay": 0.9, "maximize": False, "capturable": True},
        ),
        (
            "capturable, weight_decay, tensor LR",
            {"lr": _tensor_lr, "weight_decay": 0.9, "maximize": False, "capturable": True},
        ),
    ],
    "ASGD": [
        ("capturable", {"capturable": True}),
        ("maximize, capturable", {"maximize": True, "capturable": True}),
        ("weight_decay, capturable", {"weight_decay": 0.1, "capturable": True}),
        (
            "maximize, weight_decay, capturable",
            {"weight_decay": 0.1, "maximize": True, "capturable": True},
        ),
        (
            "maximize, weight_decay, capturable, tensor LR",
            {"lr": _tensor_lr, "weight_decay": 0.1, "maximize": True, "capturable": True},
        ),
    ],
    "NAdam": [
        ("capturable", {"capturable": True}),
        (
            "weight_decay, capturable",
            {"weight_decay": 0.9, "momentum_decay": 6e-3, "capturable": True},
        ),
        (
            "decoupled_weight_decay, capturable",
            {
                "weight_decay": 0.9,
                "momentum_decay": 6e-3,
                "decoupled_weight_decay": True,
                "capturable": True,
            },
        ),
        (
            "decoupled_weight_decay, capturable",  # torch's desc; this one has a tensor lr
            {
                "lr": _tensor_lr,
                "weight_decay": 0.9,
                "momentum_decay": 6e-3,
                "decoupled_weight_decay": True,
                "capturable": True,
            },
        ),
    ],
    "RAdam": [
        ("capturable", {"capturable": True}),
        ("capturable, weight_decay", {"capturable": True, "weight_decay": 0.1}),
        (
            "capturable, weight_decay, decoupled_weight_decay",
            {"capturable": True, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ),
        (
            "capturable, weight_decay, decoupled_weight_decay, tensor LR",
            {
                "lr": _tensor_lr,
                "capturable": True,
                "weight_decay": 0.1,
                "decoupled_weight_decay": True,
            },
        ),
    ],
    "RMSprop": [
        ("capturable", {"capturable": True}),
        ("capturable, maximize", {"weight_decay": 0.1, "maximize": True, "capturable": True}),
        ("Tensor lr with capturable", {"lr": _tensor_lr, "capturable": True}),
    ],
    "Rprop": [
        ("capturable", {"capturable": True}),
        ("Tensor lr with capturable", {"lr": _tensor_lr, "capturable": True}),
    ],
    "Adagrad": [],
    "SGD": [],
}
CUDA_ONLY_INPUTS["AdamW"] = CUDA_ONLY_INPUTS["Adam"]

# OptimizerInfo.supported_impls, "fused" kept where supports_fused_on has "cpu".
IMPLS = {name: ("foreach", "differentiable") for name in CPU_INPUTS}
for _name in ("Adagrad", "Adam", "AdamW", "SGD"):
    IMPLS[_name] = ("foreach", "differentiable", "fused")

REFUSED = (
    "differentiable",
    "capturable",
)  # README: "Refused: differentiable=True, capturable=True"


def _tensor_of(lr: float, dtype: Any) -> Any:
    return lambda: torch.tensor(lr, dtype=dtype)


def _combinations(inputs: dict[str, list]) -> list[tuple[str, str, dict[str, Any]]]:
    """(optimizer, desc, kwargs) for every input, its flags all False, then each one True."""
    combinations = []
    for name, entries in inputs.items():
        for desc, kwargs in entries:
            base = {**kwargs, **dict.fromkeys(IMPLS[name], False)}
            combinations.append((name, desc, base))
            for flag in IMPLS[name]:
                combinations.append((name, f"{desc} & {flag}", {**base, flag: True}))
    return combinations


ALL = _combinations(CPU_INPUTS) + _combinations(CUDA_ONLY_INPUTS)
SUPPORTED = [c for c in ALL if not any(c[2].get(flag) for flag in REFUSED)]
REFUSALS = [c for c in ALL if any(c[2].get(flag) for flag in REFUSED)]
# torch's test_tensor_lr: every CPU input (its flags False) again with its lr as a tensor (1e-3
# where the input sets none, as test_tensor_lr does), of torch's default dtype (float32) and of
# float64.
TENSOR_LR = [
    (name, f"{desc} (tensor lr {str(lr_dtype)[6:]})", {**kwargs, "lr": _tensor_of(lr, lr_dtype)})
    for name, desc, kwargs in _combinations(CPU_INPUTS)
    if " & " not in desc and not callable(kwargs.get("lr"))
    for lr in [kwargs.get("lr", 1e-3)]
    for lr_dtype in (torch.float32, torch.float64)
]


def combination_id(combination: tuple[str, str, dict]) -> str:
    return f"{combination[0]}-{combination[1]}"


def build(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs with a fresh tensor wherever a tensor lr is asked for (each optimizer its own,
    as a scheduler changes it in place)."""
    return {k: v() if callable(v) else v for k, v in kwargs.items()}


def model_params(dtype: Any) -> list[Any]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in SHAPES]


def set_grads(step: int, params: list[Any]) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        # A grad that changes sign, size and, on some steps, is exactly zero or missing.
        p.grad = None if (i == 1 and step % 7 == 3) else grad * (1 + step % 4) * (step % 5 != 2)


def scheduler_for(optimizer: Any) -> Any:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)


def run(optimizer: Any, scheduler: Any, params: list[Any], steps: range) -> None:
    for step in steps:
        set_grads(step, params)
        optimizer.step()
        scheduler.step()


def as_real(x: Any) -> Any:
    """A complex tensor as torch.optim steps it (torch.view_as_real), anything else as it is."""
    return torch.view_as_real(x) if torch.is_tensor(x) and x.is_complex() else x


def assert_close(actual: Any, expected: Any, dtype: Any, what: str) -> None:
    actual, expected = (as_real(torch.as_tensor(x)).to(torch.float64) for x in (actual, expected))
    assert actual.shape == expected.shape, what
    if actual.numel() == 0:
        return
    error = ((actual - expected).abs() / (1 + expected.abs())).max().item()
    assert error <= TOLERANCE[dtype], f"{what}: {error:.3g}"


def compare(
    ours: Any, theirs: Any, ours_params: list, their_params: list, dtype: Any, given: dict
) -> None:
    """Params and state dicts alike; the groups hold the ``given`` foreach / fused (the
    reference's are its own)."""
    for i, (a, b) in enumerate(zip(ours_params, their_params)):
        assert_close(a.detach(), b.detach(), dtype, f"params[{i}]")
    mine, expected = ours.state_dict(), theirs.state_dict()
    assert mine["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert list(mine["state"][index]) == list(entry), index  # torch's keys, in its order
        for key, value in entry.items():
            got = mine["state"][index][key]
            if torch.is_tensor(value):
                assert torch.is_tensor(got) and got.dtype == value.dtype, (index, key)
                assert got.shape == value.shape, (index, key)
                assert_close(got, value, dtype, f"state[{index}][{key!r}]")
            else:
                assert got == value, (index, key)
    assert len(mine["param_groups"]) == len(expected["param_groups"])
    for group, reference in zip(mine["param_groups"], expected["param_groups"]):
        assert group.keys() == reference.keys()
        for key, value in reference.items():
            if key in ("foreach", "fused"):
                value = given.get(key, value)
            if torch.is_tensor(value):
                assert torch.is_tensor(group[key]) and group[key].dtype == value.dtype, key
                assert_close(group[key], value, torch.float64, f"param_groups[{key!r}]")
            else:
                assert group[key] == value, key


def precision(name: str, kwargs: dict[str, Any], dtype: Any, loaded: bool) -> Any:
    """The dtype whose target the comparison meets. README.md (fusedopt.torch, "A tensor lr"):
    fusedopt reads a tensor lr as its value and computes as for that float lr, while torch computes
    some lr-derived values as tensors of the lr's dtype (Adam's ``lr / bias_correction1``, ASGD's
    ``eta``...). A float32 lr on float64 params, and ASGD's eta once a checkpoint made it a
    float64 state (fusedopt rounds it to float32 as for a float lr), agree to float32's target."""
    lr = build(kwargs).get("lr")
    if not torch.is_tensor(lr) or dtype == torch.float32:
        return dtype
    if lr.dtype == torch.float32 or (name == "ASGD" and loaded):
        return torch.float32
    return dtype


def torch_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The reference: torch.optim's for-loop (foreach=False, fused off) with the same options."""
    reference = {k: v for k, v in build(kwargs).items() if k not in ("foreach", "fused")}
    return {**reference, "foreach": False}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("combination", SUPPORTED + TENSOR_LR, ids=combination_id)
def test_trajectory_and_state_dict_match_torch_optim(combination: tuple, dtype: Any) -> None:
    name, _, kwargs = combination
    ours_params, their_params = model_params(dtype), model_params(dtype)
    ours = getattr(ft, name)(ours_params, **build(kwargs))
    theirs = getattr(torch.optim, name)(their_params, **torch_kwargs(kwargs))
    run(ours, scheduler_for(ours), ours_params, range(STEPS))
    run(theirs, scheduler_for(theirs), their_params, range(STEPS))
    tolerance = precision(name, kwargs, dtype, loaded=False)
    compare(ours, theirs, ours_params, their_params, tolerance, kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("combination", SUPPORTED + TENSOR_LR, ids=combination_id)
def test_torch_state_dict_loads_mid_run(combination: tuple, dtype: Any) -> None:
    """torch.optim runs RESUME_AT steps and is checkpointed (optimizer and scheduler); the
    checkpoint loaded into fusedopt.torch must continue as it does loaded into torch.optim (whose
    load_state_dict casts every state but ``step`` to the param's dtype)."""
    name, _, kwargs = combination
    params = model_params(dtype)
    first = getattr(torch.optim, name)(params, **torch_kwargs(kwargs))
    first_scheduler = scheduler_for(first)
    run(first, first_scheduler, params, range(RESUME_AT))
    checkpoint = copy.deepcopy((first.state_dict(), first_scheduler.state_dict()))
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]

    ours = getattr(ft, name)(params, **build(kwargs))
    theirs = getattr(torch.optim, name)(reference_params, **torch_kwargs(kwargs))
    for optimizer, resumed_params in ((ours, params), (theirs, reference_params)):
        optimizer.load_state_dict(copy.deepcopy(checkpoint[0]))
        scheduler = scheduler_for(optimizer)
        scheduler.load_state_dict(checkpoint[1])
        run(optimizer, scheduler, resumed_params, range(RESUME_AT, STEPS))
    tolerance = precision(name, kwargs, dtype, loaded=True)
    compare(ours, theirs, params, reference_params, tolerance, {})  # the checkpoint's groups


@pytest.mark.parametrize("combination", REFUSALS, ids=combination_id)
def test_unsupported_modes_are_refused_naming_the_flag(combination: tuple) -> None:
    name, _, kwargs = combination
    flag = next(flag for flag in REFUSED if kwargs.get(flag))
    params = model_params(torch.float32)
    with pytest.raises(ValueError, match=rf"{flag}=True is not supported"):
        getattr(ft, name)(params, **build(kwargs))


def test_the_matrix_covers_every_optimizer() -> None:
    names = {name for name in ft.__all__ if name != "Optimizer" and hasattr(torch.optim, name)}
    assert names == set(CPU_INPUTS) == set(CUDA_ONLY_INPUTS) == set(IMPLS)


# ---------------------------------------------------------------------------- complex params
# torch's test_complex and test_complex_2d (test/test_optim.py) step complex params, a real one
# among them, with every input's flags False (fused left out: torch's fused kernels take no
# complex). torch.optim steps a complex param as its torch.view_as_real: two independent real
# numbers per element (Adagrad's sums and Rprop's step sizes start with the value in both parts).
COMPLEX_INPUTS = [c for c in _combinations(CPU_INPUTS) if " & " not in c[1]]
COMPLEX_DTYPES = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def complex_params(dtype: Any) -> list[Any]:
    """Complex params of the matrix's shapes and a channels_last one, and a real one."""
    generator = torch.Generator().manual_seed(0)
    made = [torch.randn(s, generator=generator, dtype=dtype) for s in SHAPES]
    made.append(
        torch.randn(2, 3, 4, 5, generator=generator, dtype=dtype).to(
            memory_format=torch.channels_last
        )
    )
    made.append(torch.randn(10, 5, generator=generator, dtype=COMPLEX_DTYPES[dtype]))
    return [torch.nn.Parameter(p) for p in made]


@pytest.mark.usefixtures("tensor_reading")  # through the shim and torch's methods
@pytest.mark.parametrize("dtype", list(COMPLEX_DTYPES), ids=["complex64", "complex128"])
@pytest.mark.parametrize("combination", COMPLEX_INPUTS, ids=combination_id)
def test_complex_params_follow_torch_optim(combination: tuple, dtype: Any) -> None:
    """Trajectory and state dict as torch.optim's, then a torch checkpoint taken mid-run loaded
    into both continues alike."""
    name, _, kwargs = combination
    ours_params, their_params = complex_params(dtype), complex_params(dtype)
    ours = getattr(ft, name)(ours_params, **build(kwargs))
    theirs = getattr(torch.optim, name)(their_params, **torch_kwargs(kwargs))
    their_scheduler = scheduler_for(theirs)
    run(ours, scheduler_for(ours), ours_params, range(RESUME_AT))
    run(theirs, their_scheduler, their_params, range(RESUME_AT))
    tolerance = precision(name, kwargs, COMPLEX_DTYPES[dtype], loaded=False)
    compare(ours, theirs, ours_params, their_params, tolerance, kwargs)
    assert all(
        ours.state[p][key].dtype == dtype
        for p in ours_params
        if p.is_complex() and p in ours.state
        for key in ours.state[p]
        if key != "step" and ours.state[p][key].dim() > 0
    )
    # Both resumed from torch's checkpoint (whose load casts a real param's states to its dtype).
    checkpoint = copy.deepcopy((theirs.state_dict(), their_scheduler.state_dict()))
    with torch.no_grad():
        for p, q in zip(ours_params, their_params):
            p.copy_(q)
    resumed = [
        getattr(ft, name)(ours_params, **build(kwargs)),
        getattr(torch.optim, name)(their_params, **torch_kwargs(kwargs)),
    ]
    for optimizer, params in zip(resumed, (ours_params, their_params)):
        optimizer.load_state_dict(copy.deepcopy(checkpoint[0]))
        scheduler = scheduler_for(optimizer)
        scheduler.load_state_dict(checkpoint[1])
        run(optimizer, scheduler, params, range(RESUME_AT, STEPS))
    tolerance = precision(name, kwargs, COMPLEX_DTYPES[dtype], loaded=True)
    compare(*resumed, ours_params, their_params, tolerance, {})


# (tests/test_torch.py steps complex params on the emulated GPU and on a GPU.)
@pytest.mark.usefixtures("tensor_reading")  # through the shim and torch's methods
@pytest.mark.parametrize("combination", COMPLEX_INPUTS, ids=combination_id)
def test_a_complex_param_steps_exactly_as_its_real_view(combination: tuple) -> None:
    """As torch's test_complex asserts of torch.optim: the same optimizer over each complex param
    and over its torch.view_as_real (a float param of shape (..., 2)), given the grads' real
    views, gives the same values, bit for bit."""
    name, _, kwargs = combination
    complex_ = complex_params(torch.complex64)
    real = [torch.nn.Parameter(as_real(p.detach()).clone()) for p in complex_]
    stepped = getattr(ft, name)(complex_, **build(kwargs)), getattr(ft, name)(real, **build(kwargs))
    for step in range(STEPS):
        set_grads(step, complex_)
        for c, r in zip(complex_, real):
            r.grad = None if c.grad is None else as_real(c.grad).clone()
        for optimizer in stepped:
            optimizer.step()
        for i, (c, r) in enumerate(zip(complex_, real)):
            assert torch.equal(as_real(c.detach()), r.detach()), (step, i)


@pytest.mark.parametrize(
    "option", [{"state_dtype": "bfloat16"}, {"master_weights": True}, {"stochastic_rounding": True}]
)
def test_low_precision_options_refuse_complex_params(option: dict[str, Any]) -> None:
    """Refused naming the param (it said which options, not which param)."""
    params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    params.append(torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64)))
    with pytest.raises(ValueError, match=r"params\[1\] of param_groups\[0\] is torch.complex64"):
        ft.Adam(params, **option)
    optimizer = ft.Adam(params[:1], **option)
    with pytest.raises(ValueError, match=r"params\[0\] of param_groups\[1\] is torch.complex64"):
        optimizer.add_param_group({"params": params[1:]})
    assert len(optimizer.param_groups) == 1


def test_a_complex_param_put_into_a_group_under_low_precision_options_is_refused() -> None:
    """Past the constructor's and add_param_group's checks (a group's list edited in place): the
    step refuses it, saying why, with nothing written and no state kept."""
    params = [torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))]
    optimizer = ft.Adam(params, master_weights=True)
    complex_param = torch.nn.Parameter(torch.ones(8, dtype=torch.complex64))
    optimizer.param_groups[0]["params"].append(complex_param)
    for p in (params[0], complex_param):
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in (params[0], complex_param)]
    with pytest.raises(ValueError, match="do not apply to complex params"):
        optimizer.step()
    for p, b in zip((params[0], complex_param), before):
        assert torch.equal(p.detach(), b)
    assert complex_param not in optimizer.state
