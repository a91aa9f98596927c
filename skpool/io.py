"""Saving and loading fitted skpool models.

Two formats:

- **Operator files** (``.npz``, :func:`save_operator` / :func:`load_operator`): a fitted
  :class:`~skpool.SeparabilityPooling` as plain arrays, readable with numpy alone
  (``allow_pickle=False``: loading one never runs code). A torch program rebuilds the layer
  with ``load_operator(path).to_module()``, or from the arrays themselves::

      arrays = np.load("model.npz")
      SeparabilityPool2d(arrays["operator"], arrays["channel_mean"], arrays["channel_scale"],
                         output_shape=tuple(arrays["output_shape"]),
                         grid_shape=tuple(arrays["grid_shape"]))

  The file holds ``operator`` (k, M, N), ``channel_mean`` (C,), ``channel_scale`` (C,),
  ``grid_shape`` (2,), ``output_shape`` (2,), ``classes`` (Q,), ``eigenvalues`` (k, M),
  ``params`` (the estimator's parameters as a JSON string), ``kind``
  (``"skpool.SeparabilityPooling"``), ``format_version`` (:data:`FORMAT_VERSION`) and
  ``skpool_version``. Files of another kind or of a newer format version are refused with a
  clear :class:`OperatorFileError`. In memory a fitted operator is a :class:`FittedOperator`
  (the estimator's ``fitted_operator_``), whose fields are these arrays.
- **Whole estimators** (:func:`save_estimator` / :func:`load_estimator`): any fitted skpool
  estimator (or pipeline) through joblib, as scikit-learn recommends. Such files run code when
  loaded: load only files you trust.

Every writer here writes to a temporary file in the target directory and renames it into place,
so an interrupted save never leaves a half-written file under the target name. Every reader
turns a damaged file (a bad zip header, a truncated archive, wrong magic bytes, a member that
does not decompress) into one :class:`OperatorFileError` naming the file, and checks the
parameters stored in an operator file when it rebuilds an estimator from them.

This module imports numpy only (scikit-learn and torch are imported by the functions that need
them), so ``skpool info`` and torch-only programs read operator files without scikit-learn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ._fitted import FORMAT_VERSION, FittedOperator
from ._grid import check_grid

__all__ = [
    "FORMAT_VERSION",
    "OPERATOR_KIND",
    "OperatorFileError",
    "FittedOperator",
    "save_operator",
    "load_operator",
    "estimator_from_arrays",
    "save_estimator",
    "load_estimator",
    "atomic_output",
    "atomic_path",
]

#: The ``kind`` string of operator files.
OPERATOR_KIND = "skpool.SeparabilityPooling"

_REQUIRED = (
    "format_version",
    "kind",
    "operator",
    "channel_mean",
    "channel_scale",
    "grid_shape",
    "output_shape",
)


class OperatorFileError(ValueError):
    """An operator file that cannot be read: not an npz, another kind, a newer format, or
    inconsistent arrays."""


# --------------------------------------------------------------------------------------------
# Operator files
def save_operator(estimator, path) -> Path:
    """Write a fitted :class:`~skpool.SeparabilityPooling` to ``path`` as plain arrays (npz).

    Parameters
    ----------
    estimator : fitted SeparabilityPooling, or a :class:`FittedOperator`
    path : str or path-like
        Written as given (no suffix is added); ``.npz`` is the customary suffix.

    Returns
    -------
    Path
        The path written.
    """
    saved = estimator if isinstance(estimator, FittedOperator) else _fitted_of(estimator)
    from . import __version__

    arrays = {
        "format_version": np.asarray(FORMAT_VERSION, dtype=np.int64),
        "kind": np.asarray(OPERATOR_KIND),
        "skpool_version": np.asarray(__version__),
        "operator": np.asarray(saved.operator),
        "channel_mean": np.asarray(saved.channel_mean),
        "channel_scale": np.asarray(saved.channel_scale),
        "grid_shape": np.asarray(saved.grid_shape, dtype=np.int64),
        "output_shape": np.asarray(saved.output_shape, dtype=np.int64),
        "params": np.asarray(json.dumps(_jsonable(saved.params), sort_keys=True)),
    }
    if saved.classes is not None:
        arrays["classes"] = _plain_array(saved.classes)
    if saved.eigenvalues is not None:
        arrays["eigenvalues"] = np.asarray(saved.eigenvalues)
    path = Path(path)
    with atomic_output(path) as handle:
        np.savez(handle, **arrays)
    return path


def load_operator(path) -> FittedOperator:
    """Read an operator file written by :func:`save_operator` (numpy only, no pickle).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    OperatorFileError
        If the file is not an npz archive or is damaged (any failure to read the archive or
        one of its arrays), is not an skpool operator file, is of a newer format version than
        this skpool reads, or holds inconsistent arrays.
    """
    path = Path(path)
    return _saved_from_arrays(_read_npz(path), path)


def _read_npz(path) -> dict:
    """Every array of an ``.npz`` file, read now; a damaged file is one :class:`OperatorFileError`.

    ``FileNotFoundError`` (and other errors of opening the file itself) are raised as usual.
    Anything raised while the bytes are parsed means a damaged file, and the parsers raise
    many types: zipfile's BadZipFile, NotImplementedError (flag bit 5, version needed 255, an
    unknown compression method), RuntimeError (encrypted members), zlib.error and EOFError (a
    damaged or cut deflate stream), struct.error, KeyError, ValueError (a pickled member, a bad
    .npy header), SyntaxError and tokenize.TokenError (numpy parses a damaged header's text),
    OverflowError and MemoryError (absurd declared sizes). Hence ``except Exception``: an
    interrupt (KeyboardInterrupt) still goes through.
    """
    path = Path(path)
    with open(path, "rb") as handle:  # FileNotFoundError, IsADirectoryError as usual
        magic = handle.read(2)
    if magic != b"PK":
        raise OperatorFileError(f"{path}: not an .npz archive (an skpool operator file).")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except Exception as exc:  # noqa: BLE001 - _read_npz's docstring says why
        raise OperatorFileError(
            f"{path}: damaged or unreadable .npz file ({_error_text(exc)})."
        ) from exc


def estimator_from_arrays(saved, **params):
    """A fitted :class:`~skpool.SeparabilityPooling` rebuilt from an operator file.

    Parameters
    ----------
    saved : FittedOperator, or a path to an operator file
    **params
        Parameters to override, e.g. ``device="cpu"`` or ``batch_size=64``.

    Returns
    -------
    SeparabilityPooling
        Fitted: its ``transform`` gives what the saved estimator's ``transform`` gave.
        ``n_features_in_`` is set for 3-D/4-D input (N·C features per sample).
    """
    from . import SeparabilityPooling

    source = saved
    if not isinstance(saved, FittedOperator):
        saved = load_operator(saved)
        source = Path(source)
    else:
        source = "the saved operator"
        saved = _native_dtypes(saved, source)
    known = SeparabilityPooling().get_params()
    kept = {name: value for name, value in saved.params.items() if name in known}
    for name in ("grid_shape", "output_shape"):
        if isinstance(kept.get(name), list):
            kept[name] = tuple(kept[name])
    # Every stored parameter the caller does not override is checked now, where it is read,
    # not when transform first uses it (a batch_size of -1 would give garbage there).
    stored = {name: value for name, value in kept.items() if name not in params}
    try:
        _check_estimator_params(SeparabilityPooling(**stored))
    except (TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        raise OperatorFileError(f"{source}: invalid stored parameter: {message}") from exc
    estimator = SeparabilityPooling(**{**kept, **params})
    _check_estimator_params(estimator)
    estimator._set_fitted(saved, input_attributes=True)
    return estimator


def _check_estimator_params(estimator) -> None:
    """scikit-learn's check of the declared parameter constraints, and of the grid pairs."""
    estimator._validate_params()
    check_grid(estimator.grid_shape, optional=True)
    check_grid(estimator.output_shape, "output_shape", optional=True)


def _fitted_of(estimator) -> FittedOperator:
    """The fitted operator of a fitted SeparabilityPooling, or a ValueError saying what is not."""
    fitted = getattr(estimator, "fitted_operator_", None)  # None before fit (NotFittedError)
    if not isinstance(fitted, FittedOperator):
        raise ValueError(
            f"save_operator needs a fitted SeparabilityPooling; {type(estimator).__name__} "
            "has no fitted operator (call fit first)."
        )
    return fitted


def _saved_from_arrays(arrays: dict[str, np.ndarray], path) -> FittedOperator:
    """Check an operator file's arrays (kind, version, shapes) and wrap them."""
    if "format_version" not in arrays or "kind" not in arrays:
        raise OperatorFileError(
            f"{path}: not an skpool operator file (no 'format_version'/'kind' arrays; it holds "
            f"{sorted(arrays)})."
        )
    kind = str(arrays["kind"])
    if kind != OPERATOR_KIND:
        raise OperatorFileError(f"{path}: holds a {kind!r}, not a {OPERATOR_KIND!r}.")
    try:
        version = int(arrays["format_version"])
    except (TypeError, ValueError) as exc:
        raise OperatorFileError(f"{path}: unreadable format_version.") from exc
    if version > FORMAT_VERSION or version < 1:
        raise OperatorFileError(
            f"{path}: operator format version {version}, but this skpool reads versions 1 to "
            f"{FORMAT_VERSION}; upgrade skpool to read it."
        )
    missing = [name for name in _REQUIRED if name not in arrays]
    if missing:
        raise OperatorFileError(f"{path}: missing array(s) {', '.join(missing)}.")
    grid, out = _grid_pair(arrays["grid_shape"]), _grid_pair(arrays["output_shape"])
    if grid is None or out is None:
        raise OperatorFileError(
            f"{path}: inconsistent operator file: grid_shape {arrays['grid_shape'].tolist()} and "
            f"output_shape {arrays['output_shape'].tolist()} must be pairs of positive integers."
        )
    try:
        params = json.loads(str(arrays["params"])) if "params" in arrays else {}
    except json.JSONDecodeError as exc:
        raise OperatorFileError(f"{path}: unreadable params ({exc}).") from exc
    if not isinstance(params, dict):
        raise OperatorFileError(
            f"{path}: params must be a JSON object of parameter names, got "
            f"{type(params).__name__}."
        )
    fitted = FittedOperator(
        operator=arrays["operator"],
        channel_mean=arrays["channel_mean"],
        channel_scale=arrays["channel_scale"],
        grid_shape=grid,
        output_shape=out,
        classes=arrays.get("classes"),
        eigenvalues=arrays.get("eigenvalues"),
        params=params,
        format_version=version,
    )
    fitted = _native_dtypes(fitted, path)
    problems = fitted.problems()
    if problems:
        raise OperatorFileError(f"{path}: inconsistent operator file: {'; '.join(problems)}.")
    return fitted


#: The float types an operator's arrays may hold (torch computes with them); a long double
#: (float96/float128) has none.
_FLOAT_SIZES = (2, 4, 8)


def _native_dtypes(fitted: FittedOperator, source) -> FittedOperator:
    """``fitted`` with its arrays in this machine's byte order (a big-endian file works here),
    or an OperatorFileError for a float array of a type torch cannot compute with (long
    double): at load, not as torch's dtype error at ``transform``."""
    changes = {}
    for name in ("operator", "channel_mean", "channel_scale", "eigenvalues", "classes"):
        values = getattr(fitted, name)
        if not isinstance(values, np.ndarray):
            continue
        if values.dtype.kind == "f" and values.dtype.itemsize not in _FLOAT_SIZES:
            raise OperatorFileError(
                f"{source}: {name} has dtype {values.dtype} ({values.dtype.itemsize * 8}-bit "
                "float, e.g. long double); operator files hold float16, float32 or float64 "
                "arrays."
            )
        if not values.dtype.isnative:
            changes[name] = values.astype(values.dtype.newbyteorder("="))
    return dataclasses.replace(fitted, **changes) if changes else fitted


def _grid_pair(values: np.ndarray) -> tuple[int, int] | None:
    """A stored (H, W) (integers) as two positive ints, or None when it is not one."""
    if values.dtype.kind not in "iu" or values.ndim != 1:
        return None
    try:
        return check_grid(values.tolist())
    except ValueError:
        return None


def _error_text(exc: BaseException) -> str:
    """One line: the exception's type and message."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _jsonable(value):
    """Estimator parameters as JSON: tuples become lists, devices and other objects strings."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _plain_array(values) -> np.ndarray:
    """An array numpy can store without pickle: object arrays of labels become strings."""
    array = np.asarray(values)
    if array.dtype == object:
        array = np.asarray(array.tolist())
        if array.dtype == object:
            array = array.astype(str)
    return array


# --------------------------------------------------------------------------------------------
# Whole estimators
def save_estimator(estimator, path) -> Path:
    """Pickle any estimator (fitted or not, pipelines included) to ``path`` with joblib."""
    import joblib

    path = Path(path)
    with atomic_output(path) as handle:
        joblib.dump(estimator, handle)
    return path


def load_estimator(path):
    """Load an estimator written by :func:`save_estimator` (or ``joblib.dump``).

    This unpickles: load only files you trust.
    """
    import joblib

    return joblib.load(Path(path))


# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path``
    is left as it was: a reader never sees a half-written file. The renamed file gets the
    permissions of a newly created file (``0o666`` minus the umask).
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory for the output file {path}: {directory}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield Path(tmp_name)
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def atomic_output(path):
    """Like :func:`atomic_path`, but yield the temporary file opened for binary writing."""
    with atomic_path(path) as tmp_path, open(tmp_path, "wb") as handle:
        yield handle


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def __dir__():
    """Only the public API (not the modules this one imports) for ``dir()`` and completion."""
    return sorted(__all__)


def __getattr__(name: str):
    if name == "SavedOperator":  # its name until skpool 0.1
        warnings.warn(
            "skpool.io.SavedOperator is deprecated; use skpool.io.FittedOperator (the same "
            "class, also the estimator's fitted_operator_).",
            FutureWarning,
            stacklevel=2,
        )
        return FittedOperator
    raise AttributeError(f"module 'skpool.io' has no attribute {name!r}")
