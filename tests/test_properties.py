"""Property-based tests of the public API (hypothesis).

The contract, for every entry point: a call either succeeds with the result that
``fusedopt.reference`` (the float64 oracle) computes from copies taken before the call, or raises
TypeError/ValueError whose message names the offending argument, and then every buffer it was
given is bit-identical to before. Any other exception (KeyError, AttributeError, OverflowError,
SystemError, a crash) is a bug.

- Functional API (``fusedopt.functional.<name>_``, every algorithm, both conventions): random
  dtypes, shapes (0-3 dims, sizes 0 included), strided, transposed, reversed, read-only and
  misaligned views, views aliasing each other or a param, lists of the wrong length, None where
  optional or required, hyperparameters valid and invalid (negative, NaN, inf, strings, None,
  one-element arrays and lists, huge ints), ``step`` values, and the per-tensor scalar arrays.
  What must be refused is derived from the objects actually passed (their flags, dtypes and
  memory extents), not from how they were made. A nonzero ``found_inf`` skips the call before
  anything is looked at, so such a call may only leave everything as it was.
- Functional calls in a loop over the same params and states (the API caches a plan for them),
  with options that change, come back, or come back spelled differently, and refused calls
  in between: each call is checked on its own.
- PyTorch-convention classes: construction and two steps over such params and grads, with
  param groups and hyperparameters changed between steps.
- ``load_state_dict`` with corrupted state dicts (nested and flat).
- Keras-convention ``apply`` with clip options, None grads and bad grads.

Every example is reproducible: the settings derandomize hypothesis (no example database), so CI
runs the same examples each time. The tests at the end are the library bugs these properties
found, each reduced to a minimal reproduction, kept as regression tests now that they are fixed.
While a bug is open, mark its reproduction ``xfail(strict=True)`` and keep the properties clear of
its trigger, so that they go on exploring the rest.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fusedopt
import fusedopt.functional as F
import fusedopt.keras_numpy as fk
from conftest import checksum
from fusedopt import reference
from fusedopt._engine import describe

# Derandomized: the same examples on every run (CI must be reproducible), no example database.
SETTINGS = settings(deadline=None, derandomize=True, database=None)

NAN, INF = math.nan, math.inf


# ============================================================================ shared helpers


@dataclass(frozen=True)
class Problem:
    """Something wrong with a call: the substrings a refusal may name, the error it should be,
    and whether the call must be refused (False: refusing it or giving the right result are
    both fine)."""

    labels: tuple[str, ...]
    error: type | None = None
    must: bool = True
    what: str = ""  # for buffers: dtype, shape, layout (contiguity, read-only) or overlap

    def named_in(self, message: str) -> bool:
        return any(label in message for label in self.labels)


def problem(
    label: str | tuple[str, ...], error: type | None = None, must: bool = True, what: str = ""
) -> Problem:
    return Problem((label,) if isinstance(label, str) else tuple(label), error, must, what)


def check_refusal(error: BaseException, problems: list[Problem]) -> None:
    """A TypeError/ValueError that names one of the problems (of its kind when there is one)."""
    message = f"{type(error).__name__}: {error}"
    assert problems, f"a valid call was refused: {message}"
    named = [p for p in problems if p.named_in(str(error))]
    assert named, f"{message!r} names none of {[p.labels for p in problems]}"
    if len(problems) == 1 and problems[0].error is not None:
        assert isinstance(error, problems[0].error), f"{message}: expected {problems[0].error}"


def tolerance(dtype: Any) -> tuple[float, float]:
    """(rtol, atol factor) of a one-step kernel result against the float64 oracle."""
    return (2e-4, 2e-4) if np.dtype(dtype) == np.float32 else (1e-9, 1e-9)


def assert_close(
    actual: Any, expected: Any, dtype: Any, what: str, rtol: float = 0.0, before: Any = None
) -> None:
    """``rtol``: an error relative to the values that this step's own rounding allows; with
    ``before`` (the values before the step), relative to how far the step moved them too (a
    result near 0 may be a large update that cancelled the old value)."""
    got = np.asarray(actual, dtype=np.float64)
    want = np.asarray(expected, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    r, a = tolerance(dtype)
    r = max(r, rtol)
    finite = want[np.isfinite(want)]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    atol = a * scale
    if before is not None and rtol:
        with np.errstate(invalid="ignore"):
            moved = np.abs(want - np.asarray(before, dtype=np.float64))
        moved = moved[np.isfinite(moved)]
        atol = max(atol, rtol * float(np.max(moved))) if moved.size else atol
    np.testing.assert_allclose(got, want, rtol=r, atol=atol, equal_nan=True, err_msg=what)


def snapshot(objects: list[Any]) -> list[Any]:
    """What every object holds, bytes and all: arrays by checksum (with their flags), other
    objects by a deep copy."""
    result = []
    for o in objects:
        if isinstance(o, np.ndarray):
            result.append(("array", o.dtype.str, o.shape, checksum(o)))
        else:
            result.append(("object", copy.deepcopy(o)))
    return result


def same_snapshot(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _same(x: Any, y: Any) -> bool:
    try:
        equal = x == y
        return bool(np.all(equal)) if not isinstance(equal, bool) else equal
    except Exception:  # noqa: BLE001 - arrays inside: compare their reprs
        return repr(x) == repr(y)


# ============================================================================ hyperparameters


def _non_negative(x: float) -> bool:
    return x >= 0 and math.isfinite(x)


def _below_one(x: float) -> bool:
    return 0 <= x < 1


def _unit(x: float) -> bool:
    return 0 <= x <= 1


def _number(x: float) -> bool:
    return not math.isnan(x)


_ADAM_LIKE = {
    "lr": _non_negative,
    "beta1": _below_one,
    "beta2": _below_one,
    "eps": _non_negative,
    "weight_decay": _non_negative,
}

# The native checks (csrc/math/<name>.h), written again here: option by option.
RULES: dict[str, dict[str, Callable[[float], bool]]] = {
    "sgd": {
        **{k: _non_negative for k in ("lr", "momentum", "weight_decay")},
        "dampening": _number,  # torch checks none
    },
    "adagrad": {
        k: _non_negative
        for k in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    },
    "rmsprop": {k: _non_negative for k in ("lr", "alpha", "eps", "weight_decay", "momentum")},
    "adam": _ADAM_LIKE,
    "adadelta": {
        "lr": _non_negative,
        "rho": _unit,
        "eps": _non_negative,
        "weight_decay": _non_negative,
    },
    "adamax": _ADAM_LIKE,
    "nadam": {**_ADAM_LIKE, "momentum_decay": _non_negative},
    "radam": _ADAM_LIKE,
    "rprop": {
        "lr": _non_negative,
        "etaminus": lambda x: 0 < x < 1,
        "etaplus": lambda x: x > 1,
        "step_size_min": _number,
        "step_size_max": _number,
    },
    "asgd": {
        "lr": _non_negative,
        "weight_decay": _non_negative,
        "lambd": _number,
        "alpha": _number,
        "t0": _number,
    },
    "lion": {"lr": _non_negative, "beta1": _unit, "beta2": _unit, "weight_decay": _non_negative},
    "lamb": _ADAM_LIKE,
}
CONVENTIONS = {
    "rprop": ("torch",),
    "asgd": ("torch",),
    "radam": ("torch",),
    "lamb": ("keras",),
}
# How an option that fails its rule is named in a message (rprop's step sizes share one rule).
OPTION_LABEL = {"step_size_min": "step_size", "step_size_max": "step_size"}


def option_problems(algorithm: str, convention: str, native: dict[str, float]) -> list[Problem]:
    """The options (native names, plain values) that the native checks refuse."""
    problems = []
    if convention not in CONVENTIONS.get(algorithm, ("torch", "keras")):
        problems.append(problem("convention", ValueError))
    for name, rule in RULES[algorithm].items():
        if name in native and not rule(native[name]):
            problems.append(problem(OPTION_LABEL.get(name, name), ValueError))
    keras = convention == "keras"
    known = native.get
    if algorithm == "sgd":
        if keras and "momentum" in native and not _unit(native["momentum"]):
            problems.append(problem("momentum", ValueError))
        if not keras and known("nesterov") and "momentum" in native and "dampening" in native:
            if not (native["momentum"] > 0 and native["dampening"] == 0):
                problems.append(problem("nesterov", ValueError))
    if algorithm == "lion" and keras and "beta1" in native and not native["beta1"] > 0:
        problems.append(problem("beta1", ValueError))
    return problems


# Values the reference handles well (one step, O(1) data), by native option name.
NICE = {
    "lr": [0.0, 1e-3, 0.01, 0.1, 0.5, 1.0],
    "momentum": [0.0, 0.5, 0.9],
    "dampening": [0.0, 0.1, 0.5],
    "weight_decay": [0.0, 1e-2, 0.1],
    "lr_decay": [0.0, 0.01, 0.5],
    "initial_accumulator_value": [0.0, 0.1, 1.0],
    "eps": [1e-10, 1e-8, 1e-3],
    "alpha": [0.0, 0.5, 0.9, 0.99],
    "beta1": [0.0, 0.5, 0.9],
    "beta2": [0.0, 0.9, 0.999],
    "rho": [0.0, 0.5, 0.9, 1.0],
    "momentum_decay": [0.0, 4e-3, 0.1],
    "etaminus": [0.1, 0.5, 0.9],
    "etaplus": [1.1, 1.2, 2.0],
    "step_size_min": [0.0, 1e-6, 1e-3],
    "step_size_max": [1.0, 50.0, INF],
    "lambd": [0.0, 1e-4, 0.1],
    "t0": [0.0, 1.0, 5.0, 1e6],
}
NICE_BY_ALGORITHM = {
    ("asgd", "alpha"): [0.0, 0.75, 1.0],
    ("lion", "beta1"): [0.0, 0.5, 0.9, 1.0],
    ("lion", "beta2"): [0.0, 0.9, 0.99, 1.0],
}
# Numbers that some rule refuses; each option draws the ones its own rule refuses.
WILD = [-1.0, -1e-12, NAN, INF, -INF, 1.0, 1.5, 2.0, 0.0]
# Not numbers at all (the huge int is a number no float holds).
NOT_NUMBERS = ["0.1", None, [0.1, 0.2], [], {"lr": 0.1}, 1j, np.array([0.1, 0.2])]
HUGE_INT = 10**400


def nice_values(algorithm: str, name: str, keras: bool = False) -> list[float]:
    if keras and name == "beta2" and algorithm in ("adam", "lamb"):
        # Keras' v + (g*g - v)*(1 - beta_2) cancels catastrophically in float32 at beta_2 = 0.
        return [0.5, 0.9, 0.999]
    return NICE_BY_ALGORITHM.get((algorithm, name), NICE[name])


@st.composite
def number_value(
    draw: Any, nice: list[float], rule: Callable[[float], bool], label: str, bad: int = 2
) -> Any:
    """(value as passed, plain float or None, problems) for a number option; ``bad`` (0-10):
    how often it is a bad one."""
    kind = "nice"
    if bad and draw(st.integers(0, 9)) < bad:
        kind = draw(st.sampled_from(["wild", "not_number"]))
    if kind == "wild":
        refused = [v for v in WILD if not rule(v)] or [NAN]
        v = draw(st.sampled_from(refused))
        return v, None, [problem(label, ValueError)]
    if kind == "not_number":
        v = draw(st.sampled_from(NOT_NUMBERS + [HUGE_INT]))
        return v, None, [problem(label, (TypeError, ValueError))]
    plain = draw(st.sampled_from(nice))
    # Mostly plain floats, as most callers pass them (and as the caches key them).
    forms = ["float"] * 6 + ["np64", "np32", "array0", "array1", "list1", "int"]
    form = draw(st.sampled_from(forms))
    if form == "np32":
        plain = float(np.float32(plain))
        if not rule(plain):  # rounding moved it out of range: keep the float
            form = "float"
            plain = float(draw(st.sampled_from(nice)))
    value: Any = {
        "float": lambda x: float(x),
        "np64": np.float64,
        "np32": np.float32,
        "array0": lambda x: np.array(x),
        "array1": lambda x: np.array([x]),
        "list1": lambda x: [x],
        "int": lambda x: int(x) if float(x).is_integer() else float(x),
    }[form](plain)
    return value, float(plain), []


@st.composite
def flag_value(draw: Any, label: str, bad: int = 2) -> Any:
    if bad and draw(st.integers(0, 9)) < bad:
        bad = [2, -1, 0.5, "True", None, [True], 1.0, np.float64(1.0)]  # 1.0 == True
        return draw(st.sampled_from(bad)), None, [problem(label, TypeError)]
    plain = draw(st.booleans())
    form = draw(st.sampled_from([bool, bool, bool, int, np.bool_, np.int64]))
    return form(plain), plain, []


# ============================================================================ buffers


LAYOUTS_OK = ["plain"] * 8 + ["pooled"] * 3 + ["misaligned"] * 2
LAYOUTS_BAD = [
    "overlap",
    "same",
    "view",
    "strided",
    "reversed",
    "transposed",
    "readonly",
    "dtype:int32",
    "dtype:float16",
    "dtype:complex64",
    "dtype:>f4",
    "dtype:other",
    "shape",
    "none",
    "list",
]


@st.composite
def layouts(draw: Any, bad_rate: int) -> tuple[Any, ...]:
    """How one buffer is made: ("plain",), ("overlap", k, delta), ...; ``bad_rate`` in 0-10."""
    if draw(st.integers(0, 9)) >= bad_rate:
        return (draw(st.sampled_from(LAYOUTS_OK)),)
    kind = draw(st.sampled_from(LAYOUTS_BAD))
    if kind == "overlap":
        return (kind, draw(st.integers(0, 7)), draw(st.integers(-70, 70)))
    if kind in ("same", "view"):
        return (kind, draw(st.integers(0, 15)))
    if kind == "shape":
        return (kind, draw(st.integers(0, 2)))
    return (kind,)


class Arena:
    """Makes the buffers of one call from layout specs and remembers every piece of memory."""

    POOL = 4096

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.pools: dict[str, np.ndarray] = {}
        self.cursor: dict[str, int] = {}
        self.pooled: list[tuple[str, int]] = []  # (dtype, start) of each pooled buffer
        self.arrays: list[np.ndarray] = []  # every array made, in order
        self.memory: list[np.ndarray] = []  # the arrays whose bytes must not change

    def values(self, shape: tuple[int, ...], positive: bool) -> np.ndarray:
        v = self.rng.standard_normal(shape)
        return np.abs(v) + 0.1 if positive else v

    def _pool(self, dtype: np.dtype) -> np.ndarray:
        if dtype.str not in self.pools:
            self.pools[dtype.str] = np.zeros(self.POOL, dtype)
            self.cursor[dtype.str] = 0
            self.memory.append(self.pools[dtype.str])
        return self.pools[dtype.str]

    def _carve(self, dtype: np.dtype, start: int, size: int) -> np.ndarray | None:
        pool = self._pool(dtype)
        if start + size > self.POOL:
            return None
        self.pooled.append((dtype.str, start))
        self.cursor[dtype.str] = max(self.cursor[dtype.str], start + size + 3)
        return pool[start : start + size]

    def make(
        self, spec: tuple[Any, ...], shape: tuple[int, ...], dtype: Any, positive: bool
    ) -> Any:
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        kind = spec[0]
        values = self.values(shape, positive)
        a: Any
        if kind == "none":
            return None
        if kind == "list":
            return values.tolist()
        if kind in ("same", "view"):
            if not self.arrays:
                kind = "plain"
            else:
                target = self.arrays[spec[1] % len(self.arrays)]
                a = target if kind == "same" else target[...]
                self.arrays.append(a)
                return a
        if kind == "overlap":
            same_dtype = [s for d, s in self.pooled if d == dtype.str]
            if same_dtype:
                start = max(0, same_dtype[spec[1] % len(same_dtype)] + spec[2])
                flat = self._carve(dtype, start, size)
                if flat is not None:
                    a = flat.reshape(shape)
                    a[...] = values
                    self.arrays.append(a)
                    return a
            kind = "pooled"
        if kind == "pooled":
            flat = self._carve(dtype, self.cursor.get(dtype.str, 0), size)
            if flat is None:
                kind = "plain"
            else:
                a = flat.reshape(shape)
        if kind == "misaligned":
            raw = bytearray(size * dtype.itemsize + 1)
            a = np.frombuffer(raw, dtype=dtype, count=size, offset=1).reshape(shape)
            self.memory.append(a)
        elif kind in ("strided", "reversed", "transposed") and len(shape) >= 1:
            if kind == "strided":
                base = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)
                a = base[..., ::2]
            elif kind == "reversed":
                base = np.zeros(shape, dtype)
                a = base[::-1]
            else:
                base = np.zeros(shape[::-1], dtype)
                a = base.T
            self.memory.append(base)
        elif kind.startswith("dtype:"):
            name = kind.split(":", 1)[1]
            if name == "other":
                other = np.float64 if dtype == np.float32 else np.float32
                a = np.zeros(shape, other)
            else:
                a = np.zeros(shape, np.dtype(name))
        elif kind == "shape":
            bad = [shape + (1,), shape[:-1] + (shape[-1] + 1,) if shape else (1,), (2,) + shape]
            a = np.zeros(bad[spec[1] % 3], dtype)
            values = self.values(a.shape, positive)
        elif kind != "pooled":
            a = np.zeros(shape, dtype)
        a[...] = values.astype(a.dtype) if a.dtype.kind != "c" else values
        if kind == "readonly":
            a.flags.writeable = False
        self.arrays.append(a)
        self.memory.append(a)
        return a


def native_float(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.dtype in (np.float32, np.float64) and a.dtype.isnative


def extent(a: np.ndarray) -> tuple[int, int]:
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def buffer_problems(
    roles: dict[str, Any],
    counts: dict[str, int],
    n: int,
    written: dict[str, bool],
    required: dict[str, bool],
    label: Callable[[str, int], str],
    index_label: Callable[[str], tuple[str, ...]] = lambda role: (role,),
) -> list[Problem]:
    """What the core refuses among the buffers of a step, found from the objects themselves.

    ``roles``: role -> list of objects (None: no list); ``counts``: the length of each role's
    list as given; ``required``: whether a state role is used (so None is missing)."""
    problems: list[Problem] = []
    extents = []
    params = roles["params"]
    for role, items in roles.items():
        if items is None:
            if required.get(role) and n > 0:
                problems.append(problem(index_label(role), ValueError))
            continue
        if counts[role] != n:
            problems.append(problem(index_label(role), ValueError))
            for i in range(n, counts[role]):  # extra items are looked at too
                if items[i] is not None and not isinstance(items[i], np.ndarray):
                    problems.append(problem(label(role, i), TypeError))
        for i in range(min(n, counts[role])):
            a = items[i]
            name = label(role, i)
            if a is None:
                if role in ("params", "grads") or required.get(role):
                    error = ValueError if role not in ("params", "grads") else TypeError
                    problems.append(problem(name, error))
                continue
            if not isinstance(a, np.ndarray):
                problems.append(problem(name, TypeError))
                continue
            swapped = a.dtype.kind == "f" and not a.dtype.isnative
            p = params[i] if role != "params" and i < len(params) else None
            like = isinstance(p, np.ndarray) and native_float(p)  # a param to be like
            # The shape whatever the dtype: a dtype problem may not have to be refused (Keras'
            # clipping makes new grads of any float dtype), a shape problem does.
            if like and a.shape != p.shape:
                problems.append(problem((name, label("params", i)), ValueError, what="shape"))
            if not native_float(a):
                problems.append(problem(name, TypeError, what="byteorder" if swapped else "dtype"))
                if not swapped or like:
                    continue
            elif like and a.dtype != p.dtype:
                problems.append(problem((name, label("params", i)), TypeError, what="dtype"))
            if not a.flags.c_contiguous:
                problems.append(problem(name, ValueError, what="layout"))
            elif written[role] and not a.flags.writeable:
                problems.append(problem(name, ValueError, what="layout"))
            elif a.size:
                extents.append((*extent(a), written[role], name))
    for k, (b0, e0, w0, n0) in enumerate(extents):
        for b1, e1, w1, n1 in extents[k + 1 :]:
            if (w0 or w1) and b0 < e1 and b1 < e0:
                problems.append(problem(("overlaps", n0, n1), ValueError, what="overlap"))
    return problems


# ============================================================================ 1. functional API

ALGORITHMS = [name[:-1] for name in F.__all__]
# The reference's names in the Keras convention: options, then each state (native order).
KERAS_OPTIONS = {
    "lr": "learning_rate",
    "eps": "epsilon",
    "beta1": "beta_1",
    "beta2": "beta_2",
}
KERAS_STATES = {
    "sgd": ("momentum",),
    "adagrad": ("accumulator",),
    "rmsprop": ("velocity", "momentum", "average_gradient"),
    "adam": ("momentum", "velocity", "velocity_hat"),
    "adadelta": ("accumulated_grad", "accumulated_delta_var"),
    "adamax": ("momentum", "norm"),
    "nadam": ("momentum", "velocity"),
    "lion": ("momentum",),
    "lamb": ("momentum", "velocity"),
}
KERAS_REFERENCE_OPTIONS = {  # the options each keras_* reference function takes (native names)
    "sgd": ("lr", "momentum", "nesterov", "weight_decay"),
    "adagrad": ("lr", "eps", "weight_decay"),
    "rmsprop": ("lr", "alpha", "momentum", "eps", "centered", "weight_decay"),
    "adam": ("lr", "beta1", "beta2", "eps", "amsgrad", "weight_decay"),
    "adadelta": ("lr", "rho", "eps", "weight_decay"),
    "adamax": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "nadam": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "lion": ("lr", "beta1", "beta2", "weight_decay"),
    "lamb": ("lr", "beta1", "beta2", "eps", "weight_decay"),
}
POSITIVE_STATES = {
    "sum",
    "square_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "acc_delta",
    "exp_inf",
    "step_size",
}


def states_used(algorithm: str, native: dict[str, float]) -> set[str]:
    """The states an algorithm reads and writes under these options (csrc/math/<name>.h)."""
    d = describe(algorithm)
    if algorithm == "sgd":
        return {"momentum_buffer"} if native["momentum"] != 0 else set()
    if algorithm == "rmsprop":
        used = {"square_avg"}
        used |= {"momentum_buffer"} if native["momentum"] > 0 else set()
        return used | ({"grad_avg"} if native["centered"] else set())
    if algorithm == "adam":
        return {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if native["amsgrad"] else set())
    return set(d.states)


def flat_reference(step: Callable[..., Any], p: np.ndarray, g: np.ndarray, state: dict) -> Any:
    """The reference on 1-D copies (reference.torch_rprop fails on 0-d arrays: np.sign of a
    0-d array is a scalar), reshaped back. Every algorithm is element-wise but LAMB, whose
    norms do not depend on the shape."""
    shape = p.shape
    flat_state = {k: v.reshape(-1) if isinstance(v, np.ndarray) else v for k, v in state.items()}
    with np.errstate(all="ignore"):  # NaN where the kernels make NaN too (compared as equal)
        new_p, new_state = step(p.reshape(-1), g.reshape(-1), flat_state)
    new_state = {
        k: v.reshape(shape) if isinstance(v, np.ndarray) and v.size == p.size else v
        for k, v in new_state.items()
    }
    return new_p.reshape(shape), new_state


@dataclass
class FunctionalCase:
    """One generated call of ``fusedopt.functional.<algorithm>_`` (printed by hypothesis)."""

    algorithm: str
    convention: Any
    n: int
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    containers: dict[str, str]  # role -> list, tuple, bare, none, short, long, str
    layouts: dict[str, list[tuple[Any, ...]]]  # role -> layout of each tensor's buffer
    options: dict[str, Any]  # keyword -> value as passed (missing: the default)
    step: Any  # "<omitted>" when not passed
    extras: dict[str, Any]  # first_step, grad_scale, found_inf
    scalars: dict[str, tuple[str, list[float]]]  # e.g. mu_products -> (form, values)
    seed: int
    # Derived (not printed): plain values of the options, and the problems found while drawing.
    native: dict[str, float] = field(default_factory=dict, repr=False)
    options_problems: list[Problem] = field(default_factory=list, repr=False)  # and convention
    drawn_problems: list[Problem] = field(default_factory=list, repr=False)


OMITTED = "<omitted>"
SCALAR_FORMS = ["array", "float32", "list", "tuple", "readonly", "int32", "wrong_length", "none"]
SCALAR_NICE = {"mu_product": [1.0, 0.9, 0.45, 0.1], "eta": [0.01, 0.1, 1.0], "mu": [1.0, 0.5, 0.1]}
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def step_value(draw: Any, n: int, bad: int = 2) -> tuple[Any, list[int] | None, list[Problem]]:
    """(step as passed, t of each tensor or None, problems)."""
    kind = draw(st.sampled_from(["int"] * 4 + ["forms", "per_tensor"]))
    if bad and draw(st.integers(0, 9)) < bad:
        kind = draw(st.sampled_from(["bad"] * 5 + ["omit"]))
    if kind == "int":
        t = draw(st.sampled_from([1, 1, 2, 3, 10, 1000, 2**40, 2**62]))
        return t, [t] * n, []
    if kind == "forms":
        t = draw(st.sampled_from([1, 2, 7]))
        form = draw(st.sampled_from([np.int64, np.int32, float, np.float64, np.array]))
        return form(t), [t] * n, []
    if kind == "per_tensor":
        ts = draw(st.lists(st.sampled_from([1, 2, 5, 100]), min_size=n, max_size=n))
        return (ts if draw(st.booleans()) else np.array(ts)), ts, []
    if kind == "omit":
        return OMITTED, None, [problem("step", TypeError)]
    bad = [
        (0, ValueError),
        (-1, ValueError),
        (-(2**63), ValueError),
        (2**62 + 1, ValueError),
        (2**63, ValueError),
        (2**64, (TypeError, ValueError)),
        (10**30, (TypeError, ValueError)),
        (1.5, TypeError),
        (NAN, TypeError),
        (INF, TypeError),
        (True, TypeError),
        (False, TypeError),
        ("3", TypeError),
        (None, TypeError),
        ([1] * (n + 1), ValueError),
        ([[1]], ValueError),
    ]
    if n > 0:
        bad.append(([1] * (n - 1) + [0], ValueError))
    v, error = draw(st.sampled_from(bad))
    return v, None, [problem("step", error)]


PARTS = ("options", "convention", "step", "extras", "buffers", "containers", "scalars")


@st.composite
def bad_rates(draw: Any) -> dict[str, int]:
    """How often each part of a call is bad: a clean call, one bad part, or chaos."""
    mode = draw(st.sampled_from(["clean"] * 3 + ["one"] * 5 + ["chaos"] * 2))
    if mode == "clean":
        return dict.fromkeys(PARTS, 0)
    if mode == "chaos":
        return dict.fromkeys(PARTS, 2)
    target = draw(st.sampled_from(PARTS))
    return {part: (4 if part == target else 0) for part in PARTS}


@st.composite
def functional_cases(
    draw: Any, fixed: FunctionalCase | None = None, clean: bool = False
) -> FunctionalCase:
    """A call; with ``fixed``, another call over the same params and states as that one (a
    training loop): same algorithm, convention and arrays, new grads, options and step.
    ``clean``: nothing bad."""
    algorithm = fixed.algorithm if fixed else draw(st.sampled_from(ALGORITHMS))
    d = describe(algorithm)
    bad = dict.fromkeys(PARTS, 0) if clean else draw(bad_rates())
    if fixed:
        bad["convention"] = bad["containers"] = bad["scalars"] = 0
    offered = CONVENTIONS.get(algorithm, ("torch", "keras"))
    problems: list[Problem] = []
    if fixed:
        convention = fixed.convention
    elif not bad["convention"] or draw(st.integers(0, 9)) >= bad["convention"]:
        convention = draw(st.sampled_from(offered))
    elif draw(st.booleans()):
        convention = draw(st.sampled_from(["torch", "keras"]))  # maybe one not offered
    else:
        convention = draw(st.sampled_from(["jax", None, 0, 1, "Torch", ["torch"]]))
        problems.append(problem("convention", (TypeError, ValueError)))
    conv = convention if convention in ("torch", "keras") else "torch"
    keras = conv == "keras"

    options: dict[str, Any] = {}
    native: dict[str, float] = {}
    for f in d.fields:
        if f.kind == "convention":
            continue
        if f.name == "maximize" and keras:
            native[f.name] = 0.0  # the Keras references have no maximize
            continue
        if keras and algorithm == "nadam" and f.name == "momentum_decay":
            options[f.name], native[f.name] = 1.0, 1.0  # Keras' 0.96**t schedule
            continue
        if f.name == "float32_scalars" and keras:
            native[f.name] = 1.0  # the default; its rounding is within the tolerance
            continue
        required = f.name == "lr"
        if not required and draw(st.integers(0, 3)) == 0:
            native[f.name] = f.default  # not passed: the default
            continue
        if required and bad["options"] and draw(st.integers(0, 20)) == 0:
            problems.append(problem("lr", TypeError))  # required, omitted
            continue
        if f.kind == "flag":
            value, plain, found = draw(flag_value(f.name, bad["options"]))
        else:
            rule = RULES[algorithm].get(f.name, lambda x: True)
            label = OPTION_LABEL.get(f.name, f.name)
            nice = nice_values(algorithm, f.name, keras)
            value, plain, found = draw(number_value(nice, rule, label, bad["options"]))
        options[f.name] = value
        problems += found
        if plain is not None:
            native[f.name] = float(plain)
    problems += option_problems(algorithm, conv, native)
    options_problems, problems = problems, []

    n = fixed.n if fixed else draw(st.integers(0, 3))
    shapes = fixed.shapes if fixed else [draw(SHAPES) for _ in range(n)]
    dtypes = fixed.dtypes if fixed else [draw(st.sampled_from(["float32", "float64"]))] * n
    if not fixed and n > 1 and draw(st.booleans()):
        dtypes = [draw(st.sampled_from(["float32", "float64"])) for _ in range(n)]
    roles = ["params", "grads", *d.plural_states]
    containers = {}
    layouts_by_role = {}
    for role in roles:
        if fixed and role != "grads":
            containers[role], layouts_by_role[role] = "list", [("plain",)] * (n + 1)
            continue
        kinds = ["list"] * 8 + ["tuple"] + (["bare"] if n == 1 else [])
        if role not in ("params", "grads"):
            kinds.append("none")  # fine where the state is not used
        if bad["containers"] and draw(st.integers(0, 9)) < bad["containers"]:
            kinds = ["str", "none"] if role == "params" else ["short", "long", "str", "none"]
        containers[role] = draw(st.sampled_from(kinds))
        layouts_by_role[role] = [draw(layouts(bad["buffers"])) for _ in range(n + 1)]

    step: Any = OMITTED
    if d.uses_step:
        step, _, found = draw(step_value(n, bad["step"]))
        problems += found
    extras: dict[str, Any] = {}
    rate = bad["extras"]
    if d.uses_new_state and draw(st.booleans()):
        good = [True, False, np.bool_(True), np.bool_(False)]
        value = draw(st.sampled_from(good + (["yes", 1, None] if rate else [])))
        extras["first_step"] = value
        if not isinstance(value, bool | np.bool_):
            problems.append(problem("first_step", TypeError))
    if d.takes_grad_scale:
        if draw(st.booleans()):
            good = [1.0, 2.0, 1024.0, 0.5, 3.0, np.float32(4.0)]
            scale = draw(st.sampled_from(good + (["2", [1, 2], None] if rate else [])))
            if scale is not None:
                extras["grad_scale"] = scale
            if isinstance(scale, str | list):
                problems.append(problem("grad_scale", TypeError))
        if draw(st.integers(0, 3)) == 0:
            good = [0.0, 0.0, 1.0, np.zeros(1, np.float32), True]
            found_inf = draw(st.sampled_from(good + (["x", [1.0, 0.0]] if rate else [])))
            extras["found_inf"] = found_inf
            if isinstance(found_inf, str | list):
                problems.append(problem("found_inf", TypeError))
    scalars = {}
    for name in d.scalars:
        form = "array"
        if bad["scalars"] and draw(st.integers(0, 9)) < bad["scalars"]:
            form = draw(st.sampled_from(SCALAR_FORMS[1:]))
        values = [draw(st.sampled_from(SCALAR_NICE[name])) for _ in range(n)]
        scalars[name + "s"] = (form, values)
    return FunctionalCase(
        algorithm=algorithm,
        convention=convention,
        n=n,
        shapes=shapes,
        dtypes=dtypes,
        containers=containers,
        layouts=layouts_by_role,
        options=options,
        step=step,
        extras=extras,
        scalars=scalars,
        seed=draw(st.integers(0, 2**32 - 1)),
        native=native,
        options_problems=options_problems,
        drawn_problems=problems,
    )


class FunctionalCall:
    """A FunctionalCase made real: the arrays, the problems with them, the call and its oracle."""

    def __init__(self, case: FunctionalCase, reuse: FunctionalCall | None = None) -> None:
        """``reuse``: a call whose params, states and scalars this call is given again."""
        self.case = case
        self.d = describe(case.algorithm)
        self.arena = Arena(case.seed)
        self.problems = case.options_problems + case.drawn_problems
        c = case
        self.roles = ["params", "grads", *self.d.plural_states]
        # The lists as given (objects), before the containers wrap them.
        self.items: dict[str, list[Any] | None] = {}
        if reuse is not None:
            self.arena.memory += reuse.arena.memory
            self.arena.arrays += [a for r in self.roles if r != "grads" for a in reuse.items[r]]
        for role in self.roles:
            if reuse is not None and role != "grads":
                self.items[role] = reuse.items[role]
                continue
            positive = role[:-1] in POSITIVE_STATES
            buffers = []
            count = c.n + (1 if c.containers[role] == "long" else 0)
            for i in range(count):
                shape = c.shapes[i] if i < c.n else (3,)
                dtype = c.dtypes[i] if i < c.n else "float32"
                buffers.append(self.arena.make(c.layouts[role][i], shape, dtype, positive))
            self.items[role] = buffers
        if reuse is None:
            self._keep_rmsprop_centered_sane()
        self.args = [self._container(role) for role in self.roles]
        if reuse is not None:  # the very same list objects, as a training loop passes them
            self.args = [
                a if r == "grads" else b for r, a, b in zip(self.roles, self.args, reuse.args)
            ]
        self.scalar_objects = {
            name: self._scalar(form, vals) for name, (form, vals) in c.scalars.items()
        }
        if reuse is not None:
            self.scalar_objects = reuse.scalar_objects
        self.kwargs: dict[str, Any] = dict(c.options)
        if c.step is not OMITTED:
            self.kwargs["step"] = c.step
        self.kwargs.update(c.extras)
        self.kwargs.update(self.scalar_objects)
        # Left out when it is the function's default (LAMB's is Keras', the others' torch's).
        if (
            c.convention
            != inspect.signature(getattr(F, c.algorithm + "_")).parameters["convention"].default
        ):
            self.kwargs["convention"] = c.convention
        self.problems += self._buffer_problems()
        self.problems += self._scalar_problems()

    def _keep_rmsprop_centered_sane(self) -> None:
        """square_avg >= grad_avg**2, so that sqrt(v - ga**2) stays real after the update."""
        if self.case.algorithm != "rmsprop":
            return
        for v, ga in zip(self.items["square_avgs"], self.items["grad_avgs"]):
            if native_float(v) and native_float(ga) and v.shape == ga.shape and v.flags.writeable:
                v[...] = v + ga.astype(v.dtype) ** 2

    def _container(self, role: str) -> Any:
        kind = self.case.containers[role]
        items = self.items[role]
        if kind == "none":
            return None
        if kind == "str":
            return "abc"
        if kind == "short":
            return items[: max(0, self.case.n - 1)] if self.case.n else [items[0]] if items else []
        if kind == "tuple":
            return tuple(items[: self.case.n])
        if kind == "bare":
            return items[0]
        if kind == "long":
            return items
        return items[: self.case.n]

    def given(self, role: str) -> list[Any] | None:
        """The objects of a role as the call sees them (None: no list)."""
        a = self.args[self.roles.index(role)]
        if isinstance(a, np.ndarray):
            return [a]
        # A bare 0-d "list" layout is a Python float: no list either.
        return list(a) if isinstance(a, list | tuple) else None

    def _buffer_problems(self) -> list[Problem]:
        c = self.case
        problems = []
        roles: dict[str, Any] = {}
        counts = {}
        for role in self.roles:
            kind = c.containers[role]
            if kind == "str":
                problems.append(problem(role, TypeError))
                roles[role] = []
                counts[role] = c.n if role != "params" else 0
                if role != "params":
                    roles[role] = None
                continue
            roles[role] = self.given(role)
            if role not in ("params", "grads") and roles[role] == []:
                roles[role] = None  # an empty list is no list
            counts[role] = len(roles[role]) if roles[role] is not None else 0
        if roles["params"] is None:
            problems.append(problem("params", TypeError))
            return problems
        if roles["grads"] is None:
            problems.append(problem("grads", TypeError))
            roles["grads"], counts["grads"] = [], 0
        n = counts["params"]
        used = states_used(c.algorithm, c.native) if self._options_valid() else set()
        writes_grads = "grad_scale" in c.extras
        written = {r: r != "grads" or writes_grads for r in self.roles}
        required = {r: r[:-1] in used for r in self.roles[2:]}
        return problems + buffer_problems(
            roles, counts, n, written, required, lambda role, i: f"{role}[{i}]"
        )

    def _options_valid(self) -> bool:
        d = self.d
        return all(f.name in self.case.native for f in d.fields if f.kind != "convention")

    def _scalar(self, form: str, values: list[float]) -> Any:
        if form == "array":
            return np.array(values, dtype=np.float64)
        if form == "float32":
            return np.array(values, dtype=np.float32)
        if form == "list":
            return list(values)
        if form == "tuple":
            return tuple(values)
        if form == "readonly":
            a = np.array(values)
            a.flags.writeable = False
            return a
        if form == "int32":
            return np.array(values, dtype=np.int32)
        if form == "wrong_length":
            return np.array(values + [1.0])
        return None

    def _scalar_problems(self) -> list[Problem]:
        problems = []
        for name, (form, _) in self.case.scalars.items():
            if form in ("wrong_length", "none", "readonly", "tuple"):
                problems.append(problem(name, (TypeError, ValueError)))
            elif form != "array":
                problems.append(problem(name, (TypeError, ValueError), must=False))
        return problems

    # ----------------------------------------------------------------------------- running

    def everything(self) -> list[Any]:
        """Every object whose contents a refused call must leave alone."""
        objects: list[Any] = list(self.arena.memory)
        objects += [a for a in self.arena.arrays if isinstance(a, np.ndarray)]
        objects += list(self.scalar_objects.values())
        for items in self.items.values():
            objects += [a for a in items or () if not isinstance(a, np.ndarray)]
        return objects

    def run(self) -> None:
        getattr(F, self.case.algorithm + "_")(*self.args, **self.kwargs)

    def skipped(self) -> bool:
        found_inf = self.case.extras.get("found_inf")
        return found_inf is not None and not isinstance(found_inf, str) and bool(np.any(found_inf))

    # ------------------------------------------------------------------------------ oracle

    def expected(self) -> list[dict[str, Any]]:
        """The oracle's result for every tensor, from float64 copies of the inputs."""
        c = self.case
        native = c.native
        keras = c.convention == "keras"
        used = states_used(c.algorithm, native)
        params, grads = self.given("params"), self.given("grads")
        self.before: list[dict[str, np.ndarray]] = []  # what each result was before the call
        t = c.step if c.step is not OMITTED else 1
        steps = np.broadcast_to(np.asarray(t, dtype=np.float64), (c.n,)).astype(np.int64)
        scale = c.extras.get("grad_scale")
        results = []
        for i in range(c.n):
            p = np.array(params[i], dtype=np.float64)
            g = np.array(grads[i], dtype=np.float64)
            if scale is not None:
                g = g / float(np.asarray(scale, dtype=np.float64))
            state: dict[str, Any] = {"step": int(steps[i]) - 1}
            names = KERAS_STATES[c.algorithm] if keras else self.d.states
            for k, s in enumerate(self.d.states):
                if s in used:
                    state[names[k]] = np.array(self.given(s + "s")[i], dtype=np.float64)
            if c.algorithm == "sgd" and not keras and c.extras.get("first_step"):
                state.pop("momentum_buffer", None)
            for name, obj in self.scalar_objects.items():
                key = "u_product" if keras else name[:-1]
                state[key] = float(np.asarray(obj, dtype=np.float64)[i])
            reference_step = functools.partial(self._reference, dtype=params[i].dtype)
            new_p, new_state = flat_reference(reference_step, p, g, state)
            result = {"params": new_p}
            for k, s in enumerate(self.d.states):
                if s in used:
                    result[s + "s"] = new_state[names[k]]
            for name in self.scalar_objects:
                result[name] = new_state["u_product" if keras else name[:-1]]
            if scale is not None:
                result["grads"] = g
            results.append(result)
            self.before.append(
                {r: np.array(self.given(r)[i], np.float64) for r in result if r in self.roles}
            )
        return results

    def _reference(self, p: np.ndarray, g: np.ndarray, state: dict[str, Any], dtype: Any) -> Any:
        """``dtype``: the param's (``p`` is a float64 copy)."""
        c = self.case
        native = c.native
        if c.convention == "keras":
            kwargs = {
                KERAS_OPTIONS.get(k, k): native[k] for k in KERAS_REFERENCE_OPTIONS[c.algorithm]
            }
            if c.algorithm == "rmsprop":
                kwargs["rho"] = kwargs.pop("alpha")
                kwargs["variable_dtype"] = dtype  # its centered denominator's precision
            for k in ("nesterov", "centered", "amsgrad"):
                if k in kwargs:
                    kwargs[k] = bool(kwargs[k])
            return getattr(reference, "keras_" + c.algorithm)(p, g, state, **kwargs)
        kwargs = {}
        for f in self.d.fields:
            if f.kind == "convention" or f.name == "float32_scalars":
                continue
            kwargs[f.name] = bool(native[f.name]) if f.kind == "flag" else native[f.name]
        if c.algorithm in ("nadam", "asgd"):
            kwargs["scalar_dtype"] = "float32" if native["float32_scalars"] else "float64"
        return getattr(reference, "torch_" + c.algorithm)(p, g, state, **kwargs)

    def check(self, expected: list[dict[str, Any]], before: dict[int, str]) -> None:
        """After a successful call: every result as the oracle says; the rest untouched."""
        c = self.case
        # Keras' Nadam keeps u_product in float32 (the first variable's dtype): its rounding,
        # amplified up to 10x by 1/(1 - u_product*u) at the SCALAR_NICE values, reaches every
        # param, float64 ones too; the reference keeps it in float64.
        rtol = 1e-5 if c.algorithm == "nadam" and c.convention == "keras" else 0.0
        written: dict[int, np.ndarray] = {}
        for i, result in enumerate(expected):
            dtype = self.given("params")[i].dtype
            for role, value in result.items():
                if role in self.scalar_objects:
                    actual = np.asarray(self.scalar_objects[role], dtype=np.float64)[i]
                    assert_close(actual, value, np.float32, f"{role}[{i}]", rtol=1e-6)
                    continue
                actual = self.given(role)[i]
                before = self.before[i].get(role)
                assert_close(actual, value, dtype, f"{role}[{i}]", rtol=rtol, before=before)
                written[id(actual)] = actual
        for a in self.arena.arrays:
            if not isinstance(a, np.ndarray) or id(a) in written or id(a) not in before:
                continue
            # An array the call was not given (a state list left out, the rest of a short list)
            # may alias one it updates: that memory was checked against the oracle above.
            if any(np.shares_memory(a, w) for w in written.values()):
                continue
            assert checksum(a) == before[id(a)], "the call wrote a buffer it does not update"


