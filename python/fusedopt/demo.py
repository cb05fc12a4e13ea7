"""`python -m fusedopt demo`: every optimizer on three 2-D loss surfaces and a small MLP.

Nothing is downloaded: the surfaces are formulas and the MLP's data is generated from a fixed seed.
Each optimizer updates NumPy parameter arrays in place. On the surfaces each optimizer family runs
at a learning rate picked by hand from a grid; on the MLP each optimizer first runs
:func:`fusedopt.lr_range_test` from the starting weights and then trains at the rate it suggests,
with the same optimizer (the test leaves the weights and the optimizer as they were). The demo
prints the range tests and a table (learning rate and where it came from, final loss, steps to
reach a target loss, time per optimizer step) and, when matplotlib is installed, draws the
optimizers' paths on the surfaces, the MLP's loss curves and its range tests into a PNG.
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
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

import fusedopt
import fusedopt.keras_numpy

Arrays = list[np.ndarray]
Step = Callable[[Arrays], None]
"""Applies one update to the parameters an optimizer was built on, given their gradients."""
Optimizer = fusedopt.Optimizer | fusedopt.keras_numpy.Optimizer

FULL_STEPS = 2000
QUICK_STEPS = 150


@dataclass(frozen=True)
class OptimizerSetup:
    name: str
    family: str
    """Its key in `Problem.learning_rates`; the optimizers of one family share a rate."""
    build: Callable[[Arrays, float], Optimizer]
    """The optimizer over these parameters at this learning rate."""


def step_of(optimizer: Optimizer, params: Arrays) -> Step:
    if isinstance(optimizer, fusedopt.keras_numpy.Optimizer):
        return lambda grads: optimizer.apply(grads, params)
    return optimizer.step


def set_learning_rate(optimizer: Optimizer, learning_rate: float) -> None:
    if isinstance(optimizer, fusedopt.keras_numpy.Optimizer):
        optimizer.learning_rate = learning_rate
    else:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate


OPTIMIZERS = (
    OptimizerSetup("SGD", "sgd", lambda params, lr: fusedopt.SGD(params, lr=lr)),
    OptimizerSetup(
        "SGD(momentum)", "momentum", lambda params, lr: fusedopt.SGD(params, lr=lr, momentum=0.9)
    ),
    OptimizerSetup(
        "SGD(nesterov)",
        "momentum",
        lambda params, lr: fusedopt.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    ),
    OptimizerSetup("Adagrad", "adagrad", lambda params, lr: fusedopt.Adagrad(params, lr=lr)),
    OptimizerSetup("RMSprop", "rmsprop", lambda params, lr: fusedopt.RMSprop(params, lr=lr)),
    OptimizerSetup("Adam", "adam", lambda params, lr: fusedopt.Adam(params, lr=lr)),
    OptimizerSetup("AdamW", "adam", lambda params, lr: fusedopt.AdamW(params, lr=lr)),
    OptimizerSetup(
        "keras.Adam", "adam", lambda params, lr: fusedopt.keras_numpy.Adam(learning_rate=lr)
    ),
    OptimizerSetup(
        "keras.RMSprop",
        "rmsprop",
        lambda params, lr: fusedopt.keras_numpy.RMSprop(learning_rate=lr),
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
    range_test: bool = False
    """Whether each optimizer trains at the rate of an lr range test run first (the grid's rate
    then only stands in where the test suggests none)."""


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


def mlp_problem(model: SpiralClassifier, hidden: int | None = None) -> Problem:
    if hidden is not None:  # a wider hidden layer (64 x 64 = 4096 weights: 8-bit state applies)
        model = SpiralClassifier(model.inputs, model.labels, hidden=hidden, seed=model.seed)
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
        range_test=True,
    )


PROBLEMS = (SADDLE, RAVINE, DOUBLE_WELL, mlp_problem(SpiralClassifier.generate()))


GRID = "grid"
RANGE_TEST = "range test"
NO_SUGGESTION = "grid (no suggestion)"
LR_SOURCES = {
    GRID: "picked by hand from a grid of 1e-4 to 1 for the problem and the optimizer family",
    RANGE_TEST: (
        "fusedopt.lr_range_test's suggestion (the steepest descent of the smoothed loss against "
        "log lr), run from the same start with the same optimizer"
    ),
    NO_SUGGESTION: "the range test saw the loss fall nowhere, so the grid's pick",
}


@dataclass(frozen=True)
class Run:
    problem: Problem
    optimizer: OptimizerSetup
    learning_rate: float
    learning_rate_source: str
    """Why this rate: a key of `LR_SOURCES`."""
    range_test: fusedopt.LRRangeTestResult | None
    """The range test run before training, on a problem that has one."""
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


RANGE_TEST_SETTINGS = {"start_lr": 1e-7, "end_lr": 10.0, "num_steps": 100, "smoothing": 0.98}
"""fusedopt.lr_range_test's defaults, spelled out for the printout."""


