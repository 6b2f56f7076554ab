"""The ``dlconv`` command (also ``python -m dlconv``).

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; those modules import nothing heavy at import time, so ``dlconv
--help`` and ``dlconv explain`` stay fast and never import TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: The errors a command reports as one line and exit status 2 (bad input, files, memory,
#: a backend or framework this machine lacks).  Anything else is a bug and keeps its
#: traceback; DLCONV_TRACEBACK=1 shows the traceback of these too.
USER_ERRORS = (ValueError, TypeError, OSError, MemoryError, ImportError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its usage errors on one line (exit status 2, as argparse)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError):
        return "out of memory" + (f": {text}" if text else "") + " (ask for a smaller case)"
    if isinstance(exc, OSError) and not text:
        return type(exc).__name__
    return text or type(exc).__name__

# subcommand → (module, one-line help)
COMMANDS = {
    "info": ("dlconv.info", "versions, compiled extensions, GPUs, and which backends run here"),
    "explain": ("dlconv.explain", "convolution index arithmetic, step by step (teaching)"),
    "bench": ("dlconv.bench", "benchmark the kernels against TensorFlow/oneDNN (the main job)"),
    "train": ("dlconv.train", "train a workshop model (MNIST) or the ECAL ResNet (generated showers) with dlconv layers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dlconv", description=__doc__.splitlines()[0])
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
    """Run one command; every error of dlconv's own (see :data:`USER_ERRORS`) ends in one line
    on stderr and exit status 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .backends.base import BackendUnavailable
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        parser.exit(130, f"dlconv {args.command}: interrupted\n")
    except USER_ERRORS + (BackendUnavailable,) as exc:
        if os.environ.get("DLCONV_TRACEBACK"):
            raise
        parser.exit(2, f"dlconv {args.command}: error: {_one_line(exc)}\n")
