"""PyTorch-convention optimizers over NumPy arrays: ``torch.optim``'s names, defaults and math.

Each ``step(grads)`` updates every param of every group in place, in one native call.
Hyperparameters live in ``param_groups`` (a list of dicts, as in torch) and may be changed
between steps, e.g. by a learning-rate schedule: ``opt.param_groups[0]["lr"] = 0.01``.

A class here only declares its algorithm (described once, in ``csrc/math/<name>.h``) and how
torch spells its hyperparameters; the constructor, state handling, checks and the route to the
native core are shared (:mod:`fusedopt._engine`). One optimizer's steps are serialized by its own
lock, so two threads stepping it get the result of two steps in turn; different optimizers step
in parallel.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import is_, itemgetter
from typing import Any, ClassVar

import numpy as np

from fusedopt import _core, cuda
from fusedopt._engine import (
    FULL_PRECISION,
    QUANT_BLOCK,
    TORCH,
    Description,
    Hyperparameter,
    Plan,
    PlanHolder,
    Precision,
    StateView,
    as_number,
    byte_range,
    check_in_place,
    checked_absmax,
    dequantize_blockwise,
    describe,
    dtype_name,
    dtype_refused,
    first_overlap,
    make_plan,
    native_values,
    numpy_dtype,
    quantize_blockwise,
    quantized_full,
    required_state,
    skip_step,
    updates_dtype,
    value_kinds,
    with_precision_options,
)
from fusedopt._state import param_id_of, unflatten_state_dict

ParamsT = Iterable[np.ndarray] | Iterable[dict[str, Any]]
H = Hyperparameter

__all__ = [
    "ASGD",
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Lion",
    "NAdam",
    "Optimizer",
    "RAdam",
    "RMSprop",
    "Rprop",
]


class Optimizer(PlanHolder):
    """Base class: PyTorch-style param groups, per-param state and state dicts.

    A subclass names its native algorithm (``_algorithm``) and declares its hyperparameters as
    torch spells them (``_hyperparameters``); everything else comes from the algorithm's
    description. Optimizers deepcopy and pickle, as torch's do.
    """

    _plan_attributes = {"_plan": lambda: None, "_plan_options": list, "_stepped_with": lambda: None}

    _algorithm: ClassVar[str] = ""
    _hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    _fixed: ClassVar[Mapping[str, float]] = {}  # native options the class sets (AdamW's decay)
    _tracks_step: ClassVar[bool] = True  # torch's SGD keeps no step count in its state
    # torch's Adagrad allocates its sums eagerly, every group's filled with the constructor's
    # initial_accumulator_value (a group's own is not read), and a param's added later with the
    # defaults' (the same value unless `defaults` was changed).
    _states_at_construction: ClassVar[bool] = False
    _description: ClassVar[Description]
    _hyperparameter_names: ClassVar[tuple[str, ...]]
    _group_keys: ClassVar[tuple[str, ...]]  # "params" and the hyperparameters' names
    _values_of: ClassVar[Callable[[Mapping[str, Any]], tuple[Any, ...]]]  # a group's, in order

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls._algorithm:
            cls._description = describe(cls._algorithm)
            cls._hyperparameter_names = names = tuple(h.name for h in cls._hyperparameters)
            cls._group_keys = ("params", *names)
            # A group's values as one tuple in one C call (itemgetter of one name gives it bare).
            cls._values_of = (
                itemgetter(*names)
                if len(names) > 1
                else staticmethod(lambda group: tuple([group[name] for name in names]))
            )
            if "__init__" not in cls.__dict__:
                cls.__init__ = _generated_init(cls)  # type: ignore[method-assign]

    def _setup(
        self, params: ParamsT, defaults: dict[str, Any], precision: Precision = FULL_PRECISION
    ) -> None:
        self.precision = precision
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        self._start_lock()
        self._params: list[Any] = []
        self._group_params: list[tuple[Any, ...]] = []  # each group's "params", as given
        self._group_of = np.zeros(0, dtype=np.int64)
        self._steps = np.zeros(0, dtype=np.int64)  # steps taken, advanced by the native step
        self._buffers: dict[str, list[Any]] = {n: [] for n in self._description.states}
        self._masters: list[Any] = []  # float32 master copies of 16-bit params, or None
        # The per-block scales of 8-bit states (state_dtype="int8"), or None.
        self._absmax: dict[str, list[Any]] = {n: [] for n in self._description.states}
        self._scalars = np.zeros((0, _core.max_scalars), dtype=np.float64)
        self._has_scalars: list[bool] = []
        self._new_state: list[bool] = []  # buffers created since the param's last step
        # Per group: the values seen last, their plain-number key and the native options.
        self._options_cache: list[tuple[tuple[Any, ...], tuple[Any, ...], tuple[float, ...]]] = []
        self._plan: Plan | None = None
        self._plan_options: list[tuple[float, ...]] = []
        self._stepped_with: tuple[tuple[Any, ...], ...] | None = None  # see _values_stepped
        groups = list(params) if not isinstance(params, np.ndarray) else [params]
        if not groups:
            raise ValueError("params: optimizer got an empty parameter list")
        if not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)
        precision.check([dtype_name(p.dtype) for p in self._params])
        precision.check_algorithm(self._description)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join(lines + [")"])

    # ----------------------------------------------------------------------------- param groups

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a group of params with its own hyperparameters (missing ones take the defaults)."""
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise TypeError("param_group must be a dict with a 'params' entry")
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, np.ndarray) else list(params)
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"param_group: unknown hyperparameters {sorted(unknown)}")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        first = (self._params or params or [None])[0]
        seen = {id(q) for q in self._params}
        for i, p in enumerate(params):
            if cuda.is_device_array(p) or cuda.is_device_array(first):
                cuda.check_param(p, i, first)
            elif not isinstance(p, np.ndarray):
                raise TypeError(f"params[{i}] must be a numpy.ndarray, got {type(p).__name__}")
            elif not updates_dtype(p.dtype):
                raise dtype_refused(p.dtype, f"params[{i}]")
            else:
                # Refused now, as every step would refuse it (a group cannot be taken out).
                check_in_place(p, f"params[{i}]")
                if self.precision.state_dtype and dtype_name(p.dtype) == "float64":
                    self.precision.check(["float64"])
            if id(p) in seen:
                raise ValueError(f"params[{i}] appears twice among the optimizer's params")
            seen.add(id(p))
        _check_params_apart(self.param_groups, params, self._owned_buffers())
        values = self._native_options(group)
        with self._lock:
            # A tuple: the optimizer updates the params it was given, so editing a group's list
            # in place would be ignored silently; replacing it is refused at the next step.
            params = tuple(params)
            group["params"] = params
            index = len(self.param_groups)
            self.param_groups.append(group)
            group_values = self._values_of(group)
            self._options_cache.append((group_values, _frozen(group_values), values))
            first_new = len(self._params)
            self._params += params
            self._group_params.append(params)
            count = len(params)
            self._group_of = np.concatenate([self._group_of, np.full(count, index, np.int64)])
            self._steps = np.concatenate([self._steps, np.zeros(count, np.int64)])
            self._scalars = np.concatenate([self._scalars, np.zeros((count, _core.max_scalars))])
            self._has_scalars += [False] * count
            self._new_state += [False] * count
            for name in self._description.states:
                self._buffers[name] += [None] * count
                self._absmax[name] += [None] * count
            self._masters += [None] * count
            self._plan = None
            if self._states_at_construction:
                self._create_states(range(first_new, len(self._params)), lambda i: values)

    def _owned_buffers(self) -> list[tuple[Any, str]]:
        """The arrays the optimizer keeps for its params (states, absmax, masters), labelled as
        ``state_dict()['state']`` shows them."""
        owned = []
        for i in range(len(self._params)):
            for name in self._description.states:
                owned.append((self._buffers[name][i], f"state[{i}][{name!r}]"))
                owned.append((self._absmax[name][i], f"state[{i}][{name + '_absmax'!r}]"))
            owned.append((self._masters[i], f"state[{i}]['master']"))
        return owned

    # ----------------------------------------------------------------------------------- state

    @property
    def state(self) -> dict[int, dict[str, Any]]:
        """Per-param state by index in param order: ``{"step": int, "<buffer>": array, ...}``
        for every param that has state. The arrays are the live buffers (change them in place);
        the dicts are a view, which refuses assignment (see :class:`StateView`)."""
        result: dict[int, dict[str, Any]] = {}
        for i in range(len(self._params)):
            entry: dict[str, Any] = {}
            # Stochastic rounding keys its bits by the step: kept then even where torch keeps none.
            tracked = self._tracks_step or self.precision.stochastic_rounding
            if tracked and self._steps[i] > 0:
                entry["step"] = int(self._steps[i])
            if self._has_scalars[i]:  # before the buffers, in torch's order
                for k, name in enumerate(self._description.scalars):
                    entry[name] = float(self._scalars[i, k])
            for name in self._description.states:
                buffer = self._buffers[name][i]
                if buffer is not None:
                    entry[name] = buffer
                    if self._absmax[name][i] is not None:
                        entry[name + "_absmax"] = self._absmax[name][i]
            if self._masters[i] is not None:
                entry["master"] = self._masters[i]
            if entry:
                result[i] = StateView(entry)
        return StateView(result)

    def reset_state(self) -> None:
        """Forget all state, as if no step had been taken."""
        with self._lock:
            self._steps = np.zeros_like(self._steps)
            self._scalars = np.zeros_like(self._scalars)
            self._has_scalars = [False] * len(self._params)
            self._new_state = [False] * len(self._params)
            for name in self._description.states:
                self._buffers[name] = [None] * len(self._params)
                self._absmax[name] = [None] * len(self._params)
            self._masters = [None] * len(self._params)
            self._plan = None
            if self._states_at_construction:
                options = [native for _, _, native in self._options_cache]
                self._create_states(range(len(self._params)), lambda i: options[self._group_of[i]])

    def _snapshot(self) -> Callable[[], None]:
        """Save everything steps and hyperparameter changes touch; the returned function puts
        it back exactly: the params' values and the state buffers' values in place (the same
        arrays), buffers created since dropped, the step counts and scalars, and every group's
        hyperparameters (the same group dicts). For :func:`fusedopt.lr_range_test`."""
        with self._lock:
            params = [(p, _copy(p)) for p in self._params]
            buffers = {
                name: [(b, None if b is None else _copy(b)) for b in entries]
                for name, entries in self._buffers.items()
            }
            masters = [(m, None if m is None else _copy(m)) for m in self._masters]
            scales = {
                name: [(a, None if a is None else _copy(a)) for a in entries]
                for name, entries in self._absmax.items()
            }
            counters = (
                self._steps.copy(),
                self._scalars.copy(),
                list(self._has_scalars),
                list(self._new_state),
            )
            groups = [(group, dict(group)) for group in self.param_groups]
            options_cache = list(self._options_cache)

        def restore() -> None:
            with self._lock:
                for p, saved in params:
                    _put(p, saved)
                for name, entries in buffers.items():
                    for b, saved in entries:
                        if b is not None:
                            _put(b, saved)
                    self._buffers[name] = [b for b, _ in entries]
                for m, saved in masters:
                    if m is not None:
                        _put(m, saved)
                self._masters = [m for m, _ in masters]
                for name, entries in scales.items():
                    for a, saved in entries:
                        if a is not None:
                            _put(a, saved)
                    self._absmax[name] = [a for a, _ in entries]
                steps, scalars, has_scalars, new_state = counters
                self._steps, self._scalars = steps.copy(), scalars.copy()
                self._has_scalars, self._new_state = list(has_scalars), list(new_state)
                for group, saved_group in groups:
                    group.clear()
                    group.update(saved_group)
                self._options_cache = list(options_cache)
                # The plan holds the options and counters of the last step: register again.
                self._plan = None
                self._plan_options = []

        return restore

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {...}}, "param_groups": [...]}`` with copies of every buffer; see
        :func:`fusedopt.flatten_state_dict` for the form ``np.savez`` stores."""
        with self._lock:
            state = {
                i: {k: (v.copy() if isinstance(v, np.ndarray) else _host(v)) for k, v in e.items()}
                for i, e in self.state.items()
            }
            groups = []
            start = 0
            for group in self.param_groups:
                saved = {k: _plain(v) for k, v in group.items() if k != "params"}
                saved["params"] = list(range(start, start + len(group["params"])))
                start += len(group["params"])
                groups.append(saved)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state dict (nested, or flat as read back by ``np.load``). Everything is
        checked against this optimizer's params before anything changes; a bad entry raises
        ValueError or TypeError naming it."""
        state_dict = unflatten_state_dict(state_dict)
        groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, Sequence) or isinstance(groups, str | bytes):
            raise TypeError("state_dict: 'param_groups' must be a list of dicts")
        if not isinstance(saved_state, Mapping):
            raise TypeError("state_dict: 'state' must be a dict of per-param dicts")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict: has {len(groups)} param groups, the optimizer has "
                f"{len(self.param_groups)}"
            )
        new_groups = []
        # The saved states are keyed by the ids the saved groups list; as torch maps them, the
        # k-th id listed (over all groups, in order) is this optimizer's k-th param.
        position: dict[int, int] = {}
        for g, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, Mapping) or "params" not in saved:
                raise ValueError(f"state_dict: param_groups[{g}] must be a dict with 'params'")
            if not isinstance(saved["params"], Sequence) or isinstance(saved["params"], str):
                raise TypeError(
                    f"state_dict: param_groups[{g}]['params'] must be a list of param indices, "
                    f"got {type(saved['params']).__name__}"
                )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict: the size of param_groups[{g}] ({len(saved['params'])} params) "
                    f"does not match the optimizer's ({len(group['params'])})"
                )
            for saved_id in saved["params"]:
                key = _param_id(saved_id)
                if key in position:
                    raise ValueError(f"state_dict: param id {saved_id!r} is listed twice")
                position[key] = len(position)
            merged = dict(group)
            merged.update({k: v for k, v in saved.items() if k != "params"})
            unknown = set(merged) - set(self.defaults) - {"params"}
            if unknown:
                raise ValueError(f"state_dict: unknown hyperparameters {sorted(unknown)}")
            new_groups.append((merged, self._native_options(merged)))
        n = len(self._params)
        steps = np.zeros(n, np.int64)
        scalars = np.zeros((n, _core.max_scalars), dtype=np.float64)
        has_scalars = [False] * n
        buffers: dict[str, list[Any]] = {name: [None] * n for name in self._description.states}
        masters: list[Any] = [None] * n
        absmax: dict[str, list[Any]] = {name: [None] * n for name in self._description.states}
        scalar_names = self._description.scalars
        pending = []  # (param index, state name, entry): the buffers to load, after the checks
        key_of: dict[int, Any] = {}  # the state dict's key of each saved id read so far
        for key, entry in saved_state.items():
            # The saved id names the entry in messages; i is the param it belongs to.
            saved_id, i = _state_index(key, position)
            if saved_id in key_of:
                raise ValueError(
                    f"state_dict: state keys {key_of[saved_id]!r} and {key!r} both name param id "
                    f"{saved_id}"
                )
            key_of[saved_id] = key
            if not isinstance(entry, Mapping):
                raise TypeError(
                    f"state_dict: state[{saved_id}] must be a dict, got {type(entry).__name__}"
                )
            param = self._params[i]
            for name, value in entry.items():
                if name == "step":
                    steps[i] = _step_count(value, saved_id)
                elif name in buffers:
                    pending.append((i, name, entry, saved_id))
                elif name.endswith("_absmax") and name.removesuffix("_absmax") in buffers:
                    state = name.removesuffix("_absmax")
                    if not _is_8_bit(entry.get(state)):  # else read with its state
                        raise ValueError(
                            f"state_dict: unexpected state[{saved_id}][{name!r}]: {state!r} is "
                            "not 8-bit state (uint8 codes), the only state with an absmax"
                        )
                elif name == "master" and self.precision.needs_master(dtype_name(param.dtype)):
                    masters[i] = _state_array(value, param, i, name, "float32", saved_id)
                elif name == "master":
                    raise ValueError(
                        f"state_dict: state[{saved_id}] holds a 'master' (the float32 copy of a "
                        "16-bit param that master_weights=True keeps); this optimizer keeps none "
                        f"for params[{i}] ({dtype_name(param.dtype)}, master_weights="
                        f"{self.precision.master_weights})"
                    )
                elif name in scalar_names:
                    where = f"state[{saved_id}][{name!r}]"
                    scalars[i, scalar_names.index(name)] = as_number(value, where)
                    has_scalars[i] = True
                else:
                    raise ValueError(f"state_dict: unknown state {name!r} in state[{saved_id}]")
            required = required_state(
                self._description, entry, steps[i], self._tracks_step, self._states_at_construction
            )
            missing = [name for name in required if name not in entry]
            if missing:
                raise ValueError(f"state_dict: state[{saved_id}] has no {missing[0]!r}")
        # Copied state by state, in param order, as _create_states lays them out.
        pending.sort(key=lambda item: (self._description.states.index(item[1]), item[0]))
        for i, name, entry, saved_id in pending:
            buffers[name][i], absmax[name][i] = self._loaded_state(
                entry, self._params[i], i, name, saved_id
            )
            if cuda.is_device_array(self._params[i]):  # 8-bit state is made on the host
                for made in (buffers[name], absmax[name]):
                    if isinstance(made[i], np.ndarray):
                        made[i] = cuda.from_host(made[i], self._params[i])
        with self._lock:
            for group, (merged, _) in zip(self.param_groups, new_groups):
                params = group["params"]
                group.clear()
                group.update(merged)
                group["params"] = params
            self._options_cache = []
            for group, (_, values) in zip(self.param_groups, new_groups):
                group_values = self._values_of(group)
                self._options_cache.append((group_values, _frozen(group_values), values))
            self._steps = steps
            self._scalars = scalars
            self._has_scalars = has_scalars
            self._buffers = buffers
            self._absmax = absmax
            self._masters = masters
            self._new_state = [False] * n
            self._plan = None

    # ------------------------------------------------------------------------------------ step

    def step(self, grads: Sequence[Any], *, grad_scale: Any = None, found_inf: Any = None) -> None:
        """Update every param in place from ``grads`` (one array per param, in param order).

        ``grad_scale`` and ``found_inf`` follow PyTorch's fused kernels under a GradScaler
        (algorithms that take a grad scale: SGD, Adam, AdamW): the grads are divided by
        ``grad_scale`` inside the pass and the unscaled values written back, and a nonzero
        ``found_inf`` skips the step, leaving the step count unchanged.
        """
        if found_inf is not None and skip_step(found_inf):
            return
        scale = None if grad_scale is None else as_number(grad_scale, "grad_scale")
        with self._lock:
            if type(grads) is not list or len(grads) != len(self._params):
                grads = _grad_list(grads, len(self._params))
            plan = self._plan
            # The common step: every group at the very hyperparameter objects of the last one.
            if plan is not None and plan.step_if_unchanged(
                self.param_groups, self._group_keys, self._stepped_with, grads, scale
            ):
                return
            self._stepped_with = None
            options = self._group_options()
            # Read again: a hyperparameter's own code (its __float__, a group dict subclass's
            # __getitem__) may have reset the optimizer while the options were checked.
            plan = self._plan
            if plan is not None:
                registered = self._plan_options
                for g, now in enumerate(options):
                    if now is not registered[g]:
                        if self._needs_new_states(g, now):
                            plan = None
                            break
                        plan.set_options(g, now)
                        registered[g] = now
            if plan is not None:
                plan.step(grads, scale, None)
            else:
                self._step_with_new_plan(options, grads, scale)
            self._stepped_with = self._values_stepped()

    def _values_stepped(self) -> tuple[tuple[Any, ...], ...] | None:
        """What the next step's ``step_if_unchanged`` compares each group with, by identity: its
        params and the hyperparameter objects its plan's options were made from, when every
        value is a plain number or a tuple of them (None otherwise: what can change in place,
        an array or a list, is read again at every step)."""
        cache, registered = self._options_cache, self._plan_options
        if not len(self._group_params) == len(cache) == len(registered):
            return None
        expected = []
        for params, (values, key, native), now in zip(self._group_params, cache, registered):
            if key is not values or native is not now:
                return None
            expected.append((params, *values))
        return tuple(expected)

    def _step_with_new_plan(
        self, options: list[tuple[float, ...]], grads: list[Any], scale: float | None
    ) -> None:
        """Create the states the groups need, register everything and step. A step that creates
        buffers and is then refused leaves no trace of them (a zero momentum buffer left behind
        would skip torch's first-step rule once saved and loaded)."""
        saved = (
            {name: list(b) for name, b in self._buffers.items()},
            self._scalars.copy(),
            list(self._has_scalars),
            list(self._new_state),
            list(self._masters),
            {name: list(a) for name, a in self._absmax.items()},
        )
        taken = self._steps.copy()  # which the native step advances
        try:
            self._create_states(range(len(self._params)), lambda i: options[self._group_of[i]])
            for i in range(len(self._params)):
                param = self._params[i]
                if self._masters[i] is None and self.precision.needs_master(
                    dtype_name(param.dtype)
                ):
                    self._masters[i] = _master_of(param)
            states = [b if any(x is not None for x in b) else None for b in self._buffers.values()]
            plan = make_plan(
                self._algorithm,
                options,
                self._group_of,
                self._params,
                states,
                step_counts=self._steps,
                new_state=self._new_state if self._description.uses_new_state else None,
                scalars=self._scalars,
                masters=self._masters if self.precision.master_weights else None,
                rounding_seed=self.precision.rounding_seed,
                absmax=[a if any(x is not None for x in a) else None for a in self._absmax.values()]
                if self.precision.state_dtype == "int8"
                else None,
            )
            plan.step(grads, scale, None)
        except BaseException as error:
            # A KeyboardInterrupt raised as the native step returns (Python delivers a signal
            # only between bytecodes) comes after a step that took place: the step counts it
            # advanced say so, and the step is kept, as a refusal (which writes nothing) is not.
            stepped = not isinstance(error, Exception) and not np.array_equal(taken, self._steps)
            if not stepped:
                (
                    self._buffers,
                    self._scalars,
                    self._has_scalars,
                    self._new_state,
                    self._masters,
                    self._absmax,
                ) = saved
                self._plan = None
                raise
            self._took_step_with(plan, options)
            raise
        self._took_step_with(plan, options)

    def _took_step_with(self, plan: Plan, options: list[tuple[float, ...]]) -> None:
        self._plan = plan
        self._plan_options = list(options)
        self._new_state = [False] * len(self._params)

    def _needs_new_states(self, group: int, values: tuple[float, ...]) -> bool:
        used = self._description.states_used(values)
        return any(
            self._buffers[name][i] is None
            for i in np.flatnonzero(self._group_of == group)
            for name in used
        )

    def _create_states(
        self, indices: Iterable[int], values_of: Callable[[int], tuple[float, ...]]
    ) -> None:
        """The buffers each of these params' options (``values_of(i)``) use and it does not have
        yet, and its scalars (Adagrad's initial sums from the defaults, as torch fills them, see
        ``_states_at_construction``). State by state: every param's first buffer, then every param's
        second, so that one state's buffers of consecutive params lie one after another in
        memory, as a step streams them (Adam over 1000 x 1000, 2 threads: 271 -> 252 µs against
        a param's buffers side by side)."""
        description = self._description
        values = {i: values_of(i) for i in indices}
        defaults = self._native_options(self.defaults) if self._states_at_construction else None
        # Per distinct options: the states they use and their initial values.
        of_options = {
            v: (description.states_used(v), description.initial_values(defaults or v))
            for v in set(values.values())
        }
        for k, name in enumerate(description.states):
            for i, v in values.items():
                used, (initial, _) = of_options[v]
                if name not in used or self._buffers[name][i] is not None:
                    continue
                param = self._params[i]
                dtype = self.precision.state_dtype_for(dtype_name(param.dtype), _numel(param))
                if dtype == "int8":
                    self._buffers[name][i], self._absmax[name][i] = _quantized_full_like(
                        param, initial[k], description.nonnegative(name)
                    )
                else:
                    self._buffers[name][i] = _full_like(param, initial[k], dtype)
                self._new_state[i] = True
        for i, v in values.items():
            if not self._has_scalars[i]:
                _, (_, scalar_values) = of_options[v]
                self._scalars[i, : len(scalar_values)] = scalar_values
                self._has_scalars[i] = True

    def _loaded_state(
        self, entry: Mapping[str, Any], param: Any, i: int, name: str, saved_id: int
    ) -> tuple[Any, Any]:
        """A saved state in the dtype this optimizer keeps it in, and its 8-bit scales: 8-bit
        codes (with their ``<name>_absmax``) are dequantized for a float state, float values
        quantized for an 8-bit one."""
        dtype = self.precision.state_dtype_for(dtype_name(param.dtype), _numel(param))
        value = entry[name]
        if _is_8_bit(value):
            if name + "_absmax" not in entry:
                raise ValueError(
                    f"state_dict: state[{saved_id}][{name!r}] is 8-bit but has no absmax"
                )
            codes = np.asarray(_host(value))
            if codes.shape != tuple(param.shape):
                raise ValueError(
                    f"state_dict: state[{saved_id}][{name!r}] does not fit params[{i}]"
                )
            scales = checked_absmax(
                _host(entry[name + "_absmax"]), _numel(param), f"state[{saved_id}]['{name}_absmax']"
            )
            if dtype == "int8":
                return np.array(codes, order="C", copy=True), scales
            value = dequantize_blockwise(codes, scales, self._description.nonnegative(name))
            if dtype == "float32" and not cuda.is_device_array(param):
                return value, None  # new, C-contiguous float32 already
        if dtype == "int8":
            # Checked, then quantized where it is, a batch of blocks at a time: a float32 copy of
            # the whole state first took three times the 8-bit state's memory.
            floats = _state_array(value, param, i, name, None, saved_id)
            return quantize_blockwise(floats, self._description.nonnegative(name))
        return _state_array(value, param, i, name, dtype, saved_id), None

    def _native_options(self, group: Mapping[str, Any]) -> tuple[float, ...]:
        """A group's native option values; TypeError/ValueError naming a bad hyperparameter."""
        fixed = {"convention": TORCH, **self._fixed}
        return native_values(self._description, self._hyperparameters, group, fixed)

    def _group_options(self) -> list[tuple[float, ...]]:
        """The native options of every group, rebuilt only when a hyperparameter changed (the
        same tuple object otherwise). The cheap test first: the very same values as last time,
        all immutable; then the values' plain-number copy (a one-element array or a list may
        have changed in place). Each group's params are checked to be the ones it was given."""
        if len(self.param_groups) != len(self._group_params):
            raise ValueError(
                f"param_groups holds {len(self.param_groups)} groups where "
                f"{len(self._group_params)} were registered: a group is added with "
                "add_param_group (which registers its params) and cannot be taken out"
            )
        result = []
        for i, group in enumerate(self.param_groups):
            last_values, last_key, native = self._options_cache[i]
            if group["params"] is not self._group_params[i]:
                raise ValueError(
                    f"param_groups[{i}]['params'] was replaced; an optimizer updates the params "
                    "it was given (use add_param_group to add more)"
                )
            try:
                values = self._values_of(group)
            except KeyError as missing:
                raise KeyError(f"param_groups[{i}] has no {missing.args[0]!r}") from None
            if last_key is not last_values or not all(map(is_, values, last_values)):
                key = _frozen(values)
                if not _same_key(key, last_key):
                    native = self._native_options(group)
                self._options_cache[i] = (values, key, native)
            result.append(native)
        return result


