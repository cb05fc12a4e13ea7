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

import copy
import functools
import inspect
import itertools
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

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
    quantizable_states: bool = True  # 8-bit state is offered (docs/spec.md section 22)
    nonnegative_states: int = 0  # bit k: state k takes the unsigned dynamic map

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

    def nonnegative(self, state: str) -> bool:
        """Whether 8-bit storage of this state takes the unsigned dynamic map."""
        return bool(self.nonnegative_states >> self.states.index(state) & 1)

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
        quantizable_states=info["quantizable_states"],
        nonnegative_states=info["nonnegative_states"],
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


def value_kinds(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a cache key of hyperparameter values holds beside the values themselves, which it
    compares with ==: each value's type (1.0 == True, yet a flag refuses 1.0) and each float's
    sign (-0.0 == 0.0, yet lr=-0.0 and lr=0.0 leave a -0.0 param with different signs, as in
    torch), inside tuples too. A NaN equals nothing, so a key holding one never matches. Read
    at every functional call, where Python is the cost: numbers go through map alone."""
    kinds = tuple(map(type, values))
    try:
        return kinds + tuple(map(math.copysign, itertools.repeat(1.0), values))
    except (TypeError, ValueError, OverflowError):  # a tuple, None, an array, an int past 1e308
        return kinds + tuple(
            value_kinds(v)
            if type(v) is tuple
            else math.copysign(1.0, v)
            if isinstance(v, float | np.floating)
            else None
            for v in values
        )


def native_values(
    description: Description,
    declared: Sequence[Hyperparameter],
    values: Mapping[str, Any],
    fixed: Mapping[str, float],
    checked: bool = True,
) -> tuple[float, ...]:
    """The native option values, in the description's field order, from a front end's values
    (``values`` by declared name; ``fixed`` by native name, e.g. the convention). Raises
    TypeError or ValueError naming the front end's hyperparameter. ``checked=False`` (torch's
    param_groups, which torch checks in its constructors only) takes any number, and a flag by
    its truth as torch's ``if maximize:`` does, refusing only what is no number."""
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
            if kind != "flag":
                native[native_name] = as_number(item, label)
            else:
                native[native_name] = float(as_flag(item, label) if checked else bool(item))
            spelled[native_name] = (label, item)
    result = []
    for f in description.fields:
        result.append(native[f.name] if f.name in native else f.default)
    result_tuple = tuple(result)
    if not checked:
        return result_tuple
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
    masters: Sequence[Any] | None = None,
    absmax: Sequence[Sequence[Any] | None] | None = None,
    rounding_seed: int | None = None,
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
            masters=masters, absmax=absmax, rounding_seed=rounding_seed,
        )  # fmt: skip
        return
    _core.step(
        algorithm, groups, group_of, steps, params, grads, states, new_state, scalars, grad_scale,
        masters=masters, rounding_seed=rounding_seed, absmax=absmax,
    )  # fmt: skip


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
    masters: Sequence[Any] | None = None,
    rounding_seed: int | None = None,
    absmax: Sequence[Sequence[Any] | None] | None = None,
) -> Plan:
    """A plan on the CPU core (``fusedopt._core.Plan``) or the CUDA backend: ``step_counts``
    (steps taken, one per param) and ``scalars`` are arrays the plan advances in place;
    ``masters`` the float32 master copies of 16-bit params (None where there is none);
    ``rounding_seed`` set: 16-bit params and states are rounded stochastically; ``absmax`` the
    per-block scales of 8-bit states, a list per state (None where no tensor has one)."""
    if is_device(params):
        return cuda.Plan(
            algorithm, groups, group_of, params, states,
            step_counts=step_counts, new_state=new_state, scalars=scalars, masters=masters,
            rounding_seed=rounding_seed, absmax=absmax,
        )  # fmt: skip
    return _core.Plan(
        algorithm, groups, group_of, params, states, step_counts, new_state, scalars,
        masters=masters, rounding_seed=rounding_seed, absmax=absmax,
    )  # fmt: skip


