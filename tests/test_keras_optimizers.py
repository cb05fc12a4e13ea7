"""fusedopt.keras: real Keras 3 optimizers (torch backend), beside keras.optimizers itself.

The same model, data and seed trained by ``keras.optimizers.<Name>`` and by
``fusedopt.keras.<Name>`` through ``fit``, ``train_on_batch`` and a custom loop must end within
float32 rounding of each other, every weight and every optimizer variable (slots, iterations,
Nadam's u_product, EMA averages, gradient accumulators, the loss scale) within
``|fusedopt - keras| <= 1e-5 * (1 + |keras|)``, for every algorithm and each of Keras' options.
Saving and loading mid-run continues exactly as uninterrupted training; refused input changes
nothing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
if keras.backend.backend() != "torch":
    pytest.skip("fusedopt.keras runs on Keras' torch backend", allow_module_level=True)

import fusedopt  # noqa: E402
import fusedopt.keras as fk  # noqa: E402
import fusedopt.keras_numpy  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # Each test twice: Keras' tensors read through libtorch's C shim and through torch's Python
    # methods (conftest.tensor_reading).
    pytest.mark.usefixtures("tensor_reading"),
]

NAMES = [
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "Adadelta",
    "Adamax",
    "Nadam",
    "Lion",
    "Lamb",
]
TOLERANCE = 1e-5  # |fusedopt - keras| <= TOLERANCE * (1 + |keras|)


EPOCHS, BATCH, SAMPLES = 3, 16, 64  # 4 steps an epoch
# Base learning rates: Adadelta's lr only scales its move (Keras' example uses 1.0); SGD needs a
# larger one to go somewhere in 12 steps.
BASE_LR = {"Adadelta": 1.0, "SGD": 0.05}


def schedule(name: str) -> Any:
    """A rate that halves every 4 steps (every epoch here)."""
    return keras.optimizers.schedules.ExponentialDecay(
        BASE_LR.get(name, 0.01), decay_steps=4, decay_rate=0.5
    )


def data(dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((SAMPLES, 6)).astype(dtype)
    y = np.stack([np.sin(x[:, 0]) + x[:, 1] * x[:, 2], x[:, 3] - x[:, 4] ** 2, x[:, 5]], axis=1)
    return x, y.astype(dtype)


def make_model(dtype: str | None = None) -> Any:
    """Three Dense layers (6 variables) with the same initial weights on every call."""
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(12, activation="tanh", name="hidden_1", dtype=dtype),
            keras.layers.Dense(8, activation="relu", name="hidden_2", dtype=dtype),
            keras.layers.Dense(3, name="out", dtype=dtype),
        ],
        name="net",  # the slots' names follow the variables' paths
    )


def fit(optimizer: Any, epochs: int = EPOCHS, **kwargs: Any) -> Any:
    model = make_model()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = data()
    model.fit(x, y, epochs=epochs, batch_size=BATCH, shuffle=False, verbose=0, **kwargs)
    return model


def custom_loop(model: Any, optimizer: Any, steps: int = 8, dtype: str = "float32") -> Any:
    """A hand-written training loop: autograd's gradients, then ``optimizer.apply``."""
    x, y = data(dtype)
    variables = model.trainable_variables
    for step in range(steps):
        rows = slice((step * BATCH) % SAMPLES, (step * BATCH) % SAMPLES + BATCH)
        prediction = model(torch.as_tensor(x[rows]), training=True)
        loss = torch.mean((prediction - torch.as_tensor(y[rows])) ** 2)
        grads = torch.autograd.grad(loss, [v.value for v in variables])
        optimizer.apply(list(grads), variables)
    return model


def numpy_of(values: list[Any]) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v), dtype=np.float64) for v in values]


def max_error(actual: list[Any], expected: list[Any]) -> float:
    """The worst |actual - expected| / (1 + |expected|) over lists of tensors or variables."""
    worst = 0.0
    assert len(actual) == len(expected)
    for a, b in zip(numpy_of(actual), numpy_of(expected)):
        assert a.shape == b.shape
        if a.size:
            worst = max(worst, float(np.max(np.abs(a - b) / (1.0 + np.abs(b)))))
    return worst


def assert_matches(fused_model: Any, keras_model: Any, tol: float = TOLERANCE) -> float:
    """Every weight and every optimizer variable (the same layout: fusedopt.keras builds its
    slots with Keras' own build) within tol; returns the worst error."""
    weights = max_error(fused_model.weights, keras_model.weights)
    fused_opt, keras_opt = fused_model.optimizer, keras_model.optimizer
    assert slot_names(fused_opt) == slot_names(keras_opt)
    slots = max_error(fused_opt.variables, keras_opt.variables)
    assert weights <= tol and slots <= tol, f"weights {weights:.3g}, optimizer {slots:.3g}"
    return max(weights, slots)


def slot_names(optimizer: Any) -> list[str]:
    """The optimizer variables' names, without the optimizer's and model's own names and the
    global counter of unnamed variables (Nadam's u_product)."""
    names = [v.path.split("/")[-1] for v in optimizer.variables]
    return ["variable" if n.startswith("variable") else n for n in names]


def inner(optimizer: Any) -> Any:
    return getattr(optimizer, "inner_optimizer", optimizer)


@contextlib.contextmanager
def policy(name: str) -> Iterator[None]:
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# --------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("plan_route")
def test_fit_with_a_schedule_matches_keras(name: str) -> None:
    """Three epochs of ``fit``, the learning rate halving every epoch."""
    keras_model = fit(getattr(keras.optimizers, name)(learning_rate=schedule(name)))
    fused_model = fit(getattr(fk, name)(learning_rate=schedule(name)))
    assert type(fused_model.optimizer) is getattr(fk, name)
    assert int(fused_model.optimizer.iterations) == EPOCHS * SAMPLES // BATCH
    assert_matches(fused_model, keras_model)


def _excluding_bias(optimizer: Any) -> Any:
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


# (algorithm, constructor options, a step to run on the optimizer before fit)
OPTION_CASES = [
    ("AdamW", {"weight_decay": 0.1}, _excluding_bias),
    ("SGD", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05}, None),
    ("Lamb", {"weight_decay": 0.05}, _excluding_bias),
    ("Adam", {"clipnorm": 0.05, "amsgrad": True}, None),
    ("RMSprop", {"global_clipnorm": 0.1, "centered": True, "momentum": 0.5}, None),
    ("Lion", {"clipvalue": 0.01}, None),
    ("Adam", {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3}, None),
    ("Nadam", {"use_ema": True}, None),
    ("Nadam", {"gradient_accumulation_steps": 3}, None),
    ("Adagrad", {"gradient_accumulation_steps": 2, "weight_decay": 0.01}, None),
    ("Adamax", {"loss_scale_factor": 256.0}, None),
    ("Adadelta", {"loss_scale_factor": 0.5, "learning_rate": 1.0}, None),
    ("SGD", {"learning_rate": lambda: 0.03, "momentum": 0.5}, None),
]


def option_id(case: tuple) -> str:
    name, options, prepare = case
    items = [f"{k}={'callable' if callable(v) else v}" for k, v in options.items()]
    return "-".join([name, *items] + (["exclude_bias"] if prepare else []))


@pytest.mark.parametrize("case", OPTION_CASES, ids=map(option_id, OPTION_CASES))
def test_fit_with_keras_options_matches_keras(case: tuple) -> None:
    name, options, prepare = case
    prepare = prepare or (lambda o: o)
    keras_model = fit(prepare(getattr(keras.optimizers, name)(**options)))
    fused_model = fit(prepare(getattr(fk, name)(**options)))
    assert_matches(fused_model, keras_model)


