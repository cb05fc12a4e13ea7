"""The algorithms under test and every way of running one step of them: fusedopt through its
Python optimizer API, NumPy written as a user would write it, torch.optim in its three modes, and
the bandwidth ceiling that moves the same bytes with no arithmetic."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import fusedopt
from bench.timing import Candidate
from fusedopt import _core

NumpyStep = Callable[[np.ndarray, np.ndarray, list[np.ndarray], int], None]


@dataclass(frozen=True)
class Algorithm:
    name: str
    fusedopt_class: str  # in fusedopt (PyTorch convention)
    torch_class: str  # in torch.optim
    options: dict[str, Any]  # the same hyperparameters for both
    num_states: int  # buffers besides param and grad: the ceiling streams as many
    numpy_step: NumpyStep = field(compare=False)


LR, MOMENTUM, ALPHA, EPS, BETA1, BETA2, WEIGHT_DECAY = 1e-3, 0.9, 0.99, 1e-8, 0.9, 0.999, 1e-2


# NumPy as a user would write each update: in-place where it is natural, temporaries elsewhere.
def _numpy_sgd(p, g, s, t):
    p -= LR * g


def _numpy_momentum(p, g, s, t):
    (buf,) = s
    buf *= MOMENTUM
    buf += g
    p -= LR * buf


def _numpy_nesterov(p, g, s, t):
    (buf,) = s
    buf *= MOMENTUM
    buf += g
    p -= LR * (g + MOMENTUM * buf)


def _numpy_adagrad(p, g, s, t):
    (total,) = s
    total += g * g
    p -= LR * g / (np.sqrt(total) + EPS)


def _numpy_rmsprop(p, g, s, t):
    (square_avg,) = s
    square_avg *= ALPHA
    square_avg += (1 - ALPHA) * g * g
    p -= LR * g / (np.sqrt(square_avg) + EPS)


def _numpy_rmsprop_centered(p, g, s, t):
    square_avg, grad_avg = s
    square_avg *= ALPHA
    square_avg += (1 - ALPHA) * g * g
    grad_avg *= ALPHA
    grad_avg += (1 - ALPHA) * g
    p -= LR * g / (np.sqrt(square_avg - grad_avg * grad_avg) + EPS)


def _adam_update(p, g, m, v, second_moment, t):
    bias_correction1 = 1 - BETA1**t
    bias_correction2_sqrt = math.sqrt(1 - BETA2**t)
    p -= (LR / bias_correction1) * m / (np.sqrt(second_moment) / bias_correction2_sqrt + EPS)


def _numpy_adam(p, g, s, t):
    m, v = s
    m *= BETA1
    m += (1 - BETA1) * g
    v *= BETA2
    v += (1 - BETA2) * g * g
    _adam_update(p, g, m, v, v, t)


def _numpy_adamw(p, g, s, t):
    p *= 1 - LR * WEIGHT_DECAY
    _numpy_adam(p, g, s, t)


def _numpy_amsgrad(p, g, s, t):
    m, v, v_max = s
    m *= BETA1
    m += (1 - BETA1) * g
    v *= BETA2
    v += (1 - BETA2) * g * g
    np.maximum(v_max, v, out=v_max)
    _adam_update(p, g, m, v, v_max, t)


ALGORITHMS = {
    a.name: a
    for a in [
        Algorithm("sgd", "SGD", "SGD", {"lr": LR}, 0, _numpy_sgd),
        Algorithm("momentum", "SGD", "SGD", {"lr": LR, "momentum": MOMENTUM}, 1, _numpy_momentum),
        Algorithm(
            "nesterov",
            "SGD",
            "SGD",
            {"lr": LR, "momentum": MOMENTUM, "nesterov": True},
            1,
            _numpy_nesterov,
        ),
        Algorithm("adagrad", "Adagrad", "Adagrad", {"lr": LR, "eps": 1e-10}, 1, _numpy_adagrad),
        Algorithm("rmsprop", "RMSprop", "RMSprop", {"lr": LR, "alpha": ALPHA}, 1, _numpy_rmsprop),
        Algorithm(
            "rmsprop_centered",
            "RMSprop",
            "RMSprop",
            {"lr": LR, "alpha": ALPHA, "centered": True},
            2,
            _numpy_rmsprop_centered,
        ),
        Algorithm("adam", "Adam", "Adam", {"lr": LR}, 2, _numpy_adam),
        Algorithm(
            "adamw", "AdamW", "AdamW", {"lr": LR, "weight_decay": WEIGHT_DECAY}, 2, _numpy_adamw
        ),
        Algorithm("amsgrad", "Adam", "Adam", {"lr": LR, "amsgrad": True}, 3, _numpy_amsgrad),
    ]
}


def best_isa() -> str:
    """The ISA fusedopt picks on its own here (the detected best), read once at import."""
    return _DEFAULT_ISA


_DEFAULT_ISA = fusedopt.cpu_isa()


def fusedopt_label(isa: str, threads: int) -> str:
    return f"fusedopt {isa} {threads}t"


def _select_fusedopt(isa: str, threads: int) -> Callable[[], None]:
    def select() -> None:
        fusedopt.set_cpu_isa(isa)
        fusedopt.set_num_threads(threads)

    return select


class Workload:
    """A case's arrays: one or more tensors, a grad for each, made once and shared read-only by
    every candidate; each candidate gets its own copy of the params (and its own state)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: type, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.params = [rng.standard_normal(s).astype(dtype) for s in shapes]
        self.grads = [(1e-2 * rng.standard_normal(s)).astype(dtype) for s in shapes]
        self.num_elements = sum(p.size for p in self.params)

    def param_copies(self) -> list[np.ndarray]:
        return [p.copy() for p in self.params]


