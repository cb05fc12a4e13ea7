"""fusedopt.keras against keras.optimizers inside Keras' own training step (torch backend, CPU).

``model.train_on_batch`` of a model with many variables (100 Dense layers of 316 units, ReLU
with He initialization so that the gradients stay ordinary numbers: 200 variables, 10,017,200
params), once with ``keras.optimizers.Adam`` and once with ``fusedopt.keras.Adam``, the same
initial weights and batch. Reported: the whole step and the optimizer's share of it, the time
spent in ``optimizer.apply`` (which ``train_on_batch`` calls once per step: Keras' gradient
pipeline and the update), median per step over interleaved rounds, at 1 and 2 threads (torch's
and fusedopt's alike)."""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

import fusedopt

_SIZES = {  # mode: (layers, width, batch, rounds, steps a round, thread counts)
    "smoke": (4, 32, 4, 1, 2, [2]),
    "quick": (100, 316, 16, 3, 3, [1, 2]),
    "full": (100, 316, 16, 5, 5, [1, 2]),
}


def keras_train_on_batch(mode: str) -> str:
    """The report's section for this case (Markdown), measured in the given mode."""
    layers, width, batch, rounds, steps, thread_counts = _SIZES[mode]
    heading = (
        f"## Keras train_on_batch: {layers} Dense layers, Adam, keras.optimizers vs fusedopt.keras"
    )
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
        import torch
    except ImportError as error:
        return f"\n{heading}\n\nskipped: {error}\n"
    if keras.backend.backend() != "torch":
        return f"\n{heading}\n\nskipped: Keras runs on {keras.backend.backend()!r}, not torch\n"
    import fusedopt.keras as fk

    print(f"[keras] train_on_batch, {layers} Dense layers of {width}", file=sys.stderr)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    y = rng.standard_normal((batch, width)).astype(np.float32)

    def model(optimizer: Any) -> tuple[Any, list[float]]:
        keras.utils.set_random_seed(0)
        dense = [
            keras.layers.Dense(width, activation="relu", kernel_initializer="he_normal")
            for _ in range(layers)
        ]
        m = keras.Sequential([keras.Input((width,)), *dense])
        m.compile(optimizer=optimizer, loss="mse")
        in_apply = [0.0]
        apply = optimizer.apply

        def timed_apply(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return apply(*args, **kwargs)
            finally:
                in_apply[0] += time.perf_counter() - start

        optimizer.apply = timed_apply  # what train_on_batch calls once per step
        m.train_on_batch(x, y)  # builds the model and the optimizer's slots
        return m, in_apply

    candidates = {
        "keras.optimizers.Adam": model(keras.optimizers.Adam(1e-4)),
        "fusedopt.keras.Adam": model(fk.Adam(1e-4)),
    }
    params = sum(int(np.prod(v.shape)) for v in candidates["fusedopt.keras.Adam"][0].weights)
    torch_threads, fusedopt_threads = torch.get_num_threads(), fusedopt.num_threads()
    rows = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            fusedopt.set_num_threads(threads)
            samples: dict[str, list[tuple[float, float]]] = {label: [] for label in candidates}
            for m, _ in candidates.values():
                m.train_on_batch(x, y)  # warm at this thread count
            for r in range(rounds):
                order = list(candidates.items())
                for label, (m, in_apply) in order[r % 2 :] + order[: r % 2]:
                    in_apply[0] = 0.0
                    start = time.perf_counter()
                    for _ in range(steps):
                        m.train_on_batch(x, y)
                    total = (time.perf_counter() - start) / steps
                    samples[label].append((total, in_apply[0] / steps))
            medians = {
                label: (
                    statistics.median(s for s, _ in values),
                    statistics.median(a for _, a in values),
                )
                for label, values in samples.items()
            }
            rows.append((threads, medians))
    finally:
        torch.set_num_threads(torch_threads)
        fusedopt.set_num_threads(fusedopt_threads)
        candidates.clear()
        gc.collect()
    return _section(heading, layers, params, batch, rows)


def _section(heading: str, layers: int, params: int, batch: int, rows: list) -> str:
    keras_label, fused_label = "keras.optimizers.Adam", "fusedopt.keras.Adam"
    lines = [
        "",
        heading,
        "",
        f"{2 * layers} variables, {params:,} params, batch {batch}, float32, CPU; ms per step "
        "(the optimizer: the time in `optimizer.apply`, Keras' gradient pipeline and the update; "
        "the rest is the forward and backward pass, the same model in both).",
        "",
        "| threads | Keras step | fusedopt step | step speedup | Keras optimizer "
        "| fusedopt optimizer | optimizer speedup | rest of the step (Keras, fusedopt) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    targets = []
    for threads, medians in rows:
        (k_step, k_opt), (f_step, f_opt) = medians[keras_label], medians[fused_label]
        step_ratio, opt_ratio = k_step / f_step, k_opt / f_opt
        lines.append(
            f"| {threads} | {1e3 * k_step:.1f} | {1e3 * f_step:.1f} | {step_ratio:.2f}x "
            f"| {1e3 * k_opt:.1f} | {1e3 * f_opt:.1f} | {opt_ratio:.1f}x "
            f"| {1e3 * (k_step - k_opt):.1f}, {1e3 * (f_step - f_opt):.1f} |"
        )
        targets.append(
            f"- {threads} thread(s): optimizer share ≥ 3x faster than Keras': "
            f"{'yes' if opt_ratio >= 3 else 'no'} ({opt_ratio:.1f}x); whole step faster: "
            f"{'yes' if step_ratio > 1 else 'no'} ({step_ratio:.2f}x)"
        )
    return "\n".join(lines + ["", *targets]) + "\n"
