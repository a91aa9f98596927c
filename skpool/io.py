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
  clear :class:`OperatorFileError`.
- **Whole estimators** (:func:`save_estimator` / :func:`load_estimator`): any fitted skpool
  estimator (or pipeline) through joblib, as scikit-learn recommends. Such files run code when
  loaded: load only files you trust.

Every writer here writes to a temporary file in the target directory and renames it into place,
so an interrupted save never leaves a half-written file under the target name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "OPERATOR_KIND",
    "OperatorFileError",
    "SavedOperator",
    "save_operator",
    "load_operator",
    "estimator_from_arrays",
    "save_estimator",
    "load_estimator",
    "atomic_output",
    "atomic_path",
]

#: Version of the operator file layout written by :func:`save_operator`. Readers accept files of
#: this version or older; a newer file means a newer skpool wrote it.
FORMAT_VERSION = 1
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


@dataclass(frozen=True)
class SavedOperator:
    """A fitted separability pooling operator, as loaded from an operator file.

    Attributes
    ----------
    operator : ndarray of shape (k, M, N)
    channel_mean, channel_scale : ndarray of shape (C,)
    grid_shape : tuple (H, W)
        Input grid, N = H·W.
    output_shape : tuple (H', W')
        Output grid, M = H'·W'.
    classes : ndarray of shape (Q,) or None
    eigenvalues : ndarray of shape (k, M) or None
    params : dict
        The estimator's parameters at fit time.
    format_version : int
    """

    operator: np.ndarray
    channel_mean: np.ndarray
    channel_scale: np.ndarray
    grid_shape: tuple[int, int]
    output_shape: tuple[int, int]
    classes: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def n_components(self) -> int:
        return int(self.operator.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.channel_mean.shape[0])

    def to_module(self, trainable: bool = False, *, device=None, dtype=None):
        """The operator as a :class:`skpool.nn.SeparabilityPool2d` layer (channels first).

        ``layer(x)`` for ``x`` of shape (B, C, H, W) equals the estimator's ``transform`` of
        ``x.permute(0, 2, 3, 1)``, permuted back to (B, k·C, H', W').
        """
        from .nn import SeparabilityPool2d

        return SeparabilityPool2d(
            self.operator,
            self.channel_mean,
            self.channel_scale,
            trainable,
            output_shape=self.output_shape,
            grid_shape=self.grid_shape,
            device=device,
            dtype=dtype,
        )


# --------------------------------------------------------------------------------------------
# Operator files
def save_operator(estimator, path) -> Path:
    """Write a fitted :class:`~skpool.SeparabilityPooling` to ``path`` as plain arrays (npz).

    Parameters
    ----------
    estimator : fitted SeparabilityPooling, or a :class:`SavedOperator`
    path : str or path-like
        Written as given (no suffix is added); ``.npz`` is the customary suffix.

    Returns
    -------
    Path
        The path written.
    """
    if isinstance(estimator, SavedOperator):
        saved = estimator
    else:
        saved = _saved_from_estimator(estimator)
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


def load_operator(path) -> SavedOperator:
    """Read an operator file written by :func:`save_operator` (numpy only, no pickle).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    OperatorFileError
        If the file is not an npz archive, not an skpool operator file, of a newer format
        version than this skpool reads, or holds inconsistent arrays.
    """
    path = Path(path)
    with open(path, "rb") as handle:  # FileNotFoundError as usual
        if handle.read(2) != b"PK":
            raise OperatorFileError(f"{path}: not an .npz archive (an skpool operator file).")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OperatorFileError(f"{path}: not a readable .npz file ({exc}).") from exc
    try:
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OperatorFileError(f"{path}: corrupt .npz file ({exc}).") from exc
    return _saved_from_arrays(arrays, path)


