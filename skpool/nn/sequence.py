r"""Generalized max pooling over token sequences ``(B, N, D)`` with a padding mask.

A drop-in replacement for mean pooling or a [CLS] token at the end of a transformer encoder
or a set network: the N tokens of a sample are its local descriptors, and the pooled vector is
the generalized max pooling of them (Murray & Perronnin 2014) with a learnable λ (Christlein
et al. 2019). The math is the numerical core's
(:func:`skpool._core.gmp.generalized_max_pool`); this module adds the sequence layout, the
checks, and the learnable parametrisation λ = exp(θ) shared with
:class:`~skpool.nn.GeneralizedMaxPool2d`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._core.gmp import _generalized_max_pool, generalized_max_pool
from .._device import CheckedMoves
from .modules import LOG_LAM_RANGE, _at_least_float32, _setup_learnable_lam, _step_refinement

__all__ = ["generalized_max_pool_sequence", "SequenceGeneralizedMaxPool"]


def generalized_max_pool_sequence(
    x: torch.Tensor,
    lam: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    normalize: bool = True,
    *,
    lam_scale: str = "absolute",
    refine_steps: int | str = 0,
) -> torch.Tensor:
    r"""Generalized max pooling of a batch of token sequences.

    For sample b with valid tokens :math:`\phi_1, \dots, \phi_{N_b} \in \mathbb{R}^D` (the rows
    of :math:`\Phi`),

    .. math::

        \xi = \Phi^\top (\Phi\Phi^\top + \lambda I_{N_b})^{-1} 1_{N_b}
            = (\Phi^\top\Phi + \lambda I_D)^{-1} \Phi^\top 1_{N_b},

    divided by :math:`\|\xi\|_2` when ``normalize``. Padded tokens (``mask`` False) are ignored
    exactly: the result equals pooling the unpadded sequence alone, whatever the padding holds
    (NaN and inf included). A row whose mask is all False has no tokens to pool and gives a
    zero vector (with a finite, zero gradient), as masked mean pooling conventionally does;
    a sequence axis of length 0 is an error.

    Args:
        x: tokens of shape :math:`(B, N, D)`, floating point. The solve runs in float32 at
            least (float64 for float64 input); the result has the dtype of ``x``.
        lam: the ridge :math:`\lambda > 0`, a float or a tensor of shape ``()`` or ``(B,)``
            (which may require grad): absolute, or with ``lam_scale="relative"`` in units of
            each sequence's mean squared valid-token norm (scale-free).
        mask: optional bool tensor of shape :math:`(B, N)`, True at valid tokens.
        normalize: l2-normalise each pooled vector (a zero vector stays zero).
        lam_scale: ``"absolute"`` or ``"relative"``, as for
            :func:`skpool.nn.functional.generalized_max_pool2d`. Default: "absolute".
        refine_steps: float64 refinement steps for float32 solves (0, an int, or ``"auto"``;
            see :func:`skpool._core.gmp.generalized_max_pool`).

    Returns:
        Tensor of shape :math:`(B, D)`.

    Examples::

        >>> import torch
        >>> from skpool.nn.sequence import generalized_max_pool_sequence
        >>> tokens = torch.randn(2, 5, 16)
        >>> mask = torch.tensor([[True, True, True, False, False], [True] * 5])
        >>> generalized_max_pool_sequence(tokens, 1.0, mask).shape
        torch.Size([2, 16])
    """
    _check_sequences(x, mask)
    if isinstance(lam, torch.Tensor):
        if lam.ndim > 1 or (lam.ndim == 1 and lam.shape[0] not in (1, x.shape[0])):
            raise ValueError(
                f"lam must be a float or a tensor of shape () or ({x.shape[0]},), "
                f"got shape {tuple(lam.shape)}."
            )
    elif not (math.isfinite(float(lam)) and float(lam) > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}.")
    return generalized_max_pool(  # checks a tensor lam's values (a synchronisation)
        x, lam, normalize=normalize, mask=mask, lam_scale=lam_scale, refine_steps=refine_steps
    )


class SequenceGeneralizedMaxPool(CheckedMoves, nn.Module):
    r"""Generalized max pooling of token sequences with a learnable λ (Deep GMP for tokens).

    Pools the valid tokens of each sequence to the vector that has the same similarity to every
    one of them (Murray & Perronnin 2014; the deep, learnable-λ form of Christlein et al.
    2019), in place of mean pooling or a [CLS] token:

    .. math::

        \xi = \arg\min_\xi \|\Phi\xi - 1_{N_b}\|^2 + \lambda \|\xi\|^2
            = (\Phi^\top\Phi + \lambda I_D)^{-1} \Phi^\top 1_{N_b},
        \qquad \text{out} = \xi / \|\xi\|_2 \ \text{(with normalize)},

    where :math:`\Phi` (:math:`N_b \times D`) holds sample b's valid tokens. Large λ (relative
    to the mean squared token norm) points like sum/mean pooling; small λ stops frequent,
    similar tokens from dominating. λ is learned as :math:`\lambda = \exp(\theta)` (θ clamped
    to :data:`skpool.nn.modules.LOG_LAM_RANGE`), exactly as in
    :class:`~skpool.nn.GeneralizedMaxPool2d`; both call the same core solve.

    Args:
        lam: initial λ > 0 (a factor of the mean squared token norm with
            ``lam_scale="relative"``). Default: 1.0.
        lam_scale: ``"relative"`` (scale-free) or ``"absolute"``, as for
            :class:`~skpool.nn.GeneralizedMaxPool2d`. Default: "relative".
        learnable: learn λ (θ is an ``nn.Parameter``); otherwise θ is a buffer. Default: True.
        normalize: l2-normalise the pooled vectors (zero stays zero). Default: True.
        refine_steps: float64 refinement of float32 solves (0, an int, or ``"auto"``; see
            :func:`skpool._core.gmp.generalized_max_pool`). Default: "auto", as the 2-D layer:
            in a training step (training mode, autograd recording) a plain float32 solve, so
            that the training step makes no host-device synchronisation (see
            :class:`~skpool.nn.GeneralizedMaxPool2d`).

    Shape:
        - Input: :math:`(B, N, D)` tokens; optional ``mask`` :math:`(B, N)` bool, True at valid
          tokens (the PyTorch transformer's ``src_key_padding_mask`` is the opposite: pass
          ``~src_key_padding_mask``). Rows without a valid token pool to zeros.
        - Output: :math:`(B, D)`, in the input's dtype.

    Attributes:
        log_lam: θ = log λ, a scalar.
        lam: the current λ (a tensor, differentiable in θ).

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from skpool.nn import SequenceGeneralizedMaxPool
        >>> encoder = nn.TransformerEncoder(
        ...     nn.TransformerEncoderLayer(d_model=32, nhead=4, batch_first=True), num_layers=1
        ... )
        >>> pool = SequenceGeneralizedMaxPool(lam=10.0)
        >>> tokens = torch.randn(3, 7, 32)
        >>> valid = torch.arange(7) < torch.tensor([[7], [4], [2]])  # lengths 7, 4, 2
        >>> pooled = pool(encoder(tokens, src_key_padding_mask=~valid), valid)
        >>> pooled.shape
        torch.Size([3, 32])
    """

    def __init__(
        self,
        lam: float = 1.0,
        learnable: bool = True,
        normalize: bool = True,
        *,
        lam_scale: str = "relative",
        refine_steps: int | str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _setup_learnable_lam(
            self, lam, learnable, normalize, lam_scale, refine_steps, device, dtype
        )

    @property
    def lam(self) -> torch.Tensor:
        """The current λ = exp(clamp(θ)), in float32 at least."""
        return _at_least_float32(self.log_lam).clamp(*LOG_LAM_RANGE).exp()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_sequences(x, mask)  # lam and the options are valid by construction
        return _generalized_max_pool(
            x, self.lam, normalize=self.normalize, mask=mask, lam_scale=self.lam_scale,
            refine_steps=_step_refinement(self),
        )

    def extra_repr(self) -> str:
        return (
            f"lam={float(self.lam.detach()):.4g}, learnable={self.learnable}, "
            f"normalize={self.normalize}, lam_scale={self.lam_scale!r}"
        )


def _check_sequences(x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Shape, dtype and device checks (no device synchronisation)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, N, D) (tokens), got a {x.ndim}-D tensor.")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}.")
    if x.shape[1] == 0:
        raise ValueError("x has no tokens to pool: its sequence axis (dim 1) has length 0.")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}.")
        if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
            raise ValueError(
                f"mask must be a bool tensor of shape ({x.shape[0]}, {x.shape[1]}) (True at "
                f"valid tokens), got {mask.dtype} of shape {tuple(mask.shape)}."
            )
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}.")
