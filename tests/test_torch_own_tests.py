"""PyTorch's own optimizer tests, run against fusedopt.torch.

Transcribed from ``test/test_optim.py`` (class ``TestOptimRenewed``; pytorch/pytorch, the
revision with named params in state dicts, as torch 2.13 has them) and the data they draw from
``torch/testing/_internal/common_optimizers.py`` as torch 2.13.0 ships it: the CPU lists of every
``optim_inputs_func_<name>``, ``optim_error_inputs_func_<name>`` and the ``OptimizerInfo`` fields
the tests read (``supported_impls``, ``supports_fused_on``, ``not_og_supported_flags``,
``scheduler_inputs``, ``supports_sparse``, ``metadata_for_sparse``, the skips). torch's tests are
``unittest`` classes run on torch's own harness, which the CPU wheel lacks; each test here names
the one it ports (``test_optim.py::<TestName>``) and asserts what that one asserts, with
``torch.testing.assert_close``'s defaults for torch's ``assertEqual``.

Every test runs twice per algorithm: with ``torch.optim.<Name>`` (the control, ``foreach=False``
unless the input sets it) and with ``fusedopt.torch.<Name>``, so a failure of the fusedopt case
alone is fusedopt's. Where torch compares an implementation with its forloop (``foreach``,
``fused``), the forloop is always torch.optim's. The algorithms are those both have; Lion has no
torch counterpart, and torch's Adafactor, LBFGS, Muon and SparseAdam none in fusedopt.

What fusedopt refuses by design (README.md, "PyTorch") is not run as torch runs it:
``differentiable=True`` inputs are left out of the option lists (their refusal is asserted in
tests/test_torch_optim_matrix.py), and where torch steps a param fusedopt refuses (a strided
slice, a param on the meta device) the test asserts fusedopt's documented refusal instead.
CUDA-only tests are skipped with the reason.

Where the port differs from torch's test, the test's docstring says so: each flag of
foreach / fused is added to the first input only (``FULL_MATRIX``); test_tensor_lr steps the
optimizers it compares; Rosenbrock runs 300 steps for SGD; the step-is-no-op test keeps the
assertion of its earlier revisions; repr, older state dicts and non-tensor steps are checked a
little further (the same repr as torch.optim's, the group keys restored, the count a tensor
again); and the CUDA-only foreach / fused / found-inf / default-dtype tests run on the CPU,
where torch's own implementations run too (the mixed-dtype one with float64 and float32 params:
in float16 torch's own foreach drifts from its forloop beyond the test's tolerance on the CPU).
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch.nn import Parameter  # noqa: E402
from torch.optim.lr_scheduler import (  # noqa: E402
    ConstantLR,
    ExponentialLR,
    LinearLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import fusedopt.torch as ft  # noqa: E402
import test_torch_optim_matrix as torch_optim_matrix  # noqa: E402

NAMES = [
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "ASGD",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SGD",
]
IMPLS = ["torch", "fusedopt"]
FUSED_ON_CPU = ("Adagrad", "Adam", "AdamW", "SGD")  # supports_fused_on has "cpu"
SUPPORTS_SPARSE = ("Adagrad", "SGD")


# optim_inputs_func_<name>(device="cpu"), torch 2.13: (desc, kwargs) in torch's order, a tensor
# lr as a callable that makes it anew for each optimizer (schedulers change it in place).
CPU_INPUTS = torch_optim_matrix.CPU_INPUTS

NOT_OG_SUPPORTED = {name: ("foreach", "differentiable", "maximize", "capturable") for name in NAMES}
for _name in FUSED_ON_CPU:
    NOT_OG_SUPPORTED[_name] = ("foreach", "differentiable", "fused", "maximize", "capturable")

_DEFAULT_SCHEDULERS = ([lambda o: StepLR(o, gamma=0.9, step_size=10), ReduceLROnPlateau],)
SCHEDULER_INPUTS: dict[str, tuple[list[Callable[[Any], Any]], ...]] = {
    name: _DEFAULT_SCHEDULERS for name in NAMES
}
SCHEDULER_INPUTS["Adam"] = (
    [lambda o: ExponentialLR(o, gamma=0.9)],
    [lambda o: LinearLR(o, start_factor=0.4, total_iters=4)],
    [lambda o: ConstantLR(o, factor=0.4, total_iters=4), lambda o: ExponentialLR(o, gamma=0.9)],
    [lambda o: ExponentialLR(o, gamma=0.9), ReduceLROnPlateau],
    [lambda o: ConstantLR(o, factor=0.4, total_iters=4)],
    [lambda o: PolynomialLR(o, power=0.9, total_iters=4)],
    [lambda o: StepLR(o, gamma=0.9, step_size=10), ReduceLROnPlateau],
)
SCHEDULER_INPUTS["SGD"] = (
    [lambda o: StepLR(o, gamma=0.9, step_size=10)],
    [lambda o: LinearLR(o, start_factor=0.4, end_factor=0.8, total_iters=4)],
    [
        lambda o: StepLR(o, gamma=0.9, step_size=10),
        lambda o: LinearLR(o, start_factor=0.4, end_factor=0.6, total_iters=4),
    ],
    [
        lambda o: StepLR(o, gamma=0.99, step_size=10),
        lambda o: ExponentialLR(o, gamma=0.99),
        ReduceLROnPlateau,
    ],
    [lambda o: ConstantLR(o, factor=0.4, total_iters=4)],
    [lambda o: PolynomialLR(o, power=0.9, total_iters=4)],
    [lambda o: StepLR(o, gamma=0.9, step_size=10), ReduceLROnPlateau],
)
# metadata_for_sparse: (kwarg updates, scheduler constructors).
SPARSE_METADATA = {
    "Adagrad": (
        {"lr": 0.1, "weight_decay": 0, "lr_decay": 0},
        [
            lambda o: StepLR(o, gamma=1 - 1e-5, step_size=500),
            lambda o: ReduceLROnPlateau(o, threshold=1e-4),
        ],
    ),
    "SGD": (
        {"lr": 4.8e-3, "maximize": False, "momentum": 0, "nesterov": False, "weight_decay": 0},
        [lambda o: StepLR(o, gamma=0.99999, step_size=300)],
    ),
}

# torch's tests add each of foreach / fused / differentiable (True) to every input; here to the
# first ("default") only, to keep the file's run short. True: to every input, as torch.
FULL_MATRIX = False

# Cases where fusedopt fails a test torch passes: (test, algorithm) -> the defect. Each becomes a
# strict xfail of the fusedopt case, to be removed as the defect is fixed.
XFAIL: dict[tuple[str, str], str] = {}


def cases(test: str, names: list[str] | tuple[str, ...] = tuple(NAMES)) -> list[Any]:
    """(name, impl) pairs for one test, the fusedopt cases of XFAIL marked."""
    params = []
    for name in names:
        for impl in IMPLS:
            marks = []
            if impl == "fusedopt" and (test, name) in XFAIL:
                marks = [pytest.mark.xfail(strict=True, reason=XFAIL[(test, name)])]
            params.append(pytest.param(name, impl, marks=marks, id=f"{name}-{impl}"))
    return params


def build(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v() if callable(v) else copy.deepcopy(v) for k, v in kwargs.items()}


def optim_inputs(name: str, dtype: Any = None) -> list[tuple[str, dict[str, Any]]]:
    """optim_info.optim_inputs_func(device="cpu", dtype): fresh kwargs."""
    inputs = [(desc, build(kwargs)) for desc, kwargs in CPU_INPUTS[name]]
    if dtype == torch.float16 and name in ("Adam", "AdamW"):
        for _, kwargs in inputs:
            kwargs["eps"] = 0.1  # as optim_inputs_func_adam does for float16
    return inputs


def all_inputs(name: str, skip: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """_get_optim_inputs_including_global_cliquey_kwargs on the CPU: each input with its flags
    False, then with each one True. differentiable=True is left out (fusedopt refuses it)."""
    impls = ["foreach", "differentiable"] + (["fused"] if name in FUSED_ON_CPU else [])
    flags = [f for f in impls if f not in skip]
    result = []
    for index, (desc, kwargs) in enumerate(optim_inputs(name)):
        base = {**kwargs, **dict.fromkeys(flags, False)}
        result.append((desc, base))
        for flag in flags:
            if flag != "differentiable" and (index == 0 or FULL_MATRIX):
                result.append((f"{desc} & {flag}", {**build(kwargs), **base, flag: True}))
    for _, kwargs in result:  # each input its own tensor lr
        if isinstance(kwargs.get("lr"), torch.Tensor):
            kwargs["lr"] = kwargs["lr"].clone()
    return result


def optim_class(name: str, impl: str) -> Any:
    return getattr(torch.optim if impl == "torch" else ft, name)


def construct(name: str, impl: str, params: Any, **kwargs: Any) -> Any:
    """The optimizer under test: torch's forloop as the control, or fusedopt's."""
    if impl == "torch":
        kwargs.setdefault("foreach", False)
    return optim_class(name, impl)(params, **kwargs)


def assert_equal(actual: Any, expected: Any, **tolerance: Any) -> None:
    """torch's assertEqual over nested dicts, lists and tensors (dtypes checked)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (actual, expected)
        for key in expected:
            assert_equal(actual[key], expected[key], **tolerance)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_equal(a, e, **tolerance)
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), (actual, expected)
        torch.testing.assert_close(actual.detach(), expected.detach(), equal_nan=True, **tolerance)
    else:
        assert actual == expected or (actual != actual and expected != expected), (
            actual,
            expected,
        )


