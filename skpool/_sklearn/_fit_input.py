"""What SeparabilityPooling checks and reads beyond the data gate (:mod:`._validation`):
labels, batches of labelled maps, grids against the fitted one, and its progress bars."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d

from .._core import distributed as dist
from ._batches import split_batch
from ._validation import FeatureStacks, check_stacks, layout_hint

__all__ = [
    "check_labels",
    "encode_labels",
    "check_same_grid",
    "labelled_batches",
    "check_fitted_grid",
    "warn_column_grid",
    "device_batches",
    "progress_bars",
]


def check_same_grid(stacks: FeatureStacks, first, position: int) -> None:
    """Batch ``position`` must have the grid and channels of the ``first`` one."""
    if (tuple(stacks.grid_shape), stacks.n_channels) != (
        tuple(first.grid_shape),
        first.n_channels,
    ):
        raise ValueError(
            f"Batch {position} has a {stacks.grid_shape[0]}x{stacks.grid_shape[1]} grid with "
            f"{stacks.n_channels} channels, the first batch a {first.grid_shape[0]}x"
            f"{first.grid_shape[1]} grid with {first.n_channels}; all batches must agree."
        )


def check_labels(estimator, y, n_samples: int) -> np.ndarray:
    """Validated class labels (n,) of n samples (any hashable, sortable type)."""
    if y is None:
        raise ValueError(
            f"{type(estimator).__name__} requires y to be passed, but the target y is None."
        )
    y = column_or_1d(y, warn=True)
    if y.shape[0] != n_samples:
        raise ValueError(f"y has {y.shape[0]} labels but X has {n_samples} samples.")
    check_classification_targets(y)
    return y


def encode_labels(estimator, y, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate class labels of at least two classes; return their codes (n,) in [0, Q) and
    the classes (Q,)."""
    encoder = LabelEncoder()
    codes = encoder.fit_transform(check_labels(estimator, y, n_samples))
    if len(encoder.classes_) < 2:
        raise ValueError(
            f"{type(estimator).__name__} needs samples of at least two classes to measure "
            f"separability; got 1 class ({encoder.classes_[0]})."
        )
    return codes, encoder.classes_


def labelled_batches(estimator, start_pass, summary=None):
    """Validated ``(stacks, labels)`` of every ``(X_batch, y_batch)`` of one pass.

    The first pass (``summary`` None) records ``n_features_in_`` from the first batch and
    holds the others to its grid; the second holds every batch to the ``summary`` of the
    first (its grid and channels).
    """
    first = summary
    for position, item in enumerate(start_pass()):
        features, labels = split_batch(item, position)
        stacks = check_stacks(
            estimator, features, reset=first is None, grid_shape=estimator.grid_shape
        )
        if first is not None:
            check_same_grid(stacks, first, position)
        else:
            warn_column_grid(estimator, stacks)
            first = stacks
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        yield stacks, check_labels(estimator, labels, stacks.n_samples)


def check_fitted_grid(estimator, X) -> FeatureStacks:
    """Validate X for a fitted estimator: the channels and the grid of ``fit``."""
    stacks = check_stacks(estimator, X, reset=False, grid_shape=estimator.grid_shape)
    explicit = stacks.layout == "4d" or estimator.grid_shape is not None
    fitted = tuple(estimator.grid_shape_)
    if stacks.n_locations != fitted[0] * fitted[1] or (
        explicit and tuple(stacks.grid_shape) != fitted
    ):
        raise ValueError(
            f"X has a {stacks.grid_shape[0]}x{stacks.grid_shape[1]} grid "
            f"({stacks.n_locations} locations), but {type(estimator).__name__} was fitted on "
            f"a {fitted[0]}x{fitted[1]} grid; the operator only applies to that grid."
            + layout_hint(stacks)
        )
    return stacks


def warn_column_grid(estimator, stacks: FeatureStacks) -> None:
    """Say so where 2-D (n, F) input without ``grid_shape`` became an F×1 grid (F > 1):
    flattened maps passed without their grid would otherwise pool along a column silently."""
    if stacks.layout == "2d" and estimator.grid_shape is None and stacks.n_locations > 1:
        warnings.warn(
            f"{type(estimator).__name__}: 2-D input (n, {stacks.n_locations}) without "
            f"grid_shape is treated as a {stacks.n_locations}x1 grid with one channel; pass "
            "grid_shape=(H, W) for flattened (H, W, C) maps (grid_shape="
            f"({stacks.n_locations}, 1) keeps the column and silences this warning).",
            UserWarning,
            stacklevel=_stacklevel_of_the_caller(),
        )


def _stacklevel_of_the_caller() -> int:
    """The ``stacklevel`` that points a warning raised by the function calling this one at
    the first frame outside skpool and scikit-learn's ``fit`` wrapper (what Python 3.12's
    ``skip_file_prefixes`` does): the user's call of ``fit``, however deep in the protocol
    the warning is raised."""
    import sklearn.base

    inside = (str(Path(__file__).parents[1]) + os.sep, sklearn.base.__file__)
    frame, level = sys._getframe(2), 2  # level 1: the function calling warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def device_batches(stacks: FeatureStacks, device, batch_size: int):
    """``(sample indices, batch (b, N, C))`` on the device; a memmap's pages are released
    after every batch (:meth:`FeatureStacks.iter_batches`)."""
    for index, batch, _ in stacks.iter_batches(batch_size, device):
        yield index, batch


def progress_bars(estimator):
    """A tqdm bar factory for the core's passes and solve when ``verbose`` (on rank 0 of a
    distributed fit), else None."""
    if not estimator.verbose or (estimator.distributed and dist.rank() != 0):
        return None
    from tqdm.auto import tqdm

    name = type(estimator).__name__

    def bar(description: str, total, unit: str):
        return tqdm(desc=f"{name} {description}", total=total, unit=unit, file=sys.stderr,
                    disable=False)

    return bar
