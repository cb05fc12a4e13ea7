"""CUDA backend: the same updates as the CPU, in place on device arrays.

The optimizer classes (:mod:`fusedopt.optim`) route here when their params are CUDA arrays:
anything with ``__cuda_array_interface__`` (CuPy, PyTorch, Numba) or ``__dlpack__`` on a CUDA
device (PyTorch, CuPy, JAX). One optimizer holds arrays of one kind; every buffer of a step is
checked (dtype, shape, contiguity, writeability, aliasing, device) before anything is written.

Streams: the kernels run on the stream given as ``stream=`` (or by :func:`use_stream`), else on
the producer's stream: the ``stream`` of the first array's CUDA Array Interface, PyTorch's
current stream for torch tensors, and otherwise the legacy default stream, which DLPack
producers are asked to make the data ready on. A stream is an integer (``0``/``1`` the legacy
default stream, ``2`` the per-thread default stream, else a ``cudaStream_t``) or an object
carrying one (``torch.cuda.Stream``, ``cupy.cuda.Stream``, ``__cuda_stream__``).

The native module ``fusedopt._cuda`` is imported on first use; without it, or without a usable
GPU and driver, :func:`is_available` is False and a CUDA call raises RuntimeError saying why.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import sys
import weakref
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from fusedopt import _core

_DLPACK_CUDA = 2
_DLPACK_CUDA_MANAGED = 13
_LEGACY_DEFAULT_STREAM = 1

_native: ModuleType | None = None
_stream_override: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fusedopt_cuda_stream", default=None
)


def _module() -> ModuleType:
    """fusedopt._cuda, imported on first use."""
    global _native
    if _native is None:
        try:
            _native = importlib.import_module("fusedopt._cuda")
        except ImportError as error:
            raise RuntimeError(
                "fusedopt.cuda: this fusedopt was built without its CUDA backend (the module "
                f"fusedopt._cuda could not be imported: {error}). Build it on a machine with "
                "the CUDA toolkit: pip install fusedopt -Ccmake.define.FUSEDOPT_CUDA=ON"
            ) from None
    return _native


def unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run here, or None when it can. Never raises."""
    try:
        count, reason = _module().device_count()
    except RuntimeError as error:
        return str(error)
    return None if count > 0 else f"no usable CUDA device: {reason}"


def is_available() -> bool:
    """True when the CUDA backend was built and a GPU with a recent enough driver is present."""
    return unavailable_reason() is None


def device_count() -> int:
    """Number of usable CUDA devices (0 without the backend, a driver or a GPU)."""
    try:
        return int(_module().device_count()[0])
    except RuntimeError:
        return 0


# ------------------------------------------------------------------------------- array intake


def is_device_array(x: Any) -> bool:
    """Whether ``x`` is a CUDA device array this backend takes (NumPy arrays never are)."""
    if isinstance(x, np.ndarray) or x is None:
        return False
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is not None:
        try:
            return dlpack_device()[0] in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED)
        except Exception:
            return False
    # Looked up on the type: PyTorch's property raises for tensors that require grad.
    return hasattr(type(x), "__cuda_array_interface__")


def _kind(x: Any) -> str:
    return "CUDA device array" if is_device_array(x) else f"host array ({type(x).__name__})"


_dtype_names: dict[Any, str] = {}


def _dtype_name(x: Any) -> str:
    """An array's dtype by name ("float32", "bfloat16": NumPy's, torch's, JAX's), worked out
    once per dtype object: str() of a NumPy dtype costs 10 us, and every array of a step asks."""
    dtype = getattr(x, "dtype", "?")
    try:
        return _dtype_names[dtype]
    except (KeyError, TypeError):  # TypeError: unhashable
        name = str(dtype).rpartition(".")[2]
        if len(_dtype_names) < 64:  # a few dtypes in a process, not each one made on the fly
            with contextlib.suppress(TypeError):
                _dtype_names[dtype] = name
        return name


