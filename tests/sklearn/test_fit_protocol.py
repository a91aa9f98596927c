"""SeparabilityPooling on top of the core's fit protocol: the fitted-operator value object it
exposes and stores, the summaries the protocol merges, the warning about a 2-D input's column
grid, and the progress bars of ``verbose``."""

from __future__ import annotations

import dataclasses
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from skpool import SeparabilityPooling
from skpool._core.passes import DataSummary
from skpool.io import FittedOperator
from solve_progress import solve_with_progress  # noqa: F401 - a fixture


def labelled_maps(rng, n=30, grid=(4, 6), channels=2, n_classes=3):
    labels = np.arange(n) % n_classes
    maps = rng.normal(size=(n, *grid, channels)) + 2.0 * rng.normal(size=(n_classes, *grid, 1))[labels]
    return maps, labels


# --------------------------------------------------------------------------------------------
# The fitted operator as one value object
def test_fitted_operator_holds_the_fitted_attributes_and_parameters(rng):
    maps, labels = labelled_maps(rng)
    pool = SeparabilityPooling(n_components=2, device="cpu").fit(maps, labels)
    fitted = pool.fitted_operator_
    assert isinstance(fitted, FittedOperator)
    # the arrays themselves (no copies), the grids as ints, the parameters of the fit
    assert fitted.operator is pool.operator_ and fitted.eigenvalues is pool.eigenvalues_
    assert fitted.channel_mean is pool.channel_mean_
    assert fitted.channel_scale is pool.channel_scale_ and fitted.classes is pool.classes_
    assert (fitted.grid_shape, fitted.output_shape) == ((4, 6), (2, 3))
    assert (fitted.n_components, fitted.n_channels, fitted.n_locations, fitted.n_cells) == (
        2, 2, 24, 6
    )
    assert fitted.params == pool.get_params(deep=False) and fitted.problems() == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        fitted.operator = None


def test_an_unfitted_estimator_has_no_fitted_operator():
    pool = SeparabilityPooling()
    assert not hasattr(pool, "fitted_operator_")
    with pytest.raises(NotFittedError, match="not fitted yet"):
        pool.fitted_operator_  # noqa: B018 - the property under test


def test_to_module_applies_the_operator_with_or_without_the_channel_statistics(rng):
    maps, labels = labelled_maps(rng)
    pool = SeparabilityPooling(device="cpu").fit(maps, labels)
    x = torch.from_numpy(maps).permute(0, 3, 1, 2)  # (B, C, H, W), float64
    # float64 throughout: the layer and the estimator differ by the rounding of a few
    # products of N = 24 terms, far below 1e-12
    layer = pool.fitted_operator_.to_module(dtype=torch.float64)
    got = layer(x).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, pool.transform(maps), rtol=1e-12, atol=1e-12)
    bare = pool.fitted_operator_.to_module(channel_statistics=False, dtype=torch.float64)
    assert bare.channel_mean is None and bare.channel_scale is None
    expected = np.einsum("kmn,bnc->bmkc", pool.operator_, maps.reshape(len(maps), 24, 2))
    np.testing.assert_allclose(
        bare(x).permute(0, 2, 3, 1).numpy(), expected.reshape(len(maps), 2, 3, 2),
        rtol=1e-12, atol=1e-12,
    )


def test_an_estimator_pickled_before_verbose_existed_loads_with_the_default(rng):
    maps, labels = labelled_maps(rng)
    pool = SeparabilityPooling(device="cpu").fit(maps, labels)
    del pool.verbose  # as pickled by a skpool without the parameter
    restored = pickle.loads(pickle.dumps(pool))
    assert restored.get_params()["verbose"] == 0
    np.testing.assert_array_equal(restored.transform(maps), SeparabilityPooling(device="cpu")
                                  .fit(maps, labels).transform(maps))


# --------------------------------------------------------------------------------------------
# The protocol's summaries (plain descriptions: grid, channels, classes, counts)
def test_summaries_of_the_ranks_merge_into_the_whole_data():
    rank0 = DataSummary.of((3, 4), 2, np.array(["a", "c"]), np.array([5, 1]))
    rank1 = DataSummary.of((3, 4), 2, np.array(["b", "c"]), np.array([2, 7]))
    whole = rank1.merge([rank0, rank1])
    np.testing.assert_array_equal(whole.classes, ["a", "b", "c"])
    np.testing.assert_array_equal(whole.counts, [5, 2, 8])
    np.testing.assert_array_equal(whole.local_counts, [0, 2, 7])  # rank 1's share
    assert whole.n_locations == 12 and rank0.whole(distributed=False) is rank0
    other = DataSummary.of((4, 3), 2, np.array(["a"]), np.array([1]))
    with pytest.raises(ValueError, match="Rank 1 has a 4x3 grid with 2 channels"):
        rank0.merge([rank0, other])