def _generated_init(cls: type[Optimizer]) -> Any:
    """``__init__(self, params, <hyperparameters as torch orders them>)`` from the declaration,
    with a real signature for help() and IDEs."""
    description = cls._description
    parameters = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
    for h in cls._hyperparameters:
        kind = (
            inspect.Parameter.KEYWORD_ONLY
            if h.keyword_only
            else inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        parameters.append(inspect.Parameter(h.name, kind, default=h.default_for(description)))
    signature = inspect.Signature(with_precision_options(parameters))

    def __init__(self: Optimizer, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        params = arguments.pop("params")
        self._setup(params, arguments, Precision.popped(arguments))

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = f"Construct a {cls.__name__} over ``params`` (arrays or param groups)."
    return __init__


def _full_like(param: Any, value: float, dtype: str) -> Any:
    if cuda.is_device_array(param):
        return cuda.full_like(param, value, dtype)
    return np.full_like(param, value, dtype=numpy_dtype(dtype), order="C")


def _quantized_full_like(param: Any, value: float, nonnegative: bool) -> tuple[Any, Any]:
    """A new 8-bit state for ``param``, every element ``value``: its codes and absmax, on the
    param's device for a device array (filled there: no host array of the param's size)."""
    if not cuda.is_device_array(param):
        return quantized_full(param.shape, value, nonnegative)
    code, scale = quantized_full((1,), value, nonnegative)
    scales = cuda.from_host(np.full(-(-_numel(param) // QUANT_BLOCK), scale[0]), param)
    return cuda.full_like(param, int(code[0]), "uint8"), scales


def _numel(array: Any) -> int:
    """An array's element count (a torch tensor's ``size`` is a method)."""
    return math.prod(array.shape)


def _master_of(param: Any) -> Any:
    """A 16-bit param's float32 master copy: its value, exactly."""
    if cuda.is_device_array(param):
        return cuda.astype(param, "float32")
    return np.array(param, dtype=np.float32, order="C", copy=True)


def _copy(array: Any) -> Any:
    """A copy of a host or device array, in its own library (torch tensors are cloned)."""
    return array.clone() if hasattr(array, "clone") else array.copy()


def _put(array: Any, values: Any) -> None:
    """Write ``values`` (a copy made by ``_copy``) back into ``array``, in place."""
    if isinstance(array, np.ndarray):
        np.copyto(array, values)
    elif hasattr(array, "copy_"):  # torch, outside autograd
        array.detach().copy_(values)
    else:
        array[...] = values


def _host(value: Any) -> Any:
    """State dicts hold NumPy copies of device buffers too."""
    return cuda.to_numpy(value) if cuda.is_device_array(value) else value


def _param_id(key: Any) -> int:
    """A saved param id: a whole number (np.load gives back numpy integers), or its digits as
    str() writes them (a state dict through JSON)."""
    try:
        i = param_id_of(key) if isinstance(key, str) else int(key)
    except (TypeError, ValueError, OverflowError):
        i = None
    if i is None or isinstance(key, bool | bytes) or (isinstance(key, float) and key != i):
        raise TypeError(f"state_dict: param ids must be whole numbers, got {key!r}")
    return i


def _state_index(key: Any, position: Mapping[int, int]) -> tuple[int, int]:
    """A saved state's id and the index of the param it belongs to, through the saved groups'
    ids."""
    saved_id = _param_id(key)
    i = position.get(saved_id)
    if i is None:
        raise ValueError(f"state_dict: state for param {key!r}, which does not exist")
    return saved_id, i


def _is_8_bit(value: Any) -> bool:
    """Whether a saved state is 8-bit state's uint8 codes (which come with an absmax)."""
    try:
        return np.asarray(_host(value)).dtype == np.uint8
    except (TypeError, ValueError):
        return False  # not an array: refused, naming it, where the state is read


def _step_count(value: Any, saved_id: int) -> int:
    """A saved step count, exactly: integers are read as integers (through a float64, counts
    above 2**53 would change), other numbers only where they are whole."""
    array = value if isinstance(value, np.ndarray) else None
    if isinstance(value, bool | np.bool_) or (array is not None and array.dtype == np.bool_):
        # Refused as a param id is: True is no step count a step would have written.
        raise TypeError(
            f"state_dict: state[{saved_id}]['step'] must be a whole number, got {value!r}"
        )
    if isinstance(value, int | np.integer):
        step: int | None = int(value)
    elif array is not None and array.dtype.kind in "iu" and array.size == 1:
        step = int(array.reshape(()))
    else:
        number = as_number(value, f"state[{saved_id}]['step']")
        step = int(number) if math.isfinite(number) and number.is_integer() else None
    # Every count a step can reach loads (a step refuses to advance the last, 2**63 - 1).
    if step is None or not 0 <= step <= 2**63 - 1:
        raise ValueError(
            f"state_dict: state[{saved_id}]['step'] must be a whole number in [0, 2**63 - 1], "
            f"got {value!r}"
        )
    return step


# np.savez stores ml_dtypes.bfloat16 arrays as raw 2-byte voids, and np.load gives them back so:
# bfloat16 is the only 2-byte dtype NumPy does not know, so a plain 'V2' state is one.
_SAVED_BFLOAT16 = np.dtype("V2")


def _state_array(
    value: Any, param: Any, i: int, name: str, dtype: str | None, saved_id: int
) -> Any:
    """A saved state (entry ``saved_id`` of the state dict) for params[i], in ``dtype``: a new
    array, or with ``dtype`` None the saved one as it is, checked (for the caller to convert)."""
    try:
        array = np.asarray(_host(value))
    except (TypeError, ValueError):
        raise TypeError(f"state_dict: state[{saved_id}][{name!r}] must be an array") from None
    if array.shape != tuple(param.shape):
        raise ValueError(
            f"state_dict: state[{saved_id}][{name!r}] has shape {array.shape}, params[{i}] has "
            f"{tuple(param.shape)}"
        )
    if array.dtype == _SAVED_BFLOAT16:
        array = array.view(numpy_dtype("bfloat16"))
    if array.dtype.kind != "f" and dtype_name(array.dtype) != "bfloat16":
        raise TypeError(f"state_dict: state[{saved_id}][{name!r}] has dtype {array.dtype}")
    if dtype is None:
        return array
    if cuda.is_device_array(param):
        return cuda.array_like(array, param, dtype)
    # Cast (and rounded to nearest) to the dtype this optimizer keeps it in.
    return np.array(array, dtype=numpy_dtype(dtype), order="C", copy=True)


_IMMUTABLE = (float, int, bool)


def _frozen(values: tuple[Any, ...], plain: Callable[[Any], Any] | None = None) -> tuple[Any, ...]:
    """A group's hyperparameters as a cache key that cannot change behind the cache's back: a
    one-element array or a list (betas) is copied into plain numbers, so changing it in place
    is seen at the next step, each with its type (the checks refuse np.array([True]) for a
    flag, whose plain copy is True). ``plain``: the copy for a front end's own value types
    (fusedopt.torch's tensors), ``_plain`` by default."""
    if all(
        type(v) in _IMMUTABLE or (type(v) is tuple and all(type(x) in _IMMUTABLE for x in v))
        for v in values
    ):
        return values
    plain = plain or _plain
    return tuple(
        (type(v), plain(v) if not isinstance(v, list) else tuple(map(plain, v))) for v in values
    )


def _same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal keys of the same types and float signs (see value_kinds)."""
    return a == b and value_kinds(a) == value_kinds(b)


def _check_params_apart(
    groups: list[dict[str, Any]], params: list[Any], owned: list[tuple[Any, str]] = ()
) -> None:
    """No new param shares memory with another param (views of one array) or with an array the
    optimizer keeps (a state, an absmax, a master: ``owned``, with their labels): every step
    would refuse it, and a group cannot be taken out."""

    extents = [
        byte_range(q, f"params[{j}] of param_groups[{g}]")
        for g, group in enumerate(groups)
        for j, q in enumerate(group["params"])
        if isinstance(q, np.ndarray)
    ]
    extents += [byte_range(a, label) for a, label in owned if isinstance(a, np.ndarray)]
    extents += [
        byte_range(p, f"params[{i}]") for i, p in enumerate(params) if isinstance(p, np.ndarray)
    ]
    if clash := first_overlap(extents):
        raise ValueError(
            f"{clash[0]} shares memory with {clash[1]}; every param must be its own array"
        )


def _plain(value: Any) -> Any:
    """Group values as plain Python numbers, so a state dict survives JSON and np.savez."""
    if isinstance(value, np.ndarray | np.generic):
        return value.item() if np.ndim(value) == 0 or np.size(value) == 1 else value.tolist()
    if isinstance(value, numbers.Number) and not isinstance(value, int | float):
        return float(value)  # a Fraction or Decimal, which JSON lacks: the float a step reads
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _grad_list(grads: Sequence[Any], n: int) -> list[Any]:
    if isinstance(grads, np.ndarray):
        grads = [grads]
    elif isinstance(grads, Sequence) and not isinstance(grads, str | bytes):
        grads = list(grads)
    else:  # a generator would be used up by a refused step
        raise TypeError(
            f"grads must be a list of arrays (one per param), got {type(grads).__name__}"
        )
    if len(grads) != n:
        raise ValueError(f"grads: expected {n} arrays (one per param), got {len(grads)}")
    return grads


# --------------------------------------------------------------------------------------------
# The optimizers: torch.optim's signatures, in torch's argument order.
# --------------------------------------------------------------------------------------------


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov momentum, L2
    weight decay and maximize, as ``torch.optim.SGD`` (spec sections 2-4):

    ``g <- -g`` if maximize; ``g <- g + weight_decay*p``; with momentum ``mu``:
    ``buf <- mu*buf + (1 - dampening)*g`` (``buf <- g`` on the buffer's first step), and
    ``g <- g + mu*buf`` (nesterov) or ``g <- buf``; then ``p <- p - lr*g``.
    """

    _algorithm = "sgd"
    _hyperparameters = (
        H("lr"),
        H("momentum"),
        H("dampening"),
        H("weight_decay"),
        H("nesterov"),
        H("maximize", keyword_only=True),
    )
    _tracks_step = False


class Adagrad(Optimizer):
    """Adagrad as ``torch.optim.Adagrad`` (spec section 5): ``clr = lr/(1 + (t - 1)*lr_decay)``,
    ``sum <- sum + g*g``, ``p <- p - clr*g/(sqrt(sum) + eps)`` (eps outside the square root); L2
    ``weight_decay``, ``initial_accumulator_value``, maximize."""

    _algorithm = "adagrad"
    _hyperparameters = (
        H("lr"),
        H("lr_decay"),
        H("weight_decay"),
        H("initial_accumulator_value"),
        H("eps"),
        H("maximize", keyword_only=True),
    )
    _states_at_construction = True


class RMSprop(Optimizer):
    """RMSprop as ``torch.optim.RMSprop`` (spec section 6): ``v <- alpha*v + (1 - alpha)*g*g``;
    ``avg = sqrt(v) + eps`` (centered: ``sqrt(v - ga^2) + eps`` with ``ga <- lerp(ga, g,
    1 - alpha)``); with momentum ``buf <- mu*buf + g/avg`` and ``p <- p - lr*buf``, else
    ``p <- p - lr*g/avg``; L2 ``weight_decay``, maximize."""

    _algorithm = "rmsprop"
    _hyperparameters = (
        H("lr"),
        H("alpha"),
        H("eps"),
        H("weight_decay"),
        H("momentum"),
        H("centered"),
        H("maximize", keyword_only=True),
    )


class Adam(Optimizer):
    """Adam as ``torch.optim.Adam`` (spec sections 7-8): ``m <- lerp(m, g, 1 - beta1)``,
    ``v <- beta2*v + (1 - beta2)*g*g``, ``p <- p - (lr/bc1)*m/(sqrt(v)/sqrt(bc2) + eps)`` with
    ``bc_i = 1 - beta_i^t``; L2 ``weight_decay`` (or decoupled ``p *= 1 - lr*weight_decay`` with
    ``decoupled_weight_decay=True``, which is AdamW); ``amsgrad`` uses the running maximum of
    the raw ``v``; maximize.

    ``step(grads, grad_scale=..., found_inf=...)`` follows PyTorch's fused Adam under a
    GradScaler (spec section 8).
    """

    _algorithm = "adam"
    _hyperparameters = (
        H("lr"),
        H("betas", native=("beta1", "beta2")),
        H("eps"),
        H("weight_decay"),
        H("amsgrad"),
        H("maximize", keyword_only=True),
        H("decoupled_weight_decay", keyword_only=True),
    )


class AdamW(Adam):
    """AdamW as ``torch.optim.AdamW``: Adam with decoupled weight decay
    ``p *= 1 - lr*weight_decay`` and ``weight_decay=1e-2`` by default."""

    _hyperparameters = (
        H("lr"),
        H("betas", native=("beta1", "beta2")),
        H("eps"),
        H("weight_decay", default=1e-2),
        H("amsgrad"),
        H("maximize", keyword_only=True),
    )
    _fixed = {"decoupled_weight_decay": 1.0}


class Adadelta(Optimizer):
    """Adadelta as ``torch.optim.Adadelta`` (spec section 14): ``v <- rho*v + (1 - rho)*g*g``,
    ``delta = sqrt(u + eps)/sqrt(v + eps)*g``, ``u <- rho*u + (1 - rho)*delta*delta``,
    ``p <- p - lr*delta``; L2 ``weight_decay``, maximize."""

    _algorithm = "adadelta"
    _hyperparameters = (
        H("lr"),
        H("rho"),
        H("eps"),
        H("weight_decay"),
        H("maximize", keyword_only=True),
    )


class Adamax(Optimizer):
    """Adamax as ``torch.optim.Adamax`` (spec section 15): ``m <- lerp(m, g, 1 - beta1)``,
    ``u <- max(beta2*u, |g| + eps)``, ``p <- p - lr/(1 - beta1^t)*m/u``; L2 ``weight_decay``,
    maximize."""

    _algorithm = "adamax"
    _hyperparameters = (
        H("lr"),
        H("betas", native=("beta1", "beta2")),
        H("eps"),
        H("weight_decay"),
        H("maximize", keyword_only=True),
    )


class NAdam(Optimizer):
    """NAdam as ``torch.optim.NAdam`` (spec section 16): Adam with Nesterov momentum and the
    schedule ``mu_t = beta1*(1 - 0.5*0.96^(t*momentum_decay))``, whose running product is the
    per-param state ``mu_product`` (kept as a float32 value, as torch keeps it by default);
    L2 ``weight_decay`` or ``decoupled_weight_decay``, maximize."""

    _algorithm = "nadam"
    _hyperparameters = (
        H("lr"),
        H("betas", native=("beta1", "beta2")),
        H("eps"),
        H("weight_decay"),
        H("momentum_decay"),
        H("decoupled_weight_decay"),
        H("maximize", keyword_only=True),
    )


class RAdam(Optimizer):
    """RAdam as ``torch.optim.RAdam`` (spec section 17): Adam's moments; once
    ``rho_t = rho_inf - 2t*beta2^t/(1 - beta2^t)`` exceeds 5 the step is
    ``lr*m_hat*r_t*sqrt(1 - beta2^t)/(sqrt(v) + eps)``, before that ``lr*m_hat``; L2
    ``weight_decay`` or ``decoupled_weight_decay``, maximize."""

    _algorithm = "radam"
    _hyperparameters = (
        H("lr"),
        H("betas", native=("beta1", "beta2")),
        H("eps"),
        H("weight_decay"),
        H("decoupled_weight_decay"),
        H("maximize", keyword_only=True),
    )


class Rprop(Optimizer):
    """Rprop as ``torch.optim.Rprop`` (spec section 18): each element's step size (starting at
    ``lr``) grows by ``etas[1]`` while the gradient keeps its sign and shrinks by ``etas[0]``
    when it flips, clamped to ``step_sizes``; ``p <- p - sign(g)*step_size``; maximize."""

    _algorithm = "rprop"
    _hyperparameters = (
        H("lr"),
        H("etas", native=("etaminus", "etaplus")),
        H("step_sizes", native=("step_size_min", "step_size_max")),
        H("maximize", keyword_only=True),
    )


class ASGD(Optimizer):
    """Averaged SGD as ``torch.optim.ASGD`` (spec section 19): ``p <- p*(1 - lambd*eta) -
    eta*g`` with the per-param ``eta`` and ``mu`` of the previous step (float32 values, as
    torch keeps them by default), and ``ax`` the running average of ``p`` from step ``t0`` on;
    L2 ``weight_decay``, maximize."""

    _algorithm = "asgd"
    _hyperparameters = (
        H("lr"),
        H("lambd"),
        H("alpha"),
        H("t0"),
        H("weight_decay"),
        H("maximize", keyword_only=True),
    )


class Lion(Optimizer):
    """Lion (Chen et al. 2023) in lion-pytorch's form (spec section 20):
    ``p <- p*(1 - lr*weight_decay)``, ``p <- p - lr*sign(lerp(m, g, 1 - beta1))``,
    ``m <- lerp(m, g, 1 - beta2)``; maximize."""

    _algorithm = "lion"
    _hyperparameters = (
        H("lr"),
        H("betas", native=("beta1", "beta2")),
        H("weight_decay"),
        H("maximize", keyword_only=True),
    )
