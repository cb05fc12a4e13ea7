"""fusedopt.lr_range_test: the learning-rate range test (Smith 2017, fastai's lr_find).

On quadratics with known curvatures, where SGD is stable below 2 / (largest curvature), the
suggestion lies inside the stable range and the test stops on divergence; the smoothed loss is
fusedopt.ewma's bias-corrected EWMA (fastai's formula); afterwards the params, the optimizer's
state and its learning rates are bit-identical to what they were, for every PyTorch-style, Keras-
style and fusedopt.torch optimizer, so training continues exactly as it would have without the
test; bad input raises naming the argument and leaves the params as they were; the plot renders.
"""

from __future__ import annotations

import fractions
import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fusedopt
import fusedopt.keras_numpy as fk
from fusedopt import _lr_range, optim

CURVATURES = np.array([0.1, 1.0, 10.0])

# Options under which every state buffer of the algorithm is used.
TORCH_STYLE = {
    "SGD": {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "Adagrad": {"lr": 0.01, "lr_decay": 0.01},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True},
    "Adam": {"lr": 0.01, "amsgrad": True},
    "AdamW": {"lr": 0.01},
    "Adadelta": {"lr": 1.0},
    "Adamax": {"lr": 0.01},
    "NAdam": {"lr": 0.01},
    "RAdam": {"lr": 0.01},
    "Rprop": {"lr": 0.01},
    "ASGD": {"lr": 0.01, "t0": 2.0},
    "Lion": {"lr": 0.001},
}
KERAS_STYLE = {
    "SGD": {"momentum": 0.9},
    "Adagrad": {},
    "RMSprop": {"momentum": 0.5, "centered": True},
    "Adam": {"amsgrad": True},
    "AdamW": {},
    "Adadelta": {},
    "Adamax": {},
    "Nadam": {},
    "Lion": {},
    "Lamb": {"weight_decay": 0.01},
}


# ------------------------------------------------------------------------------------ helpers


class Quadratic:
    """``0.5 * sum(h * p**2)`` over a float64 and a float32 array, with curvatures ``h``."""

    def __init__(self, scale: float = 1.0) -> None:
        self.curvatures = [scale * CURVATURES, scale * np.array([[0.5, 2.0], [5.0, 0.2]])]
        self.params = [np.ones(3), np.array([[1.0, -2.0], [0.5, 3.0]], dtype=np.float32)]
        self.calls = 0

    @property
    def largest_curvature(self) -> float:
        return max(float(h.max()) for h in self.curvatures)

    def loss(self) -> float:
        return sum(
            0.5 * float(np.sum(h * p.astype(np.float64) ** 2))
            for h, p in zip(self.curvatures, self.params)
        )

    def __call__(self) -> tuple[float, list[np.ndarray]]:
        self.calls += 1
        grads = [(h * p).astype(p.dtype) for h, p in zip(self.curvatures, self.params)]
        return self.loss(), grads


def copies(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [a.copy() for a in arrays]


def assert_bit_identical(actual: Any, expected: Any, what: str = "") -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    assert actual.tobytes() == expected.tobytes(), what


def assert_same_state_dict(actual: dict, expected: dict) -> None:
    actual, expected = (fusedopt.flatten_state_dict(d) for d in (actual, expected))
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert_bit_identical(actual[key], value, key)
        else:
            assert actual[key] == value and type(actual[key]) is type(value), key


# ------------------------------------------------------------------------- the quadratic, SGD


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_the_suggestion_lies_inside_sgds_stable_range(scale: float) -> None:
    problem = Quadratic(scale)
    opt = fusedopt.SGD(problem.params, lr=1e-3)
    result = fusedopt.lr_range_test(opt, problem)
    stable = 2.0 / problem.largest_curvature  # SGD diverges above it
    assert result.suggestion is not None
    assert stable / 100 < result.suggestion < stable
    assert result.suggestion == result.lrs[result.suggestion_index]
    # Inside the stable range, training at the suggestion brings the loss down, step by step.
    start = problem.loss()
    opt.param_groups[0]["lr"] = result.suggestion
    losses = []
    for _ in range(1000):
        opt.step(problem()[1])
        losses.append(problem.loss())
    assert np.all(np.diff(losses) <= 0) and losses[-1] < 1e-2 * start


def test_sgd_on_the_quadratic_stops_early_on_divergence() -> None:
    problem = Quadratic()
    result = fusedopt.lr_range_test(fusedopt.SGD(problem.params, lr=0.1), problem, num_steps=100)
    assert result.diverged
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses) < 100
    assert problem.calls == len(result.lrs)  # no loss computed after the stop
    # It stopped at the first point above 4 x the smoothed minimum so far, and there only.
    minimum = np.minimum.accumulate(result.losses)
    assert result.losses[-1] > 4 * minimum[-2]
    assert np.all(result.losses[:-1] <= 4 * minimum[:-1])
    # Past the stable rate: the raw loss had been rising for the last steps.
    assert result.lrs[-1] > 2.0 / problem.largest_curvature
    assert np.all(np.diff(result.raw_losses[-4:]) > 0)
    assert result.raw_losses[-1] > 100 * result.raw_losses.min()


