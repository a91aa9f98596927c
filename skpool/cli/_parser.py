"""The ``skpool`` command line's parser: its subcommands and their options (numpy and the
standard library only, so ``--help`` answers at once). The estimators' parameters become options
in :mod:`._options`, generated from the estimators' own names, defaults and choices."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from ._options import COMPUTATION, FEATURE_FILES, add_estimator_options

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
    gmp = _add_command(
        commands, "gmp",
        "generalized max pooling of a feature file",
        "Pool every sample's N local descriptors into one C-vector by generalized max pooling, "
        "xi = (Phi^T Phi + lam I)^-1 Phi^T 1 (Murray & Perronnin 2014). (n, H, W, C) or "
        "(n, N, C) features give (n, C).",
        ["skpool gmp maps.npy -o pooled.npy --lam 10",
         "skpool gmp feats.dat --shape 7,7,512 -o pooled.npz"],
    )
    gmp.add_argument("features", type=Path, help="feature file (.npy, .npz or raw memmap)")
    gmp.add_argument("-o", "--output", type=Path, required=True, help="output .npy or .npz")
    _pooling_options(gmp, "GeneralizedMaxPooling", "generalized max pooling")

    fit = _add_command(
        commands, "fit",
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
    _pooling_options(fit, "SeparabilityPooling", "separability pooling")

    transform = _add_command(
        commands, "transform",
        "pool a feature file with a saved model",
        "Transform features with a model saved by 'skpool fit' (.npz operator file, or any "
        "estimator pickled with joblib). (n, H, W, C) maps give (n, H', W', k*C).",
        ["skpool transform model.npz test.npz -o test_pooled.npz"],
    )
    transform.add_argument("model", type=Path, help="model file (.npz, .joblib or .pkl)")
    transform.add_argument("features", type=Path, help="feature file (.npy, .npz or raw)")
    transform.add_argument("-o", "--output", type=Path, required=True,
                           help="output .npy or .npz")
    # a saved model's device, batch size and grid only (their defaults are the same in both
    # estimators); its fitted parameters stay
    _pooling_options(transform, "SeparabilityPooling", None)

    info = _add_command(
        commands, "info",
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


def _add_command(commands, name, summary, description, examples):
    """A subcommand with its one-line help, a wrapped description and an examples epilog."""
    command = commands.add_parser(
        name,
        help=summary,
        description=_wrap(description),
        epilog="examples:\n" + "".join(f"  {example}\n" for example in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return command


def _pooling_options(command, estimator: str, title: str | None) -> None:
    """The options of gmp, fit and transform: the feature files', the computation's, and
    ``estimator``'s parameters (:mod:`._options`), its own in a group ``title`` (None: only the
    shared ones, device, batch size and grid, as ``transform`` takes)."""
    groups = {FEATURE_FILES: command.add_argument_group(FEATURE_FILES),
              COMPUTATION: command.add_argument_group(COMPUTATION)}
    _feature_file_options(groups[FEATURE_FILES])
    if title is not None:
        groups[None] = command.add_argument_group(title)
    add_estimator_options(groups, estimator, own=title is not None)
    groups[COMPUTATION].add_argument("-q", "--quiet", action="store_true",
                                     help="no progress bar or summary")
    groups[COMPUTATION].add_argument("--traceback", action="store_true",
                                     help="show the full traceback of an error")


def _feature_file_options(group) -> None:
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


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=88)

