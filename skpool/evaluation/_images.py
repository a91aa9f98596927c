"""Batched image operations in torch for the corruptions and perturbation sequences.

Every function takes images ``x`` of shape (n, C, H, W) with values in [0, 1] (the public
functions map ``value_range`` onto [0, 1] first) and returns a new tensor of the same shape,
dtype and device. Geometric maps are written in pixel units about the image centre and
sampled bilinearly with ``grid_sample`` (``align_corners=False``: pixel centres at
(j + 0.5) − W/2); content that moves in from outside repeats the border pixels.
"""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F

from .._parameters import MAX_SEED

# ---------------------------------------------------------------------------- input and output


def check_images(images, value_range) -> tuple[torch.Tensor, callable]:
    """Validate (n, C, H, W) floating images within ``value_range``; map them to [0, 1].

    Returns the unit-range tensor (float32 for half precision, else the input's dtype, on
    the input's device) and a function that maps a unit-range result back to the input's
    kind: numpy in → numpy out, tensor in → tensor out, same dtype and device.
    """
    low, high = _check_value_range(value_range)
    if isinstance(images, torch.Tensor):
        tensor, dtype, as_numpy = images.detach(), images.dtype, False
    else:
        array = np.asarray(images)
        if array.dtype.kind != "f":
            raise TypeError(
                f"Images must be floating point (float16, float32 or float64), got dtype "
                f"{array.dtype}; convert them, e.g. X.astype(np.float32) / 255."
            )
        tensor, dtype, as_numpy = torch.from_numpy(np.ascontiguousarray(array)), array.dtype, True
    if not tensor.is_floating_point():
        raise TypeError(f"Images must be floating point, got dtype {tensor.dtype}.")
    if tensor.ndim != 4:
        raise ValueError(
            "Images must have shape (n, C, H, W) (channels first); got "
            f"{tensor.ndim}-D input of shape {tuple(tensor.shape)}."
        )
    if min(tensor.shape) == 0:
        raise ValueError(f"Images must not be empty; got shape {tuple(tensor.shape)}.")
    smallest, largest = (float(v) for v in torch.aminmax(tensor))  # NaN and ±inf show here
    if not (math.isfinite(smallest) and math.isfinite(largest)):
        raise ValueError("Images contain NaN or infinity.")
    if smallest < low or largest > high:
        raise ValueError(
            f"Images hold values in [{smallest:.4g}, {largest:.4g}], outside value_range="
            f"({low:g}, {high:g}); pass the range your images are scaled to."
        )
    work = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype
    # the range must be representable where it is used: the span in the working dtype, the
    # bounds in the images' own (a float32 image in value_range (0, 1e308) came back inf)
    if high - low > torch.finfo(work).max or max(-low, high) > torch.finfo(tensor.dtype).max:
        raise ValueError(
            f"value_range=({low:g}, {high:g}) is beyond what {tensor.dtype} images hold "
            f"(largest {torch.finfo(tensor.dtype).max:.4g}); pass the range the images are "
            "scaled to."
        )
    unit_range = (low, high) == (0.0, 1.0)  # the usual case: no copy, no rescaling
    unit = tensor.to(work) if unit_range else (tensor.to(work) - low) / (high - low)

    def restore(result: torch.Tensor):
        out = result.clamp(0.0, 1.0)
        if not unit_range:
            out = out * (high - low) + low
        if as_numpy:
            return out.cpu().numpy().astype(dtype, copy=False)
        return out.to(dtype)

    return unit, restore


def _check_value_range(value_range) -> tuple[float, float]:
    try:
        if isinstance(value_range, str):
            raise TypeError
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise TypeError(
            f"value_range must be a pair of numbers (low, high), got {value_range!r}."
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"value_range must be finite with low < high, got {value_range!r}.")
    return low, high


def seed_from(random_state) -> int:
    """An integer seed from an int, a RandomState/Generator, or None (fresh entropy)."""
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)
    if isinstance(random_state, bool) or not isinstance(
        random_state, Integral | np.random.RandomState | np.random.Generator
    ):
        raise TypeError(
            f"random_state must be an int, a numpy RandomState/Generator or None, got "
            f"{type(random_state).__name__}."
        )
    if isinstance(random_state, Integral):
        if not 0 <= random_state <= MAX_SEED:  # torch's generators take 64-bit seeds
            raise ValueError(
                f"random_state must be an integer in [0, 2**64 - 1], got {random_state}."
            )
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    return int(random_state.integers(0, 2**63 - 1))