def test_without_a_diverge_factor_it_runs_every_step() -> None:
    problem = Quadratic()
    opt = fusedopt.SGD(problem.params, lr=0.1)
    result = fusedopt.lr_range_test(opt, problem, diverge_factor=math.inf)
    assert not result.diverged
    assert len(result.lrs) == 100
    assert result.lrs[-1] == 10.0


def test_a_loss_that_is_not_finite_stops_the_test_there() -> None:
    problem = Quadratic()

    def loss_and_grads() -> tuple[float, list[np.ndarray]]:
        loss, grads = problem()
        return (math.nan if problem.calls == 30 else loss), grads

    result = fusedopt.lr_range_test(fusedopt.Adam(problem.params), loss_and_grads)
    assert result.diverged and len(result.lrs) == 30
    assert math.isnan(result.raw_losses[-1]) and math.isnan(result.losses[-1])
    assert np.all(np.isfinite(result.losses[:-1]))


def test_the_learning_rate_rises_exponentially_from_start_to_end() -> None:
    # On loss = sum(x) SGD moves x by exactly -lr at each step: the steps show the rates used.
    x = np.zeros(1)
    seen = []

    def loss_and_grads() -> tuple[float, list[np.ndarray]]:
        seen.append(x[0])
        return float(x[0]), [np.ones(1)]

    result = fusedopt.lr_range_test(
        fusedopt.SGD([x], lr=0.5),
        loss_and_grads,
        start_lr=1e-3,
        end_lr=1.0,
        num_steps=13,
        diverge_factor=math.inf,
    )
    expected = 1e-3 * 1000.0 ** (np.arange(13) / 12)
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-14)
    assert result.lrs[0] == 1e-3 and result.lrs[-1] == 1.0
    np.testing.assert_allclose(-np.diff(seen), result.lrs[:-1], rtol=1e-12)
    assert x[0] == 0.0


# -------------------------------------------------------------------------------- smoothing


def test_the_smoothed_loss_is_fusedopts_bias_corrected_ewma() -> None:
    problem = Quadratic()
    result = fusedopt.lr_range_test(fusedopt.Adam(problem.params), problem, smoothing=0.98)
    raw = result.raw_losses
    assert_bit_identical(result.losses, fusedopt.ewma(raw, alpha=1 - 0.98, adjust=True))
    # fastai's formula: avg = b*avg + (1 - b)*loss, smoothed = avg / (1 - b**(i + 1)).
    average, fastai = 0.0, []
    for i, loss in enumerate(raw):
        average = 0.98 * average + (1 - 0.98) * loss
        fastai.append(average / (1 - 0.98 ** (i + 1)))
    np.testing.assert_allclose(result.losses, fastai, rtol=1e-13)


@pytest.mark.parametrize("smoothing", [0.0, 0.5, 0.9, 0.98, 0.999])
def test_the_step_by_step_smoothing_is_bit_identical_to_fusedopt_ewma(smoothing: float) -> None:
    """The early stop sees, step by step, exactly the values the result reports."""
    rng = np.random.default_rng(int(smoothing * 1000))
    series = np.exp(rng.normal(0.0, 1.0, 500))
    series[100:110] = series[99]  # repeated values take pandas' skip-when-equal branch
    smoother = _lr_range._Smoother(1.0 - smoothing)
    step_by_step = np.array([smoother.update(float(x)) for x in series])
    assert_bit_identical(step_by_step, fusedopt.ewma(series, alpha=1.0 - smoothing))
    if smoothing == 0.0:
        assert_bit_identical(step_by_step, series)


# ------------------------------------------------------------------------------- suggestion