class StateView(dict):
    """A dict of an optimizer's state (the NumPy classes' ``state``) that refuses to be
    changed. torch's optimizer.state is
    where its step reads, so ``state[p]["step"] = 0`` takes effect there; here the state lives in
    the optimizer's own arrays and counts, and an assignment into this view would be silently
    lost. Buffers change in place (``state[i]["exp_avg"][...] = 0``); anything else goes through
    ``load_state_dict``."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "optimizer.state is a view of the optimizer's state: change a buffer in place "
            "(state[i]['exp_avg'][...] = x), or change the state through "
            "load_state_dict(state_dict())"
        )

    __setitem__ = __delitem__ = _refuse
    pop = popitem = clear = update = setdefault = __ior__ = _refuse  # type: ignore[assignment]

    def __copy__(self) -> dict[Any, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[Any, Any]:
        return copy.deepcopy(dict(self), memo)

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


def check_in_place(array: np.ndarray, name: str) -> None:
    """ValueError naming an array that a step cannot update in its own memory."""
    if not array.flags.c_contiguous:
        raise ValueError(
            f"{name} is not C-contiguous; fusedopt updates an array in its own memory, in order "
            "(np.ascontiguousarray would make a copy, not update it)"
        )
    if not array.flags.writeable:
        raise ValueError(f"{name} is read-only; a step writes it")


def byte_range(array: np.ndarray, name: str) -> tuple[int, int, str]:
    """An array's memory as :func:`first_overlap` takes it."""
    begin = array.__array_interface__["data"][0]
    return begin, begin + array.nbytes, name


def overlaps(extents: Iterable[tuple[int, int, Any]]) -> Iterator[tuple[Any, Any]]:
    """Of the tagged byte ranges ``(begin, end, tag)``, in address order, each one that overlaps
    an earlier one, with the earlier one that ends last, as their tags (the later one first);
    empty ranges overlap nothing. Every range that overlaps another is in some pair."""
    furthest: tuple[int, int, Any] | None = None  # the range that ends last so far
    for extent in sorted(e for e in extents if e[1] > e[0]):
        if furthest is not None and extent[0] < furthest[1]:
            yield extent[2], furthest[2]
        if furthest is None or extent[1] > furthest[1]:
            furthest = extent


def first_overlap(extents: Iterable[tuple[int, int, str]]) -> tuple[str, str] | None:
    """The first two of the named byte ranges ``(begin, end, name)`` that overlap, in address
    order (the later one first), or None (see :func:`overlaps`)."""
    return next(overlaps(extents), None)


def required_state(
    description: Description,
    entry: Mapping[str, Any],
    step: int,
    tracks_step: bool,
    states_at_construction: bool,
) -> list[str]:
    """What a saved per-param entry must hold (every front end's load). A missing one would not
    fail, it would start again beside the carried-over ones (a zero second moment under a
    trained first moment, ASGD's eta back at lr), where torch raises KeyError at the next step:

    - once stepped: every state the algorithm always keeps, and its scalars (the states that
      options add, such as amsgrad's, may be switched on later: they start then);
    - a class that counts steps saves a step with any state a step made (Adagrad's sum is made
      before the first step: ``states_at_construction``);
    - the scalars come together (one missing would load as 0.0, which no step makes)."""
    scalars = list(description.scalars)
    if step > 0:
        always = description.always_used_states
        return [n for k, n in enumerate(description.states) if always >> k & 1] + scalars
    required = scalars if any(name in entry for name in scalars) else []
    if tracks_step and not states_at_construction and entry:
        required = ["step", *required]
    return required


class PlanHolder:
    """Base of the optimizer classes over NumPy arrays: their lock and native plans, which
    neither a copy (``copy.deepcopy``, ``pickle``) nor a forked child may share. A plan holds its
    arrays' addresses and cannot be pickled, and in a child forked while another thread was in a
    step the lock (and the plan's own mutex) stay locked by a thread that is not there. Both get
    a new lock and no plan: the next step registers the arrays again.

    ``_plan_attributes``: each attribute that holds plans, and a function making its empty value.
    """

    _plan_attributes: ClassVar[Mapping[str, Callable[[], Any]]] = {}

    def _start_lock(self) -> None:
        # Reentrant: a step runs user code while it holds the lock (a grads sequence's
        # __getitem__, a hyperparameter's __float__), which may call back into the optimizer
        # (state_dict(), even step()), as it may in torch.optim; a Lock hung there.
        self._lock = threading.RLock()
        _live_optimizers.add(self)

    def _without_plans(self) -> dict[str, Any]:
        return {name: empty() for name, empty in self._plan_attributes.items()}

    def __getstate__(self) -> dict[str, Any]:
        state = {name: value for name, value in self.__dict__.items() if name != "_lock"}
        state.update(self._without_plans())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start_lock()


