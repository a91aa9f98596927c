"""Perturbation sequences, after Hendrycks & Dietterich (2019), CIFAR-10-P.

D. Hendrycks and T. Dietterich, *Benchmarking Neural Network Robustness to Common Corruptions
and Perturbations*, ICLR 2019. CIFAR-10-P turns each test image into a short video whose
frames change it gradually — a translation, rotation, scale, shear or tilt sweeping through
the clean image, brightness going up, blur growing — or, for noise, independent noisy copies
of it (frame 1 is the clean image). A robust classifier's prediction should not flip from
frame to frame (see :func:`skpool.evaluation.flip_probability`).

The sweeps follow CIFAR-10-P's code (for 32×32 images): translate −7..+8 pixels horizontally
in 16 frames; rotate and shear −15°..+15°, scale 0.7..1.3, tilt −11.25°..+11.25° about both
in-plane axes, brightness −0.225..+0.225 on the HSV value, Gaussian blur σ = 0.3..0.75, all
in 31 frames; zoom blur the running mean of zooms 1, 1.004, 1.008, ...; Gaussian noise of
standard deviation 0.02 and shot noise Poisson(700 x)/700 in 30 noisy frames after the clean
one. With another ``n_frames`` the same range is covered in more or fewer steps (translate:
the same fraction of the width, 1/32 per frame by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

from .._parameters import MAX_COUNT
from . import _images as ops

__all__ = [
    "PERTURBATIONS",
    "GEOMETRIC_PERTURBATIONS",
    "NON_GEOMETRIC_PERTURBATIONS",
    "NOISE_PERTURBATIONS",
    "SWEEP_RANGES",
    "perturbation_sequence",
]


@dataclass(frozen=True)
class _Sweep:
    start: float
    stop: float
    n_frames: int  # CIFAR-10-P's
    apply: Callable  # (unit images, magnitude, generator) -> unit images
    geometric: bool = False
    noise: bool = False  # frames are independent noisy copies after a clean first frame


def _translate(x, fraction, generator):
    shift = torch.zeros(len(x), 2, dtype=x.dtype, device=x.device)
    shift[:, 0] = fraction * x.shape[-1]
    return ops.affine(x, torch.eye(2, dtype=x.dtype, device=x.device).expand(len(x), 2, 2), shift)


def _full(x, value):
    return torch.full((len(x),), value, dtype=x.dtype, device=x.device)


def _tilt_both_axes(x, degrees, generator):
    """CIFAR-10-P's tilt: the plane turned by the same angle about the x and then the y axis."""
    angle = torch.deg2rad(torch.tensor(degrees, dtype=torch.float64))
    cos, sin = float(torch.cos(angle)), float(torch.sin(angle))
    about_x = torch.tensor([[1, 0, 0], [0, cos, -sin], [0, sin, cos]], dtype=torch.float64)
    about_y = torch.tensor([[cos, 0, -sin], [0, 1, 0], [sin, 0, cos]], dtype=torch.float64)
    rotation = (about_x @ about_y).to(x.device, x.dtype).expand(len(x), 3, 3)
    return ops.tilt(x, rotation)


_TABLE = {
    "translate": _Sweep(-7 / 32, 8 / 32, 16, _translate, geometric=True),
    "rotate": _Sweep(
        -15.0, 15.0, 31, lambda x, m, g: ops.affine(x, ops.rotation_inverse(_full(x, m))), True
    ),
    "scale": _Sweep(
        0.7, 1.3, 31, lambda x, m, g: ops.affine(x, ops.scale_inverse(_full(x, m))), True
    ),
    "shear": _Sweep(
        -15.0, 15.0, 31, lambda x, m, g: ops.affine(x, ops.shear_inverse(_full(x, m))), True
    ),
    "tilt": _Sweep(-11.25, 11.25, 31, _tilt_both_axes, geometric=True),
    "zoom_blur": _Sweep(1.0, 1.12, 31, None, geometric=True),  # running mean, see _frames
    "brightness": _Sweep(-0.225, 0.225, 31, lambda x, m, g: ops.brightness(x, m)),
    "gaussian_blur": _Sweep(0.3, 0.75, 31, lambda x, m, g: ops.gaussian_blur(x, m)),
    "gaussian_noise": _Sweep(
        0.02, 0.02, 31, lambda x, m, g: ops.gaussian_noise(x, m, g), noise=True
    ),
    "shot_noise": _Sweep(700.0, 700.0, 31, lambda x, m, g: ops.shot_noise(x, m, g), noise=True),
}

