"""Keras 3 convention: ``keras.optimizers``' names, defaults and math over NumPy arrays.

Used as in Keras: construct with hyperparameters only, then ``opt.apply(grads, variables)`` (or
``opt.apply_gradients(zip(grads, variables))``) updates the arrays in place, building the state
on first use. As in Keras 3 (SPEC A.2): weight decay is decoupled and scaled by the learning rate
in every optimizer, Adam's epsilon is epsilon-hat (next to the uncorrected root), Adagrad's and
RMSprop's epsilon sit inside the square root, and the learning rate lives inside momentum.
``clipnorm``, ``clipvalue`` and ``global_clipnorm`` clip the gradients first.

``learning_rate`` is a float (settable between steps) or a callable of the iteration count, such
as a ``keras.optimizers.schedules`` object. Like Keras, the current rate is held as a float32
value, so float64 variables see the same rounded rate that Keras gives them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from fusedopt import _core

LearningRate = float | Callable[[int], float]


class Optimizer:
    """Base class of the Keras-convention optimizers: the gradient pipeline of Keras'
    ``BaseOptimizer.apply`` (drop None gradients, clip, update, ``iterations += 1``)."""

    _state_names: tuple[str, ...] = ()

    def __init__(
        self,
        learning_rate: LearningRate,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        name: str | None = None,
    ) -> None:
        given = [c for c in (clipnorm, clipvalue, global_clipnorm) if c is not None]
        if len(given) > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received: "
                f"clipnorm={clipnorm}, clipvalue={clipvalue}, global_clipnorm={global_clipnorm}"
            )
        for label, value in (
            ("clipnorm", clipnorm),
            ("clipvalue", clipvalue),
            ("global_clipnorm", global_clipnorm),
        ):
            if value is not None and not float(value) > 0:
                raise ValueError(f"Invalid {label}: {value} (must be > 0)")
        if weight_decay is not None and not float(weight_decay) >= 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        self.weight_decay = weight_decay
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.name = name or type(self).__name__.lower()
        self.learning_rate = learning_rate
        self.iterations = 0
        self._variables: list[np.ndarray] = []
        self._index_of: dict[int, int] = {}
        self._buffers: dict[str, list[np.ndarray]] = {}
        self.built = False

    # ---------------------------------------------------------------------------- learning rate

    @property
    def learning_rate(self) -> float:
        """The rate the next ``apply`` uses (a schedule is evaluated at ``iterations``)."""
        return self._current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value: LearningRate) -> None:
        if not callable(value):
            rate = float(value)
            if not rate >= 0:
                raise ValueError(f"Invalid learning_rate: {value} (must be >= 0)")
        self._learning_rate = value

    def _current_learning_rate(self) -> float:
        rate = self._learning_rate
        value = rate(self.iterations) if callable(rate) else rate
        return float(np.float32(float(np.asarray(value))))

    # ------------------------------------------------------------------------------------ state

    def build(self, variables: Sequence[np.ndarray]) -> None:
        """Create the state of every variable (``apply`` does this on first use)."""
        variables = list(variables)
        for i, v in enumerate(variables):
            if not isinstance(v, np.ndarray):
                raise TypeError(f"variables[{i}] must be a numpy.ndarray, got {type(v).__name__}")
            if v.dtype not in (np.float32, np.float64):
                raise TypeError(
                    f"variables[{i}] has dtype {v.dtype}; fusedopt updates float32 and float64"
                )
        self._variables = variables
        self._index_of = {id(v): i for i, v in enumerate(variables)}
        if len(self._index_of) != len(variables):
            raise ValueError("variables: the same array appears twice")
        self._buffers = {
            name: [self._initial_state(name, v) for v in variables] for name in self._used_states()
        }
        self.built = True

    def _used_states(self) -> tuple[str, ...]:
        """The states this configuration keeps (Keras creates no others)."""
        return self._state_names

    def _initial_state(self, name: str, variable: np.ndarray) -> np.ndarray:
        return np.zeros_like(variable, order="C")

    @property
    def variables(self) -> list[np.ndarray]:
        """The optimizer's state arrays, in Keras' order (one list per state name)."""
        return [b for name in self._used_states() for b in self._buffers.get(name, [])]

    @property
    def state(self) -> dict[int, dict[str, np.ndarray]]:
        """The live state of each variable by index, with Keras' state names."""
        return {
            i: {name: self._buffers[name][i] for name in self._used_states()}
            for i in range(len(self._variables))
        }

    # ------------------------------------------------------------------------------------ apply

    def apply_gradients(self, grads_and_vars: Iterable[tuple[np.ndarray, np.ndarray]]) -> int:
        """``apply`` over ``(grad, variable)`` pairs; returns ``iterations``."""
        pairs = list(grads_and_vars)
        return self.apply([g for g, _ in pairs], [v for _, v in pairs])

    def apply(
        self,
        grads: Sequence[np.ndarray | None],
        trainable_variables: Sequence[np.ndarray] | None = None,
    ) -> int:
        """Update ``trainable_variables`` in place from ``grads``; returns ``iterations``."""
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise ValueError("apply: pass trainable_variables on the first call")
            variables = self._variables
        else:
            variables = list(trainable_variables)
        if len(grads) != len(variables):
            raise ValueError(
                f"grads: expected {len(variables)} arrays (one per variable), got {len(grads)}"
            )
        if not self.built:
            self.build(variables)
        indices = []
        for i, v in enumerate(variables):
            index = self._index_of.get(id(v))
            if index is None or self._variables[index] is not v:
                raise ValueError(
                    f"trainable_variables[{i}] is not one of the variables this optimizer was "
                    "built with"
                )
            indices.append(index)
        kept = [(g, i) for g, i in zip(grads, indices) if g is not None]
        if variables and not kept:
            raise ValueError("No gradients provided for any variable.")
        if kept:
            grads = self._clip([g for g, _ in kept])
            indices = [i for _, i in kept]
            self._update(grads, indices, self._current_learning_rate())
        self.iterations += 1
        return self.iterations

    def _clip(self, grads: list[np.ndarray]) -> list[np.ndarray]:
        """Keras' ``_clip_gradients`` (SPEC 1, step 5), in each gradient's dtype. Clipped
        gradients are new arrays: the caller's gradients are never changed."""
        if self.clipnorm is not None:
            return [self._clip_by_norm(g, self.clipnorm) for g in grads]
        if self.global_clipnorm is not None:
            norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads))
            scale = (
                self.global_clipnorm * min(1.0 / norm, 1.0 / self.global_clipnorm) if norm else 1.0
            )
            return [np.asarray(g * g.dtype.type(scale), dtype=g.dtype) for g in grads]
        if self.clipvalue is not None:
            return [np.clip(g, -self.clipvalue, self.clipvalue) for g in grads]
        return grads

    @staticmethod
    def _clip_by_norm(g: np.ndarray, clip_norm: float) -> np.ndarray:
        norm = np.sqrt(np.sum(np.square(g)))
        if norm == 0:
            return g
        c = g.dtype.type(clip_norm)
        return (g * c) / np.maximum(norm, c)

    def _update(self, grads: list[np.ndarray], indices: list[int], learning_rate: float) -> None:
        raise NotImplementedError  # pragma: no cover

    def _run(
        self,
        step_function: Callable[..., None],
        options: Any,
        grads: list[np.ndarray],
        indices: list[int],
    ) -> None:
        """One native step over the given variables, with each state list in _state_names
        order (None for a state this configuration keeps none of)."""
        state_lists = [self._state_for(name, indices) for name in self._state_names]
        options.convention = "keras"
        options.weight_decay = float(self.weight_decay or 0.0)
        taken = np.full(len(indices), self.iterations, dtype=np.int64)  # Keras' t = iterations + 1
        group_of = np.zeros(len(indices), dtype=np.int64)
        variables = [self._variables[i] for i in indices]
        step_function([options], group_of, taken, variables, grads, *state_lists)

    def _state_for(self, name: str, indices: list[int]) -> list[np.ndarray] | None:
        """The given variables' buffers of one state, or None where this configuration keeps
        no such state."""
        if name not in self._buffers:
            return None
        return [self._buffers[name][i] for i in indices]


