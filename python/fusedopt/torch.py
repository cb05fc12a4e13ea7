"""Drop-in ``torch.optim`` optimizers: fusedopt's kernels over torch tensors.

``fusedopt.torch.AdamW`` is a ``torch.optim.Optimizer`` with ``torch.optim.AdamW``'s signature,
defaults, param groups, hooks and state (the same keys, dtypes and ``step`` type, so state dicts
load in either direction and training continues on the same trajectory), so learning-rate
schedulers, ``torch.amp.GradScaler``, checkpoints and distributed wrappers take it. A step
updates every param that has a grad, in its own memory, in one native call per device: CPU
tensors through their data pointers (registered once, checked at every step), CUDA tensors
through :mod:`fusedopt.cuda` on the current stream.

``foreach`` and ``fused`` are accepted and change nothing (fused is what you get);
``differentiable=True`` and ``capturable=True`` are refused. Sparse or integer params, params
that are not dense in memory (gaps, overlaps, expanded), negative or conjugate views (_is_lazy)
and params on other devices are refused when they are added, naming the param and its group; a
grad fusedopt cannot read (sparse, of another dtype, shape or device; under a grad scale, laid
out otherwise than its param or a negative or conjugate view) is refused at the step, naming its
param, with nothing written.

Memory layout: a param may have any dense, non-overlapping layout (``torch.channels_last``,
``channels_last_3d``, any permutation of a contiguous tensor): an element-wise step streams its
memory as a flat buffer, and every tensor streamed with it walks the same elements in the same
order. So its states and its float32 master are created in its layout
(``memory_format=torch.preserve_format``, as torch creates its states), a loaded state is
converted into it (by logical index), 8-bit state keeps one code per element in the param's
memory order (blocks of 256 consecutive elements in memory), and a grad of another layout is read
through a copy in the param's layout (refused under a grad scale, which writes it back).

Complex params (complex64, complex128; on the CPU and CUDA) are stepped as torch.optim steps them
(``torch.view_as_real``): each element as two independent real numbers, its real and imaginary
parts, their states complex tensors of the param's dtype (Adagrad's initial sums and Rprop's
step sizes given the value in both parts, as torch fills them). The low-precision options do not
apply to them.

DTensor params (FSDP2's ``fully_shard``) are stepped through their local shards: ``p.to_local()``
with ``p.grad.to_local()``, the states being DTensors of the same placements, as torch.optim's.
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
import sys
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from fusedopt import _core, cuda, optim
from fusedopt._engine import (
    FULL_PRECISION,
    MIN_QUANTIZED_SIZE,
    PRECISION_OPTIONS,
    TORCH,
    Precision,
    _live_optimizers,
    checked_absmax,
    dequantize_blockwise,
    describe,
    dtype_name,
    first_overlap,
    native_values,
    numpy_dtype,
    overlaps,
    quantize_blockwise,
    quantized_full,
    required_state,
    with_precision_options,
)

__all__ = ["Optimizer"]


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)  # see the module's docstring
_COMPLEX_PRECISION = (
    "state_dtype, master_weights and stochastic_rounding do not apply to complex params, which "
    "are stepped as pairs of float32 or float64 numbers"
)
_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "int8": torch.uint8, "complex64": torch.complex64,
                 "complex128": torch.complex128}  # fmt: skip


def _is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (never importing torch.distributed: none exists before; torch
    2.4 has it in torch.distributed._tensor, later ones in torch.distributed.tensor too). A
    plain tensor or Parameter is answered first: this is asked of every param and state when a
    plan is made."""
    if type(t) in _PLAIN_TENSORS:
        return False
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        dtensor = getattr(sys.modules.get(name), "DTensor", None)
        if dtensor is not None:
            return isinstance(t, dtensor)
    return False


_PLAIN_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))


def _memory(t: Any) -> Any:
    """The tensor whose memory holds ``t``'s elements here: a DTensor's local tensor (taken under
    no_grad, where ``to_local()`` is the DTensor's own local tensor, not an autograd view of it),
    else ``t`` (no no_grad entered: 3 µs each, and a plan over 10000 params asked 35000 times)."""
    if not _is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory from ``t.data_ptr()``, each once, in
    some order (contiguous, channels_last, any permutation of a contiguous tensor): c10's
    non-overlapping-and-dense test, which torch has no Python method for; the native plans'."""
    return _core._dense_layout(t.shape, t.stride())


def _same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one shape) walk their elements in the same memory order: the
    same stride in every dimension of more than one element (an empty tensor walks none)."""
    return _core._same_order(a.shape, a.stride(), b.stride())


def _is_lazy(t: torch.Tensor) -> bool:
    """Whether ``t`` is a negative or conjugate view (``torch._neg_view``, ``.imag`` of a
    conjugate view, ``.conj()`` of a complex tensor), whose memory holds its elements negated or
    conjugated: a grad is read through a copy that holds its values, a param or state (written)
    refused (``torch_is_lazy`` in bindings.cpp)."""
    return t.is_neg() or t.is_conj()


def _lazy_text(where: str) -> str:
    return (
        f"{where} is a negative or conjugate view (torch's lazy sign: `torch._neg_view`, `.imag` "
        "of a conjugate view, `.conj()` of a complex tensor), whose memory holds its elements "
        "negated or conjugated; fusedopt updates memory: resolve it first (`.resolve_neg()`, "
        "`.resolve_conj()`)"
    )


def _inference_text(where: str) -> str:
    return (
        f"{where} is an inference tensor (made under torch.inference_mode), which torch does not "
        "update in place outside inference mode; make it outside (or `.clone()` it there)"
    )


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense, non-overlapping tensor's elements in memory order, as a 1-D view."""
    return t.as_strided((t.numel(),), (1,))


def _like(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor laid out as ``p`` (its strides: ``torch.preserve_format``), of ``dtype``."""
    return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)


def _in_layout(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``value`` (a state of ``p``'s shape) laid out as ``p``: itself if it is already, else a
    copy taking each element by its logical index."""
    if _same_order(value, p) and _is_dense(value):
        return value
    return torch.empty_like(p, dtype=value.dtype, device=value.device).copy_(value)


def _codes_like(p: torch.Tensor, codes: np.ndarray) -> torch.Tensor:
    """8-bit codes, one per element in ``p``'s memory order, as a uint8 tensor laid out as ``p``:
    the codes' own memory, viewed with ``p``'s strides (``p`` is dense: they span it once)."""
    flat = torch.from_numpy(np.ascontiguousarray(codes).reshape(-1))
    if _is_dtensor(p):  # as before layouts: a plain tensor of the param's shape
        return flat.reshape(tuple(p.shape))
    return flat.as_strided(tuple(p.shape), p.stride()).to(device=p.device)


def _new_master(p: torch.Tensor) -> torch.Tensor:
    """A float32 master starting from the param, laid out as it."""
    return p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)


def _restart_stale_master(entry: dict[str, Any], p: torch.Tensor) -> None:
    """A loaded master the param no longer rounds from starts again from the param. Saved by an
    optimizer with masters, trained on without them (torch.optim keeps the entry, unused), the
    master would take the param back to its value then: the param stores the master's rounding
    (to nearest, or either neighbour with stochastic rounding), so a master more than a unit in
    the last place of the param's dtype from it (two, at a binade's edge) was not its master."""
    master = entry.get("master")
    if not isinstance(master, torch.Tensor) or master.shape != p.shape:
        return  # refused by the step's checks
    with torch.no_grad():
        value, held = _memory(p).detach().float(), _memory(master)
        bits, least = (7, -125) if p.dtype == torch.bfloat16 else (10, -13)  # frexp's, normal
        exponent = torch.frexp(value)[1].clamp(min=least)
        exponent = torch.where(value == 0, least, exponent)  # frexp(0) is 0: a subnormal's unit
        unit = torch.ldexp(torch.ones_like(value), exponent - 1 - bits)
        near = (held - value).abs() <= 2 * unit  # false for a NaN master
        rounded = held.to(p.dtype).float()  # an infinite or NaN param: the master's rounding
        same = (rounded == value) | (torch.isnan(rounded) & torch.isnan(value))
        if not bool(torch.where(torch.isfinite(value), near, same).all()):
            entry["master"] = _new_master(p)