# Every optimizer with a lock and plans (the NumPy classes, fusedopt.torch): each has
# _plan_attributes and _start_lock.
_live_optimizers: weakref.WeakSet[Any] = weakref.WeakSet()
# Plans a forked child took from its optimizers. Never freed: a plan may have been in a step on
# another thread of the parent, and destroying its locked mutex is undefined.
_plans_left_by_fork: list[dict[str, Any]] = []


def _reset_optimizers_in_child() -> None:
    for optimizer in list(_live_optimizers):
        _plans_left_by_fork.append(
            {name: optimizer.__dict__.get(name) for name in optimizer._plan_attributes}
        )
        optimizer.__dict__.update(
            {name: empty() for name, empty in optimizer._plan_attributes.items()}
        )
        optimizer._start_lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_optimizers_in_child)


# ---- Low precision (docs/spec.md section 22) ---------------------------------------------------

SIXTEEN_BIT = ("bfloat16", "float16")
UPDATED_DTYPES = ("float32", "float64", *SIXTEEN_BIT)  # of params, grads and float states
STATE_DTYPES = (None, "float32", "bfloat16", "int8")
# 8-bit state: bitsandbytes' blocks and its smallest quantized tensor (smaller ones keep float32).
QUANT_BLOCK = 256
MIN_QUANTIZED_SIZE = 4096


def dtype_name(dtype: Any) -> str:
    """``"float32"``, ``"bfloat16"``, ... for a NumPy, ml_dtypes or torch dtype (or its name)."""
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = str(dtype)
    return name.removeprefix("torch.")


@functools.cache
def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a name; bfloat16 is ml_dtypes' (the NumPy bfloat16 of JAX)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name == "int8":  # 8-bit blockwise state: uint8 codes
        return np.dtype(np.uint8)
    return np.dtype(name)


@functools.cache
def _dynamic_map(nonnegative: bool) -> np.ndarray:
    return np.array(_core.dynamic_map(nonnegative), dtype=np.float32)


# Blocks (de)quantized at a time: the NumPy rule below makes ~50 bytes of temporaries per
# element, so a whole 8-bit state of a large model at once would need many times the memory that
# the 8-bit state exists to save.
_BLOCKS_AT_A_TIME = 256


