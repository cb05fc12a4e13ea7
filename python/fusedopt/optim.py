"""PyTorch-convention optimizers over NumPy arrays: ``torch.optim``'s names, defaults and math.

Each ``step(grads)`` updates every param of every group in place, in one native call.
Hyperparameters live in ``param_groups`` (a list of dicts, as in torch) and may be changed
between steps, e.g. by a learning-rate schedule: ``opt.param_groups[0]["lr"] = 0.01``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import is_, itemgetter
from typing import Any

import numpy as np

from fusedopt import _core, cuda
from fusedopt._state import unflatten_state_dict

ParamsT = Iterable[np.ndarray] | Iterable[dict[str, Any]]


def _as_float(value: Any, name: str) -> float:
    """A hyperparameter as a Python float: a number, or a one-element array (as torch accepts a
    one-element tensor for lr)."""
    if value is None or isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if array.size != 1:
        raise TypeError(f"{name} must be a single number, got an array of shape {array.shape}")
    return float(array.reshape(()))


def _skip_step(found_inf: Any) -> bool:
    """PyTorch's fused found_inf: a nonzero value skips the whole step (SPEC section 8)."""
    return found_inf is not None and _as_float(found_inf, "found_inf") != 0.0


class Optimizer:
    """Base class: PyTorch-style param groups, per-param state and state dicts.

    Subclasses name their state buffers (``_state_names``), say which of them a group needs
    (``_needed_states``), how a new one starts (``_initial_state``), and run the native step
    (``_native_step``).
    """

    _state_names: tuple[str, ...] = ()
    _hyperparameter_names: tuple[str, ...] = ()
    _tracks_step = True  # torch's SGD keeps no step count in its state

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        self._params: list[np.ndarray] = []
        self._group_params: list[tuple[np.ndarray, ...]] = []  # each group's "params", as given
        self._group_of = np.zeros(0, dtype=np.int64)
        self._steps = np.zeros(0, dtype=np.int64)
        self._buffers: dict[str, list[np.ndarray | None]] = {n: [] for n in self._state_names}
        # Per group: the values seen last, their plain-number key, whether the values are all
        # immutable, and the native options built from them.
        self._options_cache: list[tuple[tuple[Any, ...], tuple[Any, ...], bool, Any]] = []
        self._hyperparameters_of = itemgetter(*self._hyperparameter_names)
        self._complete_state: tuple[Any, ...] | None = None  # see _state_lists
        groups = list(params) if not isinstance(params, np.ndarray) else [params]
        if not groups:
            raise ValueError("params: optimizer got an empty parameter list")
        if not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

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
            elif p.dtype not in (np.float32, np.float64):
                raise TypeError(
                    f"params[{i}] has dtype {p.dtype}; fusedopt updates float32 and float64"
                )
            if id(p) in seen:
                raise ValueError(f"params[{i}] appears twice among the optimizer's params")
            seen.add(id(p))
        self._options(group).validate()
        # A tuple: the optimizer updates the params it was given, so editing a group's list in
        # place would be ignored silently; replacing it is refused at the next step.
        params = tuple(params)
        group["params"] = params
        index = len(self.param_groups)
        self.param_groups.append(group)
        self._params += params
        self._group_params.append(params)
        self._group_of = np.concatenate([self._group_of, np.full(len(params), index, np.int64)])
        self._steps = np.concatenate([self._steps, np.zeros(len(params), np.int64)])
        for name in self._state_names:
            self._buffers[name] += [None] * len(params)
        for i in range(len(self._params) - len(params), len(self._params)):
            self._on_new_param(i, self._params[i])

    def _on_new_param(self, index: int, param: np.ndarray) -> None:
        """Hook for state that PyTorch allocates at construction (Adagrad's sum)."""

    # ----------------------------------------------------------------------------------- state

    @property
    def state(self) -> dict[int, dict[str, Any]]:
        """Per-param state by index in param order: ``{"step": int, "<buffer>": array, ...}``
        for every param that has taken a step. The arrays are the live buffers."""
        result: dict[int, dict[str, Any]] = {}
        for i in range(len(self._params)):
            entry: dict[str, Any] = {}
            if self._tracks_step and self._steps[i] > 0:
                entry["step"] = int(self._steps[i])
            for name in self._state_names:
                buffer = self._buffers[name][i]
                if buffer is not None:
                    entry[name] = buffer
            if entry:
                result[i] = entry
        return result

    def reset_state(self) -> None:
        """Forget all state, as if no step had been taken."""
        self._steps[:] = 0
        for name in self._state_names:
            self._buffers[name] = [None] * len(self._params)
        for i, p in enumerate(self._params):
            self._on_new_param(i, p)

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {...}}, "param_groups": [...]}`` with copies of every buffer; see
        :func:`fusedopt.flatten_state_dict` for the form ``np.savez`` stores."""
        state = {
            i: {k: (v.copy() if isinstance(v, np.ndarray) else _host(v)) for k, v in entry.items()}
            for i, entry in self.state.items()
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
        checked against this optimizer's params before anything changes."""
        state_dict = unflatten_state_dict(state_dict)
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict: has {len(groups)} param groups, the optimizer has "
                f"{len(self.param_groups)}"
            )
        for saved, group in zip(groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("state_dict: a param group's size does not match the optimizer's")
        new_groups = []
        for saved, group in zip(groups, self.param_groups):
            merged = dict(group)
            merged.update({k: v for k, v in saved.items() if k != "params"})
            unknown = set(merged) - set(self.defaults) - {"params"}
            if unknown:
                raise ValueError(f"state_dict: unknown hyperparameters {sorted(unknown)}")
            self._options(merged).validate()
            new_groups.append(merged)
        steps = np.zeros_like(self._steps)
        buffers: dict[str, list[np.ndarray | None]] = {
            n: [None] * len(self._params) for n in self._state_names
        }
        for key, entry in state_dict["state"].items():
            i = int(key)
            if not 0 <= i < len(self._params):
                raise ValueError(f"state_dict: state for param {i}, which does not exist")
            param = self._params[i]
            for name, value in entry.items():
                if name == "step":
                    step = _as_float(value, f"state[{i}]['step']")
                    if step < 0 or step != int(step):
                        raise ValueError(
                            f"state_dict: state[{i}]['step'] must be a whole number >= 0"
                        )
                    steps[i] = int(step)
                elif name in buffers:
                    array = np.asarray(value)
                    if array.shape != param.shape:
                        raise ValueError(
                            f"state_dict: state[{i}][{name!r}] has shape {array.shape}, "
                            f"params[{i}] has {param.shape}"
                        )
                    if array.dtype.kind != "f":
                        raise TypeError(f"state_dict: state[{i}][{name!r}] has dtype {array.dtype}")
                    buffers[name][i] = (
                        cuda.array_like(array, param)
                        if cuda.is_device_array(param)
                        else np.array(array, dtype=param.dtype, order="C", copy=True)
                    )
                else:
                    raise ValueError(f"state_dict: unknown state {name!r} for param {i}")
        for group, merged in zip(self.param_groups, new_groups):
            params = group["params"]
            group.clear()
            group.update(merged)
            group["params"] = params
        self._steps = steps
        self._buffers = buffers

    # ------------------------------------------------------------------------------------ step

    def step(self, grads: Sequence[np.ndarray]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _group_options(self) -> list[Any]:
        """The native options of every group, rebuilt only when a hyperparameter changed. The
        cheap test first: the very same values as last time, all immutable; then the values'
        plain-number copy (a one-element array or a list may have changed in place)."""
        while len(self._options_cache) < len(self.param_groups):
            self._options_cache.append(((), (), False, None))
        result = []
        for i, group in enumerate(self.param_groups):
            values = self._hyperparameters_of(group)
            last_values, last_key, immutable, options = self._options_cache[i]
            if options is None or not (immutable and all(map(is_, values, last_values))):
                key = _frozen(values)
                if options is None or key != last_key:
                    options = self._options(group)
                self._options_cache[i] = (values, key, key is values, options)
            result.append(options)
        return result

    @property
    def _native(self) -> Any:
        """The backend of this optimizer's arrays: _core, or fusedopt.cuda for device arrays."""
        return cuda if self._params and cuda.is_device_array(self._params[0]) else _core

    def _options(self, group: Mapping[str, Any]) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def _needed_states(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return self._state_names

    def _initial_state(self, name: str, param: np.ndarray, group: Mapping[str, Any]) -> np.ndarray:
        if cuda.is_device_array(param):
            return cuda.zeros_like(param)
        return np.zeros_like(param, order="C")

    def _run(self, native_step: Callable[..., None], grads: list[Any], *extra: Any) -> None:
        """One native call over every param: the options of every group, the step counts
        (advanced in place by the call once it has run), params, grads, each state list, then
        ``extra``. Once every buffer exists (the usual step) nothing else is done; a step that
        creates buffers and is then refused leaves no trace of them (a zero momentum buffer left
        behind would skip torch's first-step rule once saved and loaded)."""
        options = self._group_options()
        for i, group in enumerate(self.param_groups):
            if group["params"] is not self._group_params[i]:
                raise ValueError(
                    f"param_groups[{i}]['params'] was replaced; an optimizer updates the params "
                    "it was given (use add_param_group to add more)"
                )
        lists = self._cached_state_lists(options)
        if lists is not None:
            native_step(options, self._group_of, self._steps, self._params, grads, *lists, *extra)
            return
        buffers = {name: list(b) for name, b in self._buffers.items()}
        steps = self._steps.copy()
        try:
            lists = self._state_lists(options)
            native_step(options, self._group_of, self._steps, self._params, grads, *lists, *extra)
        except Exception:
            self._buffers, self._steps = buffers, steps
            raise

    def _cached_state_lists(
        self, options: list[Any]
    ) -> list[list[np.ndarray | None] | None] | None:
        """The lists of the last _state_lists call if nothing since can have changed them: the
        same buffer dict and lists (load_state_dict, reset_state and a refused step replace
        them), as many params (add_param_group appends) and the same options objects (which
        _group_options replaces when a hyperparameter, and so maybe a needed state, changed)."""
        cached = self._complete_state
        if (
            cached is None
            or cached[0] is not self._buffers
            or cached[1] != len(self._params)
            or not all(map(is_, cached[2], self._buffers.values()))
            or len(cached[3]) != len(options)
            or not all(map(is_, cached[3], options))
        ):
            return None
        return cached[4]

    def _state_lists(self, options: list[Any]) -> list[list[np.ndarray | None] | None]:
        """One list per state name, a buffer per param (None where its group keeps none);
        buffers a group needs and does not have yet are created here. The walk over every param
        runs only when something changed: on a thousand tensors it cost more than the step."""
        cached = self._cached_state_lists(options)
        if cached is not None:
            return cached
        needed = [self._needed_states(group) for group in self.param_groups]
        lists = []
        for name in self._state_names:
            buffers = self._buffers[name]
            any_needed = False
            for i, p in enumerate(self._params):
                if name in needed[self._group_of[i]]:
                    any_needed = True
                    if buffers[i] is None:
                        buffers[i] = self._initial_state(
                            name, p, self.param_groups[self._group_of[i]]
                        )
            lists.append(buffers if any_needed else None)
        buffer_lists = tuple(self._buffers.values())
        self._complete_state = (self._buffers, len(self._params), buffer_lists, options, lists)
        return lists


def _host(value: Any) -> Any:
    """State dicts hold NumPy copies of device buffers too."""
    return cuda.to_numpy(value) if cuda.is_device_array(value) else value


_IMMUTABLE = (float, int, bool)


def _frozen(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """A group's hyperparameters as a cache key that cannot change behind the cache's back: a
    one-element array or a list (betas) is copied into plain numbers, so changing it in place
    is seen at the next step."""
    if all(
        type(v) in _IMMUTABLE or (type(v) is tuple and all(type(x) in _IMMUTABLE for x in v))
        for v in values
    ):
        return values
    return tuple(_plain(v) if not isinstance(v, list) else tuple(map(_plain, v)) for v in values)


def _plain(value: Any) -> Any:
    """Group values as plain Python numbers, so a state dict survives JSON and np.savez."""
    if isinstance(value, np.ndarray | np.generic):
        return value.item() if np.ndim(value) == 0 or np.size(value) == 1 else value.tolist()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _check_grad_count(grads: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    grads = [grads] if isinstance(grads, np.ndarray) else list(grads)
    if len(grads) != n:
        raise ValueError(f"grads: expected {n} arrays (one per param), got {len(grads)}")
    return grads


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov momentum, L2
    weight decay and maximize, as ``torch.optim.SGD`` (SPEC sections 2-4): the first momentum
    step copies the gradient into the buffer.

    ``step(grads, grad_scale=..., found_inf=...)`` behaves as PyTorch's fused kernel under a
    GradScaler: grads are divided by ``grad_scale`` (and the unscaled values written back into
    the grad arrays), and a nonzero ``found_inf`` skips the step entirely.
    """

    _state_names = ("momentum_buffer",)
    _hyperparameter_names = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    _tracks_step = False

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _options(self, group: Mapping[str, Any]) -> Any:
        o = _core.SgdOptions()
        o.lr = _as_float(group["lr"], "lr")
        o.momentum = _as_float(group["momentum"], "momentum")
        o.dampening = _as_float(group["dampening"], "dampening")
        o.weight_decay = _as_float(group["weight_decay"], "weight_decay")
        o.nesterov = bool(group["nesterov"])
        o.maximize = bool(group["maximize"])
        return o

    def _needed_states(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return self._state_names if group["momentum"] != 0 else ()

    def step(
        self, grads: Sequence[np.ndarray], *, grad_scale: Any = None, found_inf: Any = None
    ) -> None:
        """Update every param in place from ``grads`` (one array per param, in param order)."""
        grads = _check_grad_count(grads, len(self._params))
        if _skip_step(found_inf):
            return
        scale = None if grad_scale is None else _as_float(grad_scale, "grad_scale")
        self._run(self._native.sgd_step, grads, scale)

    def _state_lists(self, options: list[Any]) -> list[list[np.ndarray | None] | None]:
        # A buffer made now takes the gradient itself: torch's first momentum step, which the
        # core runs where the count of steps taken with the buffer is 0.
        was_missing = [b is None for b in self._buffers["momentum_buffer"]]
        lists = super()._state_lists(options)
        for i, buffer in enumerate(self._buffers["momentum_buffer"]):
            if was_missing[i] and buffer is not None:
                self._steps[i] = 0
        return lists

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._steps = np.array([b is not None for b in self._buffers["momentum_buffer"]], np.int64)


class Adagrad(Optimizer):
    """Adagrad as ``torch.optim.Adagrad`` (SPEC section 5): eps outside the square root,
    ``lr_decay``, L2 ``weight_decay``, ``initial_accumulator_value``, maximize."""

    _state_names = ("sum",)
    _hyperparameter_names = ("lr", "lr_decay", "weight_decay", "eps", "maximize")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
    ) -> None:
        if not _as_float(initial_accumulator_value, "initial_accumulator_value") >= 0:
            raise ValueError(
                f"Invalid initial_accumulator_value: {initial_accumulator_value} (must be >= 0)"
            )
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _options(self, group: Mapping[str, Any]) -> Any:
        o = _core.AdagradOptions()
        o.lr = _as_float(group["lr"], "lr")
        o.lr_decay = _as_float(group["lr_decay"], "lr_decay")
        o.weight_decay = _as_float(group["weight_decay"], "weight_decay")
        o.eps = _as_float(group["eps"], "eps")
        o.maximize = bool(group["maximize"])
        return o

    def _initial_state(self, name: str, param: np.ndarray, group: Mapping[str, Any]) -> np.ndarray:
        if cuda.is_device_array(param):
            return cuda.full_like(param, group["initial_accumulator_value"])
        return np.full_like(param, group["initial_accumulator_value"], order="C")

    def _on_new_param(self, index: int, param: np.ndarray) -> None:
        # PyTorch allocates the sum at construction, so it is in the state before any step.
        group = self.param_groups[self._group_of[index]]
        self._buffers["sum"][index] = self._initial_state("sum", param, group)

    def step(self, grads: Sequence[np.ndarray]) -> None:
        """Update every param in place from ``grads`` (one array per param, in param order)."""
        self._run(self._native.adagrad_step, _check_grad_count(grads, len(self._params)))


class RMSprop(Optimizer):
    """RMSprop as ``torch.optim.RMSprop`` (SPEC section 6): ``alpha``, eps outside the square
    root, ``centered``, ``momentum`` (lr outside the buffer), L2 ``weight_decay``, maximize."""

    _state_names = ("square_avg", "momentum_buffer", "grad_avg")
    _hyperparameter_names = (
        "lr",
        "alpha",
        "eps",
        "weight_decay",
        "momentum",
        "centered",
        "maximize",
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _options(self, group: Mapping[str, Any]) -> Any:
        o = _core.RmspropOptions()
        o.lr = _as_float(group["lr"], "lr")
        o.alpha = _as_float(group["alpha"], "alpha")
        o.eps = _as_float(group["eps"], "eps")
        o.weight_decay = _as_float(group["weight_decay"], "weight_decay")
        o.momentum = _as_float(group["momentum"], "momentum")
        o.centered = bool(group["centered"])
        o.maximize = bool(group["maximize"])
        return o

    def _needed_states(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        needed = ("square_avg",)
        if group["momentum"] > 0:
            needed += ("momentum_buffer",)
        if group["centered"]:
            needed += ("grad_avg",)
        return needed

    def step(self, grads: Sequence[np.ndarray]) -> None:
        """Update every param in place from ``grads`` (one array per param, in param order)."""
        self._run(self._native.rmsprop_step, _check_grad_count(grads, len(self._params)))


class Adam(Optimizer):
    """Adam as ``torch.optim.Adam`` (SPEC section 7): bias-corrected moments, eps outside the
    corrected root, L2 ``weight_decay`` (or decoupled with ``decoupled_weight_decay=True``, which
    is AdamW), ``amsgrad`` on the raw second moment, maximize.

    ``step(grads, grad_scale=..., found_inf=...)`` follows PyTorch's fused Adam under a
    GradScaler (SPEC section 8): grads are unscaled in the pass and written back, and a nonzero
    ``found_inf`` skips the step and leaves the step count unchanged.
    """

    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _hyperparameter_names = (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "maximize",
        "decoupled_weight_decay",
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)

    def _options(self, group: Mapping[str, Any]) -> Any:
        betas = group["betas"]
        if not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
        o = _core.AdamOptions()
        o.lr = _as_float(group["lr"], "lr")
        o.beta1 = _as_float(betas[0], "betas[0]")
        o.beta2 = _as_float(betas[1], "betas[1]")
        o.eps = _as_float(group["eps"], "eps")
        o.weight_decay = _as_float(group["weight_decay"], "weight_decay")
        o.amsgrad = bool(group["amsgrad"])
        o.maximize = bool(group["maximize"])
        o.decoupled_weight_decay = bool(group["decoupled_weight_decay"])
        return o

    def _needed_states(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return self._state_names if group["amsgrad"] else self._state_names[:2]

    def step(
        self, grads: Sequence[np.ndarray], *, grad_scale: Any = None, found_inf: Any = None
    ) -> None:
        """Update every param in place from ``grads`` (one array per param, in param order)."""
        grads = _check_grad_count(grads, len(self._params))
        if _skip_step(found_inf):
            return
        scale = None if grad_scale is None else _as_float(grad_scale, "grad_scale")
        self._run(self._native.adam_step, grads, scale)


class AdamW(Adam):
    """AdamW as ``torch.optim.AdamW``: Adam with decoupled weight decay ``p *= 1 - lr*wd``,
    default ``weight_decay=1e-2``."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            decoupled_weight_decay=True,
        )