def cpu_generator(seed: int) -> torch.Generator:
    """Draws are made on the CPU and moved: the same seed gives the same draws on any device."""
    return torch.Generator(device="cpu").manual_seed(seed)


def uniform(generator, n, like) -> torch.Tensor:
    """``n`` uniform draws in [0, 1) as a tensor of ``like``'s dtype and device."""
    return torch.rand(n, generator=generator, dtype=torch.float64).to(like.device, like.dtype)


# ---------------------------------------------------------------------------- geometry


def _pixel_grid(x) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Output pixel centres in pixels about the centre: px (1, 1, W), py (1, H, 1)."""
    height, width = x.shape[-2:]
    px = torch.arange(width, dtype=x.dtype, device=x.device) + 0.5 - width / 2
    py = torch.arange(height, dtype=x.dtype, device=x.device) + 0.5 - height / 2
    return px.reshape(1, 1, -1), py.reshape(1, -1, 1), width / 2, height / 2


def sample(x, source_x, source_y) -> torch.Tensor:
    """Output pixel (i, j) takes the input at pixel coordinates (source_x, source_y) (n, H, W)."""
    _, _, half_w, half_h = _pixel_grid(x)
    grid = torch.stack([source_x / half_w, source_y / half_h], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def affine(x, inverse, shift=None) -> torch.Tensor:
    """Apply the map q ↦ M q + t about the centre, given M⁻¹ (n, 2, 2) and t (n, 2) in pixels.

    Each output pixel q_out reads the input at M⁻¹ (q_out − t).
    """
    px, py, _, _ = _pixel_grid(x)
    if shift is not None:
        px = px - shift[:, 0].reshape(-1, 1, 1)
        py = py - shift[:, 1].reshape(-1, 1, 1)
    m = inverse.reshape(-1, 4, 1, 1).unbind(1)
    return sample(x, m[0] * px + m[1] * py, m[2] * px + m[3] * py)


def rotation_inverse(degrees) -> torch.Tensor:
    """M⁻¹ (n, 2, 2) of a rotation of the content by ``degrees`` (counter-clockwise on screen)."""
    angle = torch.deg2rad(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # on screen y points down, so a counter-clockwise turn is R(−a) in (x, y); its inverse R(a)
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(-1, 2, 2)


def scale_inverse(factor) -> torch.Tensor:
    """M⁻¹ of a zoom of the content by ``factor`` (> 1 enlarges) about the centre."""
    eye = torch.eye(2, dtype=factor.dtype, device=factor.device)
    return eye / factor.reshape(-1, 1, 1)


def shear_inverse(degrees) -> torch.Tensor:
    """M⁻¹ of a horizontal shear x ↦ x + tan(angle)·y."""
    k = torch.tan(torch.deg2rad(degrees))
    one, zero = torch.ones_like(k), torch.zeros_like(k)
    return torch.stack([one, -k, zero, one], dim=-1).reshape(-1, 2, 2)


def tilt(x, rotation) -> torch.Tensor:
    """View the image plane turned by ``rotation`` (n, 3, 3) through a pinhole camera.

    The image lies in the plane z = f (f = the image diagonal in pixels, as in Hendrycks &
    Dietterich's CIFAR-10-P tilt); the turned plane holds the points R (X, Y, 0) + (0, 0, f).
    Output pixel (x', y') sees along the ray t (x', y', f); it meets the plane where
    n·(t d − f e_z) = 0 with n = R e_z, and reads the input at the first two coordinates of
    Rᵀ (t d − f e_z). A rotation about the optical axis only is an ordinary rotation.
    """
    px, py, half_w, half_h = _pixel_grid(x)
    focal = 2 * math.hypot(half_w, half_h)
    r = rotation.to(x.dtype).reshape(-1, 9, 1, 1).unbind(1)
    normal_dot_ray = r[2] * px + r[5] * py + r[8] * focal  # n = (R02, R12, R22)
    t = focal * r[8] / normal_dot_ray
    qx, qy, qz = t * px, t * py, t * focal - focal
    source_x = r[0] * qx + r[3] * qy + r[6] * qz  # (Rᵀ q)_x
    source_y = r[1] * qx + r[4] * qy + r[7] * qz
    return sample(x, source_x, source_y)


def axis_angle_rotation(axis_degrees, angle_degrees) -> torch.Tensor:
    """Rotations (n, 3, 3) by ``angle`` about the in-plane axis at ``axis_degrees`` (Rodrigues)."""
    phi, theta = torch.deg2rad(axis_degrees), torch.deg2rad(angle_degrees)
    ux, uy = torch.cos(phi), torch.sin(phi)
    cos, sin = torch.cos(theta), torch.sin(theta)
    one_minus = 1 - cos
    zero = torch.zeros_like(cos)
    rows = [
        cos + ux * ux * one_minus, ux * uy * one_minus, uy * sin,
        ux * uy * one_minus, cos + uy * uy * one_minus, -ux * sin,
        -uy * sin, ux * sin, cos + zero,
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(-1, 3, 3)


def zoom_blur(x, factors) -> torch.Tensor:
    """Mean of the image and its zooms by each factor about the centre (Hendrycks & Dietterich)."""
    total = x.clone()
    for factor in factors:  # a few dozen zooms at most; each is one batched warp
        scale = torch.full((len(x),), float(factor), dtype=x.dtype, device=x.device)
        total += affine(x, scale_inverse(scale))
    return total / (len(factors) + 1)


# ---------------------------------------------------------------------------- photometric


def gaussian_blur(x, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation ``sigma`` pixels, truncated at 4σ.

    Borders repeat the edge pixels; the kernel radius is round(4σ), as in
    ``scipy.ndimage.gaussian_filter(mode="nearest")`` and skimage's ``gaussian``. Each pass is
    one product with a banded (size × size) matrix that holds the kernel and the borders,
    faster than a convolution for images this small.
    """
    height, width = x.shape[-2:]
    return _blur_matrix(height, sigma, x).T @ x @ _blur_matrix(width, sigma, x)


def _blur_matrix(size: int, sigma: float, like) -> torch.Tensor:
    """M (size × size) with (v M)[j] = Σ_t k[t] v[clip(j + t, 0, size − 1)]."""
    radius = max(1, int(4 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    outputs = torch.arange(size).unsqueeze(1).expand(size, len(taps))
    inputs = (outputs + torch.arange(-radius, radius + 1)).clamp(0, size - 1)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    weights = kernel.repeat(size)
    matrix.index_put_((inputs.reshape(-1), outputs.reshape(-1)), weights, accumulate=True)
    return matrix.to(like.device, like.dtype)


def brightness(x, shift: float) -> torch.Tensor:
    """Add ``shift`` to the HSV value V = max over channels, keeping hue and saturation.

    With H and S fixed every channel is proportional to V, so the result is x·V'/V with
    V' = clip(V + shift, 0, 1); black pixels (V = 0, S = 0 by convention) become grey V'.
    One channel: clip(x + shift, 0, 1).
    """
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + shift).clamp(0.0, 1.0)
    ratio = torch.where(value > 0, new_value / value.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    return torch.where(value > 0, x * ratio, new_value.expand_as(x))


def contrast(x, factor: float) -> torch.Tensor:
    """Scale each channel's deviation from its spatial mean by ``factor``."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * factor + mean


def pixelate(x, fraction: float) -> torch.Tensor:
    """Box-downsample to ``fraction`` of the size, then box-upsample back (blocky pixels)."""
    height, width = x.shape[-2:]
    small = (max(1, int(height * fraction)), max(1, int(width * fraction)))
    blocks = F.interpolate(x, size=small, mode="area")
    return F.interpolate(blocks, size=(height, width), mode="area")


def quantize(x, bits: int) -> torch.Tensor:
    """Round to 2**bits evenly spaced levels over [0, 1]."""
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def gaussian_noise(x, std: float, generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x + std * noise.to(x.device, x.dtype)


def shot_noise(x, rate: float, generator) -> torch.Tensor:
    """Poisson photon noise: Poisson(rate·x) / rate (fewer photons, noisier)."""
    counts = torch.poisson(x.detach().to("cpu", torch.float64) * rate, generator=generator)
    return (counts / rate).to(x.device, x.dtype)
