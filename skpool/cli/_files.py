"""Reading the command line's inputs (feature, label and model files) and writing its
outputs (atomically, never over an input). numpy only; skpool.io where models are read."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
OUTPUT_SUFFIXES = (".npy", ".npz")


class CommandError(Exception):
    """A problem with the user's files or options: reported as one line, exit status 1."""


# --------------------------------------------------------------------------------------------
# Reading
@dataclass
class _Data:
    """Features (an array or memmap, not read yet) and optional labels of one input file."""

    features: np.ndarray
    labels: np.ndarray | None = None


def read_features(args, *, need_labels: bool = False) -> _Data:
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
    check_exists(path)
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


def check_exists(path: Path) -> None:
    if not path.exists():
        raise CommandError(f"{path}: no such file.")
    if path.is_dir():
        raise CommandError(f"{path}: is a directory, not a file.")


def _load_npy(path: Path) -> np.ndarray:
    from ..io import _error_text

    _check_magic(path, b"\x93NUMPY", ".npy")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file (skpool.io._read_npz)
        raise CommandError(f"{path}: not a valid .npy file ({_error_text(exc)}).") from exc


def _open_npz(path: Path):
    from ..io import _error_text

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
    from ..io import _error_text

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
    if dtype.kind not in "fiub" or dtype.itemsize == 0:  # V0 would divide by zero below
        raise CommandError(
            f"--dtype {dtype.str!r} is not a number type: raw features must be float, int, uint "
            "or bool (e.g. float32, float64, int16, >f4)."
        )
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


def load_model(path: Path, *, keep_arrays: bool = False, options: dict | None = None):
    """A transformer from a model file, its parameters in ``options`` overridden; with
    ``keep_arrays`` an operator file stays a :class:`~skpool.io.FittedOperator` (numpy only)."""
    from ..io import estimator_from_arrays, load_estimator, load_operator

    options = options or {}
    if path.suffix == ".npz":
        return load_operator(path) if keep_arrays else estimator_from_arrays(path, **options)
    if path.suffix not in MODEL_PICKLE_SUFFIXES:
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
def check_paths(args, inputs: list[Path | None], allowed: tuple[str, ...]) -> str:
    """Before anything is read: the inputs exist, the output's suffix is one of ``allowed`` (it
    decides the format; returned) and the output is none of the inputs."""
    inputs = [path for path in inputs if path is not None]
    for path in inputs:
        check_exists(path)
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



def transform_to_file(transformer, data: _Data, args) -> tuple[int, ...]:
    """``transformer.transform`` batch by batch into ``args.output``; returns the output shape.

    An ``.npy`` output is written through a memory map (the result need not fit in memory),
    an ``.npz`` output is assembled in memory. Either way the file appears only when complete.
    """
    from tqdm.auto import tqdm

    from ..io import atomic_path

    features, output, batch = data.features, args.output, args.batch_size
    n_samples = features.shape[0]

    def transform(start):  # one batch; a NaN is named by its sample index in the file
        chunk = features[start : start + batch]
        finite = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
        if not finite.all():
            raise CommandError(
                f"{args.features}: sample {start + int(np.argmin(finite))} contains NaN or "
                "infinity; skpool needs finite features."
            )
        return np.asarray(transformer.transform(chunk))

    first = transform(0)
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
            chunk = transform(start)
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