def lin_params(dtype: Any = torch.float32, contiguous: bool = True) -> tuple[Any, Any, Any]:
    if contiguous:
        weight = Parameter(torch.randn((10, 5), dtype=dtype))
        bias = Parameter(torch.randn(10, dtype=dtype))
    else:
        weight = Parameter(torch.randn((10, 5, 2), dtype=dtype)[..., 0])
        bias = Parameter(torch.randn((10, 2), dtype=dtype)[..., 0])
    return weight, bias, torch.randn(5, dtype=dtype)


def step_schedulers(schedulers: list, loss: Any) -> None:
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss)
        else:
            scheduler.step()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------- not ported


@pytest.mark.parametrize(
    "name, reason",
    [
        ("Lion", "fusedopt.torch.Lion has no torch.optim counterpart: torch has no test of it"),
        ("Adafactor", "torch.optim.Adafactor has no fusedopt.torch counterpart"),
        ("LBFGS", "torch.optim.LBFGS (a closure-driven second-order method) is not in fusedopt"),
        ("Muon", "torch.optim.Muon has no fusedopt.torch counterpart"),
        ("SparseAdam", "torch.optim.SparseAdam (sparse grads only) is not in fusedopt"),
    ],
)
def test_optimizers_outside_the_port(name: str, reason: str) -> None:
    pytest.skip(reason)


@pytest.mark.parametrize(
    "test, reason",
    [
        (
            "test_optim_infos_do_not_specify_global_cliquey_kwargs",
            "checks torch's OptimizerInfo data, not an optimizer",
        ),
        ("test_forloop_goes_right_direction_multigpu", "CUDA only (two GPUs)"),
        ("test_mixed_device_dtype", "CUDA only (two GPUs); test_mixed_dtype_on_cpu ports it"),
        ("test_foreach_large_tensor", "CUDA only (a 2**32-element tensor)"),
        ("test_peak_memory_foreach", "CUDA only (CUDA allocator statistics)"),
        ("test_fused_large_tensor", "64 GB tensor"),
        ("test_cpu_load_state_dict", "torch skips it on the CPU: it loads CPU state into CUDA"),
        ("test_state_dict_with_cuda_params", "CUDA only"),
        ("test_fused_cpu_matches_cuda", "CUDA only"),
        ("test_defaults_changed_to_foreach", "CUDA only; mocks torch's _multi_tensor_* kernels"),
        ("test_second_order_optims_return_consistent_types", "LBFGS only"),
    ],
)
def test_torch_tests_that_cannot_apply(test: str, reason: str) -> None:
    pytest.skip(f"test_optim.py::{test}: {reason}")


# ------------------------------------------------------------------------------- errors


