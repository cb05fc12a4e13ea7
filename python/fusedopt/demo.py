"""`python -m fusedopt demo`: every optimizer on three 2-D loss surfaces and a small MLP.

Nothing is downloaded: the surfaces are formulas and the MLP's data is generated from a fixed seed.
Each optimizer updates NumPy parameter arrays in place. The demo prints a table (final loss, steps
to reach a target loss, time per optimizer step) and, when matplotlib is installed, draws the
optimizers' paths on the surfaces and the MLP's loss curves into a PNG.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import DTypeLike

import fusedopt
import fusedopt.keras_numpy

Arrays = list[np.ndarray]
Step = Callable[[Arrays], None]
"""Applies one update to the parameters an optimizer was built on, given their gradients."""

FULL_STEPS = 2000
QUICK_STEPS = 150


@dataclass(frozen=True)
class OptimizerSetup:
    name: str
    family: str
    """Its key in `Problem.learning_rates`; the optimizers of one family share a rate."""
    build: Callable[[Arrays, float], Step]


class KerasOptimizer(Protocol):
    def apply(self, grads: Arrays, params: Arrays) -> object: ...


def keras_step(optimizer: KerasOptimizer, params: Arrays) -> Step:
    return lambda grads: optimizer.apply(grads, params)


OPTIMIZERS = (
    OptimizerSetup("SGD", "sgd", lambda params, lr: fusedopt.SGD(params, lr=lr).step),
    OptimizerSetup(
        "SGD(momentum)",
        "momentum",
        lambda params, lr: fusedopt.SGD(params, lr=lr, momentum=0.9).step,
    ),
    OptimizerSetup(
        "SGD(nesterov)",
        "momentum",
        lambda params, lr: fusedopt.SGD(params, lr=lr, momentum=0.9, nesterov=True).step,
    ),
    OptimizerSetup("Adagrad", "adagrad", lambda params, lr: fusedopt.Adagrad(params, lr=lr).step),
    OptimizerSetup("RMSprop", "rmsprop", lambda params, lr: fusedopt.RMSprop(params, lr=lr).step),
    OptimizerSetup("Adam", "adam", lambda params, lr: fusedopt.Adam(params, lr=lr).step),
    OptimizerSetup("AdamW", "adam", lambda params, lr: fusedopt.AdamW(params, lr=lr).step),
    OptimizerSetup(
        "keras.Adam",
        "adam",
        lambda params, lr: keras_step(fusedopt.keras_numpy.Adam(learning_rate=lr), params),
    ),
    OptimizerSetup(
        "keras.RMSprop",
        "rmsprop",
        lambda params, lr: keras_step(fusedopt.keras_numpy.RMSprop(learning_rate=lr), params),
    ),
)


@dataclass(frozen=True)
class Surface:
    loss: Callable[[np.ndarray, np.ndarray], np.ndarray]
    """The loss on (x, y) grids, for the contour plot."""
    view: tuple[float, float, float, float]
    """The window to draw: x_min, x_max, y_min, y_max."""


@dataclass(frozen=True)
class Problem:
    name: str
    description: str
    target: float
    """A run reaches the target at the first step whose loss is at or below it."""
    learning_rates: Mapping[str, float]
    """One per optimizer family ("sgd", "momentum", "adagrad", "rmsprop", "adam"), each picked
    from a grid of 1e-4 to 1 as one that does well on this problem, clear of divergence."""
    initial_params: Callable[[], Arrays]
    loss_and_grads: Callable[[Arrays], tuple[float, Arrays]]
    surface: Surface | None = None
    """How to draw a 2-D problem; None for the others."""


def surface_problem(
    name: str,
    description: str,
    loss: Callable[[np.ndarray, np.ndarray], np.ndarray],
    gradient: Callable[[float, float], tuple[float, float]],
    start: tuple[float, float],
    target: float,
    learning_rates: Mapping[str, float],
    view: tuple[float, float, float, float],
) -> Problem:
    """A 2-D loss surface whose parameter is one float64 array holding the point (x, y)."""

    def loss_and_grads(params: Arrays) -> tuple[float, Arrays]:
        x, y = (float(value) for value in params[0])
        return float(loss(x, y)), [np.array(gradient(x, y))]

    return Problem(
        name=name,
        description=f"{description}; from ({start[0]:g}, {start[1]:g})",
        target=target,
        learning_rates=learning_rates,
        initial_params=lambda: [np.array(start, dtype=np.float64)],
        loss_and_grads=loss_and_grads,
        surface=Surface(loss, view),
    )


# Gradient descent leaves the saddle at (0, 0) only as fast as the tiny y grows (by 1 + lr per
# step); methods that divide by the gradient's scale leave at once.
SADDLE = surface_problem(
    "saddle",
    "x^2 + y^4/4 - y^2/2: a saddle at (0, 0), minima -0.25 at (0, +-1)",
    lambda x, y: x**2 + y**4 / 4 - y**2 / 2,
    lambda x, y: (2 * x, y**3 - y),
    start=(1.5, 1e-4),
    target=-0.249,
    learning_rates={"sgd": 0.1, "momentum": 0.02, "adagrad": 0.5, "rmsprop": 0.02, "adam": 0.05},
    view=(-1.0, 2.0, -1.5, 1.5),
)

# Rosenbrock's valley: curvature across it is ~1000x that along it, so the stable step of
# gradient descent is tiny along the valley floor.
RAVINE = surface_problem(
    "ravine",
    "Rosenbrock (1 - x)^2 + 100 (y - x^2)^2: a curved ravine, minimum 0 at (1, 1)",
    lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2,
    lambda x, y: (-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)),
    start=(-1.2, 1.0),
    target=1e-3,
    learning_rates={"sgd": 2e-3, "momentum": 1e-3, "adagrad": 0.5, "rmsprop": 5e-3, "adam": 0.05},
    view=(-2.0, 2.0, -1.0, 3.0),
)

# The tilt 0.3 x makes the left well the global one; starting on the right, an optimizer must
# carry enough speed over the barrier at x ~ 0.08 (loss 1.01) to find it.
DOUBLE_WELL = surface_problem(
    "double-well",
    "(x^2 - 1)^2 + 0.3 x + y^2: a local minimum 0.294 at (0.96, 0), the global one -0.305 "
    "at (-1.04, 0)",
    lambda x, y: (x**2 - 1) ** 2 + 0.3 * x + y**2,
    lambda x, y: (4 * x * (x**2 - 1) + 0.3, 2 * y),
    start=(2.0, 1.0),
    target=-0.3,
    learning_rates={"sgd": 0.02, "momentum": 0.01, "adagrad": 0.5, "rmsprop": 0.02, "adam": 0.1},
    view=(-2.0, 2.5, -1.5, 1.5),
)


@dataclass(frozen=True)
class SpiralClassifier:
    """A 2 -> 32 -> 32 -> 1 tanh MLP on two interleaved spirals, full batch, with manual backprop.

    The loss is the mean binary cross-entropy of the logit; every run starts from the same weights.
    """

    inputs: np.ndarray
    labels: np.ndarray
    hidden: int = 32
    seed: int = 0

    @classmethod
    def generate(
        cls, points_per_class: int = 200, dtype: DTypeLike = np.float32, seed: int = 0
    ) -> SpiralClassifier:
        rng = np.random.default_rng(seed)
        angle = 3 * np.pi * np.sqrt(rng.uniform(0.05, 1.0, points_per_class))
        arm = np.stack([angle * np.cos(angle), angle * np.sin(angle)], axis=1) / (3 * np.pi)
        inputs = np.concatenate([arm, -arm]) + rng.normal(0.0, 0.03, (2 * points_per_class, 2))
        labels = np.repeat([0.0, 1.0], points_per_class)
        return cls(inputs.astype(dtype), labels.astype(dtype), seed=seed)

    def initial_params(self) -> Arrays:
        rng = np.random.default_rng(self.seed + 1)
        sizes = [self.inputs.shape[1], self.hidden, self.hidden, 1]
        params = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            params.append(rng.normal(0.0, 1.0 / np.sqrt(fan_in), (fan_in, fan_out)))
            params.append(np.zeros(fan_out))
        return [p.astype(self.inputs.dtype) for p in params]

    def loss_and_grads(self, params: Arrays) -> tuple[float, Arrays]:
        w1, b1, w2, b2, w3, b3 = params
        h1 = np.tanh(self.inputs @ w1 + b1)
        h2 = np.tanh(h1 @ w2 + b2)
        logit = h2 @ w3 + b3
        labels = self.labels[:, None]
        loss = np.mean(np.logaddexp(0, logit) - labels * logit)
        probability = 0.5 * (1 + np.tanh(logit / 2))  # the sigmoid, without overflow
        d_logit = (probability - labels) / len(labels)
        d_h2 = (d_logit @ w3.T) * (1 - h2**2)
        d_h1 = (d_h2 @ w2.T) * (1 - h1**2)
        grads = [
            self.inputs.T @ d_h1,
            d_h1.sum(axis=0),
            h1.T @ d_h2,
            d_h2.sum(axis=0),
            h2.T @ d_logit,
            d_logit.sum(axis=0),
        ]
        return float(loss), grads


def mlp_problem(model: SpiralClassifier) -> Problem:
    return Problem(
        name="mlp-spirals",
        description=(
            f"MLP 2-{model.hidden}-{model.hidden}-1 (tanh, {model.inputs.dtype}): cross-entropy "
            f"on {len(model.labels)} points of two spirals, full batch"
        ),
        target=0.1,
        learning_rates={
            "sgd": 0.5,
            "momentum": 0.05,
            "adagrad": 0.1,
            "rmsprop": 0.01,
            "adam": 0.01,
        },
        initial_params=model.initial_params,
        loss_and_grads=model.loss_and_grads,
    )


PROBLEMS = (SADDLE, RAVINE, DOUBLE_WELL, mlp_problem(SpiralClassifier.generate()))


@dataclass(frozen=True)
class Run:
    problem: Problem
    optimizer: OptimizerSetup
    learning_rate: float
    losses: np.ndarray
    """The loss before each step and after the last one."""
    path: np.ndarray | None
    """For a 2-D problem, the point before each step and after the last one."""
    seconds_per_step: float
    """The median time of one optimizer step (the update alone, not the loss and gradients)."""

    @property
    def steps_to_target(self) -> int | None:
        reached = np.flatnonzero(self.losses <= self.problem.target)
        return int(reached[0]) if reached.size else None


def run(problem: Problem, optimizer: OptimizerSetup, steps: int) -> Run:
    params = problem.initial_params()
    learning_rate = problem.learning_rates[optimizer.family]
    step = optimizer.build(params, learning_rate)
    losses = np.empty(steps + 1)
    path = np.empty((steps + 1, 2)) if problem.surface is not None else None
    step_seconds = np.empty(steps)
    for index in range(steps + 1):
        losses[index], grads = problem.loss_and_grads(params)
        if path is not None:
            path[index] = params[0]
        if index < steps:
            start = time.perf_counter()
            step(grads)
            step_seconds[index] = time.perf_counter() - start
    return Run(problem, optimizer, learning_rate, losses, path, float(np.median(step_seconds)))


def format_table(runs: Sequence[Run]) -> str:
    header = ("problem", "optimizer", "lr", "final loss", "target", "steps to target", "µs/step")
    rows = [
        (
            r.problem.name,
            r.optimizer.name,
            f"{r.learning_rate:g}",
            f"{r.losses[-1]:.4g}",
            f"{r.problem.target:g}",
            "-" if r.steps_to_target is None else str(r.steps_to_target),
            f"{r.seconds_per_step * 1e6:.1f}",
        )
        for r in runs
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        # The first two columns are names, aligned left; the others are numbers.
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells)

    return "\n".join([line(header), *(line(row) for row in rows)])


def plot(runs: Sequence[Run], output: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 12), layout="constrained")
    FigureCanvasAgg(figure)

    def color_of(optimizer: OptimizerSetup) -> str:
        return f"C{OPTIMIZERS.index(optimizer)}"

    for axes, problem in zip(figure.subplots(2, 2).ravel(), PROBLEMS, strict=True):
        problem_runs = [r for r in runs if r.problem is problem]
        axes.set_title(textwrap.fill(f"{problem.name}: {problem.description}", 80), fontsize=9)
        if problem.surface is None:
            for r in problem_runs:
                axes.plot(r.losses, color=color_of(r.optimizer), label=r.optimizer.name)
            axes.set_yscale("log")
            axes.set_xlabel("step")
            axes.set_ylabel("loss")
            continue
        x_min, x_max, y_min, y_max = problem.surface.view
        x, y = np.meshgrid(np.linspace(x_min, x_max, 300), np.linspace(y_min, y_max, 300))
        loss = problem.surface.loss(x, y)
        # Quantile levels put most contours near the minima, whatever the surface's range.
        levels = np.unique(np.quantile(loss, np.linspace(0.0, 1.0, 25) ** 2))
        axes.contourf(x, y, loss, levels=levels, cmap="viridis", alpha=0.3)
        axes.contour(x, y, loss, levels=levels, colors="grey", linewidths=0.3)
        for r in problem_runs:
            axes.plot(*r.path.T, color=color_of(r.optimizer), linewidth=1.2, label=r.optimizer.name)
        axes.plot(*problem_runs[0].path[0], "ko")
        axes.set_xlim(x_min, x_max)
        axes.set_ylim(y_min, y_max)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(OPTIMIZERS))
    figure.savefig(output, dpi=100)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fusedopt demo",
        description="Run every fusedopt optimizer on 2-D loss surfaces and a small MLP.",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=int, default=FULL_STEPS, help=f"steps per run (default {FULL_STEPS})"
    )
    length.add_argument(
        "--quick",
        action="store_const",
        dest="steps",
        const=QUICK_STEPS,
        help=f"a short run of {QUICK_STEPS} steps",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("fusedopt-demo.png"),
        help="where to write the plot (default: fusedopt-demo.png)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    draw = not args.no_plot and importlib.util.find_spec("matplotlib") is not None
    if not args.no_plot and not draw:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    print(
        f"fusedopt {fusedopt.__version__} (CPU path {fusedopt.cpu_isa()}, threads "
        f"{fusedopt.num_threads()}); {args.steps} steps per run"
    )
    for problem in PROBLEMS:
        print(f"{problem.name}: {problem.description}")
    print(flush=True)

    runs = []
    total = len(PROBLEMS) * len(OPTIMIZERS)
    for problem in PROBLEMS:
        for optimizer in OPTIMIZERS:
            started = time.perf_counter()
            runs.append(run(problem, optimizer, args.steps))
            print(
                f"[{len(runs):>2}/{total}] {problem.name:<12} {optimizer.name:<14} "
                f"{args.steps} steps in {time.perf_counter() - started:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    print(format_table(runs), flush=True)

    if draw:
        plot(runs, args.output)
        print(f"wrote {args.output}")
    return 0
