"""The CUDA kernels' low-precision storage, run on the CPU by ``fusedopt._cuda_emulated``,
against the CPU backend, bit for bit.

The GPU's staged kernel (``csrc/cuda/staged.cuh``, launched by ``csrc/cuda/kernels.cu`` through
the bindings ``csrc/python/cuda_bindings.cpp``) updates bfloat16 and float16 params and grads,
float32 master copies, bfloat16, float16 and float32 states, 8-bit blockwise states (uint8 codes
of bitsandbytes' dynamic map and a float32 absmax per block of 256) and stochastic rounding keyed
by (seed, step, role, element index) (docs/spec.md section 22). It has never run on a GPU, and it
must give the CPU backend's bits exactly. ``fusedopt._cuda_emulated`` is that very source compiled
for the CPU with CUDA emulated (``csrc/cuda/emulation.h``: device memory is host memory, a block's
threads are threads of their own that meet at ``__syncthreads``), so any machine runs the
kernel's indexing, its chunks and 8-bit blocks, its block-wide absmax reduction and its rounding,
and this module compares every buffer a step writes with the CPU's after each of two or three
steps with new grads: params, grads written back under a grad scale, states, 8-bit codes and absmax,
masters and the per-tensor scalars (NAdam, ASGD), against the CPU under every ISA it offers:

- every algorithm that takes low precision but LAMB (whose params move by per-tensor sums that
  add in another order on the GPU: its states are checked bit for bit, its params within two
  units in their last place), each param dtype with each state dtype it takes (its
  own, float32, bfloat16, 8-bit where the algorithm's states are moments), with and without a
  master, rounded to nearest and stochastically, two option sets (non-default options, both
  conventions where offered) as two groups of one step, with float32 and float64 tensors (the
  other kernels) in the same call;
- tensors of 3 elements, 4096 + 17 (a partial 8-bit block) and several 65536-element chunks plus
  a remainder (8-bit blocks in two chunks) in one step;
- grad scales with 16-bit grads (written back rounded to nearest), infinite grads included;
- 8-bit states with hostile values: a block of zeros, NaN and infinities in the grads, a block of
  state that becomes NaN, a state that overflows to infinity;
- stochastic rounding: other bits for another seed or step, the CPU's bits for each;
- refusals through the emulated bindings: the CPU's exception type, nothing written.

What it cannot check is the GPU's own arithmetic and memory model (see test_cuda_emulated.py).
The emulation starts the threads of every block of a staged launch (512, for the maps in shared
memory) and the 8-bit path meets at a barrier about ten times per 512 elements: each staged
tensor costs tens of milliseconds per step and each 8-bit element tens of microseconds, so the
sizes here are small except where a test is about sizes, and the storage combinations of the
matrix share calls (each combination's master and rounding alternate over the algorithms).
Buffers are torch CPU tensors: the emulation takes them by DLPack (bfloat16 only comes that way),
the CPU as NumPy views (bfloat16 as ``ml_dtypes.bfloat16``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import fusedopt
from conftest import native_options
from fusedopt import _core
from fusedopt._engine import QUANT_BLOCK, quantize_blockwise, quantized_full

emulated = pytest.importorskip(
    "fusedopt._cuda_emulated",
    reason="fusedopt._cuda_emulated was not built (CMake option FUSEDOPT_CUDA_EMULATION=OFF, "
    "or an older build): the CUDA kernels cannot run without a GPU",
)
torch = pytest.importorskip(
    "torch", reason="torch is not installed: bfloat16 device buffers come by DLPack from torch"
)
ml_dtypes = pytest.importorskip(
    "ml_dtypes", reason="ml_dtypes is not installed: the CPU backend takes bfloat16 through it"
)

ISAS = fusedopt.available_isas()
CHUNK = _core._cuda_plan_limits["chunk_elements"]
BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
INT8 = "int8"  # 8-bit blockwise state: uint8 codes and a float32 absmax per block
SIXTEEN = (BF16, F16)
# The steps' t: the third jumps to 7, where RAdam's variance is rectified and every bias
# correction differs from the first steps'. The matrix, which starts from random states (8-bit
# ones too) and whose calls hold many staged tensors, takes the first and the last.
STEPS = (1, 2, 7)
MATRIX_STEPS = (1, 7)
SEED = 2**63 + 12345  # a seed past 2^63: the full 64 bits reach the kernel
GRAD_SCALE = 3.0  # unscaled grads are inexact: their rounding to nearest shows
PARTIAL = 4096 + 17  # the smallest size the optimizers keep 8-bit, with a partial last block

LOW_PRECISION = [a for a in _core.algorithms() if a != "lamb"]
QUANTIZABLE = [a for a in LOW_PRECISION if _core.algorithm_info(a)["quantizable_states"]]

# Two option sets per algorithm, the second in Keras' convention where it is offered: between
# them maximize, weight decay (both kinds), AMSGrad, momentum, Nesterov, centered, dampening,
# float64 scalars and the initial accumulator.
OPTION_SETS: dict[str, list[dict[str, Any]]] = {
    "sgd": [
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(lr=0.05, momentum=0.5, maximize=True, convention="keras"),
    ],
    "adagrad": [
        dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),
        dict(lr=0.1, initial_accumulator_value=0.1, eps=1e-7, maximize=True, convention="keras"),
    ],
    "rmsprop": [
        dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
        dict(lr=0.01, momentum=0.5, centered=True, maximize=True, convention="keras"),
    ],
    "adam": [
        dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True, amsgrad=True),
        dict(lr=0.01, weight_decay=0.004, amsgrad=True, maximize=True, convention="keras"),
    ],
    "adadelta": [
        dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.01, maximize=True),
        dict(lr=0.5, convention="keras"),
    ],
    "adamax": [
        dict(lr=0.01, beta1=0.3, beta2=0.9, weight_decay=0.01, maximize=True),
        dict(lr=0.01, eps=1e-3, convention="keras"),
    ],
    "nadam": [
        dict(lr=0.01, momentum_decay=0.5, decoupled_weight_decay=True, weight_decay=0.1),
        dict(lr=0.01, momentum_decay=1.0, convention="keras"),
    ],
    "radam": [
        dict(lr=0.01, beta2=0.9, weight_decay=0.01),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    ],
    "rprop": [
        dict(
            lr=0.02,
            etaminus=0.3,
            etaplus=1.5,
            step_size_min=1e-4,
            step_size_max=0.05,
            maximize=True,
        ),  # fmt: skip
        dict(lr=0.01),
    ],
    "asgd": [
        dict(lr=0.01, t0=1.0, lambd=0.1, alpha=0.5, weight_decay=0.01),  # averaging from t = 1
        dict(lr=0.02, t0=2.0, maximize=True, float32_scalars=False),
    ],
    "lion": [
        dict(lr=0.01, beta1=0.3, beta2=0.9, weight_decay=0.1),
        dict(lr=0.01, maximize=True, convention="keras"),
    ],
}


def option_sets(algorithm: str) -> list[tuple[float, ...]]:
    return [native_options(algorithm, **o) for o in OPTION_SETS[algorithm]]


@contextlib.contextmanager
def cpu_isa(name: str) -> Iterator[None]:
    previous = fusedopt.cpu_isa()
    fusedopt.set_cpu_isa(name)
    try:
        yield
    finally:
        fusedopt.set_cpu_isa(previous)


# ------------------------------------------------------------------------------------ buffers


def host(t: Any) -> Any:
    """The CPU backend's view of a torch CPU tensor (bfloat16 as ml_dtypes.bfloat16)."""
    if t is None:
        return None
    if t.dtype == BF16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def capsule(t: Any) -> Any:
    """The emulated device's view: a DLPack capsule of the CPU tensor (its memory is the host's)."""
    return None if t is None else t.__dlpack__()


