"""Keras 3's own optimizer tests, run against fusedopt.keras (torch backend).

Ported from keras 3.15.1, ``keras/src/optimizers/``: the per-optimizer files (``sgd_test.py``,
``adam_test.py``, ``adamw_test.py``, ``adagrad_test.py``, ``rmsprop_test.py``,
``adadelta_test.py``, ``adamax_test.py``, ``nadam_test.py``, ``lion_test.py``, ``lamb_test.py``),
``optimizer_test.py`` (the base class's pipeline) and ``loss_scale_optimizer_test.py``. Each test
cites its source as ``<file>::<test>``.

Golden values and tolerances are Keras' own, as given there, asserted with Keras' own
``testing.TestCase`` assertions. Every test runs against ``fusedopt.keras.<Name>`` and, as a
control, against ``keras.optimizers.<Name>`` (parameter ``impl``): a failure of the ``fusedopt``
case alone is ours. Where Keras' test is written for one optimizer (``SGD`` in
``optimizer_test.py``) with that optimizer's numbers, it runs with those numbers for SGD, and for
the other optimizers the same scenario is run by ``keras.optimizers.<Name>`` as the oracle, within
fusedopt's documented tolerance against Keras (README, Keras section:
``|fusedopt - keras| <= 1e-5 * (1 + |keras|)``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
if keras.backend.backend() != "torch":
    pytest.skip("fusedopt.keras runs on Keras' torch backend", allow_module_level=True)

from keras.src import backend, constraints, layers, models, ops, optimizers, testing  # noqa: E402
from keras.src.optimizers.loss_scale_optimizer import LossScaleOptimizer  # noqa: E402

import fusedopt.keras as fk  # noqa: E402
import fusedopt.keras_numpy as fk_numpy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

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
IMPLS = ["fusedopt", "keras"]
TOLERANCE = 1e-5  # fusedopt against keras.optimizers (README): 1e-5 * (1 + |keras|)


class _KerasTestCase(testing.TestCase):
    """Keras' own assertions (assertAllClose at Keras' default 1e-6, the serialization test)."""

    __test__ = False  # a holder of assertions, not a test for pytest to collect

    def runTest(self) -> None:  # pragma: no cover - never run, only its assertions are used
        pass


tc = _KerasTestCase()


def opt_class(impl: str, name: str) -> type:
    return getattr(fk if impl == "fusedopt" else keras.optimizers, name)


def assert_matches_keras(actual: Any, keras_value: Any) -> None:
    np.testing.assert_allclose(
        tc.convert_to_numpy(actual),
        tc.convert_to_numpy(keras_value),
        rtol=TOLERANCE,
        atol=TOLERANCE,
    )


impl_param = pytest.mark.parametrize("impl", IMPLS)
name_param = pytest.mark.parametrize("name", NAMES)

# ------------------------------------------------------------------------------------------
# The per-optimizer files: keras/src/optimizers/<name>_test.py

# <name>_test.py::test_config: the constructor arguments each file serializes.
CONFIG_KWARGS: dict[str, dict[str, Any]] = {
    "SGD": dict(learning_rate=0.5, momentum=0.06, nesterov=True, weight_decay=0.004),
    "Adagrad": dict(learning_rate=0.5, initial_accumulator_value=0.2, epsilon=1e-5),
    "RMSprop": dict(learning_rate=0.5, rho=0.8, momentum=0.05, epsilon=1e-6, centered=True),
    "Adam": dict(learning_rate=0.5, beta_1=0.5, beta_2=0.67, epsilon=1e-5, amsgrad=True),
    "AdamW": dict(
        learning_rate=0.5, weight_decay=0.008, beta_1=0.5, beta_2=0.67, epsilon=1e-5, amsgrad=True
    ),
    "Adadelta": dict(learning_rate=0.5, rho=0.9, epsilon=1e-5),
    "Adamax": dict(learning_rate=0.5, beta_1=0.8, beta_2=0.95, epsilon=1e-5),
    "Nadam": dict(learning_rate=0.5, beta_1=0.5, beta_2=0.67, epsilon=1e-5),
    "Lion": dict(learning_rate=0.5, beta_1=0.5, beta_2=0.67),
    "Lamb": dict(learning_rate=0.5, beta_1=0.5, beta_2=0.67, epsilon=1e-5),
}


@name_param
@impl_param
def test_config(impl: str, name: str) -> None:
    # <name>_test.py::test_config
    optimizer = opt_class(impl, name)(**CONFIG_KWARGS[name])
    revived = tc.run_class_serialization_test(optimizer)
    assert type(revived) is type(optimizer)


# <name>_test.py::test_single_step: lr=0.5, grads [1, 6, 7, 2] on [1, 2, 3, 4], rtol=atol=1e-4.
SINGLE_STEP: dict[str, list[float]] = {
    "SGD": [0.5, -1.0, -0.5, 3.0],
    "Adagrad": [0.5233, 1.5007, 2.5005, 3.5061],
    "RMSprop": [-0.5811, 0.4189, 1.4189, 2.4189],
    "Adam": [0.5, 1.5, 2.5, 3.5],
    "AdamW": [0.4980, 1.4960, 2.494, 3.492],
    "Adadelta": [0.9993, 1.9993, 2.9993, 3.9993],
    "Adamax": [0.5, 1.5, 2.5, 3.5],
    "Nadam": [0.4686, 1.4686, 2.4686, 3.4686],
    "Lion": [0.5, 1.5, 2.5, 3.5],
    "Lamb": [-0.3693, 0.6306, 1.6306, 2.6306],
}


@name_param
@impl_param
def test_single_step(impl: str, name: str) -> None:
    # <name>_test.py::test_single_step
    optimizer = opt_class(impl, name)(learning_rate=0.5)
    grads = ops.array([1.0, 6.0, 7.0, 2.0])
    vars = backend.Variable([1.0, 2.0, 3.0, 4.0])
    if name == "SGD":  # sgd_test.py builds first and checks the optimizer's variables too
        assert len(optimizer.variables) == 2
        optimizer.build([vars])
    optimizer.apply_gradients(zip([grads], [vars]))
    tc.assertAllClose(vars, SINGLE_STEP[name], rtol=1e-4, atol=1e-4)
    if name == "SGD":
        assert len(optimizer.variables) == 2
        assert optimizer.variables[0] == 1
        assert optimizer.variables[1] == 0.5


@name_param
@impl_param
def test_weight_decay(impl: str, name: str) -> None:
    # <name>_test.py::test_weight_decay (the same test and numbers in every file)
    cls = opt_class(impl, name)
    grads, var1, var2, var3 = (
        ops.zeros(()),
        backend.Variable(2.0),
        backend.Variable(2.0, name="exclude"),
        backend.Variable(2.0),
    )
    optimizer_1 = cls(learning_rate=1.0, weight_decay=0.004)
    optimizer_1.apply_gradients(zip([grads], [var1]))

    optimizer_2 = cls(learning_rate=1.0, weight_decay=0.004)
    optimizer_2.exclude_from_weight_decay(var_names=["exclude"])
    optimizer_2.apply_gradients(zip([grads, grads], [var1, var2]))

    optimizer_3 = cls(learning_rate=1.0, weight_decay=0.004)
    optimizer_3.exclude_from_weight_decay(var_list=[var3])
    optimizer_3.apply_gradients(zip([grads, grads], [var1, var3]))

    tc.assertAlmostEqual(var1.numpy(), 1.9760959, decimal=6)
    tc.assertAlmostEqual(var2.numpy(), 2.0, decimal=6)
    tc.assertAlmostEqual(var3.numpy(), 2.0, decimal=6)


# <name>_test.py::test_correctness_with_golden: (constructor arguments, the variable's NumPy
# dtype as the file writes it (None: np.ones' float64), golden rows). One step with 0.01, then
# steps with arange(0.1, 1.1, 0.1), checked before each, rtol=atol=5e-4.
GOLDEN: dict[str, tuple[dict[str, Any], str | None, np.ndarray]] = {
    "SGD": (
        dict(nesterov=True),
        None,
        # fmt: off
        np.array(
            [
                [0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999],
                [0.9989, 0.9979, 0.9969, 0.9959, 0.9949, 0.9939, 0.9929, 0.9919, 0.9909, 0.9899],
                [0.9979, 0.9959, 0.9939, 0.9919, 0.9899, 0.9879, 0.9859, 0.9839, 0.9819, 0.9799],
                [0.9969, 0.9939, 0.9909, 0.9879, 0.9849, 0.9819, 0.9789, 0.9759, 0.9729, 0.9699],
                [0.9959, 0.9919, 0.9879, 0.9839, 0.9799, 0.9759, 0.9719, 0.9679, 0.9639, 0.9599],
            ]
        ),
        # fmt: on
    ),
    "Adagrad": (
        dict(learning_rate=0.2, initial_accumulator_value=0.3, epsilon=1e-6),
        None,
        # fmt: off
        np.array(
            [
                [0.9963, 0.9963, 0.9963, 0.9963, 0.9963, 0.9963, 0.9963, 0.9963, 0.9963, 0.9963],
                [0.9604, 0.9278, 0.9003, 0.8784, 0.8615, 0.8487, 0.8388, 0.8313, 0.8255, 0.8209],
                [0.9251, 0.8629, 0.8137, 0.7768, 0.7497, 0.7298, 0.7151, 0.704, 0.6956, 0.6891],
                [0.8903, 0.8012, 0.7342, 0.6862, 0.6521, 0.6277, 0.6099, 0.5967, 0.5867, 0.579],
                [0.856, 0.7422, 0.6604, 0.6037, 0.5644, 0.5367, 0.5168, 0.5021, 0.491, 0.4825],
            ]
        ),
        # fmt: on
    ),
    "RMSprop": (
        dict(centered=True),
        None,
        np.tile([[0.9967], [0.9933], [0.9908], [0.9885], [0.9864]], (1, 10)),
    ),
    "Adam": (
        dict(amsgrad=True),
        "float32",
        np.tile([[0.999], [0.9982], [0.9974], [0.9965], [0.9955]], (1, 10)),
    ),
    "AdamW": (
        dict(learning_rate=1.0, weight_decay=0.5, epsilon=2),
        "float32",
        # fmt: off
        np.array(
            [
                [0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998],
                [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
                [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
                [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
                [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113, -0.0159],
            ]
        ),
        # fmt: on
    ),
    "Adadelta": (
        dict(learning_rate=1.0, rho=0.8, epsilon=1e-6),
        None,
        np.tile([[0.9978], [0.9947], [0.9915], [0.9882], [0.9849]], (1, 10)),
    ),
    "Adamax": (
        dict(learning_rate=0.2, beta_1=0.85, beta_2=0.95, epsilon=1e-6),
        "float32",
        # fmt: off
        np.array(
            [
                [0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8],
                [0.6827, 0.6873, 0.6888, 0.6896, 0.6901, 0.6904, 0.6906, 0.6908, 0.6909, 0.691],
                [0.5333, 0.5407, 0.5431, 0.5444, 0.5451, 0.5456, 0.546, 0.5462, 0.5464, 0.5466],
                [0.368, 0.3773, 0.3804, 0.382, 0.3829, 0.3835, 0.384, 0.3843, 0.3846, 0.3848],
                [0.1933, 0.204, 0.2076, 0.2094, 0.2105, 0.2112, 0.2117, 0.2121, 0.2124, 0.2126],
            ]
        ),
        # fmt: on
    ),
    "Nadam": (
        dict(learning_rate=0.5, beta_1=0.5, beta_2=0.67, epsilon=1e-5),
        "float32",
        # fmt: off
        np.array(
            [
                [0.4281, 0.4281, 0.4281, 0.4281, 0.4281, 0.4281, 0.4281, 0.4281, 0.4281, 0.4281],
                [
                    -0.1738,
                    -0.1731,
                    -0.1726,
                    -0.1723,
                    -0.1721,
                    -0.172,
                    -0.1719,
                    -0.1718,
                    -0.1718,
                    -0.1717,
                ],  # noqa: E501
                [
                    -0.7115,
                    -0.7103,
                    -0.7096,
                    -0.7092,
                    -0.709,
                    -0.7088,
                    -0.7086,
                    -0.7085,
                    -0.7085,
                    -0.7084,
                ],  # noqa: E501
                [
                    -1.2335,
                    -1.2322,
                    -1.2313,
                    -1.2309,
                    -1.2306,
                    -1.2304,
                    -1.2302,
                    -1.2301,
                    -1.23,
                    -1.2299,
                ],  # noqa: E501
                [
                    -1.7492,
                    -1.7478,
                    -1.7469,
                    -1.7464,
                    -1.7461,
                    -1.7459,
                    -1.7457,
                    -1.7456,
                    -1.7455,
                    -1.7454,
                ],
            ]  # noqa: E501
        ),
        # fmt: on
    ),
    "Lion": (
        dict(),
        None,
        np.tile([[0.999], [0.998], [0.997], [0.996], [0.995]], (1, 10)),
    ),
    "Lamb": (
        dict(),
        "float32",
        np.tile([[0.999], [0.9982], [0.9974], [0.9965], [0.9955]], (1, 10)),
    ),
}


def run_golden(cls: type, name: str, dtype: str | None, variable_dtype: str | None = None) -> None:
    kwargs, _, golden = GOLDEN[name]
    optimizer = cls(**kwargs)
    x = backend.Variable(np.ones([10], dtype=dtype), dtype=variable_dtype)
    grads = ops.arange(0.1, 1.1, 0.1)
    first_grads = ops.full((10,), 0.01)

    optimizer.apply_gradients(zip([first_grads], [x]))
    for i in range(5):
        tc.assertAllClose(x, golden[i], rtol=5e-4, atol=5e-4)
        optimizer.apply_gradients(zip([grads], [x]))


@name_param
@impl_param
def test_correctness_with_golden(impl: str, name: str) -> None:
    # <name>_test.py::test_correctness_with_golden, as written there
    run_golden(opt_class(impl, name), name, GOLDEN[name][1])


@name_param
@impl_param
def test_correctness_with_golden_float64_variable(impl: str, name: str) -> None:
    # <name>_test.py::test_correctness_with_golden on a float64 variable: Keras' golden values
    # and tolerance hold for both of the dtypes fusedopt.keras updates.
    run_golden(opt_class(impl, name), name, "float64", variable_dtype="float64")


@name_param
@impl_param
def test_clip_norm(impl: str, name: str) -> None:
    # <name>_test.py::test_clip_norm
    optimizer = opt_class(impl, name)(clipnorm=1)
    grad = [np.array([100.0, 100.0])]
    clipped_grad = optimizer._clip_gradients(grad)
    tc.assertAllClose(clipped_grad[0], [2**0.5 / 2, 2**0.5 / 2])


@name_param
@impl_param
def test_clip_value(impl: str, name: str) -> None:
    # <name>_test.py::test_clip_value
    optimizer = opt_class(impl, name)(clipvalue=1)
    grad = [np.array([100.0, 100.0])]
    clipped_grad = optimizer._clip_gradients(grad)
    tc.assertAllClose(clipped_grad[0], [1.0, 1.0])


@impl_param
def test_sgd_invalid_momentum(impl: str) -> None:
    # sgd_test.py::test_invalid_momentum
    for momentum in (-1.0, 2.0):
        with pytest.raises(ValueError, match="`momentum` must be a float between \\[0, 1\\]."):
            opt_class(impl, "SGD")(momentum=momentum)


@impl_param
def test_adamw_weight_decay_is_none(impl: str) -> None:
    # adamw_test.py::test_weight_decay_is_none
    with pytest.raises(
        ValueError, match="Argument `weight_decay` must be a float. Received: weight_decay=None"
    ):
        opt_class(impl, "AdamW")(learning_rate=1.0, weight_decay=None)


@impl_param
def test_nadam_build_with_empty_var_list(impl: str) -> None:
    # nadam_test.py::test_build_with_empty_var_list
    optimizer = opt_class(impl, "Nadam")()
    optimizer.build([])
    assert optimizer._u_product.dtype == backend.floatx()


@impl_param
def test_lion_invalid_beta_1(impl: str) -> None:
    # lion_test.py::test_invalid_beta_1
    for beta_1 in (-0.1, 0.0, 1.1):
        with pytest.raises(
            ValueError,
            match="Argument `beta_1` must be in the \\[0, 1\\] range. Otherwise, the "
            f"optimizer degenerates to SignSGD. Received: beta_1={beta_1}.",
        ):
            opt_class(impl, "Lion")(beta_1=beta_1)


@name_param
@impl_param
def test_ema(impl: str, name: str) -> None:
    # adam_test.py::test_ema, for every optimizer (its assertions relate the EMA to the
    # variable's own values, whatever the update); lion_test.py::test_ema is its fit part.
    cls = opt_class(impl, name)
    optimizer = cls(learning_rate=1.0, use_ema=True, ema_momentum=0.9)
    var = backend.Variable([1.0, 2.0], dtype="float32")
    grads = ops.array([0.1, 0.2], dtype="float32")

    # First step: EMA is initialized to the first updated variable value
    optimizer.apply_gradients([(grads, var)])
    v1 = var.numpy()
    tc.assertAllClose(optimizer._model_variables_moving_average[0], v1)

    # Second step: EMA is updated
    optimizer.apply_gradients([(grads, var)])
    v2 = var.numpy()
    expected_ema = 0.9 * v1 + 0.1 * v2
    tc.assertAllClose(optimizer._model_variables_moving_average[0], expected_ema)

    # Finalize: model variable is overwritten by EMA
    optimizer.finalize_variable_values([var])
    tc.assertAllClose(var, expected_ema)

    # Test model.fit()
    model = keras.Sequential([keras.layers.Dense(10, kernel_initializer="ones", use_bias=False)])
    model.compile(optimizer=cls(use_ema=True, ema_momentum=0.9), loss="mse")
    x = ops.ones((1, 5))
    y = ops.zeros((1, 10))
    model.fit(x, y, verbose=0)

    # Weights are finalized at the end of fit()
    # So model weights should match EMA weights
    optimizer = model.optimizer
    ema_weights = optimizer._model_variables_moving_average[0].numpy()
    model_weights = model.trainable_variables[0].numpy()
    tc.assertAllClose(model_weights, ema_weights)


@name_param
@impl_param
def test_ema_overwrite_frequency(impl: str, name: str) -> None:
    # adam_test.py::test_ema_overwrite_frequency, for every optimizer (the oracle is the same
    # optimizer without EMA)
    cls = opt_class(impl, name)
    optimizer = cls(learning_rate=1.0, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2)
    optimizer_no_ema = cls(learning_rate=1.0)
    var = backend.Variable([1.0, 2.0], dtype="float32")
    var_no_ema = backend.Variable([1.0, 2.0], dtype="float32")
    grads = ops.array([0.1, 0.2], dtype="float32")

    # First step: iterations = 0, EMA initialized to v1
    optimizer.apply_gradients([(grads, var)])
    optimizer_no_ema.apply_gradients([(grads, var_no_ema)])
    v1 = var_no_ema.numpy()
    # Not overwritten yet (iterations became 1 after increment)
    tc.assertAllClose(var, v1)

    # Second step: iterations = 1, (1 + 1) % 2 = 0. Overwrite!
    optimizer.apply_gradients([(grads, var)])
    optimizer_no_ema.apply_gradients([(grads, var_no_ema)])
    v2 = var_no_ema.numpy()
    expected_ema = 0.9 * v1 + 0.1 * v2
    # var should have been updated to v2 and THEN overwritten by EMA
    tc.assertAllClose(var, expected_ema)
    tc.assertAllClose(optimizer._model_variables_moving_average[0], expected_ema)


# ------------------------------------------------------------------------------------------
# optimizer_test.py: the base class's pipeline. Written there for optimizers.SGD (or Adam) with
# SGD's numbers; here for every optimizer, SGD with Keras' numbers, the others against
# keras.optimizers.<Name> running the same scenario.


def scenario_results(
    impl: str, name: str, kwargs: dict[str, Any], scenario: Callable[[Any], list[Any]]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``scenario(optimizer)``'s returned values for ``impl`` and for keras.optimizers.<Name>."""
    ours = [tc.convert_to_numpy(x) for x in scenario(opt_class(impl, name)(**kwargs))]
    theirs = [tc.convert_to_numpy(x) for x in scenario(opt_class("keras", name)(**kwargs))]
    return ours, theirs