# Under mixed_float16 the forward and backward passes round to float16 (2^-11), so a float32
# difference in a weight can flip a float16 rounding and move the next gradients by float16
# steps: Keras against itself, its initial weights scaled by 1 + 1e-6, ends 1.3e-5 apart (Nadam)
# after these 12 steps. fusedopt's Adam and Nadam differ from Keras' by about that much after the
# first step (Keras rounds 1 - beta_2**t in float32, fusedopt in double: spec 1), which float16
# then amplifies: measured 1.1e-5 (Adam) and 1.2e-5 (Nadam); SGD and Lamb stay below 1e-7.
MIXED_FLOAT16_TOLERANCE = 1e-4


@pytest.mark.parametrize("name", ["Adam", "SGD", "Nadam", "Lamb"])
def test_mixed_float16_matches_keras(name: str) -> None:
    """Under the mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer; the
    variables stay float32 and the dynamic loss scale is compared too."""
    with policy("mixed_float16"):
        keras_model = fit(getattr(keras.optimizers, name)(learning_rate=0.01))
        fused_model = fit(getattr(fk, name)(learning_rate=0.01))
    assert isinstance(fused_model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert type(inner(fused_model.optimizer)) is getattr(fk, name)
    assert fused_model.weights[0].dtype == "float32"
    assert_matches(fused_model, keras_model, MIXED_FLOAT16_TOLERANCE)


@pytest.mark.parametrize("name", NAMES)
def test_custom_loop_apply_matches_keras(name: str) -> None:
    """``optimizer.apply(grads, variables)`` in a hand-written loop, float32 variables."""
    keras_model = custom_loop(
        make_model(), getattr(keras.optimizers, name)(BASE_LR.get(name, 0.01))
    )
    fused_model = custom_loop(make_model(), getattr(fk, name)(BASE_LR.get(name, 0.01)))
    assert max_error(fused_model.weights, keras_model.weights) <= TOLERANCE


@pytest.mark.parametrize("holder", ["variable", "tensor"])
def test_hyperparameters_held_in_a_variable_or_tensor_are_read_at_every_step_as_keras(
    holder: str,
) -> None:
    """Keras reads ``beta_1`` and ``epsilon`` at every step: changed in place between steps (a
    variable assigned, a 0-d tensor filled), the next step uses the new values."""
    trained = []
    for module in (keras.optimizers, fk):
        optimizer = module.Adam(0.05)
        w = keras.Variable(np.array([1.0, -1.0, 0.5], np.float32))
        if holder == "variable":
            beta_1, epsilon = keras.Variable(0.9), keras.Variable(1e-7)
            set_beta_1, set_epsilon = beta_1.assign, epsilon.assign
        else:
            beta_1, epsilon = torch.tensor(0.9), torch.tensor(1e-7)
            set_beta_1, set_epsilon = beta_1.fill_, epsilon.fill_
        optimizer.beta_1, optimizer.epsilon = beta_1, epsilon
        for t in range(5):
            optimizer.apply([torch.tensor([0.3, -2.0, 1e-3]) * (t + 1)], [w])
            set_beta_1(0.5 / (t + 1))
            set_epsilon(10.0 ** -(t + 1))
        trained.append([w, optimizer._momentums[0], optimizer._velocities[0]])
    assert max_error(trained[1], trained[0]) <= TOLERANCE
    # The momentum of beta_1 = 0.9, 0.5, 0.25, 1/6, 0.125 (-2.6 had 0.9 been kept).
    np.testing.assert_allclose(keras.ops.convert_to_numpy(trained[1][1])[1], -9.688, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "flag", "hyper"),
    [("Adam", "amsgrad", {}), ("SGD", "nesterov", {"momentum": 0.9}), ("RMSprop", "centered", {})],
)
def test_a_flag_given_as_none_is_off_as_keras_takes_it(name: str, flag: str, hyper: dict) -> None:
    trained, configs = [], []
    for module in (keras.optimizers, fk):
        optimizer = getattr(module, name)(0.01, **hyper, **{flag: None})
        configs.append({k: v for k, v in optimizer.get_config().items() if k != "name"})
        trained.append(custom_loop(make_model(), optimizer, steps=3))
    assert configs[1] == configs[0] and configs[1][flag] is None  # Keras keeps the None
    assert max_error(trained[1].weights, trained[0].weights) <= TOLERANCE
    off = custom_loop(make_model(), getattr(fk, name)(0.01, **hyper, **{flag: False}), steps=3)
    assert_unchanged(snapshot(off.weights), trained[1].weights)
    assert getattr(getattr(fk, name).from_config(configs[1]), flag) is None
    # fusedopt.keras_numpy takes the same arguments.
    steps = []
    for value in (None, False):
        w = np.array([1.0, -2.0, 0.5], np.float32)
        optimizer = getattr(fusedopt.keras_numpy, name)(0.01, **hyper, **{flag: value})
        for t in range(3):
            optimizer.apply([np.array([0.5, 0.25, -1.0], np.float32) * (t + 1)], [w])
        steps.append(w)
    np.testing.assert_array_equal(steps[0], steps[1])


class _CountingRate:
    """A callable learning rate driven by its own count of calls (a stateful warmup)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return 0.1 / self.calls


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_decay": 0.01},
        {"gradient_accumulation_steps": 2},
        {"weight_decay": 0.01, "gradient_accumulation_steps": 3},
        {"weight_decay": 0.01, "master_weights": True},
    ],
    ids=lambda options: "-".join(options) or "plain",
)
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_callable_learning_rate_is_called_as_often_as_keras_calls_it(
    name: str, options: dict
) -> None:
    """Once per update, once more for the weight decay, never on an accumulation step nor in
    the constructor: a stateful callable follows Keras' trajectory."""
    options = dict(options)  # shared by the parameters
    precision = {k: options.pop(k) for k in ("master_weights",) if k in options}
    counts, trained = [], []
    for module, extra in ((keras.optimizers, {}), (fk, precision)):
        rate = _CountingRate()
        optimizer = getattr(module, name)(learning_rate=rate, **options, **extra)
        assert rate.calls == 0
        # master_weights: bfloat16 variables (their decay goes to the masters), float32 math,
        # beside Keras on float32 variables.
        dtype = "bfloat16" if extra else "float32"
        w = keras.Variable(np.array([1.0, -2.0, 0.5]), dtype=dtype)
        for t in range(6):
            optimizer.apply([torch.tensor([0.5, 0.25, -1.0], dtype=w.value.dtype) * (t + 1)], [w])
        counts.append(rate.calls)
        trained.append([w])
    updates = 6 // options.get("gradient_accumulation_steps", 1)
    assert counts[0] == updates * (2 if "weight_decay" in options else 1)  # Keras'
    assert counts[1] == counts[0]
    assert max_error(trained[1], trained[0]) <= (1e-2 if precision else TOLERANCE)