@given(case=functional_cases())
@settings(SETTINGS, max_examples=1000)
def test_functional_call_is_correct_or_refused_cleanly(case: FunctionalCase) -> None:
    run_and_check(FunctionalCall(case))


def run_and_check(call: FunctionalCall) -> None:
    case = call.case
    must_refuse = any(p.must for p in call.problems)
    objects = call.everything()
    before = snapshot(objects)
    before_arrays = {id(a): checksum(a) for a in call.arena.arrays if isinstance(a, np.ndarray)}
    expected = None if must_refuse or call.skipped() else call.expected()
    try:
        call.run()
    except (TypeError, ValueError) as error:
        event(f"refused: {type(error).__name__}")
        check_refusal(error, call.problems)
        assert same_snapshot(snapshot(objects), before), "a refused call wrote to a buffer"
        return
    event(f"accepted: {case.algorithm} {case.convention}")
    if call.skipped():  # a nonzero found_inf skips the step before anything is looked at
        assert same_snapshot(snapshot(objects), before), "found_inf != 0 but a buffer changed"
        return
    assert not must_refuse, f"bad input accepted: {[p.labels for p in call.problems if p.must]}"
    assert expected is not None
    call.check(expected, before_arrays)


@st.composite
def respelled(draw: Any, name: str, value: Any, flag: bool) -> tuple[Any, list[Problem]]:
    """The same value spelled another way (True as 1 or np.True_, 0.1 as np.float64(0.1) or
    [0.1]); 1.0 for True is no flag, and is refused whatever was called before."""
    if flag:
        if not isinstance(value, bool | np.bool_ | int | np.integer) or value not in (0, 1):
            return value, []  # a bad flag stays as it was
        spellings = [int, np.bool_, float]
        twin = draw(st.sampled_from(spellings))(value)
        return twin, ([problem(name, TypeError)] if isinstance(twin, float) else [])
    if not isinstance(value, float | int) or isinstance(value, bool):
        return value, []
    try:
        finite = math.isfinite(value)
    except OverflowError:  # HUGE_INT: no float spells it
        finite = False
    if finite:
        return draw(st.sampled_from([np.float64, float, lambda x: [x]]))(value), []
    return value, []