def check_scenario(
    impl: str,
    name: str,
    kwargs: dict[str, Any],
    scenario: Callable[[Any], list[Any]],
    sgd_expected: list[Any],
    **sgd_tolerance: float,
) -> None:
    """SGD: Keras' numbers at Keras' tolerance; any optimizer: Keras' own run of the scenario."""
    ours, theirs = scenario_results(impl, name, kwargs, scenario)
    if name == "SGD":
        for value, expected in zip(ours, sgd_expected):
            tc.assertAllClose(value, expected, **sgd_tolerance)
    for value, expected in zip(ours, theirs):
        assert_matches_keras(value, expected)


@name_param
@impl_param
def test_iterations_counter(impl: str, name: str) -> None:
    # optimizer_test.py::test_iterations_counter (Adam there)
    v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
    grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    optimizer = opt_class(impl, name)(learning_rate=1.0)
    tc.assertAllClose(optimizer.iterations, 0)
    optimizer.apply_gradients([(grads, v)])
    tc.assertAllClose(optimizer.iterations, 1)
    optimizer.apply_gradients([(grads, v)])
    tc.assertAllClose(optimizer.iterations, 2)


@name_param
@impl_param
def test_empty_gradients(impl: str, name: str) -> None:
    # optimizer_test.py::test_empty_gradients
    cls = opt_class(impl, name)
    v = backend.Variable([[3.0, 4.0], [5.0, 6.0]])
    grads = None
    optimizer = cls(learning_rate=1.0)
    with pytest.raises(ValueError, match="No gradients provided for any variable."):
        optimizer.apply_gradients([(grads, v)])

    # Test filtering of empty gradients
    def scenario(optimizer: Any) -> list[Any]:
        v = backend.Variable([[3.0, 4.0], [5.0, 6.0]])
        v2 = backend.Variable([[3.0, 4.0], [5.0, 6.0]])
        grads2 = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        with pytest.warns(Warning):
            optimizer.apply_gradients([(None, v), (grads2, v2)])
        return [v, v2]

    check_scenario(
        impl,
        name,
        dict(learning_rate=1.0),
        scenario,
        [[[3.0, 4.0], [5.0, 6.0]], [[2.0, 3.0], [4.0, 5.0]]],
    )
    ours, _ = scenario_results(impl, name, dict(learning_rate=1.0), scenario)
    tc.assertAllClose(ours[0], [[3.0, 4.0], [5.0, 6.0]])  # no gradient: untouched, any optimizer


