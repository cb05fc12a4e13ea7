"""Functional form: one fused step over state the caller holds.

Each function updates ``params`` and the given state arrays in place, in one native call over all
tensors. Pass one array or a list of arrays for each role. ``step`` is the step count t of this
call (1 on the first step), for all tensors or one per tensor. ``convention`` is ``"torch"``
(PyTorch's math, the default) or ``"keras"`` (Keras 3's math, SPEC A.2). Every buffer is checked
before any is written: a bad one raises TypeError or ValueError naming it, and nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fusedopt import _core
from fusedopt.optim import _skip_step

Arrays = np.ndarray | Sequence[np.ndarray]
OptionalArrays = np.ndarray | Sequence[np.ndarray | None] | None


def _list(arrays: OptionalArrays) -> list[Any] | None:
    if arrays is None:
        return None
    return [arrays] if isinstance(arrays, np.ndarray) else list(arrays)


def _schedule(params: list[np.ndarray], step: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """One group, and the step counts the core takes: the steps taken before this one."""
    steps = np.asarray(step)
    if steps.ndim > 1 or (steps.ndim == 1 and steps.size != len(params)):
        raise ValueError(
            f"step: expected one number or one per param ({len(params)}), got {step!r}"
        )
    if steps.dtype.kind not in "iuf" or not np.all(np.isfinite(steps) & (steps == np.floor(steps))):
        raise TypeError(f"step must be a whole number (or one per param), got {step!r}")
    if np.any(steps < 1):
        raise ValueError(f"step must be >= 1 (the first step is 1), got {step!r}")
    counts = np.broadcast_to(steps.astype(np.int64), (len(params),)) - 1
    return np.zeros(len(params), dtype=np.int64), counts


def sgd_(
    params: Arrays,
    grads: Arrays,
    momentum_buffers: OptionalArrays = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    grad_scale: float | None = None,
    found_inf: Any = None,
    convention: str = "torch",
) -> None:
    """SGD / momentum / Nesterov (SPEC 2-4). With ``momentum != 0`` pass ``momentum_buffers``;
    ``first_step=True`` (PyTorch) copies the gradient into them instead of accumulating."""
    if _skip_step(found_inf):
        return
    o = _core.SgdOptions()
    o.lr, o.momentum, o.dampening, o.weight_decay = lr, momentum, dampening, weight_decay
    o.nesterov, o.maximize, o.convention = nesterov, maximize, convention
    params = _list(params)
    group_of, steps = _schedule(params, 1 if first_step else 2)
    _core.sgd_step([o], group_of, steps, params, _list(grads), _list(momentum_buffers), grad_scale)


def adagrad_(
    params: Arrays,
    grads: Arrays,
    state_sums: Arrays,
    *,
    step: int | Sequence[int],
    lr: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    convention: str = "torch",
) -> None:
    """Adagrad (SPEC 5). The sums start at the initial accumulator value (torch 0, Keras 0.1)."""
    o = _core.AdagradOptions()
    o.lr, o.lr_decay, o.weight_decay, o.eps = lr, lr_decay, weight_decay, eps
    o.maximize, o.convention = maximize, convention
    params = _list(params)
    group_of, steps = _schedule(params, step)
    _core.adagrad_step([o], group_of, steps, params, _list(grads), _list(state_sums))


def rmsprop_(
    params: Arrays,
    grads: Arrays,
    square_avgs: Arrays,
    momentum_buffers: OptionalArrays = None,
    grad_avgs: OptionalArrays = None,
    *,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    convention: str = "torch",
) -> None:
    """RMSprop (SPEC 6): ``momentum_buffers`` when ``momentum > 0``, ``grad_avgs`` when
    ``centered``. In the Keras convention ``alpha`` is Keras' ``rho``."""
    o = _core.RmspropOptions()
    o.lr, o.alpha, o.eps, o.weight_decay, o.momentum = lr, alpha, eps, weight_decay, momentum
    o.centered, o.maximize, o.convention = centered, maximize, convention
    params = _list(params)
    group_of, steps = _schedule(params, 1)
    _core.rmsprop_step(
        [o],
        group_of,
        steps,
        params,
        _list(grads),
        _list(square_avgs),
        _list(momentum_buffers),
        _list(grad_avgs),
    )


def adam_(
    params: Arrays,
    grads: Arrays,
    exp_avgs: Arrays,
    exp_avg_sqs: Arrays,
    max_exp_avg_sqs: OptionalArrays = None,
    *,
    step: int | Sequence[int],
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    grad_scale: float | None = None,
    found_inf: Any = None,
    convention: str = "torch",
) -> None:
    """Adam / AdamW / AMSGrad (SPEC 7-8). ``max_exp_avg_sqs`` is needed with ``amsgrad``. In the
    Keras convention ``eps`` is epsilon-hat and weight decay is always decoupled."""
    if _skip_step(found_inf):
        return
    o = _core.AdamOptions()
    o.lr, o.beta1, o.beta2, o.eps, o.weight_decay = lr, beta1, beta2, eps, weight_decay
    o.amsgrad, o.maximize, o.decoupled_weight_decay = amsgrad, maximize, decoupled_weight_decay
    o.convention = convention
    params = _list(params)
    group_of, steps = _schedule(params, step)
    _core.adam_step(
        [o],
        group_of,
        steps,
        params,
        _list(grads),
        _list(exp_avgs),
        _list(exp_avg_sqs),
        _list(max_exp_avg_sqs),
        grad_scale,
    )


__all__ = ["adagrad_", "adam_", "rmsprop_", "sgd_"]