@pytest.mark.parametrize(
    "options",
    [
        {"clipnorm": 1.0},
        {"global_clipnorm": 1.0},
        {"clipvalue": 1.0},
        {},
        {"clipnorm": 1.0, "gradient_accumulation_steps": 2},
    ],
    ids=lambda options: "-".join(options) or "plain",
)
def test_gradients_are_clipped_in_their_dtype_then_cast_as_keras_does(options: dict) -> None:
    """float16 gradients of float32 variables: Keras clips them in float16 (300**2 * 4
    overflows: clipnorm gives 0, global_clipnorm NaN), then casts them in its update step."""
    trained = []
    for module in (keras.optimizers, fk):
        w = keras.Variable(np.zeros(4), dtype="float32")
        optimizer = module.SGD(0.1, momentum=0.5, **options)
        for _ in range(4):
            optimizer.apply([torch.full((4,), 300.0, dtype=torch.float16)], [w])
        trained.append(numpy_of([w, *optimizer.variables]))
    for fused, theirs in zip(*trained):
        np.testing.assert_allclose(fused, theirs, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_an_overflowing_second_moment_stays_inf_as_on_keras_torch_backend(
    name: str, amsgrad: bool
) -> None:
    """g**2 overflows float32 at the first step (docs/spec.md section 7): Keras on the torch
    backend keeps v = inf and finite weights from then on; the generic form v + (g*g - v)(1 -
    beta_2) would turn v into NaN at the next, finite, gradient."""
    trained = []
    for module in (keras.optimizers, fk):
        w = keras.Variable(np.array([0.5, -0.25, 1.0], np.float32))
        optimizer = getattr(module, name)(0.01, amsgrad=amsgrad)
        for g in ([3e19, 1.0, -2.0], [1.0, 2.0, 3.0], [-0.5, 4.0, 1.0]):
            optimizer.apply([torch.tensor(g, dtype=torch.float32)], [w])
        trained.append(numpy_of([w, *optimizer.variables]))
    assert np.all(np.isfinite(trained[1][0]))
    for fused, theirs in zip(*trained):
        np.testing.assert_allclose(fused, theirs, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize(("grads", "rho"), [([2.0, 1.0, -0.5], 0.9), ([0.5, -1.5, 1.0], 0.0)])
def test_centered_rmsprop_under_a_steady_grad_matches_keras(grads, rho, momentum) -> None:
    """A steady grad makes RMSprop's ms equal mg**2 up to rounding, so the order of Keras' torch
    step, (ms + epsilon) - mg**2, decides the denominator (docs/spec.md section 6): the generic
    (ms - mg**2) + epsilon went 4.7% off in 300 steps, and at rho = 0 gave 4.74 where Keras
    gives inf. keras_numpy runs the same kernel. (Small grads, whose ms is near epsilon, are left
    out: there torch's fused multiply-adds in ms's update, which fusedopt does not make, are
    amplified by the same cancellation.)"""
    steps = 300 if rho else 1
    trained = []
    for make in (keras.optimizers.RMSprop, fk.RMSprop):
        w = keras.Variable(np.zeros(len(grads), np.float32))
        optimizer = make(1e-3, rho=rho, momentum=momentum, centered=True)
        for _ in range(steps):
            optimizer.apply([torch.tensor(grads, dtype=torch.float32)], [w])
        trained.append(numpy_of([w, *optimizer.variables]))
    arrays = [np.zeros(len(grads), np.float32)]
    optimizer = fusedopt.keras_numpy.RMSprop(1e-3, rho=rho, momentum=momentum, centered=True)
    for _ in range(steps):
        optimizer.apply([np.array(grads, np.float32)], arrays)
    theirs, fused = trained
    np.testing.assert_allclose(arrays[0], theirs[0], rtol=TOLERANCE, atol=TOLERANCE)
    for mine, keras_value in zip(fused, theirs):
        np.testing.assert_allclose(mine, keras_value, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("name", ["Adam", "Nadam", "Lamb"])
def test_float64_variables_match_keras(name: str) -> None:
    """float64 layers (Keras' learning-rate variable stays float32, floatx)."""
    keras_opt = getattr(keras.optimizers, name)(0.01)
    fused_opt = getattr(fk, name)(0.01)
    keras_model = custom_loop(make_model("float64"), keras_opt, dtype="float64")
    fused_model = custom_loop(make_model("float64"), fused_opt, dtype="float64")
    assert fused_model.weights[0].dtype == "float64"
    assert max_error(fused_model.weights, keras_model.weights) <= 1e-10
    assert max_error(fused_opt.variables, keras_opt.variables) <= 1e-10


@pytest.mark.usefixtures("plan_route")
def test_train_on_batch_and_evaluate_match_keras() -> None:
    x, y = data()
    losses = {}
    models = {}
    for label, optimizer in (("keras", keras.optimizers.AdamW(0.01)), ("fused", fk.AdamW(0.01))):
        model = make_model()
        model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
        losses[label] = [model.train_on_batch(x[:BATCH], y[:BATCH]) for _ in range(5)]
        losses[label].append(model.evaluate(x, y, verbose=0))
        models[label] = model
    np.testing.assert_allclose(losses["fused"], losses["keras"], rtol=TOLERANCE)
    assert_matches(models["fused"], models["keras"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_numpy_api_matches_the_keras_optimizer(dtype: str) -> None:
    """fusedopt.keras_numpy (NumPy arrays, no Keras) and fusedopt.keras (Keras variables) run
    the same kernel with the same options: the same grads give the same bits, Nadam's
    u_product too (kept in the variables' dtype, 16-bit ones rounded after each step)."""
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,), (40,)]
    numpy_dtype = fusedopt._engine.numpy_dtype(dtype)
    start = [rng.standard_normal(s).astype(numpy_dtype) for s in shapes]
    arrays = [a.copy() for a in start]
    variables = [keras.Variable(a.astype(np.float32), dtype=dtype) for a in start]
    numpy_opt = fusedopt.keras_numpy.Nadam(learning_rate=0.01)
    keras_opt = fk.Nadam(learning_rate=0.01)
    for _ in range(5):
        grads = [rng.standard_normal(s).astype(numpy_dtype) for s in shapes]
        assert numpy_opt.apply(grads, arrays) == 1 + int(keras_opt.iterations)
        keras_opt.apply([torch.tensor(g.astype(np.float32)).to(v.value.dtype) for g, v in
                         zip(grads, variables)], variables)  # fmt: skip
    for a, v in zip(arrays, variables):
        np.testing.assert_array_equal(a.astype(np.float32), numpy_of([v])[0].astype(np.float32))
    assert numpy_opt.u_product == float(keras_opt._u_product.value.float())


# ------------------------------------------------------------------------ one fused step


def test_one_native_call_updates_every_variable_in_place(monkeypatch: Any, plan_route: str) -> None:
    """Keras' per-variable update_step is never called; each step is one native call over all
    the variables, in the tensors the model holds, through the route's plan."""
    calls = []
    run = fk.Optimizer._run
    plan = "TorchPlan" if plan_route == "cpu" else "_DevicePlan"

    def counting_run(self: Any, entry: Any, grads: list, step: int) -> bool:
        calls.append((len(grads), step, type(entry.plan).__name__))
        return run(self, entry, grads, step)

    def no_update_step(*args: Any) -> None:
        raise AssertionError("Keras' per-variable update_step was called")

    monkeypatch.setattr(fk.Optimizer, "_run", counting_run)
    monkeypatch.setattr(fk.Adam, "update_step", no_update_step)
    model = make_model()
    model.compile(optimizer=fk.Adam(0.01), loss="mse")
    model.build((None, 6))
    model.optimizer.build(model.trainable_variables)
    tensors = [v.value for v in model.trainable_variables + model.optimizer.variables]
    before = numpy_of(model.trainable_variables)
    x, y = data()
    model.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
    assert calls == [(6, t, plan) for t in range(1, 9)]
    assert all(a is v.value for a, v in zip(tensors, model.trainable_variables))
    assert all(a is v.value for a, v in zip(tensors[6:], model.optimizer.variables))
    assert all(np.any(a != b) for a, b in zip(numpy_of(model.trainable_variables), before))


def test_a_variable_given_a_new_tensor_is_followed() -> None:
    """A plan is made over the variables' tensors; a variable that holds another tensor later
    (its memory replaced) gets a new plan, never an update of the old memory."""
    models = []
    for optimizer in (keras.optimizers.Adam(0.01), fk.Adam(0.01)):
        model = custom_loop(make_model(), optimizer, steps=2)
        variable = model.trainable_variables[0]
        variable._value = torch.nn.Parameter(variable.value.detach().clone())
        models.append(custom_loop(model, optimizer, steps=2))
    assert max_error(models[1].weights, models[0].weights) <= TOLERANCE


@pytest.mark.parametrize("name", NAMES)
def test_a_model_with_column_major_variables_trains_as_keras(name: str) -> None:
    """Keras' Orthogonal initializer (SimpleRNN's recurrent kernel, here also a Dense kernel)
    gives a column-major tensor (torch's QR), which fusedopt refused at every step; it is made
    row-major once, and training follows Keras'."""
    x = np.random.default_rng(1).random((16, 4, 3)).astype("float32")
    y = np.random.default_rng(2).random((16, 1)).astype("float32")
    models = []
    for module in (keras.optimizers, fk):
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [
                keras.Input((4, 3)),
                keras.layers.SimpleRNN(4),
                keras.layers.Dense(2, kernel_initializer="orthogonal"),
                keras.layers.Dense(1),
            ]
        )
        assert not all(v.value.is_contiguous() for v in model.trainable_variables)
        model.compile(optimizer=getattr(module, name)(BASE_LR.get(name, 0.01)), loss="mse")
        model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        models.append(model)
    assert max_error(models[1].weights, models[0].weights) <= TOLERANCE


@pytest.mark.parametrize("which", ["itself", "another variable", "a slot"])
@pytest.mark.usefixtures("plan_route")
def test_a_gradient_in_the_memory_of_a_variable_or_slot_steps_as_keras(which: str) -> None:
    """Keras accepts a gradient that is a variable's (or a slot's) own tensor. fusedopt's
    native step refused the overlap, but only after Keras' weight decay had written the
    variables; such a gradient is now copied after the decay, and the step follows Keras'. (A
    slot as the gradient is read as it was before the step: Keras' update reads it half-way
    through its own writes, so here Keras is given a copy.)"""
    results = []
    for module in (keras.optimizers, fk):
        opt = module.AdamW(learning_rate=0.1, weight_decay=0.5)
        v = keras.Variable(np.array([1.0, 2.0, 3.0], np.float32))
        w = keras.Variable(np.array([4.0, 5.0, 6.0], np.float32))
        opt.apply([torch.ones(3), torch.ones(3)], [v, w])
        grad = {"itself": v.value, "another variable": w.value, "a slot": opt.variables[2].value}
        copy = which == "a slot" and module is keras.optimizers
        opt.apply([grad[which].clone() if copy else grad[which], torch.ones(3)], [v, w])
        results.append([v, w, *opt.variables])
    assert max_error(results[1], results[0]) <= TOLERANCE


@pytest.mark.usefixtures("plan_route")
def test_a_slot_given_new_memory_is_followed_not_written_after_free() -> None:
    """`slot.value.data = other` keeps the tensor object and frees its old memory: the plan
    went on writing the freed memory (and never the new one). Every registered tensor's memory
    is now checked at each step, and a moved one gets a new plan."""
    results = []
    for module in (keras.optimizers, fk):
        opt = module.SGD(0.1, momentum=0.9)
        v = keras.Variable(np.ones(4, np.float32))
        opt.apply([torch.ones(4)], [v])
        momentum = opt.momentums[0]
        momentum.value.data = momentum.value.detach().clone()
        opt.apply([torch.ones(4)], [v])
        results.append([v, momentum])
    assert max_error(results[1], results[0]) <= TOLERANCE


@pytest.mark.usefixtures("plan_route")
def test_a_variable_overwritten_with_its_gradient_is_left_by_a_refused_step() -> None:
    """Keras assigns a variable whose overwrite_with_gradient is set its gradient (float8
    training's scales) and steps the others: fusedopt as Keras; and a step refused for another
    variable's gradient (it checks them before the update) leaves it too."""
    results = []
    for module in (keras.optimizers, fk):
        w = keras.Variable(np.ones((3, 2), np.float32), name="w")
        scale = keras.Variable(np.ones(4, np.float32), name="scale")
        scale.overwrite_with_gradient = True
        optimizer = module.Adam(0.1)
        optimizer.apply([torch.full((3, 2), 0.5), torch.full((4,), 7.0)], [w, scale])
        results.append((keras.ops.convert_to_numpy(w), keras.ops.convert_to_numpy(scale)))
    for ours, theirs in zip(results[1], results[0]):
        np.testing.assert_allclose(ours, theirs, rtol=TOLERANCE, atol=TOLERANCE)
    assert np.all(results[1][1] == 7.0)
    with pytest.raises(ValueError, match="shape"):
        optimizer.apply([torch.ones(2, 3), torch.full((4,), 9.0)], [w, scale])
    assert np.all(keras.ops.convert_to_numpy(scale) == 7.0), "overwritten by a refused step"
    assert np.array_equal(keras.ops.convert_to_numpy(w), results[1][0])
    assert int(optimizer.iterations) == 1
    optimizer.apply([None, torch.full((4,), 9.0)], [w, scale])  # only the overwrite
    assert np.all(keras.ops.convert_to_numpy(scale) == 9.0) and int(optimizer.iterations) == 2


def test_a_sparse_gradient_steps_as_its_dense_gradient_as_keras() -> None:
    results = []
    for module in (keras.optimizers, fk):
        opt = module.Adam(0.1)
        v = keras.Variable(np.ones((2, 2), np.float32))
        opt.apply([torch.tensor([[0.0, 1.0], [0.0, 0.0]]).to_sparse()], [v])
        results.append([v, *opt.variables])
    assert max_error(results[1], results[0]) <= TOLERANCE


@pytest.mark.usefixtures("plan_route")
def test_a_gradient_missing_for_some_variables_steps_the_others() -> None:
    results = []
    for optimizer in (keras.optimizers.RMSprop(0.01, momentum=0.9), fk.RMSprop(0.01, momentum=0.9)):
        variables = [keras.Variable(np.full(n, 1.0, np.float32)) for n in (3, 4, 5)]
        for step in range(4):
            grads = [torch.full((3,), 0.5), None, torch.full((5,), -2.0)]
            if step % 2:
                grads = [None, torch.full((4,), 1.5), torch.full((5,), 0.1)]
            with pytest.warns(UserWarning, match="Gradients do not exist"):
                optimizer.apply(grads, variables)
        results.append(variables + optimizer.variables)
    assert max_error(results[1], results[0]) <= TOLERANCE


# ----------------------------------------------------------------------- saving, config


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("Nadam", {}),
        ("AdamW", {"clipnorm": 0.5}),
        ("SGD", {"momentum": 0.9, "gradient_accumulation_steps": 3}),
    ],
)
def test_save_load_and_continue_equals_uninterrupted_training(
    tmp_path: Path, name: str, options: dict
) -> None:
    def optimizer() -> Any:
        return getattr(fk, name)(learning_rate=schedule(name), **options)

    uninterrupted = fit(optimizer(), epochs=4)
    first_half = fit(optimizer(), epochs=2)
    path = tmp_path / "model.keras"
    first_half.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer) is getattr(fk, name)
    assert loaded.optimizer.get_config() == first_half.optimizer.get_config()
    assert int(loaded.optimizer.iterations) == int(first_half.optimizer.iterations)
    x, y = data()
    loaded.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
    for a, b in zip(numpy_of(loaded.weights), numpy_of(uninterrupted.weights)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        numpy_of(loaded.optimizer.variables), numpy_of(uninterrupted.optimizer.variables)
    ):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_callback_saves_a_loadable_model(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.keras"
    model = fit(fk.Lamb(0.01), epochs=2, callbacks=[keras.callbacks.ModelCheckpoint(path)])
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer) is fk.Lamb
    assert max_error(loaded.optimizer.variables, model.optimizer.variables) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_signature_defaults_and_config_are_keras_s(name: str) -> None:
    import inspect

    ours, theirs = getattr(fk, name), getattr(keras.optimizers, name)
    assert issubclass(ours, theirs) and issubclass(ours, keras.optimizers.Optimizer)
    # Keras' parameters, then the low-precision options, keyword-only, before **kwargs.
    parameters = list(inspect.signature(ours).parameters.values())
    options = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in options] == list(fusedopt._engine.PRECISION_OPTIONS)
    assert [p for p in parameters if p not in options] == list(
        inspect.signature(theirs).parameters.values()
    )
    optimizer = ours()
    config = optimizer.get_config()
    expected = theirs().get_config()
    assert {k: v for k, v in config.items() if k != "name"} == {
        k: v for k, v in expected.items() if k != "name"
    }
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is ours and again.get_config() == config
    assert type(ours.from_config(config)) is ours


