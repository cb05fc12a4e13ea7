"""Reference implementations: the oracle of fusedopt's tests.

Every function here is written straight from the spec (``docs/spec.md``) in plain Python and
NumPy, in float64, one optimizer step (or one EWMA) at a time. It is meant to be read next to the
spec section its docstring cites, and it is slow on purpose: clarity over speed. Nothing here
imports the compiled fusedopt modules, so the oracle cannot share a bug with the kernels it checks.

Conventions of the step functions:

- ``p`` (parameter) and ``g`` (gradient) may have any float dtype; they are read as float64
  copies and never modified.
- ``state`` is a dict, ``{}`` on the very first step. It is never modified either: each function
  returns ``(new_param, new_state)`` with float64 arrays.
- Hyperparameters are keyword-only and are read on every call, so a trajectory may change the
  learning rate (or anything else) between steps, as the frameworks allow.
- PyTorch functions use ``torch.optim``'s state names (``"step"``, ``"momentum_buffer"``,
  ``"sum"``, ``"square_avg"``, ``"grad_avg"``, ``"exp_avg"``, ``"exp_avg_sq"``,
  ``"max_exp_avg_sq"``) and hold the same keys that ``torch.optim`` holds, plus ``"step"``
  everywhere. Keras functions use Keras' names (``"momentum"``, ``"accumulator"``,
  ``"velocity"``, ``"average_gradient"``, ``"velocity_hat"``) and always hold every slot; a slot
  Keras would not create stays zero. ``"step"`` counts the calls, this one included (for Keras it
  is ``iterations + 1`` of this call).
- Scalar states are Python floats in the state dict: torch's NAdam ``"mu_product"``, ASGD
  ``"eta"`` and ``"mu"`` (torch keeps them as 0-dim tensors of its default dtype, float32 even
  for float64 parameters; ``scalar_dtype`` chooses that rounding, spec section 13), and Keras
  Nadam's optimizer-wide ``"u_product"``, which the caller passes in each variable's state
  (spec section 16).
- Functions of algorithms added with spec sections 13-21 refuse the hyperparameters the
  framework's constructor refuses, with its ``ValueError`` message.
- Rprop's hyperparameters are named as torch's functional API names them (``etaminus``,
  ``etaplus``, ``step_size_min``, ``step_size_max``), as ``betas`` are ``beta1`` and ``beta2``.
- ``keras_lamb`` needs the whole variable in one call: its trust ratio uses per-tensor norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "ewma",
    "keras_adadelta",
    "keras_adagrad",
    "keras_adam",
    "keras_adamax",
    "keras_clip",
    "keras_lamb",
    "keras_lion",
    "keras_nadam",
    "keras_rmsprop",
    "keras_sgd",
    "seed_adagrad",
    "seed_adam",
    "seed_momentum",
    "seed_nesterov",
    "seed_rmsprop",
    "torch_adadelta",
    "torch_adagrad",
    "torch_adam",
    "torch_adamax",
    "torch_asgd",
    "torch_lion",
    "torch_nadam",
    "torch_radam",
    "torch_rmsprop",
    "torch_rprop",
    "torch_sgd",
]

Array = NDArray[np.float64]
State = dict[str, Any]
StepResult = tuple[Array, State]


def _float64(x: ArrayLike) -> Array:
    """A float64 copy of ``x``; the caller's buffer is never written."""
    return np.array(x, dtype=np.float64, copy=True)


def _copy_state(state: State) -> State:
    """A copy of ``state`` whose arrays are float64 copies."""
    return {
        key: _float64(value) if isinstance(value, np.ndarray) else value
        for key, value in state.items()
    }


def _slot(state: State, name: str, like: Array, initial_value: float = 0.0) -> Array:
    """A float64 copy of the state array ``name``, or a new one filled with ``initial_value``."""
    value = state.get(name)
    if value is None:
        return np.full_like(like, initial_value)
    return _float64(value)


def _next_step(state: State) -> int:
    return int(state.get("step", 0)) + 1


def _torch_lerp(start: Array, end: Array, weight: float) -> Array:
    # torch.lerp's two rounding branches; the optimizers use weights 1 - beta < 0.5.
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def _torch_gradient(g: ArrayLike, grad_scale: float | None, maximize: bool) -> Array:
    """The gradient as PyTorch's update sees it: unscaled first, then negated (spec section 8)."""
    grad = _float64(g)
    if grad_scale is not None:
        grad = grad / float(grad_scale)
    if maximize:
        grad = -grad
    return grad


# --------------------------------------------------------------------------------------------
# PyTorch convention (spec A.1, A.8, sections 1-8 and 13-20)
# --------------------------------------------------------------------------------------------


def torch_sgd(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: float | None = None,
) -> StepResult:
    """One step of ``torch.optim.SGD`` (spec sections 2-4; ``grad_scale`` as fused SGD, section 8).

    ``g <- g/grad_scale``; ``g <- -g`` if maximize; ``g <- g + wd*p`` (L2). With momentum, the first
    step sets ``buf = g`` (no dampening), later ``buf = mu*buf + (1 - dampening)*g``; nesterov uses
    ``g + mu*buf``, otherwise ``buf``. Then ``p <- p - lr*g``.
    """
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    param = _float64(p)
    grad = _torch_gradient(g, grad_scale, maximize)
    new_state = _copy_state(state)
    new_state["step"] = _next_step(state)
    if weight_decay != 0:
        grad = grad + weight_decay * param
    if momentum != 0:
        if new_state.get("momentum_buffer") is None:
            buffer = grad.copy()
        else:
            buffer = (
                _slot(new_state, "momentum_buffer", param) * momentum + (1.0 - dampening) * grad
            )
        new_state["momentum_buffer"] = buffer
        grad = grad + momentum * buffer if nesterov else buffer
    return param - lr * grad, new_state


def torch_adagrad(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
) -> StepResult:
    """One step of ``torch.optim.Adagrad`` (spec section 5).

    ``sum`` starts at ``initial_accumulator_value``; ``clr = lr/(1 + (step - 1)*lr_decay)``;
    ``sum <- sum + g*g``; ``p <- p - clr*g/(sqrt(sum) + eps)`` (eps outside the square root).
    """
    param = _float64(p)
    grad = _torch_gradient(g, None, maximize)
    new_state = _copy_state(state)
    step = _next_step(state)
    new_state["step"] = step
    if weight_decay != 0:
        grad = grad + weight_decay * param
    clr = lr / (1 + (step - 1) * lr_decay)
    square_sum = _slot(new_state, "sum", param, initial_accumulator_value) + grad * grad
    new_state["sum"] = square_sum
    return param - clr * (grad / (np.sqrt(square_sum) + eps)), new_state


