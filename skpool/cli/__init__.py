"""The ``skpool`` command line: offline pooling of CNN feature files.

Subcommands (``skpool <command> --help`` for each):

- ``gmp``       generalized max pooling of a feature file (nothing to fit);
- ``fit``       fit a separability pooling operator on labelled features and save it;
- ``transform`` pool a feature file with a saved model;
- ``info``      describe a saved model.

Feature files are ``.npy`` (memory-mapped, read batch by batch), ``.npz`` (named arrays, the
features under ``--features-key``, labels under ``--labels-key``; read into memory) or raw
binary memmaps (``--shape``/``--dtype``, read batch by batch). Outputs are ``.npy`` or ``.npz``,
written to a temporary file and renamed into place, so a failed or interrupted run never leaves
a half-written output, and an output that names one of the command's inputs (directly, through
a symbolic or hard link, or by another relative path) is refused before anything is read.

Exit status: 0 on success; 1 for a problem with the files, the data or an option's value,
reported as one line on stderr; 2 for a usage error (argparse's convention: the usage and the
error on stderr); 130 when interrupted.

All pooling is done by the estimators (:class:`~skpool.GeneralizedMaxPooling`,
:class:`~skpool.SeparabilityPooling`); this package only reads, batches and writes: the parser
in ``_parser.py``, the estimators' parameters as options in ``_options.py`` (generated from
:mod:`skpool._parameters`, where the estimators take their defaults from), the subcommands in
``_commands.py``, reading and writing files in ``_files.py``. It imports numpy only: torch and
scikit-learn are imported by the commands that compute, so ``--help``, usage errors and
``skpool info`` on an ``.npz`` model answer without them.
"""

from __future__ import annotations

import sys

from ._commands import COMMANDS
from ._files import CommandError
from ._parser import build_parser

__all__ = ["main", "build_parser"]


# --------------------------------------------------------------------------------------------
# Entry point
def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 error, 2 usage, 130 ^C)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"skpool {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line, never a traceback
        if args.traceback:
            raise
        print(f"skpool {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CommandError, ValueError, TypeError, OSError)):
        return message
    return f"{type(exc).__name__}: {message} (rerun with --traceback for details)"


def __dir__():
    """Only the public API (not the modules this one imports) for ``dir()`` and completion."""
    return sorted(__all__)


if __name__ == "__main__":
    sys.exit(main())
