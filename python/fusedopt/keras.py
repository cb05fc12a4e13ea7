"""Keras 3 optimizers with fusedopt's step: ``model.compile(optimizer=fusedopt.keras.AdamW())``.

``fusedopt.keras.<Name>`` (SGD, Adagrad, RMSprop, Adam, AdamW, Adadelta, Adamax, Nadam, Lion,
Lamb) is a subclass of ``keras.optimizers.<Name>``, so of ``keras.optimizers.Optimizer``: the
same constructor, defaults, ``get_config``, slot variables (names, order, initial values) and
everything Keras' base class does around an update. It replaces one thing, the update itself:
where Keras runs its update per variable (or a chain of ``torch._foreach_*`` passes), one native
call updates every trainable variable in place, in the variables' own torch tensors, with Keras'
math (spec A.2): through ``fusedopt._core.TorchPlan``, registered once, on the CPU, and on a CUDA
device the same plan with fusedopt._cuda's launcher (one kernel per step, on torch's current
stream), as :mod:`fusedopt.torch` steps CUDA tensors; the low-precision options alike on both.

How a step is split between Keras and fusedopt (``apply`` -> ``_backend_apply_gradients``):

- Keras' base class, unchanged: dropping None gradients, ``overwrite_with_gradient``,
  ``loss_scale_factor``, ``gradient_accumulation_steps`` (the accumulators are summed with one
  ``torch._foreach_add_``, as Keras' torch optimizers do), ``clipnorm`` / ``clipvalue`` /
  ``global_clipnorm``, the learning rate (a float32 variable, a ``LearningRateSchedule`` or a
  callable), the decoupled ``weight_decay`` with ``exclude_from_weight_decay`` (Keras' own
  ``torch._foreach_mul_`` by ``1 - weight_decay*lr``: the kernel is given weight_decay = 0, so
  the decay is Keras' to the bit for every kind of learning rate, and the exclusions are Keras'
  own), the EMA of the weights, constraints and ``iterations``.
- fusedopt: the update of every variable and slot (momentums, velocities, ...; Nadam's
  ``_u_product``), in one call, at Keras' ``t = iterations + 1``.

Before Keras changes anything, each ``apply`` checks the gradients (one per variable, real, of its
shape; clipped in its own dtype and cast to the variable's after, as Keras does), the learning
rate (a number, whatever a schedule returns) and the hyperparameters; a refused step changes no
variable and leaves ``iterations`` alone. Variables must be float32, float64, bfloat16 or float16
(the ``mixed_*`` policies keep them float32, the ``bfloat16`` policy makes them bfloat16); others
are refused when the optimizer is built.

Low precision (docs/spec.md section 22), keyword-only after Keras' arguments: ``state_dtype``
(None: Keras' slots in each variable's dtype; ``"float32"`` or ``"bfloat16"``; ``"int8"``:
uint8 slots holding bitsandbytes' blockwise codes, each with a float32 ``<slot>_absmax``
optimizer variable, for variables of 4096 elements or more, float32 slots for smaller ones),
``master_weights`` (a float32 optimizer variable per 16-bit variable, saved with the optimizer;
Keras' decoupled weight decay goes to it; a variable written outside the step, by an assign, an
EMA overwrite or a load of the model alone, is where its master starts again, seen by its torch
version and a check that it no longer holds a rounding of its master), ``stochastic_rounding``
and ``seed`` (keyed by Keras' t). For 16-bit variables fusedopt's math is float32, rounded once
per write, where Keras' own optimizers compute in the variables' dtype; Keras' parts of a step
(clipping, EMA, the decay without a master) stay Keras', in that dtype.

Only the torch backend updates variables in place: on JAX or TensorFlow the constructor raises,
naming the torch backend. Saving: the slots are Keras variables, so ``model.save`` and
``keras.saving.load_model`` keep the optimizer and its state (the classes are registered as
``fusedopt>Name``: ``import fusedopt.keras`` before loading). For NumPy arrays, the same math
without Keras is :mod:`fusedopt.keras_numpy`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import keras
import numpy as np
from keras.src.backend.common.stateless_scope import in_stateless_scope

from fusedopt import _core, cuda, keras_numpy
from fusedopt._engine import (
    FULL_PRECISION,
    KERAS,
    PRECISION_OPTIONS,
    SIXTEEN_BIT,
    Precision,
    as_number,
    native_values,
    quantized_full,
    value_kinds,
    with_precision_options,
)

__all__ = ["Optimizer"]

# Keras' attribute holding each native state's slots (one per trainable variable), in the order
# of the algorithm's native states (csrc/math/<name>.h); the NumPy declaration of the same name
# gives the algorithm and how Keras spells its hyperparameters.
_SLOTS: dict[str, tuple[str, ...]] = {
    "SGD": ("momentums",),
    "Adagrad": ("_accumulators",),
    "RMSprop": ("_velocities", "_momentums", "_average_gradients"),
    "Adam": ("_momentums", "_velocities", "_velocity_hats"),
    "AdamW": ("_momentums", "_velocities", "_velocity_hats"),
    "Adadelta": ("_accumulated_grads", "_accumulated_delta_vars"),
    "Adamax": ("_m", "_u"),
    "Nadam": ("_momentums", "_velocities"),
    "Lion": ("_momentums",),
    "Lamb": ("_momentums", "_velocities"),
}
# The values the options' cache keys on (an array could not be compared; native_values refuses
# or converts anything else, at every step).
_PLAIN = (float, int, bool)
# Keras' optimizer-wide variable holding each native scalar (Nadam's u_product).
_SCALARS = {"mu_product": "_u_product"}
# Keras' torch backend has an update step of its own, in place over the variables' tensors
# (keras/src/backend/torch/optimizers/torch_<name>.py), for every optimizer here but these, whose
# generic update_step assigns new tensors.
_UPDATED_BY_ASSIGNMENT = ("Lamb",)


def _require_torch_backend(cls: type) -> None:
    backend = keras.backend.backend()
    if backend != "torch":
        raise RuntimeError(
            f"fusedopt.keras.{cls.__name__} needs Keras' torch backend (KERAS_BACKEND=torch): it "
            f"updates the variables' torch tensors in place, and Keras runs on {backend!r} here, "
            f"whose variables cannot be updated in place. Use keras.optimizers.{cls.__name__} on "
            f"{backend!r}, or set KERAS_BACKEND=torch before importing Keras."
        )


def _torch() -> Any:
    import torch

    return torch


class _Entry:
    """A native plan over the tensors of some of the variables (those given gradients)."""

    def __init__(self, plan: Any, options: tuple[float, ...], values: list[Any]):
        self.plan = plan
        self.options = options
        self.values = values  # the variables' tensors it was made over
        # Under a stateless scope (``stateless_apply``): Keras' optimizer-wide variables and the
        # copies of their values the plan steps, assigned back after the step.
        self.assign_back: list[tuple[Any, Any]] = []
        # Optimizer-wide variables the plan cannot step in place: 16-bit ones (Keras makes
        # Nadam's u_product in the variables' dtype) and any on a GPU (a plan's scalars are
        # host tensors). Copies (float32, host) the plan steps, read from them before each step.
        self.read_first: list[tuple[Any, Any]] = []
        # The variables' indices, in the order of ``values`` (for their masters).
        self.indices: tuple[int, ...] = ()
        # The memory of every tensor the plan writes (storage addresses): a gradient in one of
        # them is copied before Keras' pipeline runs (see _separate_grads).
        self.storages: frozenset[int] = frozenset()


class _Native:
    """fusedopt's own state on an optimizer, in one plain object: Keras tracks the attributes
    of an optimizer (lists and dicts become tracked containers), and this holds no Keras
    variable."""

    def __init__(self) -> None:
        self.plans: dict[tuple[int, ...], _Entry] = {}
        self.options_key: tuple[Any, ...] | None = None
        self.options: tuple[float, ...] = ()
        # Within an apply: the learning rates its step reads, in Keras' order.
        self.rates: list[Any] = []
        # Within an apply: Keras' overwrites of the variables that take their gradients, held
        # back until the step's checks have passed (Optimizer._overwrite_variables_directly...).
        self.overwrites: tuple[list[Any], list[Any]] | None = None


class Optimizer(keras.optimizers.Optimizer):
    """Base class of fusedopt's Keras optimizers: Keras' pipeline, fusedopt's update.

    A subclass is ``(Optimizer, keras.optimizers.<Name>)`` with ``_declaration``, the
    :mod:`fusedopt.keras_numpy` class of the same algorithm (its native algorithm and Keras'
    spelling of the hyperparameters), and ``_slots``, Keras' attribute for each native state.
    """

    _declaration: ClassVar[type[keras_numpy.Optimizer]]
    _slots: ClassVar[tuple[str, ...]] = ()
    _updated_by_assignment: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        _require_torch_backend(cls)
        return super().__new__(cls, *args, **kwargs)

    def _fusedopt_setup(self, precision: Precision = FULL_PRECISION) -> None:
        """After Keras' constructor: fusedopt's state, and every hyperparameter checked now (a
        bad one is refused at construction, not at the first step)."""
        precision.check_algorithm(self._declaration._description)
        self.precision = precision
        self._fusedopt_slot_dtype: str | None = None
        # master_weights: a float32 optimizer variable per 16-bit trainable variable (None for
        # the others), by variable index, and the variable's tensor and its torch version when
        # the master last matched it: a write to the variable since (an EMA overwrite, a load,
        # any assign) is seen as a new version, and the master starts again from it.
        self._fusedopt_masters: list[Any] = []
        self._fusedopt_synced: dict[int, tuple[Any, int]] = {}
        # state_dtype="int8": per native state, the float32 absmax variable of each variable's
        # 8-bit slot (None where the slot is float32: variables under 4096 elements).
        self._fusedopt_absmax: dict[str, list[Any]] = {}
        self._fusedopt = _Native()
        rate = self._learning_rate
        if isinstance(rate, keras.Variable):
            rate = float(keras.ops.convert_to_numpy(rate.value))
        elif callable(rate):
            rate = 0.0  # a schedule's rates are checked at every step
        decay = getattr(self, "weight_decay", None)
        values, fixed = self._option_values(rate, 0.0 if decay is None else decay)
        native_values(
            self._declaration._description, self._declaration._hyperparameters, values, fixed
        )

    # ------------------------------------------------------------------------------ options

    def _option_values(
        self, learning_rate: float, weight_decay: Any
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """The declared hyperparameters' values now, as Keras reads them at every step: Keras'
        attributes (a variable's or a tensor's current value; a flag given as None is off, as
        Keras tests flags by truth), with these learning rate and weight decay, and the options
        the class fixes. The learning rate is never read here: Keras calls a callable one only
        where it uses the rate."""
        declaration = self._declaration
        values: dict[str, Any] = {}
        for h in declaration._hyperparameters:
            if h.name == "learning_rate":
                values[h.name] = learning_rate
                continue
            value = _current(weight_decay if h.name == "weight_decay" else getattr(self, h.name))
            values[h.name] = False if value is None and h.name in declaration._flag_names else value
        fixed: dict[str, float] = {"convention": KERAS, **declaration._fixed}
        if any(f.name == "float32_scalars" for f in declaration._description.fields):
            fixed["float32_scalars"] = float(self._scalar_dtype() != "float64")
        return values, fixed

    def _native_options(self, learning_rate: float) -> tuple[float, ...]:
        """The kernel's options for the current values at this learning rate, recomputed only
        when a value changed (the key holds the values read, not the attributes, so a variable
        assigned between steps is seen). The kernel is given weight_decay = 0: Keras' base class
        decays the variables before the update (module docstring)."""
        values, fixed = self._option_values(learning_rate, 0.0)
        key = (*values.values(), *fixed.values())
        key += value_kinds(key)  # 1.0 == True and -0.0 == 0.0, yet they differ here
        state = self._fusedopt
        if not all(type(v) in _PLAIN for v in values.values()) or key != state.options_key:
            declaration = self._declaration
            state.options = native_values(
                declaration._description, declaration._hyperparameters, values, fixed
            )
            state.options_key = key
        return state.options

    def _scalar_dtype(self) -> str:
        """The dtype of Keras' optimizer-wide scalars (Nadam's u_product: the first variable's
        dtype, floatx before the optimizer is built)."""
        for attribute in _SCALARS.values():
            variable = getattr(self, attribute, None)
            if variable is not None:
                return str(variable.dtype)
        return keras.config.floatx()

    def _learning_rate_value(self, learning_rate: Any, first: Any) -> float:
        """The learning rate as Keras applies it to ``first`` (the first variable's tensor): a
        float32 variable or tensor as it is; a Python number cast to the variable's dtype, as
        Keras' ``ops.cast(learning_rate, variable.dtype)`` does. TypeError for anything else."""
        torch = _torch()
        value = learning_rate
        if isinstance(value, keras.Variable):
            value = value.value
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                raise TypeError(self._bad_learning_rate(learning_rate))
            return float(value.item())
        try:
            number = as_number(value, "learning_rate")
        except TypeError:
            raise TypeError(self._bad_learning_rate(learning_rate)) from None
        if isinstance(value, bool):
            raise TypeError(self._bad_learning_rate(learning_rate))
        return float(np.float32(number)) if first.dtype == torch.float32 else number

    def _bad_learning_rate(self, value: Any) -> str:
        source = self._learning_rate
        origin = f"the learning-rate schedule {source!r} returned" if callable(source) else "got"
        return (
            f"fusedopt.keras.{type(self).__name__}: learning_rate must be a number; {origin} "
            f"{value!r} ({type(value).__name__}). No variable was updated."
        )

    # -------------------------------------------------------------------------------- build

    def build(self, variables: Sequence[Any]) -> None:
        """Keras' build (the slots), after checking that fusedopt can update every variable:
        a Keras variable, float32 or float64, on the CPU or a CUDA device."""
        if not self.built:
            variables = list(variables)
            for i, v in enumerate(variables):
                self._check_variable(v, i)
            self._check_unique(variables)
            dtypes = [keras.backend.standardize_dtype(v.dtype) for v in variables]
            self.precision.check(dtypes)
        built = self.built
        super().build(variables)
        if built:
            return
        if self.precision.state_dtype == "int8":
            self._quantize_slots()
        if self.precision.master_weights:
            self._fusedopt_masters = [
                self._add_master(i, v) if self.precision.needs_master(dtype) else None
                for i, (v, dtype) in enumerate(zip(variables, dtypes))
            ]

    def _quantize_slots(self) -> None:
        """8-bit slots (uint8, as Keras made them for state_dtype="int8") hold the codes of
        their state's initial value, and each gets its absmax variable (after Keras' own)."""
        description = self._declaration._description
        initial, _ = description.initial_values(self._native_options(0.0))
        for k, (native, attribute) in enumerate(zip(description.states, self._slots)):
            slots = getattr(self, attribute, None)
            if not slots:
                continue
            scales = []
            for slot in slots:
                if slot is None or keras.backend.standardize_dtype(slot.dtype) != "uint8":
                    scales.append(None)
                    continue
                codes, absmax = quantized_full(
                    tuple(slot.shape), initial[k], description.nonnegative(native)
                )
                slot.assign(codes)
                scale = self.add_variable(
                    shape=absmax.shape, initializer="zeros", dtype="float32",
                    name=f"{slot.path.replace('/', '_')}_absmax",
                )  # fmt: skip
                scale.assign(absmax)
                scales.append(scale)
            if any(a is not None for a in scales):
                self._fusedopt_absmax[native] = scales

    def _add_master(self, index: int, variable: Any) -> Any:
        """A float32 optimizer variable holding ``variable``'s value (saved with the optimizer,
        after Keras' own variables)."""
        master = self.add_variable(
            shape=variable.shape,
            initializer="zeros",
            dtype="float32",
            name=f"{variable.path.replace('/', '_')}_master",
        )
        master.assign(keras.ops.cast(variable.value, "float32"))
        self._fusedopt_synced[index] = (variable.value, variable.value._version)
        return master

    def _masters_of(self, indices: Sequence[int]) -> list[Any]:
        if not self._fusedopt_masters:
            return [None] * len(indices)
        return [self._fusedopt_masters[i] for i in indices]

    def _apply_weight_decay(self, variables: list[Any]) -> None:
        """Keras' decoupled decay (its torch backend's ``torch._foreach_mul_`` by ``1 -
        weight_decay * lr``, the rate read once), applied to a variable's master where it has
        one: the step updates the master and writes the variable as its rounding."""
        masters = self._masters_of([self._get_variable_index(v) for v in variables])
        if self.weight_decay is None or not any(m is not None for m in masters):
            return super()._apply_weight_decay(variables)
        decayed = [
            (v if m is None else m).value
            for v, m in zip(variables, masters)
            if self._use_weight_decay(v)
        ]
        torch = _torch()
        with torch.no_grad():
            torch._foreach_mul_(decayed, 1 - self.weight_decay * self._get_current_learning_rate())

    def add_optimizer_variables(
        self, trainable_variables: Any, name: Any, initializer: Any = "zeros"
    ) -> Any:
        """Keras' slots, in ``state_dtype`` when one is set (Keras makes them in each
        variable's dtype)."""
        self._fusedopt_slot_dtype = self.precision.state_dtype
        try:
            return super().add_optimizer_variables(trainable_variables, name, initializer)
        finally:
            self._fusedopt_slot_dtype = None

    def add_variable_from_reference(
        self, reference_variable: Any, name: Any = None, initializer: Any = "zeros"
    ) -> Any:
        dtype = self._fusedopt_slot_dtype
        if dtype == "int8":  # uint8 codes, filled in by _quantize_slots; float32 when small
            variable_dtype = keras.backend.standardize_dtype(reference_variable.dtype)
            size = int(np.prod(reference_variable.shape))
            dtype = self.precision.state_dtype_for(variable_dtype, size)
            dtype = "uint8" if dtype == "int8" else dtype
        if dtype is not None:
            # Keras' own naming and layout, from a stand-in of the reference in the slot's dtype.
            reference_variable = _Reference(reference_variable, dtype)
        return super().add_variable_from_reference(reference_variable, name, initializer)

    def get_config(self) -> dict[str, Any]:
        """Keras' config, and the low-precision options when any is set (so a default config is
        keras.optimizers' own)."""
        config = super().get_config()
        if self.precision != FULL_PRECISION:
            config.update({option: getattr(self.precision, option) for option in PRECISION_OPTIONS})
        return config

    def _check_variable(self, v: Any, index: int) -> None:
        name = type(self).__name__
        if not isinstance(v, keras.Variable):
            hint = (
                f"; for NumPy arrays use fusedopt.keras_numpy.{name}"
                if isinstance(v, np.ndarray)
                else ""
            )
            raise TypeError(
                f"fusedopt.keras.{name} updates keras.Variable objects (a model's "
                f"trainable_variables); variables[{index}] is a {type(v).__name__}{hint}"
            )
        if getattr(v, "overwrite_with_gradient", False):
            return  # assigned its gradient by Keras, never updated here
        dtype = keras.backend.standardize_dtype(v.dtype)
        if dtype not in ("float32", "float64", *SIXTEEN_BIT):
            raise TypeError(
                f"fusedopt.keras.{name}: variable '{v.path}' has dtype {dtype}; fusedopt updates "
                "float32, float64, bfloat16 and float16 variables"
            )
        value = v.value
        if value.device.type == "cuda":
            reason = cuda.unavailable_reason()
            if reason is not None:
                raise RuntimeError(
                    f"fusedopt.keras.{name}: variable '{v.path}' is on {value.device}, and "
                    f"fusedopt's CUDA backend cannot run here: {reason}"
                )
        elif value.device.type != "cpu":
            raise ValueError(
                f"fusedopt.keras.{name}: variable '{v.path}' is on {value.device}; fusedopt "
                "updates variables on the CPU and on CUDA devices"
            )

    # ------------------------------------------------------------------------------- steps

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        """Keras' ``apply``, once the gradients match the variables one to one. Keras checks
        that only for the variables it was built with; given a list, it zips a gradient too many
        away, or raises from torch only after its weight decay has changed the variables."""
        if trainable_variables is not None:
            grads, trainable_variables = list(grads), list(trainable_variables)
            if grads and len(grads) != len(trainable_variables):  # none: Keras' no-op
                raise ValueError(
                    f"fusedopt.keras.{type(self).__name__}: apply got {len(grads)} gradient(s) "
                    f"for {len(trainable_variables)} variable(s); give one gradient per variable "
                    "(None for a variable without one). No variable was updated."
                )
            self._check_unique(trainable_variables)
        super().apply(grads, trainable_variables)

    def _check_unique(self, variables: list[Any]) -> None:
        """No variable twice in the list: Keras would step it once per occurrence, and one
        native step updates each variable once (it refuses memory written twice)."""
        first: dict[int, int] = {}
        for i, v in enumerate(variables):
            if isinstance(v, keras.Variable) and first.setdefault(id(v), i) != i:
                raise ValueError(
                    f"fusedopt.keras.{type(self).__name__}: variables[{i}] ('{v.path}') is "
                    f"variables[{first[id(v)]}] again; fusedopt updates a variable once per "
                    "step, where Keras would update it once per occurrence: list each variable "
                    "once. No variable was updated."
                )

    def _overwrite_variables_directly_with_gradients(
        self, grads: list[Any], variables: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        """Keras assigns each ``overwrite_with_gradient`` variable its gradient before the rest
        of the step, which fusedopt checks in _backend_apply_gradients: held back until those
        checks pass, so that a refused step leaves these variables too. Done now where no other
        variable has a gradient (Keras then calls no _backend_apply_gradients)."""
        overwritten = [self._overwrite_variable_with_gradient(v) for v in variables]
        if not any(overwritten) or all(overwritten):
            return super()._overwrite_variables_directly_with_gradients(grads, variables)
        self._fusedopt.overwrites = (list(grads), list(variables))
        kept = [(g, v) for g, v, o in zip(grads, variables, overwritten) if not o]
        return [g for g, _ in kept], [v for _, v in kept]

    def _backend_apply_gradients(self, grads: list[Any], trainable_variables: list[Any]) -> None:
        """Keras' pipeline, once the gradients, the learning rate and the native plan have
        been checked: a refused step raises here, before Keras changes any variable."""
        overwrites, self._fusedopt.overwrites = self._fusedopt.overwrites, None
        torch = _torch()
        values = [v.value for v in trainable_variables]
        grads = [
            self._checked_grad(g, v, x, torch)
            for g, v, x in zip(grads, trainable_variables, values)
        ]
        rates = []
        if values and self._updates_now():
            # The rates Keras' step reads (its weight decay's, then the update's), read and
            # checked now, and given to it in that order by _get_current_learning_rate: a
            # callable rate is called as often as Keras calls it, never on an accumulation step.
            rates = [super()._get_current_learning_rate()]
            if self.weight_decay is not None:
                rates.append(super()._get_current_learning_rate())
            for rate in rates:
                options = self._native_options(self._learning_rate_value(rate, values[0]))
            entry = self._entry(trainable_variables, values, options)
            # Before Keras' weight decay, which goes to the masters.
            self._sync_masters(entry, after_step=False)
        if overwrites is not None:
            super()._overwrite_variables_directly_with_gradients(*overwrites)
        self._fusedopt.rates = rates
        try:
            super()._backend_apply_gradients(grads, trainable_variables)
        finally:
            self._fusedopt.rates = []

    def _updates_now(self) -> bool:
        """Whether this apply updates the variables (not a gradient-accumulation step)."""
        steps = self.gradient_accumulation_steps
        return not steps or (int(self._iterations.value.item()) + 1) % steps == 0

    def _get_current_learning_rate(self) -> Any:
        """Keras' rate; within an apply, the next of the rates read up front for its step."""
        state = getattr(self, "_fusedopt", None)  # none yet in Keras' constructor
        if state is not None and state.rates:
            return state.rates.pop(0)
        return super()._get_current_learning_rate()

    def _checked_grad(self, grad: Any, variable: Any, value: Any, torch: Any) -> Any:
        """The gradient as a torch tensor of the variable's shape, on its device, in the
        gradient's own dtype: Keras clips it in that dtype, and casts it to the variable's in its
        update step (as _backend_update_step does)."""
        if not isinstance(grad, torch.Tensor):
            try:
                grad = keras.ops.convert_to_tensor(grad)
            except Exception as error:
                raise TypeError(
                    f"fusedopt.keras.{type(self).__name__}: the gradient of variable "
                    f"'{variable.path}' is a {type(grad).__name__}, not a tensor ({error}). "
                    "No variable was updated."
                ) from None
        if grad.layout != torch.strided:  # sparse: Keras applies it as the dense gradient
            grad = grad.to_dense()
        if grad.is_complex():  # Keras' torch ops refuse to write it into a real variable
            raise TypeError(
                f"fusedopt.keras.{type(self).__name__}: the gradient of variable "
                f"'{variable.path}' is complex ({grad.dtype}); Keras updates real variables "
                "from real gradients. No variable was updated."
            )
        if grad.shape != value.shape:
            raise ValueError(
                f"fusedopt.keras.{type(self).__name__}: the gradient of variable "
                f"'{variable.path}' has shape {tuple(grad.shape)}, but the variable's shape is "
                f"{tuple(value.shape)}. No variable was updated."
            )
        if grad.device != value.device:
            grad = grad.to(device=value.device)
        return grad

    def _backend_update_step(
        self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any
    ) -> None:
        """Every variable's update in one native call (Keras calls this once per step, after
        clipping and weight decay). The grads were checked in ``_backend_apply_gradients``;
        Keras' clipping and averaging keep their device and shape (and the native step checks
        them all again before it writes anything). Each is cast to its variable's dtype here,
        after Keras' clipping, as Keras' update step casts it."""
        torch = _torch()
        if not trainable_variables:
            return
        with torch.no_grad():
            values = [v.value for v in trainable_variables]
            if self._updated_by_assignment and in_stateless_scope():
                values = self._values_apart(trainable_variables, values)
            # resolve_neg: a view with torch's negative bit (as `.imag` of a conjugate view
            # gives) holds the opposite values in memory, which the native step reads.
            grads = [g.to(x.dtype).resolve_neg().contiguous() for g, x in zip(grads, values)]
            options = self._native_options(self._learning_rate_value(learning_rate, values[0]))
            step = self._step_number()
            for attempt in range(2):
                entry = self._entry(trainable_variables, values, options, fresh=attempt > 0)
                # Keras accepts a gradient that is a variable's own tensor (and reads it after
                # its weight decay has written the variable); the native step refuses a gradient
                # that overlaps anything it writes. Such a gradient is copied now.
                grads = [
                    g.clone() if g.untyped_storage().data_ptr() in entry.storages else g
                    for g in grads
                ]
                if self._run(entry, grads, step):
                    return
            raise RuntimeError("fusedopt.keras: a plan made now refused its first step")

    def _values_apart(self, trainable_variables: list[Any], values: list[Any]) -> list[Any]:
        """Under stateless_apply, where Keras' update step assigns new tensors: a variable's
        value that is also an optimizer variable's value in the scope (after an EMA overwrite
        step Keras hands one tensor as both a variable's and its average's) is copied into the
        scope first, so that the in-place step leaves the other as Keras' assignment does."""
        held = {v.value.untyped_storage().data_ptr() for v in self.variables}
        for k, (variable, value) in enumerate(zip(trainable_variables, values)):
            if value.untyped_storage().data_ptr() in held:
                variable.assign(value.clone())
                values[k] = variable.value
        return values

    def _step_number(self) -> int:
        """Keras' t: ``iterations + 1``, where iterations counts the updates (under gradient
        accumulation, the raw count // the accumulation steps)."""
        raw = int(self._iterations.value.item())
        steps = self.gradient_accumulation_steps
        return (raw // steps if steps else raw) + 1

    def _entry(
        self,
        trainable_variables: list[Any],
        values: list[Any],
        options: tuple[float, ...],
        fresh: bool = False,
    ) -> _Entry:
        """The native plan over these variables (made once per set of variables with a
        gradient, and again when a variable's tensor changed), with these options."""
        indices = tuple(self._get_variable_index(v) for v in trainable_variables)
        state = self._fusedopt
        stateless = in_stateless_scope()
        entry = None if fresh or stateless else state.plans.get(indices)
        if entry is not None and (
            len(entry.values) != len(values)
            or any(a is not b for a, b in zip(entry.values, values))
        ):
            entry = None  # a variable holds another tensor now
        if entry is None or entry.options is not options:
            self._check_slots(options)
        if entry is None:
            try:
                entry = self._make_entry(indices, values, options)
            except ValueError as error:  # the plan's, naming params[j]: Keras' variables
                paths = [self._trainable_variables[i].path for i in indices]
                message = re.sub(
                    r"\bparams\[(\d+)\]", lambda m: f"variable '{paths[int(m[1])]}'", str(error)
                )
                raise ValueError(
                    f"fusedopt.keras.{type(self).__name__}: {message}. No variable was updated."
                ) from None
            if not stateless:
                state.plans[indices] = entry
        elif entry.options is not options:
            entry.plan.set_options(0, options)  # refused, with nothing changed, if invalid
            entry.options = options
        return entry

    def _check_slots(self, options: tuple[float, ...]) -> None:
        """Every slot these options use exists: Keras creates a slot (amsgrad's velocity_hat,
        centered's average_gradient, a momentum) only if it is needed when it builds."""
        declaration = self._declaration
        used = declaration._description.states_used(options)
        for native, keras_name, attribute in zip(
            declaration._description.states, declaration._state_names, self._slots
        ):
            if native in used and not getattr(self, attribute, None):
                raise ValueError(
                    f"fusedopt.keras.{type(self).__name__}: these hyperparameters need the "
                    f"'{keras_name}' variables ({attribute}), which Keras creates only if they "
                    "are needed when it builds the optimizer (amsgrad, centered or a momentum "
                    "set after the first step); set the hyperparameters before the first step. "
                    "No variable was updated."
                )

    def _make_entry(
        self, indices: tuple[int, ...], values: list[Any], options: tuple[float, ...]
    ) -> _Entry:
        for value in values:
            if not value.is_contiguous():
                # Keras' Orthogonal initializer (torch's QR gives column-major Q) and transposed
                # arrays leave tensors the kernels cannot update in place: made row-major once,
                # the same values (Keras' assign and load_model copy into them and keep that).
                value.data = value.data.contiguous()
        description = self._declaration._description
        states: list[list[Any] | None] = []
        for attribute in self._slots:  # one per native state; those used exist (_check_slots)
            slots = getattr(self, attribute, None) or None
            states.append(None if slots is None else [slots[i].value for i in indices])
        scalar_variables = [getattr(self, _SCALARS[name]) for name in description.scalars]
        scalar_tensors = [variable.value for variable in scalar_variables]
        assign_back: list[tuple[Any, Any]] = []
        if scalar_tensors and in_stateless_scope():
            # stateless_apply: the scope may hold no value for a scalar (LossScaleOptimizer
            # leaves Nadam's u_product out of its variables), and then .value is the variable's
            # own tensor. Step a copy and assign it, as Keras does: the new value goes to the
            # scope, and no variable is changed.
            scalar_tensors = [tensor.clone() for tensor in scalar_tensors]
            assign_back = list(zip(scalar_variables, scalar_tensors))
        from fusedopt import torch as fusedopt_torch  # the torch backend's: torch is here

        native_plan = fusedopt_torch._native_plan(values[0].device)
        read_first: list[tuple[Any, Any]] = []
        for k, tensor in enumerate(scalar_tensors):
            sixteen_bit = keras.backend.standardize_dtype(tensor.dtype) in SIXTEEN_BIT
            # A GPU's plan keeps its scalars on the host (where the emulated GPU's tests run it).
            if sixteen_bit or native_plan is not _core.TorchPlan:
                # Stepped in float32 (and stored back rounded, as Keras stores it), on the host.
                scalar_tensors[k] = tensor.detach().to(
                    "cpu", _torch().float32 if sixteen_bit else tensor.dtype, copy=True
                )
                read_first.append((scalar_variables[k], scalar_tensors[k]))
                assign_back.append((scalar_variables[k], scalar_tensors[k]))
        n = len(values)
        written = [*values, *(t for slots in states if slots for t in slots)]
        written += [
            v.value
            for v in (
                *self._masters_of(indices),
                *(self._fusedopt_absmax[native][i] for native in self._fusedopt_absmax
                  for i in indices),
            )
            if v is not None
        ]  # fmt: skip
        storages = frozenset(t.untyped_storage().data_ptr() for t in written)
        rows = [scalar_tensors] * n if scalar_tensors else None
        masters = self._masters_of(indices)
        absmax = [
            [_value_or_none(self._fusedopt_absmax[native][i]) for i in indices]
            if native in self._fusedopt_absmax else None
            for native in description.states
        ]  # fmt: skip
        plan = native_plan(
            description.name, [options], [0] * n, values, [True] * n, states, [], rows, None,
            masters=[_value_or_none(m) for m in masters]
            if self.precision.master_weights else None,
            rounding_seed=self.precision.rounding_seed,
            absmax=absmax if self._fusedopt_absmax else None,
        )  # fmt: skip
        entry = _Entry(plan, options, values)
        entry.storages = storages
        entry.assign_back = assign_back
        entry.read_first = read_first
        entry.indices = indices
        return entry

    def _sync_masters(self, entry: _Entry, after_step: bool) -> None:
        """Before a step, a master whose variable was written since the master last matched it
        starts again from the variable's value, unless the variable still holds a rounding of
        the master (a checkpoint loaded both); after a step, the versions are noted (the native
        step writes through the tensors' memory, which torch does not count)."""
        if not self._fusedopt_masters or in_stateless_scope():
            return  # no masters; or the scope's values, not the variables': nothing to compare
        torch = _torch()
        for index, value in zip(entry.indices, entry.values):
            master = self._fusedopt_masters[index]
            if master is None:
                continue
            seen = self._fusedopt_synced.get(index)
            if not after_step and not (
                seen is not None and seen[0] is value and seen[1] == value._version
            ):
                # Within one unit in the last place (either rounding's result is): its master's.
                info = torch.finfo(value.dtype)
                widened = value.detach().float()
                apart = (widened - master.value).abs()
                if not bool((apart <= widened.abs() * info.eps + info.tiny).all()):
                    with torch.no_grad():
                        master.value.copy_(widened)
            self._fusedopt_synced[index] = (value, value._version)

    def _run(self, entry: _Entry, grads: list[Any], step: int) -> bool:
        for variable, tensor in entry.read_first:
            tensor.copy_(variable.value)
        if not entry.plan.step_grads(grads, step):
            return False
        self._sync_masters(entry, after_step=True)
        for variable, tensor in entry.assign_back:
            variable.assign(tensor)
        return True

    # ------------------------------------------------------------- gradient accumulation

    def _backend_reset_gradient_accumulators(self) -> None:
        torch = _torch()
        with torch.no_grad():
            accumulators = [v.value for v in self._accumulated_gradients if v is not None]
            torch._foreach_mul_(accumulators, 0.0)

    def _backend_increment_gradient_accumulators(
        self, grads: list[Any], acc_grads: list[Any]
    ) -> None:
        torch = _torch()
        with torch.no_grad():
            torch._foreach_add_([v.value for v in acc_grads], grads, alpha=1.0)


def _current(value: Any) -> Any:
    """A hyperparameter's value now: a Keras variable's, a tensor's or an array's single
    element as a Python number; anything else as it is (for native_values to take or refuse)."""
    if type(value) is float:  # the common case, kept cheap: read at every step
        return value
    if isinstance(value, keras.Variable):
        value = value.value
    if isinstance(value, _torch().Tensor):
        return value.item() if value.numel() == 1 else value
    if isinstance(value, np.ndarray | np.generic):
        return value.item() if value.size == 1 else value
    return value


def _value_or_none(variable: Any) -> Any:
    return None if variable is None else variable.value


class _Reference:
    """A variable as Keras' add_variable_from_reference reads it, in another dtype."""

    def __init__(self, variable: Any, dtype: str) -> None:
        self.path, self.name, self.shape = variable.path, variable.name, variable.shape
        self._layout = getattr(variable, "_layout", None)
        self.dtype = dtype


def _make(declaration: type[keras_numpy.Optimizer]) -> type[Optimizer]:
    """fusedopt.keras.<Name>: ``(Optimizer, keras.optimizers.<Name>)`` with Keras' constructor
    (its signature and defaults), registered for saving as ``fusedopt>Name``."""
    name = declaration.__name__
    keras_class = getattr(keras.optimizers, name)
    keras_init = keras_class.__init__

    def __init__(self: Optimizer, *args: Any, **kwargs: Any) -> None:
        precision = Precision.popped(kwargs)
        keras_init(self, *args, **kwargs)
        self._fusedopt_setup(precision)

    keras_signature = inspect.signature(keras_init)
    __init__.__signature__ = keras_signature.replace(  # type: ignore[attr-defined]
        parameters=with_precision_options(list(keras_signature.parameters.values()))
    )
    __init__.__qualname__ = f"{name}.__init__"
    __init__.__doc__ = f"``keras.optimizers.{name}``'s constructor, arguments and defaults."
    doc = (
        f"``keras.optimizers.{name}`` with fusedopt's step: one native call updates every "
        f"variable in place.\n\n{(declaration.__doc__ or '').strip()}"
    )
    namespace = {
        "__init__": __init__,
        "__doc__": doc,
        "__module__": __name__,
        "__qualname__": name,
        "_declaration": declaration,
        "_slots": _SLOTS[name],
        "_updated_by_assignment": name in _UPDATED_BY_ASSIGNMENT,
    }
    cls = type(name, (Optimizer, keras_class), namespace)
    return keras.saving.register_keras_serializable(package="fusedopt", name=name)(cls)


for _name in _SLOTS:
    globals()[_name] = _make(getattr(keras_numpy, _name))
    __all__.append(_name)
del _name

if keras.backend.backend() == "torch":
    # Under jit_compile=True Keras compiles its train step with torch.compile: the native step
    # is opaque to it, so the optimizer's part of the step runs eagerly, as a unit.
    Optimizer._backend_apply_gradients = _torch().compiler.disable(  # type: ignore[method-assign]
        Optimizer._backend_apply_gradients
    )
