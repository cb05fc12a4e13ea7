"""fusedopt.functional: the same kernels as the classes, over state the caller holds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fusedopt
import fusedopt.functional as F
from fusedopt import reference

STEPS = 5
SHAPES = [(6, 4), (17,), (0,), (1,)]
TOLERANCE = dict(rtol=1e-12, atol=1e-14)  # float64 kernels against the float64 oracle


def problem(seed: int, dtype: type = np.float64) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def zeros(params: list[np.ndarray], value: float = 0.0) -> list[np.ndarray]:
    return [np.full_like(p, value) for p in params]


def rate(t: int) -> float:
    return 0.02 * (1.0 + 0.5 * np.cos(t))


def follow_reference(
    step_fn: Any, params: list[np.ndarray], grads: list[list[np.ndarray]], **hyper: Any
) -> list[tuple[np.ndarray, dict]]:
    """The oracle's trajectory of every tensor, with the learning rate of ``rate``."""
    lr_name = "learning_rate" if step_fn.__name__.startswith("keras") else "lr"
    expected = [(p.astype(np.float64), {}) for p in params]
    for t, step_grads in enumerate(grads):
        expected = [
            step_fn(p, g, s, **{lr_name: rate(t)}, **hyper)
            for (p, s), g in zip(expected, step_grads)
        ]
    return expected


def assert_follows(
    params: list[np.ndarray], states: dict[str, list[np.ndarray]], expected: list
) -> None:
    for i, (p, (p_ref, s_ref)) in enumerate(zip(params, expected)):
        np.testing.assert_allclose(p, p_ref, **TOLERANCE, err_msg=f"params[{i}]")
        for name, buffers in states.items():
            np.testing.assert_allclose(buffers[i], s_ref[name], **TOLERANCE, err_msg=f"{name}[{i}]")


# ----------------------------------------------------------------------------- torch convention


@pytest.mark.parametrize(
    "hyper",
    [
        dict(momentum=0.9),
        dict(momentum=0.8, dampening=0.3, weight_decay=0.1, maximize=True),
        dict(momentum=0.9, nesterov=True),
        {},
    ],
    ids=["momentum", "dampening_decay_maximize", "nesterov", "plain"],
)
def test_sgd_matches_reference(hyper: dict) -> None:
    params, grads = problem(1)
    expected = follow_reference(reference.torch_sgd, params, grads, **hyper)
    buffers = zeros(params) if hyper.get("momentum") else None
    for t, g in enumerate(grads):
        F.sgd_(params, g, buffers, lr=rate(t), first_step=t == 0, **hyper)
    assert_follows(params, {"momentum_buffer": buffers} if buffers else {}, expected)


def test_adagrad_matches_reference() -> None:
    params, grads = problem(2)
    hyper = dict(lr_decay=0.1, weight_decay=0.05, eps=1e-6, maximize=True)
    expected = follow_reference(
        reference.torch_adagrad, params, grads, initial_accumulator_value=0.3, **hyper
    )
    sums = zeros(params, 0.3)
    for t, g in enumerate(grads):
        F.adagrad_(params, g, sums, step=t + 1, lr=rate(t), **hyper)
    assert_follows(params, {"sum": sums}, expected)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_rmsprop_matches_reference(centered: bool, momentum: float) -> None:
    params, grads = problem(3)
    hyper = dict(alpha=0.9, eps=1e-4, weight_decay=0.01, momentum=momentum, centered=centered)
    expected = follow_reference(reference.torch_rmsprop, params, grads, **hyper)
    square_avgs = zeros(params)
    buffers = zeros(params) if momentum else None
    grad_avgs = zeros(params) if centered else None
    for t, g in enumerate(grads):
        F.rmsprop_(params, g, square_avgs, buffers, grad_avgs, lr=rate(t), **hyper)
    states = {"square_avg": square_avgs}
    states |= {"momentum_buffer": buffers} if buffers else {}
    states |= {"grad_avg": grad_avgs} if grad_avgs else {}
    assert_follows(params, states, expected)


@pytest.mark.parametrize(
    "hyper",
    [
        {},
        dict(amsgrad=True, maximize=True, weight_decay=0.1),
        dict(decoupled_weight_decay=True, weight_decay=0.1),
    ],
    ids=["plain", "amsgrad_maximize_l2", "adamw"],
)
def test_adam_matches_reference(hyper: dict) -> None:
    params, grads = problem(4)
    expected = follow_reference(reference.torch_adam, params, grads, beta1=0.8, beta2=0.99, **hyper)
    exp_avgs, exp_avg_sqs = zeros(params), zeros(params)
    maxima = zeros(params) if hyper.get("amsgrad") else None
    for t, g in enumerate(grads):
        F.adam_(
            params,
            g,
            exp_avgs,
            exp_avg_sqs,
            maxima,
            step=t + 1,
            lr=rate(t),
            beta1=0.8,
            beta2=0.99,
            **hyper,
        )
    states = {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs} | (
        {"max_exp_avg_sq": maxima} if maxima else {}
    )
    assert_follows(params, states, expected)


# ----------------------------------------------------------------------------- keras convention