def _restart_unstepped_master(entry: dict[str, Any] | None, p: torch.Tensor) -> None:
    """A master made before its param's first step (Adagrad's constructor, as its other state,
    which torch.distributed.checkpoint fills) starts again from the param as it is at that step:
    weights loaded into the model since are the start, however close to the old ones (a
    tolerance, right for a trained master, took back a fine-tuned norm's gamma 1 +- 0.007). Told
    from the state itself (a step count of 0), which copies and pickles keep."""
    if not entry or entry.get("master") is None:
        return
    step = entry.get("step")
    if isinstance(step, torch.Tensor) and not _is_dtensor(step) and float(step) == 0:
        entry["master"] = _new_master(p)


def _check_saved_shape(value: torch.Tensor, p: torch.Tensor, where: str) -> None:
    """A saved state converted into this optimizer's form (a master, float state quantized) has
    its param's shape: the conversion's copy would broadcast another into place."""
    if value.shape != p.shape:
        raise ValueError(
            f"state_dict: {where} has shape {tuple(value.shape)}, not its param's {tuple(p.shape)}"
        )


def _quantized_like(p: torch.Tensor, values: torch.Tensor, nonnegative: bool) -> tuple:
    """``values`` (by logical index, any float dtype) as 8-bit state of ``p``: codes laid out as
    ``p``, quantized in its memory order (blocks of 256 consecutive elements in memory), and
    their absmax. Values already in that order are read where they are, a block at a time
    (a copy of a large state in float32 would take four times the 8-bit state's memory)."""
    # Read in place: no lazy bit.
    values = _in_layout(values.detach().cpu().resolve_neg().resolve_conj(), p)
    flat = _flat(values)
    if flat.dtype == torch.bfloat16:  # no NumPy dtype in torch: its bits as ml_dtypes'
        array = flat.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    else:
        array = flat.numpy()
    codes, scales = quantize_blockwise(array, nonnegative)
    return _codes_like(p, codes), torch.from_numpy(scales).to(device=p.device)


class _State(defaultdict):
    """``optimizer.state``, counting the changes of its entries: the plans hold the state
    tensors they were made with, so an entry set, replaced or removed by anyone but the step (as
    ``ZeroRedundancyOptimizer.load_state_dict`` sets its local optimizer's) makes the next step
    register again. (A tensor replaced inside an entry, ``state[p]["exp_avg"] = t``, the plans
    notice themselves.) Pickled and copied as a plain ``defaultdict(dict)``."""

    def __init__(self, entries: Any = ()) -> None:
        super().__init__(dict, entries)
        self.changes = 0

    def __reduce__(self) -> Any:
        return (defaultdict, (dict,), None, None, iter(self.items()))


def _counting(name: str) -> Callable[..., Any]:
    method = getattr(defaultdict, name)

    def counted(self: _State, *args: Any, **kwargs: Any) -> Any:
        self.changes += 1
        return method(self, *args, **kwargs)

    counted.__name__ = name
    return counted


for _method in (
    "__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update", "setdefault",
):  # fmt: skip
    setattr(_State, _method, _counting(_method))
del _method


# The algorithms whose scalar states torch updates in place in their tensors' own dtype.
_SCALARS_IN_THEIR_DTYPE = ("nadam",)


