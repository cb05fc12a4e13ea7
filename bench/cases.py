"""The cases of the suite and the plan (sizes, rounds) each mode runs them with."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import fusedopt
from bench.algorithms import (
    ALGORITHMS,
    LAMB,
    GradSource,
    Workload,
    best_isa,
    ceiling_candidates,
    functional_candidate,
    fusedopt_candidates,
    fusedopt_label,
    lamb_candidates,
    lamb_ceiling_bytes,
    lamb_ceiling_candidates,
    numpy_candidate,
    torch_available,
    torch_candidates,
)
from bench.native import plan_step_candidate
from bench.timing import Candidate, Progress, Timing, measure
from bench.torch_front import GPT2_SMALL, Gpt2, run_torch_cases

TORCH_THREADS = 2
QUICK_GPT2_BLOCKS = 2


@dataclass
class Plan:
    """What one mode measures. ``flat`` lists (algorithm, dtype, elements) cases."""

    flat: list[tuple[str, str, int]]
    # Per-step cases, (count, elements each); each total among them also as one flat tensor.
    many_tensors: list[tuple[int, int]]
    lamb: int  # elements of the LAMB case's one float32 tensor
    gpt2: Gpt2  # the shapes of fusedopt.torch's GPT-2 cases
    torch_many: tuple[int, int]  # fusedopt.torch's many-tensor case, against one flat tensor
    deepspeed: bool | str  # whether to try DeepSpeed's CPU Adam, or why not
    ewma_1d: int
    ewma_2d: tuple[int, int]
    contention_rounds: int
    timing: Timing
    large_timing: Timing  # for cases of 1e7 elements and more
    threads: list[int] = field(default_factory=lambda: [1, 2])


def _flat_cases(
    dtypes: list[str], adam_sizes: dict[str, list[int]], algorithm_sizes: list[int]
) -> list[tuple[str, str, int]]:
    cases = []
    for dtype in dtypes:
        cases += [("adam", dtype, n) for n in adam_sizes[dtype]]
        cases += [(a, dtype, n) for n in algorithm_sizes for a in ALGORITHMS if a != "adam"]
        cases += [("adam", dtype, n) for n in algorithm_sizes if n not in adam_sizes[dtype]]
    return cases


def make_plan(mode: str) -> Plan:
    per_step = [(1, 1000), (1, 1_000_000), (1000, 1000), (10_000, 100)]
    if mode == "smoke":
        tiny = Timing(rounds=1, min_batch_s=0.0, max_batch=2)
        return Plan(
            flat=[(a, "float32", 1000) for a in ALGORITHMS] + [("rmsprop", "float64", 1000)],
            many_tensors=[(1, 1000), (10, 100)],
            lamb=1000,
            gpt2=Gpt2(blocks=1, d_model=16, vocab=64, context=32),
            torch_many=(10, 100),
            deepspeed="left out of --smoke",
            ewma_1d=1000,
            ewma_2d=(100, 10),
            contention_rounds=1,
            timing=tiny,
            large_timing=tiny,
        )
    if mode == "quick":
        return Plan(
            flat=_flat_cases(["float32"], {"float32": [1000, 100_000]}, [10_000_000]),
            many_tensors=per_step,
            lamb=10_000_000,
            gpt2=Gpt2(blocks=QUICK_GPT2_BLOCKS),
            torch_many=(10_000, 100),
            deepspeed="left out of --quick (its first use compiles a C++ op for minutes); "
            "the full run tries it",
            ewma_1d=10_000_000,
            ewma_2d=(100_000, 100),
            contention_rounds=3,
            timing=Timing(rounds=5, min_batch_s=0.01),
            large_timing=Timing(rounds=3, min_batch_s=0.0),
        )
    # A 5e7-element float64 Adam needs several GB per candidate: float32 only at that size.
    sizes = [1000, 100_000, 1_000_000, 10_000_000]
    return Plan(
        flat=_flat_cases(
            ["float32", "float64"],
            {"float32": sizes + [50_000_000], "float64": sizes},
            [100_000, 10_000_000],
        ),
        many_tensors=per_step,
        lamb=10_000_000,
        gpt2=GPT2_SMALL,
        torch_many=(10_000, 100),
        deepspeed=True,
        ewma_1d=10_000_000,
        ewma_2d=(100_000, 100),
        contention_rounds=7,
        timing=Timing(rounds=9, min_batch_s=0.02),
        large_timing=Timing(rounds=5, min_batch_s=0.05),
    )


@dataclass
class Result:
    section: str
    case: dict[str, object]
    seconds: dict[str, float]  # median seconds per step, by candidate label
    elements: int


TORCH_CASES = 7  # bench/torch_front.py: four over GPT-2's shapes, flat, many, experts


def count_cases(plan: Plan, with_torch: bool) -> int:
    return len(plan.flat) + len(plan.many_tensors) + 1 + TORCH_CASES * with_torch + 2 + 1


def run_flat(plan: Plan, progress: Progress, with_torch: bool) -> list[Result]:
    results = []
    for name, dtype, n in plan.flat:
        progress.case(f"{name} {dtype} {n:.0e} elements")
        algorithm = ALGORITHMS[name]
        w = Workload([(n,)], np.dtype(dtype).type)
        isas = fusedopt.available_isas()
        candidates = fusedopt_candidates(algorithm, w, isas, plan.threads, None)
        candidates.append(numpy_candidate(algorithm, w, None))
        if with_torch:
            candidates += torch_candidates(algorithm, w, TORCH_THREADS, None)
        candidates += ceiling_candidates(algorithm, w, plan.threads)
        timing = plan.large_timing if n >= 10_000_000 else plan.timing
        seconds = measure(candidates, timing)
        results.append(Result("flat", {"algorithm": name, "dtype": dtype, "n": n}, seconds, n))
        del w, candidates
    return results


def run_many_tensors(plan: Plan, progress: Progress, with_torch: bool) -> list[Result]:
    """The per-step cost of Adam float32, new grad arrays every step: the optimizer class, the
    functional API, the C ABI's plan step timed in C, NumPy and torch, for one tensor and for
    many tensors of the same total."""
    results = []
    algorithm = ALGORITHMS["adam"]
    most = max(plan.threads)
    for count, size in plan.many_tensors:
        progress.case(f"per step: adam float32 {count} tensors x {size}")
        w = Workload([(size,)] * count, np.float32)
        grads = GradSource(w)
        candidates = fusedopt_candidates(algorithm, w, [best_isa()], plan.threads, grads)
        candidates.append(functional_candidate(algorithm, w, most, grads))
        native, program, why = plan_step_candidate(count, size, most)
        if native is not None:
            candidates.append(native)
        candidates.append(numpy_candidate(algorithm, w, grads))
        if with_torch:
            candidates += torch_candidates(algorithm, w, TORCH_THREADS, grads)
        try:
            seconds = measure(candidates, plan.timing)
        finally:
            if program is not None:
                program.close()
        case = {"count": count, "size": size, "c_abi_skipped": why}
        results.append(Result("many", case, seconds, w.num_elements))
    return results


def run_lamb(plan: Plan, progress: Progress) -> list[Result]:
    """LAMB float32, one tensor: fusedopt.keras_numpy.Lamb, the functional lamb_, NumPy and the
    two-pass ceiling (bench/algorithms.py)."""
    n = plan.lamb
    progress.case(f"lamb float32 {n:.0e} elements vs its two-pass ceiling")
    w = Workload([(n,)], np.float32)
    candidates = lamb_candidates(w, plan.threads)
    candidates.append(numpy_candidate(LAMB, w, None))
    candidates += lamb_ceiling_candidates(w, plan.threads)
    timing = plan.large_timing if n >= 10_000_000 else plan.timing
    seconds = measure(candidates, timing)
    lamb_bytes, ceiling_bytes = lamb_ceiling_bytes(w)
    case = {"n": n, "lamb_bytes": lamb_bytes, "ceiling_bytes": ceiling_bytes}
    return [Result("lamb", case, seconds, n)]


def run_torch(plan: Plan, progress: Progress) -> list[Result]:
    cases = run_torch_cases(
        plan.gpt2,
        plan.torch_many,
        TORCH_THREADS,
        plan.large_timing,
        plan.timing,
        plan.deepspeed,
        progress.case,
    )
    return [
        Result(
            "torch",
            {"key": c.key, "label": c.label, "tensors": c.tensors, "skipped": c.skipped},
            c.seconds,
            c.elements,
        )
        for c in cases
    ]


def run_ewma(plan: Plan, progress: Progress) -> list[Result]:
    import pandas as pd

    results = []
    rng = np.random.default_rng(1)
    alpha = 0.05
    for shape in [(plan.ewma_1d,), plan.ewma_2d]:
        progress.case(f"ewma {' x '.join(str(s) for s in shape)} vs pandas")
        x = rng.standard_normal(shape)
        frame_type = pd.Series if len(shape) == 1 else pd.DataFrame

        def with_pandas(x=x, frame_type=frame_type) -> np.ndarray:
            return frame_type(x).ewm(alpha=alpha).mean().to_numpy()

        candidates = [
            Candidate(
                f"fusedopt {n}t",
                lambda x=x: fusedopt.ewma(x, alpha=alpha, axis=0),
                lambda n=n: (fusedopt.set_cpu_isa(best_isa()), fusedopt.set_num_threads(n)),
            )
            for n in plan.threads
        ]
        candidates.append(Candidate("pandas", with_pandas))
        seconds = measure(candidates, plan.large_timing)
        results.append(Result("ewma", {"shape": shape}, seconds, x.size))
    return results


def _busy_core() -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.2)  # let it reach its loop
    return process


def run_contention(plan: Plan, progress: Progress, with_torch: bool) -> list[Result]:
    """One 1e3-element Adam step at 2 threads with the machine idle and with another process
    keeping one core busy, alternating round by round."""
    progress.case("contention: adam float32 1e3, idle vs one core busy")
    algorithm = ALGORITHMS["adam"]
    w = Workload([(1000,)], np.float32)
    candidates = fusedopt_candidates(algorithm, w, [best_isa()], [2], None)
    if with_torch:
        torch_all = torch_candidates(algorithm, w, 2, None)
        candidates += [c for c in torch_all if c.label == "torch fused"]
    one_round = Timing(rounds=1, min_batch_s=plan.timing.min_batch_s)
    samples: dict[str, list[float]] = {}
    for _ in range(plan.contention_rounds):
        for condition in ("idle", "loaded"):
            busy = _busy_core() if condition == "loaded" else None
            try:
                for label, s in measure(candidates, one_round).items():
                    samples.setdefault(f"{label} {condition}", []).append(s)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    seconds = {label: float(np.median(v)) for label, v in samples.items()}
    labels = [c.label for c in candidates]
    return [Result("contention", {"labels": labels}, seconds, w.num_elements)]


def run_all(plan: Plan) -> list[Result]:
    with_torch = torch_available()
    if not with_torch:
        print("torch is not installed: its columns are left out", file=sys.stderr)
    progress = Progress(count_cases(plan, with_torch))
    results = run_flat(plan, progress, with_torch)
    results += run_many_tensors(plan, progress, with_torch)
    results += run_lamb(plan, progress)
    if with_torch:
        results += run_torch(plan, progress)
    results += run_ewma(plan, progress)
    results += run_contention(plan, progress, with_torch)
    fusedopt.set_cpu_isa(best_isa())
    return results


def default_threads_label() -> str:
    return fusedopt_label(best_isa(), 2)