def check_param(param: Any, index: int, first: Any) -> None:
    """TypeError unless ``param`` lives where the optimizer's first param ``first`` does and is
    float32 or float64 (the optimizer classes call this when either is a device array)."""
    if is_device_array(param) != is_device_array(first):
        raise TypeError(
            f"params[{index}] is a {_kind(param)} but the optimizer's first param is a "
            f"{_kind(first)}: one optimizer updates either NumPy arrays or CUDA device arrays"
        )
    if _dtype_name(param) not in ("float32", "float64", "bfloat16", "float16"):
        raise TypeError(
            f"params[{index}] has dtype {_dtype_name(param)}; fusedopt updates float32, float64, "
            "bfloat16 and float16"
        )


def _stream_handle(stream: Any) -> int:
    if isinstance(stream, int):
        return stream
    for attribute in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        if isinstance(getattr(stream, attribute, None), int):
            return getattr(stream, attribute)
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        return int(protocol()[1])
    raise TypeError(f"stream must be an int or a CUDA stream object, got {type(stream).__name__}")


@contextlib.contextmanager
def use_stream(stream: Any) -> Iterator[None]:
    """Run every fusedopt CUDA step inside the block on ``stream``, e.g. around ``opt.step()``."""
    token = _stream_override.set(_stream_handle(stream))
    try:
        yield
    finally:
        _stream_override.reset(token)


def _interface(x: Any) -> dict[str, Any] | None:
    """The CUDA Array Interface of an array that has one, for any dtype but bfloat16: no typestr
    names it, and producers give it one of their own (torch 2.4 raises KeyError, 2.5 says "<f2",
    float16's, later ones "<V2"), so bfloat16 arrays go by DLPack."""
    if _dtype_name(x) == "bfloat16":
        return None
    try:
        return x.__cuda_array_interface__
    except (AttributeError, RuntimeError, TypeError, KeyError):
        return None


def _torch_stream(x: Any) -> int | None:
    """PyTorch's current stream on the tensor's device: where torch queued the work producing it
    (torch's CUDA Array Interface names no stream)."""
    if not _is_torch(x):
        return None
    return int(sys.modules["torch"].cuda.current_stream(x.device).cuda_stream)


def _streams(explicit: Any, first: Any) -> tuple[int, int | None]:
    """The stream a step on ``first``'s arrays launches on, and torch's current stream on its
    device (None for other libraries), which produced them: asked once a step."""
    producer = _torch_stream(first)
    if explicit is not None:
        return _stream_handle(explicit), producer
    if _stream_override.get() is not None:
        return _stream_override.get(), producer
    if producer is not None:
        return producer, producer
    interface = _interface(first)
    if interface is not None and interface.get("stream") is not None:
        return int(interface["stream"]), producer
    return _LEGACY_DEFAULT_STREAM, producer


def _describe(x: Any, name: str, stream: int, producer_stream: int | None) -> Any:
    """The array's CUDA Array Interface dict, else a DLPack capsule made ready on ``stream``.
    ``producer_stream`` stands in for an interface that names no stream (PyTorch's)."""
    if x is None:
        return None
    if getattr(x, "requires_grad", False) and hasattr(x, "detach"):
        x = x.detach()  # a torch Parameter: same memory, updated in place as torch.optim does
    device = _dlpack_device_type(x)
    if device is not None and device not in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED):
        # Asked for a CUDA stream, a CPU producer raises (torch: an AssertionError): say what
        # is wrong before asking.
        raise ValueError(
            f"{name} is in {_DEVICE_NAMES.get(device, f'DLPack device type {device}')}, not on a "
            "CUDA device: every buffer of a CUDA step must be on the GPU"
        )
    interface = _interface(x)
    if interface is not None:
        if producer_stream is not None:
            interface = {**interface, "stream": interface.get("stream") or producer_stream}
        return interface
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack__"):
        raise TypeError(
            f"{name} is a {type(x).__name__}; fusedopt.cuda takes CUDA device arrays "
            "(__cuda_array_interface__ or __dlpack__: CuPy, PyTorch, JAX, Numba)"
        )
    dlpack_stream = stream or _LEGACY_DEFAULT_STREAM  # DLPack forbids 0 for the legacy stream
    try:
        capsule = x.__dlpack__(stream=dlpack_stream, max_version=(1, 0), copy=False)
    except TypeError:  # a producer older than DLPack 1.0 and the 2023 array API
        capsule = x.__dlpack__(stream=dlpack_stream)
    # A capsule names no stream: the producer's (torch's current one) goes with it, so that a
    # step on another stream is waited for by it in turn.
    return capsule if producer_stream is None else {"dlpack": capsule, "stream": producer_stream}


