"""Functional form: one fused step over state the caller holds.

There is one function per algorithm, ``<name>_`` (``sgd_``, ``adagrad_``, ``rmsprop_``,
``adam_``, ...), made from the algorithm's native description (``csrc/math/<name>.h``): its
arguments are ``params``, ``grads``, then one list per state buffer (``exp_avgs``,
``exp_avg_sqs``, ...; the optional ones default to None), and its hyperparameters by keyword
with the native names and PyTorch's defaults. Each call updates ``params`` and the state arrays
in place, in one native call over all tensors. Pass one array or a list of arrays for each role.

- ``step``: the step number t of this call, 1 on the first step, for all tensors or one per
  tensor. Required where the update depends on it; optional for ``sgd_``, ``rmsprop_``,
  ``adadelta_``, ``rprop_`` and ``lion_``, whose t only keys the stochastic rounding's random
  bits (docs/spec.md section 22): with ``stochastic_rounding=True`` they require it too, since
  each call needs its own t to draw new bits.
- ``first_step`` (SGD): the momentum buffers are new, so PyTorch's rule copies the gradient into
  them instead of accumulating.
- ``convention``: ``"torch"`` (PyTorch's math, the default) or ``"keras"`` (Keras 3's math,
  spec A.2).
- ``grad_scale`` / ``found_inf`` (SGD, Adam): PyTorch's fused GradScaler hooks (spec 8).
- ``mu_products`` (NAdam), ``etas`` and ``mus`` (ASGD): the per-tensor scalars of the state, each
  a writeable float64 array with one value per param (``np.ones(n)`` for NAdam's first step,
  ``np.full(n, lr)`` and ``np.ones(n)`` for ASGD's), advanced in place.

Every buffer is checked before any is written: a bad one raises TypeError or ValueError naming
it, and nothing changes.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fusedopt import _core, cuda
from fusedopt._engine import (
    KERAS,
    TORCH,
    Description,
    Hyperparameter,
    Precision,
    as_number,
    describe,
    native_values,
    skip_step,
    step_once,
    value_kinds,
)

Arrays = np.ndarray | Sequence[np.ndarray]
OptionalArrays = np.ndarray | Sequence[np.ndarray | None] | None
_CONVENTIONS = {"torch": TORCH, "keras": KERAS}


def _list(arrays: OptionalArrays, name: str, required: bool = False) -> list[Any] | None:
    if arrays is None:
        if required:
            raise TypeError(f"{name} must be an array or a list of arrays, got None")
        return None
    if type(arrays) is list:
        return arrays
    # Any ndarray (a memmap too), as a list of them takes it.
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
    values: tuple[Any, ...],
    convention: Any,
    params: Arrays,
    grads: Arrays,
    states: tuple[OptionalArrays, ...],
    step: Any,
    first_step: Any,
    scalars: dict[str, Any] | None,
    grad_scale: Any,
    found_inf: Any,
    masters: OptionalArrays = None,
    absmax: Mapping[str, OptionalArrays] | None = None,
    stochastic_rounding: Any = False,
    seed: Any = 0,
) -> None:
    """One call of a generated function: ``values`` are its hyperparameters in the order of the
    description's fields (the convention left out). ``masters``, ``absmax`` (the per-block
    scales of 8-bit states, by the state argument's name) and ``stochastic_rounding`` with its
    ``seed``: 16-bit and 8-bit storage (docs/spec.md section 22)."""
    if found_inf is not None and skip_step(found_inf):
        return
    if step is None and not description.uses_step:
        step = _step_for_rounding_only(stochastic_rounding)
    last = _last_options[0]
    if (
        last[0] is description
        and last[1] is convention
        and len(last[2]) == len(values)
        and all(map(operator.is_, values, last[2]))
    ):
        options = last[3]  # the very objects of the last call (a loop at constant values)
    else:
        # 1.0 == True and -0.0 == 0.0, yet they differ here: their kinds are part of the key.
        key = (description.name, convention, values, value_kinds(values))
        try:
            options = _options_seen[key]
        except (KeyError, TypeError):
            options = _options(key, description, values, convention)
        if _NUMBERS.issuperset(map(type, values)):  # not an array, which changes in place
            _last_options[0] = (description, convention, values, options)
    param_list = params if type(params) is list else _list(params, "params", required=True)
    grad_list = grads if type(grads) is list else _list(grads, "grads", required=True)
    state_lists: Sequence[list[Any] | None] = states  # lists already, in a training loop
    if not _LIST_OR_NONE.issuperset(map(type, states)):
        state_lists = [
            s if type(s) is list or s is None else _list(s, name)
            for s, name in zip(states, description.plural_states)
        ]
    low_precision = masters is not None or absmax is not None or stochastic_rounding is not False
    if not low_precision and (type(seed) is not int or seed != 0):
        Precision.of(seed=seed)  # checked as the classes check it, though no rounding reads it
    if (
        type(step) is int
        and first_step is False
        and scalars is None
        and 0 < step <= 2**62
        and not low_precision
    ):
        scale = None if grad_scale is None else as_number(grad_scale, "grad_scale")
        if _step_cached(description, options, param_list, grad_list, state_lists, scale, step):
            return
    count = len(param_list)
    if first_step is not False and not isinstance(first_step, bool | np.bool_):
        raise TypeError(f"first_step must be True or False, got {first_step!r}")
    scale = None if grad_scale is None else as_number(grad_scale, "grad_scale")
    scalar_rows = None
    if scalars is not None:
        _check_scalars(scalars, count, [param_list, grad_list, *state_lists])
        scalar_rows = np.zeros((count, _core.max_scalars))
        for k, name in enumerate(description.scalars):
            scalar_rows[:, k] = scalars[name]
    step_once(
        description.name,
        [options],
        None,
        _steps(step, count),
        param_list,
        grad_list,
        state_lists,
        new_state=[bool(first_step)] * count if description.uses_new_state else None,
        scalars=scalar_rows,
        grad_scale=scale,
        **(_low_precision(description, count, state_lists, masters, absmax,
                          stochastic_rounding, seed)
           if low_precision else {}),
    )  # fmt: skip
    if scalars is not None and scalar_rows is not None:
        for k, name in enumerate(description.scalars):
            scalars[name][...] = scalar_rows[:, k]


def _step_for_rounding_only(stochastic_rounding: Any) -> int:
    """t of a call without ``step`` to an algorithm whose update reads no t: any t for rounding
    to nearest; refused for stochastic rounding, whose bits are keyed by t (the same t at every
    call would round each element the same way at every call: biased, and stalled where an
    update is below half an ulp)."""
    if (
        stochastic_rounding is not False
        and Precision.of(stochastic_rounding=stochastic_rounding).stochastic_rounding
    ):
        raise ValueError(
            "step: stochastic_rounding=True needs this call's step number t (step=t, 1 on the "
            "first call, one more at each call): each call draws its random bits by t, and "
            "without it every call would draw the same ones"
        )
    return 1


def _check_scalars(scalars: dict[str, Any], count: int, arrays: list[list[Any] | None]) -> None:
    """Each per-tensor scalar array can take the step's new values: checked before the step, so
    that a refusal leaves everything as it was. ``arrays``: the call's params, grads and states;
    a scalar array may share memory with none of them nor with another scalar array (the new
    values of one would overwrite the other's, or a grad the step reads)."""
    buffers = [a for role in arrays if role is not None for a in role if isinstance(a, np.ndarray)]
    for name, values in scalars.items():
        argument = name + "s"
        if type(values) is not np.ndarray or values.dtype != np.float64:
            kind = values.dtype if isinstance(values, np.ndarray) else type(values).__name__
            raise TypeError(f"{argument} must be a float64 numpy array, one per param, got {kind}")
        if values.shape != (count,):
            raise ValueError(
                f"{argument} must have shape ({count},), one per param, got {values.shape}"
            )
        if not values.flags.writeable:
            raise ValueError(f"{argument} is read-only; the step writes its new values there")
        if any(np.may_share_memory(values, b) for b in buffers):
            raise ValueError(f"{argument} overlaps a param, a grad, a state or a scalar array")
        buffers.append(values)


# Native options by (algorithm, convention, values, their types): a call with the hyperparameters
# of a recent call skips their checks. Only hashable values are keys, which leaves out what can
# change in place (arrays, lists).
_options_seen: dict[tuple[Any, ...], tuple[float, ...]] = {}
# The last call's (description, convention, values, options): the same value objects (not only
# equal ones, which may differ in type or sign) skip even the key. Replaced whole, so a thread
# reads one call's entry; in a list, which the generated functions read too (_make).
_last_options: list[tuple[Any, ...]] = [(None, None, (), ())]
_NUMBERS = frozenset((float, int, bool))
_LIST_OR_NONE = frozenset((list, type(None)))


def _options(
    key: tuple[Any, ...], description: Description, values: tuple[Any, ...], convention: Any
) -> tuple[float, ...]:
    try:
        options = _options_seen.get(key)
    except TypeError:  # a list or an array among the values: checked every time
        return _checked_options(description, values, convention)
    if options is None:
        options = _checked_options(description, values, convention)
        if len(_options_seen) > 1024:  # a schedule makes a new lr every step: forget the old
            _options_seen.clear()
        _options_seen[key] = options
    return options


def _checked_options(
    description: Description, values: tuple[Any, ...], convention: Any
) -> tuple[float, ...]:
    if not isinstance(convention, str) or convention not in _CONVENTIONS:
        raise ValueError(f"convention must be 'torch' or 'keras', got {convention!r}")
    declared = _declared(description)
    named = dict(zip((h.name for h in declared), values))
    return native_values(description, declared, named, {"convention": _CONVENTIONS[convention]})


def _declared(description: Description) -> tuple[Hyperparameter, ...]:
    """The functional API spells every option as the description does."""
    return tuple(Hyperparameter(f.name) for f in description.fields if f.kind != "convention")


# Plans for the arrays of this thread's recent calls (a training loop passes the same params and
# states at every step). A plan keeps no reference to its arrays and steps only when the lists hold
# the objects it registered, at their addresses (step_if_same): a cached plan keeps no array
# alive, and a new array made at a dead one's address is stepped only if it is an array of the
# same memory, shape, dtype and flags (else the plan registers it anew). Per thread, so that one
# thread's options never reach another's step.
_MAX_PLANS = 16


class _PlanCache(threading.local):
    """This thread's plans by key (_step_cached), and ``last``: (id of the params list, plan,
    options) of the plan its last cached step took, which a loop passing the same list finds
    without building the key (the fast path). An id, not the list: the cache keeps no array
    alive; a list made since at the same address finds a plan that steps only its registered
    arrays (step_if_same)."""

    def __init__(self) -> None:
        self.plans: dict[tuple[str, int, int], tuple[Any, tuple[float, ...]]] = {}
        self.last: tuple[int, Any, Any] = (0, None, None)


_cache = _PlanCache()


def _low_precision(
    description: Description,
    count: int,
    states: list[list[Any] | None],
    masters: OptionalArrays,
    absmax: Mapping[str, OptionalArrays] | None,
    stochastic_rounding: Any,
    seed: Any,
) -> dict[str, Any]:
    scales = None
    if absmax is not None:
        if not isinstance(absmax, Mapping):
            raise TypeError("absmax must be a dict: state argument name -> list of scales")
        unknown = set(absmax) - set(description.plural_states)
        if unknown:
            raise ValueError(f"absmax: unknown states {sorted(unknown)}")
        scales = [
            _list(absmax[name], f"absmax[{name!r}]") if name in absmax else None
            for name in description.plural_states
        ]
        for name, role in zip(description.plural_states, scales):
            if role is not None and len(role) != count:
                # Else the step would say the first 8-bit state's absmax "is not given".
                raise ValueError(
                    f"absmax[{name!r}]: expected {count} arrays (one per param, None where its "
                    f"state is not 8-bit), got {len(role)}"
                )
    # A scale given is a state stored in 8 bits: the classes' state_dtype="int8".
    eight_bit = scales is not None and any(s is not None for role in scales if role for s in role)
    precision = Precision.of(
        state_dtype="int8" if eight_bit else None,
        stochastic_rounding=stochastic_rounding,
        seed=seed,
    )
    precision.check_algorithm(description, "absmax")
    for name, role, state in zip(description.plural_states, scales or (), states):
        for i, scale in enumerate(role or ()):
            if scale is not None and (state is None or i < len(state)):  # else the step says
                _check_scales(scale, None if state is None else state[i], f"{name}[{i}]")
    return {
        "masters": None if masters is None else _list(masters, "masters"),
        "absmax": scales,
        "rounding_seed": precision.rounding_seed,
    }


def _check_scales(scale: Any, state: Any, where: str) -> None:
    """The scales of 8-bit state ``where``, which the caller keeps and the step reads and
    writes: given for an 8-bit state only (uint8 codes: a float state would be stepped as it
    is, its scales ignored), and holding no NaN or negative value (an absmax is a block's
    largest |x|: one of those would turn its block's values NaN or flip their signs), as
    load_state_dict checks saved ones. The rest (dtype, size, overlaps) the step checks."""
    if cuda.is_device_array(state) and str(getattr(state, "dtype", "")).endswith("uint8"):
        return  # device memory: its values are not read here (docs/spec.md section 22)
    if not isinstance(state, np.ndarray) or state.dtype != np.uint8:
        kind = state.dtype if isinstance(state, np.ndarray) else type(state).__name__
        raise ValueError(
            f"absmax: scales are given for {where}, which is not an 8-bit state ({kind}, not "
            "uint8 codes)"
        )
    if isinstance(scale, np.ndarray) and scale.dtype.kind == "f" and not np.all(scale >= 0):
        raise ValueError(
            f"absmax: the scales of {where} hold a NaN or negative value; an absmax is a "
            "block's largest |x|, >= 0 (NaN is left out of it)"
        )


def _step_cached(
    description: Description,
    options: tuple[float, ...],
    params: list[Any],
    grads: list[Any],
    states: list[list[Any] | None],
    scale: float | None,
    step: int,
) -> bool:
    """A step through a cached plan (for device arrays, a fusedopt.cuda plan holding weak
    references to them, its tables on the device); False (nothing done) for lists that another
    thread changed while the plan was being made, or device arrays that take no weak reference."""
    if not params:
        return False
    device = type(params[0]) is not np.ndarray
    if device and not cuda.is_device_array(params[0]):
        return False
    plans = _cache.plans
    # The plan's key; the generated fast path (_fast_path) builds the same one inline.
    key = (description.name, len(params), id(params[0]))
    entry = plans.get(key)
    if entry is not None and isinstance(entry[0], cuda._CachedPlan) == device:
        plan, registered = entry
        changed = None if registered is options else options
        try:
            stepped = plan.step_if_same(params, states, grads, scale, step, changed)
        except BaseException:
            # Refused (nothing written), perhaps after taking the new options: forget the plan,
            # or a later call with the registered options would step with these.
            del plans[key]
            _cache.last = (0, None, None)
            raise
        if stepped:
            if changed is not None:
                plans[key] = (plan, options)
            _cache.last = (id(params), plan, options)
            return True
    if device:
        try:
            plan = cuda._CachedPlan(description.name, [options], params, states)
        except TypeError as error:
            if "weak reference" in str(error):
                return False  # not cached: the uncached path steps them
            raise
    else:
        plan = _core.Plan(
            description.name, [options], [0] * len(params), params, states, None, None, None, True
        )
    plans.pop(key, None)
    if len(plans) >= _MAX_PLANS:
        evicted, _ = plans.pop(next(iter(plans)))
        if _cache.last[1] is evicted:  # its tables, as large as its arrays are many, go with it
            _cache.last = (0, None, None)
    plans[key] = (plan, options)
    # Through step_if_same, as a cached plan steps: the arrays are held for the step only while
    # the lists still hold the very ones registered (another thread may have replaced one since
    # the plan was made); when not, the uncached path steps the lists' arrays.
    if not plan.step_if_same(params, states, grads, scale, step, None):
        return False
    _cache.last = (id(params), plan, options)
    return True


def _fast_path(d: Description, options: list[str], states: list[str]) -> str:
    """The start of a generated function: a call like the last one (the very same option
    objects, as a training loop passes them), with plain lists of the arrays a cached plan
    registered and no low-precision storage, grad scale or per-tensor scalars, steps through
    that plan, as ``_run`` would (``_step_cached``) but without its checks of the rarer
    arguments: they cost as much as the native step over one small tensor. Anything else, or a
    plan that refuses (its lists hold other arrays), goes on to ``_run``."""
    if d.scalars:  # their arrays are read back after every step: _run's path
        return ""
    counted = "type(step) is int and 0 < step <= 4611686018427387904"  # 2 ** 62, as _run's
    # Where the update reads no t, a call may leave it out (rounding to nearest reads none).
    step = "step" if d.uses_step else "1 if step is None else step"
    plain = [
        counted if d.uses_step else f"(step is None or {counted})",
        "masters is None",
        "absmax is None",
        "stochastic_rounding is False",
        "type(seed) is int",
        "seed == 0",
        # Plain lists: _run makes one of anything else (a single array, a tuple), and of a list
        # subclass by its own iteration, which the native step (reading the list) would bypass.
        "type(params) is list",
        "type(grads) is list",
        *(f"({name} is None or type({name}) is list)" for name in states),
    ]
    if d.takes_grad_scale:
        plain += ["grad_scale is None", "found_inf is None"]
    if d.uses_new_state:
        plain.append("first_step is False")
    same = "".join(f" and values[{k}] is {name}" for k, name in enumerate(options))
    state_lists = "(" + "".join(f"{s}, " for s in states) + ")"
    return (
        f"    if {' and '.join(plain)}:\n"
        "        last = _last_options[0]\n"
        "        values = last[2]\n"
        f"        if last[0] is _description and last[1] is convention{same}:\n"
        f"            states = {state_lists}\n"
        # The plan of the last cached step, when this is its params list (_PlanCache.last): a
        # loop's call, which finds it without the key (building it and looking it up cost a
        # tenth of a step over one small tensor).
        "            entry = _cache.last\n"
        "            if entry[0] == id(params) and entry[2] is last[3] and entry[1].step_if_same(\n"
        f"                    params, states, grads, None, {step}, None):\n"
        "                return\n"
        # One read of the first param: another thread may empty the list meanwhile.
        "            first = params[:1]\n"
        "            entry = first and _cache.plans.get((_name, len(params), id(first[0])))\n"
        "            if entry and entry[1] is last[3] and entry[0].step_if_same(\n"
        f"                    params, states, grads, None, {step}, None):\n"
        "                _cache.last = (id(params), entry[0], entry[1])\n"
        "                return\n"
    )


def _make(algorithm: str) -> Any:
    """``<algorithm>_`` with a real signature: generated source, so that a call costs what a
    hand-written function's call costs."""
    d = describe(algorithm)
    states = d.plural_states
    positional = ["params", "grads"]
    for k, name in enumerate(states):
        positional.append(name if d.always_used_states & (1 << k) else f"{name}=None")
    # Where the update reads no t, step only keys the stochastic rounding's bits: optional.
    keywords = ["step"] if d.uses_step else ["step=None"]
    options = [f for f in d.fields if f.kind != "convention"]
    for f in options:
        default = bool(f.default) if f.kind == "flag" else f.default
        keywords.append(f.name if f.name == "lr" else f"{f.name}={default!r}")
    scalars = [name + "s" for name in d.scalars]
    keywords += scalars
    if d.uses_new_state:
        keywords.append("first_step=False")
    if d.takes_grad_scale:
        keywords += ["grad_scale=None", "found_inf=None"]
    low_precision = ["masters=None", "absmax=None", "stochastic_rounding=False", "seed=0"]
    keywords += low_precision
    # The convention the description defaults to: LAMB's is Keras', the only one it has.
    default_convention = "keras" if d.field("convention").default == KERAS else "torch"
    keywords.append(f"convention={default_convention!r}")
    scalar_map = "{" + ", ".join(f"{s!r}: {a}" for s, a in zip(d.scalars, scalars)) + "}"
    arguments = [
        "_description",
        "(" + "".join(f"{f.name}, " for f in options) + ")",
        "convention",
        "params",
        "grads",
        "(" + "".join(f"{name}, " for name in states) + ")",
        "step",
        "first_step" if d.uses_new_state else "False",
        scalar_map if d.scalars else "None",
        "grad_scale" if d.takes_grad_scale else "None",
        "found_inf" if d.takes_grad_scale else "None",
        "masters",
        "absmax",
        "stochastic_rounding",
        "seed",
    ]
    source = (
        f"def {algorithm}_({', '.join(positional)}, *, {', '.join(keywords)}):\n"
        + _fast_path(d, [f.name for f in options], states)
        + f"    _run({', '.join(arguments)})\n"
    )
    namespace: dict[str, Any] = {
        "_run": _run,
        "_description": d,
        "_last_options": _last_options,
        "_cache": _cache,
        "_name": d.name,
    }
    exec(source, namespace)  # noqa: S102 - built from the native description only
    function = namespace[f"{algorithm}_"]
    function.__module__ = __name__
    function.__doc__ = _docstring(d, positional, keywords)
    return function


def _docstring(description: Description, positional: list[str], keywords: list[str]) -> str:
    """The math from the class of the same algorithm (PyTorch style where there is one), and the
    arguments."""
    from fusedopt import keras_numpy, optim

    classes = [
        c
        for module in (optim, keras_numpy)
        for c in vars(module).values()
        if isinstance(c, type) and getattr(c, "_algorithm", None) == description.name
    ]
    math = (classes[0].__doc__ or "").strip() if classes else ""
    step = (
        ""
        if description.uses_step
        else "\n\n``step`` (t of this call, 1 on the first) keys only the stochastic rounding's "
        "random bits: required with ``stochastic_rounding=True``, so that each call draws new ones."
    )
    return (
        f"One fused step of ``{description.name}`` over every tensor given, in place.\n\n"
        f"{math}\n\n"
        f"Arguments: {', '.join(positional)}; keyword-only: {', '.join(keywords)}. "
        f"See the module docstring.{step}"
    )


# One function per registered algorithm: adding an algorithm to the registry adds its function.
__all__ = [f"{name}_" for name in _core.algorithms()]
globals().update({f"{name}_": _make(name) for name in _core.algorithms()})
