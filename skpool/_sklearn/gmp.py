"""GeneralizedMaxPooling: scikit-learn transformer over feature stacks."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils._param_validation import Interval, StrOptions

from .._core.gmp import generalized_max_pool
from .._device import resolve_device
from .._parameters import GENERALIZED_MAX_POOLING as _DEFAULTS
from .._parameters import GENERALIZED_MAX_POOLING_CHOICES as _CHOICES
from .._parameters import MAX_COUNT as _MAX_COUNT
from ._validation import atomic_fit, check_stacks

__all__ = ["GeneralizedMaxPooling"]


class GeneralizedMaxPooling(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    r"""Generalized max pooling of local descriptors (Murray & Perronnin, CVPR 2014).

    Each sample is a stack :math:`\Phi` of N local descriptors with C channels (a feature
    map's locations). Its pooled vector is the ridge-regression solution

    .. math::

        \xi = \arg\min_\xi \|\Phi\xi - 1_N\|^2 + \lambda\|\xi\|^2
            = (\Phi^\top\Phi + \lambda I_C)^{-1}\Phi^\top 1_N ,

    which gives every descriptor the same similarity to :math:`\xi`: frequent ("bursty")
    descriptors do not dominate the result as they do with sum or average pooling, and rare
    but distinctive ones count as much as any other. The smaller of the C×C (primal) and N×N
    (dual) systems is solved by batched Cholesky in torch, on CPU or GPU.

    Nothing is learned: ``fit`` only validates its input and records its shape (the tag
    ``requires_fit`` is False, so ``transform`` works on an unfitted instance, and a fitted
    one checks that the channel count has not changed).

    Parameters
    ----------
    lam : float, default=1.0
        The ridge :math:`\lambda > 0`, as a multiple of each sample's mean squared descriptor
        norm :math:`\overline{\|\phi\|^2} = \mathrm{trace}(\Phi^\top\Phi)/N` (with the
        default ``lam_scale="relative"``) or in units of a squared descriptor norm
        (``"absolute"``). ``lam`` well below the mean squared norm (1e-3 to 1e-1 of it)
        equalises the similarities closely (the "max-pooling-like" regime of the paper),
        well above it (1e2 and beyond) makes the result point like sum pooling. Murray &
        Perronnin tune it by cross-validation over powers of ten; do the same (an example on
        digits is measured in ``benchmarks/README.md``).
    lam_scale : {"relative", "absolute"}, default="relative"
        ``"relative"``: the ridge of each sample is ``lam`` times its mean squared descriptor
        norm, so the pooled direction does not change when the descriptors are scaled
        (:math:`\Phi \to s\Phi`), and one ``lam`` suits samples of any magnitude.
        ``"absolute"``: the ridge is ``lam`` itself, the papers' convention (their tables).
        The two agree for l2-normalised descriptors.
    normalize : bool, default=True
        l2-normalise each pooled vector (a zero vector, e.g. from all-zero ReLU maps, stays
        zero).
    device : str or torch.device, default="auto"
        Where to compute: "auto" (CUDA when available), "cpu", "cuda" or "cuda:<index>".
        Requesting CUDA where there is none raises ValueError.
    batch_size : int, default=256
        Samples per batch on the device: bounds memory to about ``batch_size * N * C`` values
        plus ``batch_size * min(N, C)**2`` for the Gram matrices.
    grid_shape : tuple of (int, int), default=None
        The (H, W) grid of 3-D ``(n, N, C)`` input, or, for 2-D ``(n, F)`` input, the grid of
        flattened ``(H, W, C)`` stacks (then ``C = F / (H*W)``). Without it a 2-D input is F
        locations with one channel.

    Attributes
    ----------
    n_features_in_ : int
        Features per sample seen in ``fit``: F for 2-D input, N*C for 3-D/4-D input, C for a
        list of stacks.
    n_channels_in_ : int
        Channels C per location seen in ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of the columns of a 2-D DataFrame seen in ``fit``.

    Notes
    -----
    Float32 input is solved in float32 and agrees with the float64 solution of the same
    values: where the error bound ``eps32 * (lambda_max(G) + lam) / lam`` of a plain float32
    Cholesky solve, times the cancellation ``1 + rho`` of the float32 sum (``rho =
    || |Phi|^T 1 || / || Phi^T 1 ||``, large for channels centred over the data) and
    ``max(1, N / 1024)``, exceeds 1e-4 (small ``lam``, many locations, cancelling sums, or
    channels or locations of very different magnitudes), samples are refined with float64 residuals until their
    estimated error is below 1e-6, and those whose refinement cannot get there (a nearly
    rank-deficient Gram matrix at small ``lam``, or one location or channel far above the
    others, so that one direction dominates G) are solved in float64. Output dtype follows the
    input: float32 for floating input of at most 32 bits (numpy float16/float32, torch
    float16/bfloat16/float32, a list of float32 rows), float64 otherwise (float64, integers,
    booleans, Python numbers).

    4-D maps are channels last, ``(n, H, W, C)``; the torch layers take channels first. A
    fitted instance refuses channels-first maps ``(n, C, H, W)`` with a hint when W differs
    from the fitted C; where W = C they have the fitted shape and no check can see the mistake
    (any grid is accepted).

    References
    ----------
    N. Murray and F. Perronnin, "Generalized Max Pooling", CVPR 2014.

    Examples
    --------
    >>> import numpy as np
    >>> from skpool import GeneralizedMaxPooling
    >>> maps = np.random.default_rng(0).random((5, 7, 7, 16))  # (n, H, W, C)
    >>> GeneralizedMaxPooling(lam=0.1, device="cpu").fit_transform(maps).shape
    (5, 16)
    """

    _parameter_constraints: dict = {
        "lam": [Interval(Real, 0, np.inf, closed="neither")],
        "lam_scale": [StrOptions(set(_CHOICES["lam_scale"]))],
        "normalize": ["boolean"],
        "device": [str, torch.device],
        "batch_size": [Interval(Integral, 1, _MAX_COUNT, closed="both")],
        "grid_shape": [tuple, list, None],
    }

    def __init__(
        self,
        lam=_DEFAULTS.lam,
        *,
        lam_scale=_DEFAULTS.lam_scale,
        normalize=_DEFAULTS.normalize,
        device=_DEFAULTS.device,
        batch_size=_DEFAULTS.batch_size,
        grid_shape=_DEFAULTS.grid_shape,
    ):
        self.lam = lam
        self.lam_scale = lam_scale
        self.normalize = normalize
        self.device = device
        self.batch_size = batch_size
        self.grid_shape = grid_shape

    @atomic_fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Validate ``X`` and record its shape; GMP itself learns nothing.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, H, W, C), (n, N, C) or (n, F), or a list of
            (N_i, C) arrays
        y : ignored

        Returns
        -------
        self
        """
        resolve_device(self.device)
        stacks = check_stacks(self, X, reset=True, grid_shape=self.grid_shape, allow_ragged=True)
        for _ in stacks.iter_batches(self.batch_size, torch.device("cpu")):
            pass  # NaN/inf check, batch by batch (memmaps are not loaded whole)
        self._n_features_out = stacks.n_channels
        return self

    def transform(self, X):
        """Pool each sample's descriptors into one vector.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, H, W, C), (n, N, C) or (n, F), or a list of
            (N_i, C) arrays
            Samples may have another number of locations than in ``fit`` (3-D, 4-D and list
            input), but not another number of channels.

        Returns
        -------
        ndarray of shape (n, C)
            float32 for floating input of at most 32 bits (float16, bfloat16, float32; a list
            of float32 rows), float64 otherwise.
        """
        self._validate_params()
        device = resolve_device(self.device)
        stacks = check_stacks(self, X, reset=False, grid_shape=self.grid_shape, allow_ragged=True)
        out = np.empty((stacks.n_samples, stacks.n_channels), dtype=stacks.numpy_dtype)
        with torch.no_grad():  # a transformer differentiates nothing (tensors may require grad)
            for index, batch, mask in stacks.iter_batches(self.batch_size, device):
                pooled = generalized_max_pool(
                    batch,
                    float(self.lam),
                    lam_scale=self.lam_scale,
                    normalize=self.normalize,
                    mask=mask,
                    refine_steps="auto",
                )
                out[index] = pooled.cpu().numpy()
        return out

    def __setstate__(self, state):
        # Estimators pickled before ``lam_scale`` existed meant an absolute lam.
        state.setdefault("lam_scale", "absolute")
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
