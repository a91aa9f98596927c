"""The one grid validator (skpool._grid) and the places that check an (H, W) pair through it:
the estimator's grid_shape and output_shape, the layers' grids (the models' LearnedPool2d and
input_size too), the plots' grids, operator files and the command line's --grid-shape."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from skpool._grid import check_grid, parse_grid


@pytest.mark.parametrize(
    "value, expected",
    [((3, 4), (3, 4)), ([1, 1], (1, 1)), ((2.0, 5.0), (2, 5)), (np.array([6, 2]), (6, 2)),
     ((np.int64(7), np.int32(1)), (7, 1))],
)
def test_pairs_of_positive_integers_are_grids(value, expected):
    grid = check_grid(value)
    assert grid == expected and all(type(v) is int for v in grid)


@pytest.mark.parametrize(
    "value",
    [(0, 4), (3, -1), (2.5, 2), (3,), (1, 2, 3), "34", b"34", 5, None, (True, 2), ("a", 2),
     (float("inf"), 2), (float("nan"), 2)],
)
def test_anything_else_is_refused_naming_the_parameter(value):
    with pytest.raises(ValueError, match=r"^output_shape must be a pair of positive integers"):
        check_grid(value, "output_shape")


def test_none_where_optional_and_the_number_of_locations():
    assert check_grid(None, optional=True) is None
    with pytest.raises(ValueError, match=r"grid_shape must be None or a pair .* got \(0, 1\)"):
        check_grid((0, 1), optional=True)
    assert check_grid((4, 6), n_locations=24) == (4, 6)
    with pytest.raises(ValueError, match=r"grid_shape must be \(rows, cols\) with 25 locations "
                       r"in all, got \(4, 6\) \(24 locations\)"):
        check_grid((4, 6), n_locations=25)


def test_the_command_line_form():
    assert parse_grid("6,4") == parse_grid("6x4") == (6, 4)
    for text in ("6", "6,0", "a,b", "6,4,1", "6.5,4"):
        with pytest.raises(ValueError, match="pair of positive integers"):
            parse_grid(text)


def test_importing_it_needs_neither_torch_nor_sklearn():
    code = ("import sys, skpool._grid, skpool._fitted, skpool._parameters; "
            "assert not {'torch', 'sklearn'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# Every place that takes a grid refuses a bad one alike
def test_every_grid_parameter_goes_through_the_validator(tmp_path, capsys):
    from skpool import SeparabilityPooling
    from skpool.cli import main
    from skpool.models import LearnedPool2d, PoolingCNN
    from skpool.nn import SeparabilityPool2d
    from skpool.plotting import plot_operator

    maps, labels = np.random.default_rng(0).normal(size=(8, 4, 4, 1)), np.arange(8) % 2
    message = "must be None or a pair of positive integers"
    with pytest.raises(ValueError, match=f"grid_shape {message}"):
        SeparabilityPooling(grid_shape=(0, 16), device="cpu").fit(maps.reshape(8, 16), labels)
    with pytest.raises(ValueError, match=f"output_shape {message}"):
        SeparabilityPooling(output_shape=(2.5, 2), device="cpu").fit(maps, labels)
    operator = torch.full((1, 4, 16), 1 / 16)
    with pytest.raises(ValueError, match="output_shape must be a pair of positive integers"):
        SeparabilityPool2d(operator, output_shape="22")
    with pytest.raises(ValueError, match=r"grid_shape must be \(rows, cols\) with 16 locations"):
        SeparabilityPool2d(operator, output_shape=(2, 2), grid_shape=(4, 5))
    with pytest.raises(ValueError, match="grid_shape must be a pair of positive integers"):
        LearnedPool2d((8.5, 8))
    with pytest.raises(ValueError, match=f"input_size {message}"):
        PoolingCNN(stage_pooling="sgd", input_size="8x8")
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match=r"output_shape must be \(rows, cols\) with 4 locations"):
        plot_operator(operator.numpy(), grid_shape=(4, 4), output_shape=(1, 3))
    np.save(tmp_path / "X.npy", maps)
    np.save(tmp_path / "y.npy", labels)
    code = main(["fit", str(tmp_path / "X.npy"), "--labels", str(tmp_path / "y.npy"),
                 "-o", str(tmp_path / "m.npz"), "--grid-shape", "0,16"])
    assert code == 2 and "expected two positive integers H,W, got '0,16'" in capsys.readouterr().err