def test_the_suggestion_is_the_steepest_descent_before_the_minimum() -> None:
    lrs = np.geomspace(1e-6, 1.0, 61)
    x = np.log10(lrs)
    # Falls fastest at lr 1e-3, bottoms out at 1e-2, then rises faster than it fell.
    losses = 2.0 - np.tanh(2 * (x + 3)) + np.where(x > -2, 50 * (x + 2) ** 2, 0.0)
    index = _lr_range.suggestion_index(lrs, losses, skip=6)
    assert lrs[index] == pytest.approx(1e-3)
    # The first tenth does not count, even where it is steepest.
    losses_with_early_drop = losses.copy()
    losses_with_early_drop[:5] += np.linspace(5.0, 1.0, 5) - 1.0
    assert _lr_range.suggestion_index(lrs, losses_with_early_drop, skip=6) == index


def test_the_suggestion_never_exceeds_a_tenth_of_the_lr_at_the_minimum() -> None:
    lrs = np.geomspace(1e-7, 10.0, 100)
    # Falls steadily over the first 19 points, then rises: a tenth of the lr at the minimum
    # (index 18) lies in the skipped tenth, and the capped point is taken there.
    steps = np.arange(100)
    losses = 10.0 - 0.5 * np.minimum(steps, 18) + 0.5 * np.maximum(steps - 18, 0)
    index = _lr_range.suggestion_index(lrs, losses, skip=10)
    assert index is not None and index < 10
    assert lrs[index] <= lrs[18] / 10 < lrs[index + 1]
    # A minimum less than a decade above start_lr: no lr tested is as low as a tenth of it.
    assert _lr_range.suggestion_index(lrs[50:60], losses[10:20], skip=1) is None

    # The same through lr_range_test, where the loss diverges after three steps.
    values = iter([3.0, 2.0, 1.0, math.inf])
    result = fusedopt.lr_range_test(
        fusedopt.SGD([np.ones(3)]), lambda: (next(values), [np.zeros(3)]), num_steps=10
    )
    assert result.diverged and len(result.lrs) == 4
    minimum = int(np.nanargmin(result.losses))
    assert result.suggestion is not None
    assert result.suggestion <= result.lrs[minimum] / 10


def test_no_suggestion_when_the_loss_never_falls() -> None:
    lrs = np.geomspace(1e-6, 1.0, 50)
    assert _lr_range.suggestion_index(lrs, np.linspace(1.0, 2.0, 50), skip=5) is None
    assert _lr_range.suggestion_index(lrs, np.full(50, 3.0), skip=5) is None
    # The minimum inside the skipped tenth: the loss rose from there on.
    losses = np.concatenate([[1.0, 0.5, 0.4], np.linspace(0.5, 2.0, 47)])
    assert _lr_range.suggestion_index(lrs, losses, skip=5) is None

    def rising() -> tuple[float, list[np.ndarray]]:
        return float(w[0] ** 2 + 1), [-np.ones(1)]  # every step goes uphill

    w = np.ones(1)
    result = fusedopt.lr_range_test(fusedopt.SGD([w]), rising, diverge_factor=math.inf)
    assert result.suggestion is None and result.suggestion_index is None


# ----------------------------------------------------------- exact restore, every optimizer


def test_every_optimizer_class_is_covered() -> None:
    torch_style = {n for n in optim.__all__ if getattr(optim, n) is not optim.Optimizer}
    assert torch_style == set(TORCH_STYLE)
    keras_style = {
        name
        for name, value in vars(fk).items()
        if isinstance(value, type) and issubclass(value, fk.Optimizer) and value._algorithm
    }
    assert keras_style == set(KERAS_STYLE)


@pytest.mark.parametrize("warm_steps", [0, 3], ids=["fresh", "after-3-steps"])
@pytest.mark.parametrize("name", sorted(TORCH_STYLE))
def test_pytorch_style_params_state_and_lrs_are_restored_exactly(name: str, warm_steps: int):
    problem, twin = Quadratic(), Quadratic()
    make = getattr(fusedopt, name)
    options = {k: v for k, v in TORCH_STYLE[name].items() if k != "lr"}
    groups = lambda params: [  # noqa: E731 - two groups with their own learning rates
        {"params": [params[0]], "lr": TORCH_STYLE[name]["lr"]},
        {"params": [params[1]], "lr": np.float32(0.5 * TORCH_STYLE[name]["lr"])},
    ]
    opt, twin_opt = make(groups(problem.params), **options), make(groups(twin.params), **options)
    for _ in range(warm_steps):
        opt.step(problem()[1])
        twin_opt.step(twin()[1])
    params = list(problem.params)
    values = copies(params)
    state = opt.state_dict()
    buffers = {(i, k): v for i, entry in opt.state.items() for k, v in entry.items()}
    lrs = [group["lr"] for group in opt.param_groups]

    result = fusedopt.lr_range_test(opt, problem, num_steps=40)

    assert len(result.lrs) > 5
    for p, before, value in zip(problem.params, params, values):
        assert p is before
        assert_bit_identical(p, value)
    assert_same_state_dict(opt.state_dict(), state)
    for (i, key), buffer in buffers.items():
        assert opt.state[i][key] is buffer or not isinstance(buffer, np.ndarray), (i, key)
    assert [group["lr"] for group in opt.param_groups] == lrs
    assert all(g["lr"] is lr for g, lr in zip(opt.param_groups, lrs))
    # Training goes on exactly as it would have without the test.
    for _ in range(3):
        opt.step(problem()[1])
        twin_opt.step(twin()[1])
    for p, q in zip(problem.params, twin.params):
        assert_bit_identical(p, q)
    assert_same_state_dict(opt.state_dict(), twin_opt.state_dict())