def quantize_blockwise(values: Any, nonnegative: bool) -> tuple[np.ndarray, np.ndarray]:
    """float values as 8-bit state (codes, absmax per block of 256), by the kernels' rule:
    bitsandbytes' dynamic map, the largest code <= x / absmax or the next when strictly closer
    (for checkpoints loaded into an 8-bit optimizer; the kernels quantize during steps)."""
    x = np.asarray(values).ravel()
    blocks = -(-x.size // QUANT_BLOCK)
    codes = np.empty(x.size, np.uint8)
    absmax = np.empty(blocks, np.float32)
    code = _dynamic_map(nonnegative)
    for first in range(0, blocks, _BLOCKS_AT_A_TIME):
        count = min(_BLOCKS_AT_A_TIME, blocks - first)
        part = slice(first * QUANT_BLOCK, (first + count) * QUANT_BLOCK)
        chunk = np.asarray(x[part], dtype=np.float32)
        padded = np.zeros(count * QUANT_BLOCK, np.float32)
        padded[: chunk.size] = chunk
        magnitudes = np.abs(padded).reshape(count, QUANT_BLOCK)
        # As the kernels: NaN is left out of the absmax, an infinity is not (the block's absmax
        # is inf, so its finite values quantize as 0, and the infinities, inf / inf = NaN, take
        # NaN's code 0).
        scales = np.where(np.isnan(magnitudes), np.float32(0), magnitudes).max(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            normed = (padded.reshape(count, QUANT_BLOCK) / scales[:, None]).ravel()[: chunk.size]
        left = np.clip(np.searchsorted(code, normed, side="right") - 1, 0, 255)
        right = np.minimum(left + 1, 255)
        closer = np.abs(normed - code[right]) < np.abs(normed - code[left])
        chosen = np.where(closer & (left < 255), right, left)
        codes[part] = np.where(np.isnan(normed), 0, chosen)
        absmax[first : first + count] = scales
    return codes.reshape(np.shape(values)), absmax


def quantized_full(shape: tuple[int, ...], value: float, nonnegative: bool) -> tuple:
    """A new 8-bit state of this shape, every element ``value``: (codes, absmax). Every block
    holds the same values (a last, partial block's padding is 0, under |value|), so one element
    quantized gives every code and every absmax."""
    code, scale = quantize_blockwise(np.full(1, value, np.float32), nonnegative)
    size = math.prod(shape)
    return np.full(shape, code[0], np.uint8), np.full(-(-size // QUANT_BLOCK), scale[0])


def dequantize_blockwise(codes: Any, absmax: Any, nonnegative: bool) -> np.ndarray:
    """8-bit state's float32 values: map[code] * absmax of its block."""
    flat = np.asarray(codes, dtype=np.uint8).ravel()
    scales = np.asarray(absmax, dtype=np.float32)
    values = np.empty(flat.size, np.float32)
    code = _dynamic_map(nonnegative)
    step = _BLOCKS_AT_A_TIME * QUANT_BLOCK
    for first in range(0, flat.size, step):
        chunk = flat[first : first + step]
        blocks = scales[first // QUANT_BLOCK : first // QUANT_BLOCK + _BLOCKS_AT_A_TIME]
        scale = np.repeat(blocks, QUANT_BLOCK)[: chunk.size]
        np.multiply(code[chunk], scale, out=values[first : first + chunk.size])
    return values.reshape(np.shape(codes))


def checked_absmax(value: Any, size: int, where: str) -> np.ndarray:
    """A saved 8-bit state's per-block scales (``where`` names them) for a tensor of ``size``
    elements, as a new float32 array. An absmax is the largest |x| of its block: >= 0, +inf for a
    block holding an infinity, never NaN (NaN is left out of it). A NaN, negative or
    float32-overflowing one would make its block's values NaN or flip their sign at the next
    step, so it is refused: TypeError for None or values that are not real numbers, ValueError
    for the rest."""
    try:
        array = None if value is None else np.asarray(value)
    except (TypeError, ValueError):
        array = None
    if array is None or array.dtype.kind not in "fiu":
        what = f"dtype {array.dtype}" if array is not None else repr(value)[:80]
        raise TypeError(f"state_dict: {where} must be an array of real numbers, got {what}")
    blocks = -(-size // QUANT_BLOCK)
    if array.size != blocks:
        raise ValueError(
            f"state_dict: {where} must have {blocks} values (one per block of {QUANT_BLOCK}), "
            f"got {array.size}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        scales = array.astype(np.float32).ravel()
        wide = array.astype(np.float64).ravel()
    if np.isnan(wide).any() or (wide < 0).any():
        raise ValueError(
            f"state_dict: {where} holds a NaN or negative value; an absmax is a block's largest "
            "|x|, >= 0 (NaN is left out of it)"
        )
    if (np.isinf(scales) & np.isfinite(wide)).any():
        raise ValueError(f"state_dict: {where} holds a finite value too large for a float32")
    return scales


def updates_dtype(dtype: np.dtype) -> bool:
    """Whether fusedopt updates NumPy arrays of this dtype (native byte order only)."""
    return dtype.isnative and dtype_name(dtype) in UPDATED_DTYPES


def dtype_refused(dtype: np.dtype, label: str) -> TypeError:
    """The error for an array ``label`` whose dtype fusedopt does not update (``>f4`` is
    float32 in the other byte order: said so, as the grads' check says it)."""
    order = "" if dtype.isnative else " (non-native byte order)"
    return TypeError(
        f"{label} has dtype {dtype}{order}; fusedopt updates float32, float64, bfloat16 "
        "(ml_dtypes) and float16"
    )


@dataclass(frozen=True)
class Precision:
    """How an optimizer stores what it updates, the same options on every front end:

    - ``state_dtype``: None (each state has its param's dtype, as torch keeps it), ``"float32"``
      or ``"bfloat16"`` (for float32, bfloat16 and float16 params);
    - ``master_weights``: a float32 copy of each bfloat16/float16 param, kept in the optimizer's
      state, is what the step updates; the param is written as its rounding;
    - ``stochastic_rounding``: bfloat16/float16 params and states are rounded stochastically
      (unbiased), from random bits keyed by (``seed``, step, element index), the same for any
      thread count or ISA; otherwise to nearest, ties to even.

    All math is float32 for 16-bit storage.
    """

    state_dtype: str | None = None
    master_weights: bool = False
    stochastic_rounding: bool = False
    seed: int = 0

    @classmethod
    def of(
        cls,
        state_dtype: Any = None,
        master_weights: Any = False,
        stochastic_rounding: Any = False,
        seed: Any = 0,
    ) -> Precision:
        name = None if state_dtype is None else dtype_name(state_dtype)
        if name not in STATE_DTYPES:
            raise ValueError(
                f"state_dtype: must be None, 'float32', 'bfloat16' or 'int8', got {state_dtype!r}"
            )
        for flag, value in (
            ("master_weights", master_weights),
            ("stochastic_rounding", stochastic_rounding),
        ):
            if not isinstance(value, bool | np.bool_):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        return cls(name, bool(master_weights), bool(stochastic_rounding), int(seed))

    @classmethod
    def popped(cls, arguments: dict[str, Any]) -> Precision:
        """The options taken out of a constructor's ``arguments`` (absent ones at their
        defaults)."""
        return cls.of(
            **{name: arguments.pop(name) for name in PRECISION_OPTIONS if name in arguments}
        )

    def check(self, param_dtypes: Sequence[str]) -> None:
        """ValueError naming the option that does not apply to params of these dtypes."""
        sixteen = any(d in SIXTEEN_BIT for d in param_dtypes)
        # First: a float64 param refuses any state_dtype, whatever the other params are.
        if self.state_dtype is not None and "float64" in param_dtypes:
            raise ValueError(
                f"state_dtype: {self.state_dtype!r} does not apply to float64 params, whose "
                "state is float64"
            )
        if self.master_weights and not sixteen:
            raise ValueError(
                "master_weights: master copies are for bfloat16 and float16 params; these params "
                f"are {sorted(set(param_dtypes))}"
            )
        if self.stochastic_rounding and not sixteen and self.state_dtype != "bfloat16":
            raise ValueError(
                "stochastic_rounding: nothing is stored in 16 bits (the params are "
                f"{sorted(set(param_dtypes))} and state_dtype is {self.state_dtype!r})"
            )

    def check_algorithm(self, description: Description, option: str = "state_dtype") -> None:
        """ValueError naming ``option`` (what asked for 8-bit state: the classes'
        ``state_dtype``, the functional API's ``absmax``) where the algorithm's states cannot be
        8-bit."""
        if self.state_dtype == "int8" and not description.quantizable_states:
            raise ValueError(
                f"{option}: 8-bit state does not apply to {description.name}, whose states "
                f"{list(description.states)} are not moments that 8 bits can hold"
            )

    def state_dtype_for(self, param_dtype: str, size: int = MIN_QUANTIZED_SIZE) -> str:
        """The dtype of a param's states; 8-bit state only for tensors of 4096 elements or more
        (smaller ones keep float32, as bitsandbytes does)."""
        if self.state_dtype == "int8":
            return "int8" if size >= MIN_QUANTIZED_SIZE else "float32"
        return self.state_dtype or param_dtype

    def needs_master(self, param_dtype: str) -> bool:
        return self.master_weights and param_dtype in SIXTEEN_BIT

    @property
    def rounding_seed(self) -> int | None:
        return self.seed if self.stochastic_rounding else None


FULL_PRECISION = Precision()  # the default: nothing stored in fewer bits than the param
# The options' names, keyword-only on every optimizer class.
PRECISION_OPTIONS = ("state_dtype", "master_weights", "stochastic_rounding", "seed")


def with_precision_options(parameters: Sequence[inspect.Parameter]) -> list[inspect.Parameter]:
    """A constructor's parameters and then the low-precision options, keyword-only with their
    defaults, before any ``**kwargs`` (once: options already there are replaced)."""
    options = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                          default=Precision.__dataclass_fields__[name].default)
        for name in PRECISION_OPTIONS
    ]  # fmt: skip
    own = [p for p in parameters if p.name not in PRECISION_OPTIONS]
    variadic = [p for p in own if p.kind is inspect.Parameter.VAR_KEYWORD]
    return [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD] + options + variadic


def skip_step(found_inf: Any) -> bool:
    """PyTorch's fused found_inf: a nonzero value skips the whole step (spec section 8)."""
    return found_inf is not None and as_number(found_inf, "found_inf") != 0.0