def range_test(
    problem: Problem, optimizer: Optimizer, params: Arrays
) -> fusedopt.LRRangeTestResult:
    keras_style = isinstance(optimizer, fusedopt.keras_numpy.Optimizer)
    return fusedopt.lr_range_test(
        optimizer,
        lambda: problem.loss_and_grads(params),
        variables=params if keras_style else None,
        **RANGE_TEST_SETTINGS,
    )


def run(problem: Problem, setup: OptimizerSetup, steps: int) -> Run:
    params = problem.initial_params()
    learning_rate = problem.learning_rates[setup.family]
    source = GRID
    optimizer = setup.build(params, learning_rate)
    test = None
    if problem.range_test:
        # The test restores the params and the optimizer exactly: training below starts from
        # the same point, with the same (untouched) optimizer, only at the suggested rate.
        test = range_test(problem, optimizer, params)
        if test.suggestion is None:
            source = NO_SUGGESTION
        else:
            learning_rate, source = test.suggestion, RANGE_TEST
            set_learning_rate(optimizer, learning_rate)
    step = step_of(optimizer, params)
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
    return Run(
        problem=problem,
        optimizer=setup,
        learning_rate=learning_rate,
        learning_rate_source=source,
        range_test=test,
        losses=losses,
        path=path,
        seconds_per_step=float(np.median(step_seconds)),
    )


def format_table(runs: Sequence[Run]) -> str:
    header = (
        "problem",
        "optimizer",
        "lr",
        "final loss",
        "target",
        "steps to target",
        "µs/step",
        "lr from",
    )
    rows = [
        (
            r.problem.name,
            r.optimizer.name,
            f"{r.learning_rate:.3g}",
            f"{r.losses[-1]:.4g}",
            f"{r.problem.target:g}",
            "-" if r.steps_to_target is None else str(r.steps_to_target),
            f"{r.seconds_per_step * 1e6:.1f}",
            r.learning_rate_source,
        )
        for r in runs
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        # The first two columns and the last are words, aligned left; the others are numbers.
        cells = [
            cell.ljust(w) if i < 2 or i == len(row) - 1 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    sources = sorted({r.learning_rate_source for r in runs})
    notes = [f"lr from {source!r}: {LR_SOURCES[source]}" for source in sources]
    return "\n".join([line(header), *(line(row) for row in rows), "", *notes])


def format_range_tests(runs: Sequence[Run]) -> str:
    """What each range test found, beside the rate the grid picked for the same problem."""
    lines = []
    for r in runs:
        test = r.range_test
        if test is None:
            continue
        if not lines:
            settings = RANGE_TEST_SETTINGS
            lines.append(
                f"lr range test on {r.problem.name} (fusedopt.lr_range_test: lr from "
                f"{settings['start_lr']:g} to {settings['end_lr']:g} in {settings['num_steps']} "
                f"steps, loss smoothed with {settings['smoothing']:g}):"
            )
        suggestion = "none" if test.suggestion is None else f"{test.suggestion:.3g}"
        end = (
            f"stopped at lr {test.lrs[-1]:.3g}: the loss diverged"
            if test.diverged
            else f"ran to lr {test.lrs[-1]:.3g}"
        )
        grid = r.problem.learning_rates[r.optimizer.family]
        lines.append(
            f"  {r.optimizer.name:<14} suggests {suggestion:<8} ({len(test.lrs)} steps, {end}; "
            f"the grid's pick: {grid:g})"
        )
    return "\n".join(lines)


def plot(runs: Sequence[Run], output: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 18), layout="constrained")
    FigureCanvasAgg(figure)
    # The four problems two by two, and the range tests across the bottom.
    names = [problem.name for problem in PROBLEMS]
    panels = figure.subplot_mosaic(
        [names[:2], names[2:], ["range tests"] * 2], height_ratios=[1, 1, 0.8]
    )

    def color_of(optimizer: OptimizerSetup) -> str:
        return f"C{OPTIMIZERS.index(optimizer)}"

    for problem in PROBLEMS:
        axes = panels[problem.name]
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
    plot_range_tests(panels["range tests"], [r for r in runs if r.range_test is not None], color_of)
    handles, labels = panels[names[0]].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(OPTIMIZERS))
    figure.savefig(output, dpi=100)


def plot_range_tests(
    axes: Any, runs: Sequence[Run], color_of: Callable[[OptimizerSetup], str]
) -> None:
    """Each optimizer's smoothed range-test loss against the lr, its suggestion as a dot and the
    grid's pick as a cross on its curve."""
    if not runs:
        axes.set_visible(False)
        return
    problem = runs[0].problem
    settings = RANGE_TEST_SETTINGS
    axes.set_title(
        f"{problem.name}: lr range test of each optimizer (fusedopt.lr_range_test, lr "
        f"{settings['start_lr']:g} to {settings['end_lr']:g} in {settings['num_steps']} steps, "
        f"loss smoothed with {settings['smoothing']:g}); dot: the suggested lr (steepest "
        "descent), which the MLP runs use; cross: the grid's pick",
        fontsize=9,
    )
    lowest, start = np.inf, -np.inf
    for r in runs:
        test = r.range_test
        color = color_of(r.optimizer)
        axes.plot(test.lrs, test.losses, color=color, linewidth=1.2)
        if test.suggestion is not None:
            axes.plot(test.suggestion, test.losses[test.suggestion_index], "o", color=color)
        grid = r.problem.learning_rates[r.optimizer.family]
        axes.plot(grid, np.interp(np.log(grid), np.log(test.lrs), test.losses), "x", color=color)
        lowest = min(lowest, np.nanmin(test.losses))
        start = max(start, test.losses[0])
    # The descent fills the panel; the blow-ups that end the tests run off its top.
    axes.set_ylim(lowest - 0.1 * (start - lowest), start + 1.5 * (start - lowest))
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("smoothed loss")


