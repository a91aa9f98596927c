r"""Functional forms of skpool's pooling layers, on channels-first ``(B, C, H, W)`` tensors.

Every function here is differentiable in all its tensor arguments and works on any device and
floating dtype. The two learned operators call the numerical core
(:func:`skpool._core.gmp.generalized_max_pool`,
:func:`skpool._core.operator.apply_pooling_operator`) after a layout change; the core holds
their math. The two baselines of the Deep GMP paper (mixed max/average and log-sum-exp pooling)
have no core counterpart and are written here.

A ``mask`` of shape ``(B, H, W)`` (True at real locations) lets a zero-padded batch of images of
different sizes pool only each image's own locations: the result for a sample equals pooling its
unpadded image alone. A sample whose mask is all False pools to zeros.
"""

from __future__ import annotations

import math

import torch

from .._core.gmp import _generalized_max_pool, check_lam_values, check_options
from .._core.operator import apply_pooling_operator
from .._parameters import check_bool

__all__ = [
    "generalized_max_pool2d",
    "separability_pool2d",
    "mixed_max_avg_pool2d",
    "log_sum_exp_pool2d",
]


def generalized_max_pool2d(
    x: torch.Tensor,
    lam: float | torch.Tensor,
    normalize: bool = True,
    mask: torch.Tensor | None = None,
    *,
    keepdim: bool = False,
    lam_scale: str = "absolute",
    refine_steps: int | str = "auto",
) -> torch.Tensor:
    r"""Global generalized max pooling (Murray & Perronnin 2014) of a batch of feature maps.

    Each sample's H·W descriptors :math:`\phi_i \in \mathbb{R}^C` pool to
    :math:`\xi = (\Phi^\top\Phi + \lambda I)^{-1}\Phi^\top 1`, divided by its l2 norm when
    ``normalize``. See :class:`~skpool.nn.GeneralizedMaxPool2d`.

    Args:
        x: feature maps of shape :math:`(B, C, H, W)`.
        lam: the ridge :math:`\lambda > 0`, a float or a tensor of shape ``()`` or ``(B,)``
            (which may require grad).
        normalize: l2-normalise each pooled vector (a zero vector stays zero).
        mask: optional bool tensor of shape :math:`(B, H, W)`, True at real locations.
        keepdim: return :math:`(B, C, 1, 1)` instead of :math:`(B, C)`.
        lam_scale: ``"absolute"`` (λ = ``lam``, the papers' convention) or ``"relative"``
            (λ = ``lam`` times each sample's mean squared descriptor norm over its real
            locations, differentiable; the pooled direction is then invariant to
            :math:`x \to s x`).
        refine_steps: float64 iterative refinement of float32 solves (see the core):
            ``"auto"`` (the default) makes float32 agree with the float64 solution, refining
            or solving in float64 only the samples whose error bound asks for it (device
            synchronisations; 0 steps while :mod:`torch.compile` traces); an int runs that
            many steps (without device synchronisation, also in the backward, whose solves
            are refined by as many steps); 0 is a plain float32 solve.

    Returns:
        Tensor of shape :math:`(B, C)` (or :math:`(B, C, 1, 1)`), in the dtype of ``x``; the
        solve runs in float32 at least, also under autocast.
    """
    _check_maps(x, mask)
    if not isinstance(lam, torch.Tensor):
        if not (math.isfinite(float(lam)) and float(lam) > 0):
            raise ValueError(f"lam must be a finite number > 0, got {lam!r}.")
    elif lam.ndim > 1 or (lam.ndim == 1 and lam.shape[0] not in (1, x.shape[0])):
        raise ValueError(
            f"lam must be a float or a tensor of shape () or ({x.shape[0]},), "
            f"got shape {tuple(lam.shape)}."
        )
    check_options(lam_scale, refine_steps)
    check_bool("normalize", normalize)
    check_bool("keepdim", keepdim)
    check_lam_values(lam)  # a tensor's values: a device synchronisation
    return _generalized_max_pool2d(x, lam, normalize, mask, keepdim, lam_scale, refine_steps)