@st.composite
def loops(draw: Any) -> list[FunctionalCase]:
    """A few calls over the same params and states (the functional API caches a plan for
    them), each with its own grads, options and step, any of them bad."""
    first = draw(functional_cases(clean=True))
    first.containers = {r: "list" for r in first.containers}  # every state, used or not
    if draw(st.booleans()):  # plain Python numbers, as a training loop passes them
        d = describe(first.algorithm)
        first.options = {
            k: (bool(first.native[k]) if d.field(k).kind == "flag" else first.native[k])
            if k in first.native
            else v
            for k, v in first.options.items()
        }
    calls = [first]
    for _ in range(draw(st.integers(1, 4))):
        call = draw(functional_cases(fixed=first))
        again = draw(st.sampled_from(["new", "new", "earlier", "earlier", "respelled"]))
        if again != "new":  # a schedule may come back to earlier options, spelled alike or not
            earlier = draw(st.sampled_from([first] * len(calls) + calls))  # often the first
            call.options, call.native = dict(earlier.options), earlier.native
            call.options_problems = list(earlier.options_problems)
            if again == "respelled":
                for name, value in earlier.options.items():
                    flag = describe(first.algorithm).field(name).kind == "flag"
                    twin, problems = draw(respelled(name, value, flag))
                    call.options[name] = twin
                    call.options_problems += problems
        calls.append(call)
    return calls


