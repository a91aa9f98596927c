"""Shape errors that come from the wrong layout say which layout each face takes: the
estimators channels last (n, H, W, C), the torch layers channels first (B, C, H, W)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skpool import GeneralizedMaxPooling, SeparabilityPooling
from skpool.nn import SeparabilityPool2d

CHANNELS_LAST = r"estimators take channels-last maps \(n, H, W, C\)"
CHANNELS_FIRST = r"layers take channels-first maps \(B, C, H, W\)"


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(30, 6, 6, 16))  # (n, H, W, C), channels last
    return SeparabilityPooling(device="cpu").fit(maps, np.arange(30) % 3), maps


def test_the_layer_names_its_layout_for_channels_last_maps(fitted):
    estimator, maps = fitted
    layer = SeparabilityPool2d.from_estimator(estimator, dtype=torch.float64)
    channels_last = torch.as_tensor(maps[:2])  # (B, 6, 6, 16): seen as C=6 on a 6x16 grid
    with pytest.raises(ValueError, match=r"6x6 grid; got input of spatial size 6x16\..*"
                       + CHANNELS_FIRST):
        layer(channels_last)
    assert layer(channels_last.permute(0, 3, 1, 2)).shape == (2, 16, 3, 3)  # as the hint says


def test_the_layer_without_grid_names_its_layout(fitted):
    estimator, maps = fitted
    layer = SeparabilityPool2d(estimator.operator_, output_shape=(3, 3), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"36 locations.*" + CHANNELS_FIRST):
        layer(torch.as_tensor(maps[:2]))


def test_the_estimators_name_their_layout_for_channels_first_maps(fitted):
    estimator, maps = fitted
    channels_first = maps.transpose(0, 3, 1, 2)  # (n, 16, 6, 6): seen as a 16x6 grid, C=6
    with pytest.raises(ValueError, match=CHANNELS_LAST):
        estimator.transform(channels_first)
    gmp = GeneralizedMaxPooling(device="cpu").fit(maps)
    with pytest.raises(ValueError, match=r"6 channels per location.*" + CHANNELS_LAST):
        gmp.transform(channels_first)
    assert gmp.transform(channels_first.transpose(0, 2, 3, 1)).shape == (30, 16)


def test_other_layouts_get_no_four_d_hint(fitted):
    estimator, maps = fitted
    with pytest.raises(ValueError, match="channels per location") as error:
        estimator.transform(maps.reshape(30, 36, 16)[..., :8])
    assert "channels-last maps" not in str(error.value)


def test_equal_sizes_hide_the_layout_as_documented():
    """H = W = C: a channels-first array has the channels-last shape; nothing can tell, and
    the docstrings say so. This pins that limit: were it detected, the docs should change."""
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(30, 4, 4, 4))
    estimator = SeparabilityPooling(device="cpu").fit(maps, np.arange(30) % 3)
    assert estimator.transform(maps.transpose(0, 3, 1, 2)).shape == (30, 2, 2, 4)
    assert "no check can tell them apart" in SeparabilityPooling.__doc__
    assert "no check" in SeparabilityPool2d.__doc__ and "no check" in GeneralizedMaxPooling.__doc__
