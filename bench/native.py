"""The C ABI measured from C: bench/c_abi_step.c compiled at bench time against the installed
package's header and library, run as a child process that times its own loop of
``fusedopt_plan_step`` calls, one batch per request, so its batches interleave with the Python
candidates' rounds."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import fusedopt
from bench.timing import Candidate

SOURCE = Path(__file__).resolve().parent / "c_abi_step.c"
LABEL = "C ABI plan"

_built: tuple[Path | None, str | None] | None = None  # (program, why not), once per run


def c_compiler() -> str | None:
    """$CC, else the first of cc, gcc, clang on the PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _package_paths() -> tuple[Path, Path]:
    """The installed package's include folder (with fusedopt/fusedopt.h) and library folder
    (with libfusedopt), both beside the CMake package ``get_cmake_dir()`` names."""
    lib = fusedopt.get_cmake_dir().parent.parent
    return lib.parent / "include", lib


def build() -> tuple[Path | None, str | None]:
    """The compiled program, or None and why it could not be built (compiled once per run)."""
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build() -> tuple[Path | None, str | None]:
    compiler = c_compiler()
    if compiler is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    include, lib = _package_paths()
    if not (include / "fusedopt" / "fusedopt.h").is_file():
        return None, f"the installed package has no C header ({include}/fusedopt/fusedopt.h)"
    if not any(lib.glob("*fusedopt*.so*")) and not any(lib.glob("*fusedopt*.dylib")):
        return None, f"the installed package has no libfusedopt in {lib}"
    folder = Path(tempfile.mkdtemp(prefix="fusedopt-bench-"))
    atexit.register(shutil.rmtree, folder, True)
    program = folder / "c_abi_step"
    command = [
        compiler, "-O2", "-std=c99", str(SOURCE), f"-I{include}", f"-L{lib}",
        f"-Wl,-rpath,{lib}", "-lfusedopt", "-o", str(program),
    ]  # fmt: skip
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"{compiler} could not compile {SOURCE.name}: {error}"
    if run.returncode != 0:
        tail = " ".join((run.stderr or run.stdout).split())[-300:]
        return None, f"{compiler} could not compile {SOURCE.name}: {tail}"
    try:  # one step of one tensor: it loads libfusedopt and runs
        trial = subprocess.run(
            [str(program), "1", "8", "1"], input="1\n", capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"the compiled {program.name} did not run: {error}"
    if trial.returncode != 0 or not trial.stdout.strip():
        tail = " ".join(trial.stderr.split())[-300:]
        return None, f"the compiled {program.name} did not run (exit {trial.returncode}): {tail}"
    return program, None


class PlanStepProgram:
    """One running c_abi_step: ``seconds_per_step(count)`` runs a batch of plan steps in it."""

    def __init__(self, program: Path, count: int, size: int, threads: int) -> None:
        self.process = subprocess.Popen(
            [str(program), str(count), str(size), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def seconds_per_step(self, count: int) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            error = self.process.stderr.read() if self.process.stderr else ""
            raise RuntimeError(f"c_abi_step stopped: {error.strip()}")
        return float(line) * 1e-9

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def plan_step_candidate(
    count: int, size: int, threads: int
) -> tuple[Candidate | None, PlanStepProgram | None, str | None]:
    """The C ABI candidate for fp32 Adam over ``count`` tensors of ``size`` (the caller closes the
    program), or None and why it is skipped."""
    program, why = build()
    if program is None:
        return None, None, why
    running = PlanStepProgram(program, count, size, threads)
    candidate = Candidate(f"{LABEL} {threads}t", lambda: None, timed=running.seconds_per_step)
    return candidate, running, None