# ---- Low precision: the same training in fewer bytes (docs/spec.md section 22) ----------------

PRECISIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "float32": ("float32", {}),
    "bfloat16, rounded to nearest": ("bfloat16", {}),
    "bfloat16 + float32 master": ("bfloat16", {"master_weights": True}),
    "bfloat16, stochastic rounding": ("bfloat16", {"stochastic_rounding": True}),
    "bfloat16 + master, 8-bit state": ("bfloat16", {"master_weights": True, "state_dtype": "int8"}),
}
"""Adam's storage configurations the demo compares: (param dtype, options)."""


def noisy_quadratic(n: int = 8192, noise: float = 0.5, seed: int = 0) -> Problem:
    """An ill-conditioned quadratic (curvatures 0.01 to 1, log-spaced; the minimum near 3, where
    a bfloat16 ulp is 1/64) with noisy gradients: the loss is exact, the gradients are not."""
    rng = np.random.default_rng(seed)
    curvature = np.logspace(-2, 0, n)
    minimum = rng.standard_normal(n) + 3.0

    def loss_and_grads(params: Arrays) -> tuple[float, Arrays]:
        offset = params[0].astype(np.float64) - minimum
        grad = curvature * offset + noise * rng.standard_normal(n)
        return float(0.5 * np.mean(curvature * offset**2)), [grad]

    return Problem(
        name="noisy-quadratic",
        description=f"{n} curvatures from 0.01 to 1, gradient noise {noise}",
        target=0.0,
        learning_rates={"adam": 1e-2},
        initial_params=lambda: [np.zeros(n)],
        loss_and_grads=loss_and_grads,
    )


def low_precision_losses(problem: Problem, steps: int, learning_rate: float) -> dict[str, float]:
    """Adam on ``problem`` in each of PRECISIONS: the mean loss of the last tenth of the steps.
    The loss and gradients are computed in float32 from the stored params (as a bfloat16 model's
    forward pass sees them); the gradients are stored in the params' dtype."""
    from fusedopt._engine import numpy_dtype

    finals = {}
    for name, (dtype, options) in PRECISIONS.items():
        params = [p.astype(numpy_dtype(dtype)) for p in problem.initial_params()]
        optimizer = fusedopt.Adam(params, lr=learning_rate, **options)
        tail = []
        for index in range(steps):
            loss, grads = problem.loss_and_grads([p.astype(np.float32) for p in params])
            if index >= steps - max(1, steps // 10):
                tail.append(loss)
            optimizer.step([g.astype(numpy_dtype(dtype)) for g in grads])
        finals[name] = float(np.mean(tail))
    return finals


def low_precision_results(quick: bool) -> dict[str, tuple[int, dict[str, float]]]:
    """Per problem: its steps and low_precision_losses. The MLP stops at 150 steps, where its
    loss is still about 0.1: past that it approaches 0, where the bfloat16 forward pass's own
    rounding, not the optimizer's storage, sets the ratio."""
    quadratic_steps = 500 if quick else 2000
    mlp = mlp_problem(SpiralClassifier.generate(), hidden=64)
    return {
        "noisy quadratic": (
            quadratic_steps,
            low_precision_losses(noisy_quadratic(), quadratic_steps, 1e-2),
        ),
        "MLP 2-64-64-1": (150, low_precision_losses(mlp, 150, 1e-2)),
    }


def format_low_precision(quick: bool) -> str:
    lines = [
        "Low precision: Adam (lr 0.01) in each storage; final loss (mean of the last tenth of the "
        "steps) and its ratio to float32's",
    ]
    for problem, (steps, finals) in low_precision_results(quick).items():
        base = finals["float32"]
        lines.append(f"  {problem}, {steps} steps")
        for name, value in finals.items():
            lines.append(f"    {name:<32} {value:10.4g}  {value / base:6.2f}x")
    return "\n".join(lines)


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
            test = runs[-1].range_test
            work = f"{args.steps} steps"
            if test is not None:
                work = f"range test ({len(test.lrs)} steps), then {work}"
            print(
                f"[{len(runs):>2}/{total}] {problem.name:<12} {optimizer.name:<14} "
                f"{work} in {time.perf_counter() - started:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    range_tests = format_range_tests(runs)
    if range_tests:
        print(range_tests)
        print()
    print(format_table(runs), flush=True)
    print()
    print(format_low_precision(quick=args.steps < FULL_STEPS), flush=True)

    if draw:
        plot(runs, args.output)
        print(f"wrote {args.output}")
    return 0