def test_compile_takes_the_optimizer() -> None:
    model = make_model()
    model.compile(optimizer=fk.AdamW(learning_rate=1e-3), loss="mse")
    assert type(model.optimizer) is fk.AdamW


# ----------------------------------------------------------------------------- refusals


def snapshot(*groups: list[Any]) -> list[np.ndarray]:
    return [a.copy() for group in groups for a in numpy_of(group)]


def assert_unchanged(before: list[np.ndarray], *groups: list[Any]) -> None:
    after = snapshot(*groups)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


def built(optimizer: Any) -> tuple[Any, list[Any]]:
    """A model trained one step by the optimizer (so every slot exists and is nonzero)."""
    model = custom_loop(make_model(), optimizer, steps=1)
    return model, model.trainable_variables


def test_a_variable_of_another_dtype_is_refused_at_build() -> None:
    optimizer = fk.Adam(weight_decay=0.1)
    variables = [keras.Variable(np.ones(3), dtype="float32", name="w")]
    variables.append(keras.Variable(np.ones(2), dtype="int32", name="ints", trainable=False))
    with pytest.raises(TypeError, match=r"'ints' has dtype int32; fusedopt updates float32"):
        optimizer.apply([np.ones(3, np.float32), np.ones(2, np.int32)], variables)
    assert not optimizer.built and int(optimizer.iterations) == 0
    assert_unchanged([np.ones(3), np.ones(2)], variables)