# --------------------------------------------------------------------------------------------
# A 2-D input's column grid is said, not silent
def test_flat_input_without_grid_shape_warns_about_its_column_grid(rng):
    maps, labels = labelled_maps(rng)
    flat = maps.reshape(len(maps), -1)  # (n, H*W*C): flattened maps, grid forgotten
    with pytest.warns(UserWarning, match=r"\(n, 48\) without grid_shape is treated as a 48x1 "
                      r"grid with one channel; pass grid_shape=\(H, W\)") as record:
        pool = SeparabilityPooling(device="cpu").fit(flat, labels)
    assert pool.grid_shape_ == (48, 1)
    assert record[0].filename == __file__  # points at the caller's line
    with pytest.warns(UserWarning, match="48x1 grid") as record:
        SeparabilityPooling(device="cpu").fit_batches([(flat[:15], labels[:15]),
                                                       (flat[15:], labels[15:])])
    assert len(record) == 1 and record[0].filename == __file__  # once, at the caller
    quiet = [
        (SeparabilityPooling(device="cpu", grid_shape=(4, 6)), flat),  # the maps' grid
        (SeparabilityPooling(device="cpu", grid_shape=(48, 1)), flat),  # the column, meant
        (SeparabilityPooling(device="cpu"), maps),  # 4-D: the grid is the maps'
        (SeparabilityPooling(device="cpu"), flat[:, :1]),  # one location: nothing to pool
    ]
    for pool, X in quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pool.fit(X, labels)
    assert SeparabilityPooling(device="cpu", grid_shape=(4, 6)).fit(flat, labels).grid_shape_ == (4, 6)


# --------------------------------------------------------------------------------------------
# verbose: progress bars over the batches of each pass and the cells of the solve
def final_counts(err: str, description: str) -> str:
    """The last 'done/total' that the bar ``description`` printed."""
    counts = re.findall(rf"SeparabilityPooling {description}: .*?\| (\d+/\d+) ", err)
    assert counts, f"no bar {description!r} in {err!r}"
    return counts[-1]


def test_verbose_fit_shows_each_pass_and_the_solve(rng, capsys, solve_with_progress):
    maps, labels = labelled_maps(rng)
    SeparabilityPooling(device="cpu", batch_size=7, verbose=1).fit(maps, labels)
    err = capsys.readouterr().err
    assert final_counts(err, "channel statistics") == "30/30"
    assert final_counts(err, "scatter statistics") == "30/30"
    assert final_counts(err, "solve") == "6/6"  # the 2x3 output cells
    assert err.index("channel statistics") < err.index("scatter statistics") < err.index("solve")


def test_verbose_fit_batches_counts_the_samples_of_both_passes(rng, capsys, solve_with_progress):
    maps, labels = labelled_maps(rng)
    batches = [(maps[:12], labels[:12]), (maps[12:], labels[12:])]
    SeparabilityPooling(device="cpu", normalize_channels=False, verbose=2).fit_batches(batches)
    err = capsys.readouterr().err
    assert re.search(r"SeparabilityPooling class sizes: 30sample ", err)  # no total yet
    assert "channel statistics" not in err
    assert final_counts(err, "scatter statistics") == "30/30"  # the total is known by now
    assert final_counts(err, "solve") == "6/6"


def test_silent_by_default(rng, capsys):
    maps, labels = labelled_maps(rng)
    SeparabilityPooling(device="cpu").fit(maps, labels)
    SeparabilityPooling(device="cpu").fit_batches([(maps, labels)])
    assert capsys.readouterr() == ("", "")


def test_verbose_is_checked_like_every_parameter(rng):
    maps, labels = labelled_maps(rng)
    with pytest.raises(ValueError, match="The 'verbose' parameter"):
        SeparabilityPooling(device="cpu", verbose=-1).fit(maps, labels)
