"""Every algorithm x convention x dtype x ISA x awkward size, several steps with a changing
learning rate: params and every state buffer against the float64 reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import fusedopt
import fusedopt.keras_numpy as fk
from conftest import DTYPES, SIZES
from fusedopt import reference

# float32 kernels against a float64 oracle: a few ulps per operation over a few steps.
TOLERANCE = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
STEPS = 4


@dataclass
class Case:
    """One optimizer configuration and the reference function it must follow."""

    name: str
    make: Callable[[list[np.ndarray], float], Any]  # (params, lr) -> optimizer
    reference: Callable[..., tuple[np.ndarray, dict]]
    hyper: dict[str, Any] = field(default_factory=dict)  # reference kwargs, lr excluded
    keras: bool = False
    steps: int = STEPS


def torch_case(
    name: str, cls: type, ref: Callable, ctor: dict, ref_hyper: dict | None = None, steps=STEPS
) -> Case:
    return Case(
        name,
        lambda ps, lr: cls(ps, lr=lr, **ctor),
        ref,
        ref_hyper if ref_hyper is not None else ctor,
        steps=steps,
    )


def keras_case(name: str, cls: type, ref: Callable, kw: dict) -> Case:
    return Case(name, lambda ps, lr: cls(learning_rate=lr, **kw), ref, kw, keras=True)


CASES = [
    torch_case("sgd", fusedopt.SGD, reference.torch_sgd, {}),
    torch_case(
        "sgd_momentum_dampening_wd",
        fusedopt.SGD,
        reference.torch_sgd,
        dict(momentum=0.9, dampening=0.3, weight_decay=0.05),
    ),
    torch_case(
        "sgd_nesterov_maximize",
        fusedopt.SGD,
        reference.torch_sgd,
        dict(momentum=0.8, nesterov=True, maximize=True),
    ),
    torch_case(
        "adagrad",
        fusedopt.Adagrad,
        reference.torch_adagrad,
        dict(lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.2, eps=1e-6),
    ),
    torch_case("adagrad_maximize", fusedopt.Adagrad, reference.torch_adagrad, dict(maximize=True)),
    torch_case("rmsprop", fusedopt.RMSprop, reference.torch_rmsprop, dict(weight_decay=0.01)),
    torch_case(
        "rmsprop_centered_momentum",
        fusedopt.RMSprop,
        reference.torch_rmsprop,
        dict(alpha=0.9, centered=True, momentum=0.7, eps=1e-3, maximize=True),
    ),
    torch_case(
        "rmsprop_alpha_low",
        fusedopt.RMSprop,
        reference.torch_rmsprop,
        dict(alpha=0.3, centered=True),
    ),  # lerp weight >= 0.5: torch's other form
    torch_case("adam", fusedopt.Adam, reference.torch_adam, dict(weight_decay=0.02)),
    torch_case(
        "adam_amsgrad_maximize",
        fusedopt.Adam,
        reference.torch_adam,
        dict(amsgrad=True, maximize=True, betas=(0.8, 0.99)),
        dict(amsgrad=True, maximize=True, beta1=0.8, beta2=0.99),
    ),
    torch_case(
        "adamw",
        fusedopt.AdamW,
        reference.torch_adam,
        dict(weight_decay=0.1),
        dict(weight_decay=0.1, decoupled_weight_decay=True),
    ),
    torch_case(
        "adamw_amsgrad_low_beta1",
        fusedopt.AdamW,
        reference.torch_adam,
        dict(amsgrad=True, betas=(0.3, 0.9)),
        dict(amsgrad=True, beta1=0.3, beta2=0.9, weight_decay=1e-2, decoupled_weight_decay=True),
    ),
    keras_case("keras_sgd", fk.SGD, reference.keras_sgd, dict(weight_decay=0.01)),
    keras_case("keras_sgd_momentum", fk.SGD, reference.keras_sgd, dict(momentum=0.9)),
    keras_case(
        "keras_sgd_nesterov",
        fk.SGD,
        reference.keras_sgd,
        dict(momentum=0.9, nesterov=True, weight_decay=0.02),
    ),
    keras_case("keras_adagrad", fk.Adagrad, reference.keras_adagrad, dict(weight_decay=0.03)),
    keras_case("keras_rmsprop", fk.RMSprop, reference.keras_rmsprop, dict(weight_decay=0.01)),
    keras_case(
        "keras_rmsprop_centered_momentum",
        fk.RMSprop,
        reference.keras_rmsprop,
        dict(rho=0.8, centered=True, momentum=0.5, epsilon=1e-3),
    ),
    keras_case("keras_adam", fk.Adam, reference.keras_adam, dict(epsilon=1e-7)),
    keras_case(
        "keras_adam_amsgrad_wd",
        fk.Adam,
        reference.keras_adam,
        dict(amsgrad=True, weight_decay=0.05, beta_1=0.7),
    ),
    keras_case("keras_adamw", fk.AdamW, reference.keras_adam, dict(weight_decay=0.004)),
    # The rest of torch.optim's element-wise family, Lion, and Keras' forms of them.
    torch_case("adadelta", fusedopt.Adadelta, reference.torch_adadelta, dict(weight_decay=0.05)),
    torch_case(
        "adadelta_rho_maximize",
        fusedopt.Adadelta,
        reference.torch_adadelta,
        dict(rho=0.3, eps=1e-4, maximize=True),
    ),
    torch_case(
        "adamax",
        fusedopt.Adamax,
        reference.torch_adamax,
        dict(weight_decay=0.02, betas=(0.8, 0.95)),
        dict(weight_decay=0.02, beta1=0.8, beta2=0.95),
    ),
    torch_case(
        "adamax_low_beta1_maximize",
        fusedopt.Adamax,
        reference.torch_adamax,
        dict(betas=(0.3, 0.9), eps=1e-3, maximize=True),
        dict(beta1=0.3, beta2=0.9, eps=1e-3, maximize=True),
    ),
    torch_case("nadam", fusedopt.NAdam, reference.torch_nadam, dict(weight_decay=0.01)),
    torch_case(
        "nadam_decoupled_momentum_decay",
        fusedopt.NAdam,
        reference.torch_nadam,
        dict(weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=0.5, maximize=True),
    ),
    torch_case(
        "radam",
        fusedopt.RAdam,
        reference.torch_radam,
        dict(weight_decay=0.01, betas=(0.9, 0.9)),
        dict(weight_decay=0.01, beta1=0.9, beta2=0.9),
        steps=8,
    ),  # with beta2 = 0.9, rho_t crosses 5 at step 6: both branches run
    torch_case(
        "radam_decoupled_maximize",
        fusedopt.RAdam,
        reference.torch_radam,
        dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    ),
    torch_case("rprop", fusedopt.Rprop, reference.torch_rprop, {}),
    torch_case(
        "rprop_etas_step_sizes_maximize",
        fusedopt.Rprop,
        reference.torch_rprop,
        dict(etas=(0.3, 1.5), step_sizes=(1e-3, 0.02), maximize=True),
        dict(etaminus=0.3, etaplus=1.5, step_size_min=1e-3, step_size_max=0.02, maximize=True),
    ),
    torch_case("asgd", fusedopt.ASGD, reference.torch_asgd, dict(weight_decay=0.01)),
    torch_case(
        "asgd_averaging",
        fusedopt.ASGD,
        reference.torch_asgd,
        dict(lambd=0.1, alpha=0.5, t0=1.0, maximize=True),
    ),  # mu < 1 from step 3: ax averages
    torch_case("lion", fusedopt.Lion, reference.torch_lion, dict(weight_decay=0.1)),
    torch_case(
        "lion_betas_maximize",
        fusedopt.Lion,
        reference.torch_lion,
        dict(betas=(0.3, 0.6), maximize=True),
        dict(beta1=0.3, beta2=0.6, maximize=True),
    ),  # lerp weights >= 0.5: torch's other form
    keras_case("keras_adadelta", fk.Adadelta, reference.keras_adadelta, dict(weight_decay=0.01)),
    keras_case("keras_adamax", fk.Adamax, reference.keras_adamax, dict(beta_1=0.7)),
    keras_case("keras_nadam", fk.Nadam, reference.keras_nadam, dict(weight_decay=0.02)),
    keras_case("keras_lion", fk.Lion, reference.keras_lion, dict(weight_decay=0.05, beta_1=0.8)),
    keras_case("keras_lamb", fk.Lamb, reference.keras_lamb, dict(weight_decay=0.01)),
    keras_case("keras_lamb_betas", fk.Lamb, reference.keras_lamb, dict(beta_1=0.5, epsilon=1e-3)),
]


def learning_rate(step: int) -> float:
    """Changes every step, as a schedule would."""
    return 0.01 * (1.0 + 0.5 * np.sin(step + 1.0))


def make_optimizer(case: Case, params: list[np.ndarray]) -> Any:
    return case.make(params, learning_rate(0))


def set_learning_rate(case: Case, opt: Any, lr: float) -> None:
    if case.keras:
        opt.learning_rate = lr
    else:
        for group in opt.param_groups:
            group["lr"] = lr


def apply(case: Case, opt: Any, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
    if case.keras:
        opt.apply(grads, params)
    else:
        opt.step(grads)


def reference_step(case: Case, p: np.ndarray, g: np.ndarray, state: dict, lr: float) -> tuple:
    if case.keras:
        # fusedopt.keras, like Keras, holds the learning rate as a float32 value.
        return case.reference(p, g, state, learning_rate=float(np.float32(lr)), **case.hyper)
    return case.reference(p, g, state, lr=lr, **case.hyper)


def fused_state(case: Case, opt: Any, index: int) -> dict[str, np.ndarray]:
    return {k: v for k, v in opt.state.get(index, {}).items() if isinstance(v, np.ndarray)}


def scalar_state(case: Case, opt: Any, index: int) -> dict[str, float]:
    """Per-tensor host scalars (NAdam's mu_product, ASGD's eta and mu; Keras Nadam's
    optimizer-wide u_product)."""
    if case.keras:
        return {"u_product": opt.u_product} if hasattr(opt, "u_product") else {}
    state = opt.state.get(index, {})
    return {k: v for k, v in state.items() if isinstance(v, float)}


def run_and_compare(case: Case, sizes: list[int], dtype: type, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    expected = [(p.astype(np.float64), {}) for p in params]
    opt = make_optimizer(case, params)
    for step in range(case.steps):
        lr = learning_rate(step)
        grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
        set_learning_rate(case, opt, lr)
        apply(case, opt, params, grads)
        expected = [reference_step(case, p, g, s, lr) for (p, s), g in zip(expected, grads)]
    for i, (p_ref, s_ref) in enumerate(expected):
        np.testing.assert_allclose(params[i], p_ref, **TOLERANCE[dtype], err_msg=f"params[{i}]")
        state = fused_state(case, opt, i)
        for name, value in s_ref.items():
            if not isinstance(value, np.ndarray) or name not in state:
                continue
            np.testing.assert_allclose(
                state[name], value, **TOLERANCE[dtype], err_msg=f"state {name} of params[{i}]"
            )
        for name, value in scalar_state(case, opt, i).items():
            assert value == pytest.approx(s_ref[name], rel=1e-7 if dtype == np.float32 else 1e-15)
        # The Keras reference keeps every slot; one the configuration never uses stays zero.
        for name in {k for k, v in s_ref.items() if isinstance(v, np.ndarray)} - set(state):
            assert not np.any(s_ref[name]), f"state {name} of params[{i}] is missing"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("size", SIZES)
def test_single_tensor_matches_reference(case: Case, dtype: type, size: int, isa: str) -> None:
    run_and_compare(case, [size], dtype, seed=size)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_tensor_list_with_empties_matches_reference(case: Case, dtype: type, isa: str) -> None:
    run_and_compare(case, [0, 5, 70000, 0, 33, 1, 20000, 0], dtype, seed=7)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_isa_gives_bit_identical_results(case: Case) -> None:
    """No FMA in the math and -ffp-contract=off: scalar, AVX2 and AVX-512 round alike."""
    results = []
    previous = fusedopt.cpu_isa()
    try:
        for isa in fusedopt.available_isas():
            fusedopt.set_cpu_isa(isa)
            rng = np.random.default_rng(3)
            params = [rng.standard_normal(n).astype(np.float32) for n in (1000, 17, 70001)]
            opt = make_optimizer(case, params)
            for _ in range(3):
                apply(
                    case,
                    opt,
                    params,
                    [rng.standard_normal(p.size).astype(np.float32) for p in params],
                )
            results.append(np.concatenate(params))
    finally:
        fusedopt.set_cpu_isa(previous)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_thread_count_does_not_change_results(case: Case) -> None:
    results = []
    previous = fusedopt.num_threads()
    try:
        for threads in (1, 2, 3):
            fusedopt.set_num_threads(threads)
            rng = np.random.default_rng(5)
            params = [rng.standard_normal(n) for n in (300000, 5, 100000)]
            opt = make_optimizer(case, params)
            for _ in range(2):
                apply(case, opt, params, [rng.standard_normal(p.size) for p in params])
            results.append(np.concatenate(params))
    finally:
        fusedopt.set_num_threads(previous)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_param_groups_have_their_own_hyperparameters() -> None:
    rng = np.random.default_rng(11)
    a, b, c = (rng.standard_normal(n) for n in (10, 20, 30))
    opt = fusedopt.Adam(
        [{"params": [a, b], "lr": 0.1, "amsgrad": True}, {"params": [c], "betas": (0.5, 0.6)}],
        lr=0.01,
        weight_decay=0.1,
    )
    expected = [(x.copy(), {}) for x in (a, b, c)]
    hyper = [dict(lr=0.1, amsgrad=True, weight_decay=0.1)] * 2 + [
        dict(lr=0.01, beta1=0.5, beta2=0.6, weight_decay=0.1)
    ]
    for _ in range(3):
        grads = [rng.standard_normal(x.size) for x in (a, b, c)]
        opt.step(grads)
        expected = [
            reference.torch_adam(p, g, s, **h) for (p, s), g, h in zip(expected, grads, hyper)
        ]
    for actual, (p_ref, _) in zip((a, b, c), expected):
        np.testing.assert_allclose(actual, p_ref, rtol=1e-12)


def test_added_param_group_and_changed_momentum() -> None:
    rng = np.random.default_rng(12)
    a, b = rng.standard_normal(9), rng.standard_normal(4)
    opt = fusedopt.SGD([a], lr=0.1)
    ref_a, state_a = a.copy(), {}
    g = rng.standard_normal(9)
    opt.step([g])
    ref_a, state_a = reference.torch_sgd(ref_a, g, state_a, lr=0.1)
    opt.add_param_group({"params": [b], "momentum": 0.9, "lr": 0.2})
    opt.param_groups[0]["momentum"] = 0.5  # torch: a new buffer takes the gradient itself
    ref_b, state_b = b.copy(), {}
    for _ in range(3):
        ga, gb = rng.standard_normal(9), rng.standard_normal(4)
        opt.step([ga, gb])
        ref_a, state_a = reference.torch_sgd(ref_a, ga, state_a, lr=0.1, momentum=0.5)
        ref_b, state_b = reference.torch_sgd(ref_b, gb, state_b, lr=0.2, momentum=0.9)
    np.testing.assert_allclose(a, ref_a, rtol=1e-12)
    np.testing.assert_allclose(b, ref_b, rtol=1e-12)


@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.Adam, fusedopt.AdamW])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_grad_scale_unscales_and_writes_back(cls: type, dtype: type) -> None:
    rng = np.random.default_rng(13)
    p = rng.standard_normal(1000).astype(dtype)
    g = (rng.standard_normal(1000) * 1024).astype(dtype)
    unscaled = g / dtype(1024)
    kwargs = dict(momentum=0.9) if cls is fusedopt.SGD else {}
    p_expected = p.copy()
    cls([p_expected], lr=0.1, **kwargs).step([unscaled.copy()])
    cls([p], lr=0.1, **kwargs).step([g], grad_scale=1024.0)
    np.testing.assert_array_equal(g, unscaled)
    np.testing.assert_allclose(p, p_expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.Adam, fusedopt.AdamW])
def test_found_inf_skips_the_step_and_keeps_the_count(cls: type) -> None:
    p = np.ones(10)
    g = np.full(10, np.inf)
    opt = cls([p], lr=0.1, **(dict(momentum=0.9) if cls is fusedopt.SGD else {}))
    opt.step([np.ones(10)])
    before = (
        p.copy(),
        {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state[0].items()},
    )
    opt.step([g], found_inf=np.array([1.0], dtype=np.float32), grad_scale=2.0)
    np.testing.assert_array_equal(p, before[0])
    for name, value in before[1].items():
        np.testing.assert_array_equal(opt.state[0][name], value)
    assert np.all(np.isinf(g))