@name_param
@impl_param
def test_clip_args(impl: str, name: str) -> None:
    # optimizer_test.py::test_clip_args
    cls = opt_class(impl, name)
    assert cls(learning_rate=1.0, clipnorm=0.1).clipnorm == 0.1
    assert cls(learning_rate=1.0, clipvalue=0.1).clipvalue == 0.1
    assert cls(learning_rate=1.0, global_clipnorm=0.1).global_clipnorm == 0.1
    message = "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can"
    with pytest.raises(ValueError, match=message):
        cls(learning_rate=1.0, clipnorm=0.1, clipvalue=0.1)
    with pytest.raises(ValueError, match=message):
        cls(learning_rate=1.0, clipnorm=0.1, global_clipnorm=0.1)


@name_param
@impl_param
def test_clip_norm_value_and_global_norm_of_tensors(impl: str, name: str) -> None:
    # optimizer_test.py::test_clip_norm, test_clip_value, test_global_clip_norm (tensors)
    cls = opt_class(impl, name)
    grad = backend.convert_to_tensor([100.0, 100.0])
    tc.assertAllClose(cls(clipnorm=1)._clip_gradients([grad])[0], [2**0.5 / 2, 2**0.5 / 2])
    tc.assertAllClose(cls(clipvalue=1)._clip_gradients([grad])[0], [1.0, 1.0])
    grad = np.array([50.0, 100.0], dtype="float32")
    clipped = cls(global_clipnorm=1)._clip_gradients([backend.convert_to_tensor(grad)])
    tc.assertAllClose(clipped[0], grad / np.linalg.norm(grad))


