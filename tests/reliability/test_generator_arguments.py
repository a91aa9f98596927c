"""Issue 28, class 9: generator and evaluation arguments. ``make_svhn_like(n_train=True)`` and
``severities=3``/``None`` are errors naming the argument; image i of ``make_svhn_like``
depends on ``random_state`` and i only, identical by construction: every image is rendered in
a batch of exactly ``_CHUNK`` images, whatever n (a batch of one image took other kernels and
differed by an ulp on some machines)."""

from unittest import mock

import numpy as np
import pytest

import skpool.datasets as datasets
from skpool.datasets import make_svhn_like
from skpool.evaluation import evaluate_corruptions


@pytest.mark.parametrize("name", ["n_train", "n_test"])
@pytest.mark.parametrize("value", [True, False])
def test_boolean_sizes_are_refused_by_name(name, value):
    with pytest.raises(TypeError, match=name):
        make_svhn_like(**{name: value}, random_state=0)


def test_every_rendering_batch_has_the_fixed_size():
    """The construction: whatever n, the rendering ops see batches of exactly _CHUNK images."""
    seen = []
    original = datasets._blur

    def recording(images, sigma):
        seen.append(images.shape[0])
        return original(images, sigma)

    with mock.patch.object(datasets, "_blur", recording):
        make_svhn_like(n_train=1, n_test=3, random_state=0)
        make_svhn_like(n_train=datasets._CHUNK + 1, n_test=1, random_state=0)
    assert seen and set(seen) == {datasets._CHUNK}


@pytest.mark.parametrize("color", [False, True])
def test_image_i_depends_on_the_seed_and_i_only(color):
    """Image i for n = i + 1 (alone in its chunk or block's tail) and for a larger n: the same
    kernels on the same inputs by construction, hence equal bit for bit."""
    chunk = datasets._CHUNK
    largest = make_svhn_like(n_train=chunk + 3, n_test=chunk + 3, random_state=7, color=color)
    for i in (0, 1, chunk - 1, chunk, chunk + 2):
        small = make_svhn_like(n_train=i + 1, n_test=i + 1, random_state=7, color=color)
        np.testing.assert_array_equal(small.X_train[i], largest.X_train[i])
        np.testing.assert_array_equal(small.X_test[i], largest.X_test[i])
        np.testing.assert_array_equal(small.source_train[i], largest.source_train[i])


class _Constant:
    def predict(self, X):
        return np.zeros(len(X), dtype=int)


@pytest.mark.parametrize("severities", [3, None, "3", 3.0])
def test_severities_must_be_a_sequence_named(severities):
    images = np.zeros((2, 1, 8, 8), dtype=np.float32)
    with pytest.raises((TypeError, ValueError), match="severities"):
        evaluate_corruptions(_Constant(), images, np.zeros(2), severities=severities)


@pytest.mark.parametrize("name", ["corruptions"])
def test_corruption_names_must_be_names(name):
    images = np.zeros((2, 1, 8, 8), dtype=np.float32)
    with pytest.raises(TypeError, match=name):
        evaluate_corruptions(_Constant(), images, np.zeros(2), **{name: 5})


# ----------------------------------------------------------------- found in this review
@pytest.mark.parametrize("dtype, value_range", [(np.float32, (0.0, 1e308)),
                                                (np.float16, (0.0, 1e5))])
def test_value_range_beyond_the_images_dtype_is_named(dtype, value_range):
    """float32 images in value_range (0, 1e308) came back as inf/NaN from corrupt."""
    from skpool.evaluation import corrupt

    images = (np.random.default_rng(0).random((2, 1, 8, 8)) * 100).astype(dtype)
    with pytest.raises(ValueError, match="value_range"):
        corrupt(images, "brightness", 3, value_range=value_range)
    assert np.isfinite(corrupt(images, "brightness", 3, value_range=(0.0, 100.0))).all()
