"""GPU benchmark: fusedopt's CUDA Adam against torch.optim.Adam (fused=True, foreach=True) and a
device-to-device copy moving the same bytes, float32, timed with CUDA events (median of repeats).

Adam reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq: 28 bytes per
element. The copy baseline copies a buffer of 14 bytes per element (14 read + 14 written), so
"% of copy" is Adam's effective bandwidth over the best the memory system does on that traffic.

Host time: for a step over many small tensors (10000 of 100 elements by default) the host's work
per step (describing and checking every array, planning and queueing the launches) can exceed
the device's. It is the time ``step()`` takes to return, with the queue drained before it
(``torch.cuda.synchronize()``) and the kernels left running after it, beside the step's CUDA-event
time; for fusedopt's NumPy-API ``fusedopt.Adam`` over torch CUDA tensors, ``fusedopt.torch.Adam``,
and torch's fused and foreach Adam.

Low precision: fusedopt.torch.AdamW over one tensor of 1e8 elements in float32, bfloat16 with a
float32 master, bfloat16 rounded stochastically and 8-bit state, against torch's fused AdamW in
float32 and bfloat16 (which keeps no master).

    python bench/gpu.py [--repeats 20] [--max-elements 1e9] [--host-tensors 10000]
                        [--host-size 100] [--output table.md]

Without a GPU (or without torch with CUDA, or fusedopt's CUDA backend) it prints one line saying
why and exits 0, so it is safe to run anywhere.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ADAM_BYTES_PER_ELEMENT = 28
CASES: list[tuple[str, list[int]]] = [
    ("1e6", [10**6]),
    ("1e8", [10**8]),
    ("1e9", [10**9]),
    ("10000 x 1000", [1000] * 10000),
]


def why_no_gpu() -> str | None:
    """The reason this benchmark cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    import fusedopt.cuda

    return fusedopt.cuda.unavailable_reason()