def _scalar_dtype() -> torch.dtype:
    """torch's dtype for step counts and scalar states (``_get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose step is fusedopt's.

    A subclass names the NumPy-API class (``fusedopt.optim``) that declares its algorithm and
    how torch spells its hyperparameters.
    """

    _declaration: type[optim.Optimizer]
    _step_supports_amp_scaling = False  # set per class: GradScaler passes grad_scale, found_inf
    _group_defaults: dict[str, Any] = {}  # set per class: the constructor's defaults, as torch's

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], precision: Precision = FULL_PRECISION
    ) -> None:
        self.precision = precision
        self._reset_plans()
        # add_param_group checks each group; the precision options, over all of them at once.
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        self.state = _State(self.state)
        self._check_precision()
        if self._declaration._states_at_construction:
            entries = []
            for group in self.param_groups:
                values = self._native_options(group)
                entries += [(p, values) for p in group["params"]]
            # With its master, as torch's state made here is what torch.distributed.checkpoint
            # fills (a master made at the first step was left out of the template and lost on
            # loading). A master never stepped restarts from its param at the param's first step
            # (_register), after weights loaded into the model since (docs/spec.md section 22).
            self._create_states(entries)

    # What a forked child drops (_engine's fork handler, as for the NumPy classes): another
    # thread of the parent may have been in a step, holding the lock and a plan's mutex.
    _plan_attributes: ClassVar[dict[str, Callable[[], Any]]] = {
        "_plans": dict, "_options_cache": dict, "_registered_state": lambda: None,
    }  # fmt: skip

    def _start_lock(self) -> None:
        self._lock = threading.RLock()
        _live_optimizers.add(self)

    def _reset_plans(self) -> None:
        """The lock and the caches: made anew, never pickled or copied."""
        if "_lock" not in self.__dict__:
            self._start_lock()
        # Params whose master load_state_dict set: checked against them at the next step.
        self.__dict__.setdefault("_loaded_masters", [])
        self._plans: dict[Any, Any] = {}
        # Per group (by id): its values' key, its native options, and the values themselves
        # where none can change in place (_unchanging), compared by identity at the next step.
        self._options_cache: dict[
            int, tuple[tuple[Any, ...], tuple[float, ...], tuple[Any, ...] | None]
        ] = {}
        self._registered_state: tuple[_State, int] | None = None  # self.state, its changes
        self._registered_groups: list[tuple[dict, tuple]] = []  # (group, its params then)
        self._dtensors: list[tuple[torch.Tensor, int, int]] = []  # (param, index, group)
        # Params a plan skipped many steps in a row (TorchPlan.kDormantSteps): no plan takes
        # them without a grad, until they have one again; _remake: the next step makes new plans
        # (without those).
        self._dormant: set[torch.Tensor] = set()
        self._remake = False
        # _storage_of's answers, and the precision they were worked out for.
        self._storage: dict[tuple[torch.dtype, bool], tuple[torch.dtype, bool]] = {}
        self._storage_precision: Precision | None = None

    def __getstate__(self) -> dict[str, Any]:
        """torch's (defaults, state, param_groups) and the low-precision options."""
        return {**super().__getstate__(), "precision": self.precision}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's (load_state_dict and unpickling come here), then optimizer.state counting its
        changes again, and no plan.

        As torch's classes do here for a checkpoint of an older torch: a group key it lacks
        takes the constructor's default, the class's fixed flags are forced (AdamW's
        decoupled_weight_decay is True, as torch.optim.AdamW.__setstate__ forces it), and a step
        count or scalar state saved as a number becomes a tensor."""
        super().__setstate__(state)
        self.__dict__.setdefault("precision", FULL_PRECISION)
        self._constructing = False
        self.state = _State(self.state)
        self._reset_plans()
        scalars = ("step", *self._declaration._description.scalars)
        for group in self.param_groups:
            for name, value in self._group_defaults.items():
                group.setdefault(name, value)
            group.update({name: bool(value) for name, value in self._declaration._fixed.items()})
            for p in group["params"]:
                entry = self.state.get(p, {})
                for name in scalars:
                    if name in entry and not isinstance(entry[name], torch.Tensor):
                        entry[name] = torch.tensor(float(entry[name]), dtype=_scalar_dtype())
                    elif name in entry and entry[name].device.type != "cpu":
                        # Loaded from torch's fused or capturable optimizer, which keeps its step
                        # counts (and torch's load its scalar states) on the params' device:
                        # fusedopt keeps them in host memory, as torch's other optimizers do.
                        entry[name] = entry[name].detach().to("cpu")

    # ------------------------------------------------------------------------------- groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, then fusedopt's checks: every param must be a dense (non-
        overlapping, in any layout) float32, float64, bfloat16, float16, complex64 or complex128
        tensor, not a negative or conjugate view, on the CPU or a CUDA device (a lazy module's
        uninitialized param is checked once it has a grad), the group's hyperparameters numbers
        (their ranges are never checked here, as torch's add_param_group checks none) and the
        low-precision options must apply to the params; a refused group is not added."""
        index = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_modes(group, index)
            for i, p in enumerate(group["params"]):
                _check_param(p, i, index)
            self._native_options(group)
            if not self._constructing:
                self._check_precision()
        except Exception:
            del self.param_groups[-1]
            raise
        with self._lock:
            self._plans.clear()

    def _check_precision(self) -> None:
        """The low-precision options apply to the params, taken together (master_weights needs
        a 16-bit param among them), all on the CPU."""
        params = [p for group in self.param_groups for p in group["params"]]
        if self.precision != FULL_PRECISION:
            for g, group in enumerate(self.param_groups):
                for i, p in enumerate(group["params"]):
                    if p.dtype in _COMPLEX_DTYPES:
                        raise ValueError(
                            f"params[{i}] of param_groups[{g}] is {p.dtype}: {_COMPLEX_PRECISION}"
                        )
        self.precision.check([dtype_name(p.dtype) for p in params])
        self.precision.check_algorithm(self._declaration._description)
        if self.precision.state_dtype == "int8":
            for g, group in enumerate(self.param_groups):
                for i, p in enumerate(group["params"]):
                    if _is_dtensor(p):
                        raise ValueError(
                            f"state_dtype='int8': params[{i}] of param_groups[{g}] is a DTensor "
                            "(FSDP2); 8-bit state is not kept for sharded params yet (its blocks "
                            "and absmax would be the shard's): use 'bfloat16'"
                        )

    def _check_modes(self, group: dict[str, Any], index: int) -> None:
        """The modes fusedopt has no step for, refused in a group added with them or set in
        one later (the step checks every group)."""
        for flag in ("differentiable", "capturable"):
            if group.get(flag):
                raise ValueError(
                    f"fusedopt.torch.{type(self).__name__}: {flag}=True is not supported "
                    f"(param_groups[{index}]; fusedopt's step runs outside autograd and CUDA "
                    "graphs); leave it False"
                )
        # Kept in a group, they would be ignored: the low-precision options are the optimizer's.
        # One equal to the optimizer's own passes: ZeroRedundancyOptimizer keeps the keyword
        # arguments it builds its local optimizer with in its groups, and copies them on.
        for name in PRECISION_OPTIONS:
            if name in group and not self._is_own_precision(name, group[name]):
                raise ValueError(
                    f"fusedopt.torch.{type(self).__name__}: param_groups[{index}] sets {name}, "
                    "which applies to the whole optimizer: give it to the constructor"
                )

    def _is_own_precision(self, name: str, value: Any) -> bool:
        """Whether ``value`` of the option ``name`` is the one this optimizer was given."""
        try:
            given = Precision.of(**{name: value})
        except (TypeError, ValueError):
            return False
        return getattr(given, name) == getattr(self.precision, name)

    def _native_options(self, group: dict[str, Any]) -> tuple[float, ...]:
        """The group's native options, recomputed only when one of its values changed. Never
        checked (torch checks its constructor's arguments only, and steps with whatever a group
        holds later: a negative lr, a beta of 1); refused only when not a number."""
        declaration = self._declaration
        # A flag the class fixes is read from the group where torch reads it there at each step
        # (torch's Adam step reads AdamW's decoupled_weight_decay from the group).
        flags = {name: group.get(name, value) for name, value in declaration._fixed.items()}
        scalars = self._scalar_arithmetic(group)
        values = (*declaration._values_of(group), *flags.values(), scalars)
        cached = self._options_cache.get(id(group))
        # The very objects of the last step, none of which can change in place: its options.
        if (
            cached is not None
            and cached[2] is not None
            and all(map(operator.is_, values, cached[2]))
        ):
            return cached[1]
        # The NumPy classes' key: values that can change in place (a tensor lr that a scheduler
        # fill_s, a one-element array) are copied into plain numbers, and types are compared.
        key = optim._frozen(values, _key_plain)
        identical = values if all(map(_unchanging, values)) else None
        if cached is not None and optim._same_key(key, cached[0]):
            self._options_cache[id(group)] = (key, cached[1], identical)
            return cached[1]
        fixed = {"convention": TORCH, **{name: float(bool(v)) for name, v in flags.items()}}
        if scalars is not None:
            fixed["float32_scalars"] = float(scalars == torch.float32)
        native = native_values(
            declaration._description,
            declaration._hyperparameters,
            {h.name: _plain(group[h.name]) for h in declaration._hyperparameters},
            fixed,
            checked=False,
        )
        self._options_cache[id(group)] = (key, native, identical)
        return native

    def _scalar_arithmetic(self, group: dict[str, Any]) -> torch.dtype | None:
        """The dtype torch computes the group's scalar states in (None: it keeps none). ASGD
        writes eta and mu from Python numbers through torch.as_tensor, so in the default scalar
        dtype, whatever dtype the tensors have. NAdam multiplies mu_product in place, so in the
        tensor's own dtype: the default scalar dtype where the step created it, its param's
        after load_state_dict (which casts every state but step to its param's dtype: float64
        for a float64 param). The first param of the group with that state decides (a group of
        float32 and float64 params loaded from a checkpoint is not followed exactly)."""
        description = self._declaration._description
        if not _computes_scalars(description.name):
            return None
        if description.name in _SCALARS_IN_THEIR_DTYPE:
            for p in group["params"]:
                value = self.state.get(p, {}).get(description.scalars[0])
                if isinstance(value, torch.Tensor):
                    return value.dtype if value.dtype == torch.float64 else torch.float32
        return _scalar_dtype()

    # ---------------------------------------------------------------------------------- state

    # Never inference tensors (made in a step or constructor under torch.inference_mode), which
    # the next step outside it could not update in place, as torch's own could not.
    @torch.inference_mode(False)
    def _create_states(self, entries: Sequence[tuple[torch.Tensor, tuple]]) -> list[bool]:
        """torch's state for each (param, options), created lazily as torch creates it: the
        step count, the scalars, the buffers these options use and a master, in that order;
        for each, whether a buffer was created. The buffers are allocated state by state (every
        param's exp_avg, then every param's exp_avg_sq), so that one state's buffers of
        consecutive params lie one after another in memory, as a step streams them; torch's
        per-param order puts them side by side (the NumPy classes' Adam over 1000 x 1000, 2
        threads: 271 -> 252 µs)."""
        description = self._declaration._description
        used = [description.states_used(values) for _, values in entries]
        # torch's Adagrad fills every sum from its constructor's initial_accumulator_value (for a
        # param added later, from its defaults'), not from the param's group.
        defaults = (
            self._native_options(self.defaults)
            if self._declaration._states_at_construction
            else None
        )
        initial = {values: description.initial_values(defaults or values) for _, values in entries}
        new_buffers: list[dict[str, torch.Tensor]] = [{} for _ in entries]
        held = [self.state.get(p, {}) for p, _ in entries]
        storage = [self._storage_of(p) for p, _ in entries]  # (state dtype, keeps a master)
        for k, name in enumerate(description.states):
            for j, (p, values) in enumerate(entries):
                if name not in used[j] or held[j].get(name) is not None:
                    continue
                value = initial[values][0][k]
                state_dtype = storage[j][0]
                if state_dtype == torch.uint8:  # 8-bit blockwise: codes, block absmax
                    # One code per element in the param's memory order, laid out as the param.
                    codes, absmax = quantized_full(
                        (p.numel(),), value, description.nonnegative(name)
                    )
                    new_buffers[j][name] = _codes_like(p, codes)
                    new_buffers[j][name + "_absmax"] = torch.from_numpy(absmax).to(p.device)
                else:  # laid out as the param (channels_last, ...), as torch's zeros_like
                    if p.dtype in _COMPLEX_DTYPES:  # both parts, as torch fills them
                        value = complex(value, value)
                    new_buffers[j][name] = torch.full_like(
                        p, value, dtype=state_dtype, memory_format=torch.preserve_format
                    )
        tracks_step = self._tracks_step()
        for (p, values), buffers, (_, needs_master) in zip(entries, new_buffers, storage):
            if p not in self.state and not (
                tracks_step or buffers or description.scalars or needs_master
            ):
                continue  # torch keeps no state at all here (SGD without momentum)
            state = self.state[p]
            if tracks_step and "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            for name, value in zip(description.scalars, initial[values][1]):
                if name not in state:
                    state[name] = torch.tensor(value, dtype=_scalar_dtype())
            state.update(buffers)
            if needs_master and state.get("master") is None:
                state["master"] = _new_master(p)
        return [bool(buffers) for buffers in new_buffers]

    def _tracks_step(self) -> bool:
        """torch's SGD keeps no step count; with stochastic rounding, whose bits are keyed by
        the step, it keeps one."""
        return self._declaration._tracks_step or self.precision.stochastic_rounding

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        return self._storage_of(p)[0]

    def _needs_master(self, p: torch.Tensor) -> bool:
        return self._storage_of(p)[1]

    def _storage_of(self, p: torch.Tensor) -> tuple[torch.dtype, bool]:
        """A param's state dtype and whether it keeps a master, worked out once per param dtype
        (and, for 8-bit state, per side of the size quantized from): they are asked for each
        state of each param as a plan is made, and working them out from the dtype's name took
        a tenth of making a plan over 10000 params."""
        if self._storage_precision is not self.precision:  # the first, or another one assigned
            self._storage, self._storage_precision = {}, self.precision
        key = (p.dtype, p.numel() >= MIN_QUANTIZED_SIZE)
        storage = self._storage.get(key)
        if storage is None:
            if p.dtype in _COMPLEX_DTYPES and self.precision != FULL_PRECISION:
                raise ValueError(_COMPLEX_PRECISION)  # params or options changed since checked
            name = dtype_name(p.dtype)
            size = MIN_QUANTIZED_SIZE if key[1] else 0
            state_dtype = _TORCH_DTYPES[self.precision.state_dtype_for(name, size)]
            storage = self._storage[key] = (state_dtype, self.precision.needs_master(name))
        return storage

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, which casts every floating state tensor to its param's dtype; then the
        states this optimizer keeps in another dtype (``state_dtype``, the float32 ``master``,
        the scalar states of 16-bit params) are cast from the saved tensors instead, so a
        master comes back exact; and a state saved in another memory layout than its param's
        now (a contiguous checkpoint for a channels_last param, or the reverse) is converted
        into the param's layout, each element by its logical index, as the step streams every
        state in its param's memory order (8-bit codes, kept in memory order, are dequantized
        in the saved layout and quantized again in the param's). A refusal (of torch's or of
        these conversions) leaves the optimizer as it was: torch's load builds a new state and
        new groups, which replace the old ones only once every conversion has passed.

        The load hooks run where torch runs them: the pre-hooks first (the dict one returns is
        the one loaded, conversions included), the post-hooks last, after the conversions and
        only once the load has passed."""
        with self._lock:
            previous = self.state, self.param_groups
            try:
                state_dict = state_dict.copy()  # shallow, as torch's
                for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
                    returned = pre_hook(self, state_dict)
                    if returned is not None:
                        state_dict = returned
                self._load_state_dict(state_dict)
            except BaseException:
                self.state, self.param_groups = previous
                self._reset_plans()
                raise
            for post_hook in list(self._optimizer_load_state_dict_post_hooks.values()):
                post_hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        # torch's load without its hooks, which load_state_dict runs around the conversions.
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            # __setstate__ drops the plans. torch casts every saved state to its param's dtype:
            # 8-bit codes and float32 masters, which _load_state and the master's load below
            # read from the saved tensors, go to it as empty tensors instead (a float32 copy of
            # every 8-bit state at once took 4.4 times the state's memory).
            super().load_state_dict(self._without_reloaded_states(state_dict))
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        # A group saved with a precision option (groups kept them, ignored, before they were
        # refused there): dropped, as it had no effect; the optimizer's own options apply.
        for group in self.param_groups:
            for name in PRECISION_OPTIONS:
                group.pop(name, None)
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            entry = saved_state.get(saved_id)
            if not entry or p not in self.state:
                continue
            if p.dtype not in (torch.float32, torch.float64):
                for name in self._declaration._description.scalars:
                    if isinstance(entry.get(name), torch.Tensor):
                        value = float(entry[name])
                        self.state[p][name] = torch.tensor(value, dtype=_scalar_dtype())
            for name in self._declaration._description.states:
                if isinstance(entry.get(name), torch.Tensor):
                    self._load_state(p, name, entry, saved_id)
            master = entry.get("master")
            if not self._needs_master(p):
                # Kept, it would be saved again and loaded, stale, by an optimizer with masters.
                self.state[p].pop("master", None)
            elif isinstance(master, torch.Tensor):
                _check_saved_shape(master, p, f"state[{saved_id}]['master']")
                master = master.to(dtype=torch.float32, device=p.device)
                self.state[p]["master"] = _like(p, torch.float32).copy_(master)
                self._loaded_masters.append(p)
        description = self._declaration._description
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                entry = self.state.get(p, {})
                stepped = "step" in entry and float(entry["step"]) > 0  # NaN: refused at a step
                # The step count torch keeps (not SGD's, which only stochastic rounding counts:
                # a checkpoint without one starts it at 0, its rounding's key, at the next step).
                required = required_state(
                    description, entry, int(stepped), self._declaration._tracks_step,
                    self._declaration._states_at_construction,
                )  # fmt: skip
                missing = [name for name in required if name not in entry]
                if missing:
                    raise ValueError(
                        f"state_dict: the state of params[{i}] of param_groups[{g}] has no "
                        f"{missing[0]!r}, which {type(self).__name__} keeps"
                    )
        # torch keeps a channels_last param's state channels_last (zeros_like), and a state
        # loaded into a param of another layout as it was saved; the step streams each state in
        # its param's memory order, so each is laid out as its param (by logical index).
        for p in params:
            if _is_dtensor(p) or torch.nn.parameter.is_lazy(p):
                continue
            entry = self.state.get(p, {})
            for name, value in list(entry.items()):
                if (
                    isinstance(value, torch.Tensor)
                    and not _is_dtensor(value)
                    and value.dtype != torch.uint8  # 8-bit codes: laid out by _load_state
                    and value.shape == p.shape
                    and value.dim() > 0
                ):
                    entry[name] = _in_layout(value, p)

    def _without_reloaded_states(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with each saved 8-bit state (uint8 codes) and master replaced by an
        empty tensor, for torch's load (new dicts where one changes; the caller's is kept)."""
        names = set(self._declaration._description.states)
        # Only a listed param's entries are read again; torch keeps the others as they are.
        listed = {i for group in state_dict["param_groups"] for i in group["params"]}
        state = {}
        for saved_id, entry in state_dict["state"].items():
            if isinstance(entry, dict) and saved_id in listed:
                reloaded = [
                    key
                    for key, value in entry.items()
                    if isinstance(value, torch.Tensor)
                    and not _is_dtensor(value)
                    and (key == "master" or (key in names and value.dtype == torch.uint8))
                ]
                if reloaded:
                    entry = {**entry, **{key: entry[key].new_empty(0) for key in reloaded}}
            state[saved_id] = entry
        return {**state_dict, "state": state}

    def _load_state(self, p: torch.Tensor, name: str, saved: dict[str, Any], saved_id: Any) -> None:
        """A saved state and its saved absmax (8-bit state) as this optimizer keeps them,
        converted together from the saved tensors (torch's load_state_dict cast both, uint8
        codes too, to the param's dtype and copied every entry): quantized (float state into
        8-bit), dequantized (8-bit into float) or cast; an absmax is kept beside 8-bit state
        only, in float32, once checked as the NumPy classes check it."""
        nonnegative = self._declaration._description.nonnegative(name)
        entry = self.state[p]
        dtype = self._state_dtype(p)
        value, has_absmax = saved[name], name + "_absmax" in saved
        where = f"state[{saved_id}]['{name}_absmax']"
        if value.dtype != torch.uint8 and has_absmax:
            raise ValueError(
                f"state_dict: unexpected {where}: {name!r} is not 8-bit state (uint8 codes), "
                "the only state with an absmax"
            )
        if dtype == torch.uint8 and value.dtype != torch.uint8:
            _check_saved_shape(value, p, f"state[{saved_id}][{name!r}]")
            entry[name], entry[name + "_absmax"] = _quantized_like(p, value, nonnegative)
            return
        if value.dtype == torch.uint8:
            if not has_absmax:
                raise ValueError(f"state_dict: the 8-bit state {name!r} has no {name}_absmax")
            absmax = saved[name + "_absmax"]
            if isinstance(absmax, torch.Tensor):
                absmax = absmax.detach().cpu()
                if absmax.dtype in (torch.bfloat16, torch.float16):  # no NumPy dtype: widened
                    absmax = absmax.float()
                absmax = absmax.numpy()
            absmax = torch.from_numpy(checked_absmax(absmax, p.numel(), where))
        if value.dtype == torch.uint8:
            # Saved codes are in the memory order of their own layout (the saved param's).
            value = value.detach().cpu()
            if value.shape != p.shape:
                raise ValueError(
                    f"state_dict: the 8-bit state {name!r} of state[{saved_id}] has shape "
                    f"{tuple(value.shape)}, not its param's {tuple(p.shape)}"
                )
            if not _is_dense(value):
                value = value.contiguous()
            if dtype == torch.uint8 and _same_order(value, p):
                entry[name] = _like(p, torch.uint8).copy_(value)
                entry[name + "_absmax"] = absmax.to(device=p.device)
                return
            flat = dequantize_blockwise(_flat(value).numpy(), absmax.numpy(), nonnegative)
            # The floats in the codes' memory order, viewed in their layout (no copy).
            values = torch.from_numpy(flat.reshape(-1)).as_strided(value.shape, value.stride())
            if dtype == torch.uint8:  # another layout than the param's: quantized again in it
                entry[name], entry[name + "_absmax"] = _quantized_like(p, values, nonnegative)
                return
            entry.pop(name + "_absmax", None)
            entry[name] = _like(p, dtype).copy_(values)  # (to the param's device)
            return
        entry.pop(name + "_absmax", None)
        if dtype != p.dtype:
            if value.shape == p.shape:  # another shape is refused at the step, naming it
                entry[name] = _like(p, dtype).copy_(value)
            else:
                entry[name] = value.to(dtype=dtype, device=p.device, copy=True)

    # ----------------------------------------------------------------------------------- step

    # A training step compiled whole (torch.compile of a function that calls optimizer.step())
    # runs this step eagerly, between graphs: dynamo cannot trace the native call, and tracing
    # the rest of it would not be this step.
    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step of every param that has a grad, in one native call per device.

        Under a ``GradScaler`` (SGD, Adam, AdamW: ``_step_supports_amp_scaling``) the scaler's
        ``grad_scale`` divides the grads inside the pass (the unscaled grads are written back)
        and a nonzero ``found_inf`` skips the step, as torch's fused kernels do."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return loss
        scale = None if grad_scale is None else float(grad_scale)
        # No torch.no_grad(): the native step writes memory autograd never sees, and the state
        # it creates requires no grad (entering no_grad cost 3.4 us, as much as the native step).
        with self._lock:
            for g, group in enumerate(self.param_groups):
                self._check_modes(group, g)
            options = [self._native_options(group) for group in self.param_groups]
            if self._remake or not (self._state_unchanged() and self._groups_unchanged()):
                self._plans = {}
                self._remake = False
            for p, index, group in self._dtensors:
                if p.grad is not None:
                    _check_dtensor_grad(p, index, group)
            # A plan that refuses has written nothing; the devices stepped before it are not
            # stepped again by the plans made after it (params on CPU and CUDA in one optimizer).
            stepped = set()
            for device, plan in self._plans.items():
                if not self._step_plan(device, plan, options, scale):
                    break
                stepped.add(device)
            else:
                if self._plans:
                    return loss
            # The new plans check more (buffers apart, dtypes) once the state is made, making
            # them or at their first step: a refusal takes back the state made for its device.
            entries = {
                p: None if p not in self.state else dict(self.state[p])
                for group in self.param_groups
                for p in group["params"]
                if p.grad is not None
            }
            loaded_masters = list(self._loaded_masters)
            try:
                self._register(options)
                for device, plan in self._plans.items():
                    if device in stepped:
                        continue
                    if not self._step_plan(device, plan, options, scale):
                        # Made from the params as they were: one moved since, which only
                        # another thread can do (assigning `param.data` during this step).
                        raise RuntimeError(
                            "fusedopt.torch: a param's memory moved while its plan was being "
                            "made (another thread assigning `param.data`?); its params were not "
                            "stepped"
                        )
                    stepped.add(device)
            except BaseException as error:
                if not isinstance(error, Exception):
                    # A KeyboardInterrupt raised as a native step returned (Python delivers a
                    # signal only between bytecodes): that device's step took place; its state
                    # stays with its params.
                    stepped.update(d for d, plan in self._plans.items() if plan[1].steps_taken)
                self._plans = {}
                self._loaded_masters = loaded_masters
                for p, entry in entries.items():
                    if p.device in stepped:
                        continue
                    if entry is None:
                        self.state.pop(p, None)
                    else:
                        self.state[p].clear()
                        self.state[p].update(entry)
                raise
        return loss

    def _state_unchanged(self) -> bool:
        """Whether optimizer.state still holds the entries the plans were made with (the plans
        check the tensors of those entries)."""
        if self._registered_state is None:
            return False
        registered, changes = self._registered_state
        return self.state is registered and registered.changes == changes

    def _groups_unchanged(self) -> bool:
        """Whether param_groups lists the params the plans were made with: torch steps the lists
        as they are, and a param appended (a layer unfrozen), removed or replaced in a list (an
        edit keeps the list's identity) joins or leaves the next step."""
        groups = self.param_groups
        return len(groups) == len(self._registered_groups) and all(
            group is registered
            and len(group["params"]) == len(params)
            and all(map(operator.is_, group["params"], params))
            for group, (registered, params) in zip(groups, self._registered_groups)
        )

    def _check_grads_and_steps(self, written: bool) -> None:
        """What a plan checks at each step, naming the param and its group (``written``: a grad
        scale writes the grads back)."""
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    _check_grad(p, i, g, written)
                    if self._tracks_step():
                        _check_step_count(self.state.get(p, {}), i, g)

    def _step_plan(self, device: Any, plan: Any, options: list, scale: float | None) -> bool:
        entry_options, native, active, updated = plan  # active: (group, index, param)
        for g, now in enumerate(options):
            if now is not entry_options[g]:
                # New options may need a state the params do not have yet: register again.
                if self._needs_states(g, now, active):
                    return False
                native.set_options(g, now)
                entry_options[g] = now
        try:
            if not native.step(scale):
                return False
        except (TypeError, ValueError) as error:
            # The same refusal, naming the param and its group.
            self._check_grads_and_steps(written=scale is not None)
            raise _named(error, active) from None
        # The native step wrote memory autograd never saw: bump the params' versions, as torch's
        # in-place updates do, so that a graph that saved a param before the step refuses its
        # backward after it ("modified by an inplace operation"). The states' are not bumped:
        # they are the optimizer's own, no model's graph saves them, and bumping costs about
        # 60 ns a tensor (Adam over 10000 x 100: 40000 tensors, 2.7 ms, a third of the step).
        if native.skipped:  # params without a grad now, not written
            updated = _with_local([p for _, _, p in active if p.grad is not None])
            if native.dormant:  # long without a grad: the next plan leaves them out
                self._dormant.update(active[j][2] for j in native.dormant_params())
                self._remake = True
        if scale is not None:  # the unscaled grads were written back
            updated = updated + _with_local([p.grad for _, _, p in active if p.grad is not None])
        torch._C._increment_version(updated)
        return True

    def _needs_states(self, group_index: int, values: tuple[float, ...], active: list) -> bool:
        """Whether a param of the group in the plan (``active``: (group, index, param)) lacks a
        state these options use: the plan refuses them, and is made anew."""
        used = self._declaration._description.states_used(values)
        return any(
            self.state.get(p, {}).get(name) is None
            for g, _, p in active
            if g == group_index
            for name in used
        )

    def _register(self, options: list[tuple[float, ...]]) -> None:
        """Plans over the params that have a grad now, one per device, their state created, and
        on the CPU also over the params without a grad whose state is complete
        (``_joins_without_grad``). Every param, grad and state is checked first, naming the param
        and its group, so a refusal leaves everything as it was (the step takes back the state
        made for a plan that refuses later)."""
        description = self._declaration._description
        # (group, index, param, whether it has a grad, whether it joins the plan without one)
        by_device: dict[Any, list[tuple[int, int, torch.Tensor, bool, bool]]] = {}
        self._plans = {}
        dormant, self._dormant = self._dormant, set()
        self._dtensors = []
        if not isinstance(self.state, _State):  # optimizer.state = defaultdict(dict) to reset
            self.state = _State(self.state)
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                _check_param(p, i, g)
                if p.grad is not None:
                    _check_grad(p, i, g)
                    if self._tracks_step():
                        _check_step_count(self.state.get(p, {}), i, g)
                    _check_states(
                        self.state.get(p, {}), description.states, p, i, g, self._state_dtype(p),
                        self._needs_master(p),
                    )  # fmt: skip
                    _restart_unstepped_master(self.state.get(p), p)
                if _is_dtensor(p):
                    self._dtensors.append((p, i, g))
                has_grad = p.grad is not None
                if not has_grad and p in dormant:
                    self._dormant.add(p)  # until it has a grad again
                joins = (
                    not has_grad
                    and p not in self._dormant
                    and self._joins_without_grad(p, i, g, options[g])
                )
                by_device.setdefault(p.device, []).append((g, i, p, has_grad, joins))
        _check_updated_once(self.param_groups)
        # Masters loaded since the last step, checked against their params now that the model's
        # weights are loaded too (a new tensor where one restarts: a refused step puts the loaded
        # one back, and step() the list).
        for p in self._loaded_masters:
            _restart_stale_master(self.state.get(p, {}), p)
        self._loaded_masters = []
        for device, entries in by_device.items():
            entries = _apart(entries)
            made = self._create_states([(p, options[g]) for g, _, p, a, _ in entries if a])
            created = iter(made)
            # Whether each param's state was made for this step (none of a joining param's was).
            new_state = [next(created) if a else False for _, _, _, a, j in entries if a or j]
            try:
                plan = self._device_plan(device, entries, options, new_state, joining=True)
            except (TypeError, ValueError):
                if not any(j for *_, j in entries):
                    raise
                # Whatever the plan refused of the params without a grad, they are left out, as
                # torch leaves them out of this step.
                plan = self._device_plan(device, entries, options, made, joining=False)
            self._plans[device] = plan
        self._registered_state = (self.state, self.state.changes)
        self._registered_groups = [(group, tuple(group["params"])) for group in self.param_groups]

    def _joins_without_grad(
        self, p: torch.Tensor, index: int, group: int, values: tuple[float, ...]
    ) -> bool:
        """Whether a param without a grad now joins its device's plan, to be skipped at each step
        where its grad is None and stepped where it has one, without a new plan (a mixture of
        experts gives each step's grads to a few experts; a new plan whenever that set changed
        cost 100 µs a param, six times torch's step over 10000 small params). A plain param
        whose state is complete for its group's options and passes the checks a param with a
        grad passes (where the options keep no state, as SGD's without momentum, any param); the
        native plan's own checks may still leave it out (_register)."""
        if _is_dtensor(p) or torch.nn.parameter.is_lazy(p):
            return False
        entry = self.state.get(p, {})
        description = self._declaration._description
        used = description.states_used(values)
        needed = [*used, *description.scalars]
        if self._tracks_step():
            needed.append("step")
        if self._needs_master(p):
            needed.append("master")
        if self._state_dtype(p) == torch.uint8:
            needed += [name + "_absmax" for name in used]
        if not all(isinstance(entry.get(name), torch.Tensor) for name in needed):
            return False
        host = ("step", *description.scalars)  # read by the plan in host memory
        if any(entry[name].device.type != "cpu" for name in needed if name in host):
            return False  # a param with a grad is refused for it, naming it
        try:
            _check_step_count(entry, index, group)
            _check_states(
                entry, description.states, p, index, group, self._state_dtype(p),
                self._needs_master(p),
            )  # fmt: skip
        except (TypeError, ValueError, AttributeError):  # a state that is no tensor: not ours
            return False
        return True

    def _device_plan(
        self, device: Any, entries: list, options: list, new_state: list[bool], joining: bool
    ) -> tuple:
        """One device's plan over ``entries`` (see _register): the params with a grad and, when
        ``joining``, those that join without one; ``new_state``: for each param stepped, whether
        its state was made for this step. Returns the entry of ``self._plans``."""
        description = self._declaration._description
        params = [p for _, _, p, _, _ in entries]
        group_of = [g for g, _, _, _, _ in entries]
        active = [a or (j and joining) for _, _, _, a, j in entries]
        stepped = [(g, i, p) for (g, i, p, _, _), a in zip(entries, active) if a]
        active_params = [p for _, _, p in stepped]
        kept = [self.state.get(p, {}) for p in active_params]
        states = [
            [None if entry.get(name) is None else _memory(entry[name]) for entry in kept]
            if any(entry.get(name) is not None for entry in kept)
            else None
            for name in description.states
        ]
        local = [_is_dtensor(p) for p in params]
        steps = [self.state[p]["step"] for p in active_params] if self._tracks_step() else []
        scalars = (
            [[self.state[p][name] for name in description.scalars] for p in active_params]
            if description.scalars
            else None
        )
        _check_scalars_apart(stepped, steps, scalars, description.scalars)
        # Each state tensor as its entry holds it: a plan steps nothing once one was replaced.
        kept_tensors = [
            (entry, key, value)
            for entry in kept
            for key, value in entry.items()
            if isinstance(value, torch.Tensor)
        ]
        # The precision options, on the CPU and the GPU alike.
        extra: dict[str, Any] = {}
        if self.precision.master_weights:
            extra["masters"] = [
                _memory(entry["master"]) if "master" in entry else None for entry in kept
            ]
        extra["rounding_seed"] = self.precision.rounding_seed
        if self.precision.state_dtype == "int8":
            extra["absmax"] = [
                [entry.get(name + "_absmax") for entry in kept]
                if any(entry.get(name + "_absmax") is not None for entry in kept)
                else None
                for name in description.states
            ]
        try:
            native = _native_plan(device)(
                description.name, options, group_of, params, active, states, steps, scalars,
                new_state if description.uses_new_state else None, local=local,
                kept=kept_tensors, checked=False, **extra,
            )  # fmt: skip
        except (TypeError, ValueError) as error:
            raise _named(error, stepped) from None
        updated = _with_local(active_params)  # whose versions a step bumps
        return (list(options), native, stepped, updated)