def dtype_name(dtype: Any) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Spec:
    """One tensor of a step: its size, param (and grad) dtype, state dtype, master, group."""

    size: int
    dtype: Any
    state: Any  # a torch dtype, or INT8
    master: bool = False
    group: int = 0

    def __str__(self) -> str:
        master = "+master" if self.master else ""
        return f"{dtype_name(self.dtype)}/{dtype_name(self.state)}{master}[{self.size}]"


@dataclass
class Buffers:
    """One side's buffers: per tensor its param and master, per state a list over the tensors
    (None where a tensor's options use no such state), the 8-bit states' absmax alike."""

    params: list[Any]
    masters: list[Any]
    states: list[list[Any]]
    absmax: list[list[Any]]
    scalars: np.ndarray | None

    def clone(self) -> Buffers:
        def copy(ts: list[Any]) -> list[Any]:
            return [None if t is None else t.clone() for t in ts]

        return Buffers(
            copy(self.params),
            copy(self.masters),
            [copy(s) for s in self.states],
            [copy(a) for a in self.absmax],
            None if self.scalars is None else self.scalars.copy(),
        )

    def named(self, names: tuple[str, ...]) -> dict[str, Any]:
        """Every buffer a step may write, by name (the scalars as a tensor)."""
        out = {f"params[{i}]": p for i, p in enumerate(self.params)}
        out.update({f"masters[{i}]": m for i, m in enumerate(self.masters) if m is not None})
        for name, states, scales in zip(names, self.states, self.absmax):
            out.update({f"{name}[{i}]": s for i, s in enumerate(states) if s is not None})
            out.update({f"{name}_absmax[{i}]": a for i, a in enumerate(scales) if a is not None})
        if self.scalars is not None:
            out["scalars"] = torch.from_numpy(self.scalars)
        return out