@name_param
@pytest.mark.parametrize("clip", ["clipnorm", "clipvalue", "global_clipnorm"])
@impl_param
def test_clipped_steps(impl: str, name: str, clip: str) -> None:
    # optimizer_test.py::test_clip_norm / test_clip_value / test_global_clip_norm check the
    # clipping alone; here the clipped gradients go through a step, against Keras' own step.
    def scenario(optimizer: Any) -> list[Any]:
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        w = backend.Variable([0.5, -0.5])
        for _ in range(3):
            optimizer.apply_gradients(
                [
                    (backend.convert_to_tensor([[100.0, -30.0], [0.5, 2.0]]), v),
                    (backend.convert_to_tensor([40.0, 0.25]), w),
                ]
            )
        return [v, w, *optimizer.variables]

    ours, theirs = scenario_results(impl, name, {"learning_rate": 0.1, clip: 1.0}, scenario)
    for value, expected in zip(ours, theirs):
        assert_matches_keras(value, expected)


@name_param
@impl_param
def test_ema_with_overwrite_frequency_3(impl: str, name: str) -> None:
    # optimizer_test.py::test_ema
    def scenario(optimizer: Any) -> list[Any]:
        v = backend.Variable([[3.0, 4.0], [5.0, 6.0]])
        grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        values = []
        for _ in range(3):
            optimizer.apply_gradients([(grads, v)])
            values += [v.numpy(), optimizer._model_variables_moving_average[0].numpy()]
        return values

    check_scenario(
        impl,
        name,
        dict(learning_rate=1.0, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3),
        scenario,
        [
            [[2.0, 3.0], [4.0, 5.0]],
            [[2.0, 3.0], [4.0, 5.0]],  # initialized after first step
            [[1.0, 2.0], [3.0, 4.0]],
            [[1.9, 2.9], [3.9, 4.9]],
            [[1.71, 2.71], [3.71, 4.71]],  # Variables were overwritten with EMA
            [[1.71, 2.71], [3.71, 4.71]],
        ],
    )


