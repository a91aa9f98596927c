"""Image corruptions at five severities, after Hendrycks & Dietterich (2019), CIFAR-10-C.

D. Hendrycks and T. Dietterich, *Benchmarking Neural Network Robustness to Common Corruptions
and Perturbations*, ICLR 2019. Their CIFAR-10-C corrupts each test image at severities 1–5;
the photometric ones here take their CIFAR-10 parameters (Gaussian and shot noise, Gaussian
blur, brightness, contrast, pixelate, zoom blur); quantisation (bit depth) and the affine and
perspective maps (translate, rotate, scale, shear, tilt), which Birodkar et al. (2019, Table 2)
group as the geometric corruptions, have severities chosen here on the same 1–5 scale and
listed in :data:`SEVERITY_PARAMETERS`.

Images are (n, C, H, W) floating arrays or tensors with values in ``value_range``
(default [0, 1]); numpy in → numpy out, tensor in → tensor out (same dtype and device). All
images are processed in one batch (torch ``grid_sample`` for the maps, convolutions for the
blur), in the input's precision (float32 for half precision). Random draws (directions,
noise) come from a CPU generator seeded by ``random_state``: the same seed gives the same
corruption on any device, and the same per-image direction at every severity, so a higher
severity moves each image further the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from types import MappingProxyType

import numpy as np
import torch

from . import _images as ops

__all__ = [
    "CORRUPTIONS",
    "GEOMETRIC_CORRUPTIONS",
    "NON_GEOMETRIC_CORRUPTIONS",
    "SEVERITY_PARAMETERS",
    "corrupt",
]


@dataclass(frozen=True)
class _Corruption:
    levels: tuple  # the parameter at severities 1..5
    apply: Callable  # (unit images, parameter, per-image uniforms, generator) -> unit images
    geometric: bool
    meaning: str


def _sign(u):
    return torch.where(u < 0.5, -1.0, 1.0).to(u.dtype)


def _translate(x, fraction, u, generator):
    angle = 2 * torch.pi * u
    height, width = x.shape[-2:]
    shift = fraction * torch.stack([width * torch.cos(angle), height * torch.sin(angle)], dim=1)
    eye = torch.eye(2, dtype=x.dtype, device=x.device).expand(len(x), 2, 2)
    return ops.affine(x, eye, shift)


def _rotate(x, degrees, u, generator):
    return ops.affine(x, ops.rotation_inverse(degrees * _sign(u)))


def _scale(x, step, u, generator):
    return ops.affine(x, ops.scale_inverse((1 + step) ** _sign(u)))


def _shear(x, degrees, u, generator):
    return ops.affine(x, ops.shear_inverse(degrees * _sign(u)))


def _tilt(x, degrees, u, generator):
    return ops.tilt(x, ops.axis_angle_rotation(360 * u, torch.full_like(u, degrees)))


def _zoom_blur(x, n_zooms, u, generator):
    return ops.zoom_blur(x, [1 + 0.01 * k for k in range(n_zooms)])


_TABLE = {
    "translate": _Corruption(
        (0.03, 0.06, 0.09, 0.12, 0.15), _translate, True,
        "shift by this fraction of the image side, in a random direction per image",
    ),
    "rotate": _Corruption(
        (6.0, 12.0, 18.0, 24.0, 30.0), _rotate, True,
        "rotate by this many degrees, random sense per image",
    ),
    "scale": _Corruption(
        (0.06, 0.12, 0.18, 0.24, 0.30), _scale, True,
        "zoom by (1 + s) or 1 / (1 + s), in or out at random per image",
    ),
    "shear": _Corruption(
        (6.0, 12.0, 18.0, 24.0, 30.0), _shear, True,
        "horizontal shear by this angle in degrees, random sense per image",
    ),
    "tilt": _Corruption(
        (6.0, 12.0, 18.0, 24.0, 30.0), _tilt, True,
        "perspective: the image plane turned by this many degrees about a random in-plane axis",
    ),
    "zoom_blur": _Corruption(
        (6, 11, 16, 21, 26), _zoom_blur, True,
        "mean of the image and its zooms by 1, 1.01, ... (this many zooms; Hendrycks' CIFAR)",
    ),
    "gaussian_noise": _Corruption(
        (0.04, 0.06, 0.08, 0.09, 0.10), lambda x, c, u, g: ops.gaussian_noise(x, c, g), False,
        "additive Gaussian noise of this standard deviation (fraction of value_range)",
    ),
    "shot_noise": _Corruption(
        (500.0, 250.0, 100.0, 75.0, 50.0), lambda x, c, u, g: ops.shot_noise(x, c, g), False,
        "Poisson(c x) / c: fewer photons c, more noise",
    ),
    "gaussian_blur": _Corruption(
        (0.4, 0.6, 0.7, 0.8, 1.0), lambda x, c, u, g: ops.gaussian_blur(x, c), False,
        "Gaussian blur of this standard deviation in pixels",
    ),
    "brightness": _Corruption(
        (0.05, 0.1, 0.15, 0.2, 0.3), lambda x, c, u, g: ops.brightness(x, c), False,
        "add this to the HSV value (max over channels), hue and saturation kept",
    ),
    "contrast": _Corruption(
        (0.75, 0.5, 0.4, 0.3, 0.15), lambda x, c, u, g: ops.contrast(x, c), False,
        "scale each channel's deviation from its spatial mean by this factor",
    ),
    "pixelate": _Corruption(
        (0.95, 0.9, 0.85, 0.75, 0.65), lambda x, c, u, g: ops.pixelate(x, c), False,
        "box-downsample to this fraction of the size and back",
    ),
    "quantize": _Corruption(
        (5, 4, 3, 2, 1), lambda x, c, u, g: ops.quantize(x, c), False,
        "round to 2**bits levels over value_range (this many bits)",
    ),
}  # fmt: skip

CORRUPTIONS = tuple(_TABLE)
GEOMETRIC_CORRUPTIONS = tuple(name for name, c in _TABLE.items() if c.geometric)
NON_GEOMETRIC_CORRUPTIONS = tuple(name for name, c in _TABLE.items() if not c.geometric)
SEVERITY_PARAMETERS = MappingProxyType(
    {name: {"levels": c.levels, "meaning": c.meaning} for name, c in _TABLE.items()}
)
"""Each corruption's parameter at severities 1..5 and what it means (read-only)."""