def _error_inputs(name: str) -> list[tuple[str, Any, dict, str, type, str]]:
    """optim_error_inputs_func_<name>(device="cpu"): (desc, params, kwargs, when, type, regex)."""
    p1 = Parameter(torch.randn(1, 1))
    p2 = Parameter(torch.randn(1, 1))
    inputs: list[tuple[str, Any, dict, str, type, str]] = [
        (
            "invalid param type",
            p1,
            {},
            "construction",
            TypeError,
            "params argument given to the optimizer should be an iterable of Tensors or dicts",
        ),
        (
            "a param group cannot have duplicate parameters",
            [p1, p1],
            {},
            "construction",
            UserWarning,
            ".*a parameter group with duplicate parameters.*",
        ),
        (
            "duplicate parameters should not occur across param groups either",
            [{"params": p1}, {"params": p1}],
            {},
            "construction",
            ValueError,
            "some parameters appear in more than one parameter group",
        ),
        (
            "Tensor lr must be 1-element",
            None,
            {"lr": torch.tensor([0.001, 0.001])},
            "construction",
            ValueError,
            "Tensor lr must be 1-element",
        ),
        (
            "all optimizer params should be with/without names",
            [("weight", p1), p2],
            {},
            "construction",
            ValueError,
            "all optimizer params should be with/without names. Some param names are missing",
        ),
        (
            "all optimizer param groups should be with/without names.",
            [{"params": [p1], "lr": 1e-2}, {"params": [("weight", p2)]}],
            {},
            "construction",
            ValueError,
            "all optimizer param groups should be with/without names. "
            "cannot add param group with names to the optimizer",
        ),
    ]
    c = "construction"
    # Entries torch repeats for several of its optimizers.
    beta1 = ("beta1", None, {"lr": 1e-2, "betas": (1.0, 0.0)}, c, ValueError,
             "Invalid beta parameter at index 0: 1.0")  # fmt: skip
    weight_decay = ("weight_decay", None, {"lr": 1e-2, "weight_decay": -1}, c, ValueError,
                    "Invalid weight_decay value: -1")  # fmt: skip
    specific: dict[str, list[tuple[str, Any, dict, str, type, str]]] = {
        "Adadelta": [
            ("rho", None, {"lr": 1e-2, "rho": 1.1}, c, ValueError, "Invalid rho value: 1.1")
        ],
        "Adagrad": [
            (
                "lr_decay",
                None,
                {"lr": 1e-2, "lr_decay": -0.5},
                c,
                ValueError,
                "Invalid lr_decay value: -0.5",
            )
        ],
        "Adam": [
            beta1,
            weight_decay,
            (
                "tensor lr with foreach",
                None,
                {"lr": torch.tensor(0.001), "foreach": True},
                c,
                ValueError,
                "lr as a Tensor is not supported for capturable=False and foreach=True",
            ),
            (
                "betas float and tensor",
                None,
                {"lr": 1e-2, "betas": (0.9, torch.tensor(0.99))},
                c,
                ValueError,
                "betas must be either both floats or both Tensors",
            ),
            (
                "betas tensor and float",
                None,
                {"lr": 1e-2, "betas": (torch.tensor(0.9), 0.99)},
                c,
                ValueError,
                "betas must be either both floats or both Tensors",
            ),
            (
                "tensor betas with foreach",
                None,
                {"lr": 1e-2, "betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True},
                c,
                ValueError,
                r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True",
            ),
        ],
        "Adamax": [
            (
                "beta2",
                None,
                {"lr": 1e-2, "betas": (0.0, 1.0)},
                c,
                ValueError,
                "Invalid beta parameter at index 1: 1.0",
            )
        ],
        "ASGD": [
            (
                "weight_decay",
                None,
                {"lr": 1e-2, "weight_decay": -0.5},
                c,
                ValueError,
                "Invalid weight_decay value: -0.5",
            )
        ],
        "NAdam": [
            beta1,
            (
                "momentum_decay",
                None,
                {"lr": 1e-2, "momentum_decay": -0.2},
                c,
                ValueError,
                "Invalid momentum_decay value: -0.2",
            ),
        ],
        "RAdam": [
            beta1,
            weight_decay,
        ],
        "RMSprop": [
            (
                "momentum",
                None,
                {"lr": 1e-2, "momentum": -1.0},
                c,
                ValueError,
                "Invalid momentum value: -1.0",
            )
        ],
        "Rprop": [
            (
                "etas",
                None,
                {"lr": 1e-2, "etas": (1.0, 0.5)},
                c,
                ValueError,
                "Invalid eta values: 1.0, 0.5",
            )
        ],
        "SGD": [
            (
                "momentum",
                None,
                {"lr": 1e-2, "momentum": -0.5},
                c,
                ValueError,
                "Invalid momentum value: -0.5",
            )
        ],
    }
    specific["AdamW"] = specific["Adam"]
    return inputs + specific[name]


@pytest.mark.parametrize("name, impl", cases("test_errors"))
def test_errors(name: str, impl: str) -> None:
    """test_optim.py::test_errors (every error input is a construction error on the CPU)."""
    cls = optim_class(name, impl)
    for desc, params, kwargs, when, error_type, regex in _error_inputs(name):
        assert when == "construction", desc
        if issubclass(error_type, Warning):
            with pytest.warns(error_type, match=regex):
                cls(params, **kwargs)
        else:
            with pytest.raises(error_type, match=regex):
                cls(params, **kwargs)


# Invalid hyperparameters beyond torch's error inputs: (algorithm, kwargs). fusedopt must raise
# torch's exception with torch's message (README: "checked as torch checks them").
INVALID = (
    [
        (name, kwargs)
        for name in NAMES
        for kwargs in ({"lr": -1.0}, {"weight_decay": -0.1})
        if not (name == "Rprop" and "weight_decay" in kwargs)
    ]
    + [
        (name, {"eps": -1.0})
        for name in ("Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop")
    ]
    + [
        (name, {"betas": betas})
        for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam")
        for betas in ((0.9, 1.0), (-0.1, 0.9), (0.9, -0.5))
    ]
    + [
        ("SGD", {"momentum": 0.9, "nesterov": True, "dampening": 0.5}),
        ("SGD", {"nesterov": True}),
        ("RMSprop", {"alpha": -0.1}),
        ("Adagrad", {"initial_accumulator_value": -0.1}),
        ("Rprop", {"etas": (0.5, 0.9)}),
        ("Adadelta", {"rho": -0.1}),
        (
            "Adam",
            {"lr": torch.tensor(0.001), "betas": (0.9, 0.999), "fused": True, "foreach": True},
        ),
    ]
)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name, kwargs", INVALID, ids=[f"{n}-{'-'.join(map(str, k))}" for n, k in INVALID]
)
def test_constructor_errors_match_torch(name: str, kwargs: dict, impl: str) -> None:
    """test_optim.py (older TestOptim: the per-optimizer ``assertRaisesRegex(ValueError,
    "Invalid ...")`` checks): an invalid hyperparameter raises torch's exception, message and
    all."""
    with pytest.raises(Exception) as expected:
        torch.optim.__dict__[name]([Parameter(torch.randn(2))], **kwargs)
    with pytest.raises(type(expected.value)) as raised:
        optim_class(name, impl)([Parameter(torch.randn(2))], **kwargs)
    assert str(raised.value) == str(expected.value)


# ------------------------------------------------------------------------------- direction


@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("name, impl", cases("test_forloop_goes_right_direction"))
def test_forloop_goes_right_direction(
    name: str, impl: str, contiguous: bool, with_lrsched: bool
) -> None:
    """test_optim.py::test_forloop_goes_right_direction. A strided slice is a param fusedopt
    refuses (README: not dense in memory): there the refusal is asserted."""
    for constructors in SCHEDULER_INPUTS[name] if with_lrsched else [None]:
        for desc, kwargs in optim_inputs(name):
            weight, bias, inpt = lin_params(contiguous=contiguous)
            if impl == "fusedopt" and not contiguous:
                with pytest.raises(ValueError, match="not dense in memory"):
                    construct(name, impl, [weight, bias], foreach=False, **kwargs)
                continue
            optimizer = construct(name, impl, [weight, bias], foreach=False, **kwargs)
            schedulers = [s(optimizer) for s in constructors or []]

            def closure(optimizer=optimizer, weight=weight, bias=bias, inpt=inpt):
                optimizer.zero_grad()
                loss = (weight.mv(inpt) + bias).pow(2).sum()
                loss.backward()
                return loss

            initial_value = closure().item()
            for _ in range(20):
                loss = closure()
                optimizer.step()
                step_schedulers(schedulers, loss)
            if kwargs.get("maximize", False):
                assert closure().item() > initial_value, desc
            else:
                assert closure().item() < initial_value, desc