def _native_plan(device: torch.device) -> type:
    """The plan for params on ``device``: the CPU's, or the GPU's (tests give the emulated GPU's
    to CPU tensors)."""
    return _core.TorchPlan if device.type == "cpu" else _DevicePlan


class _DevicePlan:
    """A CUDA device's plan: ``_core.TorchPlan`` (its checks of torch's tensors, registered once
    and read at each step without Python calls) with fusedopt._cuda's launcher, which keeps the
    plan's tables on the GPU and launches each checked step in one kernel, on torch's current
    stream (or ``fusedopt.cuda.use_stream``'s) after the work queued there. The step counts and
    scalar states stay host tensors. A param without a grad is skipped, as on the CPU. Also
    fusedopt.keras' plan for variables on a CUDA device."""

    def __init__(
        self, algorithm: str, options: list, group_of: list[int], params: list, active: list,
        *rest: Any, **kwargs: Any,
    ) -> None:  # fmt: skip
        self._first = next((p for p, a in zip(params, active) if a), None)
        located = self._first if self._first is not None else next(iter(params), None)
        device = -1 if located is None else _memory(located).get_device()
        # get_device() is -1 for a CPU tensor: the emulated GPU's (tests), whose device is 0.
        self._launcher = cuda._module().Launcher(algorithm, max(device, 0))
        self._plan = _core.TorchPlan(
            algorithm, options, group_of, params, active, *rest, launcher=self._launcher, **kwargs
        )

    def step(self, grad_scale: float | None) -> bool:
        self._launcher.set_streams(*cuda._streams(None, self._first))
        return self._plan.step(grad_scale)

    def step_grads(self, grads: list, step: int) -> bool:  # fusedopt.keras' step
        self._launcher.set_streams(*cuda._streams(None, self._first))
        return self._plan.step_grads(grads, step)

    def set_options(self, group: int, values: tuple[float, ...]) -> None:
        self._plan.set_options(group, values)

    steps_taken = property(lambda self: self._plan.steps_taken)
    skipped = property(lambda self: self._plan.skipped)
    dormant = property(lambda self: self._plan.dormant)

    def dormant_params(self) -> list[int]:
        return self._plan.dormant_params()


