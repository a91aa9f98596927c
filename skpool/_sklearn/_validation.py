"""The one data gate of the scikit-learn estimators: feature stacks in, batches of tensors out.

Accepted ``X`` (see the data conventions in the package docs):

- 4-D ``(n_samples, H, W, C)`` feature maps, channels last;
- 3-D ``(n_samples, N, C)`` stacks (an N×1 grid unless ``grid_shape=(H, W)`` is given);
- 2-D ``(n_samples, F)``: F locations with one channel, or, when ``grid_shape=(H, W)`` is
  given, flattened ``(H, W, C)`` stacks with ``C = F / (H*W)``;
- where allowed (GMP), a list of ``(N_i, C)`` arrays of different N_i.

numpy arrays, memmaps, pandas frames (2-D), nested lists and torch tensors are accepted.
float32 and float64 keep their dtype; float16 (numpy or torch) and bfloat16 become float32;
integers, booleans and Python numbers become float64 (a list of float32 rows stays float32);
complex and object data that is not numeric is refused.
Data are only read batch by batch (memmaps stay on disk), and every batch is checked for NaN
and infinity before it is used.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.utils._param_validation import validate_parameter_constraints
from sklearn.utils.validation import validate_data

from .._grid import check_grid
from ._batches import release_mapped_pages

__all__ = ["FeatureStacks", "check_stacks", "atomic_fit", "check_params"]

_ALLOWED_NDIM = (2, 3, 4)


@dataclass(frozen=True)
class FeatureStacks:
    """Validated estimator input, not yet read.

    Attributes
    ----------
    data : ndarray, memmap, Tensor of shape (n_samples, N, C), or list of (N_i, C) arrays
    layout : {"2d", "3d", "4d", "ragged"}
        How the input was given (the output mirrors it).
    n_samples, n_channels : int
    grid_shape : (H, W) or None
        The spatial grid of each sample; None for ragged input.
    dtype : torch.dtype
        float32 or float64: the dtype of the computation and of the output.
    """

    data: Any
    layout: str
    n_samples: int
    n_channels: int
    grid_shape: tuple[int, int] | None
    dtype: torch.dtype

    @property
    def n_locations(self) -> int | None:
        return None if self.grid_shape is None else self.grid_shape[0] * self.grid_shape[1]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.float64 if self.dtype == torch.float64 else np.float32)

    def iter_batches(
        self, batch_size: int, device: torch.device
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]:
        """Yield ``(sample_indices, features (b, N, C), mask (b, N) or None)`` on ``device``.

        Ragged samples are sorted by length and padded within a batch (so padding stays
        small); the mask is True at real locations. Raises ValueError at the first batch
        that holds NaN or infinity. After each batch the pages of a shared memmap that it read
        are released (:func:`~skpool._sklearn._batches.release_mapped_pages`), so a pass over
        a memmap does not leave the whole file resident.
        """
        if self.layout == "ragged":
            yield from self._iter_ragged(batch_size, device)
            return
        for start in range(0, self.n_samples, batch_size):
            stop = min(start + batch_size, self.n_samples)
            batch = _to_tensor(self.data[start:stop], self.dtype, device)
            batch = batch.reshape(stop - start, -1, self.n_channels)
            _check_finite(batch, start)
            yield np.arange(start, stop), batch, None
            release_mapped_pages(self.data)

    def _iter_ragged(self, batch_size, device):
        lengths = np.array([len(sample) for sample in self.data])
        order = np.argsort(lengths, kind="stable")
        for start in range(0, self.n_samples, batch_size):
            index = order[start : start + batch_size]
            longest = int(lengths[index].max())
            batch = torch.zeros(
                (len(index), longest, self.n_channels), dtype=self.dtype, device=device
            )
            for row, i in enumerate(index):  # copies only; the math is batched below
                batch[row, : lengths[i]] = _to_tensor(self.data[i], self.dtype, device)
            _check_finite(batch, int(index[0]), index)
            lengths_t = torch.as_tensor(lengths[index], device=device)
            mask = torch.arange(longest, device=device)[None, :] < lengths_t[:, None]
            yield index, batch, mask


def check_stacks(
    estimator,
    X,
    *,
    reset: bool,
    grid_shape=None,
    allow_ragged: bool = False,
) -> FeatureStacks:
    """Validate ``X`` for ``estimator`` and describe it as feature stacks.

    With ``reset=True`` (in ``fit``) records ``n_features_in_`` (F for 2-D input, N*C for 3-D
    and 4-D input, C for ragged input), ``n_channels_in_`` and, for frames,
    ``feature_names_in_``. With ``reset=False`` checks them: a 2-D input must have the fitted
    number of features (scikit-learn's rule), any input the fitted number of channels.
    """
    grid_shape = check_grid(grid_shape, optional=True)
    _check_not_empty(estimator, X)
    if _is_ragged(X):
        if not allow_ragged:
            raise ValueError(
                f"{type(estimator).__name__} needs samples of one shape; got a list of "
                "stacks. Stack them into one (n_samples, N, C) or (n_samples, H, W, C) array."
            )
        stacks = _check_ragged(X)
    elif isinstance(X, torch.Tensor):
        stacks = _check_tensor(X, grid_shape)
    else:
        stacks = _check_arraylike(estimator, X, grid_shape, reset)

    if reset:
        if stacks.layout != "2d":  # validate_data recorded 2-D input itself
            estimator.n_features_in_ = (
                stacks.n_channels
                if stacks.layout == "ragged"
                else stacks.n_locations * stacks.n_channels
            )
            if hasattr(estimator, "feature_names_in_"):
                del estimator.feature_names_in_
        estimator.n_channels_in_ = stacks.n_channels
    else:
        expected = getattr(estimator, "n_channels_in_", None)
        if expected is not None and stacks.n_channels != expected:
            raise ValueError(
                f"X has {stacks.n_channels} channels per location, but "
                f"{type(estimator).__name__} was fitted with {expected} channels."
                + layout_hint(stacks)
            )
    return stacks


def layout_hint(stacks: FeatureStacks) -> str:
    """A sentence for shape errors on 4-D input: the estimators take channels last, the torch
    layers channels first (the commonest way to get a wrong shape)."""
    if stacks.layout != "4d":
        return ""
    return (
        " The estimators take channels-last maps (n, H, W, C); channels-first maps "
        "(n, C, H, W), as the torch layers take, need X.transpose(0, 2, 3, 1) "
        "(torch: X.permute(0, 2, 3, 1))."
    )


def check_params(estimator, names, method: str) -> None:
    """Validate the parameters ``names`` that ``method`` uses against the estimator's
    ``_parameter_constraints``, as ``fit`` does: ``set_params`` after ``fit`` (or a fitted
    estimator rebuilt from a file) can hold values ``fit`` never saw. Raises scikit-learn's
    ``InvalidParameterError`` (a ``ValueError`` and a ``TypeError``) naming the parameter."""
    validate_parameter_constraints(
        {name: estimator._parameter_constraints[name] for name in names},
        {name: getattr(estimator, name) for name in names},
        caller_name=f"{type(estimator).__name__}.{method}",
    )


def atomic_fit(fit):
    """Decorate ``fit`` so that an exception leaves the estimator as it was before the call."""

    @functools.wraps(fit)
    def wrapper(self, *args, **kwargs):
        saved = dict(self.__dict__)
        try:
            return fit(self, *args, **kwargs)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    return wrapper


# --------------------------------------------------------------------------------------------
def _is_ragged(X) -> bool:
    if not isinstance(X, (list, tuple)) or len(X) == 0:
        return False
    first = X[0]
    return isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim == 2


def _layout_from_shape(shape, grid_shape, ndim) -> tuple[str, tuple[int, int], int]:
    """Layout, grid (H, W) and channel count from an array's shape."""
    if ndim == 4:
        _, height, width, channels = shape
        if grid_shape is not None and grid_shape != (height, width):
            raise ValueError(
                f"X has a {height}x{width} grid but grid_shape={grid_shape} was given."
            )
        return "4d", (height, width), channels
    if ndim == 3:
        _, n_locations, channels = shape
        grid = grid_shape or (n_locations, 1)
        if grid[0] * grid[1] != n_locations:
            raise ValueError(
                f"X has {n_locations} locations per sample, which does not match "
                f"grid_shape={grid_shape} ({grid[0] * grid[1]} locations)."
            )
        return "3d", grid, channels
    n_features = shape[1]
    if grid_shape is None:
        return "2d", (n_features, 1), 1
    cells = grid_shape[0] * grid_shape[1]
    if n_features % cells:
        raise ValueError(
            f"X has {n_features} features per sample, which is not a multiple of the "
            f"{cells} locations of grid_shape={grid_shape}."
        )
    return "2d", grid_shape, n_features // cells


def _check_ndim(ndim) -> None:
    if ndim not in _ALLOWED_NDIM:
        raise ValueError(
            f"X must be 2-D (n_samples, F), 3-D (n_samples, N, C) or 4-D "
            f"(n_samples, H, W, C); got a {ndim}-D array."
        )


def _check_not_empty(estimator, X) -> None:
    """Name an input without samples (``[]``, ``np.empty((0, F))``, an empty tensor) before
    scikit-learn's "Expected 2D array" hides what is wrong (its message for (0, F) kept)."""
    if isinstance(X, torch.Tensor) and X.is_nested:
        return  # no shape to read: _check_dense_tensor explains
    shape = getattr(X, "shape", None)
    if shape is None and isinstance(X, (list, tuple)):
        shape = (len(X),)
    if shape is not None and len(shape) >= 1 and shape[0] == 0:
        raise ValueError(
            f"X is empty: found array with 0 sample(s) (shape={tuple(shape)}) while a minimum "
            f"of 1 is required by {type(estimator).__name__}."
        )


def _numpy_dtype_rule(X):
    """The rule of the output dtype for numpy-like input: float32 for floating input of at most
    32 bits (float16 is widened to float32, as torch's float16/bfloat16 are), float64
    otherwise. A list or tuple of float32 rows counts as float32 (numpy's own reading of it);
    Python numbers as float64."""
    if isinstance(X, (list, tuple)):
        try:
            kind = np.asarray(X).dtype
        except (ValueError, TypeError):  # ragged or odd: scikit-learn's checks explain it
            return [np.float64, np.float32]
        return [np.float32] if kind in (np.float16, np.float32) else [np.float64]
    dtype = getattr(X, "dtype", None)
    if isinstance(dtype, np.dtype) and dtype == np.float16:
        return [np.float32]
    return [np.float64, np.float32]


def _check_arraylike(estimator, X, grid_shape, reset) -> FeatureStacks:
    ndim = X.ndim if hasattr(X, "ndim") else np.asarray(X).ndim
    dtypes = _numpy_dtype_rule(X)
    if ndim > 2:
        _check_ndim(ndim)
        X = validate_data(
            estimator,
            X,
            reset=reset,
            allow_nd=True,
            ensure_2d=False,
            dtype=dtypes,
            ensure_all_finite=False,
            copy=False,
        )
    else:
        # scikit-learn's own checks for 1-D, empty, sparse, NaN/inf and feature-count errors;
        # a memmap is not scanned whole here (every batch is checked when it is read).
        X = validate_data(
            estimator,
            X,
            reset=reset,
            dtype=dtypes,
            ensure_all_finite=not isinstance(X, np.memmap),
        )
    layout, grid, channels = _layout_from_shape(X.shape, grid_shape, X.ndim)
    if channels < 1 or grid[0] * grid[1] < 1:
        raise ValueError(f"X has an empty sample shape {X.shape[1:]}.")
    dtype = torch.float32 if X.dtype == np.float32 else torch.float64
    return FeatureStacks(X, layout, X.shape[0], channels, grid, dtype)


def _check_tensor(X: torch.Tensor, grid_shape) -> FeatureStacks:
    _check_dense_tensor(X, "X")
    _check_ndim(X.ndim)
    dtype = _torch_compute_dtype(X.dtype)
    if X.shape[0] < 1:
        raise ValueError(f"Found array with 0 sample(s) (shape={tuple(X.shape)}).")
    layout, grid, channels = _layout_from_shape(tuple(X.shape), grid_shape, X.ndim)
    if channels < 1 or grid[0] * grid[1] < 1:
        raise ValueError(f"X has an empty sample shape {tuple(X.shape[1:])}.")
    return FeatureStacks(X.detach(), layout, X.shape[0], channels, grid, dtype)


def _check_ragged(X) -> FeatureStacks:
    for i, sample in enumerate(X):
        if not isinstance(sample, (np.ndarray, torch.Tensor)) or sample.ndim != 2:
            shape = tuple(sample.shape) if hasattr(sample, "shape") else type(sample).__name__
            raise ValueError(f"Stack {i} must be a 2-D (N_i, C) array, got {shape}.")
    channels = {sample.shape[1] for sample in X}
    if len(channels) > 1:
        raise ValueError(
            f"All stacks in the list must have the same number of channels; got {sorted(channels)}."
        )
    dtypes = set()
    for i, sample in enumerate(X):
        if isinstance(sample, torch.Tensor):
            _check_dense_tensor(sample, f"Stack {i}")
            dtypes.add(_torch_compute_dtype(sample.dtype))
        else:
            if sample.dtype.kind == "c":
                raise ValueError("Complex data not supported.")
            if sample.dtype.kind not in "fiub":
                raise ValueError(f"Stack {i} has unsupported dtype {sample.dtype}.")
            narrow = sample.dtype in (np.float16, np.float32)  # the rule of _numpy_dtype_rule
            dtypes.add(torch.float32 if narrow else torch.float64)
    (n_channels,) = channels
    if n_channels < 1:
        raise ValueError("The stacks have 0 channels.")
    empty = [i for i, sample in enumerate(X) if sample.shape[0] == 0]
    if empty:  # one behaviour for every batch_size: nothing to pool is an error, not zeros
        raise ValueError(
            f"Stack {empty[0]} has no locations (shape {tuple(X[empty[0]].shape)}); every stack "
            f"needs at least one descriptor ({len(empty)} empty stack(s) in all)."
        )
    dtype = torch.float32 if dtypes == {torch.float32} else torch.float64
    # Tensors that require grad are read like plain ones (the estimators compute no gradients).
    samples = [s.detach() if isinstance(s, torch.Tensor) else s for s in X]
    return FeatureStacks(samples, "ragged", len(X), n_channels, None, dtype)


def _check_dense_tensor(X: torch.Tensor, name: str) -> None:
    """Refuse tensors whose values cannot be read as one dense array: sparse layouts (COO,
    CSR, CSC, BSR, BSC), nested/jagged tensors, 'meta' tensors (shape only, no data) and
    quantized tensors. Inside torch these fail later with a NotImplementedError; here they
    are a TypeError that says what to do, as scipy sparse matrices are (scikit-learn's)."""
    if X.is_nested:
        raise TypeError(
            f"{name} is a nested (jagged) torch tensor; pass a list of (N_i, C) tensors "
            "(ragged input, generalized max pooling) or pad it to one dense tensor."
        )
    if X.layout != torch.strided:
        raise TypeError(
            f"{name} is a sparse torch tensor (layout {X.layout}); skpool needs dense feature "
            "maps: pass X.to_dense()."
        )
    if X.is_meta:
        raise TypeError(
            f"{name} is a 'meta' torch tensor: it has a shape but no values. Pass a tensor on "
            "a real device (cpu or cuda)."
        )
    if X.is_quantized:
        raise TypeError(f"{name} is a quantized torch tensor; pass X.dequantize().")


def _torch_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        raise ValueError("Complex data not supported.")
    if dtype == torch.float64:
        return torch.float64
    if dtype.is_floating_point:
        return torch.float32
    return torch.float64  # integers and booleans, as scikit-learn does


def _to_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=dtype)
    array = np.ascontiguousarray(values, dtype=np.float64 if dtype == torch.float64 else np.float32)
    if not array.flags.writeable:  # torch.from_numpy warns on read-only memory (memmaps)
        array = array.copy()
    return torch.from_numpy(array).to(device)


def _check_finite(batch: torch.Tensor, first_sample: int, index=None) -> None:
    """ValueError naming the first sample (its index in X; ``index`` maps the batch's rows to
    it when they are not ``first_sample, first_sample + 1, ...``) that holds NaN or infinity."""
    if not bool(torch.isfinite(batch).all()):
        bad_rows = (~torch.isfinite(batch)).flatten(1).any(dim=1).nonzero()[:, 0].tolist()
        samples = sorted(first_sample + r if index is None else int(index[r]) for r in bad_rows)
        where = f"sample {samples[0]}" + (f" and {len(samples) - 1} more" if samples[1:] else "")
        raise ValueError(
            f"Input X contains NaN or infinity in {where} (in the batch starting at sample "
            f"{first_sample}); skpool needs finite features."
        )