@name_param
@impl_param
def test_ema_with_model_fit(impl: str, name: str) -> None:
    # optimizer_test.py::test_ema_with_model_fit
    x_train = np.ones((1, 1)).astype("float32")
    y_train = np.zeros((1, 1)).astype("float32")

    def scenario(optimizer: Any) -> list[Any]:
        model = models.Sequential([layers.Dense(2, kernel_initializer="ones", use_bias=False)])
        model.compile(loss="mse", optimizer=optimizer, run_eagerly=True)
        model.fit(x_train, y_train, batch_size=1, epochs=2, verbose=0)
        return [
            optimizer._model_variables_moving_average[0].numpy(),
            model.trainable_variables[0].numpy(),
        ]

    check_scenario(
        impl,
        name,
        dict(learning_rate=0.1, use_ema=True, ema_momentum=0.9),
        scenario,
        [[[0.891, 0.891]], [[0.891, 0.891]]],
        atol=1e-5,
    )


@name_param
@impl_param
def test_constraints_are_applied(impl: str, name: str) -> None:
    # optimizer_test.py::test_constraints_are_applied
    v = backend.Variable(np.random.default_rng(0).random((2, 2)) - 1.0)
    v.constraint = constraints.NonNeg()
    optimizer = opt_class(impl, name)(learning_rate=0.0001)
    grad = backend.numpy.zeros((2, 2))
    optimizer.apply_gradients([(grad, v)])
    tc.assertAlmostEqual(np.min(v), 0.0)


@name_param
def test_get_method(name: str) -> None:
    # optimizer_test.py::test_get_method: optimizers.get takes fusedopt's registered names
    # ("fusedopt>Name", README: Keras section) as it takes "sgd" or "adamw".
    obj = optimizers.get(f"fusedopt>{name}")
    assert type(obj) is getattr(fk, name)
    assert optimizers.get(None) is None
    with pytest.raises(ValueError):
        optimizers.get("fusedopt>typo")


@name_param
@impl_param
def test_static_loss_scaling(impl: str, name: str) -> None:
    # optimizer_test.py::test_static_loss_scaling
    def scenario(optimizer: Any) -> list[Any]:
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, 2.0], [3.0, 4.0]]) * 1024.0
        optimizer.apply_gradients([(grads, v)])
        assert optimizer.scale_loss(1.0) == 1024.0
        return [v]

    check_scenario(
        impl,
        name,
        dict(learning_rate=1.0, loss_scale_factor=1024.0),
        scenario,
        [[[0.0, 0.0], [0.0, 0.0]]],
    )
    # The same step as the unscaled gradient's, for every optimizer
    ours, _ = scenario_results(
        impl, name, dict(learning_rate=1.0, loss_scale_factor=1024.0), scenario
    )
    plain = opt_class(impl, name)(learning_rate=1.0)
    v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
    plain.apply_gradients([(backend.convert_to_tensor([[1.0, 2.0], [3.0, 4.0]]), v)])
    tc.assertAllClose(ours[0], v)


@name_param
@impl_param
def test_set_weights(impl: str, name: str) -> None:
    # optimizer_test.py::test_set_weights (Adam there)
    cls = opt_class(impl, name)
    x = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
    optimizer_1 = cls()
    grads = backend.convert_to_tensor([[1.0, 2.0], [3.0, 4.0]])
    optimizer_1.apply_gradients(zip([grads], [x]))
    optimizer_2 = cls()
    with pytest.raises(ValueError, match="You are calling*"):
        optimizer_2.set_weights(optimizer_1.variables)
    optimizer_2.build([x])
    optimizer_2.set_weights(optimizer_1.variables)
    for i in range(len(optimizer_1.variables)):
        tc.assertAllClose(optimizer_1.variables[i], optimizer_2.variables[i])
    # and a step from the restored state is the original's next step
    y = backend.Variable(x.numpy())
    optimizer_3 = cls()
    optimizer_3.build([y])
    optimizer_3.set_weights(optimizer_1.variables)
    optimizer_1.apply_gradients(zip([grads], [x]))
    optimizer_3.apply_gradients(zip([grads], [y]))
    tc.assertAllClose(x, y)
    for a, b in zip(optimizer_1.variables, optimizer_3.variables):
        tc.assertAllClose(a, b)


@name_param
@impl_param
def test_gradient_accumulation(impl: str, name: str) -> None:
    # optimizer_test.py::test_gradient_accumulation
    def scenario(optimizer: Any) -> list[Any]:
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        assert optimizer.gradient_accumulation_steps == 3
        values = []
        for _ in range(4):
            optimizer.apply_gradients([(grads, v)])
            values += [
                v.numpy(),
                optimizer._accumulated_gradients[0].numpy(),
                optimizer._iterations.numpy(),
                optimizer.iterations.numpy(),
            ]
        return values

    ones = [[1.0, 1.0], [1.0, 1.0]]
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    twos = [[2.0, 2.0], [2.0, 2.0]]
    start = [[1.0, 2.0], [3.0, 4.0]]
    stepped = [[0.0, 1.0], [2.0, 3.0]]
    kwargs = dict(learning_rate=1.0, gradient_accumulation_steps=3)
    check_scenario(
        impl,
        name,
        kwargs,
        scenario,
        # iterations 1 to 4: v, the accumulator, _iterations, iterations
        [start, ones, 1, 0, start, twos, 2, 0, stepped, zeros, 3, 1, stepped, ones, 4, 1],
    )
    ours, _ = scenario_results(impl, name, kwargs, scenario)
    # any optimizer: no update while accumulating, the accumulators and counters as for SGD
    for i, expected in [(0, start), (4, start), (1, ones), (5, twos), (9, zeros), (13, ones)]:
        tc.assertAllClose(ours[i], expected)
    tc.assertAllClose(ours[8], ours[12])  # step 4 accumulates: the variable stays as after 3
    tc.assertAllClose(ours[2::4], [1, 2, 3, 4])
    tc.assertAllClose(ours[3::4], [0, 0, 1, 1])


