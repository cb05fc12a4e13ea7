"""The benchmark suite runs end to end (tiny sizes, one round). Speed itself is proven by the
suite's own report, never by timed assertions here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

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
        "## Many tensors",
        "## EWMA against pandas",
        "## Contention",
        "## Targets",
        "## Keras train_on_batch",
    ]:
        assert heading in run.stdout
    assert report.read_text() == run.stdout
    assert "[  1/" in run.stderr  # progress is shown while it runs
    if importlib.util.find_spec("matplotlib") is not None:
        assert chart.read_bytes().startswith(b"\x89PNG")
