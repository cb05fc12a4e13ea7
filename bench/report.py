"""Markdown tables, the issue's targets checked against the measured figures, and the chart."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import numpy as np

import fusedopt
from bench.algorithms import ALGORITHMS, best_isa, fusedopt_label
from bench.cases import Result

TORCH_LABELS = ["torch for-loop", "torch foreach", "torch fused"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _number(x: float | None, digits: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:.{digits}g}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _elements(n: int) -> str:
    return f"{n:.0e}".replace("e+0", "e")


def machine_summary() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        cpu = f"{fields['Model name'].strip()}, {fields['CPU(s)'].strip()} CPUs"
    except (OSError, subprocess.CalledProcessError, KeyError):
        cpu = platform.processor() or platform.machine()
    versions = [f"numpy {np.__version__}"]
    for module in ("torch", "pandas"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"{module} not installed")
    return "\n".join(
        [
            f"- Machine: {cpu}",
            f"- Python {platform.python_version()}, " + ", ".join(versions),
            f"- fusedopt {fusedopt.__version__}, ISAs {', '.join(fusedopt.available_isas())}"
            f" (default {best_isa()})",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        ]
    )


def _flat_labels(results: list[Result]) -> list[str]:
    labels: list[str] = []
    for r in results:
        labels += [label for label in r.seconds if label not in labels]
    return labels


def flat_table(results: list[Result]) -> str:
    """ns per element of every candidate, then the ratios the targets are about."""
    labels = _flat_labels(results)
    best = fusedopt_label(best_isa(), 2)
    header = (
        ["algorithm", "dtype", "elements"]
        + labels
        + [
            f"{best} µs/step",
            "fraction of ceiling 2t",
            "torch fused ÷ fusedopt",
            "torch foreach ÷ fusedopt",
        ]
    )
    rows = []
    for r in results:
        ns = {label: s / r.elements * 1e9 for label, s in r.seconds.items()}
        b = r.seconds.get(best)
        rows.append(
            [str(r.case["algorithm"]), str(r.case["dtype"]), _elements(r.elements)]
            + [_number(ns.get(label)) for label in labels]
            + [
                _number(b * 1e6 if b else None),
                _number(_ratio(r.seconds.get("ceiling 2t"), b), 2),
                _number(_ratio(r.seconds.get("torch fused"), b), 2),
                _number(_ratio(r.seconds.get("torch foreach"), b), 2),
            ]
        )
    return _table(header, rows)


def many_table(results: list[Result]) -> str:
    labels = _flat_labels(results)
    best = fusedopt_label(best_isa(), 2)
    flat = results[0].seconds
    header = (
        ["tensors"]
        + [f"{label} ms" for label in labels]
        + ["fusedopt ÷ its flat", "torch fused ÷ its flat"]
    )
    rows = []
    for r in results:
        rows.append(
            [f"{r.case['count']} × {r.case['size']}"]
            + [_number(r.seconds.get(label, np.nan) * 1e3) for label in labels]
            + [
                _number(_ratio(r.seconds.get(best), flat.get(best)), 2),
                _number(_ratio(r.seconds.get("torch fused"), flat.get("torch fused")), 2),
            ]
        )
    return _table(header, rows)


def ewma_table(results: list[Result]) -> str:
    labels = _flat_labels(results)
    rows = []
    for r in results:
        shape = " × ".join(str(s) for s in r.case["shape"])
        rows.append(
            [shape]
            + [_number(r.seconds[label] * 1e3) for label in labels]
            + [_number(_ratio(r.seconds.get("pandas"), r.seconds.get("fusedopt 2t")), 2)]
        )
    return _table(["shape"] + [f"{label} ms" for label in labels] + ["pandas ÷ fusedopt 2t"], rows)


def contention_table(result: Result) -> str:
    rows = []
    for label in result.case["labels"]:
        idle, loaded = result.seconds[f"{label} idle"], result.seconds[f"{label} loaded"]
        rows.append([label, _number(idle * 1e6), _number(loaded * 1e6), _number(loaded / idle, 2)])
    return _table(["candidate (2 threads)", "idle µs", "one core busy µs", "busy ÷ idle"], rows)


def _find(results: list[Result], section: str, **case: object) -> Result | None:
    for r in results:
        if r.section == section and all(r.case.get(k) == v for k, v in case.items()):
            return r
    return None


def targets(results: list[Result]) -> list[tuple[str, bool | None, str]]:
    """(target, met, measured figures) for each of the issue's targets that the suite measures;
    met is None where this run did not measure it."""
    best = fusedopt_label(best_isa(), 2)
    out: list[tuple[str, bool | None, str]] = []

    large = [
        r
        for r in results
        if r.section == "flat" and r.case["dtype"] == "float32" and r.elements >= 10_000_000
    ]
    if large:
        fractions = {
            f"{r.case['algorithm']} {_elements(r.elements)}": r.seconds["ceiling 2t"]
            / r.seconds[best]
            for r in large
        }
        worst = min(fractions, key=fractions.get)
        figures = ", ".join(f"{k} {v:.2f}" for k, v in fractions.items())
        out.append(
            (
                "1a. every algorithm ≥ 90% of its ceiling at ≥ 1e7",
                all(v >= 0.9 for v in fractions.values()),
                f"lowest {worst} {fractions[worst]:.2f}; {figures}",
            )
        )
        adam = [r for r in large if r.case["algorithm"] == "adam" and "torch fused" in r.seconds]
        if adam:
            speedups = {
                _elements(r.elements): r.seconds["torch fused"] / r.seconds[best] for r in adam
            }
            out.append(
                (
                    "1b. Adam at ≥ 1e7 at least as fast as torch fused",
                    all(v >= 1 for v in speedups.values()),
                    ", ".join(f"{k}: torch fused ÷ fusedopt {v:.2f}" for k, v in speedups.items()),
                )
            )
    r = _find(results, "flat", algorithm="adam", dtype="float32", n=100_000)
    if r and "torch fused" in r.seconds:
        speedup = r.seconds["torch fused"] / r.seconds[best]
        out.append(
            (
                "2. Adam 1e5 ≥ 1.5× torch fused",
                speedup >= 1.5,
                f"{speedup:.2f}× ({r.seconds[best] * 1e6:.1f} vs "
                f"{r.seconds['torch fused'] * 1e6:.1f} µs)",
            )
        )
    r = _find(results, "flat", algorithm="adam", dtype="float32", n=1000)
    if r:
        micro = r.seconds[best] * 1e6
        out.append(("3. one 1e3 tensor ≤ 5 µs per step()", micro <= 5, f"{micro:.1f} µs"))
    many = [r for r in results if r.section == "many"]
    if len(many) > 1:
        flat = many[0].seconds[best]
        limits = {1000: 1.3, 10_000: 2.0}
        for r in many[1:]:
            limit = limits.get(int(r.case["count"]), 2.0)
            ratio = r.seconds[best] / flat
            out.append(
                (
                    f"4. {r.case['count']} × {r.case['size']} within {limit}× of one flat tensor",
                    ratio <= limit,
                    f"{ratio:.2f}× ({r.seconds[best] * 1e3:.2f} vs {flat * 1e3:.2f} ms)",
                )
            )
    for name in ("rmsprop", "adagrad", "nesterov"):
        rows = [r for r in large if r.case["algorithm"] == name and "torch foreach" in r.seconds]
        for r in rows:
            speedup = r.seconds["torch foreach"] / r.seconds[best]
            out.append(
                (
                    f"5. {name} {_elements(r.elements)} ≥ 5× torch foreach",
                    speedup >= 5,
                    f"{speedup:.2f}×",
                )
            )
    for r in results:
        if r.section == "ewma":
            speedup = r.seconds["pandas"] / r.seconds["fusedopt 2t"]
            two_d = len(r.case["shape"]) == 2
            need = 10.0 if two_d else 1.0
            shape = " × ".join(str(s) for s in r.case["shape"])
            out.append((f"6. EWMA {shape} ≥ {need:g}× pandas", speedup >= need, f"{speedup:.2f}×"))
    for r in results:
        if r.section == "contention":
            for label in r.case["labels"]:
                ratio = r.seconds[f"{label} loaded"] / r.seconds[f"{label} idle"]
                if label.startswith("fusedopt"):
                    out.append(
                        (
                            "7. one core busy: within 2× of idle",
                            ratio <= 2,
                            f"{label}: {ratio:.2f}×",
                        )
                    )
                else:
                    out.append((f"7. (for comparison) {label}", None, f"{ratio:.2f}×"))
    return out


def markdown(results: list[Result], mode: str) -> str:
    flat = [r for r in results if r.section == "flat"]
    by_size = [r for r in flat if r.case["algorithm"] == "adam"]
    sections = [
        f"# fusedopt CPU benchmark ({mode} run)",
        machine_summary(),
        "Medians over interleaved rounds. fusedopt runs through its Python optimizer API; torch "
        "at 2 intra-op threads; the ceiling is `_core.stream_add` (p += g and each state += g over "
        'the algorithm\'s own buffers). "fraction of ceiling" = ceiling time ÷ fusedopt time, '
        'both at 2 threads; "X ÷ fusedopt" > 1 means fusedopt is faster.',
        "## Adam, one flat tensor, by size (ns per element)",
        _table_or_none(by_size, flat_table),
        "## Every algorithm (ns per element)",
        _table_or_none(flat, flat_table),
        "## Many tensors: Adam float32, new grad arrays every step (ms per step)",
        _table_or_none([r for r in results if r.section == "many"], many_table),
        "## EWMA against pandas (ms)",
        _table_or_none([r for r in results if r.section == "ewma"], ewma_table),
        "## Contention: one 1e3-element Adam step, another process keeping one core busy",
        "\n\n".join(contention_table(r) for r in results if r.section == "contention") or "–",
        "## Targets",
        "\n".join(
            f"- {'MET' if met else 'NOT MET' if met is not None else 'info'}: {name}: {figures}"
            for name, met, figures in targets(results)
        ),
    ]
    return "\n\n".join(sections) + "\n"


def _table_or_none(results: list[Result], make) -> str:
    return make(results) if results else "–"


def write_chart(results: list[Result], path: Path) -> bool:
    """ns per element of every algorithm at the largest float32 size that has them all, and
    Adam by size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    best = fusedopt_label(best_isa(), 2)
    labels = [best, "torch fused", "torch foreach", "numpy", "ceiling 2t"]
    flat = [r for r in results if r.section == "flat" and r.case["dtype"] == "float32"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    if flat:
        sizes = {r.elements for r in flat}
        largest = max(sizes, key=lambda n: (sum(r.elements == n for r in flat), n))
        rows = [r for r in flat if r.elements == largest]
        rows.sort(key=lambda r: list(ALGORITHMS).index(r.case["algorithm"]))
        width = 0.8 / len(labels)
        for k, label in enumerate(labels):
            values = [r.seconds.get(label, np.nan) / r.elements * 1e9 for r in rows]
            left.bar(np.arange(len(rows)) + k * width, values, width, label=label)
        left.set_xticks(np.arange(len(rows)) + 0.4 - width / 2)
        left.set_xticklabels([str(r.case["algorithm"]) for r in rows], rotation=30)
        left.set_yscale("log")
        left.set_ylabel("ns per element (lower is better)")
        left.set_title(f"float32, {_elements(largest)} elements, 2 threads")
        left.legend()
        adam = sorted((r for r in flat if r.case["algorithm"] == "adam"), key=lambda r: r.elements)
        for label in labels:
            right.plot(
                [r.elements for r in adam],
                [r.seconds.get(label, np.nan) / r.elements * 1e9 for r in adam],
                marker="o",
                label=label,
            )
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xlabel("elements")
        right.set_ylabel("ns per element")
        right.set_title("Adam float32 by size")
        right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
