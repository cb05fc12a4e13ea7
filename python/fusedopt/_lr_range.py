"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", section 3.3; fastai's ``lr_find``): :func:`lr_range_test`."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusedopt import keras_numpy as fusedopt_keras
from fusedopt import optim
from fusedopt._engine import as_number
from fusedopt._ewma import _center_of_mass, ewma

__all__ = ["LRRangeTestResult", "lr_range_test"]


@dataclass(frozen=True, eq=False)
class LRRangeTestResult:
    """What :func:`lr_range_test` measured. ``losses[i]`` and ``raw_losses[i]`` are measured at
    the params before step ``i``, which then takes the learning rate ``lrs[i]``; after an early
    stop the arrays end at the point that stopped the test (no step was taken there)."""

    lrs: np.ndarray
    """The learning rate of each step, rising exponentially from ``start_lr`` (float64)."""
    losses: np.ndarray
    """The smoothed loss: ``fusedopt.ewma(raw_losses, alpha=1 - smoothing)``, the bias-corrected
    EWMA; NaN where the raw loss is not finite."""
    raw_losses: np.ndarray
    """The loss ``loss_and_grads`` returned at each step (float64)."""
    suggestion: float | None
    """The learning rate at the steepest descent of the smoothed loss against log lr, at most a
    tenth of the learning rate at its minimum (the rule is :func:`lr_range_test`'s), or None
    where the loss never fell or fell only within a decade of ``start_lr``."""
    suggestion_index: int | None
    """The index of ``suggestion`` in ``lrs``."""
    diverged: bool
    """Whether the test stopped early: the smoothed loss exceeded ``diverge_factor`` times its
    minimum or was not finite."""

    def plot(self, ax: Any = None) -> Any:
        """Draw the raw and the smoothed loss against the learning rate (log scale), with the
        suggestion marked; on ``ax``, else on a new matplotlib figure. Returns the axes.
        matplotlib is imported only here."""
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots()
        ax.plot(self.lrs, self.raw_losses, color="0.7", linewidth=0.8, label="loss")
        ax.plot(self.lrs, self.losses, color="C0", linewidth=1.5, label="smoothed loss")
        if self.suggestion is not None:
            ax.axvline(self.suggestion, color="C3", linewidth=0.8, linestyle=":")
            ax.plot(
                [self.suggestion],
                [self.losses[self.suggestion_index]],
                "o",
                color="C3",
                label=f"suggested lr {self.suggestion:.3g}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        # The descent fills the axes; the rise after the minimum runs off the top.
        finite = np.flatnonzero(np.isfinite(self.losses))
        if finite.size:
            descent = finite[: int(np.argmin(self.losses[finite])) + 1]
            low = min(self.losses[descent].min(), np.nanmin(self.raw_losses[descent]))
            high = self.losses[descent].max()
            span = high - low or abs(high) or 1.0
            ax.set_ylim(low - 0.05 * span, high + 0.5 * span)
        ax.legend()
        return ax


def lr_range_test(
    optimizer: Any,
    loss_and_grads: Callable[[], Any],
    *,
    variables: Sequence[np.ndarray] | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    diverge_factor: float = 4.0,
) -> LRRangeTestResult:
    """The learning-rate range test: step ``optimizer`` with the learning rate rising
    exponentially, watch the loss, then put everything back.

    Step ``i`` (of ``num_steps``) calls ``loss_and_grads()`` for the loss and the grads at the
    current params, then steps with the learning rate of every param group set to
    ``lrs[i] = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))``. The loss is
    smoothed with the bias-corrected EWMA ``fusedopt.ewma(raw, alpha=1 - smoothing)`` (fastai's
    ``avg = smoothing*avg + (1 - smoothing)*loss``, divided by ``1 - smoothing**(i + 1)``;
    ``smoothing=0`` is none). The test stops early (``diverged``) when the smoothed loss is not
    finite or exceeds ``diverge_factor`` times its minimum so far (for a minimum ``m <= 0``: when
    it exceeds ``m + (diverge_factor - 1) * |m|``; ``diverge_factor=math.inf`` never stops on a
    finite loss).

    Afterwards the params, the optimizer's state and its learning rates are **exactly** as they
    were, also when ``loss_and_grads`` or a step raises: the param arrays are the same objects,
    restored in place, bit for bit.

    - **PyTorch-style** (``fusedopt.SGD``, ``fusedopt.Adam``, ...): ``loss_and_grads()`` returns
      ``(loss, grads)``, one grad per param in param order (as ``step`` takes them); every
      group's ``lr`` is set. The state buffers are restored in place too (the same arrays), and
      the step counts, scalars and every group's hyperparameters.
    - **Keras-style** (``fusedopt.keras_numpy.Adam``, ...): ``loss_and_grads()`` returns
      ``(loss, grads)`` with one grad (or None) per variable of ``variables``, the list that
      ``apply(grads, variables)`` takes. ``variables`` is required when the optimizer is not
      built yet (it is then left unbuilt); otherwise it defaults to the variables it was built
      with. ``learning_rate`` (a float or a schedule), ``iterations``, the slot arrays (in
      place) and Nadam's ``u_product`` are restored.
    - **Keras optimizers** (``fusedopt.keras.Adam``, ..., and Keras' own): ``loss_and_grads()``
      returns ``(loss, grads)`` with one grad (or None) per variable of ``variables`` (Keras
      variables, e.g. ``model.trainable_variables``; by default the ones it was built with), as
      ``apply(grads, variables)`` takes them. An optimizer not built yet is built for
      ``variables`` once the first result is checked (its slots start at zero, as they would at
      its first step); a refused test leaves it unbuilt. The variables' values and every
      optimizer variable (iterations, the learning rate, the slots) are restored by ``assign``,
      and a ``learning_rate`` schedule or callable is put back. Not a ``LossScaleOptimizer``
      (it would unscale the grads): pass its ``inner_optimizer``; nor, for the same reason, an
      optimizer made with ``loss_scale_factor``, nor one with ``gradient_accumulation_steps``
      (it would update at every n-th step only).
    - **torch** (``fusedopt.torch`` optimizers, and any ``torch.optim.Optimizer`` whose
      ``step()`` needs no closure): ``loss_and_grads`` is a closure as ``optimizer.step(closure)``
      takes it: it computes the loss, calls ``backward()`` and returns the loss. The params'
      values and grads are restored in place, the state by ``load_state_dict`` of a deep copy
      of ``state_dict()`` (so the state tensors are new ones, as after any ``load_state_dict``,
      but with their saved dtypes); ``param_groups`` is the same list of the same group dicts,
      with their hyperparameters (the same objects, ``lr`` included). Buffers the
      forward pass changes (BatchNorm's running statistics) belong to the model, not the
      optimizer, and are not restored.

    **The suggestion**: the learning rate at the steepest descent of the smoothed loss against
    ``log10(lr)``, never larger than a tenth of the learning rate at the minimum of the smoothed
    loss. The slope is ``np.gradient(losses, log10(lrs))`` (central differences) over the finite
    smoothed losses; the candidates are the points from index ``num_steps // 10`` (the first
    tenth is skipped: its average holds few losses and is noisy) up to the minimum, and the
    suggestion is the candidate with the most negative slope or, where that is larger, the last
    learning rate not above a tenth of the one at the minimum (Smith's rule of thumb, which
    fastai also offers; this one may lie in the skipped tenth): the steepest point can sit at
    the edge of stability, as it does for plain SGD on the demo's MLP. It is None when the
    minimum lies in the skipped tenth or no candidate's slope is negative (the loss never fell),
    or when the minimum lies less than a decade above ``start_lr``: start lower. The smoothed
    curve lags the raw one (an average of about ``1 / (1 - smoothing)`` steps), so on a problem
    where plain SGD diverges above ``2 / L`` the suggestion lands at a fraction of that, inside
    the stable range.

    Bad arguments (also ``start_lr`` and ``end_lr`` too close for ``num_steps`` rates that
    rise at every step) raise TypeError or ValueError naming them before anything is touched;
    ``loss_and_grads`` returning something that is not ``(loss, grads)``, a loss that is not a
    real number (a Python or NumPy one, or a real array or tensor of one element; not a bool,
    a string or a complex number), grads that do not match the params (count, shape or dtype),
    or a closure that leaves no param with a grad raise naming ``loss_and_grads``, and the
    params are left as they were.

    Rprop uses ``lr`` only as its initial step size, so its curve says little about ``lr``.
    """
    lrs, num_steps, smoothing, factor = _check_arguments(
        loss_and_grads, start_lr, end_lr, num_steps, smoothing, diverge_factor
    )
    runner = _runner(optimizer, loss_and_grads, variables)
    smoother = _Smoother(1.0 - smoothing)
    raw: list[float] = []
    best = math.inf
    diverged = False
    restore = runner.snapshot()
    try:
        for lr in lrs:
            loss = runner.loss()
            raw.append(loss)
            smoothed = smoother.update(loss)
            if not math.isfinite(smoothed):
                diverged = True
                break
            best = min(best, smoothed)
            if smoothed > best + (factor - 1.0) * abs(best):
                diverged = True
                break
            runner.step(float(lr))
    finally:
        restore()
    raw_losses = np.array(raw, dtype=np.float64)
    losses = ewma(raw_losses, alpha=1.0 - smoothing)
    losses[~np.isfinite(raw_losses)] = np.nan  # pandas would carry the last mean forward
    lrs = lrs[: len(raw_losses)]
    index = suggestion_index(lrs, losses, skip=num_steps // 10)
    return LRRangeTestResult(
        lrs=lrs,
        losses=losses,
        raw_losses=raw_losses,
        suggestion=None if index is None else float(lrs[index]),
        suggestion_index=index,
        diverged=diverged,
    )


def suggestion_index(lrs: np.ndarray, losses: np.ndarray, skip: int) -> int | None:
    """The index of the steepest descent of ``losses`` against ``log10(lrs)`` among the points
    from ``skip`` to the minimum of the finite losses, or None (see :func:`lr_range_test`)."""
    not_finite = np.flatnonzero(~np.isfinite(losses))
    count = int(not_finite[0]) if not_finite.size else len(losses)  # only the last can be
    if count < 2:
        return None
    y = losses[:count]
    minimum = int(np.argmin(y))
    if minimum <= skip:
        return None
    slope = np.gradient(y, np.log10(lrs[:count]))
    index = skip + int(np.argmin(slope[skip : minimum + 1]))
    if slope[index] >= 0:
        return None
    # At most a tenth of the rate at the minimum: the last lr not above it, also inside the
    # skipped tenth (the skip keeps the noisy early slopes out; the cap reads no slope).
    cap = int(np.searchsorted(lrs, lrs[minimum] / 10.0, side="right")) - 1
    return min(index, cap) if cap >= 0 else None


class _Smoother:
    """The smoothed loss step by step, with the operations of pandas' ``ewm(alpha=...,
    adjust=True).mean()`` in fusedopt's kernel (spec section 9), in the same order, so the value
    the early stop sees is bit for bit the one ``fusedopt.ewma`` gives afterwards."""

    def __init__(self, alpha: float) -> None:
        com = _center_of_mass(None, None, None, alpha)
        self._decay = 1.0 - 1.0 / (1.0 + com)
        self._mean = math.nan
        self._weight = 1.0
        self._count = 0

    def update(self, x: float) -> float:
        if not math.isfinite(x):
            self._mean = math.nan
        elif self._count == 0:
            self._mean = x
        else:
            self._weight = self._weight * self._decay
            if self._mean != x:
                self._mean = (self._weight * self._mean + 1.0 * x) / (self._weight + 1.0)
            self._weight = self._weight + 1.0
        self._count += 1
        return self._mean


# ------------------------------------------------------------------------------------- checks


def _check_arguments(
    loss_and_grads: Any,
    start_lr: Any,
    end_lr: Any,
    num_steps: Any,
    smoothing: Any,
    diverge_factor: Any,
) -> tuple[np.ndarray, int, float, float]:
    """The learning rates and the other arguments as numbers; TypeError or ValueError naming a
    bad one."""
    if not callable(loss_and_grads):
        raise TypeError(
            f"loss_and_grads must be callable (it takes no arguments), got "
            f"{type(loss_and_grads).__name__}"
        )
    bounds = []
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        number = _number(value, name)
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        bounds.append(number)
    if not bounds[0] < bounds[1]:
        raise ValueError(f"start_lr ({start_lr!r}) must be less than end_lr ({end_lr!r})")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise TypeError(f"num_steps must be an integer, got {num_steps!r}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2, got {num_steps}")
    smoothing_value = _number(smoothing, "smoothing")
    if not 0 <= smoothing_value < 1:
        raise ValueError(f"smoothing must satisfy 0 <= smoothing < 1, got {smoothing!r}")
    factor = _number(diverge_factor, "diverge_factor")
    if not factor > 1:
        raise ValueError(f"diverge_factor must be greater than 1, got {diverge_factor!r}")
    lrs = np.geomspace(*bounds, int(num_steps))
    lrs[0], lrs[-1] = bounds
    # The suggestion's slopes divide by the steps of log10(lr): bounds a few ulps apart give
    # equal rates.
    if not np.all(np.diff(np.log10(lrs)) > 0):
        raise ValueError(
            f"start_lr ({start_lr!r}) and end_lr ({end_lr!r}) are too close for num_steps="
            f"{num_steps}: log10 of the learning rates does not rise at every step"
        )
    return lrs, int(num_steps), smoothing_value, factor


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return as_number(value, name)


def _loss_value(loss: Any) -> float:
    """The loss as a float: a real number, or a real array or tensor of one element."""
    dtype = getattr(loss, "dtype", None)
    if isinstance(dtype, np.dtype):
        real = dtype.kind in "iuf"
    elif dtype is not None:  # torch's: complex and bool dtypes say so
        real = not (getattr(dtype, "is_complex", False) or "bool" in str(dtype))
    else:  # float() would take a string, and a bool is no loss
        real = not isinstance(loss, str | bytes | bool | complex)
    got = type(loss).__name__ if dtype is None else f"{type(loss).__name__} of dtype {dtype}"
    if not real:
        raise TypeError(f"loss_and_grads must return the loss as a real number, got {got}")
    try:
        if getattr(loss, "ndim", 0) != 0 and getattr(loss, "size", None) == 1:
            loss = loss.reshape(())  # a one-element array or tensor
        return float(loss)
    except Exception as error:
        raise TypeError(
            f"loss_and_grads must return the loss as a real number, got {got} "
            f"(float() raised {type(error).__name__}: {error})"
        ) from error


def _check_grads(
    grads: Any, arrays: Sequence[Any], label: str, none_allowed: bool, same_dtype: bool = True
) -> list[Any]:
    """The grads ``loss_and_grads`` returned, checked against the params (``label``);
    ``same_dtype=False`` for Keras variables, whose dtype is a name and whose grads are the
    backend's tensors (Keras casts them)."""
    if isinstance(grads, np.ndarray):
        grads = [grads]
    elif isinstance(grads, str | bytes) or not isinstance(grads, Sequence):
        raise TypeError(
            f"loss_and_grads must return (loss, grads) with grads a list of arrays, got grads "
            f"of type {type(grads).__name__}"
        )
    grads = list(grads)
    if len(grads) != len(arrays):
        raise ValueError(
            f"loss_and_grads returned {len(grads)} grads for {len(arrays)} {label} (one per "
            f"{label[:-1]}, in order)"
        )
    for i, (g, p) in enumerate(zip(grads, arrays)):
        if g is None and none_allowed:
            continue
        if not hasattr(g, "shape") or not hasattr(g, "dtype"):
            raise TypeError(
                f"loss_and_grads returned grads[{i}] of type {type(g).__name__}; {label}[{i}] "
                "needs an array"
            )
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(
                f"loss_and_grads returned grads[{i}] with shape {tuple(g.shape)}, but {label}[{i}] "
                f"has shape {tuple(p.shape)}"
            )
        if same_dtype and g.dtype != p.dtype:
            raise TypeError(
                f"loss_and_grads returned grads[{i}] with dtype {g.dtype}, but {label}[{i}] has "
                f"dtype {p.dtype}"
            )
    return grads


def _loss_and_grads(result: Any) -> tuple[Any, Any]:
    if not isinstance(result, tuple | list) or len(result) != 2:
        got = type(result).__name__
        if isinstance(result, tuple | list):
            got = f"a {got} of {len(result)}"
        raise TypeError(f"loss_and_grads must return a pair (loss, grads), got {got}")
    return result[0], result[1]


# ------------------------------------------------------------------------------------ runners


class _Runner:
    """How the test drives one kind of optimizer: ``snapshot()`` saves what the test changes and
    returns the function that restores it, ``loss()`` calls ``loss_and_grads`` and checks what
    it returned, ``step(lr)`` sets the learning rate and steps with the grads of the last
    ``loss()``."""

    def snapshot(self) -> Callable[[], None]:
        raise NotImplementedError

    def loss(self) -> float:
        raise NotImplementedError

    def step(self, lr: float) -> None:
        raise NotImplementedError


def _runner(optimizer: Any, loss_and_grads: Callable[[], Any], variables: Any) -> _Runner:
    if isinstance(optimizer, optim.Optimizer):
        if variables is not None:
            raise TypeError(
                "variables: only for Keras-style optimizers; a PyTorch-style optimizer steps the "
                "params it was given"
            )
        return _TorchStyleRunner(optimizer, loss_and_grads)
    if isinstance(optimizer, fusedopt_keras.Optimizer):
        return _KerasRunner(optimizer, loss_and_grads, variables)
    keras = sys.modules.get("keras")  # never imported here: a Keras optimizer brought it
    if keras is not None and isinstance(optimizer, keras.optimizers.Optimizer):
        return _KerasOptimizerRunner(keras, optimizer, loss_and_grads, variables)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(optimizer, torch.optim.Optimizer):
        if variables is not None:
            raise TypeError(
                "variables: only for Keras-style optimizers; a torch optimizer steps the params "
                "of its param groups"
            )
        return _TorchRunner(torch, optimizer, loss_and_grads)
    raise TypeError(
        "optimizer must be a fusedopt optimizer (fusedopt.Adam, fusedopt.keras_numpy.Adam, "
        "fusedopt.torch.Adam, fusedopt.keras.Adam, ...), a torch.optim.Optimizer or a Keras "
        f"optimizer, got {type(optimizer).__name__}"
    )


class _TorchStyleRunner(_Runner):
    def __init__(self, optimizer: optim.Optimizer, loss_and_grads: Callable[[], Any]) -> None:
        self.optimizer = optimizer
        self.loss_and_grads = loss_and_grads
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.grads: list[Any] = []

    def snapshot(self) -> Callable[[], None]:
        return self.optimizer._snapshot()

    def loss(self) -> float:
        loss, grads = _loss_and_grads(self.loss_and_grads())
        self.grads = _check_grads(grads, self.params, "params", none_allowed=False)
        return _loss_value(loss)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step(self.grads)


class _KerasRunner(_Runner):
    def __init__(
        self,
        optimizer: fusedopt_keras.Optimizer,
        loss_and_grads: Callable[[], Any],
        variables: Any,
    ) -> None:
        if variables is None:
            if not optimizer.built:
                raise TypeError(
                    f"variables: {type(optimizer).__name__} is not built yet; pass the variables "
                    "it updates (lr_range_test(optimizer, loss_and_grads, variables=[...]))"
                )
            variables = optimizer._variables
        elif isinstance(variables, np.ndarray) or not isinstance(variables, Sequence):
            raise TypeError("variables must be a list of arrays")
        self.optimizer = optimizer
        self.loss_and_grads = loss_and_grads
        self.variables = list(variables)
        built = {id(v) for v in optimizer._variables} if optimizer.built else None
        for i, v in enumerate(self.variables):
            if not isinstance(v, np.ndarray):
                raise TypeError(f"variables[{i}] must be a numpy.ndarray, got {type(v).__name__}")
            if built is not None and id(v) not in built:
                raise ValueError(
                    f"variables[{i}] is not one of the variables {type(optimizer).__name__} was "
                    "built with"
                )
        self.grads: list[Any] = []

    def snapshot(self) -> Callable[[], None]:
        return self.optimizer._snapshot(self.variables)

    def loss(self) -> float:
        loss, grads = _loss_and_grads(self.loss_and_grads())
        self.grads = _check_grads(grads, self.variables, "variables", none_allowed=True)
        return _loss_value(loss)

    def step(self, lr: float) -> None:
        self.optimizer.learning_rate = lr
        self.optimizer.apply(self.grads, self.variables)


class _KerasOptimizerRunner(_Runner):
    """A Keras 3 optimizer (``fusedopt.keras``'s, or Keras' own) over Keras variables."""

    def __init__(
        self, keras: Any, optimizer: Any, loss_and_grads: Callable[[], Any], variables: Any
    ) -> None:
        if variables is None:
            if not optimizer.built:
                raise TypeError(
                    f"variables: {type(optimizer).__name__} is not built yet; pass the variables "
                    "it updates (lr_range_test(optimizer, loss_and_grads, "
                    "variables=model.trainable_variables))"
                )
            variables = optimizer._trainable_variables
        elif isinstance(variables, str | bytes) or not isinstance(variables, Sequence):
            raise TypeError("variables must be a list of Keras variables")
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise TypeError(
                "optimizer: a LossScaleOptimizer unscales the grads it is given; pass its "
                "inner_optimizer and unscaled grads"
            )
        if getattr(optimizer, "loss_scale_factor", None) is not None:
            # apply divides every grad by it, so the test would step with grads it never sees.
            raise ValueError(
                f"optimizer: {type(optimizer).__name__} was made with loss_scale_factor="
                f"{optimizer.loss_scale_factor!r}, by which apply divides the grads; run the test "
                "with an optimizer made without loss_scale_factor, on unscaled grads"
            )
        if (getattr(optimizer, "gradient_accumulation_steps", None) or 1) > 1:
            # apply then updates at every n-th call only, with the grads of n calls summed.
            raise ValueError(
                f"optimizer: {type(optimizer).__name__} was made with gradient_accumulation_"
                f"steps={optimizer.gradient_accumulation_steps!r}, so apply updates the "
                "variables at every n-th call only; run the test with an optimizer made without "
                "it"
            )
        self.keras = keras
        self.optimizer = optimizer
        self.loss_and_grads = loss_and_grads
        self.variables = list(variables)
        for i, v in enumerate(self.variables):
            if not isinstance(v, keras.Variable):
                raise TypeError(f"variables[{i}] must be a keras.Variable, got {type(v).__name__}")
        if optimizer.built:
            built = {id(v) for v in optimizer._trainable_variables}
            for i, v in enumerate(self.variables):
                if id(v) not in built:
                    raise ValueError(
                        f"variables[{i}] is not one of the variables {type(optimizer).__name__} "
                        "was built with"
                    )
        self.grads: list[Any] = []
        self.current_lr = 0.0
        self.first_loss: float | None = None

    def snapshot(self) -> Callable[[], None]:
        optimizer = self.optimizer
        # Built first, so that its slots exist to be saved: a fresh optimizer's slots are zeros and
        # its iterations 0, so it steps afterwards as it would have. Keras cannot unbuild, so the
        # first result is checked before: a refused test leaves the optimizer unbuilt.
        if not optimizer.built:
            self.first_loss = self.loss()
            optimizer.build(self.variables)
        saved = [
            (v, np.array(v.numpy(), copy=True)) for v in (*self.variables, *optimizer.variables)
        ]
        learning_rate = optimizer._learning_rate
        if not isinstance(learning_rate, self.keras.Variable):
            # A schedule or a callable is not settable to a number: the test's rate is read
            # through a callable in its place, and the original is put back.
            optimizer.learning_rate = lambda: self.current_lr

        def restore() -> None:
            if optimizer._learning_rate is not learning_rate:
                optimizer.learning_rate = learning_rate
            for v, value in saved:
                v.assign(value)

        return restore

    def loss(self) -> float:
        if self.first_loss is not None:  # the result snapshot() checked, at the same values
            loss, self.first_loss = self.first_loss, None
            return loss
        loss, grads = _loss_and_grads(self.loss_and_grads())
        self.grads = _check_grads(
            grads, self.variables, "variables", none_allowed=True, same_dtype=False
        )
        return _loss_value(loss.detach() if hasattr(loss, "detach") else loss)

    def step(self, lr: float) -> None:
        self.current_lr = lr
        if isinstance(self.optimizer._learning_rate, self.keras.Variable):
            self.optimizer.learning_rate = lr
        self.optimizer.apply(self.grads, self.variables)


class _TorchRunner(_Runner):
    def __init__(self, torch: Any, optimizer: Any, closure: Callable[[], Any]) -> None:
        self.torch = torch
        self.optimizer = optimizer
        self.closure = closure
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def snapshot(self) -> Callable[[], None]:
        torch, optimizer = self.torch, self.optimizer
        with torch.no_grad():
            params = [(p, p.detach().clone()) for p in self.params]
            grads = [
                (p.grad, None if p.grad is None else p.grad.detach().clone()) for p in self.params
            ]
        state_dict = copy.deepcopy(optimizer.state_dict())
        # load_state_dict casts floating state to the param's dtype (torch keeps NAdam's
        # mu_product and ASGD's eta in float32 beside float64 params): the exact copies go back
        # in after it.
        state = {p: copy.deepcopy(optimizer.state[p]) for p in self.params if p in optimizer.state}
        param_groups = optimizer.param_groups
        groups = [(group, dict(group)) for group in param_groups]

        def restore() -> None:
            with torch.no_grad():
                for p, saved in params:
                    p.copy_(saved)
                for p, (grad, saved) in zip(self.params, grads):
                    if grad is not None:
                        grad.copy_(saved)
                    p.grad = grad
            # load_state_dict for what the optimizer does on a load (fusedopt.torch registers
            # its tensors again at the next step); the state and the groups are put back after.
            optimizer.load_state_dict(state_dict)
            for p in self.params:
                if p in state:
                    optimizer.state[p] = state[p]
                else:
                    optimizer.state.pop(p, None)
            # load_state_dict made new group dicts (and a new list): the ones a user or a
            # scheduler holds go back, with their saved contents (the same lr object).
            for group, saved in groups:
                group.clear()
                group.update(saved)
            param_groups[:] = [group for group, _ in groups]
            optimizer.param_groups = param_groups

        return restore

    def loss(self) -> float:
        with self.torch.enable_grad():
            loss = self.closure()
        if loss is None:
            raise TypeError(
                "loss_and_grads must return the loss (a closure as optimizer.step(closure) takes: "
                "compute the loss, call backward(), return the loss), got None"
            )
        if not any(p.grad is not None for p in self.params):
            raise ValueError(
                "loss_and_grads left no param of the optimizer with a grad: the closure must call "
                "backward() on a loss that depends on the optimizer's params"
            )
        return _loss_value(loss.detach() if hasattr(loss, "detach") else loss)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
