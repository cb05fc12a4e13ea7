"""The benchmark suite runs end to end (tiny sizes, one round). Speed itself is proven by the
suite's own report, never by timed assertions here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fusedopt

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    not (REPO / "bench" / "__main__.py").exists(),
    reason="bench/ is not beside tests/ (the suite is running outside the source tree, "
    "e.g. against an installed wheel)",
)
def test_smoke_run_prints_every_section_and_writes_the_chart(tmp_path: Path) -> None:
    chart = tmp_path / "chart.png"
    report = tmp_path / "report.md"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--chart", chart, "--markdown", report],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    for heading in [
        "## Adam, one flat tensor, by size",
        "## Every algorithm",
        "## Per-step cost, many tensors",
        "## LAMB against its two-pass ceiling",
        "## fusedopt.torch against torch.optim",
        "## EWMA against pandas",
        "## Contention",
        "## Targets",
        "## Keras train_on_batch",
    ]:
        assert heading in run.stdout
    assert report.read_text() == run.stdout
    assert "4d. C ABI plan step" in run.stdout  # measured, or skipped with the reason
    assert "[  1/" in run.stderr  # progress is shown while it runs
    if importlib.util.find_spec("matplotlib") is not None:
        assert chart.read_bytes().startswith(b"\x89PNG")


bench_importable = pytest.mark.skipif(
    not (REPO / "bench" / "algorithms.py").exists(), reason="bench/ is not beside tests/"
)


@bench_importable
def test_numpy_versions_compute_what_fusedopt_computes() -> None:
    """The suite's NumPy candidates are the same algorithms as fusedopt's classes (float64, past
    RAdam's rectification threshold), so the comparison is of equal work."""
    sys.path.insert(0, str(REPO))
    try:
        from bench.algorithms import ALGORITHMS, numpy_states
    finally:
        sys.path.remove(str(REPO))
    rng = np.random.default_rng(0)
    for name, algorithm in ALGORITHMS.items():
        start = rng.standard_normal(257)
        grads = [1e-2 * rng.standard_normal(257) for _ in range(8)]
        ours, theirs = start.copy(), start.copy()
        optimizer = getattr(fusedopt, algorithm.fusedopt_class)([ours], **algorithm.options)
        states = numpy_states(algorithm, theirs)
        for t, g in enumerate(grads, 1):
            optimizer.step([g])
            algorithm.numpy_step(theirs, g, states, t)
        # NAdam's mu_product and ASGD's eta are float32 values in torch (and fusedopt).
        np.testing.assert_allclose(theirs, ours, rtol=1e-8, atol=1e-9, err_msg=name)
        assert not np.array_equal(ours, start), name


@bench_importable
def test_gpt2_small_shapes_and_lamb_ceiling_bytes() -> None:
    sys.path.insert(0, str(REPO))
    try:
        from bench.algorithms import Workload, lamb_ceiling_bytes
        from bench.torch_front import GPT2_SMALL
    finally:
        sys.path.remove(str(REPO))
    shapes = GPT2_SMALL.shapes()
    assert len(shapes) == 148
    assert sum(int(np.prod(s)) for s in shapes) == 124_439_808
    lamb, ceiling = lamb_ceiling_bytes(Workload([(3000,)], np.float32))
    assert lamb == ceiling == 3000 * 10 * 4
