"""A native program finds the installed fusedopt with find_package, links fusedopt::fusedopt and
trains with it: examples/cmake_consumer, configured, built and run against the package this
Python imports (a pip-installed wheel, not the source folder), checked against the reference."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fusedopt
from fusedopt import reference

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cmake_consumer"
# examples/cmake_consumer/main.cpp's problem; keep in step with it.
ROWS, FEATURES, STEPS, LR = 64, 8, 200, 0.05


def cxx_compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
    )


pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
    pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler (c++, g++, clang++, $CXX)"),
    pytest.mark.skipif(not EXAMPLE.is_dir(), reason="examples/ is not next to this tests folder"),
]


def feature(row: int, column: int) -> float:
    # Python's % is C's for these non-negative operands.
    return ((row * 7 + column * 3) % 11 - 5) / 4.0


def true_weight(column: int) -> float:
    return (column - 3.5) / 4.0


TRUE_BIAS = 0.5


def target(row: int) -> float:
    y = TRUE_BIAS + ((row * 5) % 13 - 6) / 100.0
    for j in range(FEATURES):
        y += feature(row, j) * true_weight(j)
    return y


def gradients(weights: np.ndarray, bias: float) -> tuple[np.ndarray, float]:
    """main.cpp's gradient, operation for operation and in its order, so it rounds the same."""
    residual = []
    for i in range(ROWS):
        prediction = bias
        for j in range(FEATURES):
            prediction += feature(i, j) * float(weights[j])
        residual.append(prediction - target(i))
    weights_grad = np.empty(FEATURES)
    for j in range(FEATURES):
        total = 0.0
        for i in range(ROWS):
            total += feature(i, j) * residual[i]
        weights_grad[j] = 2.0 * total / ROWS
    total = 0.0
    for r in residual:
        total += r
    return weights_grad, 2.0 * total / ROWS


def train_with_reference() -> tuple[np.ndarray, float]:
    weights, bias = np.zeros(FEATURES), np.zeros(1)
    weights_state: dict = {}
    bias_state: dict = {}
    for _ in range(STEPS):
        weights_grad, bias_grad = gradients(weights, float(bias[0]))
        weights, weights_state = reference.torch_adam(weights, weights_grad, weights_state, lr=LR)
        bias, bias_state = reference.torch_adam(bias, [bias_grad], bias_state, lr=LR)
    return weights, float(bias[0])


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_python_m_fusedopt_prints_the_installed_cmake_dir() -> None:
    printed = run([sys.executable, "-m", "fusedopt", "--cmake-dir"], cwd=Path.cwd()).strip()
    assert Path(printed) == fusedopt.get_cmake_dir()
    assert (fusedopt.get_cmake_dir() / "fusedoptConfig.cmake").is_file()
    assert (fusedopt.get_cmake_dir() / "fusedoptConfigVersion.cmake").is_file()


def test_cmake_consumer_trains_like_the_reference(tmp_path: Path) -> None:
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(EXAMPLE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
    configure += [f"-DCMAKE_PREFIX_PATH={fusedopt.get_cmake_dir()}"]
    configure += [f"-DCMAKE_CXX_COMPILER={cxx_compiler()}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    run(configure, cwd=tmp_path)
    run(["cmake", "--build", str(build)], cwd=tmp_path)
    # The same kernels as this process, so the C++ result can be compared bit for bit below.
    env = dict(os.environ, FUSEDOPT_CPU_ISA=fusedopt.cpu_isa())
    output = run([str(build / "least_squares")], cwd=tmp_path, env=env)

    assert f"fusedopt {fusedopt.__version__}, isa {fusedopt.cpu_isa()}" in output
    weights = np.array([float(v) for v in re.search(r"^weights:(.*)$", output, re.M)[1].split()])
    bias = float(re.search(r"^bias: (\S+)$", output, re.M)[1])
    assert weights.shape == (FEATURES,)

    expected_weights, expected_bias = train_with_reference()
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bias, expected_bias, rtol=1e-12, atol=1e-14)
    # Trained: near the weights that made the data, the loss down to the noise's.
    np.testing.assert_allclose(weights, [true_weight(j) for j in range(FEATURES)], atol=0.05)
    assert abs(bias - TRUE_BIAS) < 0.05
    initial_loss = np.mean([target(i) ** 2 for i in range(ROWS)])
    final_loss = float(re.search(r"^loss before the last step: (\S+)$", output, re.M)[1])
    assert final_loss < 0.01 * initial_loss

    # The C ABI and the Python package run the same core: identical bits.
    python_weights, python_bias = np.zeros(FEATURES), np.zeros(1)
    optimizer = fusedopt.Adam([python_weights, python_bias], lr=LR)
    for _ in range(STEPS):
        weights_grad, bias_grad = gradients(python_weights, float(python_bias[0]))
        optimizer.step([weights_grad, np.array([bias_grad])])
    np.testing.assert_array_equal(weights, python_weights)
    assert bias == python_bias[0]
