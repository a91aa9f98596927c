"""skpool.plotting: the figures show the right numbers in the right panels, signed colour scales
are symmetric about 0, and nothing is shown on screen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gmp_reference import EPS64, solve_error_bound  # noqa: E402
from skpool import SeparabilityPooling  # noqa: E402
from skpool.io import load_operator, save_operator  # noqa: E402
from skpool.nn import SeparabilityPool2d  # noqa: E402
from skpool.plotting import plot_gmp_weights, plot_operator  # noqa: E402


@pytest.fixture(autouse=True)
def no_show(monkeypatch):
    """Fail if the library tries to show a window; close every figure afterwards."""

    def refuse(*args, **kwargs):
        raise AssertionError("skpool.plotting must not call show()")

    monkeypatch.setattr(plt, "show", refuse)
    monkeypatch.setattr(matplotlib.figure.Figure, "show", refuse)
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    maps = rng.normal(size=(40, 8, 6, 2))
    maps[labels == 1, 2:4, 1:3] += 1.5
    return SeparabilityPooling(alpha=0.3, n_components=2, device="cpu").fit(maps, labels)


def heatmaps(fig):
    """The AxesImage of every heatmap panel, in axes order."""
    return [ax.images[-1] for ax in fig.axes if ax.images]


def test_operator_panels_show_each_cell_row_with_a_symmetric_scale(fitted):
    fig = plot_operator(fitted, component=1)
    out_h, out_w = fitted.output_shape_  # 4x3: small enough to show every cell
    images = heatmaps(fig)
    assert len(images) == out_h * out_w
    assert len(fig.axes) == out_h * out_w + 1  # and one colorbar
    limit = np.abs(fitted.operator_[1]).max()
    for m, image in enumerate(images):
        # exact: the panels show copies of the operator's values, the scale is their max
        np.testing.assert_array_equal(image.get_array(), fitted.operator_[1, m].reshape(8, 6))
        low, high = image.get_clim()
        assert low == -high and high == limit


def test_operator_centre_markers_sit_at_the_cell_centres(fitted):
    fig = plot_operator(fitted, locations=[(0, 0), (3, 2)])
    markers = [ax.lines[0].get_xydata()[0] for ax in fig.axes if ax.lines]
    # 8x6 -> 4x3 (stride 2): cell (u, v) is centred at row 2u + 0.5, column 2v + 0.5
    # (exact: (u + 0.5) * 2 - 0.5 is computed without rounding)
    np.testing.assert_array_equal(markers, [[0.5, 0.5], [4.5, 6.5]])


def test_evenly_spaced_locations_on_a_larger_grid():
    operator = np.random.default_rng(1).normal(size=(1, 81, 324))  # 18x18 -> 9x9
    fig = plot_operator(operator, locations=3)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == [f"cell ({u}, {v})" for u in (0, 4, 8) for v in (0, 4, 8)]
    fig = plot_operator(operator, grid_shape=(18, 18), output_shape=(9, 9), colorbar=False)
    assert len(fig.axes) == 16  # default on grids beyond 5x5: 4x4 evenly spaced cells
    fig = plot_operator(operator, locations=(1, 2), colorbar=False)
    assert [ax.get_title() for ax in fig.axes] == ["cell (4, 0)", "cell (4, 8)"]


def test_every_kind_of_operator_gives_the_same_picture(fitted, tmp_path):
    expected = [image.get_array() for image in heatmaps(plot_operator(fitted))]
    saved = load_operator(save_operator(fitted, tmp_path / "model.npz"))
    layer = SeparabilityPool2d.from_estimator(fitted, dtype=torch.float64)
    for source, kwargs in [
        (saved, {}),
        (layer, {}),
        (torch.as_tensor(fitted.operator_), {"grid_shape": (8, 6), "output_shape": (4, 3)}),
        (fitted.operator_[0], {"grid_shape": (8, 6), "output_shape": (4, 3)}),
    ]:
        got = [image.get_array() for image in heatmaps(plot_operator(source, **kwargs))]
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)  # exact: copies of the same float64 values


def test_operator_argument_errors(fitted):
    with pytest.raises(ValueError, match="component=2"):
        plot_operator(fitted, component=2)
    with pytest.raises(ValueError, match="outside"):
        plot_operator(fitted, locations=[(4, 0)])
    with pytest.raises(ValueError, match="give grid_shape"):
        plot_operator(np.zeros((1, 4, 24)))
    with pytest.raises(ValueError, match=r"grid_shape must be \(rows, cols\) with 24 locations"):
        plot_operator(np.zeros((1, 4, 24)), grid_shape=(5, 5), output_shape=(2, 2))


def gmp_weights_reference(stack, lam):
    """w = (Phi Phi^T + lam I)^-1 1, in float64 numpy."""
    gram = stack @ stack.T
    return np.linalg.solve(gram + lam * np.eye(len(stack)), np.ones(len(stack)))


def gmp_weights_bound(stack, lam):
    """Max-abs bound between skpool's weights w = (1 - Phi xi) / lam (from its float64 xi,
    within gmp_reference.solve_error_bound) and the reference's dual solve: an error d(xi)
    moves w by ||Phi|| ||d xi|| / lam, the products Phi xi round at C eps |Phi| |xi|, and the
    reference errs by cond(K) (n + 2) eps ||w|| (K = Phi Phi^T + lam I, n = N)."""
    n, c = stack.shape
    system = stack.T @ stack + lam * np.eye(c)
    xi = np.linalg.solve(system, stack.sum(axis=0))
    bound = np.linalg.norm(stack, 2) * np.linalg.norm(xi) * solve_error_bound(stack, lam, EPS64)
    bound += (c + 2) * EPS64 * ((np.abs(stack) @ np.abs(xi)).max() + 1)
    weights = gmp_weights_reference(stack, lam)
    kernel = stack @ stack.T + lam * np.eye(n)
    bound = bound / lam + np.linalg.cond(kernel) * (n + 2) * EPS64 * np.linalg.norm(weights)
    return bound


def test_gmp_weight_panels(rng):
    images = rng.random((2, 10, 10))
    maps = rng.random((2, 5, 5, 4))
    maps[1, 0, 0] = 0.0  # a dead location: drawn grey, outside the colour scale
    lams = [0.01, 1.0, 100.0]
    fig = plot_gmp_weights(images, maps, lams)
    assert len(fig.axes) == 2 * (1 + 3) + 2 * 3  # image + one panel per lambda, colorbars
    panels = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(panels) == 8
    for row in range(2):
        np.testing.assert_array_equal(panels[4 * row].images[0].get_array(), images[row])
        for col, lam in enumerate(lams, start=1):
            image = panels[4 * row + col].images[-1]
            expected = gmp_weights_reference(maps[row].reshape(25, 4), lam).reshape(5, 5)
            bound = gmp_weights_bound(maps[row].reshape(25, 4), lam)
            shown = image.get_array()
            np.testing.assert_allclose(shown.data, expected, rtol=0, atol=bound)
            low, high = image.get_clim()
            assert low == -high
            live = ~np.ma.getmaskarray(shown)
            assert high == pytest.approx(np.abs(expected[live]).max(), rel=0, abs=bound)
            assert image.get_extent() == [-0.5, 9.5, 9.5, -0.5]  # drawn over the image
    assert np.ma.getmaskarray(panels[5].images[-1].get_array())[0, 0]  # row 1, first lambda
    assert not np.ma.getmaskarray(panels[1].images[-1].get_array()).any()


def test_gmp_weights_single_image_and_errors(rng):
    fig = plot_gmp_weights(rng.random((8, 8, 3)), torch.rand(4, 4, 6), 1.0, overlay=True,
                           colorbar=False)
    assert len(fig.axes) == 2 and len(fig.axes[1].images) == 2  # image under the weights
    with pytest.raises(ValueError, match="lam must be > 0"):
        plot_gmp_weights(rng.random((8, 8)), rng.random((4, 4, 6)), [1.0, 0.0])
    with pytest.raises(ValueError, match="one \\(h, w\\) or \\(h, w, 3\\) image per map"):
        plot_gmp_weights(rng.random((3, 8, 8)), rng.random((2, 4, 4, 6)), 1.0)
    with pytest.raises(ValueError, match="feature_map must have shape"):
        plot_gmp_weights(rng.random((8, 8)), rng.random((4, 6)), 1.0)


def test_figures_save(fitted, tmp_path, rng):
    plot_operator(fitted).savefig(tmp_path / "operator.png")
    plot_gmp_weights(rng.random((8, 8)), rng.random((4, 4, 3)), 1.0).savefig(tmp_path / "g.png")
    for name in ("operator.png", "g.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gmp_weights_draw_at_most_max_images(rng):
    """A batch larger than max_images draws its first max_images rows (with a warning), so the
    figure's height stays bounded; the weights shown are those of the drawn images."""
    images, maps = rng.random((200, 6, 6)), rng.random((200, 3, 3, 4))
    with pytest.warns(UserWarning, match="first 8 of 200 images"):
        fig = plot_gmp_weights(images, maps, [0.1, 10.0], colorbar=False)
    assert fig.get_size_inches()[1] <= 8 * 2.2 + 0.5
    panels = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(panels) == 8 * 3
    last = panels[-1].images[-1].get_array().data  # row 7, lambda = 10
    expected = gmp_weights_reference(maps[7].reshape(9, 4), 10.0).reshape(3, 3)
    np.testing.assert_allclose(last, expected, rtol=0,
                               atol=gmp_weights_bound(maps[7].reshape(9, 4), 10.0))

    with pytest.warns(UserWarning, match="first 3 of 5"):
        assert len(plot_gmp_weights(images[:5], maps[:5], 1.0, max_images=3,
                                    colorbar=False).axes) == 3 * 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_gmp_weights(images[:9], maps[:9], 1.0, max_images=None, colorbar=False)
        assert len(fig.axes) == 9 * 2
        plot_gmp_weights(images[:8], maps[:8], 1.0, colorbar=False)  # at the limit: no warning
    with pytest.raises(ValueError, match="max_images"):
        plot_gmp_weights(images[:2], maps[:2], 1.0, max_images=0)


def test_operator_panels_are_limited(rng):
    """'all' on a 9x9 output grid is 81 panels: refused by default (before drawing); the limit
    is on the panels drawn, and None lifts it."""
    with pytest.raises(ValueError, match="81 panels .* max_panels=64"):
        plot_operator(rng.normal(size=(1, 81, 81)), "all")
    operator = rng.normal(size=(1, 16, 16))
    with pytest.raises(ValueError, match="16 panels .* max_panels=10"):
        plot_operator(operator, "all", max_panels=10)
    assert len(heatmaps(plot_operator(operator, (3, 3), max_panels=10, colorbar=False))) == 9
    fig = plot_operator(operator, "all", max_panels=None, colorbar=False, panel_size=0.5)
    assert len(heatmaps(fig)) == 16


def test_plotting_shows_only_its_api():
    import skpool.plotting as plotting

    assert dir(plotting) == sorted(plotting.__all__)