def time_ms(torch: Any, run: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of run() between two CUDA events, host launch time included."""
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_ms(torch: Any, total: int, repeats: int) -> float:
    source = torch.empty(total * ADAM_BYTES_PER_ELEMENT // 8, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    return time_ms(torch, lambda: target.copy_(source), repeats)


def fusedopt_ms(torch: Any, sizes: list[int], repeats: int) -> float:
    import fusedopt

    params = [torch.randn(s, device="cuda") for s in sizes]
    grads = [torch.randn(s, device="cuda") * 1e-3 for s in sizes]
    opt = fusedopt.Adam(params, lr=1e-4)
    return time_ms(torch, lambda: opt.step(grads), repeats)


def torch_ms(torch: Any, sizes: list[int], variant: str, repeats: int) -> float:
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.Adam(params, lr=1e-4, **{variant: True})
    return time_ms(torch, opt.step, repeats)


def host_ms(
    torch: Any, run: Callable[[], Any], repeats: int, warmup: int = 3
) -> tuple[float, float]:
    """Median milliseconds run() takes to return on the host (the device idle when it starts,
    its kernels left running), and median CUDA-event milliseconds of the same steps."""
    for _ in range(warmup):
        run()
    host, device = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        begin = time.perf_counter()
        run()
        host.append((time.perf_counter() - begin) * 1e3)
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end))
    return statistics.median(host), statistics.median(device)


def _host_contenders(torch: Any, sizes: list[int]) -> dict[str, Callable[[], Callable[[], Any]]]:
    """Each contender's setup, returning its step: made one at a time, so only one contender's
    buffers are on the device at once."""
    import fusedopt

    def numpy_api() -> Callable[[], Any]:
        params = [torch.randn(s, device="cuda") for s in sizes]
        grads = [torch.randn(s, device="cuda") * 1e-3 for s in sizes]
        opt = fusedopt.Adam(params, lr=1e-4)
        return lambda: opt.step(grads)

    def torch_front() -> Callable[[], Any]:
        import fusedopt.torch

        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in sizes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        return fusedopt.torch.Adam(params, lr=1e-4).step

    def torch_optim(variant: str) -> Callable[[], Callable[[], Any]]:
        def make() -> Callable[[], Any]:
            params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in sizes]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            return torch.optim.Adam(params, lr=1e-4, **{variant: True}).step

        return make

    return {
        "fusedopt.Adam": numpy_api,
        "fusedopt.torch.Adam": torch_front,
        "torch fused": torch_optim("fused"),
        "torch foreach": torch_optim("foreach"),
    }


def bench_host(torch: Any, sizes: list[int], repeats: int) -> dict[str, tuple[float, float]]:
    result = {}
    for name, make in _host_contenders(torch, sizes).items():
        result[name] = host_ms(torch, make(), repeats)
        gc.collect()
        torch.cuda.empty_cache()
    return result


def host_markdown(count: int, size: int, timings: dict[str, tuple[float, float]]) -> str:
    lines = [
        f"Host time per step, Adam float32, {count} tensors of {size}: median ms until step() "
        "returns (queue drained before it) and CUDA-event ms of the same steps.",
        "",
        "| contender | host ms | device ms (events) | host ÷ fusedopt.torch host |",
        "|---|---:|---:|---:|",
    ]
    ours = timings.get("fusedopt.torch.Adam", (float("nan"), 0.0))[0]
    for name, (host, device) in timings.items():
        lines.append(f"| {name} | {host:.3f} | {device:.3f} | {host / ours:.2f}x |")
    return "\n".join(lines)


def bench_case(torch: Any, sizes: list[int], repeats: int) -> dict[str, float]:
    """Each contender alone on the device: its buffers are freed before the next one starts."""
    measures = {
        "copy": lambda: copy_ms(torch, sum(sizes), repeats),
        "fusedopt": lambda: fusedopt_ms(torch, sizes, repeats),
        "torch fused": lambda: torch_ms(torch, sizes, "fused", repeats),
        "torch foreach": lambda: torch_ms(torch, sizes, "foreach", repeats),
    }
    result = {}
    for name, measure in measures.items():
        result[name] = measure()
        gc.collect()
        torch.cuda.empty_cache()
    return result


LOW_PRECISION = {
    "float32": (None, {}),
    "bfloat16 + float32 master": ("bfloat16", dict(master_weights=True)),
    "bfloat16, stochastic rounding": ("bfloat16", dict(stochastic_rounding=True, seed=0)),
    "bfloat16 + master, 8-bit state": ("bfloat16", dict(master_weights=True, state_dtype="int8")),
    "float32, 8-bit state": (None, dict(state_dtype="int8")),
}


def bench_low_precision(torch: Any, total: int, repeats: int) -> dict[str, float]:
    """fusedopt.torch.AdamW in each low-precision configuration over one tensor of ``total``
    elements, and torch's fused AdamW in float32 and bfloat16 (which keeps no master)."""
    import fusedopt.torch

    def step_ms(optimizer_class: Any, dtype: Any, **options: Any) -> float:
        param = torch.nn.Parameter(torch.randn(total, device="cuda", dtype=dtype))
        param.grad = (torch.randn(total, device="cuda") * 1e-3).to(dtype)
        opt = optimizer_class([param], lr=1e-4, **options)
        try:
            return time_ms(torch, opt.step, repeats)
        finally:
            del opt, param
            gc.collect()
            torch.cuda.empty_cache()

    result = {}
    for name, (dtype, options) in LOW_PRECISION.items():
        dtype = getattr(torch, dtype or "float32")
        result[f"fusedopt {name}"] = step_ms(fusedopt.torch.AdamW, dtype, **options)
    for dtype in ("float32", "bfloat16"):
        result[f"torch fused {dtype}"] = step_ms(
            torch.optim.AdamW, getattr(torch, dtype), fused=True
        )
    return result


def low_precision_markdown(total: int, timings: dict[str, float]) -> str:
    ours = timings["fusedopt float32"]
    lines = [
        f"AdamW over one tensor of {total:.3g} elements: median ms per step (CUDA events).",
        "",
        "| configuration | ms | fusedopt float32 ÷ this |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ms:.3f} | {ours / ms:.2f}x |" for name, ms in timings.items()]
    return "\n".join(lines)


def markdown(rows: list[tuple[str, int, dict[str, float]]], device: str) -> str:
    lines = [
        f"Adam, float32, {device}; median ms per step (CUDA events); GB/s = 28 bytes/element.",
        "",
        "| case | elements | copy ms | copy GB/s | fusedopt ms | fusedopt GB/s | % of copy "
        "| torch fused ms | torch foreach ms | fused / fusedopt | foreach / fusedopt |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, total, t in rows:
        moved = total * ADAM_BYTES_PER_ELEMENT / 1e9
        lines.append(
            f"| {label} | {total:.3g} | {t['copy']:.3f} | {moved / t['copy'] * 1e3:.0f} "
            f"| {t['fusedopt']:.3f} | {moved / t['fusedopt'] * 1e3:.0f} "
            f"| {100 * t['copy'] / t['fusedopt']:.0f}% | {t['torch fused']:.3f} "
            f"| {t['torch foreach']:.3f} | {t['torch fused'] / t['fusedopt']:.2f}x "
            f"| {t['torch foreach'] / t['fusedopt']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-elements", type=float, default=1e9, help="skip larger cases")
    parser.add_argument("--host-tensors", type=int, default=10000, help="host-time case: count")
    parser.add_argument("--host-size", type=int, default=100, help="host-time case: elements each")
    parser.add_argument("--output", help="also write the Markdown tables to this file")
    args = parser.parse_args(argv)

    reason = why_no_gpu()
    if reason is not None:
        print(f"bench/gpu.py: skipped, no GPU to run on ({reason})")
        return 0
    import torch

    rows = []
    for label, sizes in CASES:
        if sum(sizes) > args.max_elements:
            continue
        repeats = max(3, args.repeats // 4) if sum(sizes) >= 10**9 else args.repeats
        timings = bench_case(torch, sizes, repeats)
        rows.append((label, sum(sizes), timings))
        print(f"{label}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in timings.items()), flush=True)
    table = markdown(rows, torch.cuda.get_device_name())
    host = bench_host(torch, [args.host_size] * args.host_tensors, args.repeats)
    print(
        "host: " + ", ".join(f"{k} {h:.3f} ms (device {d:.3f})" for k, (h, d) in host.items()),
        flush=True,
    )
    table += "\n\n" + host_markdown(args.host_tensors, args.host_size, host)
    total = int(min(1e8, args.max_elements))
    low = bench_low_precision(torch, total, args.repeats)
    print("low precision: " + ", ".join(f"{k} {v:.3f} ms" for k, v in low.items()), flush=True)
    table += "\n\n" + low_precision_markdown(total, low)
    print(table)
    if args.output:
        with open(args.output, "w") as out:
            out.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
