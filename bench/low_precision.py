"""16-bit storage against float32 (docs/spec.md section 22): Adam over one tensor, 2 threads.

Every configuration moves fewer bytes per element than float32's 28 (read param, grad and two
moments, write param and moments). Its bandwidth ceiling is float32's measured ceiling (the
bench's ``stream_add``: the same buffers read and written, no math) scaled by its bytes; the
measured ceiling of four bfloat16 buffers is shown too. torch's fused AdamW over bfloat16 (which
keeps bfloat16 moments and no master) is the peer where torch is installed.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

import fusedopt
from bench.algorithms import best_isa
from bench.timing import Candidate, Timing, measure

_SIZES = {"smoke": (10_000, Timing(1, 0.01)), "quick": (10**7, Timing(5, 0.2)),
          "full": (10**7, Timing(9, 0.3))}  # fmt: skip
_THREADS = 2

# (label, param dtype, state dtype, master weights, stochastic rounding, bytes per element)
_CONFIGS = [
    ("float32", "float32", None, False, False, 28),
    ("bfloat16 params and state", "bfloat16", None, False, False, 14),
    ("bfloat16, stochastic rounding", "bfloat16", None, False, True, 14),
    ("bfloat16 + float32 master, bfloat16 state", "bfloat16", None, True, False, 20),
    ("bfloat16 + float32 master and state", "bfloat16", "float32", True, False, 28),
    ("float16 params and state", "float16", None, False, False, 14),
    ("bfloat16 params, 8-bit state", "bfloat16", "int8", False, False, 10),
    ("float32 params, 8-bit state", "float32", "int8", False, False, 18),
]


def _array(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    from fusedopt._engine import numpy_dtype

    return rng.standard_normal(n).astype(np.float32).astype(numpy_dtype(dtype))


def _select() -> None:
    fusedopt.set_cpu_isa(best_isa())
    fusedopt.set_num_threads(_THREADS)


def low_precision_section(mode: str) -> str:
    n, timing = _SIZES[mode]
    print(f"[low precision] Adam over {n:,} elements", file=sys.stderr)
    rng = np.random.default_rng(0)
    candidates: list[Candidate] = []
    for label, dtype, state_dtype, master, stochastic, _ in _CONFIGS:
        param = _array(rng, n, dtype)
        grad = _array(rng, n, dtype)
        opt = fusedopt.Adam(
            [param], lr=1e-4, state_dtype=state_dtype, master_weights=master,
            stochastic_rounding=stochastic,
        )  # fmt: skip
        candidates.append(Candidate(label, lambda o=opt, g=grad: o.step([g]), _select))
    from fusedopt import _core

    for label, dtype in (("ceiling: float32 stream", "float32"), ("ceiling: bfloat16 stream",
                                                                  "bfloat16")):  # fmt: skip
        buffers = [_array(rng, n, dtype) for _ in range(4)]
        candidates.append(
            Candidate(
                label,
                lambda b=buffers: _core.stream_add([b[0]], [b[1]], [[b[2]], [b[3]]]),
                _select,
            )
        )
    torch_note = _torch_candidate(rng, n, candidates)
    seconds = measure(candidates, timing)
    base = seconds["float32"]
    ceiling_per_byte = seconds["ceiling: float32 stream"] / 28
    lines = [
        f"\n## Low precision: Adam over one tensor of {n:,} elements, {_THREADS} threads "
        f"({best_isa()})\n",
        "| configuration | bytes/element | ms/step | speed vs float32 | of its ceiling |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, *_, bytes_per_element in _CONFIGS:
        s = seconds[label]
        lines.append(
            f"| {label} | {bytes_per_element} | {s * 1e3:.2f} | {base / s:.2f}x | "
            f"{ceiling_per_byte * bytes_per_element / s:.2f} |"
        )
    for label in ("ceiling: float32 stream", "ceiling: bfloat16 stream"):
        lines.append(f"| {label} | {28 if 'float32' in label else 14} | "
                     f"{seconds[label] * 1e3:.2f} | | |")  # fmt: skip
    if "torch fused AdamW, bfloat16" in seconds:
        s = seconds["torch fused AdamW, bfloat16"]
        ours = seconds["bfloat16 + float32 master, bfloat16 state"]
        lines.append(f"| torch fused AdamW, bfloat16 (no master) | 14 | {s * 1e3:.2f} | "
                     f"{base / s:.2f}x | |")  # fmt: skip
        lines.append(
            f"\nfusedopt bfloat16 with a float32 master against torch's fused bfloat16 AdamW: "
            f"{s / ours:.2f}x.\n"
        )
    else:
        lines.append(f"\n{torch_note}\n")
    return "\n".join(lines) + "\n"


def _torch_candidate(rng: np.random.Generator, n: int, candidates: list[Candidate]) -> str:
    try:
        import torch
    except ImportError as error:
        return f"torch fused AdamW: skipped ({error})"
    param = torch.nn.Parameter(torch.from_numpy(_array(rng, n, "float32")).to(torch.bfloat16))
    param.grad = torch.from_numpy(_array(rng, n, "float32")).to(torch.bfloat16)
    opt: Any = torch.optim.AdamW([param], lr=1e-4, fused=True)

    def select() -> None:
        torch.set_num_threads(_THREADS)

    candidates.append(Candidate("torch fused AdamW, bfloat16", opt.step, select))
    return ""
