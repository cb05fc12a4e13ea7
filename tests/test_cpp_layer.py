"""fusedopt.hpp, the header-only C++ layer over the C ABI: tests/cpp/hpp_layer.cpp exercises it
(Options as values, tensor(), step(), Plan, errors as exceptions) and is built here against the
installed package, as C++17 (its own Span) and as C++20 (std::span), with warnings as errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import fusedopt

SOURCE = Path(__file__).resolve().parent / "cpp" / "hpp_layer.cpp"
LIB_DIR = fusedopt.get_cmake_dir().parent.parent
INCLUDE_DIR = LIB_DIR.parent / "include"


def cxx_compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
    )


pytestmark = [
    pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler (c++, g++, clang++, $CXX)"),
    pytest.mark.skipif(
        not (LIB_DIR / "libfusedopt.so").is_file(),
        reason="no libfusedopt.so in the installed package (not Linux?)",
    ),
]


@pytest.mark.parametrize("standard", ["c++17", "c++20"])
def test_the_cpp_layer_does_what_it_says(tmp_path: Path, standard: str) -> None:
    program = tmp_path / "hpp_layer"
    command = [cxx_compiler(), f"-std={standard}", "-Wall", "-Wextra", "-Werror", "-O1"]
    command += [f"-I{INCLUDE_DIR}", str(SOURCE), "-o", str(program)]
    command += [f"-L{LIB_DIR}", "-lfusedopt", f"-Wl,-rpath,{LIB_DIR}"]
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode != 0 and f"-std={standard}" in built.stderr:
        pytest.skip(f"{cxx_compiler()} does not offer {standard}")
    assert built.returncode == 0, built.stderr
    run = subprocess.run([str(program)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