def magnitudes(rng: np.random.Generator, size: int) -> np.ndarray:
    """Normal values scaled by 10^-6 to 10: float16's subnormals to values near its ulp of 1."""
    x = rng.standard_normal(size) * 10.0 ** rng.uniform(-6, 1, size)
    return x.astype(np.float32)


@dataclass
class Problem:
    """A step's description, shared by both sides, and the buffers it starts from."""

    algorithm: str
    groups: list[tuple[float, ...]]
    specs: list[Spec]
    start: Buffers = field(init=False)

    @property
    def info(self) -> dict[str, Any]:
        return _core.algorithm_info(self.algorithm)

    @property
    def group_of(self) -> np.ndarray:
        return np.array([s.group for s in self.specs], np.int64)

    def build(self, rng: np.random.Generator, warm: bool) -> Problem:
        """Params from ``rng``; each state its options use at its initial value, or (``warm``)
        at random values of its sign (8-bit: quantized by the kernels' rule)."""
        info = self.info
        n_states = len(info["states"])
        params, masters = [], []
        states: list[list[Any]] = [[] for _ in range(n_states)]
        absmax: list[list[Any]] = [[] for _ in range(n_states)]
        scalars = np.zeros((len(self.specs), _core.max_scalars)) if info["scalars"] else None
        for i, spec in enumerate(self.specs):
            values = self.groups[spec.group]
            param = torch.from_numpy(magnitudes(rng, spec.size)).to(spec.dtype)
            params.append(param)
            masters.append(param.float() if spec.master else None)
            used = _core.states_used(self.algorithm, values)
            initial, scalar_start = _core.initial_values(self.algorithm, values)
            if scalars is not None:
                scalars[i, : len(scalar_start)] = scalar_start
            for k in range(n_states):
                if not used >> k & 1:
                    states[k].append(None)
                    absmax[k].append(None)
                    continue
                nonnegative = bool(info["nonnegative_states"] >> k & 1)
                x = np.full(spec.size, initial[k], np.float32)
                if warm:
                    x = magnitudes(rng, spec.size)
                    if nonnegative or initial[k] > 0:
                        x = np.abs(x) + np.float32(initial[k])
                if spec.state == INT8:
                    if warm:
                        codes, scales = quantize_blockwise(x, nonnegative)
                    else:
                        codes, scales = quantized_full((spec.size,), initial[k], nonnegative)
                    states[k].append(torch.from_numpy(np.array(codes, np.uint8)))
                    absmax[k].append(torch.from_numpy(np.array(scales, np.float32)))
                else:
                    states[k].append(torch.from_numpy(x).to(spec.state))
                    absmax[k].append(None)
        self.start = Buffers(params, masters, states, absmax, scalars)
        return self

    def new_grads(self, rng: np.random.Generator) -> list[Any]:
        """Grads of the params' magnitudes, every 7th exactly 0 (the sign of 0: Rprop, Lion)."""
        grads = []
        for spec in self.specs:
            g = magnitudes(rng, spec.size)
            g[::7] = 0
            grads.append(torch.from_numpy(g).to(spec.dtype))
        return grads

    def arguments(self, b: Buffers, grads: list[Any], view: Callable[[Any], Any]) -> tuple:
        """(params, grads, states, masters, absmax) as one side takes them: a list of only None
        (a state no tensor keeps, no master, no 8-bit state) is None."""

        def listed(ts: list[Any]) -> list[Any] | None:
            return None if all(t is None for t in ts) else [view(t) for t in ts]

        absmax = [listed(a) for a in b.absmax]
        return (
            [view(p) for p in b.params],
            [view(g) for g in grads],
            [listed(s) for s in b.states],
            listed(b.masters),
            None if all(a is None for a in absmax) else absmax,
        )

    def cpu_step(self, b: Buffers, grads: list[Any], t: int, grad_scale=None, seed=None) -> None:
        params, grads_, states, masters, absmax = self.arguments(b, grads, host)
        _core.step(self.algorithm, self.groups, self.group_of, self.steps(t), params, grads_,
                   states, self.new_state(t), b.scalars, grad_scale, masters=masters,
                   rounding_seed=seed, absmax=absmax)  # fmt: skip

    def device_step(self, b: Buffers, grads: list[Any], t: int, grad_scale=None, seed=None) -> None:
        params, grads_, states, masters, absmax = self.arguments(b, grads, capsule)
        emulated.step(self.algorithm, self.groups, self.group_of, self.steps(t), params, grads_,
                      states, self.new_state(t), b.scalars, grad_scale, 0, True, masters=masters,
                      absmax=absmax, rounding_seed=seed)  # fmt: skip

    def steps(self, t: int) -> np.ndarray:
        return np.full(len(self.specs), t, np.int64)

    def new_state(self, t: int) -> list[bool] | None:
        return [t == 1] * len(self.specs) if self.info["uses_new_state"] else None

    def names(self) -> tuple[str, ...]:
        return tuple(self.info["states"])