@name_param
@impl_param
def test_callable_learning_rate(impl: str, name: str) -> None:
    # optimizer_test.py::test_callable_learning_rate
    def scenario(optimizer: Any) -> list[Any]:
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        tc.assertAllClose(optimizer.iterations, 0)
        optimizer.apply_gradients([(grads, v)])
        tc.assertAllClose(optimizer.iterations, 1)
        return [v]

    check_scenario(
        impl, name, dict(learning_rate=lambda: 0.1), scenario, [[[0.9, 1.9], [2.9, 3.9]]]
    )


@name_param
@impl_param
def test_overwrite_with_gradient(impl: str, name: str) -> None:
    # optimizer_test.py::test_overwrite_with_gradient
    def scenario(optimizer: Any) -> list[Any]:
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        v.overwrite_with_gradient = True
        v2 = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        grads2 = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        optimizer.apply_gradients([(grads, v), (grads2, v2)])
        return [v, v2]

    kwargs = dict(learning_rate=1.0)
    # `v` is overwritten by its gradient but `v2` is updated normally
    check_scenario(
        impl, name, kwargs, scenario, [[[1.0, 1.0], [1.0, 1.0]], [[0.0, 1.0], [2.0, 3.0]]]
    )
    ours, _ = scenario_results(impl, name, kwargs, scenario)
    tc.assertAllClose(ours[0], [[1.0, 1.0], [1.0, 1.0]])


@name_param
@impl_param
def test_overwrite_with_gradient_with_gradient_accumulation(impl: str, name: str) -> None:
    # optimizer_test.py::test_overwrite_with_gradient_with_gradient_accumulation
    grad_ones = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
    grad_twos = backend.convert_to_tensor([[2.0, 2.0], [2.0, 2.0]])

    def scenario(optimizer: Any) -> list[Any]:
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        v.overwrite_with_gradient = True
        v2 = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        values = []
        for grads in (grad_ones, grad_twos, grad_ones):
            optimizer.apply_gradients([(grads, v), (grads, v2)])
            values += [
                optimizer._iterations.numpy(),
                optimizer.iterations.numpy(),
                v.numpy(),
                v2.numpy(),
                optimizer._accumulated_gradients[0].numpy(),
                optimizer._accumulated_gradients[1].numpy(),
            ]
        return values

    start = [[1.0, 2.0], [3.0, 4.0]]
    ones = [[1.0, 1.0], [1.0, 1.0]]
    twos = [[2.0, 2.0], [2.0, 2.0]]
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    stepped = [[-0.5, 0.5], [1.5, 2.5]]
    kwargs = dict(learning_rate=1.0, gradient_accumulation_steps=2)
    check_scenario(
        impl,
        name,
        kwargs,
        scenario,
        [1, 0, start, start, ones, ones]  # Iteration 1
        + [2, 1, twos, stepped, zeros, zeros]  # Iteration 2
        + [3, 1, twos, stepped, ones, ones],  # Iteration 3
    )
    ours, _ = scenario_results(impl, name, kwargs, scenario)
    for i, expected in [(2, start), (3, start), (8, twos), (14, twos), (16, ones), (17, ones)]:
        tc.assertAllClose(ours[i], expected)
    tc.assertAllClose(ours[9], ours[15])


# optimizer_test.py parametrizes these over Keras' names; "ftrl" and "adafactor" are not
# fusedopt's, and "lamb" is added (fusedopt has it).
@name_param
@impl_param
def test_gradient_accumulation_with_weight_decay(impl: str, name: str) -> None:
    # optimizer_test.py::test_gradient_accumulation_with_weigth_decay
    class_name = f"fusedopt>{name}" if impl == "fusedopt" else name.lower()

    def get(config: dict[str, Any]) -> Any:
        if class_name == "lamb":  # Keras' optimizers.get does not know its own Lamb
            return keras.optimizers.Lamb.from_config(config)
        return optimizers.get({"class_name": class_name, "config": config})

    optimizer1 = get({"weight_decay": 0.05})
    optimizer3 = get({"weight_decay": 0.05, "gradient_accumulation_steps": 3})
    assert isinstance(optimizer1, opt_class(impl, name))
    variable1 = backend.Variable([[0.9], [0.5]])
    variable3 = backend.Variable([[0.9], [0.5]])

    rng = np.random.default_rng(5)
    for _epoch in range(8):
        grads3 = rng.random([3, 2, 1]).astype("float32")

        grads1 = backend.convert_to_tensor(grads3.mean(axis=0))
        optimizer1.apply_gradients([(grads1, variable1)])

        for batch in range(3):
            grads3_ = backend.convert_to_tensor(grads3[batch])
            optimizer3.apply_gradients([(grads3_, variable3)])

    tc.assertAllClose(variable1, variable3)


@impl_param
def test_setting_lr_to_callable_untracks_lr_var(impl: str) -> None:
    # optimizer_test.py::test_setting_lr_to_callable_untracks_lr_var (Adam there)
    adam = opt_class(impl, "Adam")(learning_rate=0.001)
    assert len(adam.variables) == 2
    adam.learning_rate = optimizers.schedules.PolynomialDecay(adam.learning_rate, 4)
    assert len(adam.variables) == 1


@name_param
@impl_param
def test_setting_lr_to_callable_then_stepping(impl: str, name: str) -> None:
    # optimizer_test.py::test_setting_lr_to_callable_untracks_lr_var, then steps with the
    # schedule, against Keras' own steps.
    def scenario(optimizer: Any) -> list[Any]:
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, -2.0], [0.5, 4.0]])
        optimizer.apply_gradients([(grads, v)])
        optimizer.learning_rate = optimizers.schedules.PolynomialDecay(0.1, 4)
        for _ in range(3):
            optimizer.apply_gradients([(grads, v)])
        return [v, *optimizer.variables]

    ours, theirs = scenario_results(impl, name, dict(learning_rate=0.01), scenario)
    for value, expected in zip(ours, theirs):
        assert_matches_keras(value, expected)


@name_param
@impl_param
def test_pickleable_optimizers(impl: str, name: str) -> None:
    # optimizer_test.py::test_pickleable_optimizers
    optimizer = opt_class(impl, name)()
    reloaded = pickle.loads(pickle.dumps(optimizer))
    assert type(reloaded) is type(optimizer)
    assert optimizer.get_config() == reloaded.get_config()


