"""The oracle checked against the frameworks it transcribes: torch.optim, Keras 3 and pandas.

Every other fusedopt test trusts ``fusedopt.reference``; this file is what earns that trust. It
runs the real frameworks in float64 beside the reference, over several steps with a learning rate
that changes every step, and compares parameters and state. The last part runs the seed
document's literal formulas beside the framework configurations that spec section 10 says they
equal (and the ones it says they do not). A framework that is not installed skips its tests.
"""

import contextlib
import os
import re

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest

import fusedopt
import fusedopt.keras_numpy
from fusedopt import reference

RTOL = 1e-12
ATOL = 1e-14
STEPS = 10
# A learning rate that changes every step: Keras keeps old rates in its velocity, PyTorch does
# not (spec section 3), so a constant rate would hide a convention mix-up.
LEARNING_RATES = [0.1, 0.05, 0.2, 0.01, 0.15, 0.07, 0.3, 0.02, 0.12, 0.04]
SHAPES = [(3, 5), (4,)]


def assert_close(actual, expected, what=""):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def case_ids(cases):
    """Readable test ids such as ``Adam-amsgrad=True``."""
    return ["-".join([name, *(f"{k}={v}" for k, v in options.items())]) for name, options in cases]


def make_problem(seed, shape=(3, 5)):
    """A starting parameter and one gradient per step."""
    rng = np.random.default_rng(seed)
    param = rng.normal(size=shape)
    grads = [rng.normal(size=shape) for _ in range(STEPS)]
    return param, grads


# --------------------------------------------------------------------------------------------
# torch.optim
# --------------------------------------------------------------------------------------------

TORCH_REFERENCE = {
    "SGD": reference.torch_sgd,
    "Adagrad": reference.torch_adagrad,
    "RMSprop": reference.torch_rmsprop,
    "Adam": reference.torch_adam,
    "AdamW": reference.torch_adam,
    "Adadelta": reference.torch_adadelta,
    "Adamax": reference.torch_adamax,
    "NAdam": reference.torch_nadam,
    "RAdam": reference.torch_radam,
    "Rprop": reference.torch_rprop,
    "ASGD": reference.torch_asgd,
}
# torch keeps these optimizers' scalar states (NAdam's mu_product, ASGD's eta and mu) as 0-dim
# tensors of torch's default dtype, float32 unless set otherwise, even for float64 parameters
# (spec section 13); the reference rounds them as its scalar_dtype option says.
TORCH_SCALAR_STATES = {"NAdam": ("mu_product",), "ASGD": ("eta", "mu")}