def _check_param(p: Any, index: int, group: int) -> None:
    """A param fusedopt can update in place: strided, floating or complex, non-overlapping and
    dense in memory (any layout: contiguous, channels_last, permuted), in memory of its own on the
    CPU or a CUDA device fusedopt.cuda serves (a DTensor: its local tensor). A lazy module's param
    (UninitializedParameter), which torch.optim takes, has no memory yet: it is checked at the
    first step after it was materialized (a param without a grad is not in a plan, and one with a
    grad makes a new plan)."""
    where = f"params[{index}] of param_groups[{group}]"
    if torch.nn.parameter.is_lazy(p):
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(p).__name__}")
    if p.layout != torch.strided:
        raise TypeError(f"{where} is a {p.layout} tensor; fusedopt updates dense tensors")
    if p.dtype not in _FLOAT_DTYPES + _COMPLEX_DTYPES:
        raise TypeError(
            f"{where} has dtype {p.dtype}; fusedopt updates float32, float64, bfloat16, float16, "
            "complex64 and complex128"
        )
    if p.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where} is on {p.device}; fusedopt.torch serves the CPU and CUDA")
    if p.device.type == "cuda" and (reason := cuda.unavailable_reason()):
        raise ValueError(f"{where} is on {p.device}, which fusedopt cannot serve here: {reason}")
    memory = _memory(p)
    if _is_lazy(memory):
        raise TypeError(_lazy_text(where))
    if memory.is_inference():
        raise ValueError(_inference_text(where))
    if not _is_dense(memory):
        raise ValueError(
            f"{where} is not dense in memory (shape {tuple(memory.shape)}, strides "
            f"{memory.stride()}: gaps between its elements, or elements sharing memory); "
            "fusedopt updates a tensor's own memory as one block, in any dense layout "
            "(contiguous, channels_last, permuted), and a copy would be updated instead of it"
        )
    if memory.numel() > 0 and memory.data_ptr() == 0:
        raise TypeError(
            f"{where} ({type(p).__name__}) has no memory of its own; fusedopt updates a tensor's "
            "own memory (DTensors are stepped through their local tensors)"
        )


