"""Functional form: one fused step over state the caller holds.

There is one function per algorithm, ``<name>_`` (``sgd_``, ``adagrad_``, ``rmsprop_``,
``adam_``, ...), made from the algorithm's native description (``csrc/math/<name>.h``): its
arguments are ``params``, ``grads``, then one list per state buffer (``exp_avgs``,
``exp_avg_sqs``, ...; the optional ones default to None), and its hyperparameters by keyword
with the native names and PyTorch's defaults. Each call updates ``params`` and the state arrays
in place, in one native call over all tensors. Pass one array or a list of arrays for each role.

- ``step`` (algorithms whose update depends on it): the step number t of this call, 1 on the
  first step, for all tensors or one per tensor.
- ``first_step`` (SGD): the momentum buffers are new, so PyTorch's rule copies the gradient into
  them instead of accumulating.
- ``convention``: ``"torch"`` (PyTorch's math, the default) or ``"keras"`` (Keras 3's math,
  spec A.2).
- ``grad_scale`` / ``found_inf`` (SGD, Adam): PyTorch's fused GradScaler hooks (spec 8).

Every buffer is checked before any is written: a bad one raises TypeError or ValueError naming
it, and nothing changes.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from fusedopt import _core
from fusedopt._engine import (
    KERAS,
    TORCH,
    Description,
    Hyperparameter,
    as_number,
    describe,
    native_values,
    skip_step,
    step_once,
)

Arrays = np.ndarray | Sequence[np.ndarray]
OptionalArrays = np.ndarray | Sequence[np.ndarray | None] | None
_CONVENTIONS = {"torch": TORCH, "keras": KERAS}


def _list(arrays: OptionalArrays, name: str) -> list[Any] | None:
    if arrays is None:
        return None
    if isinstance(arrays, np.ndarray) or hasattr(arrays, "__cuda_array_interface__"):
        return [arrays]
    if isinstance(arrays, str | bytes) or not isinstance(arrays, Sequence):
        raise TypeError(f"{name} must be an array or a list of arrays, got {type(arrays).__name__}")
    return list(arrays)


def _steps(step: Any, count: int) -> int | np.ndarray:
    """t for every tensor: one whole number (kept as an int) or one per tensor."""
    if type(step) is int and 1 <= step <= 2**62:
        return step
    try:
        steps = np.asarray(step)
    except (TypeError, ValueError):
        raise TypeError(f"step must be a whole number or one per param, got {step!r}") from None
    if steps.ndim > 1 or (steps.ndim == 1 and steps.size != count):
        raise ValueError(f"step: expected one number or one per param ({count}), got {step!r}")
    if steps.dtype == np.bool_ or steps.dtype.kind not in "iuf":
        raise TypeError(f"step must be a whole number (or one per param), got {step!r}")
    with np.errstate(invalid="ignore"):
        whole = np.isfinite(steps) & (steps == np.floor(steps))
    if not np.all(whole):
        raise TypeError(f"step must be a whole number (or one per param), got {step!r}")
    if np.any(steps < 1) or np.any(steps > 2**62):
        raise ValueError(f"step must be >= 1 (the first step is 1) and <= 2**62, got {step!r}")
    return np.ascontiguousarray(np.broadcast_to(steps.astype(np.int64), (count,)))


def _run(
    description: Description,
    declared: tuple[Hyperparameter, ...],
    values: dict[str, Any],
    params: Arrays,
    grads: Arrays,
    states: tuple[OptionalArrays, ...],
    *,
    step: Any = 1,
    first_step: bool = False,
    scalars: dict[str, Any] | None = None,
    grad_scale: Any = None,
    found_inf: Any = None,
    convention: Any = "torch",
) -> None:
    if skip_step(found_inf):
        return
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be 'torch' or 'keras', got {convention!r}")
    options = _options(description, declared, values, convention)
    param_list = _list(params, "params") or []
    grad_list = _list(grads, "grads") or []
    state_lists = [_list(s, name + "s") for s, name in zip(states, description.states)]
    count = len(param_list)
    if not isinstance(first_step, bool | np.bool_):
        raise TypeError(f"first_step must be True or False, got {first_step!r}")
    scale = None if grad_scale is None else as_number(grad_scale, "grad_scale")
    scalar_rows = None
    if scalars is not None:
        scalar_rows = np.zeros((count, _core.max_scalars))
        for k, name in enumerate(description.scalars):
            column = scalars[name]
            scalar_rows[:, k] = column
    steps = _steps(step, count)
    if type(steps) is int and not first_step and scalar_rows is None:
        plan = _cached_plan(description, options, param_list, state_lists)
        if plan is not None:
            plan.step(grad_list, scale, steps)
            return
    step_once(
        description.name,
        [options],
        None,
        steps,
        param_list,
        grad_list,
        state_lists,
        new_state=[bool(first_step)] * count if description.uses_new_state else None,
        scalars=scalar_rows,
        grad_scale=scale,
    )
    if scalars is not None and scalar_rows is not None:
        for k, name in enumerate(description.scalars):
            scalars[name][...] = scalar_rows[:, k]


# Native options by (algorithm, convention, values): a call with the hyperparameters of the last
# calls skips their checks. Only plain numbers and bools are keys (an array could change in place).
_options_seen: dict[tuple[Any, ...], tuple[float, ...]] = {}
_PLAIN = (float, int, bool)


def _options(
    description: Description,
    declared: tuple[Hyperparameter, ...],
    values: dict[str, Any],
    convention: str,
) -> tuple[float, ...]:
    key = (description.name, convention, *values.values())
    plain = all(type(v) in _PLAIN for v in values.values())
    if plain and key in _options_seen:
        return _options_seen[key]
    options = native_values(description, declared, values, {"convention": _CONVENTIONS[convention]})
    if plain:
        if len(_options_seen) > 1024:  # a schedule makes a new lr every step: forget the old
            _options_seen.clear()
        _options_seen[key] = options
    return options


# Plans for the arrays of this thread's recent calls (a training loop passes the same params and
# states at every step), found by the arrays' identities and checked by weak references: a cached
# plan keeps no array alive, and an array that died is never mistaken for a new one at its
# address. Per thread, so that one thread's options never reach another's step.
_MAX_PLANS = 16
_cache = threading.local()


def _cached_plan(
    description: Description,
    options: tuple[float, ...],
    params: list[Any],
    states: list[list[Any] | None],
) -> Any:
    arrays = [*params, *(a for s in states if s is not None for a in s)]
    if not arrays or not all(type(a) is np.ndarray for a in arrays):
        return None
    plans = getattr(_cache, "plans", None)
    if plans is None:
        plans = _cache.plans = {}
    key = (description.name, tuple(s is None for s in states), *map(id, arrays))
    entry = plans.get(key)
    if entry is not None:
        references, plan, registered = entry
        if all(r() is a for r, a in zip(references, arrays)):
            if registered is not options:
                plan.set_options(0, options)
                plans[key] = (references, plan, options)
            return plan
        del plans[key]
    plan = _core.Plan(
        description.name, [options], [0] * len(params), params, states, None, None, None, True
    )
    if len(plans) >= _MAX_PLANS:
        del plans[next(iter(plans))]
    plans[key] = (tuple(weakref.ref(a) for a in arrays), plan, options)
    return plan


def _plural(name: str) -> str:
    return name + "s"


def _make(algorithm: str) -> Any:
    """``<algorithm>_`` with a real signature: generated source, so that a call costs what a
    hand-written function's call costs."""
    d = describe(algorithm)
    positional = ["params", "grads"]
    for k, state in enumerate(d.states):
        always = d.always_used_states & (1 << k)
        positional.append(_plural(state) if always else f"{_plural(state)}=None")
    keywords = []
    if d.uses_step:
        keywords.append("step")
    declared = tuple(Hyperparameter(f.name) for f in d.fields if f.kind != "convention")
    for f in d.fields:
        if f.kind == "convention":
            continue
        default = bool(f.default) if f.kind == "flag" else f.default
        keywords.append("lr" if f.name == "lr" else f"{f.name}={default!r}")
    for scalar in d.scalars:
        keywords.append(_plural(scalar))
    if d.uses_new_state:
        keywords.append("first_step=False")
    if d.takes_grad_scale:
        keywords += ["grad_scale=None", "found_inf=None"]
    keywords.append("convention='torch'")
    option_names = [f.name for f in d.fields if f.kind != "convention"]
    states = ", ".join(_plural(s) for s in d.states) + ("," if len(d.states) == 1 else "")
    extras = ["convention=convention"]
    if d.uses_step:
        extras.append("step=step")
    if d.uses_new_state:
        extras.append("first_step=first_step")
    if d.takes_grad_scale:
        extras += ["grad_scale=grad_scale", "found_inf=found_inf"]
    if d.scalars:
        pairs = ", ".join(f"{s!r}: {_plural(s)}" for s in d.scalars)
        extras.append(f"scalars={{{pairs}}}")
    source = (
        f"def {algorithm}_({', '.join(positional)}, *, {', '.join(keywords)}):\n"
        f"    _run(_description, _declared, {{{', '.join(f'{n!r}: {n}' for n in option_names)}}},"
        f" params, grads, ({states}), {', '.join(extras)})\n"
    )
    namespace: dict[str, Any] = {"_run": _run, "_description": d, "_declared": declared}
    exec(source, namespace)  # noqa: S102 - built from the native description only
    function = namespace[f"{algorithm}_"]
    function.__module__ = __name__
    function.__doc__ = (
        f"One fused {algorithm} step (docs/spec.md) over every tensor given, in place. States: "
        f"{', '.join(_plural(s) for s in d.states)}. See the module docstring."
    )
    return function


# One function per registered algorithm: adding an algorithm to the registry adds its function.
__all__ = [f"{name}_" for name in _core.algorithms()]
globals().update({f"{name}_": _make(name) for name in _core.algorithms()})