@pytest.mark.parametrize("name, impl", cases("test_param_group_with_lrscheduler"))
def test_param_group_with_lrscheduler_goes_right_direction(name: str, impl: str) -> None:
    """test_optim.py::test_param_group_with_lrscheduler_goes_right_direction"""
    for constructors in SCHEDULER_INPUTS[name]:
        weight, bias, inpt = lin_params()
        optimizer = construct(name, impl, [{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [s(optimizer) for s in constructors]

        def closure(optimizer=optimizer, weight=weight, bias=bias, inpt=inpt):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial_value = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            step_schedulers(schedulers, loss)
        assert closure().item() < initial_value


@pytest.mark.parametrize("name, impl", cases("test_tensor_lr"))
def test_tensor_lr(name: str, impl: str) -> None:
    """test_optim.py::test_tensor_lr: a tensor lr steps as the same float lr. (torch's version
    steps only optimizers that need a closure, so it compares untouched weights for these: the
    port steps both, as the test means to.)"""
    for desc, kwargs in all_inputs(name):
        weight, bias, inpt = lin_params()
        weight_c = weight.detach().clone().requires_grad_(True)
        bias_c = bias.detach().clone().requires_grad_(True)
        kwargs = {**kwargs, "lr": 1e-3}
        optimizer_r = construct(name, impl, [weight, bias], **kwargs)
        try:
            optimizer = construct(
                name, impl, [weight_c, bias_c], **{**kwargs, "lr": torch.tensor(1e-3)}
            )
        except ValueError as e:
            assert "lr as a Tensor is not supported" in str(e), desc
            continue

        def closure(optim: Any, w: Any, b: Any, inpt: Any = inpt) -> Any:
            optim.zero_grad()
            loss = (w.mv(inpt) + b).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(5):
            closure(optimizer_r, weight, bias)
            closure(optimizer, weight_c, bias_c)
            optimizer_r.step()
            optimizer.step()
            assert_equal(weight, weight_c)
            assert_equal(bias, bias_c)


def rosenbrock(tensor: Any) -> Any:
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def drosenbrock(tensor: Any) -> Any:
    x, y = tensor
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


# torch runs 1800 steps; SGD's 300 keep the file's run short (and approach the minimum all the
# same; Adagrad's do not).
ROSENBROCK_STEPS = {"Adagrad": 1800, "SGD": 300}


@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("name, impl", cases("test_rosenbrock_sparse", SUPPORTS_SPARSE))
def test_rosenbrock_sparse(name: str, impl: str, with_lrsched: bool) -> None:
    """test_optim.py::test_rosenbrock_sparse: cyclic coordinate descent on Rosenbrock, the same
    grads given sparse to one optimizer and dense to another, which must agree and approach the
    minimum. fusedopt refuses sparse grads (README), so the sparse side is always torch.optim's
    and the dense side is the implementation under test."""
    kwarg_updates, scheduler_constructors = SPARSE_METADATA[name]
    supported, seen = [], set()
    for _, kwargs in all_inputs(name, skip=("differentiable", "fused")):
        for k in kwarg_updates:
            kwargs.pop(k, None)
        key = tuple(sorted(kwargs.items()))
        if kwargs and key not in seen:
            seen.add(key)
            supported.append({**kwargs, "lr": kwarg_updates["lr"]})
    for kwargs in supported:
        multi_tensor = kwargs.get("foreach", False)
        params_t = [torch.tensor([1.5, 1.5])]
        if multi_tensor:
            params_t.append(torch.tensor([1.5, 1.5], dtype=torch.float64))
        params = [Parameter(t.clone()) for t in params_t]
        params_c = [Parameter(t.clone()) for t in params_t]
        optimizer = torch.optim.__dict__[name](params, **kwargs)  # the sparse side
        optimizer_c = construct(name, impl, params_c, **kwargs)
        schedulers = [s(optimizer) for s in (scheduler_constructors if with_lrsched else [])]
        schedulers_c = [s(optimizer_c) for s in (scheduler_constructors if with_lrsched else [])]
        solution = torch.tensor([1, 1])
        with torch.no_grad():
            initial_dist = sum(p.dist(solution) for p in params)

        def get_grad(param: Any, sparse_grad: bool, w: int) -> Any:
            grad = drosenbrock(param)
            if sparse_grad:  # uncoalesced, as torch's test gives it
                if w:
                    i = torch.tensor([[0, 0]], dtype=torch.int64)
                    x = grad[0]
                    v = torch.tensor([x / 4.0, x - x / 4.0])
                else:
                    i = torch.tensor([[1, 1]], dtype=torch.int64)
                    y = grad[1]
                    v = torch.tensor([y - y / 4.0, y / 4.0])
                return torch.sparse_coo_tensor(i, v, (2,), dtype=v.dtype)
            if w:
                return torch.tensor([grad[0], 0], dtype=param.dtype)
            return torch.tensor([0, grad[1]], dtype=param.dtype)

        def evaluate(
            opt: Any, ps: list, sparse_grad: bool, w: int, multi_tensor: bool = multi_tensor
        ) -> Any:
            opt.zero_grad()
            loss = sum(rosenbrock(p) for p in ps) if multi_tensor else rosenbrock(ps[0])
            loss.backward()
            grads = [get_grad(p, sparse_grad, w) for p in ps]
            with torch.no_grad():
                ps[0].grad = grads[0]
                if multi_tensor:
                    ps[1].grad = grads[1].to(dtype=torch.float64)
            return loss

        for i in range(ROSENBROCK_STEPS[name]):
            w = i % 2
            optimizer.step(functools.partial(evaluate, optimizer, params, True, w))
            for s in schedulers:
                s.step(rosenbrock(params[0])) if isinstance(s, ReduceLROnPlateau) else s.step()
            optimizer_c.step(functools.partial(evaluate, optimizer_c, params_c, False, w))
            for s in schedulers_c:
                s.step(rosenbrock(params_c[0])) if isinstance(s, ReduceLROnPlateau) else s.step()
            assert_equal(params_c, params, atol=5e-6, rtol=5e-6)
        if not kwargs.get("maximize", False):
            assert sum(p.dist(solution) for p in params_c) <= initial_dist
        else:
            assert sum(rosenbrock(p) for p in params_c) >= sum(rosenbrock(t) for t in params_t)


# ------------------------------------------------------------------------------- complex


@pytest.mark.parametrize("name, impl", cases("test_complex"))
def test_complex(name: str, impl: str) -> None:
    """test_optim.py::test_complex: complex params step as their view_as_real."""
    for _, kwargs in all_inputs(name, skip=("differentiable", "fused")):
        _complex_case(name, impl, kwargs)


def _complex_case(name: str, impl: str, kwargs: dict) -> None:
    complex_params = [
        torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
        torch.randn(10, dtype=torch.complex64, requires_grad=True),
        torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
    ]
    real_params = [
        (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
        for p in complex_params
    ]
    complex_optimizer = construct(name, impl, complex_params, **build(kwargs))
    real_optimizer = construct(name, impl, real_params, **build(kwargs))
    real_steps, complex_steps, grads_losses = [], [], []

    def real_closure() -> Any:
        for param in real_params:
            grad = torch.randn_like(param)
            param.grad = grad
            real_steps.append(param.detach().clone())
            grads_losses.append(grad.clone())
        loss = torch.randn(1)
        grads_losses.append(loss.clone())
        return loss

    def complex_closure() -> Any:
        for param in complex_params:
            if torch.is_complex(param):
                grad = torch.view_as_complex(grads_losses.pop(0))
                complex_steps.append(torch.view_as_real_copy(param.detach()))
            else:
                grad = grads_losses.pop(0)
                complex_steps.append(param.detach().clone())
            param.grad = grad
        return grads_losses.pop(0)

    for _ in range(3):
        real_closure()
        complex_closure()
        real_optimizer.step()
        complex_optimizer.step()
    as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
    assert_equal(as_real, real_params)
    assert_equal(complex_steps, real_steps)


class TensorTracker:
    """common_optimizers.TensorTracker: clones queued, then checked and copied in order."""

    def __init__(self) -> None:
        self.tensors: list[Any] = []

    def add(self, tensor: Any) -> None:
        self.tensors.append(tensor.detach().clone())

    def pop_check_set(self, tensor_to_set: Any) -> None:
        assert self.tensors, "no tensors to pop"
        ref = self.tensors.pop(0)
        assert_equal(tensor_to_set, ref)
        with torch.no_grad():
            tensor_to_set.copy_(ref)

    def all_popped(self) -> bool:
        return not self.tensors


@pytest.mark.parametrize("name, impl", cases("test_complex_2d"))
def test_complex_2d(name: str, impl: str) -> None:
    """test_optim.py::test_complex_2d: a complex param and its real and imaginary parts as two
    real params step alike."""
    for _, kwargs in all_inputs(name, skip=("differentiable", "fused")):
        _complex_2d_case(name, impl, kwargs)


def _complex_2d_case(name: str, impl: str, kwargs: dict) -> None:
    a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
    a1_real = a1.real.detach().clone().requires_grad_()
    a1_imag = a1.imag.detach().clone().requires_grad_()
    optim1 = construct(name, impl, [a1], **build(kwargs))
    optim2 = construct(name, impl, [a1_real, a1_imag], **build(kwargs))
    reals, imags, grad_reals, grad_imags, losses = (TensorTracker() for _ in range(5))

    def closure1() -> Any:
        optim1.zero_grad()
        loss = rosenbrock(a1).abs()
        loss.backward()
        reals.add(a1.real)
        imags.add(a1.imag)
        grad_reals.add(a1.grad.real)
        grad_imags.add(a1.grad.imag)
        losses.add(loss)
        return loss

    def closure2() -> Any:
        optim2.zero_grad()
        reals.pop_check_set(a1_real)
        imags.pop_check_set(a1_imag)
        loss = rosenbrock(torch.complex(a1_real, a1_imag)).abs()
        losses.pop_check_set(loss)
        loss.backward()
        grad_reals.pop_check_set(a1_real.grad)
        grad_imags.pop_check_set(a1_imag.grad)
        return loss

    for _ in range(3):
        closure1()
        closure2()
        optim1.step()
        optim2.step()
        assert_equal(a1.real, a1_real)
        assert_equal(a1.imag, a1_imag)
    assert all(t.all_popped() for t in (reals, imags, grad_reals, grad_imags, losses))


# ------------------------------------------------------------------------------- impls

# The project's targets for fusedopt against torch.optim, relative to 1 + |x|.
TARGET = {torch.float32: 1e-4, torch.float64: 1e-10}


def assert_close_rel(actual: Any, expected: Any, dtype: Any, what: str) -> None:
    if not isinstance(expected, torch.Tensor):
        assert actual == expected, what
        return
    a, e = (torch.as_tensor(x).detach().to(torch.float64) for x in (actual, expected))
    assert a.shape == e.shape, what
    if e.numel():
        error = ((a - e).abs() / (1 + e.abs())).max().item()
        assert error <= TARGET[dtype], f"{what}: {error:.3g}"


def _compare_between(inpt: Any, models: list, optimizers: list, compare: Callable) -> None:
    """TestOptimRenewed._compare_between: 7 steps, no grads at step 2, the third layer frozen
    at steps 3 and 4; params and states compared after every step."""
    for i in range(7):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                model(inpt).sum().backward()
            optimizer.step()
        (og_model, new_model), (og_opt, new_opt) = models, optimizers
        for og_p, new_p in zip(og_model.parameters(), new_model.parameters()):
            _check_set(new_p, og_p, compare, f"param at step {i}")
            og_state, new_state = og_opt.state[og_p], new_opt.state[new_p]
            assert set(new_state) == set(og_state), (i, set(new_state), set(og_state))
            for k in og_state:
                _check_set(new_state[k], og_state[k], compare, f"state {k!r} at step {i}")


def _check_set(actual: Any, expected: Any, compare: Callable, what: str) -> None:
    """TensorTracker.pop_check_set: compared, then given the reference's values, so that each
    step is compared from the same start (torch's tolerances are for one step's rounding)."""
    compare(actual, expected, what)
    if isinstance(actual, torch.Tensor):
        with torch.no_grad():
            actual.copy_(expected)


def _derived(name: str, impl: str, flag: str, dtype: Any, compare: Callable) -> None:
    """TestOptimRenewed._test_derived_optimizers: torch.optim's forloop against the
    implementation under test with ``flag`` True."""
    for _desc, kwargs in optim_inputs(name, dtype):
        for value in (True,):
            inpt = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
            models, optimizers = [], []
            for side, flag_value in (("torch", False), (impl, value)):
                torch.manual_seed(1)
                model = torch.nn.Sequential(
                    torch.nn.Linear(2, 3),
                    torch.nn.Sigmoid(),
                    torch.nn.Linear(3, 1),
                    torch.nn.Sigmoid(),
                ).to(dtype=dtype)
                empty_param = torch.empty((), dtype=dtype, requires_grad=True)
                empty_param.grad = torch.rand_like(empty_param)
                params = list(model.parameters()) + [empty_param]
                cls = optim_class(name, side)
                optimizers.append(cls(params, **{**build(kwargs), flag: flag_value}))
                models.append(model)
            _compare_between(inpt, models, optimizers, compare)


@pytest.mark.parametrize("name, impl", cases("test_foreach_matches_forloop"))
def test_foreach_matches_forloop(name: str, impl: str) -> None:
    """test_optim.py::test_foreach_matches_forloop (float64): foreach=True against torch's
    forloop; fusedopt (which ignores foreach) to the project's float64 target."""
    dtype = torch.float64

    def compare(actual: Any, expected: Any, what: str) -> None:
        if impl == "torch":
            tol = {"atol": 1.5e-7, "rtol": 1.1e-7} if name == "RAdam" else {}
            assert_equal(actual, expected, **tol)
        else:
            assert_close_rel(actual, expected, dtype, what)

    _derived(name, impl, "foreach", dtype, compare)


FUSED_TOLERANCE = {  # test_fused_matches_forloop's toleranceOverride (torch's defaults elsewhere)
    ("Adagrad", torch.bfloat16): {"atol": 5e-3, "rtol": 5e-3},
    ("Adagrad", torch.float16): {"atol": 5e-3, "rtol": 5e-3},
    ("Adam", torch.bfloat16): {"atol": 5e-3, "rtol": 5e-3},
    ("Adam", torch.float16): {"atol": 5e-3, "rtol": 5e-3},
    ("AdamW", torch.bfloat16): {"atol": 5e-3, "rtol": 5e-3},
    ("AdamW", torch.float16): {"atol": 5e-3, "rtol": 5e-3},
}


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize("name, impl", cases("test_fused_matches_forloop", FUSED_ON_CPU))
def test_fused_matches_forloop(name: str, impl: str, dtype: Any) -> None:
    """test_optim.py::test_fused_matches_forloop on the CPU (in supports_fused_on): fused=True
    against torch's forloop, with torch's tolerances (fusedopt, which ignores fused, to the
    project's targets in float32 and float64)."""

    def compare(actual: Any, expected: Any, what: str) -> None:
        if impl == "fusedopt" and dtype in TARGET:
            assert_close_rel(actual, expected, dtype, what)
        else:
            assert_equal(actual, expected, **FUSED_TOLERANCE.get((name, dtype), {}))

    _derived(name, impl, "fused", dtype, compare)


@pytest.mark.parametrize("name, impl", cases("test_fused_error_on_params_on_meta", FUSED_ON_CPU))
def test_fused_error_on_params_on_meta(name: str, impl: str) -> None:
    """test_optim.py::test_fused_error_on_params_on_meta: torch takes meta params, refuses the
    step, and steps once they are materialized on the CPU. fusedopt refuses a meta param when it
    is added (README: devices other than the CPU and CUDA are refused), which is asserted."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid())
    if impl == "fusedopt":
        with pytest.raises(ValueError, match="is on meta"):
            ft.__dict__[name](model.parameters(), fused=True)
        return
    optimizer = torch.optim.__dict__[name](model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(
        RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"
    ):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    optimizer.step()


@pytest.mark.parametrize("name, impl", cases("test_fused_does_not_step_if_foundinf", FUSED_ON_CPU))
def test_fused_does_not_step_if_foundinf(name: str, impl: str) -> None:
    """test_optim.py::test_fused_does_not_step_if_foundinf (onlyCUDA in torch; torch's fused
    kernels take grad_scale and found_inf on the CPU too): a found inf skips the step."""
    for _desc, kwargs in optim_inputs(name):
        for no_grad_scale in (False, True):
            params = [torch.ones((1,)) for _ in range(5)]
            params_c = [p.detach().clone() for p in params]
            for p in params:
                p.grad = torch.ones_like(p)
            optimizer = optim_class(name, impl)(params, fused=True, **kwargs)
            optimizer.grad_scale = None if no_grad_scale else torch.ones((1,))
            optimizer.found_inf = torch.ones(())
            optimizer.step()
            for p in params:
                if "step" in optimizer.state[p]:
                    assert_equal(optimizer.state[p]["step"], torch.zeros(()))
            assert_equal(params, params_c)


@pytest.mark.parametrize("name, impl", cases("test_mixed_dtype_on_cpu"))
def test_mixed_dtype_on_cpu(name: str, impl: str) -> None:
    """test_optim.py::test_mixed_device_dtype, on the CPU alone: params of several dtypes (and
    an integer tensor without grad, left out as torch leaves it out) in one optimizer, foreach
    (and fused where the CPU has it) against torch's forloop, at 5x torch's tolerances."""
    params = [
        torch.rand(2, 3, dtype=torch.float64, requires_grad=True),
        torch.rand(2, 3, dtype=torch.float32, requires_grad=True),
        torch.randint(1024, (2, 3), dtype=torch.int64, requires_grad=False),
    ]
    for p in params:
        if p.requires_grad:
            p.grad = torch.rand_like(p)
    flags = ["foreach"] + (["fused"] if name in FUSED_ON_CPU else [])
    for flag in flags:
        iterations = 7 if flag == "foreach" else 1
        for _desc, kwargs in optim_inputs(name):
            updated, states = [], []
            for side, value in (("torch", False), (impl, True)):
                clones = []
                for p in params:
                    if p.requires_grad:
                        c = p.detach().clone().requires_grad_(True)
                        c.grad = p.grad.detach().clone()
                        clones.append(c)
                optimizer = optim_class(name, side)(clones, **{**build(kwargs), flag: value})
                for _ in range(iterations):
                    optimizer.step()
                states.append(optimizer.state)
                updated.append(clones)
            for og_p, new_p in zip(*updated):
                rtol, atol = torch.testing._comparison.get_tolerances(
                    new_p.dtype, rtol=None, atol=None
                )
                tol = {"rtol": 5 * rtol, "atol": 5 * atol}
                assert_equal(new_p, og_p, **tol)
                for k in states[0][og_p]:
                    assert_equal(states[1][new_p][k], states[0][og_p][k], **tol)


@pytest.mark.parametrize(
    "default_dtype", [torch.float64, torch.float16], ids=["float64", "float16"]
)
@pytest.mark.parametrize("name, impl", cases("test_set_default_dtype_works_with_foreach"))
def test_set_default_dtype_works_with_foreach(name: str, impl: str, default_dtype: Any) -> None:
    """test_optim.py::test_set_default_dtype_works_with_foreach (onlyCUDA in torch; foreach runs
    on the CPU too): under another default dtype, step counts are float64 where it is float64
    and float32 otherwise, and foreach matches the forloop (float64 params)."""
    step_dtype = torch.float64 if default_dtype == torch.float64 else torch.float32
    old = torch.get_default_dtype()

    def compare(actual: Any, expected: Any, what: str) -> None:
        if what.startswith("state 'step'"):
            assert actual.dtype == step_dtype, what
            assert expected.dtype == step_dtype, what
        if default_dtype == torch.float16:
            assert_equal(actual, expected, atol=1e-5, rtol=1e-4)
        elif impl == "fusedopt":
            assert_close_rel(actual, expected, torch.float64, what)
        else:
            assert_equal(
                actual, expected, **({"atol": 1.5e-7, "rtol": 1.1e-7} if name == "RAdam" else {})
            )

    try:
        torch.set_default_dtype(default_dtype)
        _derived(name, impl, "foreach", torch.float64, compare)
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------- param groups


@pytest.mark.parametrize("name, impl", cases("test_param_groups_weight_decay"))
def test_param_groups_weight_decay(name: str, impl: str) -> None:
    """test_optim.py::test_param_groups_weight_decay"""
    for desc, kwargs in all_inputs(name, skip=("differentiable",)):
        bias_kwargs = {**build(kwargs), "weight_decay": 0.0}
        weight, bias, inpt = lin_params()
        optimizer = optim_class(name, impl)(
            [dict(params=[weight], **kwargs), dict(params=[bias], **bias_kwargs)]
        )
        loss = (weight.mv(inpt) + bias).pow(2).sum()
        initial_value = loss.item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + bias).pow(2).sum()
            loss.backward()
            optimizer.step()
        if kwargs.get("maximize", False):
            assert loss.item() > initial_value, desc
        else:
            assert loss.item() < initial_value, desc


@pytest.mark.parametrize("name, impl", cases("test_param_groups_lr"))
def test_param_groups_lr(name: str, impl: str) -> None:
    """test_optim.py::test_param_groups_lr: a group's lr overrides the constructor's (1e-28,
    under which another group's param does not move)."""
    for desc, kwargs in all_inputs(name, skip=("differentiable",)):
        if "lr" not in kwargs or kwargs["lr"] == 0:
            kwargs["lr"] = 1e-3
        outer_kwargs: dict[str, Any] = {"lr": 1e-28}
        if name == "Rprop":
            outer_kwargs["step_sizes"] = (0, 50)
        weight, bias, inpt = lin_params()
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.detach().clone()
        optimizer = optim_class(name, impl)(
            [dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])], **outer_kwargs
        )
        loss = (weight.mv(inpt) + bias).pow(2).sum()
        initial_value = loss.item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        if kwargs.get("maximize", False):
            assert loss.item() > initial_value, desc
        else:
            assert loss.item() < initial_value, desc
        assert_equal(irrelevant, irrelevant_clone)


# ------------------------------------------------------------------------------- no-op steps


@pytest.mark.parametrize("name, impl", cases("test_step_is_noop_when_params_have_no_grad"))
def test_step_is_noop_when_params_have_no_grad(name: str, impl: str) -> None:
    """test_optim.py::test_step_is_noop_when_params_have_no_grad (with the assertion of its
    earlier revisions: the params are unchanged), and no state is made."""
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old_params = [p.detach().clone() for p in params]
    for desc, kwargs in all_inputs(name):
        optimizer = optim_class(name, impl)(params, **kwargs)
        loss = optimizer.step(lambda: torch.tensor([1.0]))
        assert_equal(loss, torch.tensor([1.0]))
        assert_equal(params, old_params)
        # Adagrad creates its state in the constructor; nothing else does before a grad.
        assert all(len(s) == 0 for s in optimizer.state.values()) or name == "Adagrad", desc


@pytest.mark.parametrize(
    "name, impl",
    cases("test_step_is_noop_for_zero_grads", [n for n in NAMES if n != "ASGD"])
    + [
        pytest.param(
            "ASGD",
            impl,
            marks=pytest.mark.skip(
                reason="torch's OptimizerInfo skips it: ASGD internally changes the weights "
                "even with zero grad"
            ),
            id=f"ASGD-{impl}",
        )
        for impl in IMPLS
    ],
)
def test_step_is_noop_for_zero_grads(name: str, impl: str) -> None:
    """test_optim.py::test_step_is_noop_for_zero_grads"""
    param = torch.randn((5, 1), requires_grad=True)
    old_param = param.detach().clone()
    for _desc, kwargs in all_inputs(name):
        if kwargs.get("weight_decay", 0) != 0:
            continue
        if name == "AdamW":
            kwargs["lr"] = (
                torch.tensor(1e-5) if isinstance(kwargs.get("lr", 1e-5), torch.Tensor) else 1e-5
            )
        optimizer = optim_class(name, impl)([param], **kwargs)
        param.grad = torch.zeros_like(param)
        optimizer.step(lambda: torch.tensor([1.0]))
        assert_equal(param, old_param)


# ------------------------------------------------------------------------------- printing


@pytest.mark.parametrize("name, impl", cases("test_optimizer_can_be_printed"))
def test_optimizer_can_be_printed(name: str, impl: str) -> None:
    """test_optim.py::test_optimizer_can_be_printed; and it prints as torch.optim's."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for desc, kwargs in all_inputs(name):
        text = repr(optim_class(name, impl)(params, **build(kwargs)))
        assert text == repr(torch.optim.__dict__[name](params, **build(kwargs))), desc


# ------------------------------------------------------------------------------- state dicts


def _named(params: list, is_named: bool) -> list:
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def _without_param_names(state_dict: dict) -> dict:
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("name, impl", cases("test_state_dict_deterministic"))
def test_state_dict_deterministic(
    name: str, impl: str, is_named_optim0: bool, is_named_optim1: bool
) -> None:
    """test_optim.py::test_state_dict_deterministic"""
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inpt = torch.randn(3)

    def fwd_bwd(optim: Any, w: Any, b: Any) -> Any:
        optim.zero_grad()
        loss = (w.mv(inpt) + b).pow(2).sum()
        loss.backward()
        return loss

    for _desc, kwargs in all_inputs(name, skip=("differentiable",)):
        cls = optim_class(name, impl)
        optimizer = cls(_named([weight, bias], is_named_optim0), **kwargs)
        for _ in range(10):
            fwd_bwd(optimizer, weight, bias)
            optimizer.step()
        with torch.no_grad():
            weight_c = Parameter(weight.clone())
            bias_c = Parameter(bias.clone())
        optimizer_c = cls(_named([weight_c, bias_c], is_named_optim1), **build(kwargs))
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(10):
            fwd_bwd(optimizer, weight, bias)
            fwd_bwd(optimizer_c, weight_c, bias_c)
            optimizer.step()
            optimizer_c.step()
            assert_equal(weight, weight_c)
            assert_equal(bias, bias_c)
        assert_equal(
            _without_param_names(optimizer.state_dict()),
            _without_param_names(optimizer_c.state_dict()),
        )
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert_equal(
            _without_param_names(optimizer.state_dict())["param_groups"][-1],
            _without_param_names(optimizer_c.state_dict())["param_groups"][-1],
        )


def _conv_model() -> tuple[Any, Any]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)
    )
    return model, torch.rand(1, 4, 16, 16)


def _fwd_bwd(optim: Any, mod: Any, i: Any) -> Any:
    optim.zero_grad()
    loss = mod(i).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("name, impl", cases("test_can_load_older_state_dict"))
def test_can_load_older_state_dict(name: str, impl: str) -> None:
    """test_optim.py::test_can_load_older_state_dict: a state dict without the flags added
    since the optimizer was released loads (they take their defaults) and steps."""
    for desc, kwargs in all_inputs(name, skip=("differentiable",)):
        model, inpt = _conv_model()
        optimizer = optim_class(name, impl)(model.parameters(), **kwargs)
        for _ in range(3):
            _fwd_bwd(optimizer, model, inpt)
            optimizer.step()
        keys = set(optimizer.param_groups[0])
        old_state_dict = copy.deepcopy(optimizer.state_dict())
        for group in old_state_dict["param_groups"]:
            for flag in NOT_OG_SUPPORTED[name]:
                group.pop(flag, None)
        optimizer.load_state_dict(old_state_dict)
        assert set(optimizer.param_groups[0]) == keys, desc
        _fwd_bwd(optimizer, model, inpt)
        optimizer.step()


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("name, impl", cases("test_can_load_from_to_named_state_dict"))
def test_can_load_from_to_named_state_dict(
    name: str, impl: str, is_named_optim0: bool, is_named_optim1: bool
) -> None:
    """test_optim.py::test_can_load_from_to_named_state_dict: state dicts with and without
    param_names load into optimizers with and without them, which keep the names."""
    for desc, kwargs in all_inputs(name, skip=("differentiable",)):
        model, inpt = _conv_model()
        cls = optim_class(name, impl)
        optimizer = cls(
            model.named_parameters() if is_named_optim0 else model.parameters(), **kwargs
        )
        for _ in range(3):
            _fwd_bwd(optimizer, model, inpt)
            optimizer.step()
        old_state_dict = copy.deepcopy(optimizer.state_dict())
        optimizer2 = cls(
            model.named_parameters() if is_named_optim1 else model.parameters(), **build(kwargs)
        )
        optimizer2.load_state_dict(old_state_dict)
        _fwd_bwd(optimizer2, model, inpt)
        optimizer2.step()
        if is_named_optim0 or is_named_optim1:
            assert optimizer2.state_dict()["param_groups"][0]["param_names"] == [
                "0.weight",
                "0.bias",
                "1.weight",
                "1.bias",
            ], desc


@pytest.mark.parametrize("is_named_optim", [True, False])
@pytest.mark.parametrize("name, impl", cases("test_save_load_equality_with_weights_only"))
def test_save_load_equality_with_weights_only(name: str, impl: str, is_named_optim: bool) -> None:
    """test_optim.py::test_save_load_equality_with_weights_only"""
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inpt = torch.randn(3)

    def fwd_bwd(optim: Any) -> Any:
        optim.zero_grad()
        loss = (weight.mv(inpt) + bias).pow(2).sum()
        loss.backward()
        return loss

    for _desc, kwargs in all_inputs(name, skip=("differentiable",)):
        optimizer = optim_class(name, impl)(_named([weight, bias], is_named_optim), **kwargs)
        for _ in range(3):
            optimizer.step(functools.partial(fwd_bwd, optimizer))
        sd = optimizer.state_dict()
        with tempfile.TemporaryFile() as f:
            torch.save(sd, f)
            f.seek(0)
            assert_equal(torch.load(f, weights_only=False), sd)
            f.seek(0)
            assert_equal(torch.load(f, weights_only=True), sd)


@pytest.mark.parametrize("name, impl", cases("test_load_nontensor_step"))
def test_load_nontensor_step(name: str, impl: str) -> None:
    """test_optim.py::test_load_nontensor_step: a state dict whose step counts are numbers (an
    older torch's) loads and steps on; the count is a tensor again and counts on."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for desc, kwargs in all_inputs(name, skip=("differentiable",)):
        optimizer = optim_class(name, impl)(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        for p_state in state_dict["state"].values():
            if "step" in p_state and torch.is_tensor(p_state["step"]):
                p_state["step"] = p_state["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()
        for p in params:
            if "step" in optimizer.state[p]:
                step = optimizer.state[p]["step"]
                assert torch.is_tensor(step) and step.item() == 4, (desc, step)


# ------------------------------------------------------------------------------- hooks


def _state_dict_pre_hook(optimizer: Any) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer: Any, state_dict: dict) -> dict:
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


@pytest.mark.parametrize("name, impl", cases("test_state_dict_pre_hook"))
def test_state_dict_pre_hook(name: str, impl: str) -> None:
    """test_optim.py::test_state_dict_pre_hook"""
    for desc, kwargs in all_inputs(name):
        optim = optim_class(name, impl)([torch.rand(2, 3, requires_grad=True)], **kwargs)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert optim.state_dict()["state"]["test"] == 1, desc


@pytest.mark.parametrize("name, impl", cases("test_state_dict_post_hook"))
def test_state_dict_post_hook(name: str, impl: str) -> None:
    """test_optim.py::test_state_dict_post_hook"""
    for desc, kwargs in all_inputs(name):
        optim = optim_class(name, impl)([torch.rand(2, 3, requires_grad=True)], **kwargs)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        assert optim.state_dict()["ran_state_dict_pre_hook"] is False, desc


@pytest.mark.parametrize("name, impl", cases("test_state_dict_pre_post_hook"))
def test_state_dict_pre_post_hook(name: str, impl: str) -> None:
    """test_optim.py::test_state_dict_pre_post_hook"""
    for desc, kwargs in all_inputs(name):
        optim = optim_class(name, impl)([torch.rand(2, 3, requires_grad=True)], **kwargs)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = optim.state_dict()
        assert "test" not in state_dict["state"], desc
        assert state_dict["ran_state_dict_pre_hook"] is True, desc


def _load_state_dict_pre_hook1(optimizer: Any, state_dict: dict) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer: Any, state_dict: dict) -> dict:
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer: Any) -> None:
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("name, impl", cases("test_load_state_dict_pre_hook_and_prepend"))
def test_load_state_dict_pre_hook_and_prepend(name: str, impl: str) -> None:
    """test_optim.py::test_load_state_dict_pre_hook_and_prepend"""
    for desc, kwargs in all_inputs(name):
        optim = optim_class(name, impl)([torch.rand(2, 3, requires_grad=True)], **kwargs)
        state_dict = optim.state_dict()
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002, desc
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002, desc  # hook1, run last, overrides


@pytest.mark.parametrize("name, impl", cases("test_load_state_dict_post_hook"))
def test_load_state_dict_post_hook(name: str, impl: str) -> None:
    """test_optim.py::test_load_state_dict_post_hook"""
    for desc, kwargs in all_inputs(name):
        optim = optim_class(name, impl)([torch.rand(2, 3, requires_grad=True)], **kwargs)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert not optim.state["ran_load_state_dict_pre_hook2"], desc
        assert optim.state["ran_load_state_dict_post_hook"], desc


@pytest.mark.parametrize("name, impl", cases("test_load_state_dict_pre_post_hook"))
def test_load_state_dict_pre_post_hook(name: str, impl: str) -> None:
    """test_optim.py::test_load_state_dict_pre_post_hook"""
    for desc, kwargs in all_inputs(name):
        optim = optim_class(name, impl)([torch.rand(2, 3, requires_grad=True)], **kwargs)
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert optim.state["ran_load_state_dict_pre_hook2"], desc
        assert optim.state["ran_load_state_dict_post_hook"], desc


@pytest.mark.parametrize("when", ["pre", "post"])
@pytest.mark.parametrize("name, impl", cases("test_step_post_hook"))
def test_step_pre_and_post_hook(name: str, impl: str, when: str) -> None:
    """test_optim.py::test_step_post_hook and ::test_step_pre_hook (the same test but for the
    hook's kind and its counter's start): registered, the hook runs at each step; removed, not."""
    params = [torch.tensor([1.0, 1.0])]
    start = {"pre": 5, "post": 2}[when]
    for desc, kwargs in all_inputs(name):
        optim = optim_class(name, impl)(params, **kwargs)
        data = [start]

        def hook(opt: Any, args: Any, kw: Any, data: list = data) -> None:
            data[0] += 2

        handle = getattr(optim, f"register_step_{when}_hook")(hook)
        optim.step()
        optim.step()
        assert data[0] == start + 4, desc
        handle.remove()
        optim.step()
        assert data[0] == start + 4, desc


@pytest.mark.parametrize("name, impl", cases("test_step_all_hooks"))
def test_step_all_hooks(name: str, impl: str) -> None:
    """test_optim.py::test_step_all_hooks: global hooks around local ones, in order, for two
    optimizers (the second an SGD of the same implementation); all removed, none runs."""
    params = [torch.tensor([1.0, 1.0])]
    for desc, kwargs in all_inputs(name):
        optim = optim_class(name, impl)(params, **kwargs)
        optim2 = optim_class("SGD", impl)(params)
        data: list[int] = []

        def hook(value: int, data: list = data) -> Callable:
            return lambda opt, args, kw: data.append(value)

        handles = [
            register_optimizer_step_pre_hook(hook(0)),
            register_optimizer_step_post_hook(hook(5)),
        ]
        try:
            handles += [
                optim.register_step_pre_hook(hook(1)),
                optim.register_step_post_hook(hook(2)),
                optim2.register_step_pre_hook(hook(1)),
                optim2.register_step_post_hook(hook(2)),
            ]
            optim.step()
            assert data == [0, 1, 2, 5], desc
            optim2.step()
            assert data == [0, 1, 2, 5] * 2, desc
            optim.step()
            assert data == [0, 1, 2, 5] * 3, desc
        finally:
            for handle in handles:
                handle.remove()
        optim.step()
        optim2.step()
        assert data == [0, 1, 2, 5] * 3, desc


# ------------------------------------------------------------------------------- copies, state


@pytest.mark.parametrize("name, impl", cases("test_deepcopy_copies_all_public_attrs"))
def test_deepcopy_copies_all_public_attrs(name: str, impl: str) -> None:
    """test_optim.py::test_deepcopy_copies_all_public_attrs"""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)

    def public(obj: Any) -> set:
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for desc, kwargs in all_inputs(name, skip=("differentiable",)):
        optimizer = optim_class(name, impl)(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        assert public(optimizer) == public(copy.deepcopy(optimizer)), desc


@pytest.mark.parametrize("name, impl", cases("test_non_empty_state"))
def test_non_empty_state(name: str, impl: str) -> None:
    """test_optim.py::test_non_empty_state: after a step every param has a state."""
    model = torch.nn.Linear(5, 5)
    inpt = torch.rand(2, 5)
    for desc, kwargs in optim_inputs(name):
        optim = construct(name, impl, model.parameters(), **kwargs)
        optim.zero_grad()
        model(inpt).sum().backward()
        optim.step()
        for state in optim.state.values():
            assert len(state) > 0, desc