_DEVICE_NAMES = {1: "the CPU", 3: "pinned host memory"}


def _dlpack_device_type(x: Any) -> int | None:
    """The DLPack device type an array reports, or None when it reports none."""
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is None:
        return None
    try:
        return int(dlpack_device()[0])
    except Exception:
        return None


def _intake(stream: Any, **lists: Any) -> tuple[list[Any], int]:
    """Each list (params first, then grads and the states, in order) described for _cuda, and
    the stream to launch on."""
    params = list(lists["params"])
    first = params[0] if params else None
    handle, producer = _streams(stream, first)
    described = [
        None
        if arrays is None
        else [_describe(x, f"{role}[{i}]", handle, producer) for i, x in enumerate(arrays)]
        for role, arrays in lists.items()
    ]
    return described, handle


def _absmax_lists(
    state_names: Sequence[str], absmax: Sequence[Sequence[Any] | None] | None
) -> dict[str, Any]:
    """The 8-bit states' scales as _intake's named lists (``exp_avg_absmax``...)."""
    if absmax is None:
        return {}
    absmax = list(absmax)
    if len(absmax) != len(state_names):
        raise ValueError("absmax: one list (or None) per state of the algorithm")
    return {f"{name}_absmax": scales for name, scales in zip(state_names, absmax)}


# ------------------------------------------------------------------------------------- steps
# The same arguments as fusedopt._core's step and Plan (fusedopt._engine calls either), plus the
# stream.


def step(
    algorithm: str,
    groups: Sequence[tuple[float, ...]],
    group_of: Any,
    steps: Any,
    params: Sequence[Any],
    grads: Sequence[Any],
    states: Sequence[Sequence[Any] | None],
    *,
    new_state: Sequence[bool] | None = None,
    scalars: np.ndarray | None = None,
    grad_scale: float | None = None,
    stream: Any = None,
    checked: bool = True,
    masters: Sequence[Any] | None = None,
    absmax: Sequence[Sequence[Any] | None] | None = None,
    rounding_seed: int | None = None,
) -> None:
    """One step of ``algorithm`` on device arrays: ``steps`` holds each tensor's step number t
    (see fusedopt.functional for the arguments, the precision ones included: ``masters``,
    ``absmax``, ``rounding_seed``); ``checked=False`` uses the options as they are, never
    checking their ranges (fusedopt.torch, as torch uses its param_groups' values)."""
    native = _module()
    named = {"params": params, "grads": grads}
    state_names = _core.algorithm_info(algorithm)["states"]
    if len(states) != len(state_names):
        raise ValueError(f"{algorithm} takes {len(state_names)} state lists")
    named.update({name: s for name, s in zip(state_names, states)})
    named["masters"] = masters
    named.update(_absmax_lists(state_names, absmax))
    lists, handle = _intake(stream, **named)
    k = len(state_names)
    native.step(
        algorithm, groups, np.asarray(group_of, np.int64), np.asarray(steps, np.int64), lists[0],
        lists[1], lists[2 : 2 + k], new_state, scalars, grad_scale, handle, checked,
        masters=lists[2 + k], absmax=lists[3 + k :] or None, rounding_seed=rounding_seed,
    )  # fmt: skip


