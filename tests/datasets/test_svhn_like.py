"""make_svhn_like: shapes, determinism, disjoint sources, the reduced set, and what it draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skpool.datasets import make_svhn_like

CLEAN = {"distractors": False, "clutter": False, "noise": 0.0}


@pytest.fixture(scope="module")
def small():
    return make_svhn_like(300, 120, random_state=0)


@pytest.mark.parametrize("color, channels", [(False, 1), (True, 3)])
def test_shapes_dtypes_and_range(color, channels):
    data = make_svhn_like(40, 25, color=color, random_state=1)
    assert data.X_train.shape == (40, channels, 32, 32) and data.X_train.dtype == np.float32
    assert data.X_test.shape == (25, channels, 32, 32) and data.X_test.dtype == np.float32
    assert data.y_train.shape == (40,) and data.y_train.dtype == np.int64
    assert data.source_train.shape == (40, 3) and data.source_test.shape == (25, 3)
    for X in (data.X_train, data.X_test):
        assert np.isfinite(X).all() and X.min() >= 0.0 and X.max() <= 1.0
    assert set(np.unique(data.y_train)) <= set(range(10))


def test_return_X_y_in_train_test_split_order(small):
    X_train, X_test, y_train, y_test = make_svhn_like(300, 120, random_state=0, return_X_y=True)
    np.testing.assert_array_equal(X_train, small.X_train)
    np.testing.assert_array_equal(X_test, small.X_test)
    np.testing.assert_array_equal(y_train, small.y_train)
    np.testing.assert_array_equal(y_test, small.y_test)


def test_same_seed_same_images_other_seed_other_images(small):
    again = make_svhn_like(300, 120, random_state=0)
    for key in ("X_train", "X_test", "y_train", "y_test", "source_train", "source_test"):
        np.testing.assert_array_equal(again[key], small[key])  # same code, same seed
    other = make_svhn_like(300, 120, random_state=1)
    assert np.abs(other.X_train - small.X_train).mean() > 0.05
    assert not np.array_equal(other.source_train, small.source_train)


def test_random_state_instance_is_accepted_and_consumed():
    first = make_svhn_like(5, 5, random_state=np.random.RandomState(3))
    second = make_svhn_like(5, 5, random_state=np.random.RandomState(3))
    np.testing.assert_array_equal(first.X_train, second.X_train)
    state = np.random.RandomState(3)
    make_svhn_like(5, 5, random_state=state)
    assert not np.array_equal(make_svhn_like(5, 5, random_state=state).X_train, first.X_train)


def test_labels_are_the_centre_digits_classes(small):
    target = load_digits().target
    np.testing.assert_array_equal(small.y_train, target[small.source_train[:, 0]])
    np.testing.assert_array_equal(small.y_test, target[small.source_test[:, 0]])
    assert (small.source_train[:, 0] >= 0).all()  # a centre digit is always there


def test_train_and_test_come_from_disjoint_source_digits(small):
    used_train = set(small.source_train[small.source_train >= 0].tolist())
    used_test = set(small.source_test[small.source_test >= 0].tolist())
    assert used_train.isdisjoint(used_test)
    # and the split is real: both sides draw from many digits of every class
    target = load_digits().target
    for used in (used_train, used_test):
        assert set(target[sorted(used)]) == set(range(10)) and len(used) > 100


def test_test_source_fraction_sets_the_size_of_the_test_pool():
    data = make_svhn_like(3000, 3000, test_source_fraction=0.1, random_state=2, distractors=False)
    n_train_sources = len(np.unique(data.source_train[:, 0]))
    n_test_sources = len(np.unique(data.source_test[:, 0]))
    # 3000 draws from a pool of ~180 digits hit every one of them (miss chance ~ e^-16 each);
    # from ~1617 digits, about 1617 * (1 - e^{-3000/1617}) ~ 1360 distinct ones.
    assert 170 <= n_test_sources <= 190
    assert n_train_sources > 1200


def test_image_i_does_not_depend_on_how_many_are_drawn():
    # 2100 > one block of 2048: the second block must also keep its first images
    long = make_svhn_like(2100, 0, random_state=4)
    short = make_svhn_like(2050, 0, random_state=4)
    np.testing.assert_array_equal(short.X_train, long.X_train[:2050])
    np.testing.assert_array_equal(short.source_train, long.source_train[:2050])


def test_reduced_keeps_the_first_five_percent():
    full = make_svhn_like(1000, 30, random_state=5)
    reduced = make_svhn_like(1000, 30, reduced=True, random_state=5)
    assert reduced.X_train.shape[0] == 50
    np.testing.assert_array_equal(reduced.X_train, full.X_train[:50])
    np.testing.assert_array_equal(reduced.y_train, full.y_train[:50])
    np.testing.assert_array_equal(reduced.X_test, full.X_test)  # the test set is unchanged
    assert make_svhn_like(10, 0, reduced=True, random_state=0).X_train.shape[0] == 1


def test_colour_images_have_distinct_channels_and_the_same_layout():
    grey = make_svhn_like(50, 0, random_state=6)
    colour = make_svhn_like(50, 0, color=True, random_state=6)
    assert np.abs(colour.X_train[:, 0] - colour.X_train[:, 1]).mean() > 0.02
    np.testing.assert_array_equal(grey.source_train, colour.source_train)


def test_distractors_sit_at_the_left_and_right_edges():
    with_sides = make_svhn_like(400, 0, random_state=7, clutter=False, noise=0.0)
    without = make_svhn_like(400, 0, random_state=7, **CLEAN)
    difference = np.abs(with_sides.X_train - without.X_train).sum(axis=(0, 1, 2))  # per column
    edges = difference[:8].sum() + difference[-8:].sum()
    assert edges > 0.8 * difference.sum()
    alone = (with_sides.source_train[:, 1:] < 0).all(axis=1)
    assert alone.any()
    # an image without neighbours is drawn exactly as with distractors=False: nothing else moves
    np.testing.assert_allclose(with_sides.X_train[alone], without.X_train[alone], rtol=0, atol=1e-6)


def test_noise_and_clutter_add_fine_and_coarse_structure():
    clean = make_svhn_like(200, 0, random_state=8, **CLEAN).X_train
    noisy = make_svhn_like(200, 0, random_state=8, distractors=False, clutter=False, noise=0.2)
    cluttered = make_svhn_like(200, 0, random_state=8, distractors=False, noise=0.0).X_train

    def fine(X):  # energy of the discrete Laplacian: grows with pixel noise
        lap = 4 * X[..., 1:-1, 1:-1] - X[..., :-2, 1:-1] - X[..., 2:, 1:-1]
        lap = lap - X[..., 1:-1, :-2] - X[..., 1:-1, 2:]
        return np.mean(lap**2)

    assert fine(noisy.X_train) > 2 * fine(clean)
    corners = (slice(None), slice(None), slice(0, 6), slice(0, 6))  # background only
    assert np.abs(cluttered[corners] - clean[corners]).mean() > 0.02


def _polarity_free_features(X):
    grey = X.mean(axis=1)
    grey = np.abs(grey - np.median(grey.reshape(len(grey), -1), axis=1)[:, None, None])
    return F.avg_pool2d(torch.from_numpy(grey)[:, None], 2).reshape(len(X), -1).numpy()


def test_the_label_is_what_the_image_shows():
    X_train, X_test, y_train, y_test = make_svhn_like(
        1200, 400, random_state=9, return_X_y=True, **CLEAN
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    accuracy = model.fit(_polarity_free_features(X_train), y_train).score(
        _polarity_free_features(X_test), y_test
    )
    # a linear model on 16x16 |image - median| reaches ~0.7 on unseen source digits; labels
    # unrelated to the images would give ~0.1 (chance for 10 balanced classes)
    assert accuracy > 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test": -1}, "n_test"),
        ({"n_train": 2.5}, "n_train"),
        ({"noise": -0.1}, "noise"),
        ({"test_source_fraction": 1.0}, "test_source_fraction"),
        ({"random_state": "seed"}, "random_state"),
        ({"color": "yes"}, "color"),
    ],
)
def test_bad_parameters_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_svhn_like(**{"n_train": 5, "n_test": 5, **kwargs})
