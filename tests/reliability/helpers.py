"""Small data makers and comparisons shared by the reliability tests (``reliability.helpers``)."""

from __future__ import annotations

import numpy as np

#: Classifier settings that train in a fraction of a second: a 4-channel stem, two stages.
TINY_NET = {
    "module__width": 4,
    "module__n_stages": 2,
    "max_epochs": 1,
    "batch_size": 16,
    "device": "cpu",
}


def labelled_maps(seed=0, n_samples=12, grid=(3, 3), n_channels=2, n_classes=2, shift=2.0):
    """Maps (n, H, W, C) float64 whose classes differ by a planted mean, and int labels (n,)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_samples) % n_classes
    class_means = shift * rng.normal(size=(n_classes, *grid, n_channels))
    maps = class_means[labels] + rng.normal(size=(n_samples, *grid, n_channels))
    return maps, labels


def digits_like(seed=0, n_samples=40, n_classes=10, size=8):
    """Float32 images (n, size, size) with a class-dependent blob, and int64 labels in
    0..n_classes-1 (the skorch classifiers' convention)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_samples) % n_classes
    images = rng.random((n_samples, size, size)).astype(np.float32)
    for code in range(n_classes):
        row, col = divmod(code, 4)
        images[labels == code, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2] += 1.0
    return images, labels.astype(np.int64)


def snapshot(estimator) -> dict:
    """A deep copy of an estimator's ``__dict__`` (arrays copied) to compare after a failure."""
    return {
        key: value.copy() if isinstance(value, np.ndarray) else value
        for key, value in estimator.__dict__.items()
    }


def assert_same_state(estimator, before: dict) -> None:
    """The estimator's ``__dict__`` has exactly the keys and (bitwise) the values of ``before``."""
    assert sorted(estimator.__dict__) == sorted(before)
    for key, value in before.items():
        now = estimator.__dict__[key]
        if isinstance(value, np.ndarray):
            assert isinstance(now, np.ndarray) and now.dtype == value.dtype, key
            np.testing.assert_array_equal(now, value, err_msg=key)
        else:
            assert now == value, key