class Plan:
    """A step's device arrays registered once (the interface of fusedopt._core.Plan): the params,
    states, masters and 8-bit scales are described and checked when registered (fusedopt._cuda's
    Plan), and each step describes and checks its grads only. The plan holds the arrays; one that
    is a torch tensor whose memory moved since (``.data =``, ``resize_``, ``set_``) makes the next
    step register them all anew. The step counts and scalars are the caller's arrays, advanced in
    place by each step."""

    def __init__(
        self,
        algorithm: str,
        groups: Sequence[tuple[float, ...]],
        group_of: Any,
        params: Sequence[Any],
        states: Sequence[Sequence[Any] | None],
        *,
        step_counts: np.ndarray | None = None,
        new_state: Sequence[bool] | None = None,
        scalars: np.ndarray | None = None,
        masters: Sequence[Any] | None = None,
        rounding_seed: int | None = None,
        absmax: Sequence[Sequence[Any] | None] | None = None,
    ) -> None:
        self._algorithm = algorithm
        self._groups = list(groups)
        self._group_of = np.asarray(group_of, np.int64)
        self._params = list(params)
        self._states = [None if s is None else list(s) for s in states]
        self._masters = None if masters is None else list(masters)
        self._absmax = None if absmax is None else [None if a is None else list(a) for a in absmax]
        self._rounding_seed = rounding_seed
        self._step_counts = step_counts
        self._new_state = None if new_state is None else list(new_state)
        self._scalars = scalars
        self._native: Any = None
        self._marks: list[Any] = []
        self._register()

    def _arrays(self) -> list[Any]:
        lists = [self._params, *self._states, self._masters, *(self._absmax or [])]
        return [x for lst in lists if lst is not None for x in lst if x is not None]

    def _register(self) -> None:
        state_names = _core.algorithm_info(self._algorithm)["states"]
        if len(self._states) != len(state_names):
            raise ValueError(f"{self._algorithm} takes {len(state_names)} state lists")
        named = {"params": self._params, **dict(zip(state_names, self._states))}
        named["masters"] = self._masters
        named.update(_absmax_lists(state_names, self._absmax))
        lists, _ = _intake(None, **named)
        k = len(state_names)
        self._native = _module().Plan(
            self._algorithm, self._groups, self._group_of, lists[0], lists[1 : 1 + k],
            lists[1 + k], lists[2 + k :] or None, self._step_counts, self._new_state,
            self._scalars, self._rounding_seed,
        )  # fmt: skip
        self._marks = [_memory_mark(x) for x in self._arrays()]

    def set_options(self, group: int, values: tuple[float, ...]) -> None:
        self._native.set_options(group, values)
        self._groups[group] = values

    def step_if_unchanged(
        self,
        groups: Any,
        keys: tuple[str, ...],
        expected: Any,
        grads: Sequence[Any],
        grad_scale: float | None = None,
    ) -> bool:
        """As fusedopt._core.Plan's: a step when ``_core.groups_hold(groups, keys, expected)``;
        False, and nothing done, otherwise."""
        if not _core.groups_hold(groups, keys, expected):
            return False
        self.step(grads, grad_scale, None)
        return True

    def step(self, grads: Sequence[Any], grad_scale: float | None, step_number: int | None):
        if [_memory_mark(x) for x in self._arrays()] != self._marks:
            self._register()  # a torch tensor's memory moved: described and checked anew
        self._step(self._params[0] if self._params else None, grads, grad_scale, step_number)

    def _step(self, first: Any, grads: Sequence[Any], grad_scale: float | None, step_number: Any):
        handle, producer = _streams(None, first)
        described = [_describe(g, f"grads[{i}]", handle, producer) for i, g in enumerate(grads)]
        if producer is None and first is not None:  # the stream its interface names now
            producer = (_interface(first) or {}).get("stream")
        try:
            self._native.step(described, grad_scale, step_number, handle, producer)
        except Exception:
            raise  # refused before writing: the first step's flags stand
        except BaseException:  # an interrupt as the call returned: the step ran
            self._new_state = None
            raise
        self._new_state = None  # made for the first step: not again when registered anew