def _generalized_max_pool2d(x, lam, normalize, mask, keepdim, lam_scale, refine_steps):
    """:func:`generalized_max_pool2d` without the checks of ``lam`` and the options (the
    layer's are valid by construction; checking a tensor lam costs a device synchronisation
    per call)."""
    _check_maps(x, mask)
    pooled = _generalized_max_pool(
        _to_stacks(x),
        lam,
        lam_scale=lam_scale,
        normalize=normalize,
        mask=None if mask is None else mask.flatten(1),
        refine_steps=refine_steps,
    )
    return pooled[:, :, None, None] if keepdim else pooled


#: Shape errors of the separability layer say which layout it takes (the estimators' maps are
#: channels last, so an array passed from one to the other has the wrong layout).
_CHANNELS_FIRST_HINT = (
    " The layers take channels-first maps (B, C, H, W); channels-last maps (B, H, W, C), as "
    "the estimators take, need x.permute(0, 3, 1, 2)."
)


def separability_pool2d(
    x: torch.Tensor,
    operator: torch.Tensor,
    output_shape: tuple[int, int],
    channel_mean: torch.Tensor | None = None,
    channel_scale: torch.Tensor | None = None,
    *,
    grid_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    r"""Apply a fitted separability pooling operator (Birodkar et al. 2019) to feature maps.

    With :math:`G = (F - \mu)/\sigma` (channel normalisation of the fit, when given), component
    j of output cell m is :math:`\sum_n P_{j,m,n} G_n \sigma + \mu`. See
    :class:`~skpool.nn.SeparabilityPool2d`.

    Args:
        x: feature maps of shape :math:`(B, C, H, W)` with :math:`H W = N`.
        operator: tensor of shape :math:`(k, M, N)`.
        output_shape: the output grid :math:`(H', W')` with :math:`H' W' = M`.
        channel_mean, channel_scale: optional tensors of shape :math:`(C,)`, both or neither.
        grid_shape: the input grid :math:`(H, W)` the operator was fitted on, if known: another
            grid raises ValueError even when it has N locations too.

    Returns:
        Tensor of shape :math:`(B, k C, H', W')`, channel ``j * C + c`` holding component j of
        input channel c, in the dtype of ``x`` (the operator and statistics are cast to it).
    """
    _check_maps(x, None)
    batch, n_channels, height, width = x.shape
    if operator.ndim != 3:
        raise ValueError(f"operator must have shape (k, M, N), got {tuple(operator.shape)}.")
    n_components, n_out, n_in = operator.shape
    if grid_shape is not None and (height, width) != tuple(grid_shape):
        raise ValueError(
            f"The operator was fitted on a {grid_shape[0]}x{grid_shape[1]} grid; got input of "
            f"spatial size {height}x{width}." + _CHANNELS_FIRST_HINT
        )
    if height * width != n_in:
        raise ValueError(
            f"The operator pools a grid of {n_in} locations but the input is {height}x{width} "
            f"= {height * width} locations." + _CHANNELS_FIRST_HINT
        )
    out_height, out_width = output_shape
    if out_height * out_width != n_out:
        raise ValueError(
            f"output_shape {tuple(output_shape)} does not have the operator's {n_out} output "
            "locations."
        )
    stats = []
    for name, stat in (("channel_mean", channel_mean), ("channel_scale", channel_scale)):
        if stat is not None:
            if stat.shape != (n_channels,):
                raise ValueError(
                    f"{name} has shape {tuple(stat.shape)}: the operator was fitted on "
                    f"{stat.numel()} channels, but the input has {n_channels} channels."
                    + _CHANNELS_FIRST_HINT
                )
            stat = stat.to(x.dtype)
        stats.append(stat)
    pooled = apply_pooling_operator(_to_stacks(x), operator.to(x.dtype), *stats)  # (B, M, kC)
    return pooled.transpose(1, 2).reshape(
        batch, n_components * n_channels, out_height, out_width
    )


def mixed_max_avg_pool2d(
    x: torch.Tensor,
    mix: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    keepdim: bool = False,
) -> torch.Tensor:
    r"""Global mixed max/average pooling: :math:`a \max_i x_i + (1 - a)\,\mathrm{mean}_i x_i`.

    Args:
        x: feature maps of shape :math:`(B, C, H, W)`.
        mix: the weight :math:`a \in [0, 1]` of max pooling, a float or a tensor broadcastable
            to :math:`(B, C)` (a tensor is checked too, at the cost of a device
            synchronisation; the layer's mix is in range by construction and is not).
        mask: optional bool tensor of shape :math:`(B, H, W)`, True at real locations.
        keepdim: return :math:`(B, C, 1, 1)` instead of :math:`(B, C)`.

    Returns:
        Tensor of shape :math:`(B, C)` (or :math:`(B, C, 1, 1)`).
    """
    if isinstance(mix, torch.Tensor):
        if not bool(((mix >= 0) & (mix <= 1)).all()):  # NaN fails both comparisons
            raise ValueError(
                f"mix must lie in [0, 1]; got a tensor mix with values "
                f"{mix.detach().flatten()[:5].cpu().tolist()}."
            )
    elif not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], got {mix!r}.")
    check_bool("keepdim", keepdim)
    return _mixed_max_avg_pool2d(x, mix, mask, keepdim)


