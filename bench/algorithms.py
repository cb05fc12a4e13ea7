"""The algorithms under test and every way of running one step of them: fusedopt through its
Python optimizer API, NumPy written as a user would write it, torch.optim in its three modes, and
the bandwidth ceiling that moves the same bytes with no arithmetic. LAMB, whose step is two
passes, has its own candidates and ceiling at the end."""

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
NumpyStates = Callable[[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class Algorithm:
    name: str
    fusedopt_class: str  # in fusedopt (PyTorch convention)
    torch_class: str  # in torch.optim; "" where torch has no such optimizer (Lion)
    options: dict[str, Any]  # the same hyperparameters for both
    num_states: int  # buffers besides param and grad: the ceiling streams as many
    numpy_step: NumpyStep = field(compare=False)
    # The NumPy version's state for one param: num_states zero buffers unless given (then also
    # any per-tensor scalars, as small arrays after the buffers).
    numpy_states: NumpyStates | None = field(default=None, compare=False)


LR, MOMENTUM, ALPHA, EPS, BETA1, BETA2, WEIGHT_DECAY = 1e-3, 0.9, 0.99, 1e-8, 0.9, 0.999, 1e-2
ADAGRAD_EPS = 1e-10


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
    p -= LR * g / (np.sqrt(total) + ADAGRAD_EPS)


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


# The algorithms added with the generic core, at torch's defaults (Lion: lion-pytorch's).
ADADELTA_LR, RHO, ADADELTA_EPS = 1.0, 0.9, 1e-6
ADAMAX_LR = NADAM_LR = 2e-3
MOMENTUM_DECAY = 4e-3
RPROP_LR, ETA_MINUS, ETA_PLUS, STEP_SIZE_MIN, STEP_SIZE_MAX = 1e-2, 0.5, 1.2, 1e-6, 50.0
ASGD_LR, LAMBD, ASGD_ALPHA, T0 = 1e-2, 1e-4, 0.75, 1e6
LION_LR, LION_BETA2 = 1e-4, 0.99


def _numpy_adadelta(p, g, s, t):
    square_avg, acc_delta = s
    square_avg *= RHO
    square_avg += (1 - RHO) * g * g
    delta = np.sqrt(acc_delta + ADADELTA_EPS) / np.sqrt(square_avg + ADADELTA_EPS) * g
    acc_delta *= RHO
    acc_delta += (1 - RHO) * delta * delta
    p -= ADADELTA_LR * delta


def _numpy_adamax(p, g, s, t):
    m, u = s
    m *= BETA1
    m += (1 - BETA1) * g
    np.maximum(BETA2 * u, np.abs(g) + EPS, out=u)
    p -= (ADAMAX_LR / (1 - BETA1**t)) * m / u


def _nadam_momentum(t):
    return BETA1 * (1 - 0.5 * 0.96 ** (t * MOMENTUM_DECAY))


def _numpy_nadam(p, g, s, t):
    m, v, mu_product = s
    mu, mu_next = _nadam_momentum(t), _nadam_momentum(t + 1)
    mu_product *= mu
    product = float(mu_product[0])
    m *= BETA1
    m += (1 - BETA1) * g
    v *= BETA2
    v += (1 - BETA2) * g * g
    denominator = np.sqrt(v / (1 - BETA2**t)) + EPS
    p -= NADAM_LR * (1 - mu) / (1 - product) * g / denominator
    p -= NADAM_LR * mu_next / (1 - product * mu_next) * m / denominator


def _numpy_radam(p, g, s, t):
    m, v = s
    m *= BETA1
    m += (1 - BETA1) * g
    v *= BETA2
    v += (1 - BETA2) * g * g
    bias_correction1, bias_correction2 = 1 - BETA1**t, 1 - BETA2**t
    rho_infinity = 2 / (1 - BETA2) - 1
    rho_t = rho_infinity - 2 * t * BETA2**t / bias_correction2
    if rho_t > 5:
        rectification = math.sqrt(
            (rho_t - 4)
            * (rho_t - 2)
            * rho_infinity
            / ((rho_infinity - 4) * (rho_infinity - 2) * rho_t)
        )
        adaptive = math.sqrt(bias_correction2) / (np.sqrt(v) + EPS)
        p -= LR * m / bias_correction1 * rectification * adaptive
    else:
        p -= LR * m / bias_correction1


def _numpy_rprop(p, g, s, t):
    prev, step_size = s
    sign = np.sign(g * prev)
    factor = np.ones_like(step_size)
    factor[sign > 0] = ETA_PLUS
    factor[sign < 0] = ETA_MINUS
    step_size *= factor
    np.clip(step_size, STEP_SIZE_MIN, STEP_SIZE_MAX, out=step_size)
    g = np.where(sign < 0, 0, g)
    p -= np.sign(g) * step_size
    prev[...] = g


def _numpy_asgd(p, g, s, t):
    ax, scalars = s  # scalars: eta, mu of the previous step
    eta, mu = float(scalars[0]), float(scalars[1])
    p *= 1 - LAMBD * eta
    p -= eta * g
    if mu != 1:
        ax += (p - ax) * mu
    else:
        ax[...] = p
    scalars[0] = ASGD_LR / (1 + LAMBD * ASGD_LR * t) ** ASGD_ALPHA
    scalars[1] = 1 / max(1, t - T0)


def _numpy_lion(p, g, s, t):
    (m,) = s
    p -= LION_LR * np.sign(BETA1 * m + (1 - BETA1) * g)
    m *= LION_BETA2
    m += (1 - LION_BETA2) * g


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
        Algorithm(
            "adagrad", "Adagrad", "Adagrad", {"lr": LR, "eps": ADAGRAD_EPS}, 1, _numpy_adagrad
        ),
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
        Algorithm("adadelta", "Adadelta", "Adadelta", {"lr": ADADELTA_LR}, 2, _numpy_adadelta),
        Algorithm("adamax", "Adamax", "Adamax", {"lr": ADAMAX_LR}, 2, _numpy_adamax),
        Algorithm(
            "nadam",
            "NAdam",
            "NAdam",
            {"lr": NADAM_LR},
            2,
            _numpy_nadam,
            lambda p: [np.zeros_like(p), np.zeros_like(p), np.ones(1)],
        ),
        Algorithm("radam", "RAdam", "RAdam", {"lr": LR}, 2, _numpy_radam),
        Algorithm(
            "rprop",
            "Rprop",
            "Rprop",
            {"lr": RPROP_LR},
            2,
            _numpy_rprop,
            lambda p: [np.zeros_like(p), np.full_like(p, RPROP_LR)],
        ),
        Algorithm(
            "asgd",
            "ASGD",
            "ASGD",
            {"lr": ASGD_LR},
            1,
            _numpy_asgd,
            lambda p: [np.zeros_like(p), np.array([ASGD_LR, 1.0])],
        ),
        Algorithm("lion", "Lion", "", {"lr": LION_LR}, 1, _numpy_lion),
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


def functional_candidate(
    algorithm: Algorithm, w: Workload, threads: int, grads: GradSource | None
) -> Candidate:
    """``fusedopt.functional.<name>_`` over state the caller holds (the same lists every call, as
    a training loop keeps them), the step number counted here. Adam only: the other algorithms'
    functional steps take their own spellings."""
    import fusedopt.functional

    assert algorithm.name == "adam", "the functional candidate spells Adam's arguments"
    params = w.param_copies()
    exp_avgs = [np.zeros_like(p) for p in params]
    exp_avg_sqs = [np.zeros_like(p) for p in params]
    step_count = [0]
    adam_ = fusedopt.functional.adam_
    lr = algorithm.options["lr"]

    def step() -> None:
        step_count[0] += 1
        current = grads.current if grads else w.grads
        adam_(params, current, exp_avgs, exp_avg_sqs, step=step_count[0], lr=lr)

    return Candidate(
        f"fusedopt functional {threads}t",
        step,
        _select_fusedopt(best_isa(), threads),
        grads.renew if grads else None,
    )


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


def numpy_states(algorithm: Algorithm, param: np.ndarray) -> list[np.ndarray]:
    if algorithm.numpy_states is not None:
        return algorithm.numpy_states(param)
    return [np.zeros_like(param) for _ in range(algorithm.num_states)]


def numpy_candidate(algorithm: Algorithm, w: Workload, grads: GradSource | None) -> Candidate:
    params = w.param_copies()
    states = [numpy_states(algorithm, p) for p in params]
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
    candidates: list[Candidate] = []
    if not algorithm.torch_class:
        return candidates
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


# ------------------------------------------------------------------------------------------------
# LAMB (Keras' convention, its only one): a step is two passes over memory (csrc/math/lamb.h,
# run_step in csrc/core/step.h). The first reads param, grad, m and v and writes m and v (and sums
# ||param||^2 and ||u||^2 per tensor); the host turns the sums into the trust ratio; the second
# reads param, m and v and writes param.

LAMB_LR, LAMB_EPS = 1e-3, 1e-7  # keras.optimizers.Lamb's defaults


def _numpy_lamb(p, g, s, t):
    m, v = s
    m += (g - m) * (1 - BETA1)
    v += (g * g - v) * (1 - BETA2)
    update = (m / (1 - BETA1**t)) / (np.sqrt(v / (1 - BETA2**t)) + LAMB_EPS)
    param_norm, update_norm = np.linalg.norm(p), np.linalg.norm(update)
    ratio = param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
    p -= LAMB_LR * ratio * update


LAMB = Algorithm("lamb", "", "", {}, 2, _numpy_lamb)


def lamb_candidates(w: Workload, threads: list[int]) -> list[Candidate]:
    """``fusedopt.keras_numpy.Lamb`` at each thread count (one optimizer, as
    fusedopt_candidates) and ``fusedopt.functional.lamb_`` at the most threads."""
    import fusedopt.functional
    import fusedopt.keras_numpy

    variables = w.param_copies()
    optimizer = fusedopt.keras_numpy.Lamb(learning_rate=LAMB_LR)
    candidates = [
        Candidate(
            fusedopt_label(best_isa(), n),
            lambda: optimizer.apply(w.grads, variables),
            _select_fusedopt(best_isa(), n),
        )
        for n in threads
    ]
    params = w.param_copies()
    exp_avgs = [np.zeros_like(p) for p in params]
    exp_avg_sqs = [np.zeros_like(p) for p in params]
    step_count = [0]

    def functional_step() -> None:
        step_count[0] += 1
        fusedopt.functional.lamb_(
            params, w.grads, exp_avgs, exp_avg_sqs, step=step_count[0], lr=LAMB_LR
        )

    candidates.append(
        Candidate(
            f"fusedopt functional {max(threads)}t",
            functional_step,
            _select_fusedopt(best_isa(), max(threads)),
        )
    )
    return candidates


def lamb_ceiling_candidates(w: Workload, threads: list[int]) -> list[Candidate]:
    """LAMB's two-pass ceiling: ``stream_add`` over LAMB's own four buffers per tensor, as two
    fork/joins, ``m += g, v += g`` (reads m, g, v, writes m, v) then ``p += m, v += m`` (reads p,
    m, v, writes p, v): 40 bytes per float32 element, as LAMB's 24 and 16, over the same
    buffers. Every line written is also read, so neither adds write-allocate traffic."""
    params = w.param_copies()
    exp_avgs = [np.zeros_like(p) for p in params]
    exp_avg_sqs = [np.zeros_like(p) for p in params]

    def step() -> None:
        _core.stream_add(exp_avgs, w.grads, [exp_avg_sqs])
        _core.stream_add(params, exp_avgs, [exp_avg_sqs])

    return [
        Candidate(f"two-pass ceiling {n}t", step, _select_fusedopt(best_isa(), n)) for n in threads
    ]


def lamb_ceiling_bytes(w: Workload) -> tuple[int, int]:
    """(bytes LAMB moves per step, bytes its ceiling moves), float32 or float64: 10 values per
    element for each. LAMB's first pass reads param, grad, m, v and writes m, v; its second
    reads param, m, v and writes param. The ceiling's passes read m, g, v and write m, v, then
    read p, m, v and write p, v."""
    item = np.dtype(w.dtype).itemsize
    lamb = sum((6 + 4) * p.size for p in w.params) * item
    ceiling = sum((5 + 5) * p.size for p in w.params) * item
    return lamb, ceiling
