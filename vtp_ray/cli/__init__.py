"""The ``vtp-ray`` command: info, reconstruct, verify, bench (one process) and tokenize, eval (Ray Data jobs).

This package is the only place that knows argparse: every command turns its flags into the library's typed
arguments and calls one library function.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import jobs, model

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtp-ray", description="VTP visual tokenizer: model commands and Ray Data jobs"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    model.register(sub)
    jobs.register(sub)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix (a wrong flag, path, device or input): one line, no traceback."""
    from ..metrics.dependencies import MissingEvalDependencyError
    from ..model import CheckpointError
    from ..pipeline.served import ServedModelChanged
    from ..text.tokenizer import MissingTextDependencyError

    errors: tuple[type[Exception], ...] = (
        FileNotFoundError,
        ValueError,
        ConnectionError,
        CheckpointError,
        MissingEvalDependencyError,
        MissingTextDependencyError,
        ServedModelChanged,
    )
    # vtp_ray.device imports torch: a command that never loaded it (a Ray Data job's driver) cannot have raised its
    # error, and reporting a bad input must not cost seconds of importing torch.
    device = sys.modules.get("vtp_ray.device")
    return (*errors, device.DeviceUnavailableError) if device else errors


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"vtp-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