@pytest.mark.parametrize("nesterov", [False, True])
def test_keras_sgd_matches_reference(nesterov: bool) -> None:
    params, grads = problem(5)
    expected = follow_reference(
        reference.keras_sgd, params, grads, momentum=0.9, nesterov=nesterov, weight_decay=0.05
    )
    velocities = zeros(params)
    for t, g in enumerate(grads):
        F.sgd_(
            params,
            g,
            velocities,
            lr=rate(t),
            momentum=0.9,
            nesterov=nesterov,
            weight_decay=0.05,
            convention="keras",
        )
    assert_follows(params, {"momentum": velocities}, expected)


def test_keras_adagrad_matches_reference() -> None:
    params, grads = problem(6)
    expected = follow_reference(
        reference.keras_adagrad, params, grads, epsilon=1e-3, weight_decay=0.1
    )
    accumulators = zeros(params, 0.1)  # Keras' default initial_accumulator_value
    for t, g in enumerate(grads):
        F.adagrad_(
            params,
            g,
            accumulators,
            step=t + 1,
            lr=rate(t),
            eps=1e-3,
            weight_decay=0.1,
            convention="keras",
        )
    assert_follows(params, {"accumulator": accumulators}, expected)


def test_keras_rmsprop_matches_reference() -> None:
    params, grads = problem(7)
    hyper = dict(rho=0.8, momentum=0.5, epsilon=1e-3, centered=True)
    expected = follow_reference(reference.keras_rmsprop, params, grads, **hyper)
    velocities, momentums, averages = zeros(params), zeros(params), zeros(params)
    for t, g in enumerate(grads):
        F.rmsprop_(
            params,
            g,
            velocities,
            momentums,
            averages,
            lr=rate(t),
            alpha=0.8,
            momentum=0.5,
            eps=1e-3,
            centered=True,
            convention="keras",
        )
    assert_follows(
        params,
        {"velocity": velocities, "momentum": momentums, "average_gradient": averages},
        expected,
    )


def test_keras_adam_matches_reference() -> None:
    params, grads = problem(8)
    hyper = dict(beta_1=0.8, beta_2=0.99, epsilon=1e-4, amsgrad=True, weight_decay=0.1)
    expected = follow_reference(reference.keras_adam, params, grads, **hyper)
    ms, vs, v_hats = zeros(params), zeros(params), zeros(params)
    for t, g in enumerate(grads):
        F.adam_(
            params,
            g,
            ms,
            vs,
            v_hats,
            step=t + 1,
            lr=rate(t),
            beta1=0.8,
            beta2=0.99,
            eps=1e-4,
            amsgrad=True,
            weight_decay=0.1,
            convention="keras",
        )
    assert_follows(params, {"momentum": ms, "velocity": vs, "velocity_hat": v_hats}, expected)


