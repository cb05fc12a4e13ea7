"""Drop-in ``torch.optim`` optimizers: fusedopt's kernels over torch tensors.

``fusedopt.torch.AdamW`` is a ``torch.optim.Optimizer`` with ``torch.optim.AdamW``'s signature,
defaults, param groups, hooks and state (the same keys, dtypes and ``step`` type, so state dicts
load in either direction and training continues on the same trajectory), so learning-rate
schedulers, ``torch.amp.GradScaler``, checkpoints and distributed wrappers take it. A step
updates every param that has a grad, in its own memory, in one native call per device: CPU
tensors through their data pointers (registered once, checked at every step), CUDA tensors
through :mod:`fusedopt.cuda` on the current stream.

``foreach`` and ``fused`` are accepted and change nothing (fused is what you get);
``differentiable=True`` and ``capturable=True`` are refused. Sparse, complex or integer params,
non-contiguous params, and params on other devices are refused when they are added, naming the
param and its group; a non-contiguous or sparse grad is refused at the step, with nothing written.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from fusedopt import _core, cuda, optim
from fusedopt._engine import TORCH, native_values

__all__ = ["Optimizer"]

_FLOAT_DTYPES = (torch.float32, torch.float64)


def _scalar_dtype() -> torch.dtype:
    """torch's dtype for step counts and scalar states (``_get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose step is fusedopt's.

    A subclass names the NumPy-API class (``fusedopt.optim``) that declares its algorithm and
    how torch spells its hyperparameters.
    """

    _declaration: type[optim.Optimizer]

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._lock = threading.RLock()
        self._plans: dict[Any, Any] = {}
        self._options_cache: dict[int, tuple[tuple[Any, ...], tuple[float, ...]]] = {}
        self._registered: tuple[Any, ...] | None = None
        for flag in ("differentiable", "capturable"):
            if defaults.get(flag):
                raise ValueError(
                    f"fusedopt.torch.{type(self).__name__}: {flag}=True is not supported "
                    "(fusedopt's step runs outside autograd and CUDA graphs); leave it False"
                )
        super().__init__(params, defaults)
        description = self._declaration._description
        self._step_supports_amp_scaling = description.takes_grad_scale
        if self._declaration._states_at_construction:
            for group in self.param_groups:
                values = self._native_options(group)
                for p in group["params"]:
                    self._create_state(p, group, values)

    # ------------------------------------------------------------------------------- groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, then fusedopt's checks: every param must be a dense,
        contiguous float32 or float64 tensor on the CPU or a CUDA device, and the group's
        hyperparameters valid; a refused group is not added."""
        index = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for i, p in enumerate(group["params"]):
                _check_param(p, i, index)
            self._native_options(group)
        except Exception:
            del self.param_groups[-1]
            raise
        with self._lock:
            self._plans.clear()

    def _native_options(self, group: dict[str, Any]) -> tuple[float, ...]:
        """The group's native options, recomputed only when one of its values changed."""
        declaration = self._declaration
        values = tuple([group[name] for name in declaration._hyperparameter_names])
        cached = self._options_cache.get(id(group))
        if cached is not None and cached[0] == values:
            return cached[1]
        fixed = {"convention": TORCH, **declaration._fixed}
        if any(f.name == "float32_scalars" for f in declaration._description.fields):
            fixed["float32_scalars"] = float(_scalar_dtype() == torch.float32)
        native = native_values(
            declaration._description,
            declaration._hyperparameters,
            {h.name: _plain(group[h.name]) for h in declaration._hyperparameters},
            fixed,
        )
        self._options_cache[id(group)] = (values, native)
        return native

    # ---------------------------------------------------------------------------------- state

    def _create_state(self, p: torch.Tensor, group: dict[str, Any], values: tuple) -> bool:
        """torch's state for ``p``, created lazily as torch creates it: the step count, the
        buffers these options use and the scalars. Whether a buffer was created."""
        description = self._declaration._description
        used = description.states_used(values)
        if p not in self.state and not (
            self._declaration._tracks_step or used or description.scalars
        ):
            return False  # torch keeps no state at all here (SGD without momentum)
        state = self.state[p]
        if self._declaration._tracks_step and "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        used = description.states_used(values)
        initial_states, initial_scalars = description.initial_values(values)
        created = False
        for name in used:
            if state.get(name) is None:
                value = initial_states[description.states.index(name)]
                state[name] = torch.full_like(p, value, memory_format=torch.contiguous_format)
                created = True
        for name, value in zip(description.scalars, initial_scalars):
            if name not in state:
                state[name] = torch.tensor(value, dtype=_scalar_dtype())
        return created

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self._lock:
            super().load_state_dict(state_dict)
            self._plans.clear()
            self._options_cache.clear()

    # ----------------------------------------------------------------------------------- step

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
            options = [self._native_options(group) for group in self.param_groups]
            for device, plan in self._plans.items():
                if not self._step_plan(device, plan, options, scale):
                    break
            else:
                if self._plans:
                    return loss
            self._register(options)
            for device, plan in self._plans.items():
                if not self._step_plan(device, plan, options, scale):
                    raise RuntimeError("fusedopt.torch: a plan made now refused its first step")
        return loss

    def _step_plan(self, device: Any, plan: Any, options: list, scale: float | None) -> bool:
        entry_options, native = plan
        for g, now in enumerate(options):
            if now is not entry_options[g]:
                # New options may need a state the params do not have yet: register again.
                if self._needs_states(g, now):
                    return False
                native.set_options(g, now)
                entry_options[g] = now
        return native.step(scale)

    def _needs_states(self, group_index: int, values: tuple[float, ...]) -> bool:
        used = self._declaration._description.states_used(values)
        group = self.param_groups[group_index]
        return any(
            self.state.get(p, {}).get(name) is None
            for p in group["params"]
            if p.grad is not None
            for name in used
        )

    def _register(self, options: list[tuple[float, ...]]) -> None:
        """Plans over the params that have a grad now, one per device, their state created."""
        description = self._declaration._description
        by_device: dict[Any, list[tuple[int, torch.Tensor, bool]]] = {}
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                by_device.setdefault(p.device, []).append((g, p, p.grad is not None))
        self._plans = {}
        for device, entries in by_device.items():
            params = [p for _, p, _ in entries]
            group_of = [g for g, _, _ in entries]
            active = [a for _, _, a in entries]
            new_state = []
            for g, p, a in entries:
                if a:
                    group = self.param_groups[g]
                    new_state.append(self._create_state(p, group, options[g]))
            active_params = [p for p, a in zip(params, active) if a]
            kept = [self.state.get(p, {}) for p in active_params]
            states = [
                [entry.get(name) for entry in kept]
                if any(entry.get(name) is not None for entry in kept)
                else None
                for name in description.states
            ]
            steps = (
                [self.state[p]["step"] for p in active_params]
                if self._declaration._tracks_step
                else []
            )
            scalars = (
                [[self.state[p][name] for name in description.scalars] for p in active_params]
                if description.scalars
                else None
            )
            if device.type == "cpu":
                native = _core.TorchPlan(
                    description.name, options, group_of, params, active, states, steps,
                    scalars, new_state if description.uses_new_state else None,
                )  # fmt: skip
            else:
                native = _DevicePlan(
                    description.name, options, group_of, params, active, states, steps,
                    scalars, new_state if description.uses_new_state else None,
                )  # fmt: skip
            self._plans[device] = (list(options), native)


