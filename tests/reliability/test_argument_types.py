"""Arguments read by truthiness or silently truncated, found after the review's class 7: the
functional forms' flags, the plotting helpers' counts and the metrics' error rates are checked
and named like the constructors' parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skpool.evaluation import corruption_error, flip_rate
from skpool.nn.functional import (
    generalized_max_pool2d,
    log_sum_exp_pool2d,
    mixed_max_avg_pool2d,
)

MAPS = torch.rand(2, 3, 4, 4)


@pytest.mark.parametrize("value", ["no", None, 0, 1])
def test_functional_flags_are_booleans(value):
    with pytest.raises(TypeError, match="normalize must be True or False"):
        generalized_max_pool2d(MAPS, 1.0, normalize=value)
    with pytest.raises(TypeError, match="keepdim must be True or False"):
        generalized_max_pool2d(MAPS, 1.0, keepdim=value)
    with pytest.raises(TypeError, match="keepdim must be True or False"):
        mixed_max_avg_pool2d(MAPS, 0.5, keepdim=value)
    with pytest.raises(TypeError, match="keepdim must be True or False"):
        log_sum_exp_pool2d(MAPS, 1.0, keepdim=value)


def test_functional_flags_still_take_numpy_bools():
    pooled = generalized_max_pool2d(MAPS, 1.0, normalize=np.bool_(True), keepdim=np.bool_(True))
    assert pooled.shape == (2, 3, 1, 1)


@pytest.mark.parametrize("value", [2.5, "3", True, 0])
def test_plot_gmp_weights_max_images_is_a_positive_integer(value):
    pytest.importorskip("matplotlib")
    from skpool.plotting import plot_gmp_weights

    rng = np.random.default_rng(0)
    images, maps = rng.random((3, 8, 8)), rng.random((3, 4, 4, 2))
    with pytest.raises((TypeError, ValueError), match="max_images"):
        plot_gmp_weights(images, maps, 1.0, max_images=value)


@pytest.mark.parametrize("rates", [[True, False], [True, True, True]])
def test_error_rates_are_not_booleans(rates):
    with pytest.raises(TypeError, match="errors must be error rates"):
        corruption_error(rates, [0.5] * len(rates))
    with pytest.raises(TypeError, match="baseline_errors must be error rates"):
        corruption_error([0.5] * len(rates), rates)


def test_error_rates_still_take_integers_and_floats():
    assert corruption_error([0, 1], [1, 1]) == pytest.approx(50.0)  # exact: 100 * 1 / 2
    assert flip_rate(0.1, 0.2) == pytest.approx(50.0)