PERTURBATIONS = tuple(_TABLE)
GEOMETRIC_PERTURBATIONS = tuple(name for name, s in _TABLE.items() if s.geometric)
NON_GEOMETRIC_PERTURBATIONS = tuple(name for name, s in _TABLE.items() if not s.geometric)
NOISE_PERTURBATIONS = tuple(name for name, s in _TABLE.items() if s.noise)
#: Each perturbation's sweep: (first magnitude, last magnitude, CIFAR-10-P's number of frames);
#: translations in fractions of the image width, angles in degrees (for plots of a metric
#: against the perturbation's strength).
SWEEP_RANGES = {name: (s.start, s.stop, s.n_frames) for name, s in _TABLE.items()}


def perturbation_sequence(
    images, perturbation, *, n_frames=None, random_state=None, value_range=(0.0, 1.0)
):
    """Turn each image into a sequence of gradually perturbed frames (CIFAR-10-P).

    Parameters
    ----------
    images : array or tensor of shape (n, C, H, W)
        Floating images, channels first, with values in ``value_range``.
    perturbation : str
        One of :data:`PERTURBATIONS`: geometric ``"translate"``, ``"rotate"``, ``"scale"``,
        ``"shear"``, ``"tilt"``, ``"zoom_blur"``; ``"brightness"``, ``"gaussian_blur"``; and
        the noise sequences :data:`NOISE_PERTURBATIONS` (``"gaussian_noise"``,
        ``"shot_noise"``), whose first frame is the clean image and whose other frames are
        independent noisy copies (not ordered in time).
    n_frames : int >= 2 or None, default=None
        Frames per sequence; None takes CIFAR-10-P's (16 for translate, 31 otherwise).
    random_state : int, numpy RandomState/Generator or None, default=None
        Seeds the noise (the other sequences are deterministic).
    value_range : (float, float), default=(0.0, 1.0)
        The range the images are scaled to (noise levels are fractions of it; results are
        clipped to it).

    Returns
    -------
    frames : array or tensor of shape (n, n_frames, C, H, W)
        The same kind, dtype (and device) as ``images``; ``frames[:, j]`` is frame j of every
        image's sequence.
    """
    frames = list(iter_frames(images, perturbation, n_frames, random_state, value_range))
    if isinstance(frames[0], torch.Tensor):
        return torch.stack(frames, dim=1)
    return np.stack(frames, axis=1)


def iter_frames(images, perturbation, n_frames=None, random_state=None, value_range=(0.0, 1.0)):
    """An iterator over frame j of every sequence, (n, C, H, W), for j = 0 .. n_frames − 1.

    The arguments are those of :func:`perturbation_sequence` (checked at once); only a few
    copies of the images are held at a time, however many frames there are.
    """
    sweep = _lookup(perturbation)
    n_frames = sweep.n_frames if n_frames is None else n_frames
    if isinstance(n_frames, bool) or not isinstance(n_frames, Integral):
        raise TypeError(f"n_frames must be an int >= 2 or None, got {n_frames!r}.")
    if not 2 <= n_frames <= MAX_COUNT:
        raise ValueError(
            f"n_frames must be in [2, {MAX_COUNT}] (flips need two frames), got {n_frames}."
        )
    unit, restore = ops.check_images(images, value_range)
    generator = ops.cpu_generator(ops.seed_from(random_state))
    return (restore(frame) for frame in _frames(unit, sweep, n_frames, generator))


def _frames(x, sweep: _Sweep, n_frames: int, generator) -> Iterator[torch.Tensor]:
    magnitudes = torch.linspace(sweep.start, sweep.stop, n_frames, dtype=torch.float64).tolist()
    if sweep.noise:
        yield x
        for magnitude in magnitudes[1:]:
            yield sweep.apply(x, magnitude, generator)
    elif sweep.apply is None:  # zoom blur: frame j is the mean of the zooms of frames 0..j
        total = x.clone()
        yield x
        for j, factor in enumerate(magnitudes[1:], start=2):
            total += ops.affine(x, ops.scale_inverse(_full(x, factor)))
            yield total / j
    else:
        for magnitude in magnitudes:
            yield sweep.apply(x, magnitude, generator)


def _lookup(perturbation) -> _Sweep:
    if not isinstance(perturbation, str) or perturbation not in _TABLE:
        raise ValueError(
            f"Unknown perturbation {perturbation!r}; choose one of {', '.join(_TABLE)}."
        )
    return _TABLE[perturbation]