def _mixed_max_avg_pool2d(x, mix, mask, keepdim):
    """:func:`mixed_max_avg_pool2d` without the check of ``mix`` (the layer's is in range by
    construction; checking a tensor costs a device synchronisation per call)."""
    _check_maps(x, mask)
    flat, valid, count = _masked_flat(x, mask)
    largest = _masked_max(flat, valid)
    # Each term divided before the sum: a sum of finite values near the dtype's maximum
    # would overflow, their mean does not.
    scale = count if isinstance(count, int) else count[..., None]
    mean = (_fill_padding(flat, valid) / scale).sum(dim=-1)
    pooled = mix * largest + (1 - mix) * mean
    return pooled[:, :, None, None] if keepdim else pooled


def log_sum_exp_pool2d(
    x: torch.Tensor,
    r: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    keepdim: bool = False,
) -> torch.Tensor:
    r"""Global log-sum-exp pooling: :math:`\frac1r \log \frac1N \sum_i e^{r x_i}`.

    Average pooling as :math:`r \to 0`, max pooling as :math:`r \to \infty`. With
    :math:`m = \max_i x_i`, :math:`d_i = x_i - m \le 0` and :math:`z_i = r d_i`, it is
    computed as

    .. math::

        m + T\,\psi(S), \qquad T = \frac1N \sum_i d_i\,\varphi(z_i), \quad
        S = \frac1N \sum_i \operatorname{expm1}(z_i) = r T,

    with :math:`\varphi(z) = \operatorname{expm1}(z)/z` and
    :math:`\psi(S) = \operatorname{log1p}(S)/S` (both 1 at 0, evaluated by their Taylor
    polynomials near 0 and :math:`\psi(S) = \log(\frac1N\sum_i e^{z_i})/S` away from it). r
    never divides anything: no overflow at large r, no cancellation at small r (the textbook
    ``(logsumexp(r x) - log N) / r`` loses all digits as :math:`r \to 0`), and an r so small
    that :math:`r d_i` underflows (e.g. 1e-300 in float32) gives the average exactly, its
    limit to working precision. Computed in float32 at least; the result has the dtype of
    ``x``.

    Args:
        x: feature maps of shape :math:`(B, C, H, W)`.
        r: the sharpness :math:`r > 0`, a float or a tensor broadcastable to :math:`(B, C)`
            (a tensor is checked too, at the cost of a device synchronisation; the layer's r
            is positive by construction and is not).
        mask: optional bool tensor of shape :math:`(B, H, W)`, True at real locations.
        keepdim: return :math:`(B, C, 1, 1)` instead of :math:`(B, C)`.

    Returns:
        Tensor of shape :math:`(B, C)` (or :math:`(B, C, 1, 1)`).
    """
    if isinstance(r, torch.Tensor):
        if not bool((torch.isfinite(r) & (r > 0)).all()):
            raise ValueError(
                f"r must be finite and > 0; got a tensor r with values "
                f"{r.detach().flatten()[:5].cpu().tolist()}."
            )
    elif not (math.isfinite(float(r)) and float(r) > 0):
        raise ValueError(f"r must be a finite number > 0, got {r!r}.")
    check_bool("keepdim", keepdim)
    return _log_sum_exp_pool2d(x, r, mask, keepdim)