class _DevicePlan:
    """The CUDA counterpart of ``_core.TorchPlan``: the same interface, over fusedopt.cuda."""

    def __init__(
        self, algorithm: str, options: list, group_of: list[int], params: list, active: list,
        states: list, steps: list, scalars: list | None, new_state: list | None,
    ) -> None:  # fmt: skip
        self.algorithm = algorithm
        self.options = list(options)
        self.params = params
        self.active = active
        self.active_params = [p for p, a in zip(params, active) if a]
        self.group_of = np.array([g for g, a in zip(group_of, active) if a], np.int64)
        self.states = states
        self.steps = steps
        self.scalars = scalars
        self.new_state = new_state
        self.addresses = [p.data_ptr() for p in self.active_params]

    def set_options(self, group: int, values: tuple[float, ...]) -> None:
        self.options[group] = values

    def step(self, grad_scale: float | None) -> bool:
        if [p.grad is not None for p in self.params] != self.active:
            return False
        if [p.data_ptr() for p in self.active_params] != self.addresses:
            return False
        grads = [p.grad for p in self.active_params]
        counts = np.array([float(s) for s in self.steps], np.int64) + 1 if self.steps else None
        steps = counts if counts is not None else np.ones(len(grads), np.int64)
        rows = None
        if self.scalars is not None:
            rows = np.zeros((len(grads), _core.max_scalars))
            for i, row in enumerate(self.scalars):
                rows[i, : len(row)] = [float(s) for s in row]
        cuda.step(
            self.algorithm, self.options, self.group_of, steps, self.active_params, grads,
            self.states, new_state=self.new_state, scalars=rows, grad_scale=grad_scale,
        )  # fmt: skip
        self.new_state = None
        if counts is not None:
            for s, t in zip(self.steps, counts):
                s.fill_(float(t))
        if rows is not None:
            for row, values in zip(self.scalars, rows):
                for s, v in zip(row, values):
                    s.fill_(float(v))
        return True


def _check_param(p: Any, index: int, group: int) -> None:
    where = f"params[{index}] of param_groups[{group}]"
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(p).__name__}")
    if p.layout != torch.strided:
        raise TypeError(f"{where} is a {p.layout} tensor; fusedopt updates dense tensors")
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; fusedopt updates float32 and float64")
    if p.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where} is on {p.device}; fusedopt.torch serves the CPU and CUDA")
    if not p.is_contiguous():
        raise ValueError(
            f"{where} is not contiguous; an in-place update needs the tensor's own memory "
            "(a contiguous copy would be updated instead of it)"
        )


def _plain(value: Any) -> Any:
    """A tensor hyperparameter (torch accepts a one-element tensor lr) as a number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor hyperparameter has one element, not {tuple(value.shape)}")
        return value.item()
    return value


def _make(declaration: type[optim.Optimizer]) -> type[Optimizer]:
    """fusedopt.torch.<Name>: torch.optim.<Name>'s signature and defaults where torch has the
    algorithm (the declaration's otherwise), over the declaration's algorithm."""
    name = declaration.__name__
    torch_class = getattr(torch.optim, name, None)
    source = torch_class.__init__ if torch_class is not None else declaration.__init__
    signature = inspect.signature(source)

    def __init__(self: Optimizer, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        params = arguments.pop("params")
        defaults = _torch_defaults(declaration, arguments)
        Optimizer.__init__(self, params, defaults)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    doc = (
        f"``torch.optim.{name}`` with fusedopt's step: the same signature, defaults, param "
        f"groups and state.\n\n{(declaration.__doc__ or '').strip()}"
    )
    namespace = {
        "__init__": __init__,
        "__doc__": doc,
        "_declaration": declaration,
        "__module__": __name__,
        "__qualname__": name,
    }
    return type(name, (Optimizer,), namespace)


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
