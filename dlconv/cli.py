"""The ``dlconv`` command (also ``python -m dlconv``).

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; those modules import nothing heavy at import time, so ``dlconv
--help`` and ``dlconv explain`` stay fast and never import TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand → (module, one-line help)
COMMANDS = {
    "info": ("dlconv.info", "versions, compiled extensions, GPUs, and which backends run here"),
    "explain": ("dlconv.explain", "convolution index arithmetic, step by step (teaching)"),
    "bench": ("dlconv.bench", "benchmark the kernels against TensorFlow/oneDNN (the main job)"),
    "train": ("dlconv.train", "train a workshop model on MNIST with dlconv layers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlconv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # a subcommand whose module is missing is reported, not fatal
            p = sub.add_parser(name, help=f"(unavailable: {exc})")
            p.set_defaults(_run=lambda args, e=exc: _unavailable(e))
            continue
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _unavailable(exc) -> int:
    print(f"dlconv: this command is unavailable: {exc}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"dlconv {args.command}: error: {exc}\n")