# ----------------------------------------------------------------------- 16-bit variables

SIXTEEN_BIT_CASES = [
    ("Adam", {}, {}),  # slots in the variables' dtype, as Keras makes them
    ("Adam", {}, dict(stochastic_rounding=True, seed=3)),
    ("SGD", dict(momentum=0.9), dict(state_dtype="float32", stochastic_rounding=True, seed=5)),
    ("RMSprop", dict(momentum=0.5), dict(state_dtype="float32")),
    ("Lion", {}, dict(state_dtype="bfloat16")),
    ("Lamb", {}, dict(stochastic_rounding=True, seed=9)),
    ("Adam", {}, dict(master_weights=True)),
    ("AdamW", dict(weight_decay=0.0), dict(master_weights=True, stochastic_rounding=True)),
    ("Adagrad", {}, dict(master_weights=True, state_dtype="float32")),
]


def _three_steps_beside_keras_numpy(
    name: str, hyper: dict, options: dict, dtype: str, shapes: tuple, ulps: int = 0
) -> tuple[Any, Any, list[Any]]:
    """fusedopt.keras.<name> over Keras variables of this dtype and fusedopt.keras_numpy.<name>
    over NumPy copies, the same options and grads for three steps; the variables' bits are
    asserted equal (``ulps``: within that many units in their last place, few of them apart).
    Returns both optimizers and the variables."""
    from fusedopt._engine import numpy_dtype

    storage = numpy_dtype(dtype)
    rng = np.random.default_rng(17)
    starts = [rng.standard_normal(shape).astype(storage) for shape in shapes]
    variables = [keras.Variable(a.astype(np.float32), dtype=dtype) for a in starts]
    arrays = [a.copy() for a in starts]
    optimizer = getattr(fk, name)(learning_rate=0.01, **hyper, **options)
    twin = getattr(fusedopt.keras_numpy, name)(learning_rate=0.01, **hyper, **options)
    for _ in range(3):
        grads = [rng.standard_normal(a.shape).astype(storage) for a in starts]
        optimizer.apply([torch.from_numpy(g.astype(np.float32)).to(getattr(torch, dtype))
                         for g in grads], variables)  # fmt: skip
        twin.apply(grads, arrays)
    for variable, array in zip(variables, arrays):
        got = keras.ops.convert_to_numpy(variable.value.float()).astype(storage)
        if not ulps:
            assert np.array_equal(got.view(np.uint8), array.view(np.uint8))
            continue
        apart = np.abs(got.view(np.int16).astype(np.int32) - array.view(np.int16))  # same signs
        assert apart.max() <= ulps and np.count_nonzero(apart) <= max(2, apart.size // 100)
    return optimizer, twin, variables


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(
    ("name", "hyper", "options"),
    SIXTEEN_BIT_CASES,
    ids=[f"{c[0]}-{'-'.join(c[2]) or 'default'}" for c in SIXTEEN_BIT_CASES],
)
def test_16_bit_variables_step_as_the_numpy_keras_classes_do(
    name: str, hyper: dict, options: dict, dtype: str, plan_route: str
) -> None:
    """bfloat16 and float16 Keras variables, slots in ``state_dtype``, stochastic rounding keyed
    by Keras' t: the same bits as fusedopt.keras_numpy with the same options over NumPy arrays,
    three steps, two variables. (Keras' own optimizers compute in the variables' dtype;
    fusedopt's math is float32, rounded once per write.) On a GPU, LAMB's per-tensor sums add
    in another order than on the CPU: its variables within 2 units in their last place."""
    ulps = 2 if plan_route != "cpu" and name == "Lamb" else 0
    optimizer, twin, variables = _three_steps_beside_keras_numpy(
        name, hyper, options, dtype, ((40, 30), (30,)), ulps
    )
    if options.get("master_weights"):
        for k, master in enumerate(optimizer._fusedopt_masters):
            assert master.dtype == "float32"
            assert np.array_equal(master.value.detach().numpy(), twin._masters[k])
    slot_dtype = options.get("state_dtype") or dtype
    masters = {id(m) for m in getattr(optimizer, "_fusedopt_masters", []) if m is not None}
    slots = [
        v for v in optimizer.variables if v.shape == variables[0].shape and id(v) not in masters
    ]
    assert slots and all(keras.backend.standardize_dtype(v.dtype) == slot_dtype for v in slots)


@pytest.mark.usefixtures("plan_route")
def test_nadam_keeps_its_u_product_in_the_variables_dtype_as_keras_does() -> None:
    """Keras makes Nadam's optimizer-wide u_product in the variables' dtype: over bfloat16
    variables it is stepped in float32 and stored rounded, each step from the stored value."""
    variable = keras.Variable(np.ones(64, np.float32), dtype="bfloat16")
    optimizer = fk.Nadam(0.01)
    expected = 1.0
    for t in range(1, 4):
        optimizer.apply([torch.full((64,), 0.5, dtype=torch.bfloat16)], [variable])
        u_t = 0.9 * (1.0 - 0.5 * 0.96**t)
        expected = float(torch.tensor(expected * u_t, dtype=torch.bfloat16))
        stored = optimizer._u_product.value.detach()
        assert stored.dtype == torch.bfloat16
        assert abs(float(stored) - expected) <= 2**-7 * expected
    assert (variable.value.float() < 1).all()


@pytest.mark.parametrize(
    "options",
    [dict(state_dtype="float32", stochastic_rounding=True, seed=2),
     dict(master_weights=True, stochastic_rounding=True, seed=2)],
    ids=["float32-slots", "master"],
)  # fmt: skip
@pytest.mark.usefixtures("plan_route")
def test_a_bfloat16_model_trains_saves_and_continues_with_its_options(
    tmp_path: Path, options: dict
) -> None:
    """Under the 'bfloat16' policy (bfloat16 variables) model.fit trains (with weight decay)
    with float32 slots or float32 masters and stochastic rounding; the options are in the saved
    config, and a loaded model continues exactly as the original does (masters included)."""
    with policy("bfloat16"):
        model = make_model()
        optimizer = fk.AdamW(0.01, **options)
        model.compile(optimizer=optimizer, loss="mse")
        x, y = data()
        before = model.evaluate(x, y, verbose=0)
        model.fit(x, y, epochs=4, batch_size=BATCH, shuffle=False, verbose=0)
        assert model.evaluate(x, y, verbose=0) < 0.8 * before
        assert {keras.backend.standardize_dtype(v.dtype) for v in model.trainable_variables} == {
            "bfloat16"
        }
        slot = "float32" if options.get("state_dtype") else "bfloat16"
        assert keras.backend.standardize_dtype(optimizer._momentums[0].dtype) == slot
        path = tmp_path / "model.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        assert loaded.optimizer.precision == optimizer.precision
        for m in (model, loaded):
            m.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
        for a, b in zip(model.weights, loaded.weights):
            assert np.array_equal(
                a.value.detach().view(torch.int16).numpy(),
                b.value.detach().view(torch.int16).numpy(),
            )
        for a, b in zip(optimizer.variables, loaded.optimizer.variables):
            assert np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


@pytest.mark.parametrize(
    ("options", "what"),
    [(dict(state_dtype="float16"), "state_dtype: must be None"),
     (dict(state_dtype="int8", seed=-1), r"seed must be in \[0, 2\*\*64\)")],
)  # fmt: skip
def test_invalid_precision_options_are_refused_at_construction(options: dict, what: str):
    with pytest.raises(ValueError, match=what):
        fk.Adam(**options)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("name", "hyper"), [("Adam", {}), ("Adagrad", {}),
                                             ("SGD", dict(momentum=0.9))])  # fmt: skip
