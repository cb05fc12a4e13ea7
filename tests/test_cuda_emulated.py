"""The CUDA kernels, run on the CPU by ``fusedopt._cuda_emulated``, against the CPU backend.

The CUDA backend (``csrc/cuda/kernels.cu``, ``multi_tensor.cuh``, ``launch_plan.cpp`` and the
bindings ``csrc/python/cuda_bindings.cpp``) has never run on a GPU, and ``tests/test_cuda.py``'s
GPU tests skip without one. ``fusedopt._cuda_emulated`` is that very source, kernels and
bindings, compiled by the host compiler with CUDA emulated (``csrc/cuda/emulation.h``): a
launch runs its blocks one after another and a block's threads in sequence (LAMB's reducing
kernels on threads of their own that meet at ``__syncthreads``), on host memory. So every
machine runs the kernels' indexing, chunking, 16-byte vector loads and their tails, the guarded
path of misaligned tensors, the launch plan's batches (more than 256 tensors, a tensor
continuing into the next launch, the limit of 4 coefficient sets), the grads written back under
a grad scale, and the bindings' validation, and this module checks their results against the
CPU backend:

- every algorithm but LAMB bit for bit (params, states, grads, per-tensor scalars compared as
  bytes), over float32 and float64, several option sets each, 3 steps with new grads;
- LAMB's states bit for bit and its params within a tolerance derived below
  (``LambCheck``): its per-tensor sums add in another order on the GPU than on the CPU
  (docs/spec.md section 21; kernels.cu), which moves the trust ratio by rounding;
- hostile buffers refused with a TypeError or ValueError naming them, nothing written.

What it cannot check is the GPU's own arithmetic and memory model: the emulation rounds with the
host's instructions (a GPU's NaN has another bit pattern, for one) and runs threads in order.
The CAI dicts built here keep no reference to their arrays: every array is held by a list for
as long as a step reads it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

from conftest import DTYPES, checksum, native_options
from fusedopt import _core, _engine

emulated = pytest.importorskip(
    "fusedopt._cuda_emulated",
    reason="fusedopt._cuda_emulated was not built (CMake option FUSEDOPT_CUDA_EMULATION=OFF, "
    "or an older build): the CUDA kernels cannot run without a GPU",
)

LIMITS = _core._cuda_plan_limits
CHUNK = LIMITS["chunk_elements"]
VECTOR_BYTES = LIMITS["vector_bytes"]
ALGORITHMS = _core.algorithms()
ELEMENTWISE = [a for a in ALGORITHMS if a != "lamb"]  # LAMB: LambCheck
# Step counts of the three steps: the third jumps to t = 7, where RAdam's variance is rectified
# (rho_t > 5) and every bias correction differs from the first steps'.
STEPS = (1, 2, 7)
AWKWARD_SIZES = [0, 1, 3, 4, 5, 17, 33, 4097, CHUNK + 3]  # tails of 0-3 after the 16-byte vectors
LAMB_SIZES = [0, 1, 5, CHUNK + 3]  # each block of LAMB starts 512 threads: few blocks


# Option sets per algorithm: every field at a non-default value somewhere (see
# test_option_sets_cover_every_algorithm_and_field), both conventions where offered.
OPTION_SETS: dict[str, list[dict[str, Any]]] = {
    "sgd": [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
        dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, convention="keras"),
        dict(lr=0.05, momentum=0.5, maximize=True, convention="keras"),
    ],
    "adagrad": [
        dict(lr=0.1, lr_decay=0.01, weight_decay=0.01),
        dict(lr=0.1, initial_accumulator_value=0.1, eps=1e-6, maximize=True),
        dict(
            lr=0.1, initial_accumulator_value=0.1, eps=1e-7, weight_decay=0.01, convention="keras"
        ),
    ],
    "rmsprop": [
        dict(lr=0.01, alpha=0.9, eps=1e-6),
        dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
        dict(lr=0.01, momentum=0.5, maximize=True),
        dict(lr=0.01, centered=True, maximize=True, weight_decay=0.1),
        dict(lr=0.01, momentum=0.5, centered=True, convention="keras"),
        dict(lr=0.005, alpha=0.8, weight_decay=0.01, convention="keras"),
    ],
    "adam": [
        dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01),
        dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True, amsgrad=True),
        dict(lr=0.01, amsgrad=True, maximize=True),
        dict(lr=0.01, weight_decay=0.004, amsgrad=True, convention="keras"),
        dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True, convention="keras"),
    ],
    "adadelta": [
        dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.01, maximize=True),
        dict(lr=1.0),
        dict(lr=0.5, weight_decay=0.01, convention="keras"),
    ],
    "adamax": [
        dict(lr=0.01, beta1=0.3, beta2=0.9, weight_decay=0.01),
        dict(lr=0.01, eps=1e-6, maximize=True, weight_decay=0.1),
        dict(lr=0.01, eps=1e-3, convention="keras"),
    ],
    "nadam": [
        dict(lr=0.01, momentum_decay=0.5, decoupled_weight_decay=True, weight_decay=0.1),
        dict(
            lr=0.01,
            beta1=0.8,
            beta2=0.99,
            eps=1e-6,
            weight_decay=0.1,
            maximize=True,
            float32_scalars=False,
        ),  # fmt: skip
        dict(lr=0.01, momentum_decay=1.0, convention="keras"),
    ],
    "radam": [
        dict(lr=0.01, beta2=0.9, weight_decay=0.01),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        dict(lr=0.01, beta1=0.5, eps=1e-6),
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
        dict(lr=0.01),
    ],
    "lion": [
        dict(lr=0.01, beta1=0.3, beta2=0.9, weight_decay=0.1),
        dict(lr=0.01, maximize=True),
        dict(lr=0.01, weight_decay=0.1, convention="keras"),
    ],
    "lamb": [
        dict(lr=0.01, weight_decay=0.01, convention="keras"),
        dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, convention="keras"),
    ],
}


def option_values(algorithm: str, index: int) -> tuple[float, ...]:
    return native_options(algorithm, **OPTION_SETS[algorithm][index])


def matrix(algorithms: list[str]) -> list[Any]:
    return [
        pytest.param(a, i, dtype, id=f"{a}{i}-{np.dtype(dtype).name}")
        for a in algorithms
        for i in range(len(OPTION_SETS[a]))
        for dtype in DTYPES
    ]


# ------------------------------------------------------------------------------------ memory


def empty_placed(shape: tuple[int, ...], dtype: Any, offset: int = 0) -> np.ndarray:
    """An array at ``offset`` bytes past a 16-byte boundary (the plan vectorizes a tensor only
    when every one of its pointers is on one)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 2 * VECTOR_BYTES, np.uint8)
    start = (-raw.ctypes.data) % VECTOR_BYTES + offset
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def placed(values: np.ndarray, offset: int = 0) -> np.ndarray:
    """A copy of ``values`` at ``offset`` bytes past a 16-byte boundary."""
    out = empty_placed(values.shape, values.dtype, offset)
    out[...] = values
    return out