def keras_snapshot(opt: fk.Optimizer) -> dict[str, Any]:
    return {
        "iterations": opt.iterations,
        "built": opt.built,
        "learning_rate": opt._learning_rate,
        "slots": [(v, v.copy()) for v in opt.variables],
        "scalars": dict(opt._scalars),
    }


@pytest.mark.parametrize("warm_steps", [0, 3], ids=["unbuilt", "after-3-steps"])
@pytest.mark.parametrize("name", sorted(KERAS_STYLE))
def test_keras_style_variables_slots_and_learning_rate_are_restored_exactly(
    name: str, warm_steps: int
) -> None:
    problem, twin = Quadratic(), Quadratic()
    make = getattr(fk, name)
    schedule = lambda t: 0.01 / (1 + 0.1 * t)  # noqa: E731 - a schedule comes back as itself
    opt = make(learning_rate=schedule, **KERAS_STYLE[name])
    twin_opt = make(learning_rate=schedule, **KERAS_STYLE[name])
    for _ in range(warm_steps):
        opt.apply(problem()[1], problem.params)
        twin_opt.apply(twin()[1], twin.params)
    values = copies(problem.params)
    before = keras_snapshot(opt)

    result = fusedopt.lr_range_test(opt, problem, variables=problem.params, num_steps=40)

    assert len(result.lrs) > 5
    for p, value in zip(problem.params, values):
        assert_bit_identical(p, value)
    after = keras_snapshot(opt)
    assert after["iterations"] == before["iterations"] == warm_steps
    assert after["built"] is before["built"] is (warm_steps > 0)
    assert after["learning_rate"] is schedule
    assert after["scalars"] == before["scalars"]  # Nadam's u_product
    assert len(after["slots"]) == len(before["slots"])
    for (slot, _), (saved_slot, value) in zip(after["slots"], before["slots"]):
        assert slot is saved_slot
        assert_bit_identical(slot, value)
    for _ in range(3):
        opt.apply(problem()[1], problem.params)
        twin_opt.apply(twin()[1], twin.params)
    for p, q in zip(problem.params, twin.params):
        assert_bit_identical(p, q)
    for a, b in zip(opt.variables, twin_opt.variables):
        assert_bit_identical(a, b)
    assert opt.iterations == twin_opt.iterations


def test_a_built_keras_optimizer_takes_its_own_variables() -> None:
    problem = Quadratic()
    opt = fk.Adam(learning_rate=0.01)
    opt.apply(problem()[1], problem.params)
    result = fusedopt.lr_range_test(opt, problem, num_steps=20)
    assert len(result.lrs) == 20 and opt.learning_rate == pytest.approx(0.01)
    with pytest.raises(ValueError, match=r"variables\[1\] is not one of the variables"):
        fusedopt.lr_range_test(opt, problem, variables=[problem.params[0], np.ones(4)])


def test_an_error_midway_still_restores_everything() -> None:
    problem = Quadratic()
    opt = fusedopt.Adam(problem.params, lr=0.01)
    opt.step(problem()[1])
    values, state = copies(problem.params), opt.state_dict()

    def failing() -> tuple[float, list[np.ndarray]]:
        if problem.calls == 20:
            raise RuntimeError("the data loader broke")
        return problem()

    with pytest.raises(RuntimeError, match="data loader"):
        fusedopt.lr_range_test(opt, failing)
    for p, value in zip(problem.params, values):
        assert_bit_identical(p, value)
    assert_same_state_dict(opt.state_dict(), state)


# -------------------------------------------------------------------------------- torch


