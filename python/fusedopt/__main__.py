"""Command line: ``python -m fusedopt demo`` runs the demo; ``python -m fusedopt --help``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedopt", description=__doc__)
    parser.add_argument(
        "--cmake-dir",
        action="store_true",
        help="print the folder of the CMake package, for find_package(fusedopt CONFIG)",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("demo", help="run every optimizer on the demo problems", add_help=False)
    commands.add_parser("info", help="print the version, the CPU ISAs and the thread count")
    args, rest = parser.parse_known_args(argv)
    if args.cmake_dir:
        import fusedopt

        print(fusedopt.get_cmake_dir())
        return 0
    if args.command == "demo":
        from fusedopt import demo

        return demo.main(rest)
    if args.command == "info":
        import fusedopt

        print(f"fusedopt {fusedopt.__version__}")
        print(f"cpu isa: {fusedopt.cpu_isa()} (available: {', '.join(fusedopt.available_isas())})")
        print(f"threads: {fusedopt.num_threads()}")
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