def _log_sum_exp_pool2d(x, r, mask, keepdim):
    """:func:`log_sum_exp_pool2d` without the check of ``r`` (the layer's is positive by
    construction; checking a tensor costs a device synchronisation per call)."""
    _check_maps(x, mask)
    out_dtype = x.dtype
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    flat, valid, count = _masked_flat(x, mask)
    # The result does not depend on the shift m (its derivative in m is exactly 0): detach it.
    shift = _masked_max(flat, valid).detach()
    largest = torch.finfo(x.dtype).max  # an r beyond it would round to inf: inf * 0 = NaN
    # Maps spanning the range (float32 +-2e38): x - m, and the sum of N gaps, would overflow.
    # The gaps are divided by a power of two s per (B, C) with N * 2 max|x| / s <= largest;
    # s is exactly 1 (the same arithmetic as unscaled) unless the range needs it, and a
    # power of two scales exactly (no sync: an elementwise choice).
    reach = _masked_max(flat.abs(), valid).detach() / largest * (2 * count)
    scale = torch.exp2(torch.ceil(torch.log2(reach.clamp_min(1.0))))
    gaps = _fill_padding(flat / scale[..., None] - (shift / scale)[..., None], valid)  # d / s
    if isinstance(r, torch.Tensor):  # within r's dtype too (a float32 r with float64 maps)
        if r.is_floating_point():
            largest = min(largest, torch.finfo(r.dtype).max)
        r = r.clamp(max=largest)
    else:
        r = min(float(r), largest)
    # z = r d <= 0; an overflowing product is held at the dtype's lowest finite value, where
    # every term has its limit already and no gradient meets 0 * inf.
    scaled = (_per_location(r) * gaps * scale[..., None]).clamp_min(torch.finfo(gaps.dtype).min)
    excess = torch.expm1(scaled)  # 0 at padding
    weighted = (gaps * _expm1_ratio(scaled)).sum(dim=-1) / count  # T / s
    mean_excess = excess.sum(dim=-1) / count  # S = r T, in (-1, 0]
    mean_exp = _fill_padding(torch.exp(scaled), valid).sum(dim=-1) / count  # 1 + S, >= 1/N
    # m + T psi(S) = s (m / s + (T / s) psi(S)): finite wherever the result is
    pooled = scale * (shift / scale + weighted * _log1p_ratio(mean_excess, mean_exp))
    pooled = pooled.to(out_dtype)
    return pooled[:, :, None, None] if keepdim else pooled


# Below these |arguments| the Taylor polynomials of expm1(z)/z (to z^3) and log1p(S)/S (to
# S^3) are exact to the dtype's rounding: truncation z^4/120 and S^4/5 below eps/2.
_EXPM1_RATIO_TAYLOR = {torch.float32: 0.05, torch.float64: 3e-4}
_LOG1P_RATIO_TAYLOR = {torch.float32: 0.02, torch.float64: 1.5e-4}