def torch_problem(torch: Any, dtype: Any, seed: int = 0) -> tuple[list[Any], Any]:
    generator = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in [(4, 3), (3,)]
    ]
    inputs = torch.randn(16, 4, generator=generator, dtype=dtype)
    targets = torch.randn(16, 3, generator=generator, dtype=dtype)

    def closure() -> Any:
        for p in params:
            p.grad = None
        loss = ((inputs @ params[0] + params[1] - targets) ** 2).mean()
        loss.backward()
        return loss

    return params, closure


def torch_state(optimizer: Any) -> dict[str, Any]:
    import copy

    return copy.deepcopy(optimizer.state_dict())


def assert_same_torch_state(torch: Any, actual: dict, expected: dict) -> None:
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert actual["state"][index].keys() == entry.keys(), index
        for key, value in entry.items():
            mine = actual["state"][index][key]
            if torch.is_tensor(value):
                assert mine.dtype == value.dtype, (index, key)
                assert torch.equal(mine, value), (index, key)
            else:
                assert mine == value, (index, key)


@pytest.mark.parametrize("warm_steps", [0, 3], ids=["fresh", "after-3-steps"])
@pytest.mark.parametrize("name", sorted(TORCH_STYLE))
def test_fusedopt_torch_params_state_and_lrs_are_restored_exactly(name: str, warm_steps: int):
    torch = pytest.importorskip("torch")
    import fusedopt.torch as ft

    dtype = torch.float64 if name in ("NAdam", "ASGD") else torch.float32
    params, closure = torch_problem(torch, dtype)
    twin_params, twin_closure = torch_problem(torch, dtype)
    opt = getattr(ft, name)(params, **TORCH_STYLE[name])
    twin = getattr(ft, name)(twin_params, **TORCH_STYLE[name])
    for _ in range(warm_steps):
        opt.step(closure)
        twin.step(twin_closure)
    values = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    grad_values = [None if g is None else g.clone() for g in grads]
    state = torch_state(opt)
    param_groups, group = opt.param_groups, opt.param_groups[0]
    lr = group["lr"]

    result = fusedopt.lr_range_test(opt, closure, num_steps=40)

    assert len(result.lrs) > 5 and np.all(np.isfinite(result.raw_losses[:5]))
    for p, value, grad, grad_value in zip(params, values, grads, grad_values):
        assert torch.equal(p.detach(), value)
        assert p.grad is grad
        assert grad is None or torch.equal(grad, grad_value)
    assert_same_torch_state(torch, opt.state_dict(), state)
    # The same list of the same group dicts (load_state_dict makes new ones): a group a user
    # holds still steers the optimizer.
    assert opt.param_groups is param_groups and opt.param_groups[0] is group
    assert group["lr"] is lr
    for _ in range(3):
        opt.step(closure)
        twin.step(twin_closure)
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())
    assert_same_torch_state(torch, opt.state_dict(), twin.state_dict())


def test_torch_optim_and_a_scheduled_lr_come_back_too() -> None:
    torch = pytest.importorskip("torch")
    params, closure = torch_problem(torch, torch.float32)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.step(closure)
        scheduler.step()
    values, state = [p.detach().clone() for p in params], torch_state(opt)
    group = opt.param_groups[0]
    result = fusedopt.lr_range_test(opt, closure, num_steps=30)
    assert result.suggestion is not None
    for p, value in zip(params, values):
        assert torch.equal(p.detach(), value)
    assert_same_torch_state(torch, opt.state_dict(), state)
    assert scheduler.get_last_lr() == [0.05]
    assert opt.param_groups[0] is group
    scheduler.step()
    assert group["lr"] == 0.025  # the scheduler (and a user) still steer it through the group
    group["lr"] = 0.0
    opt.step(closure)
    opt.step(closure)  # momentum times lr 0: no move
    for p, value in zip(params, values):
        assert torch.equal(p.detach(), value)


