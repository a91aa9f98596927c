"""Perturbation sequences: shapes, the sweep through the clean image, gradual change, the noise
sequences' clean first frame, seeds, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skpool.datasets import make_svhn_like
from skpool.evaluation import (
    GEOMETRIC_PERTURBATIONS,
    NOISE_PERTURBATIONS,
    NON_GEOMETRIC_PERTURBATIONS,
    PERTURBATIONS,
    SWEEP_RANGES,
    perturbation_sequence,
)

SWEEPS = [p for p in PERTURBATIONS if p not in NOISE_PERTURBATIONS]
# sweeps through the clean image at frame 15 of 31 (translate: frame 7 of 16)
CENTRED = {"translate": 7, "rotate": 15, "scale": 15, "shear": 15, "tilt": 15, "brightness": 15}


@pytest.fixture(scope="module")
def images():
    return make_svhn_like(8, 0, color=True, random_state=1).X_train


def test_the_lists():
    assert set(NOISE_PERTURBATIONS) == {"gaussian_noise", "shot_noise"}
    geometric = {"translate", "rotate", "scale", "shear", "tilt", "zoom_blur"}
    assert set(GEOMETRIC_PERTURBATIONS) == geometric
    assert set(NON_GEOMETRIC_PERTURBATIONS) == set(PERTURBATIONS) - geometric
    assert set(NOISE_PERTURBATIONS) <= set(NON_GEOMETRIC_PERTURBATIONS)
    assert {"translate", "rotate", "scale", "brightness", "gaussian_noise"} <= set(PERTURBATIONS)


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_shape_dtype_and_default_length(images, perturbation):
    frames = perturbation_sequence(images, perturbation, random_state=0)
    n_frames = 16 if perturbation == "translate" else 31
    assert frames.shape == (8, n_frames, 3, 32, 32) and frames.dtype == np.float32
    assert np.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    tensor = perturbation_sequence(torch.from_numpy(images).double(), perturbation, n_frames=3)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (8, 3, 3, 32, 32)
    assert tensor.dtype == torch.float64


def test_sweep_ranges_describe_the_sequences():
    """SWEEP_RANGES (what plots of a metric against the strength read) has every perturbation,
    its default number of frames, and a sweep centred on zero where the frames pass through
    the clean image at the middle (CENTRED; scale is centred on 1)."""
    assert set(SWEEP_RANGES) == set(PERTURBATIONS)
    for name, (start, stop, n_frames) in SWEEP_RANGES.items():
        assert n_frames == (16 if name == "translate" else 31)
        assert start <= stop
        if name in CENTRED:
            middle = 1.0 if name == "scale" else 0.0
            assert start + (stop - start) * CENTRED[name] / (n_frames - 1) == pytest.approx(
                middle, abs=1e-12  # the sweep is a linspace: exact up to its own rounding
            )


@pytest.mark.parametrize("perturbation", list(CENTRED))
def test_sweeps_pass_through_the_clean_image(images, perturbation):
    frames = perturbation_sequence(images, perturbation)
    # the identity map (or a zero shift) resamples every pixel at its own centre: float32
    # coordinate roundoff (~16 px * 6e-8) on values <= 1
    np.testing.assert_allclose(frames[:, CENTRED[perturbation]], images, rtol=0, atol=1e-5)


@pytest.mark.parametrize("perturbation", list(CENTRED))
def test_sweeps_move_further_from_the_clean_image_on_both_sides(images, perturbation):
    frames = perturbation_sequence(images.astype(np.float64), perturbation)
    distance = np.mean((frames - images[:, None]) ** 2, axis=(0, 2, 3, 4))
    centre = CENTRED[perturbation]
    assert np.all(np.diff(distance[centre:]) > 0), distance
    assert np.all(np.diff(distance[: centre + 1]) < 0), distance


@pytest.mark.parametrize("perturbation", ["zoom_blur", "gaussian_blur"])
def test_growing_blurs_move_away_from_the_clean_image(images, perturbation):
    frames = perturbation_sequence(images.astype(np.float64), perturbation)
    distance = np.mean((frames - images[:, None]) ** 2, axis=(0, 2, 3, 4))
    assert np.all(np.diff(distance) > 0), distance
    if perturbation == "zoom_blur":
        np.testing.assert_array_equal(frames[:, 0], images)  # the running mean starts clean


@pytest.mark.parametrize("perturbation", SWEEPS)
def test_consecutive_frames_change_gradually(images, perturbation):
    frames = perturbation_sequence(images.astype(np.float64), perturbation)
    steps = np.sqrt(np.mean(np.diff(frames, axis=1) ** 2, axis=(0, 2, 3, 4)))
    span = np.sqrt(np.mean((frames[:, -1] - frames[:, 0]) ** 2))
    # no jump: each step is a small part of the way from the first frame to the last
    assert steps.max() < 0.35 * span, (steps.max(), span)


def test_translation_frames_are_whole_pixel_shifts(images):
    frames = perturbation_sequence(images.astype(np.float64), "translate")
    for j in (0, 15):  # shifts of -7 and +8 pixels
        shift = j - 7
        columns = np.clip(np.arange(32) - shift, 0, 31)
        # float64 coordinates: exact to ~1e-15 pixel
        np.testing.assert_allclose(frames[:, j], images[..., columns], atol=1e-12)


def test_fewer_frames_cover_the_same_range(images):
    full = perturbation_sequence(images, "rotate")
    short = perturbation_sequence(images, "rotate", n_frames=5)
    assert short.shape[1] == 5
    np.testing.assert_allclose(short[:, [0, 2, 4]], full[:, [0, 15, 30]], atol=1e-6)


@pytest.mark.parametrize("perturbation", NOISE_PERTURBATIONS)
def test_noise_sequences_are_independent_copies_after_the_clean_frame(images, perturbation):
    frames = perturbation_sequence(images, perturbation, n_frames=6, random_state=3)
    np.testing.assert_array_equal(frames[:, 0], images)
    differences = frames[:, 1:] - images[:, None]
    for j in range(1, 5):  # independent draws: the noise of one frame does not predict the next
        a, b = differences[:, j - 1].ravel(), differences[:, j].ravel()
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
    again = perturbation_sequence(images, perturbation, n_frames=6, random_state=3)
    np.testing.assert_array_equal(again, frames)
    other = perturbation_sequence(images, perturbation, n_frames=6, random_state=4)
    assert np.abs(other[:, 1:] - frames[:, 1:]).mean() > 1e-3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"perturbation": "snow"}, ValueError, "Unknown perturbation"),
        ({"n_frames": 1}, ValueError, "n_frames"),
        ({"n_frames": 4.0}, TypeError, "n_frames"),
        ({"value_range": (0, 0.5)}, ValueError, "value_range"),
    ],
)
def test_bad_arguments_are_refused_by_name(images, kwargs, error, match):
    arguments = {"perturbation": "rotate", **kwargs}
    with pytest.raises(error, match=match):
        perturbation_sequence(images, arguments.pop("perturbation"), **arguments)