class _CachedPlan(Plan):
    """A Plan that keeps no array alive between steps (the functional API's cache, as the CPU's
    keeps none): it holds weak references to the arrays it registered, and steps only when it is
    given those very arrays again, their memory as registered (``step_if_same``). An array that
    takes no weak reference cannot be cached: TypeError when made."""

    def __init__(self, algorithm: str, groups: Sequence[tuple[float, ...]], params: Sequence[Any],
                 states: Sequence[Sequence[Any] | None]) -> None:  # fmt: skip
        self._layout = _layout(params, states)
        self._references = [weakref.ref(x) for x in _given(params, states)]
        super().__init__(algorithm, groups, np.zeros(len(params), np.int64), params, states)
        self._params, self._states = [], [None] * len(self._states)  # the references only

    def step(self, grads: Sequence[Any], grad_scale: float | None, step_number: int | None):
        raise TypeError("a cached plan steps the arrays given again: step_if_same")

    def step_if_same(
        self,
        params: Sequence[Any],
        states: Sequence[Sequence[Any] | None],
        grads: Sequence[Any],
        grad_scale: float | None,
        step_number: int,
        changed: tuple[float, ...] | None = None,
    ) -> bool:
        """One step at t = ``step_number`` when ``params`` and ``states`` are the registered
        arrays, in the same lists, their memory as registered, with the options ``changed`` to
        first where given (as fusedopt._core.Plan's); False, and nothing done, when not (the
        caller registers them anew)."""
        if _layout(params, states) != self._layout:
            return False
        arrays = _given(params, states)
        if len(arrays) != len(self._references) or any(
            reference() is not x for reference, x in zip(self._references, arrays)
        ):
            return False
        if [_memory_mark(x) for x in arrays] != self._marks:
            return False
        if changed is not None:
            self.set_options(0, changed)
        self._step(params[0] if params else None, grads, grad_scale, step_number)
        return True


def _given(params: Sequence[Any], states: Sequence[Sequence[Any] | None]) -> list[Any]:
    """The arrays of a step's params and states, in Plan._arrays' order."""
    return [x for lst in (params, *states) if lst is not None for x in lst if x is not None]


def _layout(params: Sequence[Any], states: Sequence[Sequence[Any] | None]) -> tuple:
    """Which of a step's lists and entries are given: a plan steps arrays in the same places."""
    return tuple(
        None if lst is None else tuple(x is None for x in lst) for lst in (params, *states)
    )


def _memory_mark(x: Any) -> Any:
    """What of a registered array can change while the plan holds it: a torch tensor's memory
    and layout (``.data =``, ``resize_``, ``set_``); whether a JAX array was deleted or donated
    (its memory freed under the object); for another array, what its CUDA Array Interface says
    (its address, shape, strides, type: Numba's ``gpu_data`` and PyCUDA's ``gpudata`` can be
    given other memory). An array with neither (DLPack only) is taken to keep its memory."""
    if _is_torch(x):
        return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
    is_deleted = getattr(x, "is_deleted", None)
    if callable(is_deleted):
        return is_deleted()
    try:
        interface = x.__cuda_array_interface__
    except (AttributeError, RuntimeError, TypeError, KeyError):
        return None
    shape, strides = interface.get("shape"), interface.get("strides")
    return (
        interface["data"][0],
        tuple(shape or ()),
        None if strides is None else tuple(strides),
        interface.get("typestr"),
    )


# ------------------------------------------------------------------------ state on the device
# Optimizer state is allocated by the params' own library (torch.zeros_like, cupy.zeros_like,
# jax.numpy.zeros_like): it lives in that library's memory pool and stays a tensor of that
# library for the user, e.g. for torch.save.


