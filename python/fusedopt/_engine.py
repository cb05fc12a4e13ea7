"""The one route from every front end to the native modules.

Every algorithm is described once, in C++ (``csrc/math/<name>.h``): its options with their
defaults and checks, its state buffers, which of them a configuration uses and how they start.
:func:`describe` reads that description from ``fusedopt._core``. A front end (the PyTorch-style
classes, the Keras-style classes, the functional API) declares only how it spells each
hyperparameter (:class:`Hyperparameter`); :func:`native_values` turns its values into the native
options, checking their types here and their values natively, and words any error with the front
end's own names.

Steps go through :func:`step_once` (arrays described for one call: the functional API) or a
:class:`Plan` (params and states registered once: the optimizer classes), on the CPU core or on
the CUDA backend (:mod:`fusedopt.cuda`) for device arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fusedopt import _core, cuda

TORCH, KERAS = 0, 1  # the native convention values


@dataclass(frozen=True)
class Field:
    """One native option: its name, default (PyTorch's) and kind ("number", "flag" or
    "convention")."""

    name: str
    default: float
    kind: str


@dataclass(frozen=True)
class Description:
    """An algorithm as ``csrc/math/<name>.h`` describes it."""

    name: str
    fields: tuple[Field, ...]
    states: tuple[str, ...]
    scalars: tuple[str, ...]
    always_used_states: int
    takes_grad_scale: bool
    uses_step: bool
    uses_new_state: bool

    @functools.cached_property  # read at every functional call
    def plural_states(self) -> tuple[str, ...]:
        """The states' names as the functional API's arguments: exp_avgs."""
        return tuple(name + "s" for name in self.states)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no option {name!r}")

    def states_used(self, values: tuple[float, ...]) -> tuple[str, ...]:
        """The states these native option values read and write."""
        mask = _core.states_used(self.name, values)
        return tuple(name for k, name in enumerate(self.states) if mask & (1 << k))

    def initial_values(self, values: tuple[float, ...]) -> tuple[list[float], list[float]]:
        """The starting value of each state and of each scalar under these options."""
        return _core.initial_values(self.name, values)


@functools.cache
def describe(algorithm: str) -> Description:
    info = _core.algorithm_info(algorithm)
    return Description(
        name=algorithm,
        fields=tuple(Field(*f) for f in info["fields"]),
        states=tuple(info["states"]),
        scalars=tuple(info["scalars"]),
        always_used_states=info["always_used_states"],
        takes_grad_scale=info["takes_grad_scale"],
        uses_step=info["uses_step"],
        uses_new_state=info["uses_new_state"],
    )


# --------------------------------------------------------------------------- hyperparameters

_NATIVE_DEFAULT: Any = object()


@dataclass(frozen=True)
class Hyperparameter:
    """How a front end spells one hyperparameter.

    ``native`` is the option it sets (its own name by default), or a tuple of options for a
    tuple-valued hyperparameter (torch's ``betas`` sets ``beta1`` and ``beta2``). ``default`` is
    the native default unless given.
    """

    name: str
    native: str | tuple[str, ...] = ""
    default: Any = _NATIVE_DEFAULT
    keyword_only: bool = False

    def native_names(self) -> tuple[str, ...]:
        if isinstance(self.native, tuple):
            return self.native
        return (self.native or self.name,)

    def default_for(self, description: Description) -> Any:
        if self.default is not _NATIVE_DEFAULT:
            return self.default
        defaults = [_plain_default(description.field(n)) for n in self.native_names()]
        return tuple(defaults) if isinstance(self.native, tuple) else defaults[0]


def _plain_default(field: Field) -> Any:
    return bool(field.default) if field.kind == "flag" else field.default


_LARGEST_FLOAT = int(np.finfo(np.float64).max)


def as_number(value: Any, name: str) -> float:
    """A hyperparameter as a Python float: a number, or a one-element array (as torch accepts a
    one-element tensor for lr). TypeError naming it otherwise."""
    if value is None or isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if type(value) is float:
        return value
    if type(value) is int:
        if abs(value) > _LARGEST_FLOAT:  # float() would raise OverflowError
            raise ValueError(f"{name} is too large for a float64, got {value!r}")
        return float(value)
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if array.size != 1:
        raise TypeError(f"{name} must be a single number, got an array of shape {array.shape}")
    return float(array.reshape(()))


def as_flag(value: Any, name: str) -> bool:
    """A flag: a bool, or 0 or 1. TypeError naming it otherwise (a string such as 'yes' is not
    taken for True)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def native_values(
    description: Description,
    declared: Sequence[Hyperparameter],
    values: Mapping[str, Any],
    fixed: Mapping[str, float],
) -> tuple[float, ...]:
    """The native option values, in the description's field order, from a front end's values
    (``values`` by declared name; ``fixed`` by native name, e.g. the convention). Raises
    TypeError or ValueError naming the front end's hyperparameter."""
    native: dict[str, float] = dict(fixed)
    spelled: dict[str, tuple[str, Any]] = {}  # native name -> (front end's name, value)
    for h in declared:
        value = values[h.name]
        names = h.native_names()
        if isinstance(h.native, tuple):
            if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
                raise ValueError(
                    f"Invalid {h.name}: {value!r} (must be a tuple of {len(names)}: "
                    f"{', '.join(names)})"
                )
            items = list(value)
            if len(items) != len(names):
                raise ValueError(
                    f"Invalid {h.name}: {value!r} (must be a tuple of {len(names)}: "
                    f"{', '.join(names)})"
                )
            parts = [(f"{h.name}[{i}]", item) for i, item in enumerate(items)]
        else:
            parts = [(h.name, value)]
        for native_name, (label, item) in zip(names, parts):
            kind = description.field(native_name).kind
            native[native_name] = (
                float(as_flag(item, label)) if kind == "flag" else as_number(item, label)
            )
            spelled[native_name] = (label, item)
    result = []
    for f in description.fields:
        result.append(native[f.name] if f.name in native else f.default)
    result_tuple = tuple(result)
    problem = _core.check_options(description.name, result_tuple)
    if problem is not None:
        field, rule, message = problem
        if field in spelled:
            label, item = spelled[field]
            raise ValueError(f"Invalid {label}: {item!r} ({rule})")
        raise ValueError(message)
    return result_tuple


# ------------------------------------------------------------------------------------ steps


def is_device(arrays: Sequence[Any]) -> bool:
    """Whether a step's params are CUDA device arrays (then every buffer must be)."""
    return bool(arrays) and cuda.is_device_array(arrays[0])


def step_once(
    algorithm: str,
    groups: Sequence[tuple[float, ...]],
    group_of: np.ndarray | None,
    steps: int | np.ndarray,
    params: Sequence[Any],
    grads: Sequence[Any],
    states: Sequence[Sequence[Any] | None],
    *,
    new_state: Sequence[bool] | None = None,
    scalars: np.ndarray | None = None,
    grad_scale: float | None = None,
    stream: Any = None,
) -> None:
    """One step over arrays described for this call only: every buffer is checked, then every
    tensor updated, in one native call (on the device for CUDA arrays). ``group_of`` None puts
    every tensor in group 0; ``steps`` is t, one for all tensors or one per tensor."""
    if is_device(params):
        n = len(params)
        group_of = np.zeros(n, np.int64) if group_of is None else group_of
        steps = np.full(n, steps, np.int64) if isinstance(steps, int) else steps
        cuda.step(
            algorithm, groups, group_of, steps, params, grads, states,
            new_state=new_state, scalars=scalars, grad_scale=grad_scale, stream=stream,
        )  # fmt: skip
        return
    _core.step(
        algorithm, groups, group_of, steps, params, grads, states, new_state, scalars, grad_scale
    )


class Plan(Protocol):
    """An optimizer's params and states, registered once: each step then checks only its grads
    (and, cheaply, that no registered array moved). ``step(grads, grad_scale, step)``: ``step``
    is t for every tensor (Keras' global count), or None to advance and use the registered step
    counts, as torch does."""

    def set_options(self, group: int, values: tuple[float, ...]) -> None: ...

    def step(self, grads: Sequence[Any], grad_scale: float | None, step: int | None) -> None: ...


def make_plan(
    algorithm: str,
    groups: Sequence[tuple[float, ...]],
    group_of: np.ndarray,
    params: Sequence[Any],
    states: Sequence[Sequence[Any] | None],
    *,
    step_counts: np.ndarray | None = None,
    new_state: Sequence[bool] | None = None,
    scalars: np.ndarray | None = None,
) -> Plan:
    """A plan on the CPU core (``fusedopt._core.Plan``) or the CUDA backend: ``step_counts``
    (steps taken, one per param) and ``scalars`` are arrays the plan advances in place."""
    if is_device(params):
        return cuda.Plan(
            algorithm, groups, group_of, params, states,
            step_counts=step_counts, new_state=new_state, scalars=scalars,
        )  # fmt: skip
    return _core.Plan(algorithm, groups, group_of, params, states, step_counts, new_state, scalars)


def skip_step(found_inf: Any) -> bool:
    """PyTorch's fused found_inf: a nonzero value skips the whole step (spec section 8)."""
    return found_inf is not None and as_number(found_inf, "found_inf") != 0.0