@pytest.mark.usefixtures("plan_route")
def test_8_bit_slots_step_as_the_numpy_keras_classes_do(name: str, hyper: dict, dtype: str):
    """state_dtype="int8": a variable of 4096 elements or more gets uint8 slots holding the
    codes of the state's initial value (Adagrad's 0.1 included) and an absmax variable each; a
    smaller one float32 slots. Three steps: the same bits as fusedopt.keras_numpy, variables,
    codes and scales."""
    optimizer, twin, _ = _three_steps_beside_keras_numpy(
        name, hyper, dict(state_dtype="int8"), dtype, ((80, 70), (30,))
    )
    native = optimizer._declaration._description.states[0]
    slots = getattr(optimizer, optimizer._slots[0])
    assert keras.backend.standardize_dtype(slots[0].dtype) == "uint8"
    assert keras.backend.standardize_dtype(slots[1].dtype) == "float32"
    keras_name = twin._state_names[0]
    twin_state = twin.state[0]
    assert np.array_equal(keras.ops.convert_to_numpy(slots[0]), twin_state[keras_name])
    scales = optimizer._fusedopt_absmax[native]
    assert scales[1] is None
    assert np.array_equal(keras.ops.convert_to_numpy(scales[0]), twin_state[keras_name + "_absmax"])


@pytest.mark.usefixtures("plan_route")
def test_an_8_bit_model_saves_loads_and_continues_exactly(tmp_path: Path) -> None:
    """A wide layer (6400 weights) with 8-bit slots and a bfloat16 master under the 'bfloat16'
    policy: saved and loaded, it continues bit for bit, codes and scales included."""
    with policy("bfloat16"):
        keras.utils.set_random_seed(5)
        model = keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(100, name="wide"), keras.layers.Dense(3)]
        )
        model.compile(optimizer=fk.AdamW(0.01, state_dtype="int8", master_weights=True), loss="mse")
        rng = np.random.default_rng(8)
        x, y = rng.standard_normal((64, 64)), rng.standard_normal((64, 3))
        model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
        path = tmp_path / "wide.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        for m in (model, loaded):
            m.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
        dtypes = {keras.backend.standardize_dtype(v.dtype) for v in model.optimizer.variables}
        assert {"uint8", "float32"} <= dtypes
        for a, b in zip(
            [*model.weights, *model.optimizer.variables],
            [*loaded.weights, *loaded.optimizer.variables],
        ):
            assert np.array_equal(
                keras.ops.convert_to_numpy(a.value.float() if a.dtype == "bfloat16" else a),
                keras.ops.convert_to_numpy(b.value.float() if b.dtype == "bfloat16" else b),
            )


@pytest.mark.usefixtures("plan_route")
def test_master_weights_take_keras_weight_decay_and_follow_writes_to_the_variables() -> None:
    """With master_weights, Keras' decoupled decay goes to the float32 master (a bfloat16
    variable would lose it: 1 - 1e-4 rounds to 1), and a variable written outside the step (an
    assign, an EMA overwrite, a load) is where its master starts again."""
    variable = keras.Variable(np.ones(8, np.float32), dtype="bfloat16")
    optimizer = fk.SGD(0.1, weight_decay=1e-3, master_weights=True)
    zeros = torch.zeros(8, dtype=torch.bfloat16)
    factor = 1 - 1e-3 * torch.tensor(0.1)  # Keras' torch backend: v *= 1 - wd * lr
    expected = torch.ones(8)
    for _ in range(3):
        optimizer.apply([zeros], [variable])
        expected = expected * factor
    master = optimizer._fusedopt_masters[0].value.detach()
    assert torch.equal(master, expected) and (master < 1).all()
    assert torch.equal(variable.value.detach(), expected.to(torch.bfloat16))
    variable.assign(np.full(8, 2.0, np.float32))
    optimizer.apply([zeros], [variable])
    master = optimizer._fusedopt_masters[0].value.detach()
    assert torch.equal(master, torch.full((8,), 2.0) * factor)


def test_a_state_dtype_for_float64_variables_is_refused_at_build() -> None:
    optimizer = fk.Adam(state_dtype="float32")
    variables = [keras.Variable(np.ones(3), dtype="float64", name="w")]
    with pytest.raises(ValueError, match="does not apply to float64 params"):
        optimizer.apply([np.ones(3)], variables)
    assert not optimizer.built and int(optimizer.iterations) == 0