@given(calls=loops())
@settings(SETTINGS, max_examples=300)
def test_functional_calls_over_the_same_arrays_are_each_correct_or_refused(
    calls: list[FunctionalCase],
) -> None:
    previous: FunctionalCall | None = None
    for case in calls:
        call = FunctionalCall(case, reuse=previous)
        previous = previous or call
        run_and_check(call)


# ============================================================================ classes (torch)

TORCH_CLASSES = [getattr(fusedopt, name) for name in fusedopt.optim.__all__ if name != "Optimizer"]


def torch_label(h: Any, k: int) -> str:
    if h.name == "step_sizes":  # one rule for both: "Invalid step_sizes: nan"
        return h.name
    return f"{h.name}[{k}]" if isinstance(h.native, tuple) else h.name


@st.composite
def torch_hyperparameter(draw: Any, cls: type, h: Any, bad: int) -> tuple[Any, dict, list]:
    """(value as passed, {native name: plain value}, problems) for one of a class's
    hyperparameters as torch spells it (betas is a pair, lr a number, amsgrad a flag)."""
    algorithm = cls._algorithm
    natives = h.native_names()
    if isinstance(h.native, tuple):
        if bad and draw(st.integers(0, 9)) < bad // 2:
            value = draw(st.sampled_from([0.9, "ab", None, (0.9,), (0.9, 0.99, 0.5), {0: 1}]))
            return value, {}, [problem(h.name, (TypeError, ValueError))]
        parts, plain, problems = [], {}, []
        for k, name in enumerate(natives):
            rule = RULES[algorithm].get(name, lambda x: True)
            v, p, found = draw(
                number_value(nice_values(algorithm, name), rule, torch_label(h, k), bad)
            )
            parts.append(v)
            problems += found
            if p is not None:
                plain[name] = p
        form = draw(st.sampled_from([tuple, list, np.array]))
        try:
            value = form(parts)
        except (TypeError, ValueError):  # np.array of mixed junk
            value = tuple(parts)
        if form is np.array and isinstance(value, np.ndarray) and value.dtype.kind != "f":
            value = tuple(parts)
        return value, plain, problems
    name = natives[0]
    if describe(algorithm).field(name).kind == "flag":
        v, p, found = draw(flag_value(h.name, bad))
        return v, ({name: float(p)} if p is not None else {}), found
    rule = RULES[algorithm].get(name, lambda x: True)
    v, p, found = draw(number_value(nice_values(algorithm, name), rule, h.name, bad))
    return v, ({name: p} if p is not None else {}), found


@dataclass
class ClassCase:
    cls: type
    hyperparameters: dict[str, Any]  # the constructor's keywords
    group_split: int  # params[:split] in group 0, the rest in group 1 (0: one group)
    group1: dict[str, Any]  # group 1's own hyperparameters
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    param_layouts: list[tuple[Any, ...]]
    steps: list[dict[str, Any]]  # per step: grads layouts, container, extras, changes
    seed: int
    native: list[dict[str, float]] = field(default_factory=list, repr=False)  # per group
    construction_problems: list[Problem] = field(default_factory=list, repr=False)


def torch_problems(cls: type, native: dict[str, float]) -> list[Problem]:
    """option_problems, worded as the class names its hyperparameters."""
    labels = {}
    for h in cls._hyperparameters:
        for k, name in enumerate(h.native_names()):
            labels[name] = torch_label(h, k)
    labels["step_size_min"] = labels["step_size_max"] = "step_sizes"
    found = option_problems(cls._algorithm, "torch", native)
    return [problem(tuple(labels.get(x, x) for x in p.labels), p.error) for p in found]


