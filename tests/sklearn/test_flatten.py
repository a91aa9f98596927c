"""SeparabilityPooling(flatten=True): one row per sample, columns named by cell, component and
channel, so that a classifier can follow it in a pipeline."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline

from skpool import SeparabilityPooling


def make_maps(rng, n_samples=60, grid=(6, 4), n_channels=3, n_classes=3):
    """Channels-last maps whose class means differ, and their labels."""
    labels = np.arange(n_samples) % n_classes
    class_means = 2.0 * rng.normal(size=(n_classes, *grid, n_channels))
    return class_means[labels] + rng.normal(size=(n_samples, *grid, n_channels)), labels


@pytest.mark.parametrize("n_components", [1, 2])
def test_every_column_is_the_value_its_name_says(rng, n_components):
    """Column ``m{m}_j{j}_c{c}`` holds cell m = u·W' + v, channel j·C + c of the 4-D output."""
    maps, labels = make_maps(rng)
    maps_out = SeparabilityPooling(n_components=n_components, device="cpu").fit(maps, labels)
    flat = SeparabilityPooling(n_components=n_components, flatten=True, device="cpu")
    rows = flat.fit(maps, labels).transform(maps)
    grid_out, n_channels = maps_out.output_shape_, maps.shape[-1]
    four_d = maps_out.transform(maps)  # (n, H', W', k*C)
    assert four_d.shape == (60, *grid_out, n_components * n_channels)
    names = flat.get_feature_names_out()
    assert rows.shape == (60, len(names)) == (60, grid_out[0] * grid_out[1] * n_components * 3)
    for column, name in enumerate(names):
        m, j, c = map(int, re.fullmatch(r"separabilitypooling_m(\d+)_j(\d+)_c(\d+)", name).groups())
        u, v = divmod(m, grid_out[1])
        # Two fits of the same data with the same parameters: the same computation, so the
        # values agree to rounding of the one solve (1e-12 is far above float64's
        # deterministic result and far below any layout mistake, which moves values by O(1)).
        np.testing.assert_allclose(rows[:, column], four_d[:, u, v, j * n_channels + c],
                                   rtol=1e-12, atol=1e-12)


def test_flatten_takes_every_layout_to_the_same_rows(rng):
    maps, labels = make_maps(rng)
    expected = SeparabilityPooling(flatten=True, device="cpu").fit(maps, labels).transform(maps)
    stacks = maps.reshape(60, 24, 3)
    pool = SeparabilityPooling(grid_shape=(6, 4), flatten=True, device="cpu").fit(stacks, labels)
    np.testing.assert_allclose(pool.transform(stacks), expected, rtol=1e-12, atol=1e-12)
    flat_input = maps.reshape(60, 72)
    pool = SeparabilityPooling(grid_shape=(6, 4), flatten=True, device="cpu")
    np.testing.assert_allclose(pool.fit(flat_input, labels).transform(flat_input), expected,
                               rtol=1e-12, atol=1e-12)


def test_pipeline_with_a_classifier_on_channels_last_maps(rng):
    maps, labels = make_maps(rng, n_samples=90)
    model = make_pipeline(SeparabilityPooling(flatten=True, device="cpu"),
                          LogisticRegression(max_iter=1000))
    scores = cross_val_score(model, maps, labels, cv=3)
    # Class means 2 sigma apart per value over 24 cells: far above chance (1/3) if the pooled
    # features reach the classifier; a broken column order would still score, so the column
    # test above is what checks the order.
    assert scores.mean() > 0.8, scores
    fitted = model.fit(maps, labels)
    assert fitted[-1].n_features_in_ == len(fitted[0].get_feature_names_out())


def test_pandas_output_of_maps_with_flatten(rng):
    pd = pytest.importorskip("pandas")
    maps, labels = make_maps(rng)
    pool = SeparabilityPooling(flatten=True, device="cpu").set_output(transform="pandas")
    frame = pool.fit(maps, labels).transform(maps)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == list(pool.get_feature_names_out())
    unflattened = SeparabilityPooling(device="cpu").set_output(transform="pandas")
    with pytest.raises(ValueError, match="flatten=True"):
        unflattened.fit(maps, labels).transform(maps)


def test_command_line_flatten_is_stored_in_the_model(rng, tmp_path, capsys):
    from skpool.cli import main

    maps, labels = make_maps(rng)
    np.savez(tmp_path / "train.npz", X=maps.astype(np.float32), y=labels)
    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(tmp_path / "model.npz"),
                 "--flatten", "--device", "cpu", "-q"]) == 0
    assert main(["transform", str(tmp_path / "model.npz"), str(tmp_path / "train.npz"),
                 "-o", str(tmp_path / "rows.npy"), "--device", "cpu", "-q"]) == 0
    capsys.readouterr()
    rows = np.load(tmp_path / "rows.npy")
    expected = SeparabilityPooling(flatten=True, device="cpu").fit(
        maps.astype(np.float32), labels).transform(maps.astype(np.float32))
    assert rows.shape == expected.shape == (60, 3 * 2 * 3)
    # float32 solves on two code paths (file round trip vs. in memory): agree to a few
    # float32 ulps relative to the values' scale, not bit for bit
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
