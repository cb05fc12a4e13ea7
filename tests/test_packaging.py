"""What the build and the package declare: CMakeLists.txt's options and library version, read
from a configure-only run over the source tree (seconds, nothing compiled), and the license
file that the installed distribution carries."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent

CONFIGURE_SKIPS = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
    pytest.mark.skipif(shutil.which("ninja") is None, reason="reads Ninja's build.ninja"),
    pytest.mark.skipif(
        not (SOURCE / "CMakeLists.txt").is_file(), reason="needs the source tree next to tests/"
    ),
]


def configures(test):
    """A test that configures the source tree: skipped without cmake, ninja or the sources."""
    for skip in CONFIGURE_SKIPS:
        test = skip(test)
    return test


def configure(build: Path, *definitions: str, env: dict[str, str] | None = None):
    command = ["cmake", "-S", str(SOURCE), "-B", str(build), "-G", "Ninja", *definitions]
    return subprocess.run(command, cwd=build.parent, env=env, capture_output=True, text=True)


def builds_cuda(build: Path) -> bool:
    return "kernels.cu" in (build / "build.ninja").read_text()


def without_nvcc() -> dict[str, str]:
    """The environment less every folder of PATH that holds an nvcc, and the variables that
    point CMake at a CUDA compiler."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_PATH", "CUDA_HOME")}
    folders = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(f for f in folders if not (Path(f) / "nvcc").exists())
    return env


@configures
@pytest.mark.parametrize("value", ["OFF", "off", "0", "FALSE", "No"])
def test_fusedopt_cuda_off_in_any_spelling_leaves_cuda_out(tmp_path: Path, value: str) -> None:
    """FUSEDOPT_CUDA was compared with "OFF" exactly: off, 0, FALSE and NO built the CUDA backend
    wherever nvcc was found. Every CMake false constant now leaves it out."""
    result = configure(tmp_path / "build", f"-DFUSEDOPT_CUDA={value}")
    assert result.returncode == 0, result.stderr
    assert not builds_cuda(tmp_path / "build")


@configures
@pytest.mark.parametrize("value", ["ON", "on", "1", "TRUE", "yes"])
def test_fusedopt_cuda_on_in_any_spelling_insists_on_nvcc(tmp_path: Path, value: str) -> None:
    """on, 1 and TRUE built CPU-only without a word where nvcc was missing (only ON failed):
    every CMake true constant now makes a missing nvcc an error."""
    result = configure(tmp_path / "build", f"-DFUSEDOPT_CUDA={value}", env=without_nvcc())
    if result.returncode == 0 and builds_cuda(tmp_path / "build"):
        pytest.skip("CMake finds a CUDA compiler outside PATH here")
    assert result.returncode != 0
    assert f"FUSEDOPT_CUDA={value} but no CUDA compiler was found" in result.stderr


@configures
@pytest.mark.parametrize(
    "isas, built, error",
    [
        ("scalar;avx2", ["scalar", "avx2"], None),
        ("scalar,avx2", ["scalar", "avx2"], None),
        ("avx2", None, "scalar, the fallback for any CPU, is required"),
        ("scalar;neon", None, "neon is not one of"),
    ],
)
def test_fusedopt_isas_builds_a_subset_with_scalar_always(
    tmp_path: Path, isas: str, built: list[str] | None, error: str | None
) -> None:
    """FUSEDOPT_ISAS (the sanitizer CI's builds leave out ISAs the CPU cannot run): a subset of
    the kernels, the scalar fallback always among them."""
    result = configure(tmp_path / "build", "-DFUSEDOPT_CUDA=OFF", f"-DFUSEDOPT_ISAS={isas}")
    if error is not None:
        assert result.returncode != 0 and error in result.stderr
        return
    assert result.returncode == 0, result.stderr
    ninja = (tmp_path / "build" / "build.ninja").read_text()
    kernels = {isa for isa in ("scalar", "avx2", "avx512") if f"fusedopt_kernels_{isa}" in ninja}
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert kernels == set(built)


@configures
def test_an_unknown_fusedopt_cuda_value_is_refused(tmp_path: Path) -> None:
    result = configure(tmp_path / "build", "-DFUSEDOPT_CUDA=maybe")
    assert result.returncode != 0
    assert "FUSEDOPT_CUDA must be AUTO, ON or OFF" in result.stderr


@configures
def test_the_soname_carries_the_minor_version_before_1_0(tmp_path: Path) -> None:
    """Before 1.0 a minor release may change the ABI (the CMake package accepts the same minor
    version only), so a CMake install's soname is libfusedopt.so.0.1, not libfusedopt.so.0."""
    result = configure(tmp_path / "build", "-DFUSEDOPT_CUDA=OFF")
    assert result.returncode == 0, result.stderr
    project = (SOURCE / "CMakeLists.txt").read_text()
    major, minor = re.search(r"project\(fusedopt VERSION (\d+)\.(\d+)", project).groups()
    expected = f"libfusedopt.so.{major}.{minor}" if major == "0" else f"libfusedopt.so.{major}"
    ninja = (tmp_path / "build" / "build.ninja").read_text()
    sonames = re.findall(r"^\s*SONAME = (\S+)$", ninja, re.M)
    assert sonames == [expected]


def test_the_installed_distribution_carries_the_license() -> None:
    """pyproject.toml declares BSD-3-Clause; the license's text ships with the wheel."""
    files = metadata.distribution("fusedopt").files or []
    licenses = [f for f in files if f.name == "LICENSE"]
    assert licenses, "no LICENSE among the installed distribution's files"
    text = licenses[0].read_text()
    assert "BSD 3-Clause License" in text and "the fusedopt developers" in text
