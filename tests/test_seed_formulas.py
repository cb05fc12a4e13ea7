"""The seed document's textbook formulas, run literally beside the fusedopt configuration that
README and spec section 10 map each of them to, in float64."""

from __future__ import annotations

from typing import Any

import numpy as np

import fusedopt
import fusedopt.keras_numpy as fk
from fusedopt import reference

STEPS = 40
SIZE = 50
# Each pair of algebraically equal forms rounds differently, once or twice per operation; over 40
# steps the relative difference stays at a few hundred ulps of float64 at most.
TOLERANCE = dict(rtol=1e-12, atol=1e-14)


def varying_rates(base: float) -> list[float]:
    """A learning rate that changes every step (±50%), each value exact in float32, because
    fusedopt.keras holds the rate as a float32 value as Keras does."""
    return [float(np.float32(base * (1.0 + 0.5 * np.sin(0.7 * t)))) for t in range(STEPS)]


def gradients(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SIZE) for _ in range(STEPS)]


def start(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SIZE)


class Quadratic:
    """f(x) = 1/2 sum(a x^2) - b.x, whose gradient depends on where it is evaluated: Nesterov's
    lookahead point matters, unlike with a fixed gradient sequence."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.uniform(0.5, 4.0, SIZE)
        self.b = rng.standard_normal(SIZE)

    def gradient(self, x: np.ndarray) -> np.ndarray:
        return self.a * x - self.b


def test_seed_momentum_is_torch_sgd_with_lr_alpha_times_one_minus_beta_for_any_alpha() -> None:
    beta = 0.9
    alphas = [0.1 * (1.0 + 0.5 * np.sin(t)) for t in range(STEPS)]
    theta, state = start(1), {}
    param = theta.copy()
    opt = fusedopt.SGD([param], lr=alphas[0] * (1 - beta), momentum=beta)
    for alpha, g in zip(alphas, gradients(2)):
        theta, state = reference.seed_momentum(theta, g, state, alpha=alpha, beta=beta)
        opt.param_groups[0]["lr"] = alpha * (1 - beta)
        opt.step([g])
        np.testing.assert_allclose(param, theta, **TOLERANCE)
    # The seed's v is (1 - beta) times torch's buffer.
    np.testing.assert_allclose(
        (1 - beta) * opt.state[0]["momentum_buffer"], state["v"], **TOLERANCE
    )


def test_seed_nesterov_is_keras_nesterov_with_theta_w_minus_gamma_v_for_any_lr() -> None:
    gamma = 0.9
    rates = varying_rates(0.05)
    quadratic = Quadratic(3)
    theta, state = start(4), {}
    w = theta.copy()  # v0 = 0, so the lookahead point starts at theta
    opt = fk.SGD(learning_rate=rates[0], momentum=gamma, nesterov=True)
    for eta in rates:
        theta, state = reference.seed_nesterov(
            theta, quadratic.gradient, state, eta=eta, gamma=gamma
        )
        opt.learning_rate = eta
        opt.apply([quadratic.gradient(w)], [w])  # the gradient at the stored point
        velocity = opt.state[0]["momentum"]
        np.testing.assert_allclose(w - gamma * velocity, theta, **TOLERANCE)
        np.testing.assert_allclose(-velocity, state["v"], **TOLERANCE)


def test_seed_nesterov_is_torch_nesterov_with_theta_p_plus_gamma_eta_buf_at_constant_lr() -> None:
    gamma, eta = 0.8, 0.03
    quadratic = Quadratic(5)
    theta, state = start(6), {}
    p = theta.copy()
    opt = fusedopt.SGD([p], lr=eta, momentum=gamma, nesterov=True)
    for _ in range(STEPS):
        theta, state = reference.seed_nesterov(
            theta, quadratic.gradient, state, eta=eta, gamma=gamma
        )
        opt.step([quadratic.gradient(p)])
        np.testing.assert_allclose(
            p + gamma * eta * opt.state[0]["momentum_buffer"], theta, **TOLERANCE
        )


def test_seed_adagrad_is_keras_adagrad_with_zero_initial_accumulator() -> None:
    eps = 1e-3  # large enough that eps inside or outside the root would differ visibly
    rates = varying_rates(0.1)
    theta, state = start(7), {}
    param = theta.copy()
    opt = fk.Adagrad(learning_rate=rates[0], initial_accumulator_value=0.0, epsilon=eps)
    for eta, g in zip(rates, gradients(8)):
        theta, state = reference.seed_adagrad(theta, g, state, eta=eta, eps=eps)
        opt.learning_rate = eta
        opt.apply([g], [param])
        np.testing.assert_allclose(param, theta, **TOLERANCE)
    np.testing.assert_allclose(opt.state[0]["accumulator"], state["G"], **TOLERANCE)


def test_seed_rmsprop_is_keras_rmsprop() -> None:
    rho, eps = 0.9, 1e-3
    rates = varying_rates(0.01)
    theta, state = start(9), {}
    param = theta.copy()
    opt = fk.RMSprop(learning_rate=rates[0], rho=rho, epsilon=eps)
    for eta, g in zip(rates, gradients(10)):
        theta, state = reference.seed_rmsprop(theta, g, state, eta=eta, rho=rho, eps=eps)
        opt.learning_rate = eta
        opt.apply([g], [param])
        np.testing.assert_allclose(param, theta, **TOLERANCE)
    np.testing.assert_allclose(opt.state[0]["velocity"], state["E"], **TOLERANCE)


def run_seed_adam(
    alpha: float, beta1: float, beta2: float, eps: float, opt: Any, param: np.ndarray, apply: Any
) -> None:
    theta, state = param.copy(), {}
    for t, g in enumerate(gradients(12), start=1):
        theta, state = reference.seed_adam(
            theta, g, state, alpha=alpha, beta1=beta1, beta2=beta2, eps=eps
        )
        apply(opt, t, g)
        np.testing.assert_allclose(param, theta, **TOLERANCE)


def test_seed_adam_is_torch_adam() -> None:
    alpha, beta1, beta2, eps = 0.01, 0.9, 0.999, 1e-3
    param = start(11)
    opt = fusedopt.Adam([param], lr=alpha, betas=(beta1, beta2), eps=eps)
    run_seed_adam(alpha, beta1, beta2, eps, opt, param, lambda o, t, g: o.step([g]))


def test_seed_adam_is_keras_adam_only_with_a_per_step_epsilon_hat() -> None:
    """Spec section 7: Keras' epsilon sits next to the uncorrected root, so the seed's eps maps to
    epsilon_hat_t = eps * sqrt(1 - beta2^t), set before each step."""
    alpha, beta1, beta2, eps = 2.0**-7, 0.9, 0.999, 1e-3  # alpha exact in float32
    param = start(11)
    opt = fk.Adam(learning_rate=alpha, beta_1=beta1, beta_2=beta2, epsilon=eps)

    def apply(o: Any, t: int, g: np.ndarray) -> None:
        o.epsilon = eps * np.sqrt(1.0 - beta2**t)
        o.apply([g], [param])

    run_seed_adam(alpha, beta1, beta2, eps, opt, param, apply)