# -------------------------------------------------------------------------------- comparing


def bits(t: Any) -> Any:
    return t.reshape(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        t.element_size()])  # fmt: skip


def assert_same_bits(
    expected: Any, actual: Any, what: str, sides: tuple[str, str] = ("CPU", "emulated CUDA")
) -> None:
    assert expected.dtype == actual.dtype and expected.shape == actual.shape, what
    e, a = bits(expected), bits(actual)
    if torch.equal(e, a):
        return
    differ = torch.nonzero(e != a).reshape(-1)
    first = int(differ[0])
    width = 2 * expected.element_size()
    mask = (1 << 4 * width) - 1
    raise AssertionError(
        f"{what}: {differ.numel()} of {e.numel()} elements differ; the first at {first}: "
        f"{sides[0]} {expected.reshape(-1)[first].item()!r} (0x{int(e[first]) & mask:0{width}x}), "
        f"{sides[1]} {actual.reshape(-1)[first].item()!r} (0x{int(a[first]) & mask:0{width}x})"
    )


def assert_same_buffers(problem: Problem, expected: Buffers, actual: Buffers, when: str) -> None:
    e, a = expected.named(problem.names()), actual.named(problem.names())
    assert e.keys() == a.keys(), when
    for name in e:
        spec = ""
        if "[" in name:
            spec = f" ({problem.specs[int(name.split('[')[1][:-1])]})"
        assert_same_bits(e[name], a[name], f"{problem.algorithm} {name}{spec} {when}")


def run_steps(
    problem: Problem,
    rng: np.random.Generator,
    grad_scale: float | None = None,
    seed: int | None = None,
    edit_grads: Callable[[int, list[Any]], None] | None = None,
    steps: tuple[int, ...] = STEPS,
) -> tuple[dict[str, Buffers], Buffers]:
    """Steps the emulated device and the CPU under each ISA from ``problem.start`` through
    ``steps`` with the same new grads (``edit_grads(t, grads)`` edits them), comparing every
    buffer after each step, the grads too under a grad scale. Returns both sides' buffers."""
    device = problem.start.clone()
    cpus = {isa: problem.start.clone() for isa in ISAS}
    for t in steps:
        grads = problem.new_grads(rng)
        if edit_grads:
            edit_grads(t, grads)
        device_grads = [g.clone() for g in grads]
        problem.device_step(device, device_grads, t, grad_scale, seed)
        for isa, cpu in cpus.items():
            cpu_grads = [g.clone() for g in grads]
            with cpu_isa(isa):
                problem.cpu_step(cpu, cpu_grads, t, grad_scale, seed)
            when = f"under {isa} after the step at t={t}"
            for i, (g_cpu, g_device) in enumerate(zip(cpu_grads, device_grads)):
                assert_same_bits(g_cpu, g_device, f"grads[{i}] ({problem.specs[i]}) {when}")
            assert_same_buffers(problem, cpu, device, when)
    moved = [not torch.equal(bits(a), bits(b)) for a, b in zip(problem.start.params, device.params)]
    assert any(moved), "no param moved: the comparison proves nothing"
    return cpus, device


def snapshot(problem: Problem, b: Buffers, grads: list[Any]) -> dict[str, Any]:
    named = {k: v.clone() for k, v in b.named(problem.names()).items()}
    named.update({f"grads[{i}]": g.clone() for i, g in enumerate(grads)})
    return named


# ----------------------------------------------------------------------------- sizes, chunks


def test_sizes_across_chunks_mixed_with_full_precision_in_one_step() -> None:
    """3, 4096 + 17 and several 65536-element chunks plus a remainder (the 8-bit state's blocks
    in two chunks, the last one partial) in one call with float32 and float64 tensors."""
    assert CHUNK == 65536
    specs = [
        Spec(3 * CHUNK + 17, BF16, BF16, master=True),
        Spec(2 * CHUNK + 5, F16, F32),
        Spec(CHUNK + 1000, F32, BF16),
        Spec(CHUNK + 300, BF16, INT8, master=True),
        Spec(3, F16, F16, master=True),
        Spec(PARTIAL, BF16, F32),
        Spec(3 * CHUNK + 17, F32, F32),
        Spec(CHUNK + 7, F64, F64),
        Spec(3, F64, F64),
    ]
    rng = np.random.default_rng(1)
    problem = Problem(
        "adam", [native_options("adam", lr=0.01, amsgrad=True, weight_decay=0.01)], specs
    )
    # Two steps: each 8-bit element costs the emulation tens of microseconds.
    run_steps(problem.build(rng, warm=False), rng, seed=7, steps=(1, 2))