@st.composite
def class_cases(draw: Any) -> ClassCase:
    cls = draw(st.sampled_from(TORCH_CLASSES))
    d = cls._description
    rates = draw(bad_rates())
    defaults = {f.name: f.default for f in d.fields if f.kind != "convention"} | dict(cls._fixed)
    for h in cls._hyperparameters:  # the class's own defaults (AdamW's weight_decay)
        default = h.default_for(d)
        for k, name in enumerate(h.native_names()):
            item = default[k] if isinstance(h.native, tuple) else default
            defaults[name] = float(item)
    hyperparameters: dict[str, Any] = {}
    native = dict(defaults)
    problems: list[Problem] = []
    for h in cls._hyperparameters:
        if draw(st.integers(0, 2)) == 0:
            continue
        value, plain, found = draw(torch_hyperparameter(cls, h, rates["options"]))
        hyperparameters[h.name] = value
        native.update(plain)
        problems += found
        for name in h.native_names():
            if name not in plain:
                native.pop(name, None)
    n = draw(st.integers(1, 3))
    split = draw(st.integers(0, n - 1))
    group1: dict[str, Any] = {}
    native1 = dict(native)
    if split:
        h = draw(st.sampled_from(cls._hyperparameters))
        value, plain, found = draw(torch_hyperparameter(cls, h, rates["options"]))
        group1[h.name] = value
        native1.update(plain)
        problems += found
        for name in h.native_names():
            if name not in plain:
                native1.pop(name, None)
    problems += torch_problems(cls, native)
    if split:
        problems += torch_problems(cls, native1)
    shapes = [draw(SHAPES) for _ in range(n)]
    dtypes = [draw(st.sampled_from(["float32", "float64"])) for _ in range(n)]
    param_layouts = [draw(layouts(rates["buffers"] // 2)) for _ in range(n)]
    steps = []
    for _ in range(2):
        step: dict[str, Any] = {
            "grads": [draw(layouts(rates["buffers"])) for _ in range(n + 1)],
            "container": draw(st.sampled_from(["list"] * 8 + ["tuple", "short", "long"])),
        }
        if d.takes_grad_scale and draw(st.integers(0, 2)) == 0:
            step["grad_scale"] = draw(st.sampled_from([2.0, 0.5, 1024.0, "x"]))
        if d.takes_grad_scale and draw(st.integers(0, 4)) == 0:
            step["found_inf"] = draw(st.sampled_from([0.0, 1.0, np.ones(1, np.float32)]))
        if draw(st.integers(0, 3)) == 0:  # a schedule changes a group's hyperparameter
            h = draw(st.sampled_from(cls._hyperparameters))
            value, plain, found = draw(torch_hyperparameter(cls, h, rates["options"]))
            step["change"] = (draw(st.integers(0, 1 if split else 0)), h.name, value, plain, found)
        steps.append(step)
    return ClassCase(
        cls=cls,
        hyperparameters=hyperparameters,
        group_split=split,
        group1=group1,
        shapes=shapes,
        dtypes=dtypes,
        param_layouts=param_layouts,
        steps=steps,
        seed=draw(st.integers(0, 2**32 - 1)),
        native=[native, native1],
        construction_problems=problems,
    )


def torch_reference_step(
    cls: type, native: dict[str, float], p: np.ndarray, g: np.ndarray, state: dict
) -> Any:
    """One step of the class's torch.optim original (reference.torch_*), group options given
    by native name."""
    d = cls._description
    kwargs: dict[str, Any] = {}
    for f in d.fields:
        if f.kind == "convention" or f.name == "float32_scalars":
            continue
        kwargs[f.name] = bool(native[f.name]) if f.kind == "flag" else native[f.name]
    if cls._algorithm in ("nadam", "asgd"):
        kwargs["scalar_dtype"] = "float32"
    step = getattr(reference, "torch_" + cls._algorithm)
    return flat_reference(lambda *a: step(*a, **kwargs), p, g, state)


def optimizer_snapshot(opt: Any, params: list[Any]) -> list[Any]:
    """Everything a refused step or load must leave alone: the params, the live state (its
    arrays' bytes and identities), the step counts and the param groups."""
    state = {
        i: {k: (checksum(v), id(v)) if isinstance(v, np.ndarray) else v for k, v in e.items()}
        for i, e in opt.state.items()
    }
    groups = [
        {k: (tuple(map(id, v)) if k == "params" else repr(v)) for k, v in g.items()}
        for g in opt.param_groups
    ]
    return [[checksum(p) if isinstance(p, np.ndarray) else repr(p) for p in params], state, groups]


def compare_state(opt: Any, expected: list[dict[str, Any]], dtypes: list[Any]) -> None:
    """The optimizer's per-param state against the oracle's."""
    for j, want in enumerate(expected):
        have = opt.state.get(j, {})
        want_arrays = {k for k, v in want.items() if isinstance(v, np.ndarray)}
        have_arrays = {k for k, v in have.items() if isinstance(v, np.ndarray)}
        assert have_arrays == want_arrays, (
            f"state[{j}]: {sorted(have_arrays)} != {sorted(want_arrays)}"
        )
        for k, v in have.items():
            if k == "step":
                assert v == want["step"], f"state[{j}]['step'] = {v}, expected {want['step']}"
            elif k in want:
                assert_close(v, want[k], dtypes[j], f"state[{j}][{k!r}]")


@given(case=class_cases())
@settings(SETTINGS, max_examples=400)
def test_optimizer_construction_and_steps_are_correct_or_refused(case: ClassCase) -> None:
    arena = Arena(case.seed)
    n = len(case.shapes)
    params = [
        arena.make(case.param_layouts[i], case.shapes[i], case.dtypes[i], False) for i in range(n)
    ]
    split = case.group_split
    if split:
        groups: Any = [{"params": params[:split]}, {"params": params[split:], **case.group1}]
    else:
        groups = params
    # Construction: type problems of the params (and a param given twice), and hyperparameters.
    problems = list(case.construction_problems)
    for j, p in enumerate(params):
        local = j - split if split and j >= split else j
        labels = (f"params[{j}]", f"params[{local}]")
        if not isinstance(p, np.ndarray) or p.dtype not in (np.float32, np.float64):
            problems.append(problem(labels, TypeError))
        elif not p.dtype.isnative:
            problems.append(problem(labels, TypeError))
        if any(p is q for q in params[:j]):
            problems.append(problem(labels, ValueError))
    memory = snapshot(arena.memory + arena.arrays)
    try:
        opt = case.cls(groups, **case.hyperparameters)
    except (TypeError, ValueError) as error:
        event("construction refused")
        check_refusal(error, problems)
        assert same_snapshot(snapshot(arena.memory + arena.arrays), memory)
        return
    assert not any(p.must for p in problems), f"constructed with {[p.labels for p in problems]}"

    dtypes = [p.dtype for p in params]
    native = [dict(case.native[0]), dict(case.native[1] if split else case.native[0])]
    group_problems: list[list[Problem]] = [[], []]
    value_problems: list[dict[str, list[Problem]]] = [{}, {}]  # by hyperparameter, per group
    states: list[dict[str, Any]] = [{} for _ in range(n)]
    if case.cls is fusedopt.Adagrad:  # torch's Adagrad fills every sum from its constructor's
        for j, p in enumerate(params):  # value (group 0's here), whatever a group says
            value = native[0]["initial_accumulator_value"]
            states[j] = {"sum": np.full(p.shape, value, dtype=p.dtype).astype(np.float64)}
    for step in case.steps:
        if "change" in step:
            g, name, value, plain, found = step["change"]
            opt.param_groups[g][name] = value
            h = next(h for h in case.cls._hyperparameters if h.name == name)
            for k in h.native_names():
                native[g].pop(k, None)
            native[g].update(plain)
            value_problems[g][name] = found
            group_problems[g] = [p for f in value_problems[g].values() for p in f]
            group_problems[g] += torch_problems(case.cls, native[g])
        grads_arena = Arena(case.seed + 1)
        grads_arena.arrays = list(arena.arrays)
        count = n + {"short": -1, "long": 1}.get(step["container"], 0)
        grads = [
            grads_arena.make(
                step["grads"][j], case.shapes[j] if j < n else (2,), dtypes[j % n], False
            )
            for j in range(count)
        ]
        grads_given: Any = tuple(grads) if step["container"] == "tuple" else grads
        extras = {k: step[k] for k in ("grad_scale", "found_inf") if k in step}
        problems = group_problems[0] + group_problems[1]
        if isinstance(extras.get("grad_scale"), str):
            problems.append(problem("grad_scale", TypeError))
        written = {"params": True, "grads": "grad_scale" in extras}
        problems += buffer_problems(
            {"params": params, "grads": grads},
            {"params": n, "grads": count},
            n,
            written,
            {},
            lambda role, j: f"{role}[{j}]",
        )
        skipped = "found_inf" in extras and bool(np.any(extras["found_inf"]))
        before = optimizer_snapshot(opt, params)
        memory = snapshot(grads_arena.memory)
        expected = None
        if not any(p.must for p in problems) and not skipped:
            scale = float(extras.get("grad_scale", 1.0))
            expected = []
            for j in range(n):
                g_native = native[0 if not split or j < split else 1]
                p64 = np.array(params[j], dtype=np.float64)
                g64 = np.array(grads[j], dtype=np.float64) / scale
                expected.append(torch_reference_step(case.cls, g_native, p64, g64, states[j]))
        try:
            opt.step(grads_given, **extras)
        except (TypeError, ValueError) as error:
            event("a step refused")
            check_refusal(error, problems)
            assert optimizer_snapshot(opt, params) == before, "a refused step changed the optimizer"
            assert same_snapshot(snapshot(grads_arena.memory), memory), "a refused step wrote"
            continue
        if skipped:
            assert optimizer_snapshot(opt, params) == before, "found_inf != 0 but something changed"
            continue
        assert not any(p.must for p in problems), f"stepped with {[p.labels for p in problems]}"
        assert expected is not None
        event(f"a step taken: {case.cls.__name__}")
        for j, (p_ref, s_ref) in enumerate(expected):
            assert_close(params[j], p_ref, dtypes[j], f"params[{j}]")
            states[j] = s_ref
        compare_state(opt, states, dtypes)


# ============================================================================ load_state_dict


def group_native(cls: type, group: dict[str, Any]) -> dict[str, float]:
    """A param group's hyperparameters as plain floats by native name (for the oracle)."""
    native = {f.name: f.default for f in cls._description.fields} | dict(cls._fixed)
    for h in cls._hyperparameters:
        value = group[h.name]
        names = h.native_names()
        if isinstance(h.native, tuple):
            if isinstance(value, str | bytes) or not isinstance(value, list | tuple | np.ndarray):
                raise ValueError(h.name)
            if len(value) != len(names):
                raise ValueError(h.name)
        items = list(value) if isinstance(h.native, tuple) else [value]
        for name, item in zip(names, items):
            if cls._description.field(name).kind == "flag":
                if not isinstance(item, bool | np.bool_ | int | np.integer) or item not in (0, 1):
                    raise TypeError(name)
            elif item is None or isinstance(item, str | bytes):
                raise TypeError(name)
            native[name] = float(np.asarray(item, dtype=np.float64).reshape(()))
    return native


@dataclass
class LoadCase:
    cls: type
    hyperparameters: dict[str, Any]
    group_split: int
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    warmup: int  # steps taken before state_dict()
    flat: bool  # load the np.savez form (flatten_state_dict)
    mutations: list[tuple[Any, ...]]
    seed: int


NESTED_MUTATIONS = [
    "state_type",
    "groups_type",
    "drop_top",
    "extra_top",
    "drop_buffer",
    "drop_buffer",
    "drop_entry",
    "unknown_state",
    "buffer_shape",
    "buffer_dtype",
    "buffer_dtype",
    "index",
    "index",
    "step",
    "step",
    "hyper_value",
    "hyper_value",
    "hyper_drop",
    "hyper_unknown",
    "group_params",
    "groups_count",
    "group_type",
]
FLAT_MUTATIONS = ["flat_value", "flat_drop", "flat_extra_state", "flat_bad_key", "flat_json"]


@st.composite
def load_cases(draw: Any) -> LoadCase:
    cls = draw(st.sampled_from(TORCH_CLASSES))
    hyperparameters = {}
    native = group_native(
        cls, {h.name: h.default_for(cls._description) for h in cls._hyperparameters}
    )
    for h in cls._hyperparameters:
        if draw(st.booleans()):
            value, plain, found = draw(torch_hyperparameter(cls, h, 0))
            trial = {**native, **plain}
            if not torch_problems(cls, trial):
                hyperparameters[h.name] = value
                native = trial
    n = draw(st.integers(1, 3))
    flat = draw(st.integers(0, 3)) == 0
    kinds = NESTED_MUTATIONS + (FLAT_MUTATIONS * 3 if flat else [])
    mutations = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(kinds))
        if flat and kind not in FLAT_MUTATIONS and kind not in ("step", "buffer_dtype"):
            kind = draw(st.sampled_from(FLAT_MUTATIONS))
        mutations.append((kind, draw(st.integers(0, 2**16)), draw(st.integers(0, 2**16))))
    return LoadCase(
        cls=cls,
        hyperparameters=hyperparameters,
        group_split=draw(st.integers(0, n - 1)),
        shapes=[draw(SHAPES) for _ in range(n)],
        dtypes=[draw(st.sampled_from(["float32", "float64"])) for _ in range(n)],
        warmup=draw(st.integers(0, 2)),
        flat=flat,
        mutations=mutations,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


STEP_VALUES = [
    (INF, True),
    (NAN, True),
    (1e30, True),
    (-1, True),
    ("3", True),
    (None, True),
    (1.5, True),
    (2**63, True),
    (2**62, False),
    ([1, 2], True),
    (3.0, False),
    (np.int64(4), False),
    (np.array(5), False),
    (0, False),
    ([3], False),
    (True, False),
]
DTYPE_VALUES = [
    ("int32", True),
    ("complex64", True),
    ("bool", True),
    ("float16", False),
    (">f4", False),
    ("float64", False),
    ("float32", False),
]
INDEX_VALUES = [
    (str, False),
    (float, False),
    (np.int64, False),
    (lambda j: j + 0.5, True),
    (lambda j: -1, True),
    (lambda j: 99, True),
    (lambda j: None, True),
    (lambda j: "abc", True),
    (lambda j: 2**70, True),
    (lambda j: NAN, True),
    (lambda j: (j,), True),
]


def _forget(found: dict[tuple, list[Problem]], *prefix: Any) -> None:
    for key in [k for k in found if k[: len(prefix)] == prefix]:
        del found[key]


def mutate(
    sd: dict[str, Any],
    mutation: tuple[Any, ...],
    cls: type,
    found: dict[tuple, list[Problem]],
    origin: dict[int, int],
) -> None:
    """Spoil a nested state dict in place. ``found``: the problems made so far, by what they
    are about; a later mutation that replaces or removes the spoiled part forgets them.
    ``origin``: the param index of each entry of the state (by id), as saved."""
    kind, a, b = mutation
    state, groups = sd.get("state"), sd.get("param_groups")
    if kind == "state_type":
        sd["state"] = [[], None, "x", 5, [(0, {})]][a % 5]
        _forget(found, "entry")
        found["top", "state"] = [problem("'state'", TypeError)]
        return
    if kind == "groups_type":
        sd["param_groups"] = [{}, None, "x", 5, {"params": [0]}][a % 5]
        _forget(found, "group")
        found["top", "groups"] = [problem("param_groups", (TypeError, ValueError))]
        return
    if kind == "drop_top":
        dropped = ["state", "param_groups"][a % 2]
        if dropped in sd:
            del sd[dropped]
            _forget(found, "entry" if dropped == "state" else "group")
            found["top", "drop", dropped] = [problem("state_dict", ValueError)]
        return
    if kind == "extra_top":
        sd["extra"] = a
        return
    if isinstance(groups, list) and groups and kind.startswith(("hyper", "group")):
        g = a % len(groups)
        if kind == "groups_count":
            if a % 2:
                groups.append(copy.deepcopy(groups[0]))
            else:
                _forget(found, "group", len(groups) - 1)
                groups.pop()
            found["groups", "count"] = [problem("param groups", ValueError)]
            return
        if kind == "group_type":
            groups[g] = [[1, 2], "x", None][b % 3]
            _forget(found, "group", g)
            found["group", g, "type"] = [problem(f"param_groups[{g}]", (TypeError, ValueError))]
            return
        if not isinstance(groups[g], dict):
            return
        h = cls._hyperparameters[b % len(cls._hyperparameters)]
        # The hyperparameters' problems are found once all mutations are made, from the
        # groups as they are then (hyperparameter_problems): a later value may mend an earlier.
        if kind == "hyper_value":
            rng = np.random.default_rng(a * 7 + b)
            groups[g][h.name] = hyperparameter_value(cls, h, bool(rng.integers(0, 2)), rng)
            return
        if kind == "hyper_drop":
            groups[g].pop(h.name, None)
            return
        if kind == "hyper_unknown":
            groups[g]["momentun"] = 0.9
            found["group", g, "momentun"] = [problem("momentun", ValueError)]
            return
        if kind == "group_params" and isinstance(groups[g].get("params"), list):
            count = len(groups[g]["params"])
            choice = b % 5
            if choice == 3:
                groups[g]["params"] = [99 + k for k in range(count)]  # torch matches by position
                return
            if choice == 0:
                del groups[g]["params"]
            elif choice == 1:
                groups[g]["params"] = list(range(count + 1))
            else:
                groups[g]["params"] = [5, None][choice % 2]
            found["group", g, "params"] = [problem(f"param_groups[{g}]", (TypeError, ValueError))]
        return
    if not isinstance(state, dict):
        return
    keys = sorted((k for k in state if isinstance(state[k], dict)), key=repr)
    if not keys:
        return
    j = keys[a % len(keys)]
    entry = state[j]
    at = ("entry", id(entry))
    names = sorted(entry)
    arrays = [k for k in names if isinstance(entry[k], np.ndarray) and k != "foo"]
    index = j if isinstance(j, int) else None
    where = f"state[{index}]" if index is not None else "state["
    if kind == "drop_buffer" and names:
        name = names[b % len(names)]
        scalars = cls._description.scalars
        entry.pop(name, None)
        _forget(found, *at, name)
        if name in scalars:  # ASGD's eta and mu come together: one alone is refused
            _forget(found, *at, "scalars")
            missing = [s for s in scalars if s not in entry]
            if len(missing) < len(scalars):
                found[(*at, "scalars")] = [problem(tuple(f"'{m}'" for m in missing), ValueError)]
    elif kind == "drop_entry":
        del state[j]
        _forget(found, *at)
    elif kind == "unknown_state":
        entry["foo"] = np.zeros(3)
        found[(*at, "foo")] = [problem("'foo'", ValueError)]
    elif kind == "buffer_shape" and arrays:
        name = arrays[b % len(arrays)]
        entry[name] = np.zeros(entry[name].shape + (2,), entry[name].dtype)
        found[(*at, name)] = found.get((*at, name), []) + [problem(where, ValueError)]
    elif kind == "buffer_dtype" and arrays:
        name = arrays[b % len(arrays)]
        dtype, bad = DTYPE_VALUES[a % len(DTYPE_VALUES)]
        entry[name] = np.real(entry[name]).astype(np.dtype(dtype))  # no ComplexWarning
        shape_problems = [p for p in found.get((*at, name), []) if p.error is ValueError]
        found[(*at, name)] = shape_problems + ([problem(where, TypeError)] if bad else [])
    elif kind == "step":
        value, bad = STEP_VALUES[b % len(STEP_VALUES)]
        entry["step"] = value
        found[(*at, "step")] = [problem((f"{where}['step']", "'step'"), None)] if bad else []
    elif kind == "index":
        # The entry's own index, spelled another way or made bad (an entry re-keyed before has
        # its own index still: moved to another param's, its buffers would not fit).
        make, bad = INDEX_VALUES[b % len(INDEX_VALUES)]
        key = make(origin[id(entry)])
        if key in state and state[key] is not entry:
            return
        del state[j]
        state[key] = entry
        found[(*at, "__index__")] = [problem((repr(key), "param"), None)] if bad else []


def hyperparameter_problems(
    cls: type, current: dict[str, Any], saved: dict[str, Any]
) -> list[Problem]:
    """What loading refuses among a saved group's hyperparameters (those it lacks are the
    optimizer's ``current`` ones): each value that is no number or flag of its kind, then the
    rules over all of them, the bad values left at the current ones."""
    base = {h.name: current[h.name] for h in cls._hyperparameters}
    merged = {h.name: saved.get(h.name, base[h.name]) for h in cls._hyperparameters}
    problems = []
    for h in cls._hyperparameters:
        try:
            group_native(cls, {**base, h.name: merged[h.name]})
        except (TypeError, ValueError):
            labels = (h.name, *(torch_label(h, k) for k in range(len(h.native_names()))))
            problems.append(problem(labels, None))
            merged[h.name] = base[h.name]
    return problems + torch_problems(cls, group_native(cls, merged))


def hyperparameter_value(cls: type, h: Any, bad: bool, rng: np.random.Generator) -> Any:
    """A value for hyperparameter ``h`` (no hypothesis draw: used while spoiling)."""
    algorithm = cls._algorithm
    names = h.native_names()
    if bad:
        if isinstance(h.native, tuple):
            return [0.9, "ab", None, (0.9,), (-1.0, 0.5)][int(rng.integers(0, 5))]
        if cls._description.field(names[0]).kind == "flag":
            return [2, "yes", None, 0.5][int(rng.integers(0, 4))]
        return [-1.0, NAN, INF, "0.1", None, [1.0, 2.0]][int(rng.integers(0, 6))]
    if cls._description.field(names[0]).kind == "flag":
        return bool(rng.integers(0, 2))
    values = [float(rng.choice(nice_values(algorithm, name))) for name in names]
    if isinstance(h.native, tuple):
        return tuple(values)
    return [values[0], [values[0]], np.float64(values[0])][int(rng.integers(0, 3))]


FLAT_JSON = ["{not json", "5", "{}", '[{"params": 3}]', "null"]


def mutate_flat(
    flat: dict[Any, Any], mutation: tuple[Any, ...], found: dict, saved: dict[str, Any], cls: type
) -> None:
    """Spoil a flat state dict in place; ``found``: the problems made, by the key spoiled;
    ``saved``: the flat state dict as the optimizer made it (the keys spoiled by value are its
    own, not the malformed or foreign ones other mutations add)."""
    kind, a, b = mutation
    keys = sorted(k for k in flat if k in saved and k.startswith("state/"))
    if kind == "flat_value" and keys:
        key = keys[a % len(keys)]
        choice = b % 3
        flat[key] = [np.array(NAN), np.zeros((7, 7, 7)), np.array("abc")][choice]
        _, index, name = key.split("/")
        labels = (f"state[{index}]", "step")
        # NaN is a whole number of steps for no one, but a fine value of a 0-d buffer or scalar
        # (0-d as saved: an earlier mutation of this key may have changed its shape).
        must = choice > 0 or name == "step" or np.asarray(saved[key]).ndim > 0
        found[key] = [problem(labels, None, must=must)]  # the earlier value's problems are gone
    elif kind == "flat_drop":
        if keys and a % 3:
            key = keys[b % len(keys)]
            del flat[key]
            found.pop(key, None)
            # ASGD's eta and mu come together: one alone is refused (as drop_buffer finds).
            _, index, name = key.split("/")
            scalars = cls._description.scalars
            if name in scalars:
                missing = [x for x in scalars if f"state/{index}/{x}" not in flat]
                labels = tuple(f"'{x}'" for x in missing)
                found["scalars", index] = (
                    [problem(labels, ValueError)] if len(missing) < len(scalars) else []
                )
        elif "param_groups.json" in flat:
            del flat["param_groups.json"]
            found["param_groups.json"] = [problem("state_dict", ValueError)]
    elif kind == "flat_extra_state":
        key = ["state/0/foo", "state/99/exp_avg", "state/-1/exp_avg"][a % 3]
        flat[key] = np.zeros(3)
        found[key] = [problem(("foo", "99", "-1"), None)]
    elif kind == "flat_bad_key":
        key = [5, "state/0", "state/x/exp_avg", "other/0/exp_avg", ("state", 0)][a % 5]
        flat[key] = np.zeros(3)
        found[key] = [problem((repr(key), str(key), "key"), None)]
    elif kind == "step" and keys:
        index = keys[a % len(keys)].split("/")[1]
        value, bad = STEP_VALUES[b % len(STEP_VALUES)]
        key = f"state/{index}/step"
        flat[key] = np.asarray(value)
        found[key] = [problem((f"state[{index}]['step']", "'step'"), None)] if bad else []
    elif kind == "buffer_dtype":
        arrays = [k for k in keys if np.asarray(flat[k]).ndim > 0]
        if arrays:
            key = arrays[b % len(arrays)]
            dtype, bad = DTYPE_VALUES[a % len(DTYPE_VALUES)]
            flat[key] = np.real(np.asarray(flat[key])).astype(np.dtype(dtype))
            others = [p for p in found.get(key, []) if p.error is not TypeError]
            dtype_problem = [problem(f"state[{key.split('/')[1]}]", TypeError)] if bad else []
            found[key] = others + dtype_problem
    elif kind == "flat_json" and "param_groups.json" in flat:
        text = FLAT_JSON[a % len(FLAT_JSON)]
        flat["param_groups.json"] = np.array(text)
        found["param_groups.json"] = [
            problem(("param_groups", "param groups", "json", "JSON"), None)
        ]


def loaded_state(sd: Any, flat: bool) -> dict[int, dict[str, Any]]:
    """The per-param state a state dict asks for, by param index (read as the docs say)."""
    if flat:
        result: dict[int, dict[str, Any]] = {}
        for key, value in sd.items():
            if key == "param_groups.json":
                continue
            _, index, name = key.split("/", 2)
            value = np.asarray(value)
            result.setdefault(int(index), {})[name] = value.item() if value.ndim == 0 else value
        return result
    return {int(k): dict(v) for k, v in sd["state"].items()}


def expected_after_load(
    cls: type, opt: Any, params: list[np.ndarray], state: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The oracle's state of every param from a loaded per-param state."""
    result = []
    for j, p in enumerate(params):
        entry: dict[str, Any] = {}
        for k, v in state.get(j, {}).items():
            if k == "step":
                entry[k] = int(float(np.asarray(v, dtype=np.float64).reshape(())))
            elif k in cls._description.scalars:
                entry[k] = float(np.asarray(v, dtype=np.float64).reshape(()))
            else:
                entry[k] = np.asarray(v).astype(p.dtype).astype(np.float64)
        result.append(entry)
    return result


def oracle_step(
    cls: type, opt: Any, params: list[np.ndarray], grads: list[np.ndarray], states: list[dict]
) -> list[tuple[np.ndarray, dict]]:
    result = []
    j = 0
    for group in opt.param_groups:
        native = group_native(cls, group)
        for _ in group["params"]:
            p64 = np.array(params[j], dtype=np.float64)
            g64 = np.array(grads[j], dtype=np.float64)
            result.append(torch_reference_step(cls, native, p64, g64, states[j]))
            j += 1
    return result


def state_of(opt: Any, params: list[np.ndarray]) -> list[dict[str, Any]]:
    """The optimizer's state as the oracle takes it."""
    return expected_after_load(type(opt), opt, params, opt.state_dict()["state"])


def missing_state_problems(cls: type, given: Any, flat: bool) -> list[Problem]:
    """What a loaded entry lacks (after the mutations): once stepped, every state its algorithm
    always keeps and its scalars (a missing one would start again beside the carried-over ones,
    where torch raises KeyError); before, a step beside any state where the class counts steps
    (Adagrad makes its sum before the first step)."""
    entries: dict[Any, dict[str, Any]] = {}
    if flat:
        for key, value in given.items():
            parts = key.split("/") if isinstance(key, str) else []
            if len(parts) == 3 and parts[0] == "state":
                entries.setdefault(parts[1], {})[parts[2]] = value
    elif isinstance(given, dict) and isinstance(given.get("state"), dict):
        entries = {k: v for k, v in given["state"].items() if isinstance(v, dict)}
    description = cls._description
    always = [
        n for k, n in enumerate(description.states) if description.always_used_states >> k & 1
    ]
    found = []
    for entry in entries.values():
        if "step" not in entry:
            if cls._tracks_step and not cls._states_at_construction and entry:
                found.append(problem("'step'", ValueError))
            continue
        try:
            step = float(np.asarray(entry["step"], dtype=np.float64).reshape(()))
        except (TypeError, ValueError):
            continue  # a bad step, a problem of its own
        if math.isfinite(step) and step.is_integer() and 0 < step < 2**62:
            missing = [n for n in [*always, *description.scalars] if n not in entry]
            if missing:
                found.append(problem(tuple(f"'{m}'" for m in missing), ValueError))
    return found


@given(case=load_cases())
@settings(SETTINGS, max_examples=400)
def test_load_state_dict_loads_correctly_or_refuses_and_changes_nothing(case: LoadCase) -> None:
    rng = np.random.default_rng(case.seed)
    params = [rng.standard_normal(s).astype(d) for s, d in zip(case.shapes, case.dtypes)]
    split = case.group_split
    groups: Any = [{"params": params[:split]}, {"params": params[split:]}] if split else params
    opt = case.cls(groups, **case.hyperparameters)
    for _ in range(case.warmup):
        opt.step([rng.standard_normal(s).astype(d) for s, d in zip(case.shapes, case.dtypes)])
    sd = opt.state_dict()
    found: dict[tuple, list[Problem]] = {}
    problems: list[Problem] = []
    given: Any
    if case.flat:
        given = fusedopt.flatten_state_dict(sd)
        saved = dict(given)
        flat_found: dict[Any, list[Problem]] = {}
        for m in case.mutations:
            mutate_flat(given, m, flat_found, saved, case.cls)
        problems += [p for found_here in flat_found.values() for p in found_here]
    else:
        given = sd
        origin = {id(entry): i for i, entry in sd["state"].items()}
        for m in case.mutations:
            mutate(given, m, case.cls, found, origin)
        groups = given.get("param_groups")
        if isinstance(groups, list) and len(groups) == len(opt.param_groups):
            found.pop(("groups", "count"), None)  # one added, one removed
            for g, (saved, group) in enumerate(zip(groups, opt.param_groups)):
                if isinstance(saved, dict):
                    found["group", g, "hyperparameters"] = hyperparameter_problems(
                        case.cls, group, saved
                    )
                params_given = saved.get("params") if isinstance(saved, dict) else None
                if isinstance(params_given, list) and len(params_given) != len(group["params"]):
                    found["group", g, "size"] = [problem(f"param_groups[{g}]", ValueError)]
    problems += [p for found_here in found.values() for p in found_here]
    problems += missing_state_problems(case.cls, given, case.flat)
    before = optimizer_snapshot(opt, params)
    before_state = state_of(opt, params)
    wanted = copy.deepcopy(given)
    try:
        opt.load_state_dict(given)
    except (TypeError, ValueError) as error:
        event("refused")
        check_refusal(error, problems)
        assert optimizer_snapshot(opt, params) == before, "a refused load changed the optimizer"
        states = before_state
    else:
        event(f"loaded: {case.cls.__name__}")
        assert not any(p.must for p in problems), f"loaded with {[p.labels for p in problems]}"
        states = expected_after_load(case.cls, opt, params, loaded_state(wanted, case.flat))
        if not case.flat:
            for g, (saved, group) in enumerate(zip(wanted["param_groups"], opt.param_groups)):
                for k, v in saved.items():
                    if k != "params":
                        assert repr(group[k]) == repr(v), f"param_groups[{g}][{k!r}] not loaded"
    # Either way, the next step follows the oracle from the state the optimizer should hold.
    grads = [rng.standard_normal(s).astype(d) for s, d in zip(case.shapes, case.dtypes)]
    expected = oracle_step(case.cls, opt, params, grads, states)
    opt.step(grads)
    for j, (p_ref, _) in enumerate(expected):
        assert_close(params[j], p_ref, params[j].dtype, f"params[{j}] after the load")
    compare_state(opt, [s for _, s in expected], [p.dtype for p in params])


# ============================================================================ Keras apply

KERAS_CLASSES = [
    fk.SGD,
    fk.Adagrad,
    fk.RMSprop,
    fk.Adam,
    fk.AdamW,
    fk.Adadelta,
    fk.Adamax,
    fk.Nadam,
    fk.Lion,
    fk.Lamb,
]
CLIPS = ("clipnorm", "clipvalue", "global_clipnorm")


@dataclass
class KerasCase:
    cls: type
    hyperparameters: dict[str, Any]
    clip: dict[str, Any]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    variable_layouts: list[tuple[Any, ...]]
    applies: list[dict[str, Any]]  # per apply: grads (layout or None), length, new rate
    seed: int
    native: dict[str, Any] = field(default_factory=dict, repr=False)  # by Keras name
    construction_problems: list[Problem] = field(default_factory=list, repr=False)


def keras_native(cls: type, values: dict[str, Any]) -> dict[str, float]:
    """Options by native name from plain values by Keras name (weight_decay None is 0)."""
    native = {f.name: f.default for f in cls._description.fields} | dict(cls._fixed)
    for h in cls._hyperparameters:
        if h.name in values:
            value = values[h.name]
            native[h.native_names()[0]] = 0.0 if value is None else float(value)
    return native


def keras_problems(cls: type, values: dict[str, Any]) -> list[Problem]:
    labels = {h.native_names()[0]: h.name for h in cls._hyperparameters}
    found = option_problems(cls._algorithm, "keras", keras_native(cls, values))
    return [problem(tuple(labels.get(x, x) for x in p.labels), p.error) for p in found]


@st.composite
def keras_cases(draw: Any) -> KerasCase:
    cls = draw(st.sampled_from(KERAS_CLASSES))
    d = cls._description
    rates = draw(bad_rates())
    hyperparameters: dict[str, Any] = {}
    values = {h.name: h.default_for(d) for h in cls._hyperparameters}
    problems: list[Problem] = []
    for h in cls._hyperparameters:
        if draw(st.integers(0, 2)) == 0:
            continue
        name = h.native_names()[0]
        if h.name == "weight_decay" and draw(st.integers(0, 3)) == 0:
            hyperparameters[h.name] = values[h.name] = None
            if cls.weight_decay_required():
                problems.append(problem("weight_decay", ValueError))
            continue
        if d.field(name).kind == "flag":
            value, plain, found = draw(flag_value(h.name, rates["options"]))
        else:
            rule = RULES[cls._algorithm].get(name, lambda x: True)
            nice = nice_values(cls._algorithm, name, keras=True)
            value, plain, found = draw(number_value(nice, rule, h.name, rates["options"]))
            if h.name == "weight_decay" and value is None:  # Keras' "no decay"
                required = cls.weight_decay_required()
                found = [problem("weight_decay", ValueError)] if required else []
        hyperparameters[h.name] = value
        problems += found
        if plain is None:
            values.pop(h.name)
        else:
            values[h.name] = plain
    if "learning_rate" in hyperparameters and draw(st.integers(0, 5)) == 0:
        hyperparameters["learning_rate"] = values["learning_rate"] = "schedule"
        problems = [p for p in problems if p.labels != ("learning_rate",)]
    problems += keras_problems(cls, {k: v for k, v in values.items() if v != "schedule"})
    clip: dict[str, Any] = {}
    which = draw(
        st.sampled_from(["none", "one", "one", "one"] + (["bad"] if rates["extras"] else []))
    )
    if which == "one":
        clip[draw(st.sampled_from(CLIPS))] = draw(
            st.sampled_from([0.5, 1.0, 10.0, np.float32(2.0)])
        )
    elif which == "bad":
        kind = draw(st.sampled_from(["two", "zero", "negative", "nan", "string"]))
        names = draw(st.permutations(CLIPS))
        clip[names[0]] = {"zero": 0.0, "negative": -1.0, "nan": NAN, "string": "x"}.get(kind, 1.0)
        if kind == "two":
            clip[names[1]] = 1.0
            problems.append(problem(names[:2], ValueError))
        else:
            problems.append(problem(names[0], TypeError if kind == "string" else ValueError))
    n = draw(st.integers(1, 3))
    applies = []
    for _ in range(draw(st.integers(1, 3))):
        apply: dict[str, Any] = {
            "grads": [
                None if draw(st.integers(0, 4)) == 0 else draw(layouts(rates["buffers"]))
                for _ in range(n)
            ],
            "length": n,
        }
        if rates["containers"] and draw(st.integers(0, 3)) == 0:
            apply["length"] = draw(st.sampled_from([n - 1, n + 1]))
        if draw(st.integers(0, 4)) == 0:
            apply["rate"] = draw(st.sampled_from([0.01, 0.5, 0.0, np.float64(0.1), -1.0, NAN, "x"]))
        applies.append(apply)
    shapes = [draw(SHAPES) for _ in range(n)]
    return KerasCase(
        cls=cls,
        hyperparameters=hyperparameters,
        clip=clip,
        shapes=shapes,
        dtypes=[draw(st.sampled_from(["float32", "float64"]))] * n,
        variable_layouts=[draw(layouts(rates["buffers"] // 2)) for _ in range(n)],
        applies=applies,
        seed=draw(st.integers(0, 2**32 - 1)),
        native=values,
        construction_problems=problems,
    )


def schedule(iterations: int) -> float:
    return 0.05 / (1.0 + iterations)


def keras_reference_apply(
    case: KerasCase,
    values: dict[str, Any],
    rate: float,
    iterations: int,
    u_product: float,
    variables: list[np.ndarray],
    grads: list[Any],
    states: list[dict[str, Any]],
) -> tuple[list[tuple[np.ndarray, dict]], float]:
    """The oracle's apply: (new variable and state of each variable given a grad, u_product)."""
    kept = [i for i, g in enumerate(grads) if g is not None]
    clipped = (
        reference.keras_clip([np.array(grads[i], dtype=np.float64) for i in kept], **case.clip)
        if kept
        else []
    )
    kwargs = {
        h.name: values[h.name] for h in case.cls._hyperparameters if h.name != "learning_rate"
    }
    for k, v in kwargs.items():
        if isinstance(v, bool | np.bool_):
            kwargs[k] = bool(v)
    step = getattr(reference, "keras_" + case.cls._algorithm)
    results: list[Any] = [None] * len(variables)
    new_u_product = u_product
    for i, g in zip(kept, clipped):
        state = dict(states[i], step=iterations)
        if case.cls is fk.Nadam:
            state["u_product"] = u_product  # the value before this apply, for every variable
        p64 = np.array(variables[i], dtype=np.float64)
        if case.cls is fk.RMSprop:  # its centered denominator in the variable's precision
            kwargs["variable_dtype"] = variables[i].dtype
        new = flat_reference(lambda *a: step(*a, learning_rate=rate, **kwargs), p64, g, state)
        results[i] = new
        if case.cls is fk.Nadam:
            new_u_product = new[1]["u_product"]
    return results, new_u_product


@given(case=keras_cases())
@settings(SETTINGS, max_examples=400)
def test_keras_apply_is_correct_or_refused_and_writes_nothing(case: KerasCase) -> None:
    arena = Arena(case.seed)
    n = len(case.shapes)
    variables = [
        arena.make(case.variable_layouts[i], case.shapes[i], case.dtypes[i], False)
        for i in range(n)
    ]
    kwargs = dict(case.hyperparameters, **case.clip)
    if isinstance(kwargs.get("learning_rate"), str) and kwargs["learning_rate"] == "schedule":
        kwargs["learning_rate"] = schedule
    try:
        opt = case.cls(**kwargs)
    except (TypeError, ValueError) as error:
        event("construction refused")
        check_refusal(error, case.construction_problems)
        return
    assert not any(p.must for p in case.construction_problems), "constructed with bad options"
    values = {h.name: case.native.get(h.name) for h in case.cls._hyperparameters}
    states: list[dict[str, Any]] = [{} for _ in range(n)]
    u_product = 1.0
    # What building refuses: a variable that is not a float array, or one given twice, and (so
    # that a refused first apply leaves the optimizer unbuilt) one no step could update: not
    # C-contiguous, read-only, or sharing memory with another.
    build_problems = []
    for i, v in enumerate(variables):
        labels = (f"variables[{i}]", f"trainable_variables[{i}]")
        if not isinstance(v, np.ndarray) or v.dtype not in (np.float32, np.float64):
            build_problems.append(problem(labels, TypeError))
        elif not v.dtype.isnative:
            build_problems.append(problem(labels, TypeError))
        elif not v.flags.c_contiguous or not v.flags.writeable:
            build_problems.append(problem(labels, ValueError))
        if any(v is w for w in variables[:i]):
            build_problems.append(problem(("variables", "same array"), ValueError))
        elif any(isinstance(w, np.ndarray) and np.may_share_memory(v, w) for w in variables[:i]):
            build_problems.append(problem(labels + ("shares memory",), ValueError))
    for apply in case.applies:
        problems: list[Problem] = [] if opt.built else list(build_problems)
        if "rate" in apply:
            rate = apply["rate"]
            try:
                opt.learning_rate = rate
            except (TypeError, ValueError) as error:
                bad = isinstance(rate, str) or not float(rate) >= 0
                check_refusal(error, [problem("learning_rate", None)] if bad else [])
            else:
                assert not isinstance(rate, str) and float(rate) >= 0, f"learning_rate={rate!r}"
                values["learning_rate"] = float(rate)
        grads_arena = Arena(case.seed + len(states) + opt.iterations)
        grads_arena.arrays = list(arena.arrays)
        grads: list[Any] = []
        for i in range(apply["length"]):
            layout = apply["grads"][i % n]
            shape, dtype = case.shapes[i % n], case.dtypes[i % n]
            grads.append(None if layout is None else grads_arena.make(layout, shape, dtype, False))
        if apply["length"] != n:
            problems.append(problem("grads", ValueError))
        elif all(g is None for g in grads):
            problems.append(problem(("gradients", "grads"), ValueError))
        elif not any(p.must for p in problems):
            kept = [i for i, g in enumerate(grads) if g is not None]
            clipping = bool(case.clip)
            for i in kept:
                g = grads[i]
                if clipping and (not isinstance(g, np.ndarray) or g.dtype.kind != "f"):
                    problems.append(problem(f"grads[{i}]", TypeError))
            # Clipped grads are new arrays: their layout no longer matters, only dtype and shape.
            roles = {"params": [variables[i] for i in kept], "grads": [grads[i] for i in kept]}

            def named(role: str, k: int, kept: list[int] = kept) -> str:
                return f"{'grads' if role == 'grads' else 'trainable_variables'}[{kept[k]}]"

            found = buffer_problems(
                roles,
                {"params": len(kept), "grads": len(kept)},
                len(kept),
                {"params": True, "grads": False},
                {},
                named,
            )
            for p in found:
                if clipping and p.what == "dtype" and p.labels[0].startswith("grads["):
                    g = grads[int(p.labels[0][6:-1])]
                    if isinstance(g, np.ndarray) and g.dtype.kind == "f":
                        p = Problem(p.labels, p.error, False, "byteorder")  # clip may cast it
                labels = p.labels + tuple(
                    f"params[{x[len('trainable_variables[') : -1]}]"
                    for x in p.labels
                    if x.startswith("trainable_variables[")
                )
                labels += tuple(
                    x[len("trainable_") :] for x in labels if x.startswith("trainable_")
                )
                # Clipping copies the grads: a grad's layout or overlap no longer matters.
                grad_layout_only = (
                    clipping
                    and p.what in ("layout", "overlap", "byteorder")
                    and any(x.startswith("grads[") for x in p.labels)
                    and (p.what == "overlap" or all(x.startswith("grads[") for x in p.labels))
                )
                problems.append(Problem(labels, p.error, p.must and not grad_layout_only, p.what))
        rate_now = (
            schedule(opt.iterations) if callable(opt._learning_rate) else values["learning_rate"]
        )
        rate32 = float(np.float32(rate_now))
        before = snapshot(arena.memory + arena.arrays + grads_arena.memory + opt.variables)
        iterations = opt.iterations
        expected = None
        if not any(p.must for p in problems):
            expected, new_u = keras_reference_apply(
                case, values, rate32, iterations, u_product, variables, grads, states
            )
        try:
            opt.apply(grads, variables)
        except (TypeError, ValueError) as error:
            event("an apply refused")
            check_refusal(error, problems)
            assert opt.iterations == iterations
            after = snapshot(arena.memory + arena.arrays + grads_arena.memory + opt.variables)
            # A first apply may build the state before refusing: compare what existed before.
            assert same_snapshot(after[: len(before)], before), "a refused apply wrote"
            continue
        event(f"applied: {case.cls.__name__}")
        assert not any(p.must for p in problems), f"applied with {[p.labels for p in problems]}"
        assert expected is not None
        assert opt.iterations == iterations + 1
        rtol = 1e-6 if case.cls is fk.Nadam else 0.0
        for i, result in enumerate(expected):
            if result is None:
                continue
            p_ref, s_ref = result
            assert_close(variables[i], p_ref, variables[i].dtype, f"variables[{i}]", rtol=rtol)
            for name, buffer in opt.state[i].items():
                assert_close(buffer, s_ref[name], variables[i].dtype, f"{name}[{i}]", rtol=rtol)
            states[i] = {k: v for k, v in s_ref.items() if k not in ("step", "u_product")}
        u_product = new_u


# ============================================================================ bugs found
# Minimal reproductions of the library bugs the properties above found, all fixed: regression
# tests now. (The names say what the bug was.)


@pytest.mark.parametrize(
    "call",
    [
        lambda: F.sgd_([np.ones(3)], [np.ones(3)], lr=10**400),
        lambda: F.sgd_([np.ones(3)], [np.ones(3)], lr=0.1, grad_scale=10**400),
        lambda: fusedopt.SGD([np.ones(3)], lr=10**400),
        lambda: fk.SGD(learning_rate=10**400),
    ],
    ids=["functional_lr", "grad_scale", "class_lr", "keras_learning_rate"],
)
def test_bug_huge_int_hyperparameter_is_an_overflow_error(call: Callable[[], Any]) -> None:
    try:
        call()
    except (TypeError, ValueError):
        pass  # refused as a bad value: fine (OverflowError is the bug)


def test_bug_huge_int_step_in_a_state_dict_is_an_overflow_error() -> None:
    opt = fusedopt.Adam([np.ones(3)], lr=0.1)
    opt.step([np.ones(3)])
    sd = opt.state_dict()
    sd["state"][0]["step"] = 10**400
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(sd)


def test_bug_unhashable_convention_is_not_named() -> None:
    with pytest.raises((TypeError, ValueError), match="convention"):
        F.sgd_([np.ones(3)], [np.ones(3)], lr=0.1, convention=["torch"])


def test_bug_params_none_is_not_named() -> None:
    with pytest.raises(TypeError, match="params"):
        F.adam_(None, [np.ones(3)], [np.zeros(3)], [np.zeros(3)], step=1, lr=0.1)


@pytest.mark.parametrize(
    "mu_products",
    [[1.0], (1.0,), 1.0, None, "ready-only"],
    ids=["list", "tuple", "float", "none", "read_only"],
)
def test_bug_functional_scalars_are_written_back_after_the_step(mu_products: Any) -> None:
    """A mu_products that cannot take the new values is refused only after params and states
    were updated (and None turns the params into NaN)."""
    if mu_products == "ready-only":
        mu_products = np.ones(1)
        mu_products.flags.writeable = False
    p, g, m, v = [np.ones(3)], [np.ones(3)], [np.zeros(3)], [np.zeros(3)]
    before = checksum(p[0], m[0], v[0])
    try:
        F.nadam_(p, g, m, v, step=1, lr=0.1, mu_products=mu_products)
    except (TypeError, ValueError) as error:
        assert "mu_products" in str(error)
        assert checksum(p[0], m[0], v[0]) == before, "refused after the step wrote"
        return
    # Accepted: then the caller's object must hold the new product.
    expected = reference.torch_nadam(np.ones(3), np.ones(3), {}, lr=0.1)[1]["mu_product"]
    assert np.asarray(mu_products, dtype=np.float64).reshape(-1)[0] == pytest.approx(expected)


def test_bug_functional_integer_scalars_are_truncated() -> None:
    mu_products = np.ones(1, np.int32)
    p, g, m, v = [np.ones(3)], [np.ones(3)], [np.zeros(3)], [np.zeros(3)]
    try:
        F.nadam_(p, g, m, v, step=1, lr=0.1, mu_products=mu_products)
    except (TypeError, ValueError) as error:
        assert "mu_products" in str(error)
        return
    expected = reference.torch_nadam(np.ones(3), np.ones(3), {}, lr=0.1)[1]["mu_product"]
    assert mu_products[0] == pytest.approx(expected)  # 0.45..., stored as 0


def test_bug_functional_scalars_of_the_wrong_length_are_not_named() -> None:
    p, g, m, v = [np.ones(3)], [np.ones(3)], [np.zeros(3)], [np.zeros(3)]
    with pytest.raises(ValueError, match="mu_products"):
        F.nadam_(p, g, m, v, step=1, lr=0.1, mu_products=np.ones(2))


def test_bug_refused_call_leaves_its_options_in_the_cached_plan() -> None:
    """The functional API caches a plan per params list; a call with new options whose grads
    are refused still sets those options in the plan, and the next call with the old options
    (the very same cached tuple) steps with the refused call's options."""
    p, m, v = [np.ones(4)], [np.zeros(4)], [np.zeros(4)]
    F.adam_(p, [np.ones(4)], m, v, step=1, lr=0.1)
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        F.adam_(p, [np.ones(4, np.float32)], m, v, step=2, lr=0.5)
    state = {"step": 1, "exp_avg": m[0].copy(), "exp_avg_sq": v[0].copy()}
    expected, _ = reference.torch_adam(p[0].copy(), np.ones(4), state, lr=0.1)
    F.adam_(p, [np.ones(4)], m, v, step=2, lr=0.1)
    np.testing.assert_allclose(p[0], expected)  # got the lr=0.5 step


def test_bug_flag_validation_depends_on_earlier_calls() -> None:
    """Options seen before skip their checks, and 1.0 == True: the cache admits a value the
    checks refuse."""
    arrays = [np.ones(3)], [np.ones(3)], [np.zeros(3)], [np.zeros(3)], [np.zeros(3)]

    def refused() -> bool:
        try:
            F.adam_(*arrays, step=1, lr=0.123, amsgrad=1.0)
        except TypeError as error:
            assert "amsgrad" in str(error)
            return True
        return False

    first = refused()  # refused: 1.0 is not a flag
    F.adam_(*arrays, step=1, lr=0.123, amsgrad=True)
    assert refused() == first  # accepted: the cache took 1.0 for True


@pytest.mark.parametrize("key", [5, ("state", 0), "state/0", "state/x/exp_avg"], ids=repr)
def test_bug_flat_state_dict_with_a_malformed_key(key: Any) -> None:
    opt = fusedopt.Adam([np.ones(3)], lr=0.1)
    opt.step([np.ones(3)])
    flat = fusedopt.flatten_state_dict(opt.state_dict())
    flat[key] = np.zeros(3)
    with pytest.raises((TypeError, ValueError), match="state_dict"):
        opt.load_state_dict(flat)


@pytest.mark.parametrize("text", ["{not json", "5", "null", '[{"params": 3}]'])
def test_bug_flat_state_dict_with_bad_param_groups_json(text: str) -> None:
    opt = fusedopt.Adam([np.ones(3)], lr=0.1)
    flat = fusedopt.flatten_state_dict(opt.state_dict())
    flat["param_groups.json"] = np.array(text)
    with pytest.raises((TypeError, ValueError), match="param_groups"):
        opt.load_state_dict(flat)


@pytest.mark.parametrize("value", [5, None])
def test_bug_state_dict_group_params_without_a_length(value: Any) -> None:
    opt = fusedopt.Adam([np.ones(3)], lr=0.1)
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = value
    with pytest.raises((TypeError, ValueError), match=r"param_groups\[0\]"):
        opt.load_state_dict(sd)


def test_bug_list_hyperparameter_breaks_flatten_state_dict() -> None:
    try:
        opt = fusedopt.Adam([np.ones(3)], lr=0.1, betas=[0.9, np.float32(0.999)])
    except (TypeError, ValueError) as error:  # refusing a list is a fix too
        assert "betas" in str(error)
        return
    opt.step([np.ones(3)])
    flat = fusedopt.flatten_state_dict(opt.state_dict())  # TypeError: not JSON serializable
    opt.load_state_dict(flat)


@pytest.mark.parametrize("missing", ["eta", "mu"])
def test_bug_asgd_state_without_one_scalar_loads_zero(missing: str) -> None:
    """A state dict with one of ASGD's two scalars: the other becomes 0.0 (eta = 0: the param
    never moves again), where a missing state is otherwise a fresh one."""
    p = np.ones(3)
    opt = fusedopt.ASGD([p], lr=0.1, t0=0.0)
    opt.step([np.ones(3)])
    sd = opt.state_dict()
    del sd["state"][0][missing]
    try:
        opt.load_state_dict(sd)
    except (TypeError, ValueError) as error:  # refusing a partial state is a fix too
        assert missing in str(error)
        return
    fresh = {"eta": float(np.float32(0.1)), "mu": 1.0}[missing]  # as a first step has them
    assert opt.state[0][missing] == fresh


@pytest.mark.parametrize("clip", [{"clipnorm": 0.5}, {"clipvalue": 0.5}], ids=str)
def test_bug_keras_clipping_a_0d_grad(clip: dict[str, float]) -> None:
    variable = np.array(1.0)
    fk.SGD(learning_rate=0.1, **clip).apply([np.array(2.0)], [variable])


@pytest.mark.parametrize("clip", [{}, {"clipvalue": 0.5}], ids=["plain", "clipvalue"])
@pytest.mark.parametrize(
    "bad", [np.ones(3, np.int32), np.ones(4), [1.0, 2.0, 3.0]], ids=["int32", "shape", "list"]
)
def test_bug_keras_error_after_a_none_grad_names_the_wrong_grad(clip: dict, bad: Any) -> None:
    variables = [np.ones(3), np.ones(3)]
    opt = fk.SGD(learning_rate=0.1, **clip)
    opt.apply([np.ones(3), np.ones(3)], variables)
    with pytest.raises((TypeError, ValueError), match=r"grads\[1\]"):
        opt.apply([None, bad], variables)  # names grads[0]


def test_bug_keras_error_after_a_none_grad_names_the_wrong_variable() -> None:
    variables = [np.ones(3), np.ones(6)[::2]]
    with pytest.raises(ValueError, match=r"variables\[1\]|params\[1\]"):
        fk.SGD(learning_rate=0.1).apply([None, np.ones(3)], variables)  # names params[0]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("rate", [INF, 1e39], ids=["inf", "1e39"])
def test_bug_keras_infinite_learning_rate_is_accepted(rate: float) -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        fk.SGD(learning_rate=rate)


@pytest.mark.parametrize("algorithm", ["adam", "adamax", "keras_adamax"])
def test_bug_nan_in_a_running_maximum_is_dropped(algorithm: str) -> None:
    """torch.maximum/amax (and Keras' maximum) propagate a NaN state; the kernels' max returns
    the other operand when the state is NaN, so a NaN max_exp_avg_sq or exp_inf heals."""
    p, g, m = np.ones(3), np.ones(3), np.zeros(3)
    if algorithm == "adam":
        v, mx = np.zeros(3), np.full(3, NAN)
        F.adam_([p], [g], [m], [v], [mx], step=1, lr=0.1, amsgrad=True)
    elif algorithm == "adamax":
        F.adamax_([p], [g], [m], [np.full(3, NAN)], step=1, lr=0.1)
    else:
        F.adamax_([p], [g], [m], [np.full(3, NAN)], step=1, lr=0.1, convention="keras")
    assert np.isnan(p).all()


def test_bug_reference_rprop_on_a_0d_array() -> None:
    """np.sign of a 0-d array is a NumPy scalar, which the reference then indexes (the
    properties call the reference on 1-D copies, see flat_reference)."""
    reference.torch_rprop(np.array(1.0), np.array(-1.0), {"prev": np.array(1.0)}, lr=0.1)


def test_bug_cached_plan_over_state_lists_holding_none() -> None:
    """The functional plan cache keeps weak references to the arrays of a call; None in a state
    list (a state the options leave unused) has none to keep ("cannot create weak reference to
    'NoneType' object")."""
    p, g, square_avg = [np.ones(3)], [np.ones(3)], [np.zeros(3)]
    expected = [np.ones(3)]
    state: dict[str, Any] = {}
    for _ in range(3):  # the second call and later go through the cached plan
        F.rmsprop_(p, g, square_avg, [None], [None], lr=0.1)
        expected[0], state = reference.torch_rmsprop(expected[0], np.ones(3), state, lr=0.1)
    np.testing.assert_allclose(p[0], expected[0], rtol=1e-12)


def test_bug_a_list_among_the_params_is_refused_naming_it() -> None:
    """A param that is not an array got past the checks to the weak reference of the cached
    plan (SystemError) instead of being refused by them."""
    p = [np.ones(3), [1.0, 2.0, 3.0]]
    with pytest.raises(TypeError, match=r"params\[1\]"):
        F.sgd_(p, [np.ones(3), np.ones(3)], lr=0.1)


def test_bug_rprop_takes_numpy_sign_of_nan_where_torch_takes_0() -> None:
    """torch.sign(NaN) is 0 (pytorch/pytorch#41245), so torch.optim.Rprop gives a NaN product
    g*prev the factor 1 and leaves a param whose gradient is NaN where it is (prev <- NaN).
    The reference took NumPy's sign (a NaN prev made the step size and the param NaN), and the
    kernels moved the param by sign(NaN) = NaN where the gradient was NaN."""
    prev, grad = np.array([NAN, 1.0, 1.0]), np.array([1.0, NAN, -1.0])
    # torch.optim.Rprop (2.13, single-tensor and foreach) from these, step sizes 0.1:
    want = {"param": [0.9, 1.0, 1.0], "prev": [1.0, NAN, 0.0], "step_size": [0.1, 0.1, 0.05]}
    state = {"step": 1, "prev": prev.copy(), "step_size": np.full(3, 0.1)}
    p, new_state = reference.torch_rprop(np.ones(3), grad, state, lr=0.1)
    got = {"param": p, "prev": new_state["prev"], "step_size": new_state["step_size"]}
    for dtype in (np.float32, np.float64):
        p, s, ss = np.ones(3, dtype), prev.astype(dtype), np.full(3, 0.1, dtype)
        F.rprop_([p], [grad.astype(dtype)], [s], [ss], lr=0.1)
        for name, value in {"param": p, "prev": s, "step_size": ss}.items():
            np.testing.assert_allclose(value, want[name], rtol=1e-6, err_msg=f"kernel {name}")
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-15, err_msg=f"reference {name}")


@pytest.mark.parametrize("front_end", ["numpy", "torch"])
@pytest.mark.parametrize("spelling", [1.0, np.array([True])], ids=["1.0", "array"])
@pytest.mark.parametrize("before", [False, True])
def test_bug_flag_changed_in_a_group_is_checked_only_if_unequal_to_the_last(
    front_end: str, spelling: Any, before: bool
) -> None:
    """A class recomputes a group's options only when its values compare unequal to the last
    step's: 1.0 == True (and np.array([True]) became True in the comparison), so a flag changed
    to 1.0 was refused after False and accepted after True, taken for True. fusedopt.torch takes
    it by its truth, as torch's step does (torch checks no group value): after False as after
    True, as torch.optim.NAdam steps."""
    if front_end == "torch":
        torch = pytest.importorskip("torch")
        import fusedopt.torch as ft

        stepped = []
        for module in (torch.optim, ft):
            p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
            opt: Any = module.NAdam([p], lr=0.1, weight_decay=0.5, decoupled_weight_decay=before)
            for _ in range(2):
                p.grad = torch.ones(3, dtype=torch.float64)
                opt.step()
                opt.param_groups[0]["decoupled_weight_decay"] = spelling
            stepped.append(p.detach())
        torch.testing.assert_close(stepped[1], stepped[0], rtol=1e-12, atol=0)
        return
    else:
        opt = fusedopt.NAdam([np.ones(3)], lr=0.1, decoupled_weight_decay=before)

        def step() -> None:
            opt.step([np.ones(3)])

    step()
    opt.param_groups[0]["decoupled_weight_decay"] = spelling
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        step()
