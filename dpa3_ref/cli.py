"""The `dpa3` command line: `dpa3 eval`, `dpa3 demo`, `dpa3 check-invariance`, `dpa3 bench`.

Each subcommand lives in the module of its concept; this file only wires them up.
Errors that users can cause (a missing file, an unknown element) are `Dpa3Error`s and are
printed as one line with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dpa3_ref.errors import Dpa3Error

# subcommand -> (module that implements it, one-line help)
SUBCOMMANDS = {
    "eval": ("dpa3_ref.evaluate", "evaluate a model on a deepmd/npy system or an extxyz file"),
    "demo": ("dpa3_ref.demo", "build a model, evaluate a generated structure, run a short NVE MD"),
    "check-invariance": ("dpa3_ref.invariance", "property-test any potential for symmetry and smoothness"),
    "bench": ("dpa3_ref.benchmark", "time energy+forces of the water example model"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpa3", description="DPA3 reference implementation")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module_name=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args.module_name).run(args) or 0)
    except Dpa3Error as error:
        print(f"dpa3 {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