@pytest.mark.usefixtures("plan_route")
def test_a_gradient_of_the_wrong_shape_is_refused_with_nothing_changed() -> None:
    optimizer = fk.Adam(0.01, weight_decay=0.1)  # Keras would decay before the update
    _, variables = built(optimizer)
    grads = [np.ones(v.shape, np.float32) for v in variables]
    grads[3] = np.ones((2, 2), np.float32)
    before = snapshot(variables, optimizer.variables)
    with pytest.raises(ValueError, match=r"hidden_2/bias' has shape \(2, 2\), but .* \(8,\)"):
        optimizer.apply(grads, variables)
    assert_unchanged(before, variables, optimizer.variables)


@pytest.mark.parametrize("count", [1, 3])
def test_grads_of_another_count_than_the_variables_are_refused_with_nothing_changed(
    count: int,
) -> None:
    def two_variables() -> list[Any]:
        return [
            keras.Variable(np.ones((2, 2)), dtype="float32", name="a"),
            keras.Variable([1.0, 2.0]),
        ]

    grads = [torch.ones(2, 2), torch.ones(2), torch.ones(5)][:count]
    variables = two_variables()
    with pytest.raises(RuntimeError, match="same number of tensors"):  # Keras: once decayed
        keras.optimizers.Adam(0.1, weight_decay=0.5).apply(grads, variables)
    variables = two_variables()
    optimizer = fk.Adam(0.1, weight_decay=0.5)
    message = rf"apply got {count} gradient\(s\) for 2 variable\(s\).*No variable was updated"
    with pytest.raises(ValueError, match=message):
        optimizer.apply(grads, variables)
    assert not optimizer.built and int(optimizer.iterations) == 0
    assert_unchanged(snapshot(two_variables()), variables)
    optimizer.build(variables)  # built: nothing changes either
    with pytest.raises(ValueError, match=message):
        optimizer.apply(grads, variables)
    assert int(optimizer.iterations) == 0
    assert_unchanged(snapshot(two_variables()), variables)


@pytest.mark.parametrize("kind", ["tensor", "array"])
def test_a_complex_gradient_is_refused_with_nothing_changed(kind: str) -> None:
    grad = np.full(8, 1 + 2j, np.complex64)  # for hidden_2/bias
    grad = torch.as_tensor(grad) if kind == "tensor" else grad
    w = keras.Variable(np.ones(8), dtype="float32")
    with pytest.raises((RuntimeError, TypeError)):  # Keras: from torch, once decayed
        keras.optimizers.Adam(0.1, weight_decay=0.5).apply([grad], [w])
    optimizer = fk.Adam(0.1, weight_decay=0.5)
    _, variables = built(optimizer)
    grads = [np.ones(v.shape, np.float32) for v in variables]
    grads[3] = grad
    before = snapshot(variables, optimizer.variables)
    with pytest.raises(TypeError, match=r"'.*hidden_2/bias' is complex \(torch.complex64\)"):
        optimizer.apply(grads, variables)
    assert_unchanged(before, variables, optimizer.variables)


@pytest.mark.parametrize(
    ("name", "attribute", "value", "slot"),
    [
        ("Adam", "amsgrad", True, "velocity_hat"),
        ("RMSprop", "centered", True, "average_gradient"),
        ("RMSprop", "momentum", 0.5, "momentum"),
        ("SGD", "momentum", 0.5, "momentum"),
    ],
)
def test_a_slot_turned_on_after_build_is_refused_naming_keras_variable(
    name: str, attribute: str, value: Any, slot: str
) -> None:
    """Keras makes these slots in build() only if they are needed then; the message names them
    as Keras does (not torch's grad_avg or momentum_buffer)."""
    optimizer = getattr(fk, name)(0.01, weight_decay=0.1)
    _, variables = built(optimizer)
    setattr(optimizer, attribute, value)
    before = snapshot(variables, optimizer.variables)
    with pytest.raises(ValueError, match=rf"need the '{slot}' variables .*No variable was updated"):
        optimizer.apply([np.ones(v.shape, np.float32) for v in variables], variables)
    assert_unchanged(before, variables, optimizer.variables)


def test_a_variable_listed_twice_is_refused_naming_it_as_keras_does() -> None:
    """Keras steps it once per occurrence; fusedopt refuses, naming the variables' positions
    in the list and their paths, before building or changing anything."""
    w, v = keras.Variable(np.ones(3), dtype="float32", name="w"), keras.Variable([2.0], name="v")
    grads = [torch.ones(3), torch.ones(1), torch.ones(3)]
    optimizer = fk.SGD(0.1, weight_decay=0.5)
    message = r"variables\[2\] \('w'\) is variables\[0\] again.*No variable was updated"
    with pytest.raises(ValueError, match=message):
        optimizer.apply(grads, [w, v, w])
    assert not optimizer.built and int(optimizer.iterations) == 0
    with pytest.raises(ValueError, match=message):
        optimizer.build([w, v, w])
    assert not optimizer.built
    optimizer.build([w, v])
    with pytest.raises(ValueError, match=message):
        optimizer.apply(grads, [w, v, w])
    assert int(optimizer.iterations) == 0
    assert_unchanged([np.ones(3), np.array([2.0])], [w, v])


def test_values_sharing_memory_in_stateless_apply_are_refused_naming_the_variables() -> None:
    a, b = (keras.Variable(np.ones(3), dtype="float32", name=name) for name in "ab")
    optimizer = fk.SGD(0.1, momentum=0.9)
    optimizer.build([a, b])
    shared = torch.ones(3)
    slots = [v.value.clone() for v in optimizer.variables]
    with pytest.raises(ValueError, match="variable 'b' overlaps variable 'a' in memory"):
        optimizer.stateless_apply(slots, [torch.ones(3), torch.ones(3)], [shared, shared])
    assert_unchanged([np.ones(3), *numpy_of(optimizer.variables)], [shared], slots)


@pytest.mark.parametrize("name", ["Lamb", "Adam"])
@pytest.mark.usefixtures("plan_route")
def test_stateless_apply_with_ema_overwrites_matches_keras(name: str) -> None:
    """After an EMA overwrite step, Keras' stateless scope hands back one tensor as a variable's
    value and as its average's. Keras' Lamb (no torch update step of its own) assigns new
    tensors, so the average keeps its value; fusedopt's in-place step wrote it too, and four
    stateless steps were 4.5% off Keras' (its stateful apply matched). Keras' Adam steps in
    place, as fusedopt does: both write the shared tensor alike."""
    results = []
    for module in (keras.optimizers, fk):
        rng = np.random.default_rng(0)
        variables = [
            keras.Variable(rng.standard_normal(shape).astype("float32")) for shape in [(3, 4), (4,)]
        ]
        optimizer = getattr(module, name)(0.05, use_ema=True, ema_overwrite_frequency=2)
        optimizer.build(variables)
        values = [v.value.clone() for v in variables]
        slots = [v.value.clone() for v in optimizer.variables]
        for _ in range(4):
            grads = [torch.as_tensor(rng.standard_normal(tuple(v.shape)), dtype=torch.float32)
                     for v in variables]  # fmt: skip
            values, slots = optimizer.stateless_apply(slots, grads, values)
        results.append(numpy_of([*values, *slots]))
    assert max_error(results[1], results[0]) <= TOLERANCE


