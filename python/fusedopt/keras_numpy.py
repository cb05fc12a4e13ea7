"""Keras 3 convention over NumPy arrays: ``keras.optimizers``' names, defaults and math,
without Keras.

The NumPy variant of :mod:`fusedopt.keras` (whose classes are real Keras optimizers, for
``model.compile``); nothing here imports Keras. Used as in Keras: construct with hyperparameters
only, then ``opt.apply(grads, variables)`` (or ``opt.apply_gradients(zip(grads, variables))``)
updates the arrays in place, building the state on first use. As in Keras 3 (spec A.2): weight
decay is decoupled and scaled by the learning rate in every optimizer, Adam's epsilon is
epsilon-hat (next to the uncorrected root), Adagrad's and RMSprop's epsilon sit inside the square
root, and the learning rate lives inside momentum.
``clipnorm``, ``clipvalue`` and ``global_clipnorm`` clip the gradients first.

``learning_rate`` is a float (settable between steps) or a callable of the iteration count, such
as a ``keras.optimizers.schedules`` object. Like Keras, the current rate is held as a float32
value, so float64 variables see the same rounded rate that Keras gives them.

A class here declares only its algorithm (described once, in ``csrc/math/<name>.h``), how Keras
spells and defaults its hyperparameters, and Keras' names for its state; the rest is shared.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from fusedopt import _core
from fusedopt._engine import (
    FULL_PRECISION,
    KERAS,
    SIXTEEN_BIT,
    Description,
    Hyperparameter,
    Plan,
    PlanHolder,
    Precision,
    StateView,
    as_number,
    byte_range,
    check_in_place,
    describe,
    dtype_name,
    dtype_refused,
    first_overlap,
    make_plan,
    native_values,
    numpy_dtype,
    quantized_full,
    updates_dtype,
    value_kinds,
    with_precision_options,
)

LearningRate = float | Callable[[int], float]
H = Hyperparameter

# The arguments every Keras optimizer takes after its own (keras' BaseOptimizer), in its order.
_BASE_ARGUMENTS = ("clipnorm", "clipvalue", "global_clipnorm", "name")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class Optimizer(PlanHolder):
    """Base class of the Keras-convention optimizers: the gradient pipeline of Keras'
    ``BaseOptimizer.apply`` (drop None gradients, clip, decay, update, ``iterations += 1``).
    Optimizers deepcopy and pickle (with their variables, copied together)."""

    _plan_attributes = {"_plans": dict}

    _algorithm: ClassVar[str] = ""
    # Keras' spelling and defaults, in Keras' argument order, learning_rate and weight_decay
    # included (where Keras puts them).
    _hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    _state_names: ClassVar[tuple[str, ...]] = ()  # Keras' names of the native states, in order
    _fixed: ClassVar[dict[str, float]] = {}  # native options the class sets (Nadam's schedule)
    _description: ClassVar[Description]
    # The declared hyperparameters that are flags: None is False there, as Keras tests them by
    # truth (fusedopt.keras reads them the same way).
    _flag_names: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls._algorithm:
            cls._description = describe(cls._algorithm)
            cls._flag_names = frozenset(
                h.name
                for h in cls._hyperparameters
                if cls._description.field(h.native_names()[0]).kind == "flag"
            )
            if len(cls._state_names) != len(cls._description.states):
                raise TypeError(f"{cls.__name__}: one Keras name per native state")
            if "__init__" not in cls.__dict__:
                cls.__init__ = _generated_init(cls)  # type: ignore[method-assign]

    def _setup(
        self,
        hyperparameters: dict[str, Any],
        base: dict[str, Any],
        precision: Precision = FULL_PRECISION,
    ) -> None:
        precision.check_algorithm(self._description)
        self.precision = precision
        clipnorm, clipvalue, global_clipnorm = (base[k] for k in _BASE_ARGUMENTS[:3])
        given = [c for c in (clipnorm, clipvalue, global_clipnorm) if c is not None]
        if len(given) > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received: "
                f"clipnorm={clipnorm}, clipvalue={clipvalue}, global_clipnorm={global_clipnorm}"
            )
        for label in _BASE_ARGUMENTS[:3]:
            value = base[label]
            if value is not None and not as_number(value, label) > 0:
                raise ValueError(f"Invalid {label}: {value} (must be > 0)")
        if "weight_decay" in hyperparameters and hyperparameters["weight_decay"] is None:
            if type(self).weight_decay_required():
                raise ValueError(
                    "Argument `weight_decay` must be a float. Received: weight_decay=None"
                )
        self._start_lock()
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.name = base["name"] or type(self).__name__.lower()
        for key, value in hyperparameters.items():
            if key != "learning_rate":
                setattr(self, key, value)
        self.learning_rate = hyperparameters["learning_rate"]
        self.iterations = 0
        self._variables: list[np.ndarray] = []
        self._index_of: dict[int, int] = {}
        self._buffers: dict[str, list[np.ndarray]] = {}
        # Low precision (docs/spec.md section 22): the per-block scales of 8-bit states (None for
        # a variable whose state is float32) and the float32 masters of 16-bit variables.
        self._absmax: dict[str, list[np.ndarray | None]] = {}
        self._masters: list[np.ndarray | None] = []
        self._master_started: list[bool] = []  # by variable: its master was read by a step
        # Scalars Keras keeps once for the whole optimizer (Nadam's u_product), by native name.
        self._scalars = {
            name: value
            for name, value in zip(
                self._description.scalars, self._description.initial_values(self._defaults())[1]
            )
        }
        self._plans: dict[tuple[int, ...], tuple[Plan, tuple[float, ...], np.ndarray]] = {}
        self._options_key: tuple[Any, ...] | None = None
        self._options_values: tuple[float, ...] = ()
        self.built = False
        self._native_options(0.0)  # checks every hyperparameter now, as Keras does

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # By id(): a copy's variables are new arrays.
        self._index_of = {id(v): i for i, v in enumerate(self._variables)}

    @classmethod
    def weight_decay_required(cls) -> bool:
        """AdamW's weight_decay is a number, never None (Keras refuses None)."""
        for h in cls._hyperparameters:
            if h.name == "weight_decay":
                return h.default is not None
        return False

    @property
    def iterations(self) -> int:
        """The number of applied steps (Keras' ``iterations``): a schedule reads it, and the next
        ``apply`` steps at t = iterations + 1. It may be set, to a whole number in [0, 2**62]
        (2**62: the last, which no step follows)."""
        return self._iterations

    @iterations.setter
    def iterations(self, value: int) -> None:
        # Checked here, not by the native step's binding, which would name nothing.
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
            raise TypeError(f"iterations must be an int, got {value!r}")
        if not 0 <= value <= 2**62:
            raise ValueError(f"iterations must be in [0, 2**62], got {value}")
        self._iterations = int(value)

    # ---------------------------------------------------------------------------- learning rate

    @property
    def learning_rate(self) -> float:
        """The rate the next ``apply`` uses (a schedule is evaluated at ``iterations``)."""
        return self._current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value: LearningRate) -> None:
        if not callable(value):
            rate = as_number(value, "learning_rate")
            if not 0 <= rate <= _FLOAT32_MAX:  # Keras holds it as a float32: inf at apply
                raise ValueError(
                    f"Invalid learning_rate: {value} (must be >= 0 and finite as a float32)"
                )
        self._learning_rate = value

    def _current_learning_rate(self) -> float:
        rate = self._learning_rate
        value = rate(self.iterations) if callable(rate) else rate
        return float(np.float32(as_number(value, "learning_rate")))

    def _native_options(self, learning_rate: float) -> tuple[float, ...]:
        """The native options for the current attributes, recomputed only when one changed."""
        values = {h.name: getattr(self, h.name, None) for h in self._hyperparameters}
        values["learning_rate"] = learning_rate
        if values.get("weight_decay") is None:
            values["weight_decay"] = 0.0
        for name in self._flag_names:
            if values[name] is None:
                values[name] = False
        key = tuple(values.values()) + (self._float32_scalars(),)
        key += value_kinds(key)  # 1.0 == True and -0.0 == 0.0, yet they differ here
        if key != self._options_key:
            self._options_values = native_values(
                self._description, self._hyperparameters, values, self._fixed_options()
            )
            self._options_key = key
        return self._options_values

    def _fixed_options(self) -> dict[str, float]:
        fixed = {"convention": KERAS, **self._fixed}
        if any(f.name == "float32_scalars" for f in self._description.fields):
            fixed["float32_scalars"] = float(self._float32_scalars())
        return fixed

    def _float32_scalars(self) -> bool:
        """Keras keeps an optimizer-wide scalar (Nadam's u_product) in the dtype of the first
        variable it was built with (floatx, float32, before that)."""
        variables = getattr(self, "_variables", None)
        return not variables or variables[0].dtype != np.float64

    def _defaults(self) -> tuple[float, ...]:
        return tuple(f.default for f in self._description.fields)

    # ------------------------------------------------------------------------------------ state

    def build(self, variables: Sequence[np.ndarray]) -> None:
        """Create the state of every variable (``apply`` does this on first use)."""
        self._build(list(variables), "variables")

    def _build(self, variables: list[np.ndarray], role: str) -> None:
        """``build``, with errors naming the variables as ``role`` (the argument that gave
        them). Every variable is checked as a step would check it before anything is built: a
        refused build (or first ``apply``) leaves the optimizer unbuilt, so that a retry with
        corrected variables is built for those."""
        for i, v in enumerate(variables):
            if not isinstance(v, np.ndarray):
                raise TypeError(f"{role}[{i}] must be a numpy.ndarray, got {type(v).__name__}")
            if not updates_dtype(v.dtype):
                raise dtype_refused(v.dtype, f"{role}[{i}]")
            check_in_place(v, f"{role}[{i}]")
        index_of = {id(v): i for i, v in enumerate(variables)}
        if len(index_of) != len(variables):
            raise ValueError(f"{role}: the same array appears twice")
        if clash := first_overlap(byte_range(v, f"{role}[{i}]") for i, v in enumerate(variables)):
            raise ValueError(
                f"{clash[0]} shares memory with {clash[1]}; every variable must be its own array"
            )
        self.precision.check([dtype_name(v.dtype) for v in variables])
        # The options depend on the first variable's dtype (Nadam's u_product): read with the
        # new variables, which are put back if they are refused.
        previous = self._variables
        self._variables = variables
        try:
            options = self._native_options(self._current_learning_rate())
        except BaseException:
            self._variables = previous
            raise
        self._index_of = index_of
        self._buffers = {}
        self._absmax = {}
        self._masters = [
            np.array(v, dtype=np.float32, order="C", copy=True)
            if self.precision.needs_master(dtype_name(v.dtype))
            else None
            for v in variables
        ]
        self._master_started = [False] * len(variables)
        self._plans = {}
        self._create_states(options)
        self.built = True

    def _create_states(self, options: tuple[float, ...]) -> bool:
        """The state lists these options use and the optimizer does not have yet (Keras creates
        no others); whether any was created."""
        used = self._description.states_used(options)
        initial, _ = self._description.initial_values(options)
        created = False
        for k, (native, name) in enumerate(zip(self._description.states, self._state_names)):
            if native in used and name not in self._buffers:
                buffers, scales = [], []
                for v in self._variables:
                    dtype = self.precision.state_dtype_for(dtype_name(v.dtype), v.size)
                    if dtype == "int8":
                        codes, absmax = quantized_full(
                            v.shape, initial[k], self._description.nonnegative(native)
                        )
                        buffers.append(codes)
                        scales.append(absmax)
                    else:
                        buffers.append(np.full_like(v, initial[k], numpy_dtype(dtype), order="C"))
                        scales.append(None)
                self._buffers[name] = buffers
                if any(s is not None for s in scales):
                    self._absmax[name] = scales
                created = True
        return created

    def _snapshot(self, variables: Sequence[np.ndarray] = ()) -> Callable[[], None]:
        """Save everything ``apply`` and the attributes' setters touch; the returned function
        puts it back exactly: the values of the variables it was built with and of
        ``variables`` and of the slot arrays, in place (the same arrays), slots created since
        dropped, and every attribute (``learning_rate``, ``iterations``, ``built``, Nadam's
        ``u_product``, ...). For :func:`fusedopt.lr_range_test`."""
        with self._lock:
            arrays = {id(v): v for v in [*self._variables, *variables]}
            values = [(a, a.copy()) for a in arrays.values()]
            values += [(b, b.copy()) for entries in self._buffers.values() for b in entries]
            values += [
                (a, a.copy())
                for a in [*self._masters, *(a for s in self._absmax.values() for a in s)]
                if a is not None
            ]
            attributes = {k: v for k, v in vars(self).items() if k != "_lock"}
            containers = {
                "_variables": list(self._variables),
                "_index_of": dict(self._index_of),
                "_buffers": {name: list(b) for name, b in self._buffers.items()},
                "_absmax": {name: list(a) for name, a in self._absmax.items()},
                "_masters": list(self._masters),
                "_master_started": list(self._master_started),
                "_scalars": dict(self._scalars),
            }

        def restore() -> None:
            with self._lock:
                for array, saved in values:
                    np.copyto(array, saved)
                for name in [k for k in vars(self) if k != "_lock" and k not in attributes]:
                    delattr(self, name)
                self.__dict__.update(attributes)
                for name, saved in containers.items():
                    setattr(self, name, copy.copy(saved))
                self._buffers = {name: list(b) for name, b in containers["_buffers"].items()}
                # Plans hold the options of the last step: register again.
                self._plans = {}

        return restore

    @property
    def variables(self) -> list[np.ndarray]:
        """The optimizer's state arrays, in Keras' order (one list per state name)."""
        return [b for name in self._state_names for b in self._buffers.get(name, [])]

    @property
    def state(self) -> dict[int, dict[str, np.ndarray]]:
        """The live state of each variable by index, with Keras' state names (8-bit states'
        scales as ``<name>_absmax``, a 16-bit variable's float32 master as ``master``). The
        arrays are the live buffers (change them in place); the dicts refuse assignment."""
        result = {}
        for i in range(len(self._variables)):
            entry = {name: buffers[i] for name, buffers in self._buffers.items()}
            for name, scales in self._absmax.items():
                if scales[i] is not None:
                    entry[name + "_absmax"] = scales[i]
            if self._masters and self._masters[i] is not None:
                entry["master"] = self._masters[i]
            result[i] = StateView(entry)
        return StateView(result)

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
        with self._lock:
            if self._iterations == 2**62:  # refused before any variable is written
                raise ValueError("iterations is 2**62, the last count: no step follows it")
            try:
                grads = list(grads)
            except TypeError:
                raise TypeError(
                    f"grads must be a list of arrays (one per variable), got {type(grads).__name__}"
                ) from None
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
                self._build(variables, "trainable_variables")
            indices = []
            position_of: dict[int, int] = {}  # index -> where this call lists it
            for i, v in enumerate(variables):
                index = self._index_of.get(id(v))
                if index is None or self._variables[index] is not v:
                    raise ValueError(
                        f"trainable_variables[{i}] is not one of the variables this optimizer "
                        "was built with"
                    )
                if position_of.setdefault(index, i) != i:
                    raise ValueError(
                        f"trainable_variables[{i}]: the same array appears twice (as "
                        f"trainable_variables[{position_of[index]}])"
                    )
                indices.append(index)
            # Where each kept grad was in this call: errors name grads[k] as the caller passed it.
            kept = [k for k, g in enumerate(grads) if g is not None]
            if variables and not kept:
                raise ValueError("No gradients provided for any variable.")
            if kept:
                clipped = self._clip([grads[k] for k in kept], kept)
                try:
                    self._update(clipped, tuple(indices[k] for k in kept))
                except (TypeError, ValueError) as error:
                    names = dict(zip(self._description.states, self._state_names))
                    names |= {f"{k}_absmax": f"{v}_absmax" for k, v in names.items()}
                    names["masters"] = "master"
                    raise _named_as_given(error, kept, names) from None
            self.iterations += 1
            return self.iterations

    def _update(self, grads: list[np.ndarray], indices: tuple[int, ...]) -> None:
        """One native step over the given variables, at Keras' t = iterations + 1."""
        options = self._native_options(self._current_learning_rate())
        if self._create_states(options):
            self._plans = {}
        entry = self._plans.get(indices)
        if entry is None:
            states = [
                [self._buffers[name][i] for i in indices] if name in self._buffers else None
                for name in self._state_names
            ]
            scalars = np.zeros((len(indices), _core.max_scalars))
            absmax = [
                [self._absmax[name][i] for i in indices] if name in self._absmax else None
                for name in self._state_names
            ]
            plan = make_plan(
                self._algorithm,
                [options],
                np.zeros(len(indices), np.int64),
                [self._variables[i] for i in indices],
                states,
                scalars=scalars,
                masters=[self._masters[i] for i in indices]
                if self.precision.master_weights
                else None,
                rounding_seed=self.precision.rounding_seed,
                absmax=absmax if any(a is not None for a in absmax) else None,
            )
            self._plans[indices] = entry = (plan, options, scalars)
        plan, registered, scalars = entry
        if registered is not options:
            plan.set_options(0, options)
            self._plans[indices] = (plan, options, scalars)
        # An optimizer-wide scalar goes to every tensor of the step; each advances it alike.
        names = self._description.scalars
        for k, name in enumerate(names):
            scalars[:, k] = self._scalars[name]
        # A master starts from its variable at the variable's first step (spec section 22), not
        # at build(): a variable written in between (weights loaded after building) is where it
        # starts, unless the variable is still the master's rounding (a master restored through
        # state["master"] with its variable, as fusedopt.keras keeps one). Put back if the step
        # is refused, which then changes nothing.
        started_before = {i for i in indices if self._master_started[i]}
        starting = [
            i
            for i in indices
            if self._masters[i] is not None
            and not self._master_started[i]
            and self._masters[i].astype(self._variables[i].dtype).tobytes()
            != self._variables[i].tobytes()
        ]
        for i in indices:
            if self._masters[i] is not None:
                self._master_started[i] = True  # taken back below if the step is refused
        built = [self._masters[i].copy() for i in starting]
        for i in starting:
            self._masters[i][...] = self._variables[i]
        try:
            plan.step(grads, None, self.iterations + 1)
        except BaseException:
            for i, saved in zip(starting, built):
                self._masters[i][...] = saved
            for i in indices:
                if self._masters[i] is not None and i not in started_before:
                    self._master_started[i] = False
            raise
        # Keras keeps them in the first variable's dtype: 16-bit ones are stepped in float32
        # and stored rounded (fusedopt.keras stores them in Keras' variable).
        stored = self._variables[0].dtype
        for k, name in enumerate(names):
            value = scalars[0, k]
            if dtype_name(stored) in SIXTEEN_BIT:
                value = np.float32(value).astype(stored)
            self._scalars[name] = float(value)

    def _clip(self, grads: list[np.ndarray], positions: list[int]) -> list[np.ndarray]:
        """Keras' ``_clip_gradients`` (spec 1, step 5), in each gradient's dtype. Clipped
        gradients are new arrays (0-d ones too): the caller's gradients are never changed."""
        if self.clipnorm is None and self.global_clipnorm is None and self.clipvalue is None:
            return grads
        for g, k in zip(grads, positions):
            if not isinstance(g, np.ndarray) or g.dtype.kind != "f":
                kind = f"an array of {g.dtype}" if isinstance(g, np.ndarray) else type(g).__name__
                raise TypeError(f"grads[{k}] must be a float numpy.ndarray to clip, got {kind}")
        if self.clipnorm is not None:
            return [self._clip_by_norm(g, self.clipnorm) for g in grads]
        if self.global_clipnorm is not None:
            return self._clip_by_global_norm(grads, self.global_clipnorm)
        return [np.asarray(np.clip(g, -self.clipvalue, self.clipvalue), g.dtype) for g in grads]

    @staticmethod
    def _clip_by_global_norm(grads: list[np.ndarray], clip_norm: float) -> list[np.ndarray]:
        """Keras' ``clip_by_global_norm``: each grad's sum of squares in its dtype, their sum
        and root in the dtype they promote to, where the scale ``c * min(1/N, 1/c) + (N - N)``
        is computed too (NaN when N is not finite, an overflowing float32 sum of squares
        included); each grad times the scale, cast back to its dtype."""
        dtype = np.result_type(*grads)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            squared = np.array([np.sum(np.square(g)) for g in grads], dtype=dtype)
            norm = np.sqrt(np.sum(squared))
            scale = dtype.type(clip_norm) * np.minimum(1 / norm, dtype.type(1.0 / clip_norm))
            scale = scale + (norm - norm)
            return [np.asarray(g * scale, dtype=g.dtype) for g in grads]

    @staticmethod
    def _clip_by_norm(g: np.ndarray, clip_norm: float) -> np.ndarray:
        norm = np.sqrt(np.sum(np.square(g)))
        if norm == 0:
            return g
        c = g.dtype.type(clip_norm)
        return np.asarray((g * c) / np.maximum(norm, c), g.dtype)