def _namespace(x: Any) -> Any:
    array_namespace = getattr(x, "__array_namespace__", None)
    if array_namespace is not None:
        return array_namespace()
    module = sys.modules.get(_library(x))
    if module is None or not hasattr(module, "zeros_like"):
        raise TypeError(
            f"fusedopt.cuda cannot allocate optimizer state like a {type(x).__name__}; keep the "
            "state yourself and call fusedopt.cuda's step functions"
        )
    return module


def _library(x: Any) -> str:
    """The top-level module of an array's type: "torch", "cupy", "jax"..."""
    return type(x).__module__.partition(".")[0]


def _is_torch(x: Any) -> bool:
    return _library(x) == "torch"


def _library_dtype(x: Any, name: str) -> Any:
    """The dtype called ``name`` in the library of ``x`` (torch.bfloat16, jax.numpy.bfloat16...)."""
    found = getattr(_namespace(x), name, None)
    return found if found is not None else np.dtype(name)


def _on_device_of(x: Any) -> Any:
    """CuPy makes new arrays on its current device, not its argument's: the argument's made
    current (a context manager); nothing to do for the other libraries."""
    device = getattr(x, "device", None)
    if _library(x) == "cupy" and hasattr(device, "use"):
        return device
    return contextlib.nullcontext()


def zeros_like(param: Any) -> Any:
    """A zero-filled array of the param's library, dtype, shape and device."""
    with _on_device_of(param):
        return _namespace(param).zeros_like(param)


def full_like(param: Any, value: float, dtype: str | None = None) -> Any:
    """An array of the param's library, shape and device (and dtype, or the one named),
    filled with ``value``."""
    with _on_device_of(param):
        if dtype is None or dtype == _dtype_name(param):
            return _namespace(param).full_like(param, value)
        return _namespace(param).full_like(param, value, dtype=_library_dtype(param, dtype))


def astype(array: Any, dtype: str) -> Any:
    """A new device array: ``array``'s values in the dtype named (exactly, for a widening)."""
    if _is_torch(array):
        return array.detach().to(_library_dtype(array, dtype), copy=True)
    with _on_device_of(array):
        return array.astype(_library_dtype(array, dtype))


def from_host(values: np.ndarray, like: Any) -> Any:
    """A new device array holding the host array ``values`` (its shape and dtype), in the library
    and on the device of ``like``."""
    host = np.ascontiguousarray(values)
    if _is_torch(like):
        torch = sys.modules["torch"]
        if host.dtype.name == "bfloat16":  # ml_dtypes: torch takes its bits
            return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16).to(like.device)
        return torch.from_numpy(host).to(like.device)
    sharding = getattr(like, "sharding", None)
    if sharding is not None and "jax" in sys.modules:  # JAX: on the param's device(s)
        return sys.modules["jax"].device_put(host, sharding)
    with _on_device_of(like):
        return _namespace(like).asarray(host)


def to_numpy(array: Any) -> np.ndarray:
    """A host copy of a device array."""
    if hasattr(array, "detach"):  # torch
        host = array.detach().cpu()
        if host.dtype == sys.modules["torch"].bfloat16:  # which torch gives NumPy as its bits
            from fusedopt._engine import numpy_dtype  # (which imports this module)

            return host.view(sys.modules["torch"].int16).numpy().view(numpy_dtype("bfloat16"))
        return host.numpy()
    for method in ("get", "copy_to_host"):  # CuPy, Numba
        if hasattr(array, method):
            return getattr(array, method)()
    return np.array(array)  # JAX and other array-API libraries


def array_like(values: np.ndarray, param: Any, dtype: str | None = None) -> Any:
    """A new device array holding ``values`` with the param's dtype (or the one named), on the
    param's device."""
    from fusedopt._engine import numpy_dtype  # (which imports this module)

    dtype = dtype or _dtype_name(param)
    host = np.ascontiguousarray(values, dtype=numpy_dtype(dtype))
    if _is_torch(param) and dtype == _dtype_name(param) and dtype != "bfloat16":
        result = zeros_like(param)  # laid out as the param
        result.copy_(sys.modules["torch"].from_numpy(host))
        return result
    return from_host(host, param)
