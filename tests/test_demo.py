"""The `python -m fusedopt demo` job: its table, its plot, its command line, its gradients."""

import subprocess
import sys

import numpy as np
import pytest

from fusedopt import demo

PROBLEM_NAMES = [problem.name for problem in demo.PROBLEMS]
OPTIMIZER_NAMES = [optimizer.name for optimizer in demo.OPTIMIZERS]


def final_losses(stdout: str) -> dict[tuple[str, str], float]:
    """The table's final loss of each (problem, optimizer) row."""
    losses = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) == 7 and cells[0] in PROBLEM_NAMES:
            losses[cells[0], cells[1]] = float(cells[3])
    return losses


def test_quick_demo_lists_every_optimizer_on_every_problem(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--quick", "--no-plot"]) == 0
    captured = capsys.readouterr()
    rows = final_losses(captured.out)
    assert sorted(rows) == sorted(
        (problem, optimizer) for problem in PROBLEM_NAMES for optimizer in OPTIMIZER_NAMES
    )
    runs = len(PROBLEM_NAMES) * len(OPTIMIZER_NAMES)
    assert f"[{runs}/{runs}]" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_quick_demo_decreases_every_loss(capsys):
    assert demo.main(["--quick", "--no-plot"]) == 0
    rows = final_losses(capsys.readouterr().out)
    initial_losses = {
        problem.name: problem.loss_and_grads(problem.initial_params())[0]
        for problem in demo.PROBLEMS
    }
    for (problem, optimizer), final_loss in rows.items():
        assert final_loss < initial_losses[problem], (problem, optimizer)
    assert rows["mlp-spirals", "Adam"] < 0.5 * initial_losses["mlp-spirals"]


def test_quick_demo_writes_the_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    output = tmp_path / "demo.png"
    assert demo.main(["--quick", "--output", str(output)]) == 0
    assert output.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"wrote {output}" in capsys.readouterr().out


def test_demo_without_matplotlib_says_so_and_still_prints_the_table(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    output = tmp_path / "demo.png"
    assert demo.main(["--steps", "3", "--output", str(output)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert len(final_losses(captured.out)) == len(PROBLEM_NAMES) * len(OPTIMIZER_NAMES)
    assert not output.exists()


def test_steps_must_be_positive():
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])


@pytest.mark.parametrize(
    "problem",
    [*demo.PROBLEMS[:-1], demo.mlp_problem(demo.SpiralClassifier.generate(dtype=np.float64))],
    ids=PROBLEM_NAMES,
)
def test_gradients_match_finite_differences(problem):
    params = problem.initial_params()
    rng = np.random.default_rng(0)
    for p in params:
        p += rng.normal(0.0, 0.1, p.shape)
    _, grads = problem.loss_and_grads(params)
    h = 1e-6
    for p, grad in zip(params, grads, strict=True):
        assert grad.shape == p.shape and grad.dtype == p.dtype
        for index in np.ndindex(p.shape):
            saved = p[index]
            p[index] = saved + h
            loss_up, _ = problem.loss_and_grads(params)
            p[index] = saved - h
            loss_down, _ = problem.loss_and_grads(params)
            p[index] = saved
            assert grad[index] == pytest.approx((loss_up - loss_down) / (2 * h), rel=1e-5, abs=1e-8)


def test_python_m_fusedopt_demo_runs_the_demo(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fusedopt", "demo", "--steps", "2", "--no-plot"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(final_losses(result.stdout)) == len(PROBLEM_NAMES) * len(OPTIMIZER_NAMES)