def test_a_closure_that_leaves_no_grad_is_refused() -> None:
    torch = pytest.importorskip("torch")
    import fusedopt.torch as ft

    params, _ = torch_problem(torch, torch.float32)
    values = [p.detach().clone() for p in params]
    opt = ft.Adam(params)
    with pytest.raises(ValueError, match="loss_and_grads.*backward"):
        fusedopt.lr_range_test(opt, lambda: torch.tensor(1.0))
    with pytest.raises(TypeError, match="loss_and_grads"):
        fusedopt.lr_range_test(opt, lambda: None)
    for p, value in zip(params, values):
        assert torch.equal(p.detach(), value)
    with pytest.raises(TypeError, match="variables"):
        fusedopt.lr_range_test(opt, lambda: None, variables=params)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("arguments", "error", "name"),
    [
        ({"start_lr": 1.0, "end_lr": 1.0}, ValueError, "start_lr"),
        ({"start_lr": 2.0, "end_lr": 1.0}, ValueError, "start_lr"),
        ({"start_lr": 0.0}, ValueError, "start_lr"),
        ({"start_lr": -1e-3}, ValueError, "start_lr"),
        ({"end_lr": -1.0}, ValueError, "end_lr"),
        ({"end_lr": math.inf}, ValueError, "end_lr"),
        ({"end_lr": math.nan}, ValueError, "end_lr"),
        ({"start_lr": "1e-3"}, TypeError, "start_lr"),
        ({"start_lr": True}, TypeError, "start_lr"),
        # Distinct, but too close for 100 rising rates (the slopes would divide by zero).
        ({"start_lr": 1.0, "end_lr": math.nextafter(1.0, 2.0)}, ValueError, "start_lr.*num_steps"),
        ({"num_steps": 1}, ValueError, "num_steps"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"num_steps": 10.0}, TypeError, "num_steps"),
        ({"num_steps": True}, TypeError, "num_steps"),
        ({"smoothing": 1.0}, ValueError, "smoothing"),
        ({"smoothing": -0.1}, ValueError, "smoothing"),
        ({"diverge_factor": 1.0}, ValueError, "diverge_factor"),
        ({"diverge_factor": math.nan}, ValueError, "diverge_factor"),
        ({"variables": [np.ones(3)]}, TypeError, "variables"),
    ],
)
def test_bad_arguments_raise_naming_them(arguments: dict, error: type, name: str) -> None:
    problem = Quadratic()
    opt = fusedopt.SGD(problem.params, lr=0.1, momentum=0.9)
    values = copies(problem.params)
    with pytest.raises(error, match=name):
        fusedopt.lr_range_test(opt, problem, **arguments)
    assert problem.calls == 0
    for p, value in zip(problem.params, values):
        assert_bit_identical(p, value)
    assert opt.state == {}


def make_bad(kind: str, problem: Quadratic):
    def loss_and_grads() -> Any:
        loss, grads = problem()
        if problem.calls < 10:  # fine at first: the error comes after steps were taken
            return loss, grads
        if kind == "count":
            return loss, grads[:1]
        if kind == "shape":
            return loss, [grads[0][:2], grads[1]]
        if kind == "dtype":
            return loss, [grads[0].astype(np.float32), grads[1]]
        if kind == "none":
            return loss, [None, grads[1]]
        if kind == "not-a-pair":
            return loss
        if kind == "triple":
            return loss, grads, None
        if kind == "loss":
            return "high", grads
        if kind == "loss-str":  # float() would take it
            return "1.5", grads
        if kind == "loss-bool":
            return True, grads
        if kind == "loss-complex":
            return np.complex128(loss), grads
        if kind == "loss-float-raises":
            return type("Loss", (), {"__float__": lambda self: 1 / 0})(), grads
        if kind == "grads-not-a-list":
            return loss, {"w": grads[0]}
        raise AssertionError(kind)

    return loss_and_grads


BAD_RETURNS = [
    ("count", ValueError),
    ("shape", ValueError),
    ("dtype", TypeError),
    ("none", TypeError),
    ("not-a-pair", TypeError),
    ("triple", TypeError),
    ("loss", TypeError),
    ("loss-str", TypeError),
    ("loss-bool", TypeError),
    ("loss-complex", TypeError),
    ("loss-float-raises", TypeError),
    ("grads-not-a-list", TypeError),
]


@pytest.mark.parametrize(("kind", "error"), BAD_RETURNS, ids=[k for k, _ in BAD_RETURNS])
def test_bad_grads_raise_naming_loss_and_grads_and_the_params_stay(kind: str, error: type):
    problem = Quadratic()
    opt = fusedopt.Adam(problem.params, lr=0.01)
    opt.step(problem()[1])
    values, state = copies(problem.params), opt.state_dict()
    with pytest.raises(error, match="loss_and_grads"):
        fusedopt.lr_range_test(opt, make_bad(kind, problem))
    assert problem.calls == 10
    for p, value in zip(problem.params, values):
        assert_bit_identical(p, value)
    assert_same_state_dict(opt.state_dict(), state)