def torch_rmsprop(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> StepResult:
    """One step of ``torch.optim.RMSprop`` (spec section 6).

    ``v <- alpha*v + (1 - alpha)*g*g``; centered: ``ga <- lerp(ga, g, 1 - alpha)`` and
    ``avg = sqrt(v - ga^2) + eps``, otherwise ``avg = sqrt(v) + eps`` (eps outside). With
    momentum: ``buf <- mu*buf + g/avg``, ``p <- p - lr*buf`` (lr outside the buffer); else
    ``p <- p - lr*g/avg``.
    """
    param = _float64(p)
    grad = _torch_gradient(g, None, maximize)
    new_state = _copy_state(state)
    new_state["step"] = _next_step(state)
    if weight_decay != 0:
        grad = grad + weight_decay * param
    square_avg = _slot(new_state, "square_avg", param) * alpha + (1.0 - alpha) * (grad * grad)
    new_state["square_avg"] = square_avg
    if centered:
        grad_avg = _torch_lerp(_slot(new_state, "grad_avg", param), grad, 1.0 - alpha)
        new_state["grad_avg"] = grad_avg
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if momentum > 0:
        buffer = _slot(new_state, "momentum_buffer", param) * momentum + grad / avg
        new_state["momentum_buffer"] = buffer
        return param - lr * buffer, new_state
    return param - lr * (grad / avg), new_state


def torch_adam(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    grad_scale: float | None = None,
) -> StepResult:
    """One step of ``torch.optim.Adam``; ``AdamW`` is ``decoupled_weight_decay=True`` (spec 7, 8).

    Decay: L2 ``g <- g + wd*p``, or decoupled ``p <- p*(1 - lr*wd)`` before the moments.
    ``m <- lerp(m, g, 1 - beta1)``; ``v <- beta2*v + (1 - beta2)*g*g``; AMSGrad keeps
    ``max_exp_avg_sq = max(max_exp_avg_sq, v)`` of the raw ``v`` and uses it in place of ``v``;
    ``bc_i = 1 - beta_i**step``; ``p <- p - (lr/bc1)*m/(sqrt(v)/sqrt(bc2) + eps)``.
    """
    param = _float64(p)
    grad = _torch_gradient(g, grad_scale, maximize)
    new_state = _copy_state(state)
    step = _next_step(state)
    new_state["step"] = step
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1.0 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = _torch_lerp(_slot(new_state, "exp_avg", param), grad, 1.0 - beta1)
    exp_avg_sq = _slot(new_state, "exp_avg_sq", param) * beta2 + (1.0 - beta2) * (grad * grad)
    new_state["exp_avg"] = exp_avg
    new_state["exp_avg_sq"] = exp_avg_sq
    second_moment = exp_avg_sq
    if amsgrad:
        second_moment = np.maximum(_slot(new_state, "max_exp_avg_sq", param), exp_avg_sq)
        new_state["max_exp_avg_sq"] = second_moment
    bias_correction1 = 1.0 - beta1 ** float(step)
    bias_correction2 = 1.0 - beta2 ** float(step)
    step_size = lr / bias_correction1
    denominator = np.sqrt(second_moment) / math.sqrt(bias_correction2) + eps
    return param - step_size * (exp_avg / denominator), new_state


def _check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``, as the frameworks' constructors do."""
    if not condition:
        raise ValueError(message)


def _check_torch_betas(beta1: float, beta2: float) -> None:
    # torch's "not 0.0 <= beta < 1.0" form: NaN is refused too (spec section 13).
    _check(0.0 <= beta1 < 1.0, f"Invalid beta parameter at index 0: {beta1}")
    _check(0.0 <= beta2 < 1.0, f"Invalid beta parameter at index 1: {beta2}")


def _torch_scalar(value: float, scalar_dtype: str) -> float:
    """A scalar state value stored as torch stores it: a float32 tensor unless the default
    dtype is float64 (``_get_scalar_dtype``, spec section 13)."""
    if scalar_dtype == "float32":
        return float(np.float32(value))
    if scalar_dtype == "float64":
        return float(value)
    raise ValueError(f"scalar_dtype must be 'float32' or 'float64', got {scalar_dtype!r}")


def torch_adadelta(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> StepResult:
    """One step of ``torch.optim.Adadelta`` (spec section 14).

    ``g <- g + wd*p`` (L2); ``square_avg <- rho*square_avg + (1 - rho)*g*g``;
    ``delta = sqrt(acc_delta + eps)/sqrt(square_avg + eps)*g``;
    ``acc_delta <- rho*acc_delta + (1 - rho)*delta*delta``; ``p <- p - lr*delta``.
    """
    _check(0.0 <= lr, f"Invalid learning rate: {lr}")
    _check(0.0 <= rho <= 1.0, f"Invalid rho value: {rho}")
    _check(0.0 <= eps, f"Invalid epsilon value: {eps}")
    _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
    param = _float64(p)
    grad = _torch_gradient(g, None, maximize)
    new_state = _copy_state(state)
    new_state["step"] = _next_step(state)
    if weight_decay != 0:
        grad = grad + weight_decay * param
    square_avg = _slot(new_state, "square_avg", param) * rho + (1.0 - rho) * grad * grad
    acc_delta = _slot(new_state, "acc_delta", param)
    delta = np.sqrt(acc_delta + eps) / np.sqrt(square_avg + eps) * grad
    acc_delta = acc_delta * rho + (1.0 - rho) * delta * delta
    new_state.update(square_avg=square_avg, acc_delta=acc_delta)
    return param - lr * delta, new_state


def torch_adamax(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> StepResult:
    """One step of ``torch.optim.Adamax`` (spec section 15).

    ``g <- g + wd*p`` (L2); ``exp_avg <- lerp(exp_avg, g, 1 - beta1)``;
    ``exp_inf <- max(beta2*exp_inf, |g| + eps)`` (eps inside the maximum);
    ``p <- p - (lr/(1 - beta1**step))*exp_avg/exp_inf``.
    """
    _check(0.0 <= lr, f"Invalid learning rate: {lr}")
    _check(0.0 <= eps, f"Invalid epsilon value: {eps}")
    _check_torch_betas(beta1, beta2)
    _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
    param = _float64(p)
    grad = _torch_gradient(g, None, maximize)
    new_state = _copy_state(state)
    step = _next_step(state)
    new_state["step"] = step
    if weight_decay != 0:
        grad = grad + weight_decay * param
    exp_avg = _torch_lerp(_slot(new_state, "exp_avg", param), grad, 1.0 - beta1)
    exp_inf = np.maximum(_slot(new_state, "exp_inf", param) * beta2, np.abs(grad) + eps)
    new_state.update(exp_avg=exp_avg, exp_inf=exp_inf)
    clr = lr / (1.0 - beta1 ** float(step))
    return param + (-clr * exp_avg) / exp_inf, new_state


def torch_nadam(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    scalar_dtype: str = "float32",
) -> StepResult:
    """One step of ``torch.optim.NAdam`` (spec section 16).

    Decay: L2 ``g <- g + wd*p``, or decoupled ``p <- p*(1 - lr*wd)``.
    ``mu = beta1*(1 - 0.5*0.96**(step*momentum_decay))``, ``mu_next`` the same at ``step + 1``;
    ``mu_product <- mu_product*mu`` (a per-parameter scalar starting at 1.0, kept as a Python
    float here: ``scalar_dtype="float32"`` rounds it as torch's default float32 scalar tensor
    does, ``"float64"`` is torch with ``torch.set_default_dtype(torch.float64)``);
    ``exp_avg <- lerp(exp_avg, g, 1 - beta1)``;
    ``exp_avg_sq <- beta2*exp_avg_sq + (1 - beta2)*g*g``;
    ``denom = sqrt(exp_avg_sq/(1 - beta2**step)) + eps``; then two updates,
    ``p <- p + (-lr*(1 - mu)/(1 - mu_product))*g/denom`` and
    ``p <- p + (-lr*mu_next/(1 - mu_product*mu_next))*exp_avg/denom``.
    """
    _check(0.0 <= lr, f"Invalid learning rate: {lr}")
    _check(0.0 <= eps, f"Invalid epsilon value: {eps}")
    _check_torch_betas(beta1, beta2)
    _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
    _check(0.0 <= momentum_decay, f"Invalid momentum_decay value: {momentum_decay}")
    param = _float64(p)
    grad = _torch_gradient(g, None, maximize)
    new_state = _copy_state(state)
    step = _next_step(state)
    new_state["step"] = step
    bias_correction2 = 1.0 - beta2 ** float(step)
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1.0 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    mu_product = float(new_state.get("mu_product", 1.0))
    if scalar_dtype == "float32":
        # A float32 tensor times a Python float: both rounded to float32, then the product.
        mu_product = float(np.float32(mu_product) * np.float32(mu))
    else:
        mu_product = _torch_scalar(mu_product * mu, scalar_dtype)
    new_state["mu_product"] = mu_product
    exp_avg = _torch_lerp(_slot(new_state, "exp_avg", param), grad, 1.0 - beta1)
    exp_avg_sq = _slot(new_state, "exp_avg_sq", param) * beta2 + (1.0 - beta2) * grad * grad
    new_state.update(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    denominator = np.sqrt(exp_avg_sq / bias_correction2) + eps
    mu_product_next = mu_product * mu_next
    param = param + (-lr * (1.0 - mu) / (1.0 - mu_product)) * grad / denominator
    param = param + ((-lr * mu_next) / (1.0 - mu_product_next)) * exp_avg / denominator
    return param, new_state


def torch_radam(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> StepResult:
    """One step of ``torch.optim.RAdam`` (spec section 17).

    Decay as NAdam; moments as Adam; ``m_hat = exp_avg/(1 - beta1**step)``;
    ``rho_inf = 2/(1 - beta2) - 1``, ``rho_t = rho_inf - 2*step*beta2**step/(1 - beta2**step)``.
    If ``rho_t > 5``: ``p <- p - m_hat*lr*adaptive*rect`` with
    ``adaptive = sqrt(1 - beta2**step)/(sqrt(exp_avg_sq) + eps)`` (eps next to the uncorrected
    root) and ``rect = sqrt((rho_t - 4)(rho_t - 2)rho_inf/((rho_inf - 4)(rho_inf - 2)rho_t))``;
    otherwise ``p <- p - m_hat*lr`` (no second moment, no eps).
    """
    _check(0.0 <= lr, f"Invalid learning rate: {lr}")
    _check(0.0 <= eps, f"Invalid epsilon value: {eps}")
    _check_torch_betas(beta1, beta2)
    _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
    param = _float64(p)
    grad = _torch_gradient(g, None, maximize)
    new_state = _copy_state(state)
    step = _next_step(state)
    new_state["step"] = step
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1.0 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = _torch_lerp(_slot(new_state, "exp_avg", param), grad, 1.0 - beta1)
    exp_avg_sq = _slot(new_state, "exp_avg_sq", param) * beta2 + (1.0 - beta2) * grad * grad
    new_state.update(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    bias_correction1 = 1.0 - beta1 ** float(step)
    bias_correction2 = 1.0 - beta2 ** float(step)
    bias_corrected_exp_avg = exp_avg / bias_correction1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** float(step)) / bias_correction2
    if rho_t > 5.0:
        rect = (
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        ) ** 0.5
        adaptive_lr = (bias_correction2**0.5) / (np.sqrt(exp_avg_sq) + eps)
        return param - bias_corrected_exp_avg * lr * adaptive_lr * rect, new_state
    return param - bias_corrected_exp_avg * lr, new_state


def torch_rprop(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    etaminus: float = 0.5,
    etaplus: float = 1.2,
    step_size_min: float = 1e-6,
    step_size_max: float = 50.0,
    maximize: bool = False,
) -> StepResult:
    """One step of ``torch.optim.Rprop``; ``etas = (etaminus, etaplus)``,
    ``step_sizes = (step_size_min, step_size_max)`` (spec section 18).

    ``lr`` is read only on the first step, to fill ``step_size``. ``s = sign(g*prev)``;
    factor ``etaplus`` where ``s > 0``, ``etaminus`` where ``s < 0``, 1 where ``s == 0``;
    ``step_size <- min(max(step_size*factor, step_size_min), step_size_max)``; ``g <- 0`` where
    the factor is ``etaminus``; ``p <- p - sign(g)*step_size``; ``prev <- g``. ``sign`` is
    torch's, 0 for NaN (pytorch/pytorch#41245): a NaN product takes the factor 1, and a NaN
    gradient leaves the param where it is (and becomes prev).
    """
    _check(0.0 <= lr, f"Invalid learning rate: {lr}")
    _check(0.0 < etaminus < 1.0 < etaplus, f"Invalid eta values: {etaminus}, {etaplus}")
    param = _float64(p)
    grad = _torch_gradient(g, None, maximize)
    new_state = _copy_state(state)
    new_state["step"] = _next_step(state)
    prev = _slot(new_state, "prev", param)
    step_size = _slot(new_state, "step_size", param, lr)
    sign = _torch_sign(grad * prev)  # the sign of the rounded product: an underflow counts as 0
    # np.where, not item assignment: a 0-d param's sign is a NumPy scalar.
    factor = np.where(sign > 0, etaplus, np.where(sign < 0, etaminus, 1.0))
    step_size = np.minimum(np.maximum(step_size * factor, step_size_min), step_size_max)
    grad = np.where(factor == etaminus, 0.0, grad)
    new_state.update(prev=grad, step_size=step_size)
    return param - _torch_sign(grad) * step_size, new_state


def _torch_sign(x: np.ndarray) -> np.ndarray:
    """torch.sign: NumPy's, but 0 for NaN (pytorch/pytorch#41245)."""
    return np.where(x > 0, 1.0, np.where(x < 0, -1.0, 0.0))


def torch_asgd(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
    maximize: bool = False,
    scalar_dtype: str = "float32",
) -> StepResult:
    """One step of ``torch.optim.ASGD`` (spec section 19).

    The step uses the ``eta`` and ``mu`` stored by the previous step (first step: ``eta = lr``,
    ``mu = 1``): ``g <- g + wd*p``; ``p <- p*(1 - lambd*eta)``; ``p <- p - eta*g``; ``ax <- p``
    if ``mu == 1``, else ``ax <- ax + (p - ax)*mu``. Only then, from this step's ``lr``:
    ``eta <- lr/(1 + lambd*lr*step)**alpha`` and ``mu <- 1/max(1, step - t0)``. ``eta`` and
    ``mu`` are Python floats here, rounded as ``scalar_dtype`` (torch's default: float32).
    """
    _check(0.0 <= lr, f"Invalid learning rate: {lr}")
    _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
    param = _float64(p)
    grad = _torch_gradient(g, None, maximize)
    new_state = _copy_state(state)
    step = _next_step(state)
    new_state["step"] = step
    eta = float(new_state["eta"]) if "eta" in new_state else _torch_scalar(lr, scalar_dtype)
    mu = float(new_state.get("mu", 1.0))
    if weight_decay != 0:
        grad = grad + weight_decay * param
    param = param * (1.0 - lambd * eta)
    param = param - eta * grad
    if mu != 1:
        ax = _slot(new_state, "ax", param)
        ax = ax + (param - ax) * mu
    else:
        ax = param.copy()
    new_state["ax"] = ax
    new_state["eta"] = _torch_scalar(lr / ((1 + lambd * lr * step) ** alpha), scalar_dtype)
    new_state["mu"] = _torch_scalar(1 / max(1, step - t0), scalar_dtype)
    return param, new_state


def torch_lion(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> StepResult:
    """One step of Lion in fusedopt's PyTorch convention (spec section 20, A.8).

    ``torch.optim`` has no Lion; this is lion-pytorch's update with torch's lerp rounding:
    ``p <- p*(1 - lr*wd)`` (decoupled); ``p <- p - lr*sign(lerp(exp_avg, g, 1 - beta1))``;
    ``exp_avg <- lerp(exp_avg, g, 1 - beta2)``. ``maximize`` negates ``g`` first.
    """
    _check(0.0 <= lr, f"Invalid learning rate: {lr}")
    _check(0.0 <= beta1 <= 1.0, f"Invalid beta parameter at index 0: {beta1}")
    _check(0.0 <= beta2 <= 1.0, f"Invalid beta parameter at index 1: {beta2}")
    _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
    param = _float64(p)
    grad = _torch_gradient(g, None, maximize)
    new_state = _copy_state(state)
    new_state["step"] = _next_step(state)
    if weight_decay != 0:
        param = param * (1.0 - lr * weight_decay)
    exp_avg = _slot(new_state, "exp_avg", param)
    update = _torch_sign(_torch_lerp(exp_avg, grad, 1.0 - beta1))
    new_state["exp_avg"] = _torch_lerp(exp_avg, grad, 1.0 - beta2)
    return param - lr * update, new_state


# --------------------------------------------------------------------------------------------
# Keras 3 convention (spec A.2, A.8, sections 1-7 and 13-21)
# --------------------------------------------------------------------------------------------


def _keras_float(x: float) -> float:
    """A Python number as Keras' torch backend holds it under its default floatx: a float32
    tensor (spec section 1)."""
    return float(np.float32(x))


def _keras_weight_decay(param: Array, weight_decay: float | None, learning_rate: float) -> Array:
    """Keras' decoupled, lr-scaled decay before every ``update_step`` (spec section 1). The
    factor is computed in floatx (float32) from the float32 learning-rate variable, whatever the
    variable's dtype: ``fl32(1 - fl32(lr * fl32(weight_decay)))``."""
    if not weight_decay:
        return param
    factor = np.float32(1.0) - np.float32(learning_rate) * np.float32(weight_decay)
    return param * float(factor)


def keras_clip(
    grads: list[ArrayLike],
    *,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
) -> list[Array]:
    """Keras gradient clipping, pipeline step 5 of spec section 1; returns new float64 arrays.

    At most one option may be set; ``None`` or ``0`` is off. ``clipnorm = c`` per tensor:
    ``g*c/max(||g||, c)``; ``global_clipnorm = c``: ``g * c*min(1/N, 1/c) + (N - N)`` with ``N``
    the norm of all tensors together (NaN everywhere if ``N`` is not finite); ``clipvalue = c``:
    ``clip(g, -c, c)``.
    """
    if sum(option is not None for option in (clipnorm, clipvalue, global_clipnorm)) > 1:
        raise ValueError("Only one of clipnorm, clipvalue and global_clipnorm can be set")
    grads64 = [_float64(g) for g in grads]
    if clipnorm:
        return [g * clipnorm / max(math.sqrt(np.sum(g * g)), clipnorm) for g in grads64]
    if global_clipnorm:
        squared_norm = sum(np.sum(g * g) for g in grads64)
        norm = np.sqrt(np.float64(squared_norm))
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = global_clipnorm * np.minimum(1.0 / norm, 1.0 / global_clipnorm)
            scale = scale + (norm - norm)
        return [g * scale for g in grads64]
    if clipvalue:
        return [np.clip(g, -clipvalue, clipvalue) for g in grads64]
    return grads64


def keras_sgd(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    learning_rate: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float | None = None,
) -> StepResult:
    """One step of ``keras.optimizers.SGD`` (spec sections 2, 3, 4).

    ``V <- mu*V - lr*g``; ``p <- p + V``, or with nesterov ``p <- p + mu*V - lr*g`` with the new
    ``V``. Without momentum, ``p <- p - lr*g`` and ``"momentum"`` stays zero.
    """
    param = _keras_weight_decay(_float64(p), weight_decay, learning_rate)
    grad = _float64(g)
    new_state = _copy_state(state)
    new_state["step"] = _next_step(state)
    velocity = _slot(new_state, "momentum", param)
    if momentum != 0:
        velocity = momentum * velocity - learning_rate * grad
        param = param + (momentum * velocity - learning_rate * grad if nesterov else velocity)
    else:
        param = param - learning_rate * grad
    new_state["momentum"] = velocity
    return param, new_state


def keras_adagrad(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    learning_rate: float,
    initial_accumulator_value: float = 0.1,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
) -> StepResult:
    """One step of ``keras.optimizers.Adagrad`` (spec section 5).

    The accumulator starts at ``initial_accumulator_value``; ``acc <- acc + g^2``;
    ``p <- p - lr*g/sqrt(acc + epsilon)`` (epsilon inside the square root).
    """
    param = _keras_weight_decay(_float64(p), weight_decay, learning_rate)
    grad = _float64(g)
    new_state = _copy_state(state)
    new_state["step"] = _next_step(state)
    accumulator = _slot(new_state, "accumulator", param, initial_accumulator_value) + grad * grad
    new_state["accumulator"] = accumulator
    return param - learning_rate * grad / np.sqrt(accumulator + epsilon), new_state


def keras_rmsprop(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    learning_rate: float,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-7,
    centered: bool = False,
    weight_decay: float | None = None,
    variable_dtype: Any = None,
) -> StepResult:
    """One step of ``keras.optimizers.RMSprop`` (spec section 6); ``variable_dtype``: the
    variable's dtype where ``p`` is given in another (a float64 copy), by default ``p``'s.

    ``ms <- rho*ms + (1 - rho)*g^2``; centered: ``mg <- rho*mg + (1 - rho)*g`` and
    ``D = (ms + epsilon) - mg^2`` (the torch backend's order, in the variable's dtype), otherwise
    ``D = ms + epsilon``; ``inc = lr*g/sqrt(D)``. With momentum: ``mom <- mu*mom + inc`` and
    ``p <- p - mom`` (lr inside the buffer); else ``p <- p - inc``.
    """
    param = _keras_weight_decay(_float64(p), weight_decay, learning_rate)
    grad = _float64(g)
    new_state = _copy_state(state)
    new_state["step"] = _next_step(state)
    velocity = rho * _slot(new_state, "velocity", param) + (1.0 - rho) * (grad * grad)
    average_gradient = _slot(new_state, "average_gradient", param)
    if centered:
        average_gradient = rho * average_gradient + (1.0 - rho) * grad
        # In the variable's float dtype, as Keras' step (float32 for 16-bit storage, fusedopt's
        # math): where ms and mg^2 agree (a steady grad, rho = 0), this is their roundings'
        # difference, 0 in float32 where float64 would still hold epsilon.
        variable_dtype = np.asarray(p).dtype if variable_dtype is None else variable_dtype
        dtype = np.float64 if np.dtype(variable_dtype) == np.float64 else np.float32
        square = average_gradient.astype(dtype) * average_gradient.astype(dtype)
        denominator = ((velocity.astype(dtype) + dtype(epsilon)) - square).astype(np.float64)
    else:
        denominator = velocity + epsilon
    increment = learning_rate * grad / np.sqrt(denominator)
    momentum_buffer = _slot(new_state, "momentum", param)
    if momentum > 0:
        momentum_buffer = momentum * momentum_buffer + increment
        param = param - momentum_buffer
    else:
        param = param - increment
    new_state.update(velocity=velocity, momentum=momentum_buffer, average_gradient=average_gradient)
    return param, new_state


def keras_adam(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    learning_rate: float,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    weight_decay: float | None = None,
) -> StepResult:
    """One step of ``keras.optimizers.Adam``; ``AdamW`` is this with ``weight_decay`` (spec 7).

    ``t = step``; ``alpha_t = lr*sqrt(1 - beta_2^t)/(1 - beta_1^t)``;
    ``m <- beta_1*m + (1 - beta_1)*g``; ``v <- beta_2*v + (1 - beta_2)*g^2`` (Keras' torch
    backend; its generic ``v + (g^2 - v)(1 - beta_2)`` differs by rounding, and by NaN where
    ``g^2`` overflows); AMSGrad:
    ``v_hat <- max(v_hat, v)`` of the raw ``v``, used in place of ``v``;
    ``p <- p - m*alpha_t/(sqrt(v) + epsilon)`` (epsilon is Keras' epsilon-hat).
    """
    param = _keras_weight_decay(_float64(p), weight_decay, learning_rate)
    grad = _float64(g)
    new_state = _copy_state(state)
    step = _next_step(state)
    new_state["step"] = step
    alpha_t = learning_rate * math.sqrt(1.0 - beta_2**step) / (1.0 - beta_1**step)
    m = _slot(new_state, "momentum", param)
    m = m * beta_1 + (1.0 - beta_1) * grad
    v = _slot(new_state, "velocity", param)
    v = v * beta_2 + (1.0 - beta_2) * (grad * grad)
    v_hat = _slot(new_state, "velocity_hat", param)
    if amsgrad:
        v_hat = np.maximum(v_hat, v)
    new_state.update(momentum=m, velocity=v, velocity_hat=v_hat)
    second_moment = v_hat if amsgrad else v
    return param - m * alpha_t / (np.sqrt(second_moment) + epsilon), new_state


def keras_adadelta(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    learning_rate: float,
    rho: float = 0.95,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
) -> StepResult:
    """One step of ``keras.optimizers.Adadelta`` on the torch backend (spec section 14).

    ``acc_g <- rho*acc_g + (1 - rho)*g^2``;
    ``delta = -sqrt(acc_d + epsilon)*g/sqrt(acc_g + epsilon)``;
    ``acc_d <- rho*acc_d + (1 - rho)*delta^2``; ``p <- p + lr*delta``.
    """
    param = _keras_weight_decay(_float64(p), weight_decay, learning_rate)
    grad = _float64(g)
    new_state = _copy_state(state)
    new_state["step"] = _next_step(state)
    accumulated_grad = _slot(new_state, "accumulated_grad", param) * rho + (1.0 - rho) * (
        grad * grad
    )
    accumulated_delta_var = _slot(new_state, "accumulated_delta_var", param)
    delta_var = -(
        (np.sqrt(accumulated_delta_var + epsilon) * grad) / np.sqrt(accumulated_grad + epsilon)
    )
    accumulated_delta_var = accumulated_delta_var * rho + (1.0 - rho) * (delta_var * delta_var)
    new_state.update(accumulated_grad=accumulated_grad, accumulated_delta_var=accumulated_delta_var)
    return param + learning_rate * delta_var, new_state


def keras_adamax(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    learning_rate: float,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
) -> StepResult:
    """One step of ``keras.optimizers.Adamax`` on the torch backend (spec section 15).

    ``m <- beta_1*m + (1 - beta_1)*g``; ``u <- max(beta_2*u, |g|)``;
    ``p <- p - (m*lr)/((u + epsilon)*(1 - beta_1^t))`` (epsilon outside the maximum).
    """
    param = _keras_weight_decay(_float64(p), weight_decay, learning_rate)
    grad = _float64(g)
    new_state = _copy_state(state)
    step = _next_step(state)
    new_state["step"] = step
    m = _slot(new_state, "momentum", param) * beta_1 + (1.0 - beta_1) * grad
    u = np.maximum(_slot(new_state, "norm", param) * beta_2, np.abs(grad))
    new_state.update(momentum=m, norm=u)
    beta_1_power = beta_1 ** float(step)
    return param - (m * learning_rate) / ((u + epsilon) * (1.0 - beta_1_power)), new_state


def keras_nadam(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    learning_rate: float,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
) -> StepResult:
    """One step of ``keras.optimizers.Nadam`` on the torch backend (spec section 16).

    ``state["u_product"]`` is Keras' optimizer-wide ``_u_product`` before this ``apply`` (1.0
    when absent); the returned state holds its value after. Keras updates it once per
    ``apply``, not once per variable: when several variables are stepped in one ``apply``, give
    each call the same value from before the ``apply`` (they all return the same new value).
    ``u_t = beta_1*(1 - 0.5*0.96^t)``, ``u_t1`` the same at ``t + 1`` (no momentum_decay);
    ``u_product <- u_product*u_t``; ``m <- beta_1*m + (1 - beta_1)*g``;
    ``v <- beta_2*v + (1 - beta_2)*g^2``;
    ``m_hat = m*u_t1/(1 - u_product*u_t1) + g*(1 - u_t)/(1 - u_product)``;
    ``p <- p - m_hat*lr/(sqrt(v/(1 - beta_2^t)) + epsilon)``.
    """
    param = _keras_weight_decay(_float64(p), weight_decay, learning_rate)
    grad = _float64(g)
    new_state = _copy_state(state)
    step = _next_step(state)
    new_state["step"] = step
    u_t = beta_1 * (1.0 - 0.5 * 0.96 ** float(step))
    u_t_1 = beta_1 * (1.0 - 0.5 * 0.96 ** float(step + 1))
    u_product_t = float(new_state.get("u_product", 1.0)) * u_t
    u_product_t_1 = u_product_t * u_t_1
    new_state["u_product"] = u_product_t
    m = _slot(new_state, "momentum", param) * beta_1 + (1.0 - beta_1) * grad
    v = _slot(new_state, "velocity", param) * beta_2 + (1.0 - beta_2) * (grad * grad)
    new_state.update(momentum=m, velocity=v)
    m_hat = (m * u_t_1) / (1.0 - u_product_t_1) + (grad * (1.0 - u_t)) / (1.0 - u_product_t)
    v_hat = v / (1.0 - beta_2 ** float(step))
    return param - (m_hat * learning_rate) / (np.sqrt(v_hat) + epsilon), new_state


def keras_lion(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    learning_rate: float,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    weight_decay: float | None = None,
) -> StepResult:
    """One step of ``keras.optimizers.Lion`` on the torch backend (spec section 20).

    ``p <- p - lr*sign(beta_1*m + (1 - beta_1)*g)``; ``m <- beta_2*m + (1 - beta_2)*g``.
    Keras refuses ``beta_1`` outside ``(0, 1]``.
    """
    _check(
        not (beta_1 <= 0 or beta_1 > 1),
        "Argument `beta_1` must be in the [0, 1] range. Otherwise, the optimizer degenerates "
        f"to SignSGD. Received: beta_1={beta_1}.",
    )
    param = _keras_weight_decay(_float64(p), weight_decay, learning_rate)
    grad = _float64(g)
    new_state = _copy_state(state)
    new_state["step"] = _next_step(state)
    m = _slot(new_state, "momentum", param)
    update = _torch_sign(m * beta_1 + (1.0 - beta_1) * grad)
    new_state["momentum"] = m * beta_2 + (1.0 - beta_2) * grad
    return param - update * learning_rate, new_state


def keras_lamb(
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    learning_rate: float,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
) -> StepResult:
    """One step of ``keras.optimizers.Lamb`` (spec section 21); ``p`` is one whole variable.

    ``m <- m + (g - m)(1 - beta_1)``; ``v <- v + (g^2 - v)(1 - beta_2)``;
    ``update = (m/(1 - beta_1^t))/(sqrt(v/(1 - beta_2^t)) + epsilon)``;
    ``ratio = ||p||/||update||`` (``p`` after the weight decay), or 1 unless both norms are
    > 0; ``p <- p - ratio*lr*update``.
    """
    param = _keras_weight_decay(_float64(p), weight_decay, learning_rate)
    grad = _float64(g)
    new_state = _copy_state(state)
    step = _next_step(state)
    new_state["step"] = step
    m = _slot(new_state, "momentum", param)
    # The generic update_step hands these Python numbers to keras.ops: float32 tensors.
    m = m + (grad - m) * _keras_float(1.0 - beta_1)
    v = _slot(new_state, "velocity", param)
    v = v + (grad * grad - v) * _keras_float(1.0 - beta_2)
    new_state.update(momentum=m, velocity=v)
    m_t_hat = m / (1.0 - beta_1 ** float(step))
    v_sqrt = np.sqrt(v / (1.0 - beta_2 ** float(step))) + _keras_float(epsilon)
    update = m_t_hat / v_sqrt
    w_norm = math.sqrt(np.sum(param * param))
    g_norm = math.sqrt(np.sum(update * update))
    ratio = w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
    return param - ratio * learning_rate * update, new_state


# --------------------------------------------------------------------------------------------
# EWMA, pandas convention (spec A.5, section 9)
# --------------------------------------------------------------------------------------------


def _pandas_center_of_mass(
    com: float | None, span: float | None, halflife: float | None, alpha: float | None
) -> float:
    """pandas' ``get_center_of_mass``: exactly one decay parameter, converted to a com."""
    given = sum(value is not None for value in (com, span, halflife, alpha))
    if given > 1:
        raise ValueError("com, span, halflife, and alpha are mutually exclusive")
    if com is not None:
        if com < 0:
            raise ValueError("com must satisfy: com >= 0")
        return float(com)
    if span is not None:
        if span < 1:
            raise ValueError("span must satisfy: span >= 1")
        return float((span - 1) / 2)
    if halflife is not None:
        if halflife <= 0:
            raise ValueError("halflife must satisfy: halflife > 0")
        # np.exp and np.log, as pandas, so that the com is bit-identical.
        decay = 1 - np.exp(np.log(0.5) / halflife)
        return float(1 / decay - 1)
    if alpha is not None:
        if alpha <= 0 or alpha > 1:
            raise ValueError("alpha must satisfy: 0 < alpha <= 1")
        return float((1 - alpha) / alpha)
    raise ValueError("Must pass one of com, span, halflife, or alpha")


def _ewma_series(
    values: Array, center_of_mass: float, adjust: bool, ignore_na: bool, min_periods: int
) -> Array:
    """The loop of spec section 9 over one series, in Python floats (IEEE double, no FMA)."""
    result = np.empty(len(values), dtype=np.float64)
    if len(values) == 0:
        return result
    alpha = 1.0 / (1.0 + center_of_mass)  # the round trip through com is part of pandas' result
    old_weight_factor = 1.0 - alpha
    new_weight = 1.0 if adjust else alpha
    weighted = float(values[0])
    observations = int(not math.isnan(weighted))
    result[0] = weighted if observations >= min_periods else math.nan
    old_weight = 1.0
    for i in range(1, len(values)):
        current = float(values[i])
        is_observation = not math.isnan(current)
        observations += is_observation
        if not math.isnan(weighted):
            if is_observation or not ignore_na:
                old_weight *= old_weight_factor
                if is_observation:
                    # Skipping equal values keeps constant series exact, as pandas does. At
                    # com == 1 with adjust=False, pandas >= 3 uses new_weight = 1 - old_weight
                    # here; fusedopt keeps the pandas 2 rule (spec A.5).
                    if weighted != current:
                        weighted = (old_weight * weighted + new_weight * current) / (
                            old_weight + new_weight
                        )
                    old_weight = old_weight + new_weight if adjust else 1.0
        elif is_observation:
            weighted = current
        result[i] = weighted if observations >= min_periods else math.nan
    return result


def ewma(
    x: ArrayLike,
    *,
    com: float | None = None,
    span: float | None = None,
    halflife: float | None = None,
    alpha: float | None = None,
    adjust: bool = True,
    ignore_na: bool = False,
    min_periods: int | None = 0,
    axis: int = 0,
) -> Array:
    """pandas ``ewm(...).mean()`` on a 1-D series or along ``axis`` of a 2-D array (spec 9, A.5).

    Exactly one of ``com >= 0``, ``span >= 1``, ``halflife > 0``, ``0 < alpha <= 1``; it becomes
    a center of mass and then ``alpha' = 1/(1 + com)``, as pandas does, so results are
    bit-identical to pandas. ``min_periods`` acts as ``max(min_periods, 1)``. ``axis=0`` treats
    each column as a series (``DataFrame.ewm``), ``axis=1`` each row. At com == 1 with
    ``adjust=False`` and NaN gaps this is the pandas 2 result, not pandas 3's.
    """
    center_of_mass = _pandas_center_of_mass(com, span, halflife, alpha)
    if min_periods is None:
        min_periods = 0
    if int(min_periods) != min_periods or min_periods < 0:
        raise ValueError("min_periods must be an integer >= 0")
    min_periods = max(int(min_periods), 1)
    values = _float64(x)
    # pandas' window code (BaseWindow._prep_values) reads +-inf as missing, like NaN.
    values = np.where(np.isinf(values), np.nan, values)
    if values.ndim not in (1, 2):
        raise ValueError(f"ewma takes a 1-D or 2-D array, got {values.ndim} dimensions")
    if not -values.ndim <= axis < values.ndim:
        raise ValueError(f"axis {axis} is out of range for a {values.ndim}-D array")
    if values.ndim == 1:
        return _ewma_series(values, center_of_mass, adjust, ignore_na, min_periods)
    series_last = np.moveaxis(values, axis, -1)
    result = np.empty_like(series_last)
    for row, series in enumerate(series_last):
        result[row] = _ewma_series(series, center_of_mass, adjust, ignore_na, min_periods)
    return np.ascontiguousarray(np.moveaxis(result, -1, axis))


# --------------------------------------------------------------------------------------------
# The seed document's textbook formulas (spec A.3, section 10), literally
# --------------------------------------------------------------------------------------------


def seed_momentum(
    theta: ArrayLike, g: ArrayLike, state: State, *, alpha: float, beta: float
) -> StepResult:
    """Seed momentum (spec sections 3, 10).

    ``v <- beta*v + (1 - beta)*g``; ``theta -= alpha*v``; v0 = 0.
    """
    params = _float64(theta)
    new_state = _copy_state(state)
    v = beta * _slot(new_state, "v", params) + (1.0 - beta) * _float64(g)
    new_state["v"] = v
    return params - alpha * v, new_state


def seed_nesterov(
    theta: ArrayLike,
    grad_fn: Callable[[Array], ArrayLike],
    state: State,
    *,
    eta: float,
    gamma: float,
) -> StepResult:
    """Seed NAG, lookahead form (spec sections 4, 10).

    ``theta_tilde = theta - gamma*v``; ``v <- gamma*v + eta*grad_fn(theta_tilde)``;
    ``theta -= v``; v0 = 0. ``grad_fn`` maps a float64 array to its gradient.
    """
    params = _float64(theta)
    new_state = _copy_state(state)
    v = _slot(new_state, "v", params)
    lookahead = params - gamma * v
    v = gamma * v + eta * _float64(grad_fn(lookahead))
    new_state["v"] = v
    return params - v, new_state


def seed_adagrad(
    theta: ArrayLike, g: ArrayLike, state: State, *, eta: float, eps: float
) -> StepResult:
    """Seed Adagrad (spec sections 5, 10): ``G += g*g``; ``theta -= eta*g/sqrt(G + eps)``."""
    params = _float64(theta)
    grad = _float64(g)
    new_state = _copy_state(state)
    accumulated = _slot(new_state, "G", params) + grad * grad
    new_state["G"] = accumulated
    return params - eta * grad / np.sqrt(accumulated + eps), new_state


def seed_rmsprop(
    theta: ArrayLike, g: ArrayLike, state: State, *, eta: float, rho: float, eps: float
) -> StepResult:
    """Seed RMSprop (spec sections 6, 10).

    ``E <- rho*E + (1 - rho)*g*g``; ``theta -= eta*g/sqrt(E + eps)``; E0 = 0.
    """
    params = _float64(theta)
    grad = _float64(g)
    new_state = _copy_state(state)
    mean_square = rho * _slot(new_state, "E", params) + (1.0 - rho) * grad * grad
    new_state["E"] = mean_square
    return params - eta * grad / np.sqrt(mean_square + eps), new_state


def seed_adam(
    theta: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    alpha: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> StepResult:
    """Seed Adam, Algorithm 1 of Kingma & Ba (spec sections 7, 10).

    ``t += 1``; ``m <- beta1*m + (1 - beta1)*g``; ``v <- beta2*v + (1 - beta2)*g^2``;
    ``m_hat = m/(1 - beta1^t)``; ``v_hat = v/(1 - beta2^t)``;
    ``theta -= alpha*m_hat/(sqrt(v_hat) + eps)``.
    """
    params = _float64(theta)
    grad = _float64(g)
    new_state = _copy_state(state)
    t = int(new_state.get("t", 0)) + 1
    m = beta1 * _slot(new_state, "m", params) + (1.0 - beta1) * grad
    v = beta2 * _slot(new_state, "v", params) + (1.0 - beta2) * grad * grad
    new_state.update(t=t, m=m, v=v)
    m_hat = m / (1.0 - beta1**t)
    v_hat = v / (1.0 - beta2**t)
    return params - alpha * m_hat / (np.sqrt(v_hat) + eps), new_state


# --------------------------------------------------------------------------------------------
# Low precision (spec section 22): 16-bit storage, float32 math, two rounding rules
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finalizer, on Python ints."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix32(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """Wellons' lowbias32, on uint32 values held in uint64 (so products do not overflow)."""
    mask = np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & mask
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & mask
    return x ^ (x >> np.uint64(16))


def rounding_bits(seed: int, step: int, role: int, size: int) -> NDArray[np.uint64]:
    """The 32 random bits of stochastic rounding for elements 0..size-1 of a tensor: keyed by
    (seed, step, role), role 0 for the param and 1 + k for state k, indexed by position."""
    key = _mix64(seed ^ _mix64(step & _MASK64))
    role_key = _mix64((key + role) & _MASK64)
    index = np.arange(size, dtype=np.uint64)
    low = index & np.uint64(0xFFFFFFFF)
    high = _mix32((np.uint64(role_key >> 32) ^ (index >> np.uint64(32))) & np.uint64(0xFFFFFFFF))
    weyl = (low * np.uint64(0x9E3779B9)) & np.uint64(0xFFFFFFFF)
    return _mix32(((weyl ^ np.uint64(role_key & 0xFFFFFFFF)) + high) & np.uint64(0xFFFFFFFF))


def _sixteen_bit_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def round_nearest(x: ArrayLike, dtype: str) -> Array:
    """x as the kernels store it: float32 math, then rounded to nearest (ties to even) to
    ``dtype``; returned as float64 values."""
    single = np.asarray(x, dtype=np.float64).astype(np.float32)
    if dtype == "float32":
        return single.astype(np.float64)
    return single.astype(_sixteen_bit_dtype(dtype)).astype(np.float64)


def round_stochastic(x: ArrayLike, dtype: str, bits: NDArray[np.uint64]) -> Array:
    """x (float32 math) rounded stochastically to ``dtype`` with these 32-bit random numbers:
    written from the definition, in float64, not from the kernels' bit tricks. The lower
    neighbour is |x| truncated to ``dtype``, the upper one a unit in its last place (ulp) above;
    the discarded fraction of an ulp, exactly a multiple of 2^-k (k = 16 for bfloat16, 13 for
    float16 normals, 14-31 for float16 subnormals), plus k random bits carries to the upper one,
    so E[result] = x. Float16 magnitudes below 2^-32 give zero (k would exceed 31); past the
    largest finite value the upper neighbour is infinity.
    """
    single = np.asarray(x, dtype=np.float64).astype(np.float32).ravel().astype(np.float64)
    largest = float(np.finfo(_sixteen_bit_dtype(dtype)).max)
    out = np.empty(single.size, dtype=np.float64)
    for i, value in enumerate(single):
        magnitude = abs(value)
        if not math.isfinite(value) or magnitude == 0:
            out[i] = value
            continue
        exponent = math.frexp(magnitude)[1] - 1  # magnitude in [2^exponent, 2^(exponent + 1))
        if dtype == "bfloat16":
            ulp, k = 2.0 ** (max(exponent, -126) - 7), 16
        elif magnitude >= 2.0**-14:
            ulp, k = 2.0 ** (exponent - 10), 13
        else:
            ulp, k = 2.0**-24, -exponent - 1
            if k > 31:
                out[i] = math.copysign(0.0, value)
                continue
        lower = math.floor(magnitude / ulp) * ulp
        discarded = round((magnitude - lower) / ulp * 2**k)  # an integer, exactly
        up = discarded + (int(bits[i]) >> (32 - k)) >= 2**k
        result = lower + ulp if up else lower
        out[i] = math.copysign(math.inf if result > largest else result, value)
    return out.reshape(np.shape(x))


def low_precision_step(
    step: Callable[..., StepResult],
    p: ArrayLike,
    g: ArrayLike,
    state: State,
    *,
    param_dtype: str,
    state_dtype: str,
    state_order: tuple[str, ...],
    master: ArrayLike | None = None,
    stochastic_seed: int | None = None,
    **hyperparameters: Any,
) -> tuple[Array, State, Array | None]:
    """One step of ``step`` (any reference function of this module) on 16-bit storage: the
    param (or its float32 ``master`` copy), the grad and the states are read as their values,
    the update is computed, and the param, the states and the master are stored as the kernels
    store them. Returns (param, state, master) as float64 values of what is stored.
    ``state_order``: the algorithm's state buffers in the kernels' order (their rounding roles).
    """
    start = master if master is not None else p
    new_param, new_state = step(start, g, state, **hyperparameters)
    t = int(new_state.get("step", new_state.get("t", 1)))

    def store(x: Array, dtype: str, role: int) -> Array:
        if dtype in ("float32", "float64"):
            return np.asarray(x, dtype=dtype).astype(np.float64)
        if stochastic_seed is None:
            return round_nearest(x, dtype)
        return round_stochastic(x, dtype, rounding_bits(stochastic_seed, t, role, np.size(x)))

    stored_state = dict(new_state)
    for k, name in enumerate(state_order):
        if isinstance(new_state.get(name), np.ndarray):
            stored_state[name] = store(new_state[name], state_dtype, 1 + k)
    new_master = None if master is None else round_nearest(new_param, "float32")
    return store(new_param, param_dtype, 0), stored_state, new_master


def dynamic_map(signed: bool) -> Array:
    """bitsandbytes' dynamic quantization map (``create_dynamic_map``, 7 exponent bits, 8 bits in
    all), computed from its formula in float64 and rounded to float32: for exponent i in 0..6,
    the midpoints of 2^i (signed) or 2^(i+1) (unsigned) equal parts of [0.1, 1], times 10^(i-6),
    with their negatives when signed; then 0 and 1. (bitsandbytes computes them in float32; the
    two agree to a float32 ulp.)"""
    data = [0.0, 1.0]
    for i in range(7):
        parts = 2**i if signed else 2 ** (i + 1)
        bounds = np.linspace(0.1, 1.0, parts + 1)
        means = (bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (i - 6)
        data += list(means) + (list(-means) if signed else [])
    return np.sort(np.array(data, dtype=np.float32)).astype(np.float64)


def quantize_blockwise(
    x: ArrayLike, signed: bool, code: Array | None = None
) -> tuple[NDArray[np.uint8], Array]:
    """8-bit blockwise state (spec section 22): per block of 256 elements the largest |x| (NaN
    left out) is the block's absmax; each x/absmax (float32) takes the nearest code, the lower
    one on a tie (bitsandbytes' rule: the largest code <= x, or the next one when strictly
    closer); NaN takes code 0. Written as a loop, one element at a time."""
    code = dynamic_map(signed) if code is None else code
    values = np.asarray(x, dtype=np.float32).ravel()
    blocks = -(-values.size // 256)
    codes = np.zeros(values.size, np.uint8)
    absmax = np.zeros(blocks, np.float32)
    for b in range(blocks):
        block = values[b * 256 : (b + 1) * 256]
        finite = block[~np.isnan(block)]
        absmax[b] = np.abs(finite).max() if finite.size else 0.0
        for j, v in enumerate(block):
            with np.errstate(invalid="ignore", divide="ignore"):
                normed = float(np.float32(v) / absmax[b])
            if math.isnan(normed):
                continue
            below = [k for k in range(256) if code[k] <= normed]
            k = below[-1] if below else 0
            if k < 255 and abs(normed - code[k + 1]) < abs(normed - code[k]):
                k += 1
            codes[b * 256 + j] = k
    return codes.reshape(np.shape(x)), absmax.astype(np.float64)


def dequantize_blockwise(
    codes: ArrayLike, absmax: ArrayLike, signed: bool, code: Array | None = None
) -> Array:
    """The float32 values of 8-bit state: code[c] * absmax of the element's block."""
    code = dynamic_map(signed) if code is None else code
    flat = np.asarray(codes).ravel()
    scales = np.repeat(np.asarray(absmax, dtype=np.float32), 256)[: flat.size]
    values = code.astype(np.float32)[flat] * scales
    return values.astype(np.float64).reshape(np.shape(codes))