class SGD(Optimizer):
    """``keras.optimizers.SGD``: velocity ``v = momentum*v - lr*g``, ``w += v`` (Nesterov:
    ``w += momentum*v - lr*g``); the learning rate stays inside the velocity."""

    _state_names = ("momentum",)

    def __init__(
        self,
        learning_rate: LearningRate = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        name: str | None = None,
    ) -> None:
        if not (isinstance(momentum, float | int) and 0 <= momentum <= 1):
            raise ValueError("`momentum` must be a float between [0, 1].")
        super().__init__(learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm, name)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def _update(self, grads: list[np.ndarray], indices: list[int], learning_rate: float) -> None:
        o = _core.SgdOptions()
        o.lr = learning_rate
        o.momentum = self.momentum
        o.nesterov = self.nesterov
        self._run(_core.sgd_step, o, grads, indices)

    def _used_states(self) -> tuple[str, ...]:
        return self._state_names if self.momentum != 0 else ()


class Adagrad(Optimizer):
    """``keras.optimizers.Adagrad``: ``acc += g*g``, ``w -= lr*g / sqrt(acc + epsilon)``."""

    _state_names = ("accumulator",)

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        name: str | None = None,
    ) -> None:
        if not float(initial_accumulator_value) >= 0:
            raise ValueError(f"Invalid initial_accumulator_value: {initial_accumulator_value}")
        if not float(epsilon) >= 0:
            raise ValueError(f"Invalid epsilon: {epsilon} (must be >= 0)")
        super().__init__(learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm, name)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.epsilon = float(epsilon)

    def _initial_state(self, name: str, variable: np.ndarray) -> np.ndarray:
        return np.full_like(variable, self.initial_accumulator_value, order="C")

    def _update(self, grads: list[np.ndarray], indices: list[int], learning_rate: float) -> None:
        o = _core.AdagradOptions()
        o.lr = learning_rate
        o.eps = self.epsilon
        self._run(_core.adagrad_step, o, grads, indices)