# ----------------------------------------------------------------- every storage combination


def storage_combinations(algorithm: str) -> list[tuple[Any, Any]]:
    """(param dtype, state dtype) pairs that take the staged kernel: each param dtype with its
    own, float32, bfloat16 and 8-bit state where the algorithm allows (float32 with float32 is
    full precision: the other kernels)."""
    pairs = []
    quantizable = _core.algorithm_info(algorithm)["quantizable_states"]
    for dtype in (BF16, F16, F32):
        for state in (dtype, F32, BF16, INT8):
            if (dtype, state) in pairs or (dtype == F32 and state == F32):
                continue
            if state == INT8 and not quantizable:
                continue
            pairs.append((dtype, state))
    return pairs


def matrix_specs(algorithm: str, stochastic: bool) -> list[Spec]:
    """Every storage combination once, and a float32 and a float64 tensor. A 16-bit param's
    master and each tensor's group alternate over the combinations, and flip with the rounding
    and from one algorithm to the next: every combination takes both option sets and, over the
    algorithms, each of master on and off with each rounding. 8-bit tensors are small (the
    emulation's 8-bit path is slow: 257 and 300 elements end in a partial block), one of them
    4096 + 17 elements in every fourth call (and in the hostile values' tests)."""
    a = LOW_PRECISION.index(algorithm)
    flip = int(stochastic) + a
    specs = []
    quantized = 0
    for i, (dtype, state) in enumerate(storage_combinations(algorithm)):
        if state == INT8:
            sizes = (PARTIAL, 3, 300) if (a + int(stochastic)) % 4 == 0 else (300, 3, 257)
            size = sizes[(quantized + a) % 3]
            quantized += 1
        else:
            size = (PARTIAL, 3)[i % 2]
        master = dtype in SIXTEEN and (i + flip) % 2 == 0
        specs.append(Spec(size, dtype, state, master, group=(i // 2 + flip) % 2))
    specs.append(Spec(PARTIAL, F32, F32, group=flip % 2))
    specs.append(Spec(3, F64, F64, group=(flip + 1) % 2))
    return specs


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("algorithm", LOW_PRECISION)
def test_every_storage_combination_matches_the_cpu_bit_for_bit(algorithm, stochastic) -> None:
    rng = np.random.default_rng([LOW_PRECISION.index(algorithm), stochastic])
    problem = Problem(algorithm, option_sets(algorithm), matrix_specs(algorithm, stochastic))
    seed = SEED if stochastic else None
    run_steps(problem.build(rng, warm=True), rng, seed=seed, steps=MATRIX_STEPS)


def test_the_matrix_covers_every_combination_with_both_masters_and_roundings() -> None:
    """The premise of the test above: over the algorithms, every (param dtype, state dtype)
    pair meets each master setting under each rounding, and each option set."""
    seen = set()
    for algorithm in LOW_PRECISION:
        for stochastic in (False, True):
            for s in matrix_specs(algorithm, stochastic):
                seen.add((s.dtype, s.state, s.master, stochastic, s.group))
    for dtype, state in storage_combinations("adam"):
        for master in (False, True) if dtype in SIXTEEN else (False,):
            for stochastic in (False, True):
                assert any((dtype, state, master, stochastic, g) in seen for g in (0, 1)), (
                    dtype, state, master, stochastic)  # fmt: skip
        for group in (0, 1):
            assert any(k[:2] == (dtype, state) and k[4] == group for k in seen), (dtype, state)


# -------------------------------------------------------------------------------- grad scale


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize(
    "algorithm", [a for a in LOW_PRECISION if _core.algorithm_info(a)["takes_grad_scale"]]
)
def test_grad_scale_writes_16_bit_grads_back_rounded_to_nearest(algorithm, stochastic) -> None:
    """The unscaled grads are written back to the 16-bit grads rounded to nearest (under
    stochastic rounding too); an infinite grad and a NaN one included."""
    specs = [
        Spec(PARTIAL, BF16, BF16, master=True),
        Spec(PARTIAL, F16, F16),
        Spec(3, F16, F32, master=True),
        Spec(300, BF16, INT8),
        Spec(300, F16, INT8, master=True),
        Spec(PARTIAL, F32, F32),
        Spec(3, F64, F64),
    ]

    def hostile(t: int, grads: list[Any]) -> None:
        for g in grads:
            g[1] = float("inf")
            if g.numel() > 100:
                g[2] = -float("inf")
                g[100] = float("nan")
                g[101] = 65504.0 if g.dtype == F16 else 1e30

    rng = np.random.default_rng(2)
    problem = Problem(algorithm, option_sets(algorithm), specs).build(rng, warm=True)
    seed = SEED if stochastic else None
    cpus, device = run_steps(problem, rng, GRAD_SCALE, seed, hostile)
    assert not torch.isfinite(device.params[0].float()).all()  # the inf went through
    # The premise, without the CPU: each grad is written back as its unscaled value rounded to
    # nearest (NumPy's and ml_dtypes' rounding of the float32 quotient), whatever the rounding
    # of the rest.
    grads = problem.new_grads(rng)
    hostile(0, grads)
    given = [host(g).copy() for g in grads]
    problem.device_step(device, grads, 8, GRAD_SCALE, seed)
    for i, (before, after) in enumerate(zip(given, grads)):
        wide = np.float64 if before.dtype == np.float64 else np.float32
        unscaled = (before.astype(wide) / wide(GRAD_SCALE)).astype(before.dtype)
        assert np.array_equal(unscaled.view(np.uint8), host(after).view(np.uint8)), (
            f"grads[{i}] ({specs[i]}) written back: not the unscaled grad rounded to nearest"
        )


# --------------------------------------------------------------------- 8-bit: hostile values

HOSTILE_ALGORITHMS = {
    "adam": dict(lr=0.01, amsgrad=True),  # signed and unsigned maps, three states
    "adagrad": dict(lr=0.1),  # one unsigned state that only grows
    "lion": dict(lr=0.01),  # one signed state
}


def hostile_grads(t: int, grads: list[Any]) -> None:
    """Per 256-element block of each grad: block 1 zeros (with zero state: a block of zeros,
    absmax 0, each 0 / 0 a NaN, which takes code 0), block 3 NaN (a state block that becomes
    NaN: its absmax leaves NaN out), +inf and -inf in block 5 (its absmax infinite: the finite
    values code as 0, inf / inf as NaN), one NaN in block 6, block 7 huge (squares overflow to
    infinity), the last, partial block tiny (squares underflow; zero in float16)."""
    for g in grads:
        blocks = -(-g.numel() // QUANT_BLOCK)
        cut = [slice(b * QUANT_BLOCK, (b + 1) * QUANT_BLOCK) for b in range(blocks)]
        g[cut[1]] = 0
        if blocks > 3:
            g[cut[3]] = float("nan")
        if blocks > 7:
            g[5 * QUANT_BLOCK + 7] = float("inf")
            g[5 * QUANT_BLOCK + 9] = -float("inf")
            g[6 * QUANT_BLOCK + 1] = float("nan")
            g[cut[7]] = 1e30
        g[cut[-1]] *= 1e-30 if g.dtype != F16 else 0.0


@pytest.mark.parametrize("algorithm", list(HOSTILE_ALGORITHMS))
def test_8_bit_states_with_hostile_values_match_the_cpu(algorithm) -> None:
    specs = [
        Spec(PARTIAL, BF16, INT8, master=True),
        Spec(300, F16, INT8),
        Spec(2 * QUANT_BLOCK + 3, F32, INT8),
    ]
    rng = np.random.default_rng(3)
    problem = Problem(
        algorithm, [native_options(algorithm, **HOSTILE_ALGORITHMS[algorithm])], specs
    )
    problem.build(rng, warm=False)
    cpus, device = run_steps(problem, rng, edit_grads=hostile_grads)
    # The premises: a block of zeros (absmax 0), one of NaN state (absmax 0 too: NaN left out),
    # and an infinite absmax, are there.
    scales = device.absmax[0][0]
    assert scales[1] == 0 and scales[3] == 0, scales[:4]
    assert any(torch.isinf(a[0]).any() for a in device.absmax if a[0] is not None)


# ---------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_bits_depend_on_seed_and_step_and_match_the_cpu() -> None:
    """From the same buffers and grads, seed 1 and seed 2, and step 1 and step 2 (Lion reads no
    t: only the rounding's key differs), round the same float32 values (the masters agree) to
    other 16-bit params and states somewhere; each is the CPU's, bit for bit."""
    specs = [
        Spec(PARTIAL, BF16, BF16, master=True),
        Spec(PARTIAL, F16, F16, master=True),
        Spec(PARTIAL, F32, BF16),
    ]
    rng = np.random.default_rng(4)
    problem = Problem("lion", [native_options("lion", lr=1e-3)], specs).build(rng, warm=True)
    grads = problem.new_grads(rng)
    results = {}
    for seed, t in [(1, 1), (2, 1), (1, 2), (None, 1)]:
        device, cpu = problem.start.clone(), problem.start.clone()
        problem.device_step(device, [g.clone() for g in grads], t, seed=seed)
        problem.cpu_step(cpu, [g.clone() for g in grads], t, seed=seed)
        assert_same_buffers(problem, cpu, device, f"with seed {seed} at t={t}")
        results[seed, t] = device
    for other in [(2, 1), (1, 2), (None, 1)]:
        a, b = results[1, 1], results[other]
        for i in range(len(specs)):
            sides = ("seed 1 at t=1", "seed {} at t={}".format(*other))
            if a.masters[i] is not None:
                assert_same_bits(a.masters[i], b.masters[i], f"masters[{i}]", sides)
            if specs[i].dtype in SIXTEEN:
                assert not torch.equal(bits(a.params[i]), bits(b.params[i])), (i, other)
            else:  # a float32 param is not rounded
                assert_same_bits(a.params[i], b.params[i], f"params[{i}]", sides)
            assert not torch.equal(bits(a.states[0][i]), bits(b.states[0][i])), (i, other)


# ---------------------------------------------------------------------------------- refusals


def refusal_case(
    name: str,
) -> tuple[str, list[Spec], Callable[[Problem, Buffers], None], int | None]:
    """(algorithm, specs, how the buffers are spoiled, seed) of a refused step: the first
    tensors are valid (a step that ran part way would change them). REFUSALS[name] matches the
    reason both sides give."""
    valid = [Spec(PARTIAL, BF16, BF16, master=True), Spec(300, F16, INT8), Spec(3, F32, F32)]
    seed = None

    def nothing(p: Problem, b: Buffers) -> None:
        pass

    spoil = nothing
    if name == "master for a float32 param":
        specs = [*valid, Spec(5, F32, F32, master=True)]
    elif name == "uint8 state without absmax":
        specs = [*valid, Spec(300, BF16, INT8)]

        def spoil(p: Problem, b: Buffers) -> None:
            b.absmax[1][-1] = None

    elif name in ("absmax too short", "absmax too long"):
        specs = [*valid, Spec(300, BF16, INT8)]
        length = 1 if name == "absmax too short" else 3

        def spoil(p: Problem, b: Buffers) -> None:
            b.absmax[0][-1] = torch.zeros(length)

    elif name == "bfloat16 grad for a float16 param":
        specs = [*valid, Spec(5, F16, F16)]
    elif name in ("stochastic rounding, float32 only", "stochastic rounding, 8-bit only"):
        state = F32 if name.endswith("float32 only") else INT8
        specs = [Spec(300, F32, state), Spec(3, F64, F64)]
        seed = 1
    elif name == "8-bit state for rprop":
        return "rprop", [valid[0], valid[2], Spec(300, BF16, INT8)], nothing, seed
    else:
        raise AssertionError(name)
    return "nadam", specs, spoil, seed


REFUSALS = {
    "master for a float32 param": r"masters\[3\] is given but params\[3\] has dtype float32",
    "uint8 state without absmax": r"exp_avg_sqs?\[3\] is 8-bit .*absmax\[3\].* is not given",
    "absmax too short": r"exp_avgs?_absmax\[3\] must be float32 with 2 values",
    "absmax too long": r"exp_avgs?_absmax\[3\] must be float32 with 2 values",
    "bfloat16 grad for a float16 param": r"grads\[3\] has dtype bfloat16 but params\[3\] has",
    "stochastic rounding, float32 only": r"stochastic_rounding: nothing is stored in 16 bits",
    "stochastic rounding, 8-bit only": r"stochastic_rounding: nothing is stored in 16 bits",
    "8-bit state for rprop": r"params\[2\] are 8-bit, which rprop does not take",
}


def spec_buffers(problem: Problem, rng: np.random.Generator) -> Buffers:
    """The buffers of ``problem.specs``, a master given where a spec asks for one even for a
    float32 param (which the step must refuse)."""
    problem.build(rng, warm=True)
    b = problem.start
    b.masters = [p.float() if s.master else None for s, p in zip(problem.specs, b.params)]
    return b


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_raise_the_cpu_s_exception_and_write_nothing(case) -> None:
    algorithm, specs, spoil, seed = refusal_case(case)
    rng = np.random.default_rng(5)
    problem = Problem(algorithm, option_sets(algorithm)[:1], specs)
    start = spec_buffers(problem, rng)
    spoil(problem, start)
    grads = problem.new_grads(rng)
    if case == "bfloat16 grad for a float16 param":
        grads[-1] = grads[-1].to(BF16)
    raised = {}
    for side in ("cpu", "device"):
        b, g = start.clone(), [x.clone() for x in grads]
        before = snapshot(problem, b, g)
        step = problem.cpu_step if side == "cpu" else problem.device_step
        with pytest.raises((TypeError, ValueError), match=REFUSALS[case]) as error:
            step(b, g, 1, seed=seed)
        raised[side] = error
        after = snapshot(problem, b, g)
        for name in before:
            what = f"{side}: {name} after the refusal"
            assert_same_bits(before[name], after[name], what, ("before", "after"))
    assert raised["device"].type is raised["cpu"].type, (
        f"the CPU raised {raised['cpu'].type.__name__}: {raised['cpu'].value}; the emulated "
        f"CUDA {raised['device'].type.__name__}: {raised['device'].value}"
    )


LAMB_STORAGE = {
    "bfloat16": [Spec(PARTIAL, BF16, BF16)],
    "float16 with a master": [Spec(3, F16, F32, master=True), Spec(CHUNK + 5, F16, F16)],
    "float32 with bfloat16 state": [Spec(3, F32, F32), Spec(PARTIAL, F32, BF16)],
    "8-bit state": [Spec(3, F64, F64), Spec(PARTIAL, F32, INT8), Spec(PARTIAL, BF16, INT8, True)],
    "8-bit state over chunks, two groups": [
        Spec(CHUNK + 300, BF16, INT8, True),
        Spec(PARTIAL, F32, BF16, group=1),
        Spec(5, F32, F32),
    ],
    "float32 and a bfloat16 param": [Spec(PARTIAL, F32, F32), Spec(3, BF16, F32)],
}


def ulps(x: Any) -> np.ndarray:
    """The unit in the last place of each value in its own dtype, in float64."""
    values = x.double().abs().numpy()
    mantissa = {BF16: 7, F16: 10, F32: 23, F64: 52}[x.dtype]
    smallest = {BF16: -126, F16: -14, F32: -126, F64: -1022}[x.dtype]
    exponent = np.maximum(np.floor(np.log2(np.where(values > 0, values, 1.0))), smallest)
    return 2.0 ** (exponent - mantissa)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("case", list(LAMB_STORAGE))
def test_lamb_with_low_precision_matches_the_cpu_up_to_its_sum_order(case, stochastic) -> None:
    """LAMB over 16-bit and 8-bit storage and masters on the GPU (the tables' two passes): its
    moments advanced, stored and read back as the CPU's, bit for bit (8-bit codes and scales,
    stochastic roundings included); its params and masters moved by a trust ratio whose sums add
    in the GPU's order (test_cuda_emulated.py's LambCheck: the step size to 2^-22 of itself, so
    the moves so far to 2^-20 over the steps here), within that and 2 units in their last place
    (the roundings of nearby values), few 16-bit ones differing at all. Each step mixes these
    tensors with float32 and float64 ones (the plain kinds' passes)."""
    rng = np.random.default_rng(6)
    groups = [native_options("lamb", "keras", lr=0.01, weight_decay=0.01),
              native_options("lamb", "keras", lr=0.02, beta1=0.5)]  # fmt: skip
    problem = Problem("lamb", groups, LAMB_STORAGE[case]).build(rng, warm=True)
    seed = SEED if stochastic else None
    device = problem.start.clone()
    cpus = {isa: problem.start.clone() for isa in ISAS}
    last = {k: v.double() for k, v in problem.start.named(problem.names()).items()}
    moves = {k: torch.zeros_like(v) for k, v in last.items()}
    for t in STEPS:
        grads = problem.new_grads(rng)
        problem.device_step(device, [g.clone() for g in grads], t, None, seed)
        for isa, cpu in cpus.items():
            with cpu_isa(isa):
                problem.cpu_step(cpu, [g.clone() for g in grads], t, None, seed)
        expected, actual = cpus[ISAS[0]].named(problem.names()), device.named(problem.names())
        for isa, cpu in cpus.items():  # the CPU's ISAs agree bit for bit
            for name, e in cpu.named(problem.names()).items():
                assert_same_bits(expected[name], e, f"lamb {name} at t={t}", (ISAS[0], isa))
        for name, e in expected.items():
            what = f"lamb {name} after the step at t={t}"
            if not name.startswith(("params", "masters")):
                assert_same_bits(e, actual[name], what)
                continue
            moves[name] += (e.double() - last[name]).abs()
            last[name] = e.double()
            error = (actual[name].double() - e.double()).abs().numpy()
            bound = 2 * ulps(e) + 2.0**-20 * moves[name].numpy()
            assert np.all(error <= bound), f"{what}: {(error / bound).max():.3g} times the bound"
            if e.dtype in SIXTEEN:  # a move of about its ulp: the bound alone cannot tell
                assert np.count_nonzero(error) <= max(2, e.numel() // 100), f"{what}: widely"
    for start, now in zip(problem.start.params, device.params):
        assert not torch.equal(bits(start), bits(now)), "a param did not move"