class _Broken(keras.optimizers.schedules.LearningRateSchedule):
    def __call__(self, step: Any) -> Any:
        return "fast"

    def get_config(self) -> dict:
        return {}


# The last one fails at its second call (the update's, after the weight decay's): both are read
# and checked before Keras changes anything.
# (Made for each run: the iterator is used up by one.)
@pytest.mark.parametrize(
    "make_rate",
    [
        _Broken,
        lambda: lambda: None,
        lambda: lambda: np.ones(2),
        lambda: iter([0.1, None]).__next__,
    ],
    ids=["schedule", "None", "array", "iterator"],
)
def test_a_schedule_that_returns_a_non_number_is_refused_with_nothing_changed(
    make_rate: Callable[[], Any],
) -> None:
    optimizer = fk.SGD(0.01, momentum=0.9, weight_decay=0.1)
    _, variables = built(optimizer)
    optimizer.learning_rate = make_rate()
    before = snapshot(variables, optimizer.variables)
    with pytest.raises(TypeError, match="learning_rate must be a number; the learning-rate"):
        optimizer.apply([np.ones(v.shape, np.float32) for v in variables], variables)
    assert_unchanged(before, variables, optimizer.variables)


def test_a_negative_zero_learning_rate_steps_as_keras_after_a_zero_one() -> None:
    """-0.0 == 0.0: the options cached for lr=0.0 were used for lr=-0.0, which leaves a -0.0
    variable +0 in Keras (-0.0 - (-0.0 * 1)), where 0.0 leaves it -0."""

    def signs(cls: type) -> list[bool]:
        variable = keras.Variable(np.array([-0.0], np.float32))
        opt, result = cls(learning_rate=0.0), []
        for lr in (0.0, -0.0, 0.0, -0.0):
            variable.assign(np.array([-0.0], np.float32))
            opt.learning_rate = lr
            opt.apply([keras.ops.ones(1)], [variable])
            result.append(bool(np.signbit(keras.ops.convert_to_numpy(variable)[0])))
        return result

    assert signs(fk.SGD) == signs(keras.optimizers.SGD) == [True, False, True, False]


def test_a_negative_learning_rate_is_refused_with_nothing_changed() -> None:
    optimizer = fk.Adam(0.01, weight_decay=0.1)
    _, variables = built(optimizer)
    optimizer.learning_rate = -0.5
    before = snapshot(variables, optimizer.variables)
    with pytest.raises(ValueError, match="Invalid learning_rate"):
        optimizer.apply([np.ones(v.shape, np.float32) for v in variables], variables)
    assert_unchanged(before, variables, optimizer.variables)


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda: fk.Adam(beta_1=1.5), "beta_1"),
        (lambda: fk.SGD(momentum=-0.1), "momentum"),
        (lambda: fk.RMSprop(rho=-1.0), "rho"),
        (lambda: fk.AdamW(weight_decay=-0.1), "weight_decay"),
        (lambda: fk.Lion(beta_1=0.0), "beta_1"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(make: Callable, what: str) -> None:
    with pytest.raises(ValueError, match=what):  # Keras' own check, or fusedopt's
        make()


def test_numpy_arrays_as_variables_are_pointed_to_the_numpy_api() -> None:
    with pytest.raises(TypeError, match="fusedopt.keras_numpy.Adam"):
        fk.Adam().apply([np.ones(2, np.float32)], [np.zeros(2, np.float32)])


def test_other_backends_are_refused_at_construction_naming_torch(monkeypatch: Any) -> None:
    for backend in ("jax", "tensorflow"):
        monkeypatch.setattr(keras.backend, "backend", lambda backend=backend: backend)
        with pytest.raises(RuntimeError, match=f"torch backend .* runs on '{backend}'"):
            fk.Adam()


def test_import_fusedopt_does_not_import_keras() -> None:
    code = (
        "import sys, fusedopt, fusedopt.functional, fusedopt.keras_numpy; "
        "assert 'keras' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(
    not torch.cuda.is_available() or not fusedopt.cuda.is_available(),
    reason="needs a CUDA device and fusedopt's CUDA backend",
)
def test_fit_on_cuda_matches_keras() -> None:
    with keras.device("cuda"):
        keras_model = fit(keras.optimizers.Nadam(learning_rate=schedule("Nadam")))
        fused_model = fit(fk.Nadam(learning_rate=schedule("Nadam")))
    assert fused_model.weights[0].value.is_cuda
    assert_matches(fused_model, keras_model)


@pytest.mark.skipif(
    not torch.cuda.is_available() or not fusedopt.cuda.is_available(),
    reason="needs a CUDA device and fusedopt's CUDA backend",
)
@pytest.mark.parametrize(
    ("dtype", "options"),
    [("bfloat16", dict(master_weights=True, stochastic_rounding=True, seed=3)),
     ("bfloat16", dict(state_dtype="int8")), ("float32", dict(state_dtype="bfloat16"))],
    ids=["bfloat16-master-stochastic", "bfloat16-int8", "bfloat16-state"],
)  # fmt: skip
def test_low_precision_on_cuda_steps_as_on_the_cpu(dtype: str, options: dict) -> None:
    """The precision options on a CUDA device, three steps of Adam over 8192 elements: the same
    bits as on the CPU (the GPU's kernels and the CPU's share the math, the rounding, the random
    bits and the 8-bit rule), variable, slots, masters and scales."""
    results = []
    for device in ("cpu", "cuda"):
        with keras.device(device):
            variable = keras.Variable(
                np.linspace(-1, 1, 8192, dtype=np.float32), dtype=dtype, name="w"
            )
            optimizer = fk.Adam(0.01, **options)
            for t in range(1, 4):
                grad = np.cos(np.arange(8192, dtype=np.float32) * t)
                optimizer.apply([torch.from_numpy(grad).to(variable.value)], [variable])
        assert variable.value.device.type == device
        results.append(
            [v.value.detach().float().cpu().numpy() for v in [variable, *optimizer.variables]]
        )
    for on_cpu, on_gpu in zip(*results, strict=True):
        assert np.array_equal(on_cpu, on_gpu, equal_nan=True)


def test_a_variable_laid_out_anew_in_its_memory_is_stepped_in_its_new_order() -> None:
    """``value.data = value.data.t()`` keeps a square variable's memory and changes its layout:
    the plan notices (strides, not only the address) and the update lands where Keras puts it."""
    grad = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    results = []
    for cls in (keras.optimizers.SGD, fk.SGD):
        variable = keras.Variable(np.zeros((2, 2), "float32"))
        optimizer = cls(learning_rate=1.0)
        optimizer.apply([torch.zeros(2, 2)], [variable])
        with torch.no_grad():
            variable.value.data = variable.value.data.t()
        optimizer.apply([grad], [variable])
        results.append(variable.value.tolist())
    assert results[0] == results[1] == [[0.0, -1.0], [0.0, 0.0]]


def test_a_gradient_with_torch_s_negative_bit_is_read_as_its_values() -> None:
    """A view with the negative bit set (``.imag`` of a conjugate view gives one) holds the
    opposite of its values in memory: they are resolved before the native step reads it."""
    grad = torch.complex(torch.zeros(3), torch.ones(3)).conj().imag  # -1s, stored as +1s
    assert grad.is_neg()
    results = []
    for cls in (keras.optimizers.SGD, fk.SGD):
        variable = keras.Variable(np.zeros(3, "float32"))
        cls(learning_rate=1.0).apply([grad], [variable])
        results.append(variable.value.tolist())
    assert results[0] == results[1] == [1.0, 1.0, 1.0]