class RMSprop(Optimizer):
    """``keras.optimizers.RMSprop``: ``v = rho*v + (1-rho)*g*g`` and the step
    ``lr*g / sqrt(v + epsilon)`` (centered: ``v - mg*mg + epsilon``), accumulated into the
    momentum buffer when ``momentum > 0``."""

    _state_names = ("velocity", "momentum", "average_gradient")

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        name: str | None = None,
    ) -> None:
        for label, value in (("rho", rho), ("momentum", momentum), ("epsilon", epsilon)):
            if not float(value) >= 0:
                raise ValueError(f"Invalid {label}: {value} (must be >= 0)")
        super().__init__(learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm, name)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.centered = bool(centered)

    def _update(self, grads: list[np.ndarray], indices: list[int], learning_rate: float) -> None:
        o = _core.RmspropOptions()
        o.lr = learning_rate
        o.alpha = self.rho
        o.eps = self.epsilon
        o.momentum = self.momentum
        o.centered = self.centered
        self._run(_core.rmsprop_step, o, grads, indices)

    def _used_states(self) -> tuple[str, ...]:
        used = ("velocity",)
        if self.momentum > 0:
            used += ("momentum",)
        if self.centered:
            used += ("average_gradient",)
        return used


class Adam(Optimizer):
    """``keras.optimizers.Adam``: ``alpha_t = lr*sqrt(1-beta_2^t)/(1-beta_1^t)``,
    ``w -= alpha_t*m / (sqrt(v) + epsilon)`` with epsilon-hat next to the uncorrected root;
    ``amsgrad`` takes the maximum of the raw second moment."""

    _state_names = ("momentum", "velocity", "velocity_hat")

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        name: str | None = None,
    ) -> None:
        for label, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0 <= float(value) < 1:
                raise ValueError(f"Invalid {label}: {value} (must be in [0, 1))")
        if not float(epsilon) >= 0:
            raise ValueError(f"Invalid epsilon: {epsilon} (must be >= 0)")
        super().__init__(learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm, name)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.amsgrad = bool(amsgrad)

    def _update(self, grads: list[np.ndarray], indices: list[int], learning_rate: float) -> None:
        o = _core.AdamOptions()
        o.lr = learning_rate
        o.beta1 = self.beta_1
        o.beta2 = self.beta_2
        o.eps = self.epsilon
        o.amsgrad = self.amsgrad
        self._run(_core.adam_step, o, grads, indices)

    def _used_states(self) -> tuple[str, ...]:
        return self._state_names if self.amsgrad else self._state_names[:2]


class AdamW(Adam):
    """``keras.optimizers.AdamW``: Keras Adam with ``weight_decay=0.004`` by default."""

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        weight_decay: float = 0.004,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        name: str | None = None,
    ) -> None:
        if weight_decay is None:
            raise ValueError("Argument `weight_decay` must be a float. Received: weight_decay=None")
        super().__init__(
            learning_rate,
            beta_1,
            beta_2,
            epsilon,
            amsgrad,
            weight_decay,
            clipnorm,
            clipvalue,
            global_clipnorm,
            name,
        )