def _named(error: Exception, active: list[tuple[int, int, torch.Tensor]]) -> Exception:
    """A native refusal, which names a param's buffer by the param's index among those stepped
    (``exp_avg[2] is not C-contiguous``, ``grads[2] overlaps params[2]``), with the param and
    its group named first, as every refusal names them."""
    match = re.search(r"\[(\d+)\]", str(error))
    if match is None or int(match[1]) >= len(active):
        return error
    g, i, _ = active[int(match[1])]
    return type(error)(f"params[{i}] of param_groups[{g}]: {error}")


def _with_local(tensors: list) -> list:
    """The tensors and, for a DTensor, its local tensor too, whose memory the step writes."""
    if not any(map(_is_dtensor, tensors)):
        return tensors
    return tensors + [_memory(t) for t in tensors if _is_dtensor(t)]


def _check_dtensor_grad(p: Any, index: int, group: int) -> None:
    """A DTensor param's grad is a DTensor of its placements (FSDP2's are: Shard(0) both)."""
    grad = p.grad
    if not _is_dtensor(grad) or grad.placements != p.placements:
        what = grad.placements if _is_dtensor(grad) else f"a {type(grad).__name__}"
        raise ValueError(
            f"the grad of params[{index}] of param_groups[{group}] is {what}; a DTensor param's "
            f"grad must be a DTensor of the param's placements {p.placements}, whose local "
            "tensors fusedopt steps"
        )


