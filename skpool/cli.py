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
:class:`~skpool.SeparabilityPooling`); this module only reads, batches and writes. It imports
numpy only: torch and scikit-learn are imported by the commands that compute, so ``--help``,
usage errors and ``skpool info`` on an ``.npz`` model answer without them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["main", "build_parser"]

_MODEL_PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
_OUTPUT_SUFFIXES = (".npy", ".npz")

#: Estimator parameters -> the ``args`` attribute (option) that sets them. Every parameter of
#: the estimator is an option or listed in ``_NOT_OPTIONS`` with the reason (a test holds the
#: CLI to the estimators' parameters and defaults). ``dtype`` is ``--precision`` because
#: ``--dtype`` names the element type of a raw feature file.
_RENAMED = {"dtype": "precision"}
_NOT_OPTIONS = {"distributed": "the command line runs one process"}

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


class CommandError(Exception):
    """A problem with the user's files or options: reported as one line, exit status 1."""


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
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"skpool {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line, never a traceback
        if args.traceback:
            raise
        print(f"skpool {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``skpool`` and its subcommands."""
    from . import __version__

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
        commands, "gmp", _run_gmp, pooling,
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
        commands, "fit", _run_fit, pooling,
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
        commands, "transform", _run_transform, pooling,
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
        commands, "info", _run_info, [],
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


def _add_command(commands, name, handler, parents, summary, description, examples):
    """A subcommand with its one-line help, a wrapped description and an examples epilog."""
    command = commands.add_parser(
        name,
        parents=parents,
        help=summary,
        description=_wrap(description),
        epilog="examples:\n" + "".join(f"  {example}\n" for example in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.set_defaults(handler=handler)
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
    group.add_argument("--precision", choices=("float64", "float32"), default="float64",
                       help="precision of the statistics and the solve, the estimator's dtype "
                       "(--dtype is the element type of a raw feature file) (default: float64)")
    group.add_argument("--solver", choices=("auto", "low_rank", "full"), default="auto",
                       help="route of the eigenproblem (default: auto)")
    group.add_argument("--support-radius", type=_positive_float, default=None, metavar="R",
                       help="solve each output cell over the input locations within R pixels "
                       "of its centre only (faster on large grids; default: exact)")
    group.add_argument("--max-memory-mb", type=_positive_float, default=1024, metavar="MB",
                       help="memory budget of the solve's work matrices (default: 1024)")


# --------------------------------------------------------------------------------------------
# Commands
def _run_gmp(args) -> int:
    _check_paths(args, [args.features], _OUTPUT_SUFFIXES)
    from . import GeneralizedMaxPooling

    data = _read_features(args)
    pooling = GeneralizedMaxPooling(**_estimator_params(GeneralizedMaxPooling, args))
    start = time.perf_counter()
    shape = _transform_to_file(pooling, data, args)
    _summary(args, f"GMP-pooled {_describe(data.features)} -> {shape} in "
             f"{time.perf_counter() - start:.1f} s: {args.output}")
    return 0


def _run_fit(args) -> int:
    kind = _check_paths(args, [args.features, args.labels],
                        (".npz",) + _MODEL_PICKLE_SUFFIXES)
    from . import SeparabilityPooling
    from .io import save_estimator, save_operator

    data = _read_features(args, need_labels=True)
    pooling = SeparabilityPooling(**_estimator_params(SeparabilityPooling, args))
    start = time.perf_counter()
    pooling.fit(data.features, data.labels)
    seconds = time.perf_counter() - start
    if kind == ".npz":
        save_operator(pooling, args.output)
    else:
        save_estimator(pooling, args.output)
    (height, width), (out_h, out_w) = pooling.grid_shape_, pooling.output_shape_
    _summary(
        args,
        f"fitted SeparabilityPooling on {len(data.labels)} samples "
        f"({len(pooling.classes_)} classes, {_plural(pooling.n_channels_in_, 'channel')}) in "
        f"{seconds:.1f} s: {height}x{width} -> {out_h}x{out_w} grid, "
        f"{_plural(pooling.operator_.shape[0], 'component')}; saved {args.output}",
    )
    note = _grid_note(pooling.grid_shape_, data.features.ndim, args.grid_shape)
    if note:
        _summary(args, f"note: {note}")
    return 0


def _run_transform(args) -> int:
    _check_paths(args, [args.model, args.features], _OUTPUT_SUFFIXES)
    # The options override what the model was saved with (its device may not exist here).
    options = {"device": args.device, "batch_size": args.batch_size}
    if args.grid_shape is not None:
        options["grid_shape"] = args.grid_shape
    model = _load_model(args.model, options=options)
    data = _read_features(args)
    start = time.perf_counter()
    shape = _transform_to_file(model, data, args)
    _summary(args, f"transformed {_describe(data.features)} -> {shape} in "
             f"{time.perf_counter() - start:.1f} s: {args.output}")
    return 0


def _run_info(args) -> int:
    _check_exists(args.model)
    model = _load_model(args.model, keep_arrays=True)
    description = _describe_model(model, args.model)
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        width = max(len(key) for key in description)
        for key, value in description.items():
            print(f"{key:<{width}}  {value}")
    return 0


# --------------------------------------------------------------------------------------------
# Reading
@dataclass
class _Data:
    """Features (an array or memmap, not read yet) and optional labels of one input file."""

    features: np.ndarray
    labels: np.ndarray | None = None


def _read_features(args, *, need_labels: bool = False) -> _Data:
    path: Path = args.features
    labels = None
    if args.shape is not None and path.suffix in (".npy", ".npz"):
        raise CommandError(f"--shape is for raw binary files; {path} is a {path.suffix} file.")
    if path.suffix == ".npy":
        features = _load_npy(path)
    elif path.suffix == ".npz":
        arrays = _open_npz(path)
        features = _npz_array(arrays, path, args.features_key, "--features-key")
        if args.labels_key in arrays.files:
            labels = _npz_array(arrays, path, args.labels_key, "--labels-key")
    elif args.shape is None:
        raise CommandError(
            f"{path}: not an .npy or .npz file; for a raw binary memmap give --shape "
            "(and --dtype, default float32)."
        )
    else:
        features = _open_memmap(path, args.shape, args.dtype)
    if features.ndim not in (2, 3, 4):
        raise CommandError(
            f"{path}: features must be 2-D (n, F), 3-D (n, N, C) or 4-D (n, H, W, C); "
            f"got shape {features.shape}."
        )
    if features.dtype.kind not in "fiub":
        raise CommandError(f"{path}: features of dtype {features.dtype} are not numeric.")
    if features.shape[0] == 0:
        raise CommandError(f"{path}: holds no samples (shape {features.shape}).")

    if getattr(args, "labels", None) is not None:
        labels = _read_labels(args.labels, args.labels_key)
    if need_labels and labels is None:
        raise CommandError(
            f"no labels: pass --labels FILE, or an .npz features file with a "
            f"{args.labels_key!r} array (--labels-key)."
        )
    if labels is not None:  # checked even where only copied along, never copied wrong
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise CommandError(f"labels must be 1-D (n,), got shape {labels.shape}.")
        if len(labels) != features.shape[0]:
            source = getattr(args, "labels", None) or f"{path}[{args.labels_key}]"
            raise CommandError(
                f"{source} has {len(labels)} labels but {path} has {features.shape[0]} "
                "samples."
            )
    return _Data(features, labels)


def _read_labels(path: Path, key: str) -> np.ndarray:
    _check_exists(path)
    if path.suffix == ".npy":
        return np.asarray(_load_npy(path))
    if path.suffix == ".npz":
        return _npz_array(_open_npz(path), path, key, "--labels-key")
    try:
        labels = np.loadtxt(path, dtype=str, ndmin=1, comments=None)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: cannot read labels ({exc}).") from exc
    try:  # integer class labels stay integers
        return labels.astype(np.int64)
    except ValueError:
        return labels


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CommandError(f"{path}: no such file.")
    if path.is_dir():
        raise CommandError(f"{path}: is a directory, not a file.")


def _load_npy(path: Path) -> np.ndarray:
    from .io import _error_text

    _check_magic(path, b"\x93NUMPY", ".npy")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file (skpool.io._read_npz)
        raise CommandError(f"{path}: not a valid .npy file ({_error_text(exc)}).") from exc


def _open_npz(path: Path):
    from .io import _error_text

    _check_magic(path, b"PK", ".npz")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file (skpool.io._read_npz)
        raise CommandError(f"{path}: not a valid .npz file ({_error_text(exc)}).") from exc
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise CommandError(f"{path}: not an .npz archive.")
    return arrays


def _check_magic(path: Path, magic: bytes, kind: str) -> None:
    with open(path, "rb") as handle:
        if handle.read(len(magic)) != magic:
            raise CommandError(f"{path}: not a {kind} file (it does not start like one).")


def _npz_array(arrays, path: Path, key: str, option: str) -> np.ndarray:
    if key not in arrays.files:
        raise CommandError(
            f"{path}: no array {key!r} (it holds {', '.join(arrays.files) or 'nothing'}); "
            f"choose one with {option}."
        )
    from .io import _error_text

    try:
        return arrays[key]
    except Exception as exc:  # noqa: BLE001 - a damaged file (skpool.io._read_npz)
        raise CommandError(f"{path}: array {key!r} is corrupt ({_error_text(exc)}).") from exc


def _open_memmap(path: Path, sample_shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A raw binary file as a read-only memmap of samples; the count comes from its size."""
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise CommandError(f"--dtype {dtype!r} is not a numpy dtype.") from exc
    size = path.stat().st_size
    per_sample = math.prod(sample_shape) * dtype.itemsize
    if size == 0:
        raise CommandError(f"{path}: the file is empty.")
    if size % per_sample:
        raise CommandError(
            f"{path}: {size} bytes is not a whole number of samples of shape "
            f"{','.join(map(str, sample_shape))} and dtype {dtype} ({per_sample} bytes each); "
            "check --shape and --dtype."
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(size // per_sample, *sample_shape))


def _load_model(path: Path, *, keep_arrays: bool = False, options: dict | None = None):
    """A transformer from a model file, its parameters in ``options`` overridden; with
    ``keep_arrays`` an operator file stays a :class:`~skpool.io.SavedOperator` (numpy only)."""
    from .io import estimator_from_arrays, load_estimator, load_operator

    options = options or {}
    if path.suffix == ".npz":
        return load_operator(path) if keep_arrays else estimator_from_arrays(path, **options)
    if path.suffix not in _MODEL_PICKLE_SUFFIXES:
        raise CommandError(
            f"{path}: unknown model format {path.suffix!r}; expected .npz, .joblib or .pkl."
        )
    try:
        model = load_estimator(path)
    except Exception as exc:  # unpickling fails in many ways
        raise CommandError(
            f"{path}: not a readable joblib/pickle model ({type(exc).__name__}: {exc})."
        ) from exc
    if keep_arrays:
        return model
    if not hasattr(model, "transform"):
        raise CommandError(f"{path}: holds a {type(model).__name__}, not a transformer.")
    if hasattr(model, "get_params"):
        params = model.get_params(deep=False)
        model.set_params(**{name: value for name, value in options.items() if name in params})
    if hasattr(model, "_validate_params"):  # what it was pickled with is checked now
        try:
            model._validate_params()
        except (TypeError, ValueError) as exc:
            raise CommandError(f"{path}: invalid parameter in the saved model: {exc}") from exc
    return model


# --------------------------------------------------------------------------------------------
# Writing
def _check_paths(args, inputs: list[Path | None], allowed: tuple[str, ...]) -> str:
    """Before anything is read: the inputs exist, the output's suffix is one of ``allowed`` (it
    decides the format; returned) and the output is none of the inputs."""
    inputs = [path for path in inputs if path is not None]
    for path in inputs:
        _check_exists(path)
    output: Path = args.output
    if output.suffix not in allowed:
        raise CommandError(
            f"{output}: the output must end in {' or '.join(allowed)} (it decides the format)."
        )
    if not output.parent.is_dir():
        raise CommandError(f"{output}: no such directory {output.parent}.")
    if output.is_dir():
        raise CommandError(f"{output}: is a directory; name an output file.")
    for path in inputs:
        if _same_file(output, path):
            raise CommandError(
                f"{output}: is the input file {path}; skpool never writes over its inputs, "
                "name another output file."
            )
    return output.suffix


def _same_file(output: Path, source: Path) -> bool:
    """Whether writing ``output`` would replace ``source``: the same file through any path,
    symbolic link or hard link (an existing output), or the same resolved path (a new one)."""
    try:
        return os.path.samefile(output, source)
    except OSError:  # the output does not exist (yet), or a dangling link
        return os.path.realpath(output) == os.path.realpath(source)


def _estimator_params(estimator_class, args) -> dict:
    """The estimator's parameters from the parsed options (``_RENAMED`` maps the names; a
    parameter without an option keeps the estimator's default)."""
    names = estimator_class().get_params(deep=False)
    params = {}
    for name in names:
        option = _RENAMED.get(name, name)
        if name not in _NOT_OPTIONS and hasattr(args, option):
            params[name] = getattr(args, option)
    return params


def _transform_to_file(transformer, data: _Data, args) -> tuple[int, ...]:
    """``transformer.transform`` batch by batch into ``args.output``; returns the output shape.

    An ``.npy`` output is written through a memory map (the result need not fit in memory),
    an ``.npz`` output is assembled in memory. Either way the file appears only when complete.
    """
    from tqdm.auto import tqdm

    from .io import atomic_path

    features, output, batch = data.features, args.output, args.batch_size
    n_samples = features.shape[0]
    first = np.asarray(transformer.transform(features[:batch]))
    shape = (n_samples, *first.shape[1:])
    progress = tqdm(
        total=n_samples,
        unit="sample",
        desc=f"skpool {args.command}",
        disable=True if args.quiet else None,  # None: only on a terminal
        file=sys.stderr,
    )
    with progress, atomic_path(output) as tmp_path:
        if output.suffix == ".npy":
            result = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=first.dtype,
                                               shape=shape)
        else:
            result = np.empty(shape, dtype=first.dtype)
        result[: len(first)] = first
        progress.update(len(first))
        for start in range(len(first), n_samples, batch):
            chunk = np.asarray(transformer.transform(features[start : start + batch]))
            result[start : start + len(chunk)] = chunk
            progress.update(len(chunk))
        if output.suffix == ".npy":
            result.flush()
            del result
        else:
            arrays = {args.features_key: result}
            if data.labels is not None:
                arrays[args.labels_key] = np.asarray(data.labels)
            with open(tmp_path, "wb") as handle:
                np.savez(handle, **arrays)
    return shape


def _summary(args, message: str) -> None:
    if not args.quiet:
        print(message)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _grid_note(grid, ndim: int | None, grid_shape) -> str:
    """A warning where a grid is N x 1 because no grid_shape was given (flattened (n, F) maps
    silently become F single-channel locations in a column); "" otherwise."""
    if grid_shape is not None or grid[1] != 1 or grid[0] == 1 or ndim == 4:
        return ""
    return (
        f"a {grid[0]}x1 grid, as 2-D (n, F) or 3-D (n, N, C) input without grid_shape gives; "
        "for flattened H x W maps refit with --grid-shape H,W"
    )


def _describe(features) -> str:
    return f"{features.shape[0]} samples of {'x'.join(map(str, features.shape[1:]))}"


def _describe_model(model, path: Path) -> dict:
    from .io import SavedOperator

    if isinstance(model, SavedOperator):
        description = {"file": str(path), "kind": "SeparabilityPooling operator (.npz)",
                       "format_version": model.format_version}
        operator, grid, out = model.operator, model.grid_shape, model.output_shape
        channels, classes, eigenvalues = model.n_channels, model.classes, model.eigenvalues
        params = model.params
    elif hasattr(model, "operator_"):
        description = {"file": str(path), "kind": f"{type(model).__name__} (pickled)"}
        operator, grid, out = model.operator_, model.grid_shape_, model.output_shape_
        channels, classes = model.n_channels_in_, getattr(model, "classes_", None)
        eigenvalues, params = getattr(model, "eigenvalues_", None), model.get_params(deep=False)
    else:
        return {"file": str(path), "kind": f"{type(model).__name__} (pickled)",
                "estimator": repr(model)}
    n_components, n_out, n_in = operator.shape
    description.update(
        {
            "input_grid": f"{grid[0]}x{grid[1]} ({n_in} locations)",
            "output_grid": f"{out[0]}x{out[1]} ({n_out} cells)",
            "n_components": int(n_components),
            "channels": f"{channels} in -> {n_components * channels} out",
            "operator": f"{tuple(operator.shape)} {operator.dtype}",
        }
    )
    note = _grid_note(grid, None, params.get("grid_shape"))
    if note:
        description["note"] = note
    if classes is not None:
        shown = ", ".join(map(str, list(classes)[:10])) + (", ..." if len(classes) > 10 else "")
        description["classes"] = f"{len(classes)}: {shown}"
    if eigenvalues is not None and np.size(eigenvalues):
        values = np.asarray(eigenvalues)
        description["generalized_eigenvalues"] = (
            f"min {values.min():.4g}, median {np.median(values):.4g}, max {values.max():.4g} "
            "(p'Ap / p'(B + alpha C_m)p of each row on the training data, locality term "
            "included; not separability_ratios' p'Ap / p'Bp)"
        )
    description["params"] = ", ".join(f"{key}={value!r}" for key, value in params.items())
    return description


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
        pair = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise argparse.ArgumentTypeError(f"expected two positive integers H,W, got {text!r}")
    return pair


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=88)


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
