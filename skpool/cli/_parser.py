"""The ``skpool`` command line's parser: its subcommands, their options and the types of
their arguments (numpy and the standard library only, so ``--help`` answers at once)."""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

from .._grid import parse_grid

#: Estimator parameters -> the ``args`` attribute (option) that sets them. Every parameter of
#: the estimator is an option or listed in ``_NOT_OPTIONS`` with the reason (a test holds the
#: CLI to the estimators' parameters and defaults). ``dtype`` is ``--precision`` because
#: ``--dtype`` names the element type of a raw feature file.
_RENAMED = {"dtype": "precision"}
_NOT_OPTIONS = {
    "distributed": "the command line runs one process",
    "verbose": "progress bars follow -q/--quiet: shown on a terminal unless -q, like gmp's and "
    "transform's",
}

_EPILOG = """\
examples:
  # fit a separability operator on labelled maps (n, H, W, C), keep it as plain arrays
  skpool fit train.npz -o model.npz --alpha 1 --stride 2
  skpool fit train_X.npy --labels train_y.npy -o model.npz --n-components 2
  # pool new maps with it: (n, H, W, C) -> (n, H', W', k*C)
  skpool transform model.npz test.npz -o test_pooled.npz
  # generalized max pooling of every map into one vector: (n, H, W, C) -> (n, C)
  skpool gmp test.npz -o test_gmp.npy --lam 10
  # a raw float32 memmap of 7x7x512 maps (their number follows from the file size)
  skpool gmp feats.dat --shape 7,7,512 --dtype float32 -o gmp.npy
  skpool info model.npz

Feature arrays are (n, H, W, C) maps (channels last), (n, N, C) stacks (use --grid-shape H,W
for their grid) or (n, F): F single-channel locations on an Fx1 grid, or flattened (H, W, C)
maps with --grid-shape H,W. --device auto uses CUDA when available (gmp, fit, transform).

exit status: 0 success; 1 bad files, data or option values (one line on stderr); 2 usage
errors (argparse: usage and error on stderr); 130 interrupted. The output (-o) may not be one
of the inputs.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``skpool`` and its subcommands."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="skpool",
        description=_wrap(
            "Learned pooling of CNN feature files: separability pooling (Birodkar et al. 2019) "
            "and generalized max pooling (Murray & Perronnin 2014)."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"skpool {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    pooling = [_feature_options(), _computation_options()]

    gmp = _add_command(
        commands, "gmp", pooling,
        "generalized max pooling of a feature file",
        "Pool every sample's N local descriptors into one C-vector by generalized max pooling, "
        "xi = (Phi^T Phi + lam I)^-1 Phi^T 1 (Murray & Perronnin 2014). (n, H, W, C) or "
        "(n, N, C) features give (n, C).",
        ["skpool gmp maps.npy -o pooled.npy --lam 10",
         "skpool gmp feats.dat --shape 7,7,512 -o pooled.npz"],
    )
    gmp.add_argument("features", type=Path, help="feature file (.npy, .npz or raw memmap)")
    gmp.add_argument("-o", "--output", type=Path, required=True, help="output .npy or .npz")
    gmp.add_argument(
        "--lam",
        type=_positive_float,
        default=1.0,
        help="ridge lambda > 0 (default: 1.0); small values equalise the descriptors like max "
        "pooling, large ones approach sum pooling",
    )
    gmp.add_argument(
        "--lam-scale",
        dest="lam_scale",
        choices=("relative", "absolute"),
        default="relative",
        help="relative (default): lambda in units of each sample's mean squared descriptor "
        "norm, trace(Phi^T Phi)/N, so the result does not depend on the features' scale; "
        "absolute: the papers' lambda",
    )
    gmp.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        help="do not l2-normalise the pooled vectors",
    )

    fit = _add_command(
        commands, "fit", pooling,
        "fit a separability pooling operator and save it",
        "Learn a separability pooling operator (Birodkar et al. 2019) from labelled feature "
        "maps and save the fitted model: .npz for plain arrays (loadable by "
        "skpool.io.load_operator and skpool.nn.SeparabilityPool2d), .joblib/.pkl for the "
        "whole scikit-learn estimator.",
        ["skpool fit train.npz -o model.npz --alpha 1 --stride 2",
         "skpool fit train_X.npy --labels train_y.npy -o model.joblib --n-components 2"],
    )
    fit.add_argument("features", type=Path, help="training features (.npy, .npz or raw)")
    fit.add_argument(
        "-o", "--output", type=Path, required=True, help="model file (.npz, .joblib or .pkl)"
    )
    fit.add_argument(
        "--labels",
        type=Path,
        help="labels file (.npy, .npz or .txt, one label per line); default: the "
        "--labels-key array of an .npz features file",
    )
    _separability_options(fit.add_argument_group("separability pooling"))

    transform = _add_command(
        commands, "transform", pooling,
        "pool a feature file with a saved model",
        "Transform features with a model saved by 'skpool fit' (.npz operator file, or any "
        "estimator pickled with joblib). (n, H, W, C) maps give (n, H', W', k*C).",
        ["skpool transform model.npz test.npz -o test_pooled.npz"],
    )
    transform.add_argument("model", type=Path, help="model file (.npz, .joblib or .pkl)")
    transform.add_argument("features", type=Path, help="feature file (.npy, .npz or raw)")
    transform.add_argument("-o", "--output", type=Path, required=True,
                           help="output .npy or .npz")

    info = _add_command(
        commands, "info", [],
        "describe a saved model",
        "Print what a saved model holds: its input and output grids, components, channels, "
        "classes, parameters and the generalised eigenvalues of its rows on the training data "
        "(p'Ap / p'(B + alpha C_m)p, the locality term included; not the separability ratios "
        "p'Ap / p'Bp of SeparabilityPooling.separability_ratios). An .npz model is read with "
        "numpy alone.",
        ["skpool info model.npz --json"],
    )
    info.add_argument("model", type=Path, help="model file (.npz, .joblib or .pkl)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)
    return parser


def _add_command(commands, name, parents, summary, description, examples):
    """A subcommand with its one-line help, a wrapped description and an examples epilog."""
    command = commands.add_parser(
        name,
        parents=parents,
        help=summary,
        description=_wrap(description),
        epilog="examples:\n" + "".join(f"  {example}\n" for example in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return command


def _computation_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("computation")
    group.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA when available, the default), 'cpu', 'cuda' or 'cuda:<index>'",
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        metavar="B",
        help="samples per batch (bounds memory; default: 256)",
    )
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    group.add_argument(
        "--traceback", action="store_true", help="show the full traceback of an error"
    )
    return options


def _feature_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("feature files")
    group.add_argument(
        "--features-key",
        default="X",
        metavar="NAME",
        help="array name of the features in an .npz file (default: X)",
    )
    group.add_argument(
        "--labels-key",
        default="y",
        metavar="NAME",
        help="array name of the labels in an .npz file (default: y); the labels of an .npz "
        "input are copied to an .npz output",
    )
    group.add_argument(
        "--shape",
        type=_shape,
        metavar="H,W,C",
        help="shape of one sample of a raw binary (memmap) feature file: H,W,C, N,C or F; "
        "the number of samples follows from the file size",
    )
    group.add_argument(
        "--dtype",
        default="float32",
        help="element type of a raw binary feature file (default: float32)",
    )
    group.add_argument(
        "--grid-shape",
        type=_pair,
        metavar="H,W",
        help="spatial grid of (n, N, C) stacks (default: an N x 1 grid)",
    )
    return options


def _separability_options(group) -> None:
    """The SeparabilityPooling parameters, as options (defaults as in the estimator)."""
    group.add_argument("--alpha", type=_non_negative_float, default=1.0,
                       help="locality weight >= 0 (default: 1)")
    group.add_argument("--stride", type=_positive_int, default=2,
                       help="output grid ceil(H/s) x ceil(W/s) (default: 2)")
    group.add_argument("--output-shape", type=_pair, metavar="H',W'",
                       help="output grid (overrides --stride)")
    group.add_argument("--n-components", type=_positive_int, default=1, metavar="K",
                       help="eigenvectors per output cell; K*C output channels (default: 1)")
    group.add_argument("--norm", choices=("l2", "l1"), default="l2",
                       help="norm of each operator row (default: l2)")
    group.add_argument("--no-normalize-channels", dest="normalize_channels",
                       action="store_false",
                       help="do not standardise the channels before fitting")
    group.add_argument("--precision", choices=("auto", "float64", "float32"), default="auto",
                       help="precision of the scatter and the solve, the estimator's dtype "
                       "(--dtype is the element type of a raw feature file); auto follows "
                       "the features: float32 for float32 files (default: auto)")
    group.add_argument("--solver", choices=("auto", "low_rank", "full"), default="auto",
                       help="route of the eigenproblem (default: auto)")
    group.add_argument("--support-radius", type=_positive_float, default=None, metavar="R",
                       help="solve each output cell over the input locations within R pixels "
                       "of its centre only (faster on large grids; default: exact)")
    group.add_argument("--max-memory-mb", type=_positive_float, default=1024, metavar="MB",
                       help="memory budget of the solve's work matrices (default: 1024)")


# --------------------------------------------------------------------------------------------
# Argument types and messages
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected the shape of one sample, 1 to 3 positive sizes such as H,W,C, got {text!r}"
        )
    return shape


def _pair(text: str) -> tuple[int, int]:
    try:
        return parse_grid(text)
    except ValueError:
        message = f"expected two positive integers H,W, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=88)

