"""Interleaved timing: every candidate of a case runs once per round, in a rotating order, and
reports the median over rounds, so a noisy neighbour on this shared machine slows all of them
alike instead of whichever happened to run at the wrong moment."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# After torch's OpenMP workers finish they spin for a while on the cores; a short pause keeps
# that spin out of the next candidate's timing.
_PAUSE_BETWEEN_CANDIDATES_S = 0.002


@dataclass
class Candidate:
    """One way of doing a case's step.

    ``select`` sets process-wide switches (fusedopt's ISA and thread count, torch's threads)
    before each of its batches. ``prepare`` runs untimed before every step (new grad arrays, as a
    training loop produces); a candidate with one is timed step by step. ``timed``, when given,
    replaces ``step``: it runs a batch of ``count`` steps and returns the seconds per step it
    measured itself (a native program timing its own loop).
    """

    label: str
    step: Callable[[], object]
    select: Callable[[], object] | None = None
    prepare: Callable[[], object] | None = None
    timed: Callable[[int], float] | None = None


@dataclass
class Timing:
    rounds: int
    min_batch_s: float  # a batch of steps lasts at least this long, so timer overhead is noise
    max_batch: int = 100_000


def _run_batch(candidate: Candidate, count: int) -> float:
    """Seconds per step over ``count`` steps."""
    if candidate.select:
        candidate.select()
    if candidate.timed is not None:
        return candidate.timed(count)
    if candidate.prepare is None:
        start = time.perf_counter()
        for _ in range(count):
            candidate.step()
        return (time.perf_counter() - start) / count
    total = 0.0
    for _ in range(count):
        candidate.prepare()
        start = time.perf_counter()
        candidate.step()
        total += time.perf_counter() - start
    return total / count


def measure(candidates: list[Candidate], timing: Timing) -> dict[str, float]:
    """Median seconds per step of every candidate, measured interleaved."""
    batch = {}
    for c in candidates:
        _run_batch(c, 1)  # first step: state allocation, page faults, thread-pool start
        once = _run_batch(c, 1)
        batch[c.label] = max(1, min(timing.max_batch, int(timing.min_batch_s / max(once, 1e-9))))
    samples: dict[str, list[float]] = {c.label: [] for c in candidates}
    for r in range(timing.rounds):
        shift = r % len(candidates)
        for c in candidates[shift:] + candidates[:shift]:
            time.sleep(_PAUSE_BETWEEN_CANDIDATES_S)
            samples[c.label].append(_run_batch(c, batch[c.label]))
    return {label: statistics.median(values) for label, values in samples.items()}


class Progress:
    """One line per case on stderr: how far along, how long so far."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.start = time.perf_counter()

    def case(self, name: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        print(f"[{self.done:3d}/{self.total}] {elapsed:6.1f}s  {name}", file=sys.stderr, flush=True)
