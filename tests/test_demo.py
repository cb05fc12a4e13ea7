"""The `python -m fusedopt demo` job: its table, its range tests, its plot, its command line,
its gradients."""

import subprocess
import sys

import numpy as np
import pytest

import fusedopt
from fusedopt import demo

PROBLEM_NAMES = [problem.name for problem in demo.PROBLEMS]
OPTIMIZER_NAMES = [optimizer.name for optimizer in demo.OPTIMIZERS]


def table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """The table's cells of each (problem, optimizer) row; the last, "lr from", is words."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split(maxsplit=7)
        if len(cells) == 8 and cells[0] in PROBLEM_NAMES:
            rows[cells[0], cells[1]] = cells
    return rows


def final_losses(stdout: str) -> dict[tuple[str, str], float]:
    """The table's final loss of each (problem, optimizer) row."""
    return {key: float(cells[3]) for key, cells in table_rows(stdout).items()}


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


ADAPTIVE = ["Adagrad", "RMSprop", "Adam", "AdamW", "keras.Adam", "keras.RMSprop"]


def test_quick_demo_decreases_every_loss(capsys):
    assert demo.main(["--quick", "--no-plot"]) == 0
    rows = final_losses(capsys.readouterr().out)
    initial_losses = {
        problem.name: problem.loss_and_grads(problem.initial_params())[0]
        for problem in demo.PROBLEMS
    }
    for (problem, optimizer), final_loss in rows.items():
        assert np.isfinite(final_loss), (problem, optimizer)
        assert final_loss < initial_losses[problem], (problem, optimizer)
    assert rows["mlp-spirals", "Adam"] < 0.5 * initial_losses["mlp-spirals"]


def test_the_table_says_which_lr_each_run_used_and_why(capsys):
    assert demo.main(["--steps", "2", "--no-plot"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    mlp = demo.PROBLEMS[-1]
    for problem in demo.PROBLEMS:
        for setup in demo.OPTIMIZERS:
            cells = rows[problem.name, setup.name]
            if problem is mlp:
                assert cells[7] == "range test"
                params = mlp.initial_params()
                optimizer = setup.build(params, 1.0)
                suggestion = demo.range_test(mlp, optimizer, params).suggestion
                assert cells[2] == f"{suggestion:.3g}", setup.name
                assert f"{setup.name:<14} suggests {suggestion:.3g} " in out
            else:
                assert cells[7] == "grid"
                assert float(cells[2]) == problem.learning_rates[setup.family]
    for source in ("grid", "range test"):
        assert f"lr from {source!r}: {demo.LR_SOURCES[source]}" in out


def test_the_mlp_trains_from_where_the_range_test_started_at_its_suggestion():
    """The range test leaves the weights and the optimizer as they were: the run is the run of
    a fresh optimizer at the suggested rate, bit for bit."""
    mlp = demo.PROBLEMS[-1]
    for setup in (demo.OPTIMIZERS[0], demo.OPTIMIZERS[5], demo.OPTIMIZERS[-1]):
        result = demo.run(mlp, setup, 20)
        assert result.learning_rate == result.range_test.suggestion
        assert result.learning_rate_source == demo.RANGE_TEST
        params = mlp.initial_params()
        step = demo.step_of(setup.build(params, result.learning_rate), params)
        losses = []
        for index in range(21):
            loss, grads = mlp.loss_and_grads(params)
            losses.append(loss)
            if index < 20:
                step(grads)
        np.testing.assert_array_equal(result.losses, losses)


def test_a_range_test_without_a_suggestion_falls_back_to_the_grid():
    flat = demo.Problem(
        name="flat",
        description="a constant loss",
        target=0.0,
        learning_rates={"adam": 0.01},
        initial_params=lambda: [np.zeros(2)],
        loss_and_grads=lambda params: (1.0, [np.zeros(2)]),
        range_test=True,
    )
    result = demo.run(flat, demo.OPTIMIZERS[5], 3)
    assert result.range_test.suggestion is None
    assert result.learning_rate == 0.01
    assert result.learning_rate_source == demo.NO_SUGGESTION
    assert isinstance(result.range_test, fusedopt.LRRangeTestResult)


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
