"""The `dpa3` command line: `dpa3 train`, `dpa3 test`, `dpa3 eval`, `dpa3 export`, `dpa3 demo`, `dpa3 check-invariance`, `dpa3 bench`.

Each subcommand lives in the module of its concept; this file only wires them up.
Errors that users can cause (a missing file, an unknown element) are `Dpa3Error`s and are
printed as one line with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dpa3_ref.errors import Dpa3Error

# subcommand -> (module that implements it, one-line help)
SUBCOMMANDS = {
    "train": ("dpa3_ref.train", "train a DPA3 model from a deepmd-kit input.json (single or multitask)"),
    "test": ("dpa3_ref.testing", "RMSE/MAE of a model on labelled systems, like dp test"),
    "eval": ("dpa3_ref.evaluate", "evaluate a model on a deepmd/npy system or an extxyz file"),
    "demo": ("dpa3_ref.demo", "build a model, evaluate a generated structure, run a short NVE MD"),
    "export": ("dpa3_ref.export_onnx", "export a model to ONNX (energy, forces and virial in the graph)"),
    "check-invariance": ("dpa3_ref.invariance", "property-test any potential for symmetry and smoothness"),
    "bench": ("dpa3_ref.benchmark", "time energy+forces of the water example model"),
}
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # GLIBC_TUNABLES value the command restarts itself with


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _restart_with_huge_pages()
    parser = argparse.ArgumentParser(prog="dpa3", description="DPA3 reference implementation")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module_name=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args.module_name).run(args) or 0)
    except _user_errors() as error:
        print(f"dpa3 {args.command}: error: {error}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[Exception], ...]:
    """Dpa3Error, and the JAX-free ONNX client's own error class where that client is installed."""
    try:
        from dpa3_onnx import Dpa3OnnxError
    except ImportError:
        return (Dpa3Error,)
    return (Dpa3Error, Dpa3OnnxError)


def _restart_with_huge_pages() -> None:
    """Re-run this command once with glibc's transparent-huge-page tunable (Linux only).

    XLA on CPU allocates its temporaries (hundreds of MB for a few hundred atoms) afresh on every call;
    glibc maps them from the kernel each time and every 4 KiB page faults. On small virtual machines the
    faults took half the run time (530k per energy+forces call of the water model at 192 atoms); with
    2 MiB pages they are ~1k. Tunables are read at process start, hence the re-exec. Set GLIBC_TUNABLES
    yourself (even to an empty string) to opt out.
    """
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = HUGE_PAGES_TUNABLE
        os.execv(sys.executable, [sys.executable, "-m", "dpa3_ref.cli", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