@pytest.mark.parametrize(
    "make_loss",
    [int, float, np.float32, fractions.Fraction, np.array, lambda x: np.array([x])],
    ids=["int", "float", "np.float32", "Fraction", "0-d", "one-element"],
)
def test_the_loss_is_any_real_number_or_one_element_array(make_loss: Callable) -> None:
    problem = Quadratic()
    result = fusedopt.lr_range_test(
        fusedopt.SGD(problem.params), lambda: (make_loss(round(problem()[0])), problem()[1])
    )
    assert result.raw_losses.dtype == np.float64 and result.raw_losses[0] == round(problem.loss())


def test_bad_keras_grads_and_variables_raise_and_the_variables_stay() -> None:
    problem = Quadratic()
    values = copies(problem.params)
    opt = fk.Adam(learning_rate=0.01)
    with pytest.raises(TypeError, match="variables.*not built"):
        fusedopt.lr_range_test(opt, problem)
    with pytest.raises(TypeError, match="variables"):
        fusedopt.lr_range_test(opt, problem, variables=np.ones(3))
    with pytest.raises(TypeError, match=r"variables\[1\]"):
        fusedopt.lr_range_test(opt, problem, variables=[np.ones(3), [1.0]])
    with pytest.raises(ValueError, match=r"loss_and_grads.*grads\[0\].*variables\[0\]"):
        fusedopt.lr_range_test(opt, make_bad("shape", problem), variables=problem.params)
    assert not opt.built and opt.iterations == 0
    for p, value in zip(problem.params, values):
        assert_bit_identical(p, value)
    # None grads are Keras': that variable is left alone.
    result = fusedopt.lr_range_test(
        opt, lambda: (problem()[0], [None, problem()[1][1]]), variables=problem.params
    )
    assert len(result.lrs) > 1


def test_what_is_not_an_optimizer_or_a_callable_is_refused() -> None:
    problem = Quadratic()
    with pytest.raises(TypeError, match="optimizer"):
        fusedopt.lr_range_test(object(), problem)
    with pytest.raises(TypeError, match="loss_and_grads"):
        fusedopt.lr_range_test(fusedopt.SGD(problem.params), [1.0])


# --------------------------------------------------------------------------------- the plot


def test_the_plot_renders(tmp_path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problem = Quadratic()
    result = fusedopt.lr_range_test(fusedopt.SGD(problem.params), problem)
    ax = result.plot()
    assert ax.get_xscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["loss", "smoothed loss", f"suggested lr {result.suggestion:.3g}"]
    marker = ax.lines[-1]
    assert marker.get_xdata()[0] == result.suggestion
    output = tmp_path / "range-test.png"
    ax.figure.savefig(output)
    assert output.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    plt.close(ax.figure)

    # On given axes, a curve that ends in NaN and has no suggestion.
    figure, axes = plt.subplots()

    def nan_at_once() -> tuple[float, list[np.ndarray]]:
        return math.nan, problem()[1]

    empty = fusedopt.lr_range_test(fusedopt.SGD(problem.params), nan_at_once)
    assert empty.suggestion is None and len(empty.lrs) == 1
    assert empty.plot(axes) is axes
    figure.savefig(tmp_path / "empty.png")
    plt.close(figure)


def test_import_fusedopt_imports_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys, fusedopt; fusedopt.lr_range_test; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'keras') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---- Keras optimizers (fusedopt.keras and Keras' own) over a Keras model ----------------------


def keras_model_and_loss(seed: int = 0) -> tuple[Any, Callable[[], Any]]:
    """A small Keras model on the torch backend, and its loss_and_grads (torch autograd)."""
    keras = pytest.importorskip("keras")
    torch = pytest.importorskip("torch")
    if keras.backend.backend() != "torch":
        pytest.skip("fusedopt.keras runs on Keras' torch backend")
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def loss_and_grads() -> tuple[Any, list[Any]]:
        loss = torch.mean((model(x) - y) ** 2)
        grads = torch.autograd.grad(loss, [v.value for v in model.trainable_variables])
        return loss, list(grads)

    return model, loss_and_grads


def keras_values(variables: list[Any]) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in variables]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras
@pytest.mark.parametrize("make", ["fusedopt.keras.Adam", "fusedopt.keras.SGD", "keras.SGD"])
def test_keras_optimizer_variables_and_state_are_restored_and_training_goes_on_as_before(
    make: str,
) -> None:
    model, loss_and_grads = keras_model_and_loss()
    import keras

    import fusedopt.keras

    module, name = make.rsplit(".", 1)
    cls = getattr(fusedopt.keras if module == "fusedopt.keras" else keras.optimizers, name)
    options = {"momentum": 0.9} if name == "SGD" else {}
    optimizer = cls(learning_rate=0.01, **options)
    variables = model.trainable_variables
    _, grads = loss_and_grads()
    optimizer.apply(grads, variables)  # some state to restore
    before = keras_values(variables)
    state_before = keras_values(optimizer.variables)
    result = fusedopt.lr_range_test(
        optimizer, loss_and_grads, start_lr=1e-4, end_lr=10.0, num_steps=40
    )
    assert len(result.lrs) >= 2 and result.lrs[0] == 1e-4
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    for v, b in zip(optimizer.variables, state_before):
        np.testing.assert_array_equal(v.numpy(), b)
    assert float(optimizer.learning_rate.numpy()) == np.float32(0.01)
    # Training goes on exactly as an optimizer that never saw the test.
    twin_model, twin_loss_and_grads = keras_model_and_loss()
    twin = cls(learning_rate=0.01, **options)
    _, grads = twin_loss_and_grads()
    twin.apply(grads, twin_model.trainable_variables)
    for _ in range(3):
        optimizer.apply(loss_and_grads()[1], variables)
        twin.apply(twin_loss_and_grads()[1], twin_model.trainable_variables)
    for a, b in zip(variables, twin_model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras
def test_keras_optimizer_not_built_and_with_a_schedule_is_left_with_its_schedule() -> None:
    model, loss_and_grads = keras_model_and_loss()
    import keras

    import fusedopt.keras

    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.5)
    optimizer = fusedopt.keras.Adam(learning_rate=schedule)
    before = keras_values(model.trainable_variables)
    result = fusedopt.lr_range_test(
        optimizer, loss_and_grads, variables=model.trainable_variables, num_steps=20
    )
    assert len(result.lrs) >= 2
    assert optimizer._learning_rate is schedule
    assert int(optimizer.iterations.numpy()) == 0
    assert all(not np.any(v.numpy()) for v in optimizer.variables if "iteration" not in v.path)
    for v, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras
