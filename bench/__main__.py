"""``python -m bench``: run the suite, print a Markdown report, write a PNG chart.

Modes: the full run (several minutes; the one bench/RESULTS.md records), ``--quick`` (float32,
the sizes the targets name, GPT-2's shapes with 2 blocks instead of 12; about three minutes on 2
cores) and ``--smoke`` (tiny sizes, one round: proves every path runs, measures nothing).

torch's OpenMP workers spin on their cores after each parallel region unless OMP_WAIT_POLICY is
PASSIVE when torch loads, stealing a core from whatever runs next: the suite sets it (unless the
environment already does) before anything imports torch.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.cases import make_plan, run_all  # noqa: E402
from bench.keras_front import keras_train_on_batch  # noqa: E402
from bench.low_precision import low_precision_section  # noqa: E402
from bench.report import markdown, write_chart  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="float32 only, about three minutes")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument(
        "--chart",
        type=Path,
        default=Path("bench/results.png"),
        help="where the PNG chart goes (default: %(default)s)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"

    results = run_all(make_plan(mode_name))
    report = (
        markdown(results, mode_name)
        + low_precision_section(mode_name)
        + keras_train_on_batch(mode_name)
    )
    print(report, end="")
    if args.markdown:
        args.markdown.write_text(report)
    if write_chart(results, args.chart):
        print(f"chart: {args.chart}", file=sys.stderr)
    else:
        print("matplotlib is not installed: no chart", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