def corrupt(images, corruption, severity, *, random_state=None, value_range=(0.0, 1.0)):
    """Corrupt a batch of images at one severity (Hendrycks & Dietterich 2019).

    Parameters
    ----------
    images : array or tensor of shape (n, C, H, W)
        Floating images, channels first, with values in ``value_range``.
    corruption : str
        One of :data:`CORRUPTIONS`: geometric ``"translate"``, ``"rotate"``, ``"scale"``,
        ``"shear"``, ``"tilt"`` (perspective), ``"zoom_blur"``; non-geometric
        ``"gaussian_noise"``, ``"shot_noise"``, ``"gaussian_blur"``, ``"brightness"``,
        ``"contrast"``, ``"pixelate"``, ``"quantize"``. :data:`SEVERITY_PARAMETERS` lists
        each one's parameter per severity.
    severity : int in 0..5
        0 returns an unchanged copy; 1..5 as in CIFAR-10-C, 5 the strongest.
    random_state : int, numpy RandomState/Generator or None, default=None
        Seeds the per-image directions and the noise. Pass an int to corrupt the same way
        again (e.g. for a model and its baseline).
    value_range : (float, float), default=(0.0, 1.0)
        The range the images are scaled to: noise levels are fractions of it and results
        are clipped to it. Images outside it are refused.

    Returns
    -------
    corrupted : array or tensor of shape (n, C, H, W)
        The same kind, dtype (and device) as ``images``.
    """
    spec = _lookup(corruption)
    if isinstance(severity, bool) or not isinstance(severity, Integral):
        raise TypeError(f"severity must be an int in 0..5, got {severity!r}.")
    if not 0 <= severity <= 5:
        raise ValueError(f"severity must be in 0..5, got {severity}.")
    unit, restore = ops.check_images(images, value_range)
    generator = ops.cpu_generator(ops.seed_from(random_state))
    if severity == 0:
        return images.detach().clone() if isinstance(images, torch.Tensor) else np.array(images)
    directions = ops.uniform(generator, len(unit), unit)  # drawn first: same at every severity
    return restore(spec.apply(unit, spec.levels[severity - 1], directions, generator))


def _lookup(corruption) -> _Corruption:
    if not isinstance(corruption, str) or corruption not in _TABLE:
        raise ValueError(f"Unknown corruption {corruption!r}; choose one of {', '.join(_TABLE)}.")
    return _TABLE[corruption]
