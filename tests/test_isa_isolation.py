"""The installed binaries run on any x86-64 CPU: AVX and AVX-512 instructions appear only in the
dispatched kernel compiles, never in code that runs before the CPU check (the SIGILL bug of
DeepSpeed and bitsandbytes, where one ISA flag on a whole target reached shared code)."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import fusedopt

pytestmark = [
    pytest.mark.skipif(
        platform.machine().lower() not in ("x86_64", "amd64"),
        reason="the per-ISA kernels and this check exist on x86-64 only",
    ),
    pytest.mark.skipif(
        shutil.which("objdump") is None, reason="objdump (binutils) is not installed"
    ),
]

PACKAGE_DIR = Path(fusedopt.__file__).resolve().parent
# Demangled names of the functions that only run after dispatch chose their ISA. Nothing may
# precede the namespace but a return type without template arguments, so a std:: function
# instantiated for a kernel type does not count as a kernel.
DISPATCHED = re.compile(r"^(?:[^<(]*\s)?fusedopt::(?:cpu|math)::(avx2|avx512)::")
FUNCTION_START = re.compile(r"^[0-9a-f]+ <(.*)>:$")
# VEX/EVEX-encoded instructions (every AVX mnemonic starts with v, the mask ones with k) on
# vector or mask registers; the legacy SSE2 of the x86-64 baseline is fine anywhere.
AVX_REGISTER = re.compile(r"%(?:[xyz]mm\d+|k[0-7])\b")


def binaries() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.so*") if p.is_file())


def avx_instructions_by_function(binary: Path) -> Counter[str]:
    """How many AVX instructions each function of ``binary`` holds, by demangled name."""
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", str(binary)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    counts: Counter[str] = Counter()
    function = "<before any symbol>"
    for line in listing.splitlines():
        start = FUNCTION_START.match(line)
        if start:
            function = start.group(1).removesuffix("@@Base")
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        instruction = fields[1]
        if instruction[:1] in ("v", "k") and AVX_REGISTER.search(instruction):
            counts[function] += 1
    return counts


def test_the_package_has_native_binaries_to_check() -> None:
    names = [p.name for p in binaries()]
    assert any(name.startswith("_core") for name in names), names
    assert "libfusedopt.so" in names, names


@pytest.mark.parametrize("binary", binaries(), ids=lambda p: p.name)
def test_avx_instructions_only_in_dispatched_kernels(binary: Path) -> None:
    counts = avx_instructions_by_function(binary)
    outside = {name: n for name, n in counts.items() if not DISPATCHED.match(name)}
    assert not outside, (
        f"{binary.name}: AVX instructions outside fusedopt::cpu::avx2/avx512 would crash CPUs "
        f"without AVX: {outside}"
    )
    # A stripped binary would hide every kernel behind one symbol and pass vacuously: the kernels
    # must be found, by name, under both namespaces.
    isas_seen = {DISPATCHED.match(name).group(1) for name in counts}
    if binary.name.startswith(("_core", "libfusedopt")):
        assert isas_seen == {"avx2", "avx512"}, (
            f"{binary.name}: expected AVX2 and AVX-512 kernels by name, found {sorted(isas_seen)}"
            " (is the binary stripped?)"
        )
