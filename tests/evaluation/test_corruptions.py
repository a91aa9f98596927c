"""Corruptions: severity 0 is the identity, distance grows with severity, kinds and dtypes are
kept, seeds fix the draws, and each operation matches an independent float64 reference."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from scipy import ndimage
from testing_utils import DEVICES

from skpool.datasets import make_svhn_like
from skpool.evaluation import (
    CORRUPTIONS,
    GEOMETRIC_CORRUPTIONS,
    NON_GEOMETRIC_CORRUPTIONS,
    SEVERITY_PARAMETERS,
    corrupt,
)
from skpool.evaluation import _images as ops

RANDOM = ("translate", "rotate", "scale", "shear", "tilt", "gaussian_noise", "shot_noise")
DETERMINISTIC = tuple(c for c in CORRUPTIONS if c not in RANDOM)


@pytest.fixture(scope="module")
def images():
    """16 colour SVHN-like images, float32 in [0, 1]."""
    return make_svhn_like(16, 0, color=True, random_state=0).X_train


def test_the_lists_partition_the_corruptions():
    geometric = {"translate", "rotate", "scale", "shear", "tilt", "zoom_blur"}
    assert set(GEOMETRIC_CORRUPTIONS) == geometric
    assert set(GEOMETRIC_CORRUPTIONS) | set(NON_GEOMETRIC_CORRUPTIONS) == set(CORRUPTIONS)
    assert not set(GEOMETRIC_CORRUPTIONS) & set(NON_GEOMETRIC_CORRUPTIONS)
    assert all(len(SEVERITY_PARAMETERS[c]["levels"]) == 5 for c in CORRUPTIONS)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_severity_zero_is_an_unchanged_copy(images, corruption):
    out = corrupt(images, corruption, 0, random_state=0)
    np.testing.assert_array_equal(out, images)
    assert out is not images and not np.shares_memory(out, images)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_distance_from_the_clean_images_grows_with_severity(images, corruption):
    distances = [
        np.mean((corrupt(images, corruption, s, random_state=1) - images) ** 2) for s in range(6)
    ]
    assert distances[0] == 0
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_shape_dtype_and_range_are_kept(images, corruption, dtype):
    out = corrupt(images.astype(dtype), corruption, 3, random_state=0)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == images.shape
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_tensors_stay_tensors_on_their_device_and_agree_with_numpy(images, corruption, device):
    tensor = torch.from_numpy(images).to(device)
    out = corrupt(tensor, corruption, 4, random_state=2)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.device == tensor.device and out.shape == tensor.shape
    # the same computation; on CUDA the convolutions and sampling round differently:
    # float32 roundoff (6e-8) times a few dozen operations on values <= 1
    np.testing.assert_allclose(
        out.cpu().numpy(), corrupt(images, corruption, 4, random_state=2), rtol=0, atol=1e-5
    )


def test_half_precision_tensors_are_computed_in_float32_and_returned_in_half(images):
    out = corrupt(torch.from_numpy(images).half(), "rotate", 2, random_state=0)
    assert out.dtype == torch.float16
    reference = corrupt(images, "rotate", 2, random_state=0)
    # float16 input and output: unit roundoff 2**-11 ~ 4.9e-4 each way, on values <= 1
    np.testing.assert_allclose(out.float().numpy(), reference, rtol=0, atol=2e-3)


@pytest.mark.parametrize("corruption", [c for c in CORRUPTIONS if c != "quantize"])
def test_float32_agrees_with_float64(images, corruption):
    single = corrupt(images, corruption, 5, random_state=3)
    double = corrupt(images.astype(np.float64), corruption, 5, random_state=3)
    # the random draws are made in float64 for both; the float32 path differs by roundoff in
    # sampling coordinates (~16 px * 6e-8) and in sums of at most 27 terms, on values <= 1
    np.testing.assert_allclose(single, double, rtol=0, atol=2e-5)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_the_seed_fixes_the_draws(images, corruption):
    first = corrupt(images, corruption, 3, random_state=4)
    np.testing.assert_array_equal(first, corrupt(images, corruption, 3, random_state=4))
    other = corrupt(images, corruption, 3, random_state=5)
    if corruption in RANDOM:
        assert np.abs(first - other).mean() > 1e-3
    else:  # nothing random in it: the seed must not matter
        np.testing.assert_array_equal(first, other)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_value_range_is_respected_by_mapping_to_unit_range(images, corruption):
    unit = images.astype(np.float64)  # 2x - 1 and back are exact in float64 for float32 data
    out = corrupt(2 * unit - 1, corruption, 3, random_state=6, value_range=(-1, 1))
    # the unit images are bit-identical; only the final affine map rounds (~1e-16)
    expected = 2 * corrupt(unit, corruption, 3, random_state=6) - 1
    np.testing.assert_allclose(out, expected, atol=1e-12)
    assert out.min() >= -1 and out.max() <= 1


# ---------------------------------------------------------------------------- against references


def _sample_reference(image, source_rows, source_cols):
    """Bilinear sampling with edge replication (float64, scipy), one (C, H, W) image."""
    coordinates = [source_rows, source_cols]
    return np.stack(
        [ndimage.map_coordinates(c, coordinates, order=1, mode="nearest") for c in image]
    )


def _pixel_coordinates(height, width):
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    return cols + 0.5 - width / 2, rows + 0.5 - height / 2  # x right, y down, about the centre


def test_affine_matches_a_scipy_reference_for_any_map(rng):
    x = rng.random((3, 2, 12, 16))
    inverse = rng.normal(0, 0.6, (3, 2, 2)) + np.eye(2)
    shift = rng.normal(0, 3, (3, 2))
    out = ops.affine(torch.from_numpy(x), torch.from_numpy(inverse), torch.from_numpy(shift))
    px, py = _pixel_coordinates(12, 16)
    for i in range(3):
        qx = inverse[i, 0, 0] * (px - shift[i, 0]) + inverse[i, 0, 1] * (py - shift[i, 1])
        qy = inverse[i, 1, 0] * (px - shift[i, 0]) + inverse[i, 1, 1] * (py - shift[i, 1])
        expected = _sample_reference(x[i], qy + 6 - 0.5, qx + 8 - 0.5)
        # float64 both sides; grid normalisation and unnormalisation round at ~1e-15
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-12)


def test_translation_by_whole_pixels_moves_content_and_repeats_the_border(rng):
    x = rng.random((2, 1, 8, 8))
    shift = torch.tensor([[3.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    out = ops.affine(torch.from_numpy(x), torch.eye(2, dtype=torch.float64).expand(2, 2, 2), shift)
    columns = np.clip(np.arange(8) - 3, 0, 7)
    rows = np.clip(np.arange(8) + 2, 0, 7)
    np.testing.assert_allclose(out[0].numpy(), x[0][:, :, columns], atol=1e-12)  # 3 px right
    np.testing.assert_allclose(out[1].numpy(), x[1][:, rows, :], atol=1e-12)  # 2 px up


def test_rotation_by_90_degrees_is_rot90_counter_clockwise(rng):
    x = rng.random((2, 3, 10, 10))
    quarter_turn = ops.rotation_inverse(torch.full((2,), 90.0, dtype=torch.float64))
    out = ops.affine(torch.from_numpy(x), quarter_turn)
    # cos(90°) rounds to 6e-17: coordinates off by ~1e-15 pixel
    np.testing.assert_allclose(out.numpy(), np.rot90(x, k=1, axes=(-2, -1)), atol=1e-12)


def _rodrigues(axis_degrees, angle_degrees):
    phi, theta = np.deg2rad(axis_degrees), np.deg2rad(angle_degrees)
    ux, uy = np.cos(phi), np.sin(phi)
    k = np.array([[0, 0, uy], [0, 0, -ux], [-uy, ux, 0]])  # cross-product matrix of (ux, uy, 0)
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def test_axis_angle_rotation_is_rodrigues_formula():
    out = ops.axis_angle_rotation(
        torch.tensor([0.0, 30.0, 200.0], dtype=torch.float64),
        torch.tensor([10.0, 25.0, -40.0], dtype=torch.float64),
    ).numpy()
    for matrix, axis, angle in zip(out, (0.0, 30.0, 200.0), (10.0, 25.0, -40.0), strict=True):
        np.testing.assert_allclose(matrix, _rodrigues(axis, angle), atol=1e-14)


def test_tilt_is_the_perspective_view_of_the_turned_plane():
    # Ramps X and Y are reproduced exactly by bilinear sampling, so the tilted ramps read off
    # the plane point each output pixel sees; projecting that point forward with the pinhole
    # model (written here independently) must land on the pixel again. The rotation is a
    # general one (an in-plane turn after a tilt), so every entry of R matters.
    height = width = 32
    px, py = _pixel_coordinates(height, width)
    ramps = torch.from_numpy(np.stack([px, py])[None])
    turn = np.deg2rad(40.0)
    about_z = np.array(
        [[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]]
    )
    r = about_z @ _rodrigues(30.0, 25.0)
    plane_x, plane_y = ops.tilt(ramps, torch.from_numpy(r)[None])[0].numpy()
    focal = np.hypot(width, height)
    point = np.einsum("ij,jhw->ihw", r, np.stack([plane_x, plane_y, np.zeros_like(plane_x)]))
    point[2] += focal
    inside = (np.abs(plane_x) < width / 2 - 1) & (np.abs(plane_y) < height / 2 - 1)  # not clamped
    assert inside.mean() > 0.5
    # float64 throughout: the round trip is exact to ~1e-12 pixel
    np.testing.assert_allclose((focal * point[0] / point[2])[inside], px[inside], atol=1e-9)
    np.testing.assert_allclose((focal * point[1] / point[2])[inside], py[inside], atol=1e-9)
    assert np.abs(plane_x - px).max() > 1  # and it did move


def test_zoom_blur_is_the_mean_of_zoomed_copies(rng):
    x = rng.random((2, 1, 16, 16))
    factors = [1.0, 1.05, 1.1]
    out = ops.zoom_blur(torch.from_numpy(x), factors).numpy()
    px, py = _pixel_coordinates(16, 16)
    for i in range(2):
        zooms = [_sample_reference(x[i], py / f + 7.5, px / f + 7.5) for f in factors]
        np.testing.assert_allclose(out[i], (x[i] + sum(zooms)) / 4, atol=1e-12)


@pytest.mark.parametrize("sigma", SEVERITY_PARAMETERS["gaussian_blur"]["levels"])
def test_gaussian_blur_matches_scipy(rng, sigma):
    x = rng.random((2, 3, 12, 9))
    expected = ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
    # same kernel (radius round(4σ)) and borders, float64: differences are summation order
    out = ops.gaussian_blur(torch.from_numpy(x), sigma).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("shift", [-0.3, 0.1, 0.3])
def test_brightness_shifts_the_hsv_value(rng, shift):
    x = rng.random((2, 3, 4, 5))
    x[0, :, 0, 0] = 0.0  # black: hue and saturation undefined, becomes grey
    expected = np.empty_like(x)
    for n in range(2):
        for i in range(4):
            for j in range(5):
                h, s, v = colorsys.rgb_to_hsv(*x[n, :, i, j])
                expected[n, :, i, j] = colorsys.hsv_to_rgb(h, s, min(max(v + shift, 0.0), 1.0))
    out = ops.brightness(torch.from_numpy(x), shift).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_brightness_of_one_channel_adds_and_clips(rng):
    x = rng.random((3, 1, 5, 5))
    np.testing.assert_allclose(
        ops.brightness(torch.from_numpy(x), 0.2).numpy(), np.clip(x + 0.2, 0, 1), atol=1e-15
    )


def test_contrast_scales_deviations_from_each_channels_mean(rng):
    x = rng.random((2, 3, 6, 6))
    mean = x.mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(
        ops.contrast(torch.from_numpy(x), 0.3).numpy(), mean + 0.3 * (x - mean), atol=1e-15
    )


def test_pixelate_by_half_makes_two_by_two_blocks_of_their_mean(rng):
    x = rng.random((2, 3, 8, 8))
    blocks = x.reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5))
    expected = np.repeat(np.repeat(blocks, 2, axis=2), 2, axis=3)
    np.testing.assert_allclose(ops.pixelate(torch.from_numpy(x), 0.5).numpy(), expected, atol=1e-15)


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_quantize_keeps_2_to_the_bits_levels_within_half_a_step(rng, bits):
    x = rng.random((2, 3, 8, 8))
    out = ops.quantize(torch.from_numpy(x), bits).numpy()
    step = 1 / (2**bits - 1)
    assert len(np.unique(out)) <= 2**bits
    np.testing.assert_allclose(out / step, np.round(out / step), atol=1e-9)  # on the levels
    assert np.abs(out - x).max() <= step / 2 + 1e-12


def test_gaussian_noise_has_the_stated_standard_deviation():
    x = np.full((8, 3, 32, 32), 0.5, dtype=np.float64)  # far from the clipping bounds
    out = corrupt(x, "gaussian_noise", 5, random_state=0)
    # 24,576 samples: the standard deviation estimate is within 3% at ~7 sigma
    assert abs((out - x).std() / 0.10 - 1) < 0.03 and abs((out - x).mean()) < 0.003


def test_shot_noise_is_unbiased_with_poisson_variance():
    x = np.full((8, 3, 32, 32), 0.4, dtype=np.float64)
    out = corrupt(x, "shot_noise", 5, random_state=0)  # Poisson(50 x) / 50
    # mean 0.4 and variance 0.4/50 = 0.008 over 24,576 samples (relative errors ~1%)
    assert abs(out.mean() - 0.4) < 0.005 and abs(out.var() / 0.008 - 1) < 0.05


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"corruption": "fog"}, ValueError, "Unknown corruption"),
        ({"corruption": ["rotate"]}, ValueError, "Unknown corruption"),
        ({"severity": 6}, ValueError, "severity"),
        ({"severity": -1}, ValueError, "severity"),
        ({"severity": 2.0}, TypeError, "severity"),
        ({"severity": True}, TypeError, "severity"),
        ({"value_range": (1, 0)}, ValueError, "value_range"),
        ({"value_range": "01"}, TypeError, "value_range"),
        ({"value_range": (0, 1, 2)}, TypeError, "value_range"),
        ({"random_state": "a"}, TypeError, "random_state"),
        ({"random_state": -3}, ValueError, "random_state"),
    ],
)
def test_bad_arguments_are_refused_by_name(images, kwargs, error, match):
    arguments = {"corruption": "rotate", "severity": 2, **kwargs}
    with pytest.raises(error, match=match):
        corrupt(images, arguments.pop("corruption"), arguments.pop("severity"), **arguments)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.zeros((4, 32, 32)), ValueError, r"\(n, C, H, W\)"),
        (np.zeros((0, 1, 32, 32)), ValueError, "empty"),
        (np.zeros((2, 1, 8, 8), dtype=np.uint8), TypeError, "floating"),
        (torch.zeros((2, 1, 8, 8), dtype=torch.int64), TypeError, "floating"),
        (np.full((2, 1, 8, 8), np.nan), ValueError, "NaN"),
        (np.full((2, 1, 8, 8), 255.0), ValueError, "value_range"),
    ],
)
def test_bad_images_are_refused_with_a_clear_message(bad, error, match):
    with pytest.raises(error, match=match):
        corrupt(bad, "gaussian_blur", 1)
