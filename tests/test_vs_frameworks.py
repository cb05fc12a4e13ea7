"""fusedopt beside the real frameworks: torch.optim, Keras 3 (torch backend) and pandas.

The reference oracle is checked against these frameworks in ``test_reference_vs_frameworks.py``;
this file closes the loop end to end, running fusedopt's own kernels (every tensor of a step in
one native call, float32 and float64) beside the framework for whole trajectories with a learning
rate that changes every step. A framework that is not installed skips its tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from typing import Any

import numpy as np
import pytest

import fusedopt
import fusedopt.keras as fk
from fusedopt import reference

STEPS = 20
SHAPES = [(5, 7), (33,), (1,), (0,), (130,)]
# The learning rate changes every step: a convention that kept old rates in a momentum buffer
# (Keras) instead of applying the current one (torch) would drift visibly.
LEARNING_RATES = [0.01 * (1.0 + 0.5 * np.sin(t)) for t in range(STEPS)]

# float64: both sides round each operation once, in forms equal up to operand order; measured
# worst over this grid 1.7e-14 relative (fused SGD with Nesterov), far inside 1e-10.
# float32: fusedopt computes its per-step coefficients in double (spec A.6) where torch and Keras
# mix double scalars into float32 arithmetic, so each step differs by a few float32 ulps (6e-8);
# over 20 steps, with momentum carrying them and Adam/RMSprop dividing by sqrt(v) + eps, the
# measured worst is 3.8e-6 relative (torch RMSprop with momentum, the atol below counting as the
# floor for values near zero), 2.6x inside rtol 1e-5. Keras Adam adds a known term on top
# (keras_adam_float32_atol).
TOLERANCE = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-10, atol=1e-12)}
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def case_id(case: tuple[str, dict]) -> str:
    name, options = case
    return "-".join([name, *(f"{k}={v}" for k, v in options.items())])


def problem(dtype: type, seed: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Starting params and one list of gradients per step."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


# --------------------------------------------------------------------------------------------
# torch.optim
# --------------------------------------------------------------------------------------------

TORCH_CASES = [
    ("SGD", {}),
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("SGD", {"momentum": 0.7, "nesterov": True, "weight_decay": 0.1, "maximize": True}),
    ("Adagrad", {}),
    (
        "Adagrad",
        {"lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.2, "eps": 1e-6},
    ),
    ("Adagrad", {"maximize": True}),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True}),
    ("RMSprop", {"momentum": 0.8, "weight_decay": 0.05}),
    ("RMSprop", {"centered": True, "momentum": 0.5, "alpha": 0.9, "eps": 1e-3, "maximize": True}),
    ("Adam", {}),
    ("Adam", {"amsgrad": True}),
    ("Adam", {"weight_decay": 0.1}),
    ("Adam", {"amsgrad": True, "maximize": True, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("AdamW", {}),
    ("AdamW", {"weight_decay": 0.1, "amsgrad": True}),
    ("AdamW", {"maximize": True, "betas": (0.5, 0.9)}),
]


def torch_module() -> Any:
    return pytest.importorskip("torch")


def torch_params(torch: Any, params: list[np.ndarray]) -> list[Any]:
    return [torch.nn.Parameter(torch.tensor(p)) for p in params]


def assert_matches_torch(
    params: list[np.ndarray], opt: Any, tparams: list[Any], topt: Any, dtype: type, what: str
) -> None:
    for i, (p, tp) in enumerate(zip(params, tparams)):
        np.testing.assert_allclose(
            p, tp.detach().numpy(), **TOLERANCE[dtype], err_msg=f"params[{i}] {what}"
        )
        tstate = topt.state[tp]
        state = opt.state.get(i, {})
        for key, value in tstate.items():
            if key == "step":
                assert state["step"] == int(value.item()), f"step of params[{i}] {what}"
            elif value is not None:
                np.testing.assert_allclose(
                    state[key],
                    value.numpy(),
                    **TOLERANCE[dtype],
                    err_msg=f"{key} of params[{i}] {what}",
                )
        assert set(state) <= set(tstate), f"extra state of params[{i}]"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("foreach", [False, True], ids=["for_loop", "foreach"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=map(case_id, TORCH_CASES))
def test_trajectory_matches_torch_optim(case: tuple[str, dict], foreach: bool, dtype: type) -> None:
    torch = torch_module()
    name, options = case
    params, grads = problem(dtype, seed=len(case_id(case)))
    tparams = torch_params(torch, params)
    topt = getattr(torch.optim, name)(tparams, lr=LEARNING_RATES[0], foreach=foreach, **options)
    opt = getattr(fusedopt, name)(params, lr=LEARNING_RATES[0], **options)
    for t in range(STEPS):
        topt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] = LEARNING_RATES[t]
        for tp, g in zip(tparams, grads[t]):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(grads[t])
    assert_matches_torch(params, opt, tparams, topt, dtype, f"after {STEPS} steps")


def test_groups_and_changing_hyperparameters_match_torch() -> None:
    """Two groups, with betas and weight decay changed between steps, as a schedule would."""
    torch = torch_module()
    params, grads = problem(np.float64, seed=11)
    tparams = torch_params(torch, params)
    groups = lambda ps: [{"params": ps[:2], "amsgrad": True}, {"params": ps[2:], "lr": 0.1}]  # noqa: E731
    topt = torch.optim.Adam(groups(tparams), lr=0.01, foreach=False)
    opt = fusedopt.Adam(groups(params), lr=0.01)
    for t in range(STEPS):
        for group_list in (topt.param_groups, opt.param_groups):
            group_list[0]["betas"] = (0.9 - 0.01 * t, 0.999)
            group_list[1]["weight_decay"] = 0.01 * (t % 3)
        for tp, g in zip(tparams, grads[t]):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(grads[t])
    assert_matches_torch(params, opt, tparams, topt, np.float64, "with changing groups")


FUSED_CASES = [
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.9, "nesterov": True, "maximize": True, "weight_decay": 0.05}),
    ("SGD", {}),
    ("Adam", {}),
    ("Adam", {"amsgrad": True, "maximize": True, "weight_decay": 0.1}),
    ("AdamW", {"weight_decay": 0.1}),
    ("AdamW", {"amsgrad": True}),
]
SKIPPED_STEPS = {3, 7, 8}  # steps (0-based) whose gradients overflowed: found_inf = 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=map(case_id, FUSED_CASES))
def test_grad_scale_and_found_inf_match_torch_fused(case: tuple[str, dict], dtype: type) -> None:
    """torch's fused kernels under a GradScaler (spec section 8): the gradient is unscaled inside
    the pass and written back; a step with found_inf leaves params, state, step and grads alone."""
    torch = torch_module()
    name, options = case
    params, grads = problem(dtype, seed=len(case_id(case)) + 100)
    tparams = torch_params(torch, params)
    topt = getattr(torch.optim, name)(tparams, lr=LEARNING_RATES[0], fused=True, **options)
    opt = getattr(fusedopt, name)(params, lr=LEARNING_RATES[0], **options)
    scale = 2.0**12
    topt.grad_scale = torch.tensor(scale, dtype=torch.float32)
    for t in range(STEPS):
        topt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] = LEARNING_RATES[t]
        found_inf = 1.0 if t in SKIPPED_STEPS else 0.0
        scaled = [g * dtype(scale) for g in grads[t]]
        if found_inf:
            scaled[0][...] = np.inf
        topt.found_inf = torch.tensor(found_inf, dtype=torch.float32)
        for tp, g in zip(tparams, scaled):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(scaled, grad_scale=scale, found_inf=np.float32(found_inf))
        for i, (g, tp) in enumerate(zip(scaled, tparams)):
            np.testing.assert_array_equal(
                g, tp.grad.numpy(), err_msg=f"grads[{i}] written back at step {t}"
            )
        if not found_inf:
            np.testing.assert_array_equal(scaled[1], grads[t][1])  # a power-of-two scale is exact
        assert_matches_torch(params, opt, tparams, topt, dtype, f"at step {t}")


# --------------------------------------------------------------------------------------------
# Keras 3
# --------------------------------------------------------------------------------------------

KERAS_CASES = [
    ("SGD", {}),
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05}),
    ("Adagrad", {}),
    ("Adagrad", {"initial_accumulator_value": 0.0, "epsilon": 1e-3, "weight_decay": 0.1}),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True, "momentum": 0.8, "rho": 0.8}),
    ("RMSprop", {"momentum": 0.5, "weight_decay": 0.01}),
    ("Adam", {}),
    ("Adam", {"amsgrad": True, "beta_1": 0.8, "weight_decay": 0.1}),
    ("AdamW", {}),
    ("AdamW", {"weight_decay": 0.1, "amsgrad": True}),
    ("SGD", {"momentum": 0.9, "clipnorm": 1.0}),
    ("Adam", {"clipvalue": 0.5}),
    ("RMSprop", {"global_clipnorm": 2.0}),
    ("AdamW", {"clipnorm": 0.5, "amsgrad": True}),
]

# fusedopt.keras state name -> the Keras optimizer attribute holding that slot per variable.
KERAS_SLOTS = {
    "SGD": {"momentum": "momentums"},
    "Adagrad": {"accumulator": "_accumulators"},
    "RMSprop": {
        "velocity": "_velocities",
        "momentum": "_momentums",
        "average_gradient": "_average_gradients",
    },
    "Adam": {"momentum": "_momentums", "velocity": "_velocities", "velocity_hat": "_velocity_hats"},
}
KERAS_SLOTS["AdamW"] = KERAS_SLOTS["Adam"]
KERAS_SHAPES = [(5, 7), (33,), (1,), (130,)]  # Keras variables need a nonzero size


def keras_adam_float32_atol(rates: list[float], beta_2: float) -> float:
    """Keras computes Adam's bias correction 1 - beta_2**t in the variable's dtype (spec 1), and
    in float32 that subtraction cancels: its relative error is u/(1 - beta_2**t), 6e-5 at t = 1
    with beta_2 = 0.999. fusedopt computes it in double. Adam's step is about lr in size, so step t
    may differ by lr_t * u/(1 - beta_2**t) (the square root halves the error; the other half
    covers the beta_1 correction and the power's own rounding). Measured: 1.4e-6 for the constant
    schedule here, whose bound is 2.1e-6."""
    return sum(
        rate * FLOAT32_UNIT_ROUNDOFF / (1.0 - beta_2**t) for t, rate in enumerate(rates, start=1)
    )


@pytest.fixture(scope="module")
def keras() -> Any:
    return pytest.importorskip("keras")


def run_beside_keras(keras: Any, name: str, options: dict, learning_rate: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in KERAS_SHAPES]
    variables = [keras.Variable(p, dtype="float32") for p in params]
    kopt = getattr(keras.optimizers, name)(learning_rate=learning_rate, **options)
    opt = getattr(fk, name)(learning_rate=learning_rate, **options)
    rates = []
    for t in range(STEPS):
        if not callable(learning_rate):
            kopt.learning_rate = opt.learning_rate = LEARNING_RATES[t]
        rates.append(opt.learning_rate)
        # Large gradients every other step, so that the clip options do clip.
        grads = [
            (rng.standard_normal(s) * (3.0 if t % 2 else 0.1)).astype(np.float32)
            for s in KERAS_SHAPES
        ]
        kopt.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        opt.apply(grads, params)
        assert opt.iterations == int(kopt.iterations.numpy()) == t + 1
    tolerance = dict(TOLERANCE[np.float32])
    if name in ("Adam", "AdamW"):
        tolerance["atol"] += keras_adam_float32_atol(rates, options.get("beta_2", 0.999))
    for i, (p, v) in enumerate(zip(params, variables)):
        np.testing.assert_allclose(
            p, keras.ops.convert_to_numpy(v.value), **tolerance, err_msg=f"variable {i}"
        )
        for key, attribute in KERAS_SLOTS[name].items():
            slots = getattr(kopt, attribute, None)
            # Both create a slot only when its option is on.
            assert (key in opt.state[i]) == bool(slots), f"{key} of variable {i}"
            if slots:
                np.testing.assert_allclose(
                    opt.state[i][key],
                    keras.ops.convert_to_numpy(slots[i].value),
                    **TOLERANCE[np.float32],
                    err_msg=f"{key} of variable {i}",
                )


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("case", KERAS_CASES, ids=map(case_id, KERAS_CASES))
def test_trajectory_matches_keras(keras: Any, case: tuple[str, dict]) -> None:
    name, options = case
    run_beside_keras(keras, name, options, LEARNING_RATES[0], seed=len(case_id(case)))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_learning_rate_schedule_object_matches_keras(keras: Any, name: str) -> None:
    """The same LearningRateSchedule object, called by both with the 0-based iteration."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=3, decay_rate=0.5)
    options = {"momentum": 0.9} if name == "SGD" else {}
    run_beside_keras(keras, name, options, schedule, seed=3)
    opt = getattr(fk, name)(learning_rate=schedule)
    opt.apply([np.zeros(2, np.float32)], [np.zeros(2, np.float32)])
    assert opt.learning_rate == pytest.approx(0.05 * 0.5 ** (1 / 3), rel=1e-6)


# --------------------------------------------------------------------------------------------
# pandas
# --------------------------------------------------------------------------------------------

DECAYS = [
    ("com", 0.5),
    ("com", 1.0),
    ("span", 7.0),
    ("halflife", 2.5),
    ("alpha", 0.05),
    ("alpha", 0.3),
    ("alpha", 1.0),
    ("com", 0.0),
]


@pytest.fixture(scope="module")
def pd() -> Any:
    return pytest.importorskip("pandas")


def series_with_nans(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal(n) * 10
    x[:3] = np.nan  # leading NaNs
    for start in rng.integers(3, n - 5, size=n // 15):  # runs of NaNs of 1 to 4
        x[start : start + rng.integers(1, 5)] = np.nan
    x[rng.integers(0, n, size=n // 10)] = 2.5  # repeated values take pandas' y == x branch
    return x


# Each decay parameter as pandas' center of mass (spec 9).
CENTER_OF_MASS = {
    "com": lambda v: v,
    "span": lambda v: (v - 1) / 2,
    "halflife": lambda v: 1 / (1 - np.exp(np.log(0.5) / v)) - 1,
    "alpha": lambda v: (1 - v) / v,
}


def pandas3_differs(pd: Any, parameter: str, value: float, adjust: bool, ignore_na: bool) -> bool:
    """pandas >= 3.0 changed com == 1 with adjust=False and NaN gaps (spec 9, pandas #66523);
    fusedopt keeps pandas 2's rule there, so that case is compared with the reference instead."""
    pandas3 = int(pd.__version__.split(".")[0]) >= 3
    return pandas3 and CENTER_OF_MASS[parameter](value) == 1.0 and not adjust and not ignore_na


@pytest.mark.parametrize(("parameter", "value"), DECAYS, ids=[f"{p}={v}" for p, v in DECAYS])
@pytest.mark.parametrize("adjust", [True, False], ids=["adjust", "no_adjust"])
@pytest.mark.parametrize("ignore_na", [False, True], ids=["keep_na", "ignore_na"])
@pytest.mark.parametrize("min_periods", [0, 4])
def test_ewma_series_is_bit_identical_to_pandas(
    pd: Any, parameter: str, value: float, adjust: bool, ignore_na: bool, min_periods: int
) -> None:
    x = series_with_nans(np.random.default_rng(int(value * 100) + adjust), 300)
    options = {
        parameter: value,
        "adjust": adjust,
        "ignore_na": ignore_na,
        "min_periods": min_periods,
    }
    actual = fusedopt.ewma(x, **options)
    if pandas3_differs(pd, parameter, value, adjust, ignore_na):
        np.testing.assert_array_equal(actual, reference.ewma(x, **options))
    else:
        np.testing.assert_array_equal(actual, pd.Series(x).ewm(**options).mean().to_numpy())


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(("parameter", "value"), [("span", 5.0), ("alpha", 0.2), ("halflife", 3.0)])
@pytest.mark.parametrize("adjust", [True, False], ids=["adjust", "no_adjust"])
@pytest.mark.parametrize("ignore_na", [False, True], ids=["keep_na", "ignore_na"])
def test_ewma_2d_is_bit_identical_to_dataframe(
    pd: Any, axis: int, parameter: str, value: float, adjust: bool, ignore_na: bool
) -> None:
    """axis=0: each column a series (DataFrame.ewm); axis=1: each row (the transposed frame's
    columns, as pandas 3 has no axis argument)."""
    rng = np.random.default_rng(axis)
    columns = np.stack([series_with_nans(rng, 120) for _ in range(9)], axis=1)  # (120, 9)
    x = columns if axis == 0 else np.ascontiguousarray(columns.T)
    options = {parameter: value, "adjust": adjust, "ignore_na": ignore_na, "min_periods": 2}
    frame = pd.DataFrame(columns).ewm(**options).mean().to_numpy()
    expected = frame if axis == 0 else frame.T
    np.testing.assert_array_equal(fusedopt.ewma(x, axis=axis, **options), expected)


@pytest.mark.parametrize(("parameter", "value"), [("com", 1.0), ("alpha", 0.5), ("span", 3.0)])
def test_ewma_com_one_without_adjust_follows_pandas_2(
    pd: Any, parameter: str, value: float
) -> None:
    """spec section 9: [1, NaN, 5] gives 3.6667 under pandas 2's rule (4.0 in pandas 3.1)."""
    x = np.array([1.0, np.nan, 5.0])
    actual = fusedopt.ewma(x, **{parameter: value}, adjust=False)
    np.testing.assert_array_equal(actual, reference.ewma(x, **{parameter: value}, adjust=False))
    np.testing.assert_allclose(actual, [1.0, 1.0, 11.0 / 3.0], rtol=1e-15)
    if not pandas3_differs(pd, parameter, value, adjust=False, ignore_na=False):
        pandas_result = pd.Series(x).ewm(**{parameter: value}, adjust=False).mean().to_numpy()
        np.testing.assert_array_equal(actual, pandas_result)
    # Without a NaN every pandas version agrees with fusedopt.
    y = np.array([1.0, 3.0, 5.0])
    np.testing.assert_array_equal(
        fusedopt.ewma(y, **{parameter: value}, adjust=False),
        pd.Series(y).ewm(**{parameter: value}, adjust=False).mean().to_numpy(),
    )