def test_optimizer_auto_naming() -> None:
    # optimizer_test.py::test_optimizer_auto_naming: fusedopt's classes are named as Keras'
    keras.backend.clear_session()  # as Keras' TestCase.setUp does: the name counters restart
    adam_1 = fk.Adam()
    adam_2 = fk.Adam()
    sgd_1 = fk.SGD()
    sgd_2 = fk.SGD()
    adamw_1 = fk.AdamW()
    adamw_2 = fk.AdamW()

    assert adam_1.name == "adam"
    assert adam_2.name == "adam_1"
    assert sgd_1.name == "sgd"
    assert sgd_2.name == "sgd_1"
    assert adamw_1.name == "adam_w"
    assert adamw_2.name == "adam_w_1"

    # Test explicit naming
    custom_adam = fk.Adam(name="my_adam")
    assert custom_adam.name == "my_adam"

    # Test serialization and deserialization preserves name
    reloaded_adam_2 = optimizers.deserialize(optimizers.serialize(adam_2))
    assert type(reloaded_adam_2) is fk.Adam
    assert reloaded_adam_2.name == "adam_1"
    reloaded_custom = optimizers.deserialize(optimizers.serialize(custom_adam))
    assert reloaded_custom.name == "my_adam"


# Not ported from optimizer_test.py (they skip themselves off TensorFlow):
# test_tf_checkpointing, test_mixed_with_tf_variables; adam_test.py::test_clipnorm_indexed_slices.

# ------------------------------------------------------------------------------------------
# loss_scale_optimizer_test.py: LossScaleOptimizer around each optimizer (SGD there). On the
# torch backend both the stateful and the stateless paths run (Keras skips stateless only on TF).

STATELESS = pytest.mark.parametrize("stateless", [True, False], ids=["stateless", "stateful"])


def lso_apply(optimizer: Any, grads: list[Any], vars: list[Any], stateless: bool) -> list[Any]:
    if stateless:
        optimizer.build(vars)
        vars, _ = optimizer.stateless_apply(
            [v.value for v in optimizer.variables], grads, [v.value for v in vars]
        )
    else:
        optimizer.apply(grads, vars)
    return vars


@name_param
@impl_param
def test_lso_config(impl: str, name: str) -> None:
    # loss_scale_optimizer_test.py::test_config
    inner = opt_class(impl, name)(**CONFIG_KWARGS[name])
    revived = tc.run_class_serialization_test(LossScaleOptimizer(inner))
    assert type(revived.inner_optimizer) is type(inner)


@name_param
@impl_param
def test_lso_apply_with_no_vars(impl: str, name: str) -> None:
    # loss_scale_optimizer_test.py::test_apply_with_no_vars
    def scenario(inner: Any) -> list[Any]:
        optimizer = LossScaleOptimizer(inner)
        grads = [ops.array([1.0, 6.0, 7.0, 2.0]) * optimizer.initial_scale]
        vars = [backend.Variable([1.0, 2.0, 3.0, 4.0])]
        optimizer.build(vars)
        optimizer.apply(grads)
        return vars

    check_scenario(
        impl,
        name,
        dict(learning_rate=0.5),
        scenario,
        [[0.5, -1.0, -0.5, 3.0]],
        rtol=1e-4,
        atol=1e-4,
    )


@name_param
@STATELESS
@pytest.mark.parametrize("inner_loss_scale", [None, 100], ids=["", "inner_loss_scale"])
@impl_param
def test_lso_finite_step(impl: str, name: str, stateless: bool, inner_loss_scale: Any) -> None:
    # loss_scale_optimizer_test.py::test_finite_step, test_finite_step_with_inner_loss_scale
    def scenario(inner: Any) -> list[Any]:
        optimizer = LossScaleOptimizer(inner)
        grads = [ops.array([1.0, 6.0, 7.0, 2.0]) * optimizer.initial_scale]
        vars = [backend.Variable([1.0, 2.0, 3.0, 4.0])]
        return lso_apply(optimizer, grads, vars, stateless)

    check_scenario(
        impl,
        name,
        dict(learning_rate=0.5, loss_scale_factor=inner_loss_scale),
        scenario,
        [[0.5, -1.0, -0.5, 3.0]],
        rtol=1e-4,
        atol=1e-4,
    )


@name_param
@STATELESS
@impl_param
def test_lso_infinite_step(impl: str, name: str, stateless: bool) -> None:
    # loss_scale_optimizer_test.py::test_infinite_step: any optimizer leaves the variables
    inner = opt_class(impl, name)(learning_rate=0.5)
    optimizer = LossScaleOptimizer(inner)
    grads = [ops.array([np.inf, np.inf, np.inf, np.inf])]
    vars = [backend.Variable([1.0, 2.0, 3.0, 4.0])]
    vars = lso_apply(optimizer, grads, vars, stateless)
    tc.assertAllClose(vars[0], [1.0, 2.0, 3.0, 4.0], rtol=1e-4, atol=1e-4)


@name_param
@STATELESS
@impl_param
def test_lso_finite_step_with_overwrite(impl: str, name: str, stateless: bool) -> None:
    # loss_scale_optimizer_test.py::test_finite_step_with_overwrite
    optimizer = LossScaleOptimizer(opt_class(impl, name)(learning_rate=0.5))
    grads = [ops.array([1.0, 6.0, 7.0, 2.0])]
    vars = [backend.Variable([1.0, 2.0, 3.0, 4.0])]
    vars[0].overwrite_with_gradient = True
    vars = lso_apply(optimizer, grads, vars, stateless)
    tc.assertAllClose(vars[0], grads[0])


def lso_loop(optimizer: Any, grads: list[Any], vars: list[Any], stateless: bool, n: int) -> None:
    optimizer.build(vars)
    opt_var_values = [v.value for v in optimizer.variables]
    for _ in range(n):
        if stateless:
            _, opt_var_values = optimizer.stateless_apply(
                opt_var_values, grads, [v.value for v in vars]
            )
            for ref_v, v in zip(optimizer.variables, opt_var_values):
                ref_v.assign(v)
        else:
            optimizer.apply(grads, vars)