def twin(values: np.ndarray | None) -> np.ndarray | None:
    """A copy at the same offset from a 16-byte boundary: the CPU's and the emulation's
    arrays take the same kernel paths."""
    return None if values is None else placed(values, values.ctypes.data % VECTOR_BYTES)


def interface(array: np.ndarray | None, **changes: Any) -> dict[str, Any] | None:
    """The CUDA Array Interface of a host array (the emulation's device memory is the host's).
    It holds no reference: the caller keeps ``array`` alive."""
    if array is None:
        return None
    cai = {
        "data": (array.ctypes.data, False),
        "shape": array.shape,
        "typestr": array.dtype.str,
        "strides": None,
        "version": 3,
    }
    cai.update(changes)
    return cai


def interfaces(arrays: list[np.ndarray | None] | None) -> list[Any] | None:
    return None if arrays is None else [interface(a) for a in arrays]


# ------------------------------------------------------------------------------------ a step

# (tensor index, operand: "param", "grad" or a state's name) -> bytes past a 16-byte boundary
Offsets = Callable[[int, str], int]


def aligned(i: int, operand: str) -> int:
    return 0


@dataclass
class Problem:
    """One side's buffers of a sequence of steps, with what both sides share."""

    algorithm: str
    groups: list[tuple[float, ...]]
    group_of: np.ndarray
    params: list[np.ndarray]
    states: list[list[np.ndarray | None] | None]  # one list per state, None when no tensor has it
    scalars: np.ndarray | None
    offsets: Offsets

    def copy(self) -> Problem:
        return replace(
            self,
            params=[twin(p) for p in self.params],
            states=[None if s is None else [twin(x) for x in s] for s in self.states],
            scalars=None if self.scalars is None else self.scalars.copy(),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        named = {f"params[{i}]": p for i, p in enumerate(self.params)}
        description = _engine.describe(self.algorithm)
        for name, states in zip(description.states, self.states):
            for i, s in enumerate(states or []):
                if s is not None:
                    named[f"{name}[{i}]"] = s
        if self.scalars is not None:
            named["scalars"] = self.scalars
        return named


def new_problem(
    algorithm: str,
    groups: list[tuple[float, ...]],
    sizes: list[int],
    dtypes: list[Any],
    rng: np.random.Generator,
    group_of: list[int] | None = None,
    offsets: Offsets = aligned,
    unused_state_given: bool = False,
) -> Problem:
    """Params from ``rng``; each state its options use, at its initial value, None where a
    tensor's options use none (a list of only None is None). ``unused_state_given``: the first
    tensor whose options do not use a state is given one all the same (the step must drop it)."""
    description = _engine.describe(algorithm)
    n = len(sizes)
    groups_of = np.asarray(group_of if group_of is not None else [0] * n, np.int64)
    params = []
    for i, (s, d) in enumerate(zip(sizes, dtypes)):
        params.append(rng.standard_normal(dtype=d, out=empty_placed((s,), d, offsets(i, "param"))))
    states: list[list[np.ndarray | None] | None] = []
    given_unused = not unused_state_given
    for k, name in enumerate(description.states):
        entries: list[np.ndarray | None] = []
        for i, (s, d) in enumerate(zip(sizes, dtypes)):
            values = groups[groups_of[i]]
            used = _core.states_used(algorithm, values) >> k & 1
            if not used and given_unused:
                entries.append(None)
                continue
            given_unused = given_unused or not used
            state = empty_placed((s,), d, offsets(i, name))
            state.fill(_core.initial_values(algorithm, values)[0][k])
            entries.append(state)
        states.append(None if all(e is None for e in entries) else entries)
    scalars = None
    if description.scalars:
        scalars = np.zeros((n, _core.max_scalars))
        for i in range(n):
            start = _core.initial_values(algorithm, groups[groups_of[i]])[1]
            scalars[i, : len(start)] = start
    return Problem(algorithm, groups, groups_of, params, states, scalars, offsets)


def fill_grads(grads: list[np.ndarray], rng: np.random.Generator) -> None:
    """New normal grads, every 7th element exactly 0 (the sign of 0: Rprop, Lion)."""
    for g in grads:
        rng.standard_normal(dtype=g.dtype, out=g)
        g.reshape(-1)[::7] = 0


def step_both(
    cpu: Problem,
    device: Problem,
    cpu_grads: list[np.ndarray],
    device_grads: list[np.ndarray],
    steps: np.ndarray,
    new_state: list[bool] | None,
    grad_scale: float | None,
) -> None:
    """One step on each side, each on its own grads (a grad scale writes them back)."""
    _core.step(cpu.algorithm, cpu.groups, cpu.group_of, steps, cpu.params, cpu_grads,
               cpu.states, new_state, cpu.scalars, grad_scale)  # fmt: skip
    emulated.step(
        device.algorithm, device.groups, device.group_of, steps, interfaces(device.params),
        interfaces(device_grads), [interfaces(s) for s in device.states], new_state=new_state,
        scalars=device.scalars, grad_scale=grad_scale, stream=0,
    )  # fmt: skip


def assert_same_bits(expected: np.ndarray, actual: np.ndarray, what: str) -> None:
    """Equal bytes (compared as unsigned integers of the elements' width): NaN payloads and
    the sign of zero included."""
    assert expected.shape == actual.shape and expected.dtype == actual.dtype, what
    as_int = np.dtype(f"u{expected.dtype.itemsize}")
    if np.array_equal(expected.view(as_int), actual.view(as_int)):
        return
    differ = np.flatnonzero(expected.view(as_int) != actual.view(as_int))
    first = differ[0]
    raise AssertionError(
        f"{what}: {differ.size} of {expected.size} elements differ from the CPU's; the first at "
        f"{first}: CPU {expected.reshape(-1)[first]!r}, emulated CUDA {actual.reshape(-1)[first]!r}"
    )


def run_steps(
    cpu: Problem,
    rng: np.random.Generator,
    step_counts: Callable[[int], np.ndarray] | None = None,
    steps: tuple[int, ...] = STEPS,
    grad_scale: float | None = None,
    edit_grads: Callable[[list[np.ndarray]], None] | None = None,
    check: Callable[[Problem, Problem, str], None] | None = None,
) -> tuple[Problem, Problem]:
    """Steps ``cpu`` and an emulated twin of it through ``steps`` with the same new grads, and
    compares everything after each step (``check``: bit for bit by default). ``step_counts(t)``:
    each tensor's t at the step numbered t (t for all by default)."""
    device = cpu.copy()
    samples = [p.reshape(-1)[::97].copy() for p in cpu.params]  # enough to tell that it moved
    n = len(cpu.params)
    uses_new_state = _engine.describe(cpu.algorithm).uses_new_state
    cpu_grads = [empty_placed(p.shape, p.dtype, cpu.offsets(i, "grad"))
                 for i, p in enumerate(cpu.params)]  # fmt: skip
    device_grads = [twin(g) for g in cpu_grads]
    for t in steps:
        counts = step_counts(t) if step_counts else np.full(n, t, np.int64)
        new_state = [bool(c == 1) for c in counts] if uses_new_state else None
        fill_grads(cpu_grads, rng)
        if edit_grads:
            edit_grads(cpu_grads)
        for g_cpu, g_device in zip(cpu_grads, device_grads):
            g_device[...] = g_cpu
        step_both(cpu, device, cpu_grads, device_grads, counts, new_state, grad_scale)
        when = f"after the step at t={t}"
        for i, (g_cpu, g_device) in enumerate(zip(cpu_grads, device_grads)):
            assert_same_bits(g_cpu, g_device, f"grads[{i}] {when}")
        (check or check_bits)(cpu, device, when)
    moved = [
        not np.array_equal(a, p.reshape(-1)[::97]) for a, p in zip(samples, cpu.params) if a.size
    ]  # a pair of no-ops would agree too
    assert not moved or any(moved), "the CPU moved no param: the comparison proves nothing"
    return cpu, device


def check_bits(cpu: Problem, device: Problem, when: str) -> None:
    expected, actual = cpu.arrays(), device.arrays()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert_same_bits(expected[name], actual[name], f"{name} {when}")


def plan_of(problem: Problem, ids: list[int] | None = None) -> list[dict[str, Any]]:
    """The launch plan of ``problem``'s tensors at their addresses (the premises of a test),
    with grads where run_steps places them (fake addresses: the plan reads none)."""
    addresses = []
    for i, p in enumerate(problem.params):
        states = [(s[i] if s is not None else None) for s in problem.states]
        used = _core.states_used(problem.algorithm, problem.groups[problem.group_of[i]])
        grad = (1 << 44) + (i << 32) + problem.offsets(i, "grad")
        operands = [p.ctypes.data, grad]
        operands += [s.ctypes.data if s is not None and used >> k & 1 else 0
                     for k, s in enumerate(states)]  # fmt: skip
        addresses.append(operands + [0] * (2 + _core.max_states - len(operands)))
    sizes = [p.size for p in problem.params]
    widths = [p.dtype.itemsize for p in problem.params]
    return _core._cuda_launch_plan(sizes, addresses, widths, ids or [0] * len(sizes))


# ------------------------------------------------------------------------- every algorithm


def test_option_sets_cover_every_algorithm_and_field() -> None:
    """Each algorithm has option sets, each valid, and each field (its convention too, where
    both are offered) takes a value other than its default in one of them."""
    assert OPTION_SETS.keys() == set(ALGORITHMS)
    for algorithm, sets in OPTION_SETS.items():
        description = _engine.describe(algorithm)
        values = [option_values(algorithm, i) for i in range(len(sets))]
        for v in values:
            assert _core.check_options(algorithm, v) is None, (algorithm, v)
        for k, field in enumerate(description.fields):
            if field.kind == "convention":
                convention = "keras" if field.default == 0 else "torch"
                other = native_options(algorithm, convention, check=False)
                if _core.check_options(algorithm, other) is not None:
                    continue  # one convention offered
            assert any(v[k] != field.default for v in values), f"{algorithm}.{field.name}"


@pytest.mark.parametrize("algorithm, index, dtype", matrix(ELEMENTWISE))
def test_every_algorithm_matches_the_cpu_bit_for_bit(algorithm: str, index: int, dtype) -> None:
    rng = np.random.default_rng(index)
    cpu = new_problem(algorithm, [option_values(algorithm, index)], AWKWARD_SIZES,
                      [dtype] * len(AWKWARD_SIZES), rng)  # fmt: skip
    run_steps(cpu, rng)


# ----------------------------------------------------------------------------------- LAMB


# LAMB's trust ratio ||param|| / ||u|| comes from per-tensor sums of squares in double, added in
# another order by the GPU's threads, block tree and chunks than by the CPU's lanes and blocks.
# The moments do not depend on them (bit for bit); a param's move, step_size * u with step_size =
# ratio * lr, does. Sums of n positive terms in any two orders agree to 2 (n - 1) units of double
# rounding, so the step size to about 2 n 2^-53 of itself (lamb_rel: the square roots halve the
# sums' error, the quotient adds both). In float32 the step size is then rounded to float32, to
# the same value or one ulp (2^-23) apart, and so is its product with u: 2^-22 of the move. Each
# step rounds the new param (and the decay the carried difference) to within an ulp: over the 3
# steps, LAMB_ULPS of its ulp. The bound is on the sum of the param's moves so far.
LAMB_ULPS = 6


def lamb_rel(dtype: Any, size: int) -> float:
    rounding = 2.0**-22 if np.dtype(dtype) == np.float32 else 2.0**-52
    return 2 * size * 2.0**-53 + rounding


class LambCheck:
    """LAMB's states bit for bit, its params within the bound above, after each step."""

    def __init__(self, params: list[np.ndarray]) -> None:
        self.last = [p.astype(np.float64) for p in params]
        self.moves = [np.zeros(p.shape) for p in params]
        self.worst = 0.0  # the largest error seen, as a fraction of its bound

    def __call__(self, cpu: Problem, device: Problem, when: str) -> None:
        for k, states in enumerate(cpu.states):
            for i, s in enumerate(states or []):
                assert_same_bits(s, device.states[k][i], f"state {k} of params[{i}] {when}")
        for i, (expected, actual) in enumerate(zip(cpu.params, device.params)):
            now = expected.astype(np.float64)
            self.moves[i] += np.abs(now - self.last[i])
            self.last[i] = now
            bound = lamb_rel(expected.dtype, expected.size) * self.moves[i]
            bound += LAMB_ULPS * np.spacing(np.abs(expected)).astype(np.float64)
            error = np.abs(actual.astype(np.float64) - now)
            assert np.all(error <= bound), (
                f"params[{i}] {when}: |emulated - CPU| up to {error.max():.3g}, "
                f"{(error / bound).max():.3g} times the bound"
            )
            if error.size:
                self.worst = max(self.worst, float((error / bound).max()))


@pytest.mark.parametrize("algorithm, index, dtype", matrix(["lamb"]))
def test_lamb_matches_the_cpu_up_to_its_sum_order(algorithm: str, index: int, dtype) -> None:
    rng = np.random.default_rng(index)
    cpu = new_problem(algorithm, [option_values(algorithm, index)], LAMB_SIZES,
                      [dtype] * len(LAMB_SIZES), rng)  # fmt: skip
    run_steps(cpu, rng, check=LambCheck(cpu.params))


# ---------------------------------------------------------------------------- launch layouts


def richest(algorithm: str) -> int:
    """The option set whose options use the most states (momentum, amsgrad, centered)."""
    used = [
        bin(_core.states_used(algorithm, option_values(algorithm, i))).count("1")
        for i in range(len(OPTION_SETS[algorithm]))
    ]
    return used.index(max(used))


def runs(keys: list[Any]) -> list[int]:
    """The coefficient id of each tensor: one per run of equal (group, step, new state)."""
    ids = [0]
    for previous, key in itertools.pairwise(keys):
        ids.append(ids[-1] + (key != previous))
    return ids


def one_element_in(dtypes: list[Any]) -> Offsets:
    """Every operand of every tensor one element past a 16-byte boundary: the slices one
    element into larger arrays."""
    return lambda i, operand: np.dtype(dtypes[i]).itemsize


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("algorithm", ELEMENTWISE)
def test_one_tensor_per_dtype_takes_the_flat_kernel(algorithm: str, misaligned: bool) -> None:
    """A dtype with a single non-empty tensor takes the flat kernel (kernels.cu launch_step):
    here a float32 one of 4 chunks and a float64 one of 3, beside empty ones, in one step."""
    sizes, dtypes = [3 * CHUNK + 5, 0, 0, 2 * CHUNK + 1], [np.float32, np.float32, np.float64,
                                                          np.float64]  # fmt: skip
    offsets = one_element_in(dtypes) if misaligned else aligned
    rng = np.random.default_rng(1)
    cpu = new_problem(algorithm, [option_values(algorithm, richest(algorithm))], sizes, dtypes,
                      rng, offsets=offsets)  # fmt: skip
    for dtype in (np.float32, np.float64):
        assert sum(p.size > 0 for p in cpu.params if p.dtype == dtype) == 1
    run_steps(cpu, rng)


def many_tensors(rng: np.random.Generator) -> tuple[list[int], list[Any]]:
    """540 tensors, float32 and float64 in turn (270 of each): small ones (empty to 300
    elements) and, among them, some of one to three chunks and more."""
    sizes = [int(s) for s in rng.integers(0, 300, 540)]
    for i, size in zip(range(5, 540, 97), [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7, 3 * CHUNK]):
        sizes[i] = size
    sizes[::50] = [0] * len(sizes[::50])
    return sizes, [np.float32, np.float64] * (len(sizes) // 2)


@pytest.mark.parametrize("algorithm", ELEMENTWISE)
def test_more_than_256_tensors_take_several_launches(algorithm: str) -> None:
    """float32 and float64 tensors mixed in one step, more than 256 of each: several launches
    of each dtype, their tensors in consecutive slots of the launches' metadata."""
    rng = np.random.default_rng(2)
    sizes, dtypes = many_tensors(rng)
    cpu = new_problem(algorithm, [option_values(algorithm, richest(algorithm))], sizes, dtypes,
                      rng)  # fmt: skip
    plan = plan_of(cpu)
    widths = [batch["element_bytes"] for batch in plan]
    assert widths.count(4) >= 2 and widths.count(8) >= 2, widths
    assert max(len(batch["tensor_index"]) for batch in plan) == LIMITS["max_tensors"]
    run_steps(cpu, rng)


def test_a_tensor_continues_into_the_next_launch() -> None:
    """A tensor whose chunks do not fit in a launch's 1024 blocks continues in slot 0 of the
    next one (launch_plan.cpp): SGD with Nesterov momentum and a grad scale, float32, on a
    tensor of 1024 chunks after one of 1 element. Two steps (the second past the momentum
    buffer's creation): 2^26 elements take about 2 GB and most of this module's time."""
    sizes = [1, CHUNK * (LIMITS["max_blocks"] - 1) + 1, 5]
    rng = np.random.default_rng(3)
    values = native_options("sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    cpu = new_problem("sgd", [values], sizes, [np.float32] * 3, rng)
    plan = plan_of(cpu)
    assert [batch["tensor_index"] for batch in plan] == [[0, 1], [1, 2]]
    assert plan[1]["block_chunk"][0] == LIMITS["max_blocks"] - 1
    run_steps(cpu, rng, steps=STEPS[:2], grad_scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ELEMENTWISE)
def test_misaligned_tensors_take_the_guarded_path(algorithm: str, dtype) -> None:
    """Tensors that are slices of larger arrays one element in, and one whose last state alone
    is (or grad, without a state): none vectorized; sizes not multiples of the vector."""
    sizes = [0, 1, 2, 3, 5, 7, 17, 4097, CHUNK + 3, 9]
    values = option_values(algorithm, richest(algorithm))
    description = _engine.describe(algorithm)
    used = [n for k, n in enumerate(description.states) if _core.states_used(algorithm, values)
            >> k & 1]  # fmt: skip
    last = used[-1] if used else "grad"
    width = np.dtype(dtype).itemsize

    def offsets(i: int, operand: str) -> int:
        return width if i < len(sizes) - 1 or operand == last else 0

    rng = np.random.default_rng(4)
    cpu = new_problem(algorithm, [values], sizes, [dtype] * len(sizes), rng, offsets=offsets)
    plan = plan_of(cpu)
    assert [flag for batch in plan for flag in batch["vectorized"]] == [False] * (len(sizes) - 1)
    run_steps(cpu, rng)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_step_of_empty_tensors_matches_the_cpu(algorithm: str) -> None:
    """No launch (every tensor empty); NAdam's and ASGD's scalars advance as on the CPU."""
    rng = np.random.default_rng(5)
    cpu = new_problem(algorithm, [option_values(algorithm, 0)], [0, 0, 0],
                      [np.float32, np.float64, np.float32], rng)  # fmt: skip
    if cpu.scalars is not None:
        cpu.scalars[:, 0] += [0.0, 0.5, 0.25]  # scalars of their own
    run_steps(cpu, rng)


GROUP_SIZES = [5, 17, 1, 0, 4097, 33, CHUNK + 1, 7, 257, 64]
STEP_OFFSETS = [0, 0, 3, 1, 5, 0, 2, 9, 4, 0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_param_groups_and_step_counts_start_new_launches(algorithm: str) -> None:
    """Every option set of the algorithm as a param group, tensors in turn, each with a step
    count of its own: more than 4 coefficient sets, so new launches of a few tensors each. A
    state the tensor's options do not use is None, or given and left as it was (for the first
    such tensor)."""
    groups = [option_values(algorithm, i) for i in range(len(OPTION_SETS[algorithm]))]
    n = len(GROUP_SIZES)
    group_of = [i % len(groups) for i in range(n)]
    rng = np.random.default_rng(6)
    cpu = new_problem(algorithm, groups, GROUP_SIZES, [np.float32] * n, rng, group_of=group_of,
                      unused_state_given=True)  # fmt: skip

    def step_counts(t: int) -> np.ndarray:
        return np.array([t + offset for offset in STEP_OFFSETS], np.int64)

    keys = list(zip(group_of, step_counts(1)))
    ids = runs([key for key, size in zip(keys, GROUP_SIZES) if size])
    plan = plan_of(cpu, runs(keys))
    assert max(ids) + 1 > LIMITS["max_coefficient_sets"] and len(plan) > 1
    unused = []
    for k, states in enumerate(cpu.states):
        for i, state in enumerate(states or []):
            if state is not None and not _core.states_used(algorithm, groups[group_of[i]]) >> k & 1:
                unused.append((k, i, state.copy()))
    check = LambCheck(cpu.params) if algorithm == "lamb" else None
    _, device = run_steps(cpu, rng, step_counts=step_counts, check=check)
    for k, i, before in unused:
        assert_same_bits(before, device.states[k][i], f"unused state {k} of params[{i}]")
        assert_same_bits(before, cpu.states[k][i], f"unused state {k} of params[{i}] (CPU)")


LAMB_LAYOUTS = {
    "misaligned": ([1, 2, 3, 5, 4097, 0], [np.float32] * 3 + [np.float64] * 3, True),
    "mixed dtypes": ([CHUNK + 1, 17, 0, CHUNK + 3, 4, 1], [np.float32, np.float64] * 3, False),
}


@pytest.mark.parametrize("layout", LAMB_LAYOUTS.values(), ids=LAMB_LAYOUTS.keys())
def test_lamb_layouts_match_the_cpu_up_to_its_sum_order(layout: tuple) -> None:
    """LAMB's three launches (every tensor through the plan: no flat kernel) over misaligned
    tensors, and float32 and float64 tensors of several chunks in one step."""
    sizes, dtypes, misaligned = layout
    offsets = one_element_in(dtypes) if misaligned else aligned
    rng = np.random.default_rng(7)
    cpu = new_problem("lamb", [option_values("lamb", 0)], sizes, dtypes, rng, offsets=offsets)
    run_steps(cpu, rng, check=LambCheck(cpu.params))


# ------------------------------------------------------------------------------- grad scale

SCALED = [a for a in ALGORITHMS if _core.algorithm_info(a)["takes_grad_scale"]]
SCALED_LAYOUTS = {
    "flat": ([CHUNK + 9, 0, 33], [np.float32, np.float32, np.float64], False),
    "multi-tensor": (AWKWARD_SIZES * 2, [np.float32] * 9 + [np.float64] * 9, False),
    "misaligned": ([1, 7, 4097, 2], [np.float32, np.float64] * 2, True),
}


@pytest.mark.parametrize("scale", [2.0, 3.0])
@pytest.mark.parametrize("layout", SCALED_LAYOUTS.values(), ids=SCALED_LAYOUTS.keys())
@pytest.mark.parametrize("algorithm", SCALED)
def test_a_grad_scale_writes_the_unscaled_grads_back(algorithm: str, layout, scale) -> None:
    """The grads divided by the scale (2: a power of two, 3: not) are written back, by every
    kernel path; an inf, a -inf and a NaN grad among them."""
    sizes, dtypes, misaligned = layout
    offsets = one_element_in(dtypes) if misaligned else aligned
    rng = np.random.default_rng(8)
    cpu = new_problem(algorithm, [option_values(algorithm, richest(algorithm))], sizes, dtypes,
                      rng, offsets=offsets)  # fmt: skip

    def poison(grads: list[np.ndarray]) -> None:
        target = next(g for g in grads if g.size >= 4)
        target[1:4] = [np.inf, -np.inf, np.nan]

    run_steps(cpu, rng, grad_scale=scale, edit_grads=poison)


# ------------------------------------------------------------------------------- validation


def nadam_buffers() -> dict[str, Any]:
    """Two tensors of NAdam (mu_product per tensor), every buffer its own array."""
    rng = np.random.default_rng(9)
    shapes = [(4, 4), (3,)]
    made = {
        role: [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for role in ("params", "grads", "exp_avg", "exp_avg_sq")
    }
    made["scalars"] = np.ones((2, _core.max_scalars))
    return made


def with_change(index: int, **changes: Any) -> Callable[[dict, dict], None]:
    """Replaces fields of params[index]'s interface."""

    def change(buffers: dict, cai: dict) -> None:
        cai["params"][index].update(changes)

    return change


def read_only_param(buffers: dict, cai: dict) -> None:
    cai["params"][0]["data"] = (buffers["params"][0].ctypes.data, True)


def overlapping_param(buffers: dict, cai: dict) -> None:
    cai["params"][1]["data"] = (buffers["params"][0].ctypes.data + 4, False)


def short_grad(buffers: dict, cai: dict) -> None:
    cai["grads"][1]["shape"] = (2,)


def state_over_a_grad(buffers: dict, cai: dict) -> None:
    cai["states"][1][1] = interface(buffers["grads"][1])


def host_array_param(buffers: dict, cai: dict) -> None:
    cai["params"][1] = buffers["params"][1]


def missing_state(buffers: dict, cai: dict) -> None:
    cai["states"][0][1] = None


def strided_param(buffers: dict, cai: dict) -> None:
    cai["params"][0].update(shape=(4, 2), strides=(16, 8))


# (how the call is spoiled, the error, what its message says): each names the buffer.
HOSTILE = {
    "read-only param": (read_only_param, ValueError, r"params\[0\] is read-only"),
    "grad of another shape": (short_grad, ValueError, r"grads\[1\] has shape \(2,\)"),
    "param overlapping another": (
        overlapping_param,
        ValueError,
        r"params\[[01]\] overlaps params\[[01]\]",
    ),
    # Refused for its dtype, or, where the CUDA backend takes 16-bit params, for its float32
    # grad: either way naming params[0].
    "float16 param": (with_change(0, typestr="<f2"), TypeError, r"params\[0\]"),
    "int32 param": (with_change(0, typestr="<i4"), TypeError, r"params\[0\] has dtype <i4"),
    "strided param": (strided_param, ValueError, r"params\[0\] is not C-contiguous"),
    "state overlapping a grad": (
        state_over_a_grad,
        ValueError,
        r"exp_avg_sq\[1\] overlaps grads\[1\]|grads\[1\] overlaps exp_avg_sq\[1\]",
    ),
    "host array param": (
        host_array_param,
        TypeError,
        r"params\[1\] must be a __cuda_array_interface__ dict",
    ),
    "missing state": (missing_state, ValueError, r"exp_avg\[1\] is missing"),
    "grad scale": (None, ValueError, r"grad_scale: nadam does not take a grad scale"),
}


def nadam_call(buffers: dict[str, Any], edit: Callable[[dict, dict], None] | None) -> None:
    """The emulated step over ``buffers``, spoiled by ``edit`` (None: with a grad scale)."""
    cai = {
        "params": interfaces(buffers["params"]),
        "grads": interfaces(buffers["grads"]),
        "states": [interfaces(buffers["exp_avg"]), interfaces(buffers["exp_avg_sq"])],
    }
    if edit is not None:
        edit(buffers, cai)
    emulated.step(
        "nadam", [native_options("nadam", lr=0.1)], np.zeros(2, np.int64), np.ones(2, np.int64),
        cai["params"], cai["grads"], cai["states"], new_state=None, scalars=buffers["scalars"],
        grad_scale=2.0 if edit is None else None, stream=0,
    )  # fmt: skip


def all_arrays(buffers: dict[str, Any]) -> list[np.ndarray]:
    return [a for v in buffers.values() for a in (v if isinstance(v, list) else [v])]


def test_the_unspoiled_call_steps() -> None:
    """The call the hostile cases spoil is valid: it moves the params and the scalars."""
    buffers = nadam_buffers()
    before = [a.copy() for a in all_arrays(buffers)]
    nadam_call(buffers, edit=lambda buffers, cai: None)
    changed = [not np.array_equal(a, b) for a, b in zip(before, all_arrays(buffers))]
    assert all(changed[:2]) and changed[-1], "params[0], params[1] and scalars"


@pytest.mark.parametrize("case", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_buffers_are_refused_naming_them_and_nothing_is_written(case: tuple) -> None:
    """The bindings and the core refuse them before any launch or scalar update."""
    edit, error, message = case
    buffers = nadam_buffers()
    before = checksum(*all_arrays(buffers))
    with pytest.raises(error, match=message):
        nadam_call(buffers, edit)
    assert checksum(*all_arrays(buffers)) == before, "a refused step wrote to a buffer or scalar"