def _expm1_ratio(z: torch.Tensor) -> torch.Tensor:
    """expm1(z)/z, 1 at 0, smooth and finite (with its gradient) everywhere, also at z = 0."""
    small = z.abs() < _EXPM1_RATIO_TAYLOR[z.dtype]
    # Each branch sees only arguments it handles: no 0/0 and no overflowing z^3, whose
    # gradients would be NaN even where torch.where discards them.
    safe = torch.where(small, torch.ones_like(z), z)
    tiny = torch.where(small, z, torch.zeros_like(z))
    taylor = 1 + tiny * (1 / 2 + tiny * (1 / 6 + tiny / 24))
    return torch.where(small, taylor, torch.expm1(safe) / safe)


def _log1p_ratio(excess: torch.Tensor, mean_exp: torch.Tensor) -> torch.Tensor:
    """log1p(S)/S, 1 at 0: its Taylor polynomial near 0, log1p(S)/S for S > -1/2, and below
    that log(1 + S)/S with 1 + S given as ``mean_exp`` (a mean of exponentials, >= 1/N, so its
    log stays finite where S rounds to -1; no cancellation there since 1 + S <= 1/2)."""
    small = excess.abs() < _LOG1P_RATIO_TAYLOR[excess.dtype]
    near_minus_one = excess <= -0.5
    safe = torch.where(small, -torch.ones_like(excess), excess)  # no 0/0 in unused branches
    safe_log1p = torch.where(near_minus_one, -torch.full_like(excess, 0.5), safe)
    safe_exp = torch.where(near_minus_one, mean_exp, torch.full_like(mean_exp, 0.5))
    tiny = torch.where(small, excess, torch.zeros_like(excess))
    taylor = 1 - tiny * (1 / 2 - tiny * (1 / 3 - tiny / 4))
    moderate = torch.log1p(safe_log1p) / safe
    return torch.where(small, taylor, torch.where(near_minus_one, torch.log(safe_exp) / safe,
                                                  moderate))


def _per_location(value):
    """A per-(B, C) coefficient, shaped to broadcast against (B, C, N)."""
    return value[..., None] if isinstance(value, torch.Tensor) and value.ndim > 0 else value


def _fill_padding(flat, valid):
    """Zero the padded locations of (B, C, N) (a fill, not a product: padding may be inf)."""
    return flat if valid is None else flat.masked_fill(~valid, 0)


def _check_maps(x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Shape and dtype checks shared by all the functions (no device synchronisation)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got a {x.ndim}-D tensor.")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}.")
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(
            f"x has no locations to pool: its spatial size is {x.shape[2]}x{x.shape[3]}."
        )
    if mask is not None:
        batch, _, height, width = x.shape
        if mask.dtype != torch.bool or mask.shape != (batch, height, width):
            raise ValueError(
                f"mask must be a bool tensor of shape ({batch}, {height}, {width}), "
                f"got {mask.dtype} of shape {tuple(mask.shape)}."
            )


def _to_stacks(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): location n = h*W + w, as the estimators' channels-last data."""
    return x.flatten(2).transpose(1, 2)


def _masked_flat(x, mask):
    """Flatten to (B, C, N) with the mask as (B, 1, N) (or None) and the real counts (B, 1)."""
    flat = x.flatten(2)
    if mask is None:
        return flat, None, flat.shape[-1]
    valid = mask.flatten(1)[:, None, :]
    count = valid.sum(dim=-1).clamp_min(1).to(x.dtype)
    return flat, valid, count


def _masked_max(flat, valid):
    """Max over real locations (B, C); 0 for a sample without any."""
    if valid is None:
        return flat.amax(dim=-1)
    largest = flat.masked_fill(~valid, -torch.inf).amax(dim=-1)
    return torch.where(valid.any(dim=-1), largest, torch.zeros_like(largest))