TORCH_CASES = [
    ("SGD", {}),
    ("SGD", {"weight_decay": 0.1, "maximize": True}),
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.9, "dampening": 0.3}),
    ("SGD", {"momentum": 0.5, "dampening": 0.5, "weight_decay": 0.05, "maximize": True}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("SGD", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1, "maximize": True}),
    ("Adagrad", {}),
    ("Adagrad", {"lr_decay": 0.1, "initial_accumulator_value": 0.5}),
    ("Adagrad", {"weight_decay": 0.1, "eps": 1e-3, "maximize": True, "lr_decay": 0.05}),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True}),
    ("RMSprop", {"momentum": 0.8}),
    ("RMSprop", {"centered": True, "momentum": 0.8, "alpha": 0.9, "eps": 1e-3}),
    ("RMSprop", {"weight_decay": 0.1, "maximize": True, "momentum": 0.5}),
    ("Adam", {}),
    ("Adam", {"amsgrad": True}),
    ("Adam", {"weight_decay": 0.1}),
    ("Adam", {"maximize": True, "amsgrad": True, "betas": (0.8, 0.99), "eps": 1e-3}),
    ("Adam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("AdamW", {"weight_decay": 0.1}),
    ("AdamW", {"weight_decay": 0.05, "amsgrad": True, "maximize": True}),
    ("Adadelta", {}),
    ("Adadelta", {"weight_decay": 0.1}),
    ("Adadelta", {"maximize": True, "rho": 0.5, "eps": 1e-3}),
    ("Adadelta", {"rho": 0.0, "weight_decay": 0.05, "maximize": True}),
    ("Adadelta", {"rho": 1.0}),
    ("Adamax", {}),
    ("Adamax", {"weight_decay": 0.1}),
    ("Adamax", {"maximize": True, "betas": (0.5, 0.9), "eps": 1e-3}),
    ("Adamax", {"betas": (0.0, 0.0), "weight_decay": 0.05, "maximize": True}),
    ("Adamax", {"eps": 0.0}),
    ("NAdam", {}),
    ("NAdam", {"momentum_decay": 0.2}),
    ("NAdam", {"weight_decay": 0.1}),
    ("NAdam", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("NAdam", {"decoupled_weight_decay": True, "maximize": True}),
    ("NAdam", {"maximize": True, "betas": (0.5, 0.9), "eps": 1e-3, "momentum_decay": 0.0}),
    ("RAdam", {}),
    ("RAdam", {"betas": (0.9, 0.9)}),
    ("RAdam", {"betas": (0.8, 0.5)}),
    ("RAdam", {"weight_decay": 0.1, "eps": 1e-3}),
    ("RAdam", {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
    ("RAdam", {"betas": (0.0, 0.8), "maximize": True}),
    ("Rprop", {}),
    ("Rprop", {"etas": (0.3, 1.5)}),
    ("Rprop", {"step_sizes": (0.01, 0.2), "maximize": True}),
    ("Rprop", {"etas": (0.9, 1.01), "step_sizes": (1e-3, 1.0)}),
    ("Rprop", {"step_sizes": (0.5, 0.1)}),
    ("ASGD", {}),
    ("ASGD", {"t0": 3.0}),
    ("ASGD", {"lambd": 0.1, "alpha": 0.5, "t0": 2.0}),
    ("ASGD", {"weight_decay": 0.1, "maximize": True, "t0": 5.0}),
    ("ASGD", {"lambd": 0.0, "t0": 0.0}),
    ("ASGD", {"alpha": 1.0, "lambd": 1.0, "t0": 1.0}),
]


def torch_reference_options(name, options):
    """torch.optim's keyword arguments, spelled as the reference takes them."""
    options = dict(options)
    if "betas" in options:
        options["beta1"], options["beta2"] = options.pop("betas")
    if "etas" in options:
        options["etaminus"], options["etaplus"] = options.pop("etas")
    if "step_sizes" in options:
        options["step_size_min"], options["step_size_max"] = options.pop("step_sizes")
    if name == "AdamW":
        options["decoupled_weight_decay"] = True
    return options


def assert_torch_state_matches(torch_state, reference_state):
    """Same keys as torch.optim (the reference adds "step" to SGD) and the same values."""
    torch_keys = {key for key, value in torch_state.items() if value is not None}
    assert torch_keys <= set(reference_state)
    assert set(reference_state) - torch_keys <= {"step"}
    for key in torch_keys:
        if key == "step":
            assert int(torch_state["step"].item()) == reference_state["step"]
        elif torch_state[key].dim() == 0:
            # NAdam's mu_product, ASGD's eta and mu: Python floats in the reference.
            assert isinstance(reference_state[key], float)
            assert_close(reference_state[key], torch_state[key].item(), key)
        else:
            assert_close(reference_state[key], torch_state[key].numpy(), key)


@contextlib.contextmanager
def torch_default_dtype(torch, dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def run_torch_beside_reference(
    name, torch_options, reference_options, step_options=None, grads=None, scalar_dtype=None
):
    """Steps torch.optim and the reference side by side; ``step_options(t)`` updates the group.

    ``scalar_dtype`` ("float32" or "float64") is torch's default dtype during the run, which is
    the dtype of NAdam's and ASGD's scalar states; the reference is told the same.
    """
    torch = pytest.importorskip("torch")
    if scalar_dtype is None:
        scalar_dtype = "float32"  # torch's own default
    if name in TORCH_SCALAR_STATES:
        reference_options = {**reference_options, "scalar_dtype": scalar_dtype}
    param0, problem_grads = make_problem(seed=len(name) + len(torch_options))
    grads = problem_grads if grads is None else grads
    with torch_default_dtype(torch, getattr(torch, scalar_dtype)):
        run_torch_steps(torch, name, torch_options, reference_options, step_options, param0, grads)


def run_torch_steps(torch, name, torch_options, reference_options, step_options, param0, grads):
    param = torch.nn.Parameter(torch.tensor(param0, dtype=torch.float64))
    optimizer = getattr(torch.optim, name)([param], lr=LEARNING_RATES[0], **torch_options)
    expected, state = param0, {}
    for t in range(STEPS):
        group = optimizer.param_groups[0]
        group["lr"] = LEARNING_RATES[t]
        options = dict(reference_options)
        if step_options is not None:
            changes = step_options(t)
            group.update(changes)
            options.update(torch_reference_options(name, changes))
        param.grad = torch.tensor(grads[t], dtype=torch.float64)
        optimizer.step()
        expected, state = TORCH_REFERENCE[name](
            expected, grads[t], state, lr=LEARNING_RATES[t], **options
        )
        assert_close(param.detach().numpy(), expected, f"param at step {t + 1}")
        assert_torch_state_matches(optimizer.state[param], state)


@pytest.mark.parametrize(("name", "options"), TORCH_CASES, ids=case_ids(TORCH_CASES))
def test_torch_optimizer_trajectory_matches(name, options):
    run_torch_beside_reference(name, options, torch_reference_options(name, options))


def test_torch_sgd_hyperparameters_changing_every_step():
    def step_options(t):
        return {"momentum": 0.5 + 0.04 * t, "dampening": 0.03 * t, "weight_decay": 0.01 * t}

    run_torch_beside_reference("SGD", {"momentum": 0.9}, {}, step_options)


def test_torch_adam_hyperparameters_changing_every_step():
    def step_options(t):
        return {"betas": (0.9 - 0.02 * t, 0.999 - 0.01 * t), "weight_decay": 0.01 * t}

    options = {"amsgrad": True}
    run_torch_beside_reference(
        "AdamW", options, torch_reference_options("AdamW", options), step_options
    )


def one_cycle_beta1(t):
    """beta1 as OneCycleLR cycles it: down from 0.95 to 0.85 and back up."""
    return 0.85 + 0.1 * abs(t - STEPS / 2) / (STEPS / 2)


# Hyperparameters other than lr that change between steps, per new algorithm: the reference must
# read them on every step (NAdam's mu_product, for one, remembers every past beta1).
CHANGING_HYPERPARAMETERS = [
    ("Adadelta", {}, lambda t: {"rho": 0.5 + 0.05 * t, "eps": 1e-6 * (t + 1)}),
    ("Adadelta", {"weight_decay": 0.1}, lambda t: {"weight_decay": 0.02 * t, "rho": 0.9}),
    ("Adamax", {}, lambda t: {"betas": (0.9 - 0.05 * t, 0.99 - 0.05 * t), "eps": 1e-3 / (t + 1)}),
    ("Adamax", {"weight_decay": 0.1}, lambda t: {"weight_decay": 0.02 * t}),
    ("NAdam", {}, lambda t: {"betas": (one_cycle_beta1(t), 0.999)}),
    (
        "NAdam",
        {"decoupled_weight_decay": True},
        lambda t: {
            "betas": (one_cycle_beta1(t), 0.99 - 0.01 * t),
            "momentum_decay": 0.004 * (t + 1),
            "weight_decay": 0.02 * t,
        },
    ),
    ("RAdam", {}, lambda t: {"betas": (0.9 - 0.03 * t, 0.999 - 0.01 * t)}),
    (
        "RAdam",
        {"decoupled_weight_decay": True},
        lambda t: {"betas": (one_cycle_beta1(t), 0.95), "weight_decay": 0.03 * t},
    ),
    # Rprop reads lr only on its first step; the run changes lr every step all the same.
    ("Rprop", {}, lambda t: {"etas": (0.1 + 0.08 * t, 1.1 + 0.1 * t)}),
    ("Rprop", {}, lambda t: {"step_sizes": (1e-3 * (t + 1), 0.5 - 0.04 * t)}),
    ("ASGD", {"t0": 2.0}, lambda t: {"lambd": 0.01 * t, "alpha": 0.5 + 0.05 * t}),
    ("ASGD", {}, lambda t: {"t0": float(8 - t), "weight_decay": 0.02 * t}),
]


@pytest.mark.parametrize("scalar_dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("name", "options", "step_options"),
    CHANGING_HYPERPARAMETERS,
    ids=[
        f"{case_id}-{index}"
        for index, case_id in enumerate(
            case_ids([(name, options) for name, options, _ in CHANGING_HYPERPARAMETERS])
        )
    ],
)
def test_torch_new_optimizer_hyperparameters_changing_every_step(
    name, options, step_options, scalar_dtype
):
    run_torch_beside_reference(
        name,
        options,
        torch_reference_options(name, options),
        step_options,
        scalar_dtype=scalar_dtype,
    )


@pytest.mark.parametrize(
    ("name", "options"),
    [case for case in TORCH_CASES if case[0] in TORCH_SCALAR_STATES],
    ids=case_ids([case for case in TORCH_CASES if case[0] in TORCH_SCALAR_STATES]),
)
def test_torch_scalar_states_under_float64_default_dtype(name, options):
    """With torch.set_default_dtype(torch.float64), mu_product, eta and mu are float64."""
    run_torch_beside_reference(
        name, options, torch_reference_options(name, options), scalar_dtype="float64"
    )


@pytest.mark.parametrize(
    ("name", "options"), [("NAdam", {}), ("ASGD", {"t0": 3.0})], ids=["NAdam", "ASGD"]
)
def test_torch_scalar_states_are_float32_for_float64_parameters(name, options):
    """spec section 13: torch's default keeps the scalar states in float32, and the rounding
    shows in a float64 trajectory (well above RTOL), so the reference has to model it."""
    torch = pytest.importorskip("torch")
    param0, grads = make_problem(seed=5)
    param = torch.nn.Parameter(torch.tensor(param0, dtype=torch.float64))
    optimizer = getattr(torch.optim, name)([param], lr=LEARNING_RATES[0], **options)
    as_float64, state = param0, {}
    for t in range(STEPS):
        optimizer.param_groups[0]["lr"] = LEARNING_RATES[t]
        param.grad = torch.tensor(grads[t], dtype=torch.float64)
        optimizer.step()
        as_float64, state = TORCH_REFERENCE[name](
            as_float64, grads[t], state, lr=LEARNING_RATES[t], scalar_dtype="float64", **options
        )
    for key in TORCH_SCALAR_STATES[name]:
        assert optimizer.state[param][key].dtype == torch.float32
    assert optimizer.state[param]["step"].dtype == torch.float32
    assert not np.allclose(param.detach().numpy(), as_float64, rtol=1e-10, atol=0.0)
    np.testing.assert_allclose(param.detach().numpy(), as_float64, rtol=1e-5)


def test_torch_rprop_zero_and_repeated_gradients():
    """Rprop's three branches element by element: same sign (grow), flip (shrink and skip the
    move, prev <- 0), and a zero product (factor 1), including zeros right after a flip."""
    rng = np.random.default_rng(17)
    signs = rng.choice([-1.0, 0.0, 1.0], size=(STEPS, 3, 5), p=[0.35, 0.2, 0.45])
    grads = list(signs * rng.uniform(0.5, 2.0, size=(STEPS, 3, 5)))
    for options in ({}, {"maximize": True, "etas": (0.25, 2.0), "step_sizes": (1e-4, 0.3)}):
        run_torch_beside_reference(
            "Rprop", options, torch_reference_options("Rprop", options), grads=grads
        )


def test_torch_rprop_nan_has_sign_0():
    """torch.sign(NaN) is 0 (pytorch/pytorch#41245): a NaN product g*prev takes the factor 1,
    and a NaN gradient leaves the param where it is and becomes prev."""
    torch = pytest.importorskip("torch")
    nan = float("nan")
    prev, grad = np.array([nan, 1.0, 1.0, nan]), np.array([1.0, nan, -1.0, nan])
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = torch.optim.Rprop([param], lr=0.1)
    param.grad = torch.ones(4, dtype=torch.float64)
    optimizer.step()
    optimizer.state[param]["prev"].copy_(torch.from_numpy(prev))
    state = {
        "step": 1,
        "prev": prev,
        "step_size": optimizer.state[param]["step_size"].numpy().copy(),
    }
    expected, state = reference.torch_rprop(param.detach().numpy().copy(), grad, state, lr=0.1)
    param.grad = torch.from_numpy(grad)
    optimizer.step()
    np.testing.assert_array_equal(param.detach().numpy(), expected)
    for key in ("prev", "step_size"):
        np.testing.assert_array_equal(optimizer.state[param][key].numpy(), state[key])


def test_torch_radam_default_betas_take_both_branches():
    """With betas (0.9, 0.999), rho_t crosses 5 within the 10 steps of the trajectory tests."""
    beta2 = 0.999
    rho_inf = 2 / (1 - beta2) - 1
    rho = [rho_inf - 2 * t * beta2**t / (1 - beta2**t) for t in range(1, STEPS + 1)]
    assert rho[0] <= 5.0 < rho[-1]


FUSED_CASES = [
    ("SGD", {"momentum": 0.9, "maximize": True, "weight_decay": 0.1}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("Adam", {"maximize": True, "amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", {"weight_decay": 0.1}),
]


@pytest.mark.parametrize(("name", "options"), FUSED_CASES, ids=case_ids(FUSED_CASES))
def test_torch_fused_grad_scale_unscales_before_maximize(name, options):
    """spec section 8: the fused kernels divide by grad_scale, then negate for maximize."""
    torch = pytest.importorskip("torch")
    grad_scale = 1024.0  # a power of two, so the scaled gradients are exact
    param0, grads = make_problem(seed=7)
    param = torch.nn.Parameter(torch.tensor(param0, dtype=torch.float64))
    optimizer = getattr(torch.optim, name)([param], lr=LEARNING_RATES[0], fused=True, **options)
    optimizer.grad_scale = torch.tensor(grad_scale, dtype=torch.float32)
    expected, state = param0, {}
    for t in range(STEPS):
        optimizer.param_groups[0]["lr"] = LEARNING_RATES[t]
        param.grad = torch.tensor(grads[t] * grad_scale, dtype=torch.float64)
        optimizer.step()
        expected, state = TORCH_REFERENCE[name](
            expected,
            grads[t] * grad_scale,
            state,
            lr=LEARNING_RATES[t],
            grad_scale=grad_scale,
            **torch_reference_options(name, options),
        )
        assert_close(param.detach().numpy(), expected, f"param at step {t + 1}")
        assert_torch_state_matches(optimizer.state[param], state)


# --------------------------------------------------------------------------------------------
# Keras 3
# --------------------------------------------------------------------------------------------

KERAS_REFERENCE = {
    "SGD": reference.keras_sgd,
    "Adagrad": reference.keras_adagrad,
    "RMSprop": reference.keras_rmsprop,
    "Adam": reference.keras_adam,
    "AdamW": reference.keras_adam,
    "Adadelta": reference.keras_adadelta,
    "Adamax": reference.keras_adamax,
    "Nadam": reference.keras_nadam,
    "Lion": reference.keras_lion,
    "Lamb": reference.keras_lamb,
}

# reference state key -> the Keras optimizer attribute holding that slot, one variable per param.
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
KERAS_SLOTS.update(
    Adadelta={
        "accumulated_grad": "_accumulated_grads",
        "accumulated_delta_var": "_accumulated_delta_vars",
    },
    Adamax={"momentum": "_m", "norm": "_u"},
    Nadam={"momentum": "_momentums", "velocity": "_velocities"},
    Lion={"momentum": "_momentums"},
    Lamb={"momentum": "_momentums", "velocity": "_velocities"},
)
KERAS_ADAMW_DEFAULT_WEIGHT_DECAY = 0.004
CLIP_OPTIONS = ("clipnorm", "clipvalue", "global_clipnorm")

KERAS_CASES = [
    ("SGD", {}),
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("SGD", {"momentum": 0.5, "weight_decay": 0.1}),
    ("SGD", {"weight_decay": 0.1, "clipnorm": 1.0}),
    ("Adagrad", {}),
    ("Adagrad", {"initial_accumulator_value": 0.0, "epsilon": 1e-3, "weight_decay": 0.1}),
    ("Adagrad", {"clipvalue": 0.5}),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True}),
    ("RMSprop", {"momentum": 0.8}),
    ("RMSprop", {"centered": True, "momentum": 0.8, "rho": 0.8, "epsilon": 1e-3}),
    ("RMSprop", {"weight_decay": 0.05, "global_clipnorm": 1.0}),
    ("Adam", {}),
    ("Adam", {"amsgrad": True}),
    ("Adam", {"weight_decay": 0.1, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-3}),
    ("Adam", {"amsgrad": True, "clipnorm": 0.5}),
    ("AdamW", {}),
    ("AdamW", {"weight_decay": 0.1, "amsgrad": True, "global_clipnorm": 2.0}),
    ("Adadelta", {}),
    ("Adadelta", {"rho": 0.5, "epsilon": 1e-3}),
    ("Adadelta", {"rho": 0.0, "weight_decay": 0.1}),
    ("Adadelta", {"weight_decay": 0.05, "clipnorm": 1.0}),
    ("Adamax", {}),
    ("Adamax", {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}),
    ("Adamax", {"beta_1": 0.0, "beta_2": 0.0, "weight_decay": 0.1}),
    ("Adamax", {"global_clipnorm": 1.0}),
    ("Nadam", {}),
    ("Nadam", {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}),
    ("Nadam", {"weight_decay": 0.1}),
    ("Nadam", {"clipvalue": 0.5, "beta_2": 0.5}),
    ("Lion", {}),
    ("Lion", {"beta_1": 1.0, "beta_2": 0.5}),
    ("Lion", {"weight_decay": 0.1}),
    ("Lion", {"beta_1": 0.5, "beta_2": 0.999, "clipnorm": 1.0}),
    ("Lamb", {}),
    ("Lamb", {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}),
    ("Lamb", {"weight_decay": 0.1}),
    ("Lamb", {"weight_decay": 0.05, "global_clipnorm": 2.0}),
]


def with_power_of_two_norms(grads, clip_options, t):
    """The gradients rescaled so the norms that clipping reads are powers of two.

    Keras on the torch backend takes ``maximum(norm, clipnorm)`` and ``minimum(1/N, 1/c)`` with a
    Python float in float32 (its 64-to-32-bit promotion rule), so a clipped float64 gradient
    carries float32 rounding unless those norms are exact in float32. Even steps clip, odd ones
    do not (every threshold used here lies between 1/4 and 4).
    """
    target = 4.0 if t % 2 == 0 else 0.25
    if "clipnorm" in clip_options:
        return [g * (target / np.sqrt(np.sum(g * g))) for g in grads]
    if "global_clipnorm" in clip_options:
        return [g * (target / np.sqrt(sum(np.sum(g * g) for g in grads))) for g in grads]
    return grads


@pytest.fixture(scope="module")
def keras():
    """Keras with its default floatx, float32, which the reference's Keras functions model: the
    learning-rate variable is float32 (so the reference is given the float32-rounded rate) and
    the Python numbers Keras turns into tensors are float32 values (spec section 1)."""
    keras = pytest.importorskip("keras")
    assert keras.config.floatx() == "float32"
    return keras


def run_keras_beside_reference(
    keras, name, options, step_options=None, problems=None, first_reference_options=None
):
    """Steps a Keras optimizer and the reference side by side over the variables of SHAPES.

    ``step_options(t)`` gives hyperparameters to set (as optimizer attributes) before step t.
    Keras' Nadam keeps one optimizer-wide ``u_product``: every variable's reference call gets
    the value from before the ``apply`` (spec section 16), and it is compared after each step.
    """
    if problems is None:
        problems = [
            make_problem(seed=index + len(options), shape=s) for index, s in enumerate(SHAPES)
        ]
    variables = [keras.Variable(param0, dtype="float64") for param0, _ in problems]
    optimizer = getattr(keras.optimizers, name)(learning_rate=LEARNING_RATES[0], **options)
    clip_options = {key: value for key, value in options.items() if key in CLIP_OPTIONS}
    reference_options = {key: value for key, value in options.items() if key not in CLIP_OPTIONS}
    if name == "AdamW":
        reference_options.setdefault("weight_decay", KERAS_ADAMW_DEFAULT_WEIGHT_DECAY)
    expected = [param0 for param0, _ in problems]
    states = [{} for _ in problems]
    for t in range(STEPS):
        if step_options is not None:
            changes = step_options(t)
            for key, value in changes.items():
                setattr(optimizer, key, value)
            reference_options.update(changes)
        grads = with_power_of_two_norms([grads[t] for _, grads in problems], clip_options, t)
        optimizer.learning_rate = LEARNING_RATES[t]
        optimizer.apply([keras.ops.convert_to_tensor(g, dtype="float64") for g in grads], variables)
        clipped = reference.keras_clip(grads, **clip_options)
        u_product_before = states[0].get("u_product")
        for index, variable in enumerate(variables):
            if u_product_before is not None:
                states[index] = {**states[index], "u_product": u_product_before}
            expected[index], states[index] = KERAS_REFERENCE[name](
                expected[index],
                clipped[index],
                states[index],
                learning_rate=float(np.float32(LEARNING_RATES[t])),
                **reference_options,
            )
            what = f"variable {index} at step {t + 1}"
            assert_close(keras.ops.convert_to_numpy(variable.value), expected[index], what)
            assert states[index]["step"] == t + 1 == int(optimizer.iterations.numpy())
            for key, attribute in KERAS_SLOTS[name].items():
                slots = getattr(optimizer, attribute, None)
                if slots:
                    actual = keras.ops.convert_to_numpy(slots[index].value)
                    assert_close(states[index][key], actual, f"{key} of {what}")
                else:
                    # Keras creates this slot only when its option is on.
                    np.testing.assert_array_equal(states[index][key], 0.0)
            if name == "Nadam":
                assert optimizer._u_product.dtype == "float64"  # the first variable's dtype
                u_product = float(keras.ops.convert_to_numpy(optimizer._u_product.value))
                assert_close(states[index]["u_product"], u_product, f"u_product at {what}")
    return expected, states


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize(("name", "options"), KERAS_CASES, ids=case_ids(KERAS_CASES))
def test_keras_optimizer_trajectory_matches(keras, name, options):
    run_keras_beside_reference(keras, name, options)


KERAS_CHANGING_HYPERPARAMETERS = [
    ("Adadelta", {}, lambda t: {"rho": 0.5 + 0.05 * t, "epsilon": 1e-6 * (t + 1)}),
    ("Adamax", {}, lambda t: {"beta_1": 0.9 - 0.05 * t, "beta_2": 0.99 - 0.05 * t}),
    ("Nadam", {}, lambda t: {"beta_1": one_cycle_beta1(t), "beta_2": 0.999 - 0.01 * t}),
    ("Lion", {}, lambda t: {"beta_1": 0.9 - 0.05 * t, "beta_2": 0.99 - 0.04 * t}),
    ("Lamb", {}, lambda t: {"beta_1": one_cycle_beta1(t), "epsilon": 1e-3 / (t + 1)}),
    ("Lamb", {"weight_decay": 0.1}, lambda t: {"weight_decay": 0.02 * t}),
]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize(
    ("name", "options", "step_options"),
    KERAS_CHANGING_HYPERPARAMETERS,
    ids=[
        f"{case_id}-{index}"
        for index, case_id in enumerate(
            case_ids([(name, options) for name, options, _ in KERAS_CHANGING_HYPERPARAMETERS])
        )
    ],
)
def test_keras_new_optimizer_hyperparameters_changing_every_step(
    keras, name, options, step_options
):
    run_keras_beside_reference(keras, name, options, step_options)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_keras_lamb_zero_norms_give_a_trust_ratio_of_one(keras):
    """spec section 21: a zero variable (w_norm = 0) and a zero first gradient (update = 0, so
    g_norm = 0) each take ratio 1 instead of 0/x or x/0."""
    _, grads = make_problem(seed=31, shape=(3, 5))
    zero_first_grads = [np.zeros((4,)), *make_problem(seed=32, shape=(4,))[1][1:]]
    problems = [(np.zeros((3, 5)), grads), (np.ones(4), zero_first_grads)]
    _, states = run_keras_beside_reference(keras, "Lamb", {}, problems=problems)
    assert states[0]["step"] == STEPS


# --------------------------------------------------------------------------------------------
# Lion: Keras, optax, and fusedopt's PyTorch-style Lion (spec section 20)
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def optax_x64():
    """optax with jax in 64-bit mode for the test, restored after."""
    optax = pytest.importorskip(
        "optax", reason="optax (and jax) not installed: the Lion cross-check needs them"
    )
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield optax
    jax.config.update("jax_enable_x64", previous)


def run_optax_lion(optax, param0, grads, b1, b2, weight_decay):
    import jax.numpy as jnp

    rates = jnp.asarray(LEARNING_RATES, dtype=jnp.float64)
    # optax calls the schedule with its 0-based count, so step t gets LEARNING_RATES[t].
    solver = optax.lion(lambda count: rates[count], b1=b1, b2=b2, weight_decay=weight_decay)
    params = jnp.asarray(param0, dtype=jnp.float64)
    opt_state = solver.init(params)
    trajectory, momenta = [], []
    for t in range(STEPS):
        updates, opt_state = solver.update(jnp.asarray(grads[t]), opt_state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(np.asarray(params))
        momenta.append(np.asarray(opt_state[0].mu))
    return trajectory, momenta


LION_OPTIONS = [
    {"beta_1": 0.9, "beta_2": 0.99, "weight_decay": 0.0},
    {"beta_1": 0.9, "beta_2": 0.99, "weight_decay": 0.1},
    {"beta_1": 0.5, "beta_2": 0.9, "weight_decay": 0.3},
    {"beta_1": 1.0, "beta_2": 0.5, "weight_decay": 0.05},
]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("options", LION_OPTIONS, ids=[str(o) for o in LION_OPTIONS])
def test_lion_keras_and_optax_agree(keras, optax_x64, options):
    """Keras' Lion and optax's lion are the same update: decoupled lr-scaled decay,
    sign(b1*m + (1 - b1)*g), m <- b2*m + (1 - b2)*g. Both beside the reference."""
    param0, grads = make_problem(seed=41)
    keras_options = {**options, "weight_decay": options["weight_decay"] or None}
    keras_params, keras_states = run_keras_beside_reference(
        keras, "Lion", keras_options, problems=[(param0, grads)]
    )
    optax_params, optax_momenta = run_optax_lion(
        optax_x64, param0, grads, options["beta_1"], options["beta_2"], options["weight_decay"]
    )
    assert_close(optax_params[-1], keras_params[0], "optax vs Keras after the last step")
    assert_close(optax_momenta[-1], keras_states[0]["momentum"], "momentum")
    expected, state = param0, {}
    for t in range(STEPS):
        expected, state = reference.keras_lion(
            expected, grads[t], state, learning_rate=LEARNING_RATES[t], **keras_options
        )
        assert_close(optax_params[t], expected, f"optax vs reference at step {t + 1}")
        assert_close(optax_momenta[t], state["momentum"], f"momentum at step {t + 1}")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("options", LION_OPTIONS, ids=[str(o) for o in LION_OPTIONS])
def test_torch_style_lion_follows_keras_lion(keras, options):
    """fusedopt's PyTorch-style Lion (lerp rounding, p *= 1 - lr*wd) is Keras' Lion with the
    same betas and weight decay, up to rounding: no framework ships the torch form, so the real
    Keras optimizer is the check. Both are given Keras' float32 learning rates; Keras computes
    its decay factor in float32 too (spec section 1), which the torch form does in double, so
    with weight decay the params agree to that rounding (measured 7.7e-7 relative over 10
    steps: up to 6e-8 a step), not to 1e-12."""
    param0, grads = make_problem(seed=42)
    keras_options = {**options, "weight_decay": options["weight_decay"] or None}
    keras_params, keras_states = run_keras_beside_reference(
        keras, "Lion", keras_options, problems=[(param0, grads)]
    )
    param, state = param0, {}
    for t in range(STEPS):
        param, state = reference.torch_lion(
            param,
            grads[t],
            state,
            lr=float(np.float32(LEARNING_RATES[t])),
            beta1=options["beta_1"],
            beta2=options["beta_2"],
            weight_decay=options["weight_decay"],
        )
    decay_rounding = dict(rtol=2e-6, atol=1e-9) if options["weight_decay"] else {}
    np.testing.assert_allclose(
        param, keras_params[0], **(decay_rounding or dict(rtol=RTOL, atol=ATOL))
    )
    assert_close(state["exp_avg"], keras_states[0]["momentum"], "exp_avg vs momentum")
    assert set(state) == {"step", "exp_avg"}


def test_torch_style_lion_maximize_negates_the_gradient():
    param0, grads = make_problem(seed=43)
    options = {"lr": 0.1, "beta1": 0.8, "beta2": 0.9, "weight_decay": 0.1}
    up, up_state, down, down_state = param0, {}, param0, {}
    for grad in grads:
        up, up_state = reference.torch_lion(up, grad, up_state, maximize=True, **options)
        down, down_state = reference.torch_lion(down, -grad, down_state, **options)
    np.testing.assert_array_equal(up, down)
    np.testing.assert_array_equal(up_state["exp_avg"], down_state["exp_avg"])


# --------------------------------------------------------------------------------------------
# Hyperparameters the frameworks refuse (spec sections 13-21), and the reference with them
# --------------------------------------------------------------------------------------------

TORCH_REFUSALS = [
    ("Adadelta", {"lr": -0.1}, "Invalid learning rate: -0.1"),
    ("Adadelta", {"rho": 1.5}, "Invalid rho value: 1.5"),
    ("Adadelta", {"rho": -0.1}, "Invalid rho value: -0.1"),
    ("Adadelta", {"eps": -1e-06}, "Invalid epsilon value: -1e-06"),
    ("Adadelta", {"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
    ("Adamax", {"lr": float("nan")}, "Invalid learning rate: nan"),
    ("Adamax", {"eps": -1.0}, "Invalid epsilon value: -1.0"),
    ("Adamax", {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
    ("Adamax", {"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ("Adamax", {"weight_decay": -0.5}, "Invalid weight_decay value: -0.5"),
    ("NAdam", {"lr": -1.0}, "Invalid learning rate: -1.0"),
    ("NAdam", {"eps": -1e-08}, "Invalid epsilon value: -1e-08"),
    ("NAdam", {"betas": (-0.1, 0.999)}, "Invalid beta parameter at index 0: -0.1"),
    ("NAdam", {"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),
    ("NAdam", {"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
    ("NAdam", {"momentum_decay": -0.004}, "Invalid momentum_decay value: -0.004"),
    ("RAdam", {"lr": -0.001}, "Invalid learning rate: -0.001"),
    ("RAdam", {"eps": -1e-08}, "Invalid epsilon value: -1e-08"),
    ("RAdam", {"betas": (1.5, 0.999)}, "Invalid beta parameter at index 0: 1.5"),
    ("RAdam", {"betas": (0.9, float("nan"))}, "Invalid beta parameter at index 1: nan"),
    ("RAdam", {"weight_decay": -0.01}, "Invalid weight_decay value: -0.01"),
    ("Rprop", {"lr": -0.01}, "Invalid learning rate: -0.01"),
    ("Rprop", {"etas": (1.0, 1.2)}, "Invalid eta values: 1.0, 1.2"),
    ("Rprop", {"etas": (0.5, 1.0)}, "Invalid eta values: 0.5, 1.0"),
    ("Rprop", {"etas": (0.0, 1.2)}, "Invalid eta values: 0.0, 1.2"),
    ("Rprop", {"etas": (1.2, 0.5)}, "Invalid eta values: 1.2, 0.5"),
    ("ASGD", {"lr": -0.01}, "Invalid learning rate: -0.01"),
    ("ASGD", {"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
]


@pytest.mark.parametrize(
    ("name", "options", "message"),
    TORCH_REFUSALS,
    ids=[f"{name}-{options}" for name, options, _ in TORCH_REFUSALS],
)
def test_torch_refuses_what_the_spec_lists_and_so_does_the_reference(name, options, message):
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    options = dict(options)
    lr = options.pop("lr", 0.01)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        getattr(torch.optim, name)([param], lr=lr, **options)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TORCH_REFERENCE[name](
            np.zeros(3), np.ones(3), {}, lr=lr, **torch_reference_options(name, options)
        )


TORCH_UNCHECKED = [
    ("Adadelta", {"rho": 1.0}),
    ("Adadelta", {"rho": 0.0, "eps": 0.0}),
    ("Adamax", {"betas": (0.0, 0.0), "eps": 0.0}),
    ("NAdam", {"momentum_decay": 0.0, "betas": (0.0, 0.0)}),
    ("RAdam", {"betas": (0.0, 0.0)}),
    ("Rprop", {"step_sizes": (1.0, 0.1)}),
    ("Rprop", {"step_sizes": (-1.0, -2.0)}),
    ("ASGD", {"lambd": -1.0, "alpha": -2.0, "t0": -5.0}),
]


@pytest.mark.parametrize(("name", "options"), TORCH_UNCHECKED, ids=case_ids(TORCH_UNCHECKED))
def test_torch_accepts_what_the_spec_lists_as_unchecked(name, options):
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    getattr(torch.optim, name)([param], lr=0.01, **options)
    TORCH_REFERENCE[name](
        np.zeros(3), np.ones(3), {}, lr=0.01, **torch_reference_options(name, options)
    )


LION_MESSAGE = (
    "Argument `beta_1` must be in the [0, 1] range. Otherwise, the optimizer degenerates to "
    "SignSGD. Received: beta_1={}."
)


@pytest.mark.parametrize("beta_1", [0.0, -0.5, 1.5, float("inf")])
def test_keras_lion_refuses_beta_1_outside_zero_one(keras, beta_1):
    message = f"^{re.escape(LION_MESSAGE.format(beta_1))}$"
    with pytest.raises(ValueError, match=message):
        keras.optimizers.Lion(beta_1=beta_1)
    with pytest.raises(ValueError, match=message):
        reference.keras_lion(np.zeros(3), np.ones(3), {}, learning_rate=0.1, beta_1=beta_1)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("Adadelta", {"rho": 1.5, "epsilon": -1.0}),
        ("Adamax", {"beta_1": 1.5, "beta_2": -1.0, "epsilon": -1.0}),
        ("Nadam", {"beta_1": 1.5, "beta_2": -1.0, "epsilon": -1.0}),
        ("Lion", {"beta_1": float("nan"), "beta_2": 2.0}),
        ("Lamb", {"beta_1": 1.5, "beta_2": -1.0, "epsilon": -1.0}),
    ],
    ids=["Adadelta", "Adamax", "Nadam", "Lion", "Lamb"],
)
def test_keras_accepts_what_the_spec_lists_as_unchecked(keras, name, options):
    getattr(keras.optimizers, name)(learning_rate=-0.1, weight_decay=-1.0, **options)


def test_keras_clipnorm_example_from_spec():
    """spec section 1: clipnorm = 1 on the gradient [3, 4] gives [0.6, 0.8]."""
    (clipped,) = reference.keras_clip([[3.0, 4.0]], clipnorm=1.0)
    assert_close(clipped, [0.6, 0.8])


def test_keras_clip_takes_at_most_one_option():
    with pytest.raises(ValueError):
        reference.keras_clip([[1.0]], clipnorm=1.0, clipvalue=1.0)


def test_keras_global_clipnorm_of_zero_gradients_is_identity():
    clipped = reference.keras_clip([np.zeros(3), np.zeros(2)], global_clipnorm=1.0)
    for array in clipped:
        np.testing.assert_array_equal(array, 0.0)


# --------------------------------------------------------------------------------------------
# pandas ewm().mean()
# --------------------------------------------------------------------------------------------

DECAYS = [
    ("com", 0.0),
    ("com", 0.5),
    ("com", 1.0),
    ("com", 2.7),
    ("span", 1.0),
    ("span", 3.0),
    ("span", 10.5),
    ("halflife", 0.3),
    ("halflife", 1.0),
    ("halflife", 4.2),
    ("alpha", 0.05),
    ("alpha", 0.1),
    ("alpha", 0.37),
    ("alpha", 0.5),
    ("alpha", 1.0),
]
# Each of these is com == 1, where pandas >= 3 changes adjust=False across NaN gaps (spec 9).
COM_ONE = {("com", 1.0), ("span", 3.0), ("halflife", 1.0), ("alpha", 0.5)}
MIN_PERIODS = [0, 1, 3, None]


@pytest.fixture(scope="module")
def pd():
    return pytest.importorskip("pandas")


def pandas_major(pd):
    return int(pd.__version__.split(".")[0])


def random_series(rng, length):
    """Normal values with NaN runs (leading ones too) and repeated values (the y == x branch)."""
    values = rng.normal(size=length)
    values[rng.random(length) < 0.3] = 0.5
    values[rng.random(length) < 0.3] = np.nan
    if rng.random() < 0.3:
        values[: rng.integers(1, 4)] = np.nan
    return values


@pytest.mark.parametrize("ignore_na", [False, True])
@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize(("parameter", "value"), DECAYS)
def test_ewma_series_is_bit_identical_to_pandas(pd, parameter, value, adjust, ignore_na):
    rng = np.random.default_rng(DECAYS.index((parameter, value)))
    pandas3_com_one = (
        pandas_major(pd) >= 3 and (parameter, value) in COM_ONE and not adjust and not ignore_na
    )
    decay = {parameter: value}
    for length in (0, 1, 2, 7, 40):
        series = random_series(rng, length)
        if pandas3_com_one:
            # With NaN gaps this is the documented pandas 3 difference, tested below.
            series = series[~np.isnan(series)]
        for min_periods in MIN_PERIODS:
            options = dict(adjust=adjust, ignore_na=ignore_na, min_periods=min_periods)
            expected = pd.Series(series).ewm(**decay, **options).mean().to_numpy()
            np.testing.assert_array_equal(reference.ewma(series, **decay, **options), expected)


def test_ewma_random_alphas_round_trip_through_com_like_pandas(pd):
    rng = np.random.default_rng(5)
    series = random_series(rng, 30)
    for alpha in rng.uniform(0.01, 1.0, size=50):
        for adjust in (True, False):
            expected = pd.Series(series).ewm(alpha=alpha, adjust=adjust).mean().to_numpy()
            np.testing.assert_array_equal(
                reference.ewma(series, alpha=alpha, adjust=adjust), expected
            )


def test_ewma_alpha_does_not_survive_the_com_round_trip():
    """spec section 9: alpha = 0.05 is used as 1/(1 + 19.0) = 0.05000000000000001."""
    result = reference.ewma([0.0, 1.0], alpha=0.05, adjust=False)
    assert result[1] == 0.05000000000000001


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(
    "options",
    [
        {"com": 2.0},
        {"span": 4.0, "adjust": False},
        {"halflife": 2.0, "ignore_na": True, "min_periods": 3},
        {"alpha": 0.3, "adjust": False, "ignore_na": True, "min_periods": 2},
    ],
)
def test_ewma_two_dimensional_is_bit_identical_to_dataframe(pd, axis, options):
    rng = np.random.default_rng(11)
    values = np.stack([random_series(rng, 25) for _ in range(6)], axis=1)
    if axis == 0:
        expected = pd.DataFrame(values).ewm(**options).mean().to_numpy()
    else:
        expected = pd.DataFrame(values.T).ewm(**options).mean().to_numpy().T
    np.testing.assert_array_equal(reference.ewma(values, axis=axis, **options), expected)


@pytest.mark.parametrize(("parameter", "value"), sorted(COM_ONE))
def test_ewma_com_one_without_adjust_follows_pandas_2(pd, parameter, value):
    """spec A.5: at com == 1, adjust=False, a NaN gap uses pandas 2's weights, not pandas 3's."""
    series = [1.0, np.nan, 5.0]
    result = reference.ewma(series, **{parameter: value}, adjust=False)
    # After the gap the old weight is f^2 = 0.25 and the new one alpha = 0.5.
    np.testing.assert_array_equal(result, [1.0, 1.0, (0.25 * 1.0 + 0.5 * 5.0) / 0.75])
    assert result[-1] == pytest.approx(3.6667, abs=1e-4)
    pandas_result = pd.Series(series).ewm(**{parameter: value}, adjust=False).mean().to_numpy()
    if pandas_major(pd) < 3:
        np.testing.assert_array_equal(result, pandas_result)
    else:
        # pandas 3 weighs the new value with 1 - 0.25 = 0.75 (pandas PR #66521, issue #66523).
        assert pandas_result[-1] in (4.0, result[-1])


@pytest.mark.parametrize(
    "decay",
    [
        {},
        {"com": 1.0, "alpha": 0.5},
        {"com": -0.1},
        {"span": 0.5},
        {"halflife": 0.0},
        {"alpha": 0.0},
        {"alpha": 1.5},
    ],
)
def test_ewma_rejects_decay_parameters_pandas_rejects(pd, decay):
    with pytest.raises(ValueError):
        pd.Series([1.0, 2.0]).ewm(**decay)
    with pytest.raises(ValueError):
        reference.ewma([1.0, 2.0], **decay)


# --------------------------------------------------------------------------------------------
# The seed's textbook formulas beside the framework configurations of spec section 10
# --------------------------------------------------------------------------------------------


def run_steps(step, param0, grads, options_at):
    """Parameters and states after each step of ``step``, called with ``options_at(t)``."""
    params, states, state, param = [], [], {}, param0
    for t, grad in enumerate(grads):
        param, state = step(param, grad, state, **options_at(t))
        params.append(param)
        states.append(state)
    return params, states


def assert_trajectories_close(actual, expected):
    for t, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, f"step {t + 1}")


def assert_trajectories_differ(actual, expected):
    assert not np.allclose(actual[-1], expected[-1], rtol=1e-6, atol=0.0)


def test_seed_momentum_is_torch_sgd_with_scaled_lr_even_with_varying_alpha():
    param0, grads = make_problem(seed=21)
    beta = 0.9
    seed, seed_states = run_steps(
        reference.seed_momentum,
        param0,
        grads,
        lambda t: {"alpha": LEARNING_RATES[t], "beta": beta},
    )
    torch_like, torch_states = run_steps(
        reference.torch_sgd,
        param0,
        grads,
        lambda t: {"lr": LEARNING_RATES[t] * (1 - beta), "momentum": beta},
    )
    assert_trajectories_close(seed, torch_like)
    for seed_state, torch_state in zip(seed_states, torch_states, strict=True):
        assert_close(seed_state["v"], (1 - beta) * torch_state["momentum_buffer"])
    # Not dampening = beta: PyTorch's first step sets buf = g, not (1 - beta)*g.
    dampened, _ = run_steps(
        reference.torch_sgd,
        param0,
        grads,
        lambda t: {"lr": LEARNING_RATES[t], "momentum": beta, "dampening": beta},
    )
    assert_trajectories_differ(seed, dampened)


def seed_and_keras_momentum(alphas, beta, seed):
    param0, grads = make_problem(seed=seed)
    seed_params, _ = run_steps(
        reference.seed_momentum, param0, grads, lambda t: {"alpha": alphas(t), "beta": beta}
    )
    keras_params, _ = run_steps(
        reference.keras_sgd,
        param0,
        grads,
        lambda t: {"learning_rate": alphas(t) * (1 - beta), "momentum": beta},
    )
    return seed_params, keras_params


def test_seed_momentum_is_keras_sgd_only_for_a_constant_alpha():
    assert_trajectories_close(*seed_and_keras_momentum(lambda t: 0.1, beta=0.8, seed=22))
    assert_trajectories_differ(
        *seed_and_keras_momentum(lambda t: LEARNING_RATES[t], beta=0.8, seed=22)
    )


def quadratic_gradient(curvature, center):
    return lambda theta: curvature * (theta - center)


def nesterov_runs(etas, gamma, seed):
    """The seed NAG, and Keras and PyTorch Nesterov mapped back to the seed's iterate (spec 4)."""
    rng = np.random.default_rng(seed)
    grad_fn = quadratic_gradient(rng.uniform(0.5, 2.0, size=6), rng.normal(size=6))
    theta0 = rng.normal(size=6)
    seed_theta, keras_theta, torch_theta = [], [], []
    seed_state, keras_state, torch_state = {}, {}, {}
    theta = keras_param = torch_param = theta0
    for t in range(STEPS):
        theta, seed_state = reference.seed_nesterov(
            theta, grad_fn, seed_state, eta=etas(t), gamma=gamma
        )
        keras_param, keras_state = reference.keras_sgd(
            keras_param,
            grad_fn(keras_param),
            keras_state,
            learning_rate=etas(t),
            momentum=gamma,
            nesterov=True,
        )
        torch_param, torch_state = reference.torch_sgd(
            torch_param,
            grad_fn(torch_param),
            torch_state,
            lr=etas(t),
            momentum=gamma,
            nesterov=True,
        )
        seed_theta.append(theta)
        keras_theta.append(keras_param - gamma * keras_state["momentum"])
        torch_theta.append(torch_param + gamma * etas(t) * torch_state["momentum_buffer"])
        assert_close(seed_state["v"], -keras_state["momentum"], f"v at step {t + 1}")
    return seed_theta, keras_theta, torch_theta


def test_seed_nesterov_is_keras_nesterov_for_any_lr_and_torch_for_a_constant_lr():
    seed_theta, keras_theta, torch_theta = nesterov_runs(lambda t: 0.1, gamma=0.9, seed=23)
    assert_trajectories_close(seed_theta, keras_theta)
    assert_trajectories_close(seed_theta, torch_theta)
    seed_theta, keras_theta, torch_theta = nesterov_runs(
        lambda t: LEARNING_RATES[t], gamma=0.9, seed=23
    )
    assert_trajectories_close(seed_theta, keras_theta)
    assert_trajectories_differ(seed_theta, torch_theta)


def test_seed_adagrad_is_keras_with_zero_initial_accumulator():
    param0, grads = make_problem(seed=24)
    eps = 1e-3
    seed, seed_states = run_steps(
        reference.seed_adagrad, param0, grads, lambda t: {"eta": LEARNING_RATES[t], "eps": eps}
    )
    keras_like, keras_states = run_steps(
        reference.keras_adagrad,
        param0,
        grads,
        lambda t: {
            "learning_rate": LEARNING_RATES[t],
            "initial_accumulator_value": 0.0,
            "epsilon": eps,
        },
    )
    assert_trajectories_close(seed, keras_like)
    assert_close(seed_states[-1]["G"], keras_states[-1]["accumulator"])
    keras_default_init, _ = run_steps(
        reference.keras_adagrad,
        param0,
        grads,
        lambda t: {"learning_rate": LEARNING_RATES[t], "epsilon": eps},
    )
    assert_trajectories_differ(seed, keras_default_init)
    torch_like, _ = run_steps(
        reference.torch_adagrad, param0, grads, lambda t: {"lr": LEARNING_RATES[t], "eps": eps}
    )
    assert_trajectories_differ(seed, torch_like)


def test_seed_rmsprop_is_keras_and_not_torch():
    param0, grads = make_problem(seed=25)
    rho, eps = 0.9, 1e-3
    seed, seed_states = run_steps(
        reference.seed_rmsprop,
        param0,
        grads,
        lambda t: {"eta": LEARNING_RATES[t], "rho": rho, "eps": eps},
    )
    keras_like, keras_states = run_steps(
        reference.keras_rmsprop,
        param0,
        grads,
        lambda t: {"learning_rate": LEARNING_RATES[t], "rho": rho, "epsilon": eps},
    )
    assert_trajectories_close(seed, keras_like)
    assert_close(seed_states[-1]["E"], keras_states[-1]["velocity"])
    torch_like, _ = run_steps(
        reference.torch_rmsprop,
        param0,
        grads,
        lambda t: {"lr": LEARNING_RATES[t], "alpha": rho, "eps": eps},
    )
    assert_trajectories_differ(seed, torch_like)


def test_seed_adam_is_torch_and_keras_only_with_a_per_step_epsilon_hat():
    param0, grads = make_problem(seed=26)
    beta1, beta2, eps = 0.9, 0.999, 1e-3
    seed, seed_states = run_steps(
        reference.seed_adam,
        param0,
        grads,
        lambda t: {"alpha": LEARNING_RATES[t], "beta1": beta1, "beta2": beta2, "eps": eps},
    )
    torch_like, torch_states = run_steps(
        reference.torch_adam,
        param0,
        grads,
        lambda t: {"lr": LEARNING_RATES[t], "beta1": beta1, "beta2": beta2, "eps": eps},
    )
    assert_trajectories_close(seed, torch_like)
    assert_close(seed_states[-1]["m"], torch_states[-1]["exp_avg"])
    assert_close(seed_states[-1]["v"], torch_states[-1]["exp_avg_sq"])

    def keras_options(epsilon_at):
        return lambda t: {
            "learning_rate": LEARNING_RATES[t],
            "beta_1": beta1,
            "beta_2": beta2,
            "epsilon": epsilon_at(t + 1),
        }

    keras_epsilon_hat, _ = run_steps(
        reference.keras_adam,
        param0,
        grads,
        keras_options(lambda step: eps * np.sqrt(1 - beta2**step)),
    )
    assert_trajectories_close(seed, keras_epsilon_hat)
    keras_nominal, _ = run_steps(reference.keras_adam, param0, grads, keras_options(lambda _: eps))
    assert_trajectories_differ(seed, keras_nominal)


# --------------------------------------------------------------------------------------------
# Where the Keras and PyTorch forms of the new algorithms coincide (spec sections 14-16, 20)
# --------------------------------------------------------------------------------------------

CROSS_FRAMEWORK = [
    # Keras' Nadam has no momentum_decay: its 0.96**t schedule is torch's with momentum_decay 1.
    (
        "Nadam",
        (reference.torch_nadam, {"momentum_decay": 1.0, "eps": 1e-3, "scalar_dtype": "float64"}),
        (reference.keras_nadam, {"epsilon": 1e-3}),
        True,
    ),
    (
        "Adadelta",
        (reference.torch_adadelta, {"rho": 0.95, "eps": 1e-7}),
        (reference.keras_adadelta, {"rho": 0.95, "epsilon": 1e-7}),
        True,
    ),
    # Adamax: torch puts eps inside the maximum, Keras adds it to the maximum; equal at eps 0.
    (
        "Adamax-eps0",
        (reference.torch_adamax, {"eps": 0.0}),
        (reference.keras_adamax, {"epsilon": 0.0}),
        True,
    ),
    (
        "Adamax",
        (reference.torch_adamax, {"eps": 1e-3}),
        (reference.keras_adamax, {"epsilon": 1e-3}),
        False,
    ),
    (
        "Lion",
        # Without decay: Keras computes its decay factor in float32 (spec section 1).
        (reference.torch_lion, {"beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0}),
        (reference.keras_lion, {"weight_decay": None}),
        True,
    ),
]


@pytest.mark.parametrize(
    ("torch_step", "keras_step", "coincide"),
    [case[1:] for case in CROSS_FRAMEWORK],
    ids=[case[0] for case in CROSS_FRAMEWORK],
)
def test_keras_and_torch_forms_coincide_where_the_spec_says(torch_step, keras_step, coincide):
    param0, grads = make_problem(seed=51)
    (torch_function, torch_options), (keras_function, keras_options) = torch_step, keras_step
    torch_like, _ = run_steps(
        torch_function, param0, grads, lambda t: {"lr": LEARNING_RATES[t], **torch_options}
    )
    keras_like, _ = run_steps(
        keras_function,
        param0,
        grads,
        lambda t: {"learning_rate": LEARNING_RATES[t], **keras_options},
    )
    if coincide:
        assert_trajectories_close(torch_like, keras_like)
    else:
        assert_trajectories_differ(torch_like, keras_like)


# --------------------------------------------------------------------------------------------
# The oracle's own contract
# --------------------------------------------------------------------------------------------

STEP_FUNCTIONS = [
    (reference.torch_sgd, {"lr": 0.1, "momentum": 0.9}),
    (reference.torch_adagrad, {"lr": 0.1}),
    (reference.torch_rmsprop, {"lr": 0.1, "momentum": 0.5, "centered": True}),
    (reference.torch_adam, {"lr": 0.1, "amsgrad": True}),
    (reference.keras_sgd, {"learning_rate": 0.1, "momentum": 0.9}),
    (reference.keras_adagrad, {"learning_rate": 0.1}),
    (reference.keras_rmsprop, {"learning_rate": 0.1, "momentum": 0.5, "centered": True}),
    (reference.keras_adam, {"learning_rate": 0.1, "amsgrad": True, "weight_decay": 0.1}),
    (reference.torch_adadelta, {"lr": 0.1, "weight_decay": 0.1}),
    (reference.torch_adamax, {"lr": 0.1, "weight_decay": 0.1}),
    (reference.torch_nadam, {"lr": 0.1, "weight_decay": 0.1}),
    (reference.torch_radam, {"lr": 0.1, "weight_decay": 0.1}),
    (reference.torch_rprop, {"lr": 0.1}),
    (reference.torch_asgd, {"lr": 0.1, "t0": 0.0}),
    (reference.torch_lion, {"lr": 0.1, "weight_decay": 0.1}),
    (reference.keras_adadelta, {"learning_rate": 0.1, "weight_decay": 0.1}),
    (reference.keras_adamax, {"learning_rate": 0.1, "weight_decay": 0.1}),
    (reference.keras_nadam, {"learning_rate": 0.1, "weight_decay": 0.1}),
    (reference.keras_lion, {"learning_rate": 0.1, "weight_decay": 0.1}),
    (reference.keras_lamb, {"learning_rate": 0.1, "weight_decay": 0.1}),
    (reference.seed_momentum, {"alpha": 0.1, "beta": 0.9}),
    (reference.seed_adagrad, {"eta": 0.1, "eps": 1e-7}),
    (reference.seed_rmsprop, {"eta": 0.1, "rho": 0.9, "eps": 1e-7}),
    (reference.seed_adam, {"alpha": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}),
]


@pytest.mark.parametrize(
    ("step", "options"), STEP_FUNCTIONS, ids=[step.__name__ for step, _ in STEP_FUNCTIONS]
)
def test_reference_steps_never_write_their_inputs_and_return_float64(step, options):
    rng = np.random.default_rng(3)
    param = rng.normal(size=5).astype(np.float32)
    grad = rng.normal(size=5).astype(np.float32)
    _, state = step(param, grad, {}, **options)
    saved = (param.copy(), grad.copy(), {k: np.copy(v) for k, v in state.items()})
    new_param, new_state = step(param, grad, state, **options)
    np.testing.assert_array_equal(param, saved[0])
    np.testing.assert_array_equal(grad, saved[1])
    for key, value in saved[2].items():
        np.testing.assert_array_equal(state[key], value)
    assert new_param.dtype == np.float64
    for value in new_state.values():
        assert not isinstance(value, np.ndarray) or value.dtype == np.float64


@pytest.mark.parametrize("convention", ["keras", "torch"])
def test_lion_nan_direction_has_sign_0(keras, convention: str) -> None:
    """torch.sign(NaN) is 0, so Keras' Lion on the torch backend (and lion-pytorch) leaves an
    element whose direction is NaN where it was, and its momentum takes the NaN. The reference
    and the kernels, float32 and float64, do the same; they moved it by sign(NaN) = NaN."""
    nan = float("nan")
    lr = float(np.float32(0.1))  # Keras' learning-rate variable is float32
    param0, grad = np.array([1.0, 1.0, -2.0]), np.array([nan, 1.0, -0.5])
    variable = keras.Variable(param0, dtype="float64")
    optimizer = keras.optimizers.Lion(learning_rate=lr)
    optimizer.apply([keras.ops.convert_to_tensor(grad)], [variable])
    want = keras.ops.convert_to_numpy(variable.value)
    np.testing.assert_array_equal(want, [1.0, 1.0 - lr, -2.0 + lr])  # as torch.sign makes it
    if convention == "keras":
        expected, state = reference.keras_lion(param0, grad, {}, learning_rate=lr)
        momentum = state["momentum"]
    else:
        expected, state = reference.torch_lion(param0, grad, {}, lr=lr)
        momentum = state["exp_avg"]
    np.testing.assert_array_equal(expected, want)
    assert np.isnan(momentum[0]) and not np.isnan(momentum[1:]).any()
    for dtype in (np.float32, np.float64):
        param = param0.astype(dtype)
        if convention == "keras":
            optimizer = fusedopt.keras_numpy.Lion(learning_rate=lr)
            optimizer.apply([grad.astype(dtype)], [param])
        else:
            fusedopt.Lion([param], lr=lr).step([grad.astype(dtype)])
        np.testing.assert_array_equal(param, want.astype(dtype), err_msg=str(dtype))