def test_keras_optimizer_bad_grads_and_variables_raise_and_change_nothing() -> None:
    model, loss_and_grads = keras_model_and_loss()
    import keras

    import fusedopt.keras

    optimizer = fusedopt.keras.SGD(learning_rate=0.01)
    variables = model.trainable_variables
    before = keras_values(variables)
    with pytest.raises(TypeError, match="variables: SGD is not built yet"):
        fusedopt.lr_range_test(optimizer, loss_and_grads)
    with pytest.raises(ValueError, match="returned 3 grads for 4 variables"):
        fusedopt.lr_range_test(
            optimizer, lambda: (1.0, loss_and_grads()[1][:3]), variables=variables
        )
    with pytest.raises(ValueError, match=r"grads\[0\] with shape"):
        fusedopt.lr_range_test(
            optimizer,
            lambda: (1.0, [g.T if i == 0 else g for i, g in enumerate(loss_and_grads()[1])]),
            variables=variables,
        )
    with pytest.raises(TypeError, match=r"variables\[0\] must be a keras.Variable"):
        fusedopt.lr_range_test(optimizer, loss_and_grads, variables=[np.zeros(3)])
    with pytest.raises(TypeError, match="inner_optimizer"):
        fusedopt.lr_range_test(
            keras.optimizers.LossScaleOptimizer(optimizer), loss_and_grads, variables=variables
        )
    # Refused, the optimizer is left unbuilt, so it builds for the variables training gives.
    assert not optimizer.built
    own = keras.optimizers.Adam(0.01)
    with pytest.raises(ValueError, match="returned 4 grads for 2 variables"):
        fusedopt.lr_range_test(own, loss_and_grads, variables=variables[:2])
    assert not own.built
    # Keras' apply divides the grads by loss_scale_factor: the test would step with others.
    for scaled in (
        fusedopt.keras.SGD(0.01, loss_scale_factor=128.0),
        keras.optimizers.Adam(0.01, loss_scale_factor=128.0),
    ):
        with pytest.raises(ValueError, match="optimizer: .* loss_scale_factor=128.0"):
            fusedopt.lr_range_test(scaled, loss_and_grads, variables=variables)
    # ... and with gradient_accumulation_steps it updates at every n-th call only.
    for accumulating in (
        fusedopt.keras.SGD(0.01, gradient_accumulation_steps=4),
        keras.optimizers.Adam(0.01, gradient_accumulation_steps=4),
    ):
        with pytest.raises(ValueError, match="optimizer: .* gradient_accumulation_steps=4"):
            fusedopt.lr_range_test(accumulating, loss_and_grads, variables=variables)
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    own.apply(loss_and_grads()[1], variables)
    assert len(own._trainable_variables) == len(variables)