def _named_as_given(error: Exception, positions: list[int], states: dict[str, str]) -> Exception:
    """The step's error with grads[j] / params[j] (the j-th grad that was not None) named as the
    caller passed them, grads[k] and trainable_variables[k], and a state by its Keras name
    (``states``: native name to Keras', as ``state`` shows them) and its variable: exp_avg[j] is
    "the momentum of trainable_variables[k]"."""

    def rename(match: re.Match[str]) -> str:
        j = int(match[2])
        k = positions[j] if j < len(positions) else j
        if match[1] in states:  # by the variable's position, not an index of ``state``
            return f"the {states[match[1]]} of trainable_variables[{k}]"
        role = "grads" if match[1] == "grads" else "trainable_variables"
        return f"{role}[{k}]"

    names = "|".join(["grads", "params", *map(re.escape, states)])
    return type(error)(re.sub(rf"\b({names})\[(\d+)\]", rename, str(error)))


def _generated_init(cls: type[Optimizer]) -> Any:
    """``__init__`` with Keras' signature for the class, from its declaration."""
    description = cls._description
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for h in cls._hyperparameters:
        parameters.append(
            inspect.Parameter(
                h.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=h.default_for(description)
            )
        )
    for name in _BASE_ARGUMENTS:
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
        )
    signature = inspect.Signature(with_precision_options(parameters))
    own = {h.name for h in cls._hyperparameters}

    def __init__(self: Optimizer, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        precision = Precision.popped(arguments)
        self._setup(
            {k: v for k, v in arguments.items() if k in own},
            {k: v for k, v in arguments.items() if k not in own},
            precision,
        )

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = f"Construct a {cls.__name__} with Keras' arguments and defaults."
    return __init__


def _learning_rate(default: float) -> Hyperparameter:
    return H("learning_rate", native="lr", default=default)


_WEIGHT_DECAY = H("weight_decay", default=None)


class SGD(Optimizer):
    """``keras.optimizers.SGD``: velocity ``v = momentum*v - lr*g``, ``w += v`` (Nesterov:
    ``w += momentum*v - lr*g``); the learning rate stays inside the velocity."""

    _algorithm = "sgd"
    _hyperparameters = (
        _learning_rate(0.01),
        H("momentum", default=0.0),
        H("nesterov", default=False),
        _WEIGHT_DECAY,
    )
    _state_names = ("momentum",)


class Adagrad(Optimizer):
    """``keras.optimizers.Adagrad``: ``acc += g*g``, ``w -= lr*g / sqrt(acc + epsilon)``."""

    _algorithm = "adagrad"
    _hyperparameters = (
        _learning_rate(0.001),
        H("initial_accumulator_value", default=0.1),
        H("epsilon", native="eps", default=1e-7),
        _WEIGHT_DECAY,
    )
    _state_names = ("accumulator",)


class RMSprop(Optimizer):
    """``keras.optimizers.RMSprop``: ``v = rho*v + (1-rho)*g*g`` and the step
    ``lr*g / sqrt(v + epsilon)`` (centered: ``v - mg*mg + epsilon``), accumulated into the
    momentum buffer when ``momentum > 0``."""

    _algorithm = "rmsprop"
    _hyperparameters = (
        _learning_rate(0.001),
        H("rho", native="alpha", default=0.9),
        H("momentum", default=0.0),
        H("epsilon", native="eps", default=1e-7),
        H("centered", default=False),
        _WEIGHT_DECAY,
    )
    _state_names = ("velocity", "momentum", "average_gradient")


class Adam(Optimizer):
    """``keras.optimizers.Adam``: ``alpha_t = lr*sqrt(1-beta_2^t)/(1-beta_1^t)``,
    ``w -= alpha_t*m / (sqrt(v) + epsilon)`` with epsilon-hat next to the uncorrected root;
    ``amsgrad`` takes the maximum of the raw second moment."""

    _algorithm = "adam"
    _hyperparameters = (
        _learning_rate(0.001),
        H("beta_1", native="beta1", default=0.9),
        H("beta_2", native="beta2", default=0.999),
        H("epsilon", native="eps", default=1e-7),
        H("amsgrad", default=False),
        _WEIGHT_DECAY,
    )
    _state_names = ("momentum", "velocity", "velocity_hat")


class AdamW(Adam):
    """``keras.optimizers.AdamW``: Keras Adam with ``weight_decay=0.004`` by default."""

    _hyperparameters = (
        _learning_rate(0.001),
        H("weight_decay", default=0.004),
        H("beta_1", native="beta1", default=0.9),
        H("beta_2", native="beta2", default=0.999),
        H("epsilon", native="eps", default=1e-7),
        H("amsgrad", default=False),
    )


class Adadelta(Optimizer):
    """``keras.optimizers.Adadelta``: ``A = rho*A + (1-rho)*g*g``,
    ``delta = -sqrt(D + epsilon)*g/sqrt(A + epsilon)``, ``D = rho*D + (1-rho)*delta*delta``,
    ``w += lr*delta``."""

    _algorithm = "adadelta"
    _hyperparameters = (
        _learning_rate(0.001),
        H("rho", default=0.95),
        H("epsilon", native="eps", default=1e-7),
        _WEIGHT_DECAY,
    )
    _state_names = ("accumulated_grad", "accumulated_delta_var")


class Adamax(Optimizer):
    """``keras.optimizers.Adamax``: ``m = beta_1*m + (1-beta_1)*g``, ``u = max(beta_2*u, |g|)``,
    ``w -= lr*m / ((u + epsilon)*(1 - beta_1^t))`` (epsilon outside the maximum)."""

    _algorithm = "adamax"
    _hyperparameters = (
        _learning_rate(0.001),
        H("beta_1", native="beta1", default=0.9),
        H("beta_2", native="beta2", default=0.999),
        H("epsilon", native="eps", default=1e-7),
        _WEIGHT_DECAY,
    )
    _state_names = ("momentum", "norm")


class Nadam(Optimizer):
    """``keras.optimizers.Nadam``: Adam with Nesterov momentum and the schedule
    ``u_t = beta_1*(1 - 0.5*0.96^t)``, whose product the optimizer keeps once for all its
    variables (``u_product``, in the first variable's dtype)."""

    _algorithm = "nadam"
    _hyperparameters = (
        _learning_rate(0.001),
        H("beta_1", native="beta1", default=0.9),
        H("beta_2", native="beta2", default=0.999),
        H("epsilon", native="eps", default=1e-7),
        _WEIGHT_DECAY,
    )
    _state_names = ("momentum", "velocity")
    _fixed = {"momentum_decay": 1.0}  # Keras' schedule 0.96^t

    @property
    def u_product(self) -> float:
        """Keras' ``_u_product``: the product of the momentum schedule so far."""
        return self._scalars["mu_product"]


class Lion(Optimizer):
    """``keras.optimizers.Lion``: ``w -= lr*sign(beta_1*m + (1-beta_1)*g)``,
    ``m = beta_2*m + (1-beta_2)*g``."""

    _algorithm = "lion"
    _hyperparameters = (
        _learning_rate(0.001),
        H("beta_1", native="beta1", default=0.9),
        H("beta_2", native="beta2", default=0.99),
        _WEIGHT_DECAY,
    )
    _state_names = ("momentum",)


class Lamb(Optimizer):
    """``keras.optimizers.Lamb``: Adam's bias-corrected update ``u = m_hat/(sqrt(v_hat) +
    epsilon)``, scaled per variable by the trust ratio ``||w||/||u||`` (1 unless both are > 0):
    ``w -= ratio*lr*u``. One call per step still: a first pass sums both norms of every
    variable, a second applies."""

    _algorithm = "lamb"
    _hyperparameters = (
        _learning_rate(0.001),
        H("beta_1", native="beta1", default=0.9),
        H("beta_2", native="beta2", default=0.999),
        H("epsilon", native="eps", default=1e-7),
        _WEIGHT_DECAY,
    )
    _state_names = ("momentum", "velocity")