@name_param
@STATELESS
@impl_param
def test_lso_downscaling(impl: str, name: str, stateless: bool) -> None:
    # loss_scale_optimizer_test.py::test_downscaling
    optimizer = LossScaleOptimizer(opt_class(impl, name)(learning_rate=0.5), initial_scale=400.0)
    vars = [backend.Variable([1.0, 2.0, 3.0, 4.0])]
    lso_loop(optimizer, [ops.array([np.inf, np.inf, np.inf, np.inf])], vars, stateless, 4)
    tc.assertAllClose(optimizer.scale_loss(1.0), 25.0)
    tc.assertAllClose(vars[0], [1.0, 2.0, 3.0, 4.0])  # and no step was taken


@name_param
@STATELESS
@impl_param
def test_lso_upscaling(impl: str, name: str, stateless: bool) -> None:
    # loss_scale_optimizer_test.py::test_upscaling
    optimizer = LossScaleOptimizer(
        opt_class(impl, name)(learning_rate=0.5), initial_scale=2.0, dynamic_growth_steps=2
    )
    vars = [backend.Variable([1.0, 2.0, 3.0, 4.0])]
    lso_loop(optimizer, [ops.array([1.0, 6.0, 7.0, 2.0])], vars, stateless, 8)
    tc.assertAllClose(optimizer.scale_loss(1.0), 32.0)


@name_param
@STATELESS
@impl_param
def test_lso_iterations_update(impl: str, name: str, stateless: bool) -> None:
    # loss_scale_optimizer_test.py::test_iterations_update, with the variables and the inner
    # optimizer's state against Keras' own after the three steps. Stateless: each step takes
    # the values the previous one returned (as a stateless trainer does; Keras' test gives the
    # variables' own tensors, which torch optimizers, Keras' own included, update in place).
    def scenario(inner: Any) -> list[Any]:
        optimizer = LossScaleOptimizer(inner)
        vars = [backend.Variable([1.0, 2.0, 3.0, 4.0])]
        optimizer.build(vars)
        opt_var_values = [v.value.clone() for v in optimizer.variables]
        var_values = [v.value.clone() for v in vars]
        grads = [ops.array([1.0, 6.0, 7.0, 2.0])]
        assert optimizer.iterations.value == 0
        for i in range(3):
            if stateless:
                var_values, opt_var_values = optimizer.stateless_apply(
                    opt_var_values, grads, var_values
                )
                for ref_v, v in zip(optimizer.variables, opt_var_values):
                    ref_v.assign(v)
            else:
                optimizer.apply(grads, vars)
                var_values = [v.value for v in vars]
            assert optimizer.iterations.value == i + 1
        return [*var_values, *optimizer.variables]

    ours, theirs = scenario_results(impl, name, dict(learning_rate=0.5), scenario)
    for value, expected in zip(ours, theirs):
        assert_matches_keras(value, expected)


@name_param
@pytest.mark.parametrize("wrapped", [False, True], ids=["", "loss_scale_optimizer"])
@impl_param
def test_stateless_apply_changes_no_variable(impl: str, name: str, wrapped: bool) -> None:
    # optimizer.stateless_apply (the stateless tests of loss_scale_optimizer_test.py): given
    # copies of the variables' values, it returns the new values and changes no variable, the
    # optimizer's included (Nadam's u_product: not in LossScaleOptimizer.variables, so its
    # new value is left in the stateless scope, as Keras' own Nadam leaves it).
    optimizer = opt_class(impl, name)(learning_rate=0.5)
    if wrapped:
        optimizer = LossScaleOptimizer(optimizer)
    vars = [backend.Variable([1.0, 2.0, 3.0, 4.0]), backend.Variable([[0.5, -0.5]])]
    optimizer.build(vars)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    everything = [*vars, *optimizer.variables, *inner.variables]
    if name == "Nadam":
        everything.append(inner._u_product)
    before = [v.numpy().copy() for v in everything]
    grads = [ops.array([1.0, 6.0, 7.0, 2.0]), ops.array([[0.25, 3.0]])]
    var_values = [v.value.clone() for v in vars]
    opt_values = [v.value.clone() for v in optimizer.variables]
    for _ in range(2):
        var_values, opt_values = optimizer.stateless_apply(opt_values, grads, var_values)
    for v, value in zip(everything, before):
        tc.assertAllClose(v, value, msg=v.path)
    assert not np.allclose(tc.convert_to_numpy(var_values[0]), before[0])


@name_param
@impl_param
def test_lso_serialization(impl: str, name: str) -> None:
    # loss_scale_optimizer_test.py::test_serialization
    optimizer = LossScaleOptimizer(
        opt_class(impl, name)(learning_rate=0.5),
        initial_scale=3.0,
        dynamic_growth_steps=2,
        name="test_opt",
    )
    config = optimizer.get_config()
    assert len(config) == 4
    assert config["name"] == "test_opt"
    assert config["initial_scale"] == 3.0
    assert config["dynamic_growth_steps"] == 2
    assert "inner_optimizer" in config
    revived = LossScaleOptimizer.from_config(config)
    assert isinstance(revived.inner_optimizer, opt_class(impl, name))


# ------------------------------------------------------------------------------------------
# fusedopt.keras_numpy: Keras' math over NumPy arrays (README), held to the same golden values.
# Its optimizers have no exclude_from_weight_decay and no _clip_gradients: the weight-decay test
# keeps its first variable, and the clipping tests are not ported here.


@name_param
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keras_numpy_golden_single_step_and_weight_decay(name: str, dtype: str) -> None:
    # <name>_test.py::test_correctness_with_golden, test_single_step, test_weight_decay (var1)
    cls = getattr(fk_numpy, name)
    kwargs, _, golden = GOLDEN[name]
    optimizer = cls(**kwargs)
    x = np.ones([10], dtype=dtype)
    grads = np.arange(0.1, 1.1, 0.1).astype(dtype)
    optimizer.apply([np.full((10,), 0.01, dtype=dtype)], [x])
    for i in range(5):
        tc.assertAllClose(x, golden[i], rtol=5e-4, atol=5e-4)
        optimizer.apply([grads], [x])

    vars = np.array([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    cls(learning_rate=0.5).apply([np.array([1.0, 6.0, 7.0, 2.0], dtype=dtype)], [vars])
    tc.assertAllClose(vars, SINGLE_STEP[name], rtol=1e-4, atol=1e-4)

    var1 = np.array(2.0, dtype=dtype)
    for _ in range(3):  # optimizer_1, _2 and _3 of the test each step var1 once
        cls(learning_rate=1.0, weight_decay=0.004).apply([np.zeros((), dtype=dtype)], [var1])
    tc.assertAlmostEqual(var1, 1.9760959, decimal=6)