def _check_grad(p: Any, index: int, group: int, written: bool = False) -> None:
    """A grad fusedopt can read: dense, in memory of its own, with its param's dtype, shape and
    device; laid out as its param where a grad scale writes it back (the step reads any other
    through a copy in its param's layout, so that it walks the param's elements in order)."""
    where = f"the grad of params[{index}] of param_groups[{group}]"
    if _is_dtensor(p):
        _check_dtensor_grad(p, index, group)
    param, grad = _memory(p), _memory(p.grad)
    if grad.layout != torch.strided:
        raise TypeError(f"{where} is a {grad.layout} tensor; fusedopt reads dense grads")
    if grad.dtype != param.dtype:
        raise TypeError(f"{where} has dtype {grad.dtype}, not its param's {param.dtype}")
    if grad.shape != param.shape:
        raise ValueError(
            f"{where} has shape {tuple(grad.shape)}, not its param's {tuple(param.shape)}"
        )
    if grad.device != param.device:
        raise ValueError(f"{where} is on {grad.device}, not on its param's {param.device}")
    if written and _is_lazy(grad):
        raise ValueError(
            _lazy_text(where) + "; a grad scale writes the unscaled grad back into its memory"
        )
    if written and not _same_order(grad, param):
        raise ValueError(
            f"{where} is not laid out as its param (strides {grad.stride()}, its param's "
            f"{param.stride()}); a grad scale writes the unscaled grad back into it, which "
            "needs its own memory in its param's memory order"
        )
    if grad.numel() > 0 and grad.data_ptr() == 0:
        raise TypeError(f"{where} has no memory of its own; fusedopt reads a grad's own memory")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The memory of a dense tensor (as _check_param requires): [data_ptr, + its bytes)."""
    begin = t.data_ptr()
    return begin, begin + t.numel() * t.element_size()


def _apart(entries: list[tuple[int, int, Any, bool, bool]]) -> list:
    """One device's entries (group, index, param, whether it has a grad, whether it joins the
    plan without one) with the joining params left out whose memory overlaps another param's in
    the plan: torch steps two params over one memory, one at a time, and a plan refuses them
    (the params with a grad are apart: _check_updated_once)."""
    while any(e[4] for e in entries):
        extents = [
            (*_byte_range(_memory(p)), k)
            for k, (_, _, p, has_grad, joins) in enumerate(entries)
            if has_grad or joins
        ]
        left_out = {k for pair in overlaps(extents) for k in pair if entries[k][4]}
        if not left_out:
            break
        entries = [(*e[:4], False) if k in left_out else e for k, e in enumerate(entries)]
    return entries


def _check_updated_once(groups: list[dict[str, Any]]) -> None:
    """No tensor is updated twice in a step: one fused pass updates each param once, so a param
    listed twice (torch warns, and updates it twice) or params that share memory are refused."""
    seen: dict[int, str] = {}
    extents: dict[Any, list[tuple[int, int, str]]] = {}  # per device: [begin, end), its name
    for g, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            where = f"params[{i}] of param_groups[{g}]"
            if id(p) in seen:
                raise ValueError(
                    f"{where} is the same tensor as {seen[id(p)]}; fusedopt updates each tensor "
                    "once per step"
                )
            seen[id(p)] = where
            memory = _memory(p)
            extents.setdefault(memory.device, []).append((*_byte_range(memory), where))
    for device_extents in extents.values():
        if clash := first_overlap(device_extents):
            raise ValueError(
                f"{clash[0]} overlaps {clash[1]} in memory; fusedopt updates each tensor once per "
                "step"
            )


def _check_step_count(entry: dict, index: int, group: int) -> None:
    """The native step reads a step count as an integer: a value out of [0, 2**63) (NaN, or 1e30
    from a checkpoint) would be a garbage number there, so it is refused as it is stored."""
    step = entry.get("step")
    if step is not None and not isinstance(step, torch.Tensor):
        raise TypeError(
            f"state['step'] of params[{index}] of param_groups[{group}] is a "
            f"{type(step).__name__}; torch keeps a step count in a tensor, which the step updates"
        )
    if step is not None and not 0 <= float(step) < 2.0**63:
        raise ValueError(
            f"state['step'] of params[{index}] of param_groups[{group}] is {float(step)}; a step "
            "count is in [0, 2**63)"
        )


def _check_states(
    entry: dict,
    names: Iterable[str],
    p: Any,
    index: int,
    group: int,
    state_dtype: torch.dtype,
    master: bool,
) -> None:
    """The state buffers kept for a param have the dtype the optimizer keeps (its param's unless
    ``state_dtype`` says otherwise; float32 for a master), its shape, its device and its memory
    layout (they may not, once ``param.data`` was given another dtype, shape or layout, or a
    state was replaced): the step streams each in its param's memory order."""
    param = _memory(p)
    expected = [(key, state_dtype) for key in names]
    if master:
        expected.append(("master", torch.float32))
    for key, dtype in expected:
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{_state_where(key, index, group)} is a {type(value).__name__}; this optimizer "
                "keeps a tensor there"
            )
        value = _memory(value)
        if _is_lazy(value):
            raise TypeError(_lazy_text(_state_where(key, index, group)))
        if value.is_inference():
            raise ValueError(_inference_text(_state_where(key, index, group)))
        if (value.dtype, value.shape, value.device) != (dtype, param.shape, param.device):
            raise TypeError(
                f"{_state_where(key, index, group)} is a {value.dtype} tensor of shape "
                f"{tuple(value.shape)} on {value.device}; this optimizer keeps it {dtype}, of "
                f"its param's shape {tuple(param.shape)}, on its param's device {param.device} "
                f"(the param: {param.dtype})"
            )
        if not (_is_dense(value) and _same_order(value, param)):
            raise ValueError(
                f"{_state_where(key, index, group)} is not laid out as its param (strides "
                f"{value.stride()}, its param's {param.stride()}); fusedopt steps each state in "
                "its param's memory order "
                "(load_state_dict converts a state into its param's layout)"
            )