class GradSource:
    """New grad arrays before every step, as a training loop hands them over."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.current = workload.grads

    def renew(self) -> None:
        self.current = [g.copy() for g in self.workload.grads]


def fusedopt_candidates(
    algorithm: Algorithm, w: Workload, isas: list[str], threads: list[int], grads: GradSource | None
) -> list[Candidate]:
    """One optimizer shared by every (ISA, threads): they update the same buffers in turn, which
    keeps a 5e7-element case within memory and changes nothing about the time of a step."""
    optimizer = getattr(fusedopt, algorithm.fusedopt_class)(w.param_copies(), **algorithm.options)
    if grads is None:
        step = lambda: optimizer.step(w.grads)  # noqa: E731
    else:
        step = lambda: optimizer.step(grads.current)  # noqa: E731
    return [
        Candidate(
            fusedopt_label(isa, n),
            step,
            _select_fusedopt(isa, n),
            grads.renew if grads else None,
        )
        for isa in isas
        for n in threads
    ]


def ceiling_candidates(algorithm: Algorithm, w: Workload, threads: list[int]) -> list[Candidate]:
    """``p += g`` and ``s += g`` for each of the algorithm's states: exactly its bytes."""
    params = w.param_copies()
    states = [[np.zeros_like(p) for p in params] for _ in range(algorithm.num_states)]
    return [
        Candidate(
            f"ceiling {n}t",
            lambda: _core.stream_add(params, w.grads, states),
            _select_fusedopt(best_isa(), n),
        )
        for n in threads
    ]


def numpy_candidate(algorithm: Algorithm, w: Workload, grads: GradSource | None) -> Candidate:
    params = w.param_copies()
    states = [[np.zeros_like(p) for _ in range(algorithm.num_states)] for p in params]
    step_count = [0]

    def step() -> None:
        step_count[0] += 1
        current = grads.current if grads else w.grads
        for p, g, s in zip(params, current, states):
            algorithm.numpy_step(p, g, s, step_count[0])

    return Candidate("numpy", step, None, grads.renew if grads else None)


def torch_modes() -> list[str]:
    return ["torch for-loop", "torch foreach", "torch fused"]


def torch_candidates(
    algorithm: Algorithm, w: Workload, threads: int, grads: GradSource | None
) -> list[Candidate]:
    """torch.optim with foreach=False, foreach=True and fused=True (where torch has it), at
    ``threads`` intra-op threads, over tensors sharing memory with NumPy copies."""
    import torch

    def select() -> None:
        torch.set_num_threads(threads)

    kwargs = {
        "torch for-loop": {"foreach": False},
        "torch foreach": {"foreach": True},
        "torch fused": {"fused": True},
    }
    candidates = []
    for label in torch_modes():
        params = [torch.from_numpy(p) for p in w.param_copies()]
        try:
            optimizer = getattr(torch.optim, algorithm.torch_class)(
                params, **algorithm.options, **kwargs[label]
            )
        except (TypeError, RuntimeError, ValueError):
            continue  # e.g. RMSprop has no fused kernel
        for p, g in zip(params, w.grads):
            p.grad = torch.from_numpy(g)

        if grads is None:
            prepare = None
        else:

            def prepare(params=params) -> None:
                grads.renew()
                for p, g in zip(params, grads.current):
                    p.grad = torch.from_numpy(g)

        candidates.append(Candidate(label, optimizer.step, select, prepare))
    return candidates


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