def estimator_from_arrays(saved, **params):
    """A fitted :class:`~skpool.SeparabilityPooling` rebuilt from an operator file.

    Parameters
    ----------
    saved : SavedOperator, or a path to an operator file
    **params
        Parameters to override, e.g. ``device="cpu"`` or ``batch_size=64``.

    Returns
    -------
    SeparabilityPooling
        Fitted: its ``transform`` gives what the saved estimator's ``transform`` gave.
        ``n_features_in_`` is set for 3-D/4-D input (N·C features per sample).
    """
    from . import SeparabilityPooling

    if not isinstance(saved, SavedOperator):
        saved = load_operator(saved)
    known = SeparabilityPooling().get_params()
    kept = {name: value for name, value in saved.params.items() if name in known}
    for name in ("grid_shape", "output_shape"):
        if kept.get(name) is not None:
            kept[name] = tuple(kept[name])
    estimator = SeparabilityPooling(**{**kept, **params})
    estimator.operator_ = saved.operator
    estimator.channel_mean_ = saved.channel_mean
    estimator.channel_scale_ = saved.channel_scale
    estimator.grid_shape_ = saved.grid_shape
    estimator.output_shape_ = saved.output_shape
    estimator.n_channels_in_ = saved.n_channels
    estimator.n_features_in_ = saved.grid_shape[0] * saved.grid_shape[1] * saved.n_channels
    estimator.classes_ = saved.classes
    estimator.eigenvalues_ = saved.eigenvalues
    return estimator


def _saved_from_estimator(estimator) -> SavedOperator:
    missing = [
        name
        for name in ("operator_", "channel_mean_", "channel_scale_", "grid_shape_",
                     "output_shape_")
        if not hasattr(estimator, name)
    ]
    if missing:
        raise ValueError(
            f"save_operator needs a fitted SeparabilityPooling; {type(estimator).__name__} "
            f"has no {', '.join(missing)} (call fit first)."
        )
    return SavedOperator(
        operator=np.asarray(estimator.operator_),
        channel_mean=np.asarray(estimator.channel_mean_),
        channel_scale=np.asarray(estimator.channel_scale_),
        grid_shape=tuple(int(v) for v in estimator.grid_shape_),
        output_shape=tuple(int(v) for v in estimator.output_shape_),
        classes=getattr(estimator, "classes_", None),
        eigenvalues=getattr(estimator, "eigenvalues_", None),
        params=estimator.get_params(deep=False),
    )


def _saved_from_arrays(arrays: dict[str, np.ndarray], path) -> SavedOperator:
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
    operator = arrays["operator"]
    mean, scale = arrays["channel_mean"], arrays["channel_scale"]
    grid = tuple(int(v) for v in arrays["grid_shape"].ravel())
    out = tuple(int(v) for v in arrays["output_shape"].ravel())
    problems = []
    if operator.ndim != 3 or operator.dtype.kind != "f":
        problems.append(f"operator must be a float (k, M, N) array, got {operator.shape}")
    elif len(grid) != 2 or len(out) != 2:
        problems.append(f"grid_shape {grid} and output_shape {out} must be pairs")
    elif grid[0] * grid[1] != operator.shape[2] or out[0] * out[1] != operator.shape[1]:
        problems.append(
            f"operator {operator.shape} does not map a {grid} grid to a {out} grid"
        )
    if mean.ndim != 1 or mean.shape != scale.shape:
        problems.append(
            f"channel_mean {mean.shape} and channel_scale {scale.shape} must both be (C,)"
        )
    elif mean.dtype.kind != "f" or scale.dtype.kind != "f":
        problems.append(
            f"channel_mean and channel_scale must be float arrays, got {mean.dtype} and "
            f"{scale.dtype}"
        )
    elif not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
        problems.append("channel_mean must be finite and channel_scale finite and > 0")
    if operator.dtype.kind == "f" and not np.isfinite(operator).all():
        problems.append("operator contains NaN or infinity")
    if problems:
        raise OperatorFileError(f"{path}: inconsistent operator file: {'; '.join(problems)}.")
    try:
        params = json.loads(str(arrays["params"])) if "params" in arrays else {}
    except json.JSONDecodeError as exc:
        raise OperatorFileError(f"{path}: unreadable params ({exc}).") from exc
    return SavedOperator(
        operator=operator,
        channel_mean=mean,
        channel_scale=scale,
        grid_shape=grid,
        output_shape=out,
        classes=arrays.get("classes"),
        eigenvalues=arrays.get("eigenvalues"),
        params=params,
        format_version=version,
    )


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