def _state_where(key: str, index: int, group: int) -> str:
    """A state entry as messages name it; made only for a message (plans check thousands)."""
    return f"state[{key!r}] of params[{index}] of param_groups[{group}]"


def _check_scalars_apart(
    stepped: list[tuple[int, int, Any]], steps: list, scalars: list | None, names: Sequence[str]
) -> None:
    """No two params stepped share a step count or a scalar state (NAdam's mu_product, ASGD's
    eta and mu): torch advances a shared one once per param, each reading it as it stands, where
    the native step reads every one before it advances any. Refused, as shared buffers are."""
    seen: dict[int, tuple[str, int, int]] = {}
    for j, (g, i, _) in enumerate(stepped):
        entries = [("step", steps[j])] if steps else []
        if scalars is not None:
            entries += list(zip(names, scalars[j]))
        for name, tensor in entries:
            other = seen.setdefault(tensor.data_ptr(), (name, i, g))
            if other != (name, i, g):  # named only here: a plan over 10000 params asks 20000
                raise ValueError(
                    f"{_state_where(name, i, g)} is the memory of {_state_where(*other)}; torch "
                    "advances a shared one once per param: give each param a tensor of its own"
                )


def _plain(value: Any) -> Any:
    """A tensor hyperparameter (torch accepts a one-element tensor lr) as a number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor hyperparameter has one element, not {tuple(value.shape)}")
        return value.item()
    return value


@functools.cache
def _computes_scalars(algorithm: str) -> bool:
    """Whether the algorithm's options say which dtype its scalar states are computed in."""
    return any(f.name == "float32_scalars" for f in describe(algorithm).fields)


def _unchanging(value: Any) -> bool:
    """Whether a hyperparameter value can never change in place: a plain number, a flag, a
    dtype, None, or a tuple of those (not a tensor, an array or a list)."""
    if type(value) is tuple:
        return all(map(_unchanging, value))
    return value is None or type(value) in _UNCHANGING


_UNCHANGING = frozenset((float, int, bool, torch.dtype))


def _key_plain(value: Any) -> Any:
    """An options-cache key's copy of a hyperparameter: a tensor as its number (also inside
    betas: torch takes tensor betas too)."""
    if isinstance(value, torch.Tensor):
        return _plain(value)
    if isinstance(value, tuple):
        return tuple(map(_key_plain, value))
    return optim._plain(value)


def _make(declaration: type[optim.Optimizer]) -> type[Optimizer]:
    """fusedopt.torch.<Name>: torch.optim.<Name>'s signature and defaults where torch has the
    algorithm (the declaration's otherwise), over the declaration's algorithm."""
    name = declaration.__name__
    torch_class = getattr(torch.optim, name, None)
    source = torch_class.__init__ if torch_class is not None else declaration.__init__
    signature = inspect.signature(source)
    # fusedopt's low-precision options, keyword-only after torch's own (the NumPy classes
    # already have them).
    signature = signature.replace(
        parameters=with_precision_options(list(signature.parameters.values()))
    )

    def __init__(self: Optimizer, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        params = arguments.pop("params")
        precision = Precision.popped(arguments)
        defaults = _checked_defaults(declaration, torch_class, arguments)
        Optimizer.__init__(self, params, defaults, precision)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    group_defaults = {
        p.name: p.default
        for p in signature.parameters.values()
        if p.default is not p.empty and p.name not in PRECISION_OPTIONS
    }
    doc = (
        f"``torch.optim.{name}`` with fusedopt's step: the same signature, defaults, param "
        f"groups and state.\n\n{(declaration.__doc__ or '').strip()}"
    )
    namespace = {
        "__init__": __init__,
        "__doc__": doc,
        "_declaration": declaration,
        "_step_supports_amp_scaling": declaration._description.takes_grad_scale,
        "_group_defaults": _torch_defaults(declaration, group_defaults),
        "__module__": __name__,
        "__qualname__": name,
    }
    return type(name, (Optimizer,), namespace)


def _checked_defaults(
    declaration: type[optim.Optimizer], torch_class: Any, arguments: dict[str, Any]
) -> dict[str, Any]:
    """The group defaults of a constructor's arguments, checked as torch.optim checks them: by
    torch's own constructor, over a stand-in param, so that what it refuses (with its exception
    and message) and what it keeps (its key order, its betas as ``_to_scalar`` makes them,
    AdamW's decoupled_weight_decay) are this torch's. A class torch has not (Lion) checks them
    by its NumPy class's rules."""
    if torch_class is not None:
        return dict(torch_class([torch.nn.Parameter(torch.empty(0))], **arguments).defaults)
    defaults = _torch_defaults(declaration, arguments)
    native_values(
        declaration._description,
        declaration._hyperparameters,
        {h.name: _plain(defaults[h.name]) for h in declaration._hyperparameters},
        {"convention": TORCH, **declaration._fixed},
    )
    return defaults


def _torch_defaults(declaration: type[optim.Optimizer], arguments: dict[str, Any]) -> dict:
    """The group defaults as torch keeps them: every constructor argument, and for AdamW the
    ``decoupled_weight_decay=True`` torch.optim.AdamW adds."""
    defaults = dict(arguments)
    for name, value in declaration._fixed.items():
        defaults.setdefault(name, bool(value))
    return defaults


# One class per PyTorch-convention optimizer of fusedopt.optim: adding one there adds it here.
for _name in optim.__all__:
    _declaration = getattr(optim, _name)
    if getattr(_declaration, "_algorithm", ""):
        globals()[_name] = _make(_declaration)
        __all__.append(_name)
del _name, _declaration