# ----------------------------------------------------------------------------- same as classes


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_functional_adam_is_bit_identical_to_the_class(dtype: type) -> None:
    params, grads = problem(9, dtype)
    copies = [p.copy() for p in params]
    opt = fusedopt.Adam(copies, lr=0.01, amsgrad=True, weight_decay=0.1)
    exp_avgs, exp_avg_sqs, maxima = zeros(params), zeros(params), zeros(params)
    for t, g in enumerate(grads):
        opt.step(g)
        F.adam_(
            params,
            g,
            exp_avgs,
            exp_avg_sqs,
            maxima,
            step=t + 1,
            lr=0.01,
            amsgrad=True,
            weight_decay=0.1,
        )
    for i, p in enumerate(params):
        np.testing.assert_array_equal(p, copies[i])
        if p.size:
            np.testing.assert_array_equal(exp_avgs[i], opt.state[i]["exp_avg"])
            np.testing.assert_array_equal(maxima[i], opt.state[i]["max_exp_avg_sq"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_functional_sgd_rmsprop_adagrad_are_bit_identical_to_the_classes(dtype: type) -> None:
    params, grads = problem(10, dtype)
    runs = {
        "sgd": (fusedopt.SGD, dict(momentum=0.9, dampening=0.2), 1),
        "rmsprop": (fusedopt.RMSprop, dict(momentum=0.5, centered=True), 3),
        "adagrad": (fusedopt.Adagrad, dict(lr_decay=0.1), 1),
    }
    for name, (cls, hyper, num_states) in runs.items():
        ours = [p.copy() for p in params]
        theirs = [p.copy() for p in params]
        opt = cls(theirs, lr=0.01, **hyper)
        states = [zeros(params) for _ in range(num_states)]
        for t, g in enumerate(grads):
            opt.step(g)
            if name == "sgd":
                F.sgd_(ours, g, states[0], lr=0.01, first_step=t == 0, **hyper)
            elif name == "rmsprop":
                F.rmsprop_(ours, g, *states, lr=0.01, **hyper)
            else:
                F.adagrad_(ours, g, states[0], step=t + 1, lr=0.01, **hyper)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b, err_msg=name)


# ----------------------------------------------------------------------------- calling forms


def test_single_arrays_are_accepted_for_every_role() -> None:
    rng = np.random.default_rng(11)
    p, g = rng.standard_normal(9), rng.standard_normal(9)
    m, v = np.zeros(9), np.zeros(9)
    p_ref, s_ref = reference.torch_adam(p, g, {}, lr=0.1)
    F.adam_(p, g, m, v, step=1, lr=0.1)
    np.testing.assert_allclose(p, p_ref, **TOLERANCE)
    np.testing.assert_allclose(m, s_ref["exp_avg"], **TOLERANCE)
    q, buf = rng.standard_normal(4), np.zeros(4)
    expected, _ = reference.torch_sgd(q, g[:4], {}, lr=0.1, momentum=0.9)
    F.sgd_(q, g[:4].copy(), buf, lr=0.1, momentum=0.9, first_step=True)
    np.testing.assert_allclose(q, expected, **TOLERANCE)


def test_a_single_memmap_is_accepted_as_a_list_of_one_is(tmp_path: Any) -> None:
    """Any ndarray alone is read as one array: a memmap alone was refused, in a list taken."""
    alone = np.memmap(tmp_path / "alone", dtype=np.float32, mode="w+", shape=(5,))
    listed = np.memmap(tmp_path / "listed", dtype=np.float32, mode="w+", shape=(5,))
    alone[...] = listed[...] = np.arange(5)
    F.sgd_(alone, np.ones(5, np.float32), lr=0.5)
    F.sgd_([listed], [np.ones(5, np.float32)], lr=0.5)
    np.testing.assert_array_equal(alone, np.arange(5) - np.float32(0.5))
    np.testing.assert_array_equal(alone, listed)


def test_tuples_of_arrays_are_accepted() -> None:
    params, grads = problem(12)
    sums = tuple(zeros(params))
    expected = follow_reference(reference.torch_adagrad, params, grads[:1])
    F.adagrad_(tuple(params), tuple(grads[0]), sums, step=1, lr=rate(0))
    assert_follows(params, {"sum": list(sums)}, expected)


def test_per_tensor_step_counts() -> None:
    """Each tensor has its own bias correction: params added at different times."""
    params, grads = problem(13)
    steps = [1, 7, 3, 12]
    states = [{"step": s - 1} if s > 1 else {} for s in steps]
    rng = np.random.default_rng(14)
    exp_avgs = [np.abs(rng.standard_normal(p.shape)) * (s > 1) for p, s in zip(params, steps)]
    exp_avg_sqs = [np.abs(rng.standard_normal(p.shape)) * (s > 1) for p, s in zip(params, steps)]
    expected = []
    for p, g, s, m, v in zip(params, grads[0], states, exp_avgs, exp_avg_sqs):
        if "step" in s:
            s = dict(s, exp_avg=m.copy(), exp_avg_sq=v.copy())
        expected.append(reference.torch_adam(p, g, s, lr=0.1))
    F.adam_(params, grads[0], exp_avgs, exp_avg_sqs, step=steps, lr=0.1)
    assert_follows(params, {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}, expected)
    # ...and it differs from running them all at one step count.
    other, _ = problem(13)
    F.adam_(other, grads[0], zeros(other), zeros(other), step=1, lr=0.1)
    assert not np.array_equal(other[1], params[1])


def test_per_tensor_steps_of_the_wrong_length_are_refused() -> None:
    params, grads = problem(15)
    with pytest.raises(ValueError):
        F.adam_(params, grads[0], zeros(params), zeros(params), step=[1, 2], lr=0.1)


@pytest.mark.parametrize("found_inf", [1.0, np.float32(1.0), np.array([1.0], np.float32), True])
def test_found_inf_skips_the_step(found_inf: Any) -> None:
    params, grads = problem(16)
    scaled = [g * 1024 for g in grads[0]]
    scaled[0][0, 0] = np.inf
    m, v, buf = zeros(params), zeros(params), zeros(params)
    before = [a.copy() for a in params + scaled + m + v + buf]
    F.adam_(params, scaled, m, v, step=1, lr=0.1, grad_scale=1024.0, found_inf=found_inf)
    F.sgd_(params, scaled, buf, lr=0.1, momentum=0.9, grad_scale=1024.0, found_inf=found_inf)
    for a, b in zip(params + scaled + m + v + buf, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("found_inf", [None, 0.0, np.zeros(1, np.float32)])
def test_found_inf_zero_takes_the_step_and_unscales(found_inf: Any) -> None:
    params, grads = problem(17)
    expected = [reference.torch_adam(p, g, {}, lr=0.1) for p, g in zip(params, grads[0])]
    scaled = [g * 256 for g in grads[0]]
    m, v = zeros(params), zeros(params)
    F.adam_(params, scaled, m, v, step=1, lr=0.1, grad_scale=256.0, found_inf=found_inf)
    assert_follows(params, {"exp_avg": m}, expected)
    for s, g in zip(scaled, grads[0]):
        np.testing.assert_array_equal(s, g)  # written back, unscaled (exact: a power of two)


def test_empty_lists_are_a_no_op() -> None:
    F.adam_([], [], [], [], step=1, lr=0.1)
    F.sgd_([], [], lr=0.1)
