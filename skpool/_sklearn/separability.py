"""SeparabilityPooling: the closed-form learned spatial pooling of Birodkar et al. (2019)."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import Bunch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils._set_output import _get_output_config
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_feature_names_in, check_is_fitted, column_or_1d

from .._core.geneig import rayleigh_ratios, top_generalized_eigenvectors
from .._core.grid import average_pooling_operator, locality_costs, output_grid_shape
from .._core.operator import apply_pooling_operator
from .._core.scatter import ChannelStatistics, ScatterStatistics, class_weights_from_labels
from .._device import resolve_device
from ._validation import FeatureStacks, atomic_fit, check_stacks

__all__ = ["SeparabilityPooling"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class SeparabilityPooling(TransformerMixin, BaseEstimator):
    r"""Learned spatial pooling that maximises class separability (Birodkar et al. 2019).

    Each sample is a feature map of N = H·W locations × C channels. ``fit`` learns, in closed
    form from labelled maps, a spatially varying linear pooling operator P (M×N, M = H'·W'
    output cells) whose row m pools the input around the centre of cell m so that the pooled
    values separate the classes best. With the channel-normalised stacks
    :math:`G_k = (F_k - \mu)/\sigma`, the between- and within-class scatters of the locations

    .. math::

        A = \sum_q (\bar X_q - \bar X)(\bar X_q - \bar X)^\top, \qquad
        B = \sum_q \frac{1}{K_q}\sum_{k:\,y_k=q} (G_k - \bar X_q)(G_k - \bar X_q)^\top

    (:math:`\bar X_q` the mean of class q, :math:`K_q` its size, :math:`\bar X` the unweighted
    mean of the class means) and the locality cost
    :math:`C_m = \mathrm{diag}(\|(i, j) - c_m\|^2)` around the centre :math:`c_m` of output
    cell m, row m is the top generalised eigenvector

    .. math::

        p_m = \arg\max_p \frac{p^\top A p}{p^\top (B + \alpha C_m) p} ,

    its sign fixed by :math:`\sum_i p_i \ge 0` and divided by its l1 or l2 norm.
    ``n_components = k`` keeps the top k eigenvectors, giving k·C output channels ordered
    component-major (channel ``j*C + c``). ``transform`` computes :math:`Z_j = P_j G` per
    sample and maps it back to the input's scale and centre, :math:`Z_j \sigma + \mu`.

    A is stored through a factor with at most (Q−1)·C columns; when that is below N the
    eigenproblem is solved in that smaller dimension (``solver="auto"``). Everything runs in
    torch, batched over all output cells, on CPU or GPU.

    Parameters
    ----------
    alpha : float, default=1.0
        Locality weight :math:`\alpha \ge 0`. Its scale: :math:`C_m` is in squared input
        pixels, and with normalised channels the diagonal of B is about Q·C times the
        within-class variance of a location (≈ Q·C). ``alpha = 0`` ignores locality (every cell
        gets the same, globally most separable, operator); large ``alpha`` concentrates each row
        on the locations nearest its centre.
    stride : int, default=2
        Output grid :math:`H' = \lceil H/s \rceil`, :math:`W' = \lceil W/s \rceil`.
    output_shape : tuple of (int, int), default=None
        The output grid (H', W') directly (at most the input grid); overrides ``stride``.
    n_components : int, default=1
        Number k of eigenvectors per output cell (``1 <= k <= N``).
    norm : {"l2", "l1"}, default="l2"
        Norm to which every operator row is scaled.
    normalize_channels : bool, default=True
        Standardise each channel (over all samples and locations) before the statistics; a
        constant channel keeps scale 1.
    grid_shape : tuple of (int, int), default=None
        The (H, W) grid of 3-D ``(n, N, C)`` input, or, for 2-D ``(n, F)`` input, the grid of
        flattened ``(H, W, C)`` stacks. Without it, 3-D input is an N×1 grid and 2-D input F
        locations (an F×1 grid) with one channel.
    solver : {"auto", "low_rank", "full"}, default="auto"
        Route of the eigenproblem: ``"low_rank"`` solves an r×r problem with r ≤ (Q−1)·C
        (needs ``n_components <= r``), ``"full"`` an N×N one; ``"auto"`` picks low-rank when
        r < N. Both give the same operator up to rounding.
    device : str or torch.device, default="auto"
        Where to compute: "auto" (CUDA when available), "cpu", "cuda" or "cuda:<index>".
    dtype : {"float64", "float32"}, default="float64"
        Precision of the statistics and of the solve. float32 is faster (about 2× on CPU, much
        more on most GPUs) and agrees with float64 to about 1e-4 on well-conditioned data.
    batch_size : int, default=256
        Samples per batch on the device when accumulating statistics and transforming.
    max_memory_mb : float, default=1024
        Memory budget of one chunk of output cells in the solve (each cell needs a few N×N
        matrices: about 5·N²·8 bytes in float64 for the full route). At least one cell is
        solved at a time.

    Attributes
    ----------
    operator_ : ndarray of shape (n_components, M, N)
        The learned operator, rows normalised (dtype of the solve).
    eigenvalues_ : ndarray of shape (n_components, M)
        The separability ratios :math:`p^\top A p / p^\top (B + \alpha C_m) p` achieved by the
        rows of ``operator_`` on the training data (the generalised eigenvalues).
    channel_mean_ : ndarray of shape (C,)
        :math:`\mu` (zeros when ``normalize_channels=False``).
    channel_scale_ : ndarray of shape (C,)
        :math:`\sigma` (ones when ``normalize_channels=False``).
    classes_ : ndarray of shape (Q,)
        Class labels seen in ``fit``.
    grid_shape_ : tuple of (int, int)
        Input grid (H, W) seen in ``fit``.
    output_shape_ : tuple of (int, int)
        Output grid (H', W'); M = H'·W'.
    n_features_in_ : int
        Features per sample seen in ``fit`` (F for 2-D input, N·C otherwise).
    n_channels_in_ : int
        Channels C per location seen in ``fit``.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of the columns of a 2-D DataFrame seen in ``fit``.

    See Also
    --------
    GeneralizedMaxPooling : Per-sample ridge-weighted global pooling.

    Notes
    -----
    B is singular when there are fewer samples than locations (K·C < N), at constant
    locations, or with ``alpha = 0``; a ridge of N·eps times trace(B + αC_m)/N (grown when a
    factorisation still fails) keeps every system solvable, so the fit never fails or returns
    NaN on such data (see :mod:`skpool._core.geneig`).

    References
    ----------
    V. Birodkar, H. Mobahi, D. Krishnan, S. Bengio, "A Closed-Form Learned Pooling for Deep
    Classification Networks", arXiv:1906.03808, 2019.

    Examples
    --------
    >>> import numpy as np
    >>> from skpool import SeparabilityPooling
    >>> rng = np.random.default_rng(0)
    >>> maps, labels = rng.normal(size=(40, 6, 6, 3)), np.arange(40) % 2
    >>> pool = SeparabilityPooling(alpha=1.0, stride=2, device="cpu").fit(maps, labels)
    >>> pool.operator_.shape, pool.transform(maps).shape
    ((1, 9, 36), (40, 3, 3, 3))
    """

    _parameter_constraints: dict = {
        "alpha": [Interval(Real, 0, None, closed="left")],
        "stride": [Interval(Integral, 1, None, closed="left")],
        "output_shape": [tuple, list, None],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "norm": [StrOptions({"l1", "l2"})],
        "normalize_channels": ["boolean"],
        "grid_shape": [tuple, list, None],
        "solver": [StrOptions({"auto", "low_rank", "full"})],
        "device": [str, torch.device],
        "dtype": [StrOptions(set(_DTYPES))],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_memory_mb": [Interval(Real, 0, None, closed="neither")],
    }

    def __init__(
        self,
        alpha=1.0,
        *,
        stride=2,
        output_shape=None,
        n_components=1,
        norm="l2",
        normalize_channels=True,
        grid_shape=None,
        solver="auto",
        device="auto",
        dtype="float64",
        batch_size=256,
        max_memory_mb=1024,
    ):
        self.alpha = alpha
        self.stride = stride
        self.output_shape = output_shape
        self.n_components = n_components
        self.norm = norm
        self.normalize_channels = normalize_channels
        self.grid_shape = grid_shape
        self.solver = solver
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_memory_mb = max_memory_mb

    @atomic_fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Learn the pooling operator from labelled feature maps.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, H, W, C), (n, N, C) or (n, F)
        y : array-like of shape (n,)
            Class labels; at least two classes.

        Returns
        -------
        self
        """
        device = resolve_device(self.device)
        dtype = _DTYPES[self.dtype]
        stacks = check_stacks(self, X, reset=True, grid_shape=self.grid_shape)
        codes, classes = _encode_labels(self, y, stacks.n_samples)
        grid = stacks.grid_shape
        out_shape = output_grid_shape(grid, self.stride, _check_pair(self.output_shape))
        if self.n_components > stacks.n_locations:
            raise ValueError(
                f"n_components={self.n_components} exceeds the {stacks.n_locations} input "
                "locations per sample."
            )
        if self.normalize_channels:
            mean, scale = _channel_statistics(stacks, self.batch_size, device, dtype)
        else:
            mean = torch.zeros(stacks.n_channels, dtype=dtype, device=device)
            scale = torch.ones_like(mean)
        codes_t = torch.as_tensor(codes, device=device)
        stats = _scatter_statistics(
            stacks, codes_t, len(classes), mean, scale, self.batch_size, device, dtype
        )
        operator, eigenvalues = top_generalized_eigenvectors(
            stats.between_factor(),
            stats.within,
            locality_costs(grid, out_shape, dtype=dtype, device=device),
            float(self.alpha),
            int(self.n_components),
            norm=self.norm,
            method=self.solver,
            max_memory_bytes=int(self.max_memory_mb * 2**20),
        )
        self.operator_ = operator.cpu().numpy()
        self.eigenvalues_ = eigenvalues.cpu().numpy()
        self.channel_mean_ = mean.cpu().double().numpy()
        self.channel_scale_ = scale.cpu().double().numpy()
        self.classes_ = classes
        self.grid_shape_ = grid
        self.output_shape_ = out_shape
        return self

    def transform(self, X):
        """Pool each feature map with the learned operator.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, H, W, C), (n, N, C) or (n, F)
            The grid and channel count of ``fit``.

        Returns
        -------
        ndarray of shape (n, H', W', k*C) for 4-D input, (n, M, k*C) for 3-D input and
        (n, M*k*C) for 2-D input
            Channels component-major (``j*C + c``); float32 for float32 input, float64
            otherwise.
        """
        check_is_fitted(self)
        device = resolve_device(self.device)
        stacks = self._check_transform_input(X)
        n_out = self.operator_.shape[1]
        width = self.operator_.shape[0] * stacks.n_channels
        if stacks.layout != "2d" and _get_output_config("transform", self)["dense"] != "default":
            raise ValueError(
                "set_output(transform='pandas'/'polars') needs 2-D output: pass 2-D input "
                f"(n, F) (with grid_shape for several channels), not {stacks.layout} input."
            )
        operator = torch.as_tensor(self.operator_, device=device, dtype=stacks.dtype)
        mean = torch.as_tensor(self.channel_mean_, device=device, dtype=stacks.dtype)
        scale = torch.as_tensor(self.channel_scale_, device=device, dtype=stacks.dtype)
        out = np.empty((stacks.n_samples, n_out, width), dtype=stacks.numpy_dtype)
        for index, batch, _ in stacks.iter_batches(self.batch_size, device):
            pooled = apply_pooling_operator(batch, operator, mean, scale)
            out[index] = pooled.cpu().numpy()
        if stacks.layout == "4d":
            return out.reshape(stacks.n_samples, *self.output_shape_, width)
        if stacks.layout == "2d":
            return out.reshape(stacks.n_samples, n_out * width)
        return out

    def separability_ratios(self, X, y):
        r"""Per output cell, the separability ratio of the learned rows vs. average pooling.

        The scatters A and B of ``(X, y)`` are computed with the fitted channel
        normalisation; for every row p the ratio :math:`p^\top A p / p^\top B p` (no locality
        term) says how well the pooled value separates the classes, relative to its
        within-class spread. Average pooling's row of cell m is uniform over the cell's
        stride×stride block (with ``output_shape``, adaptive average pooling's block).

        Parameters
        ----------
        X : array-like or Tensor of shape (n, H, W, C), (n, N, C) or (n, F)
        y : array-like of shape (n,)

        Returns
        -------
        Bunch with
            learned : ndarray of shape (n_components, M)
                Ratio of every row of ``operator_``.
            average : ndarray of shape (M,)
                Ratio of average pooling.
            output_shape : tuple (H', W')
                Reshape either to (…, H', W') for a map.
        """
        check_is_fitted(self)
        device = resolve_device(self.device)
        stacks = self._check_transform_input(X)
        codes, classes = _encode_labels(self, y, stacks.n_samples)
        dtype = torch.float64
        mean = torch.as_tensor(self.channel_mean_, device=device, dtype=dtype)
        scale = torch.as_tensor(self.channel_scale_, device=device, dtype=dtype)
        stats = _scatter_statistics(
            stacks,
            torch.as_tensor(codes, device=device),
            len(classes),
            mean,
            scale,
            self.batch_size,
            device,
            dtype,
        )
        factor = stats.between_factor()
        operator = torch.as_tensor(self.operator_, device=device, dtype=dtype)
        average = average_pooling_operator(
            self.grid_shape_,
            self.output_shape_,
            stride=self.stride if self.output_shape is None else None,
            dtype=dtype,
            device=device,
        )
        return Bunch(
            learned=rayleigh_ratios(operator, factor, stats.within).cpu().numpy(),
            average=rayleigh_ratios(average, factor, stats.within).cpu().numpy(),
            output_shape=self.output_shape_,
        )

    def get_feature_names_out(self, input_features=None):
        """Names of the 2-D output columns: ``separabilitypooling_m{m}_j{j}_c{c}``.

        m is the output cell (row-major over H'×W'), j the component and c the input channel,
        in the order of the columns of ``transform`` on 2-D input.

        Parameters
        ----------
        input_features : array-like of str, optional
            Only checked against ``feature_names_in_``.

        Returns
        -------
        ndarray of str objects of shape (M * n_components * C,)
        """
        check_is_fitted(self)
        _check_feature_names_in(self, input_features, generate_names=False)
        prefix = type(self).__name__.lower()
        n_components, n_out, _ = self.operator_.shape
        names = [
            f"{prefix}_m{m}_j{j}_c{c}"
            for m in range(n_out)
            for j in range(n_components)
            for c in range(self.n_channels_in_)
        ]
        return np.asarray(names, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _check_transform_input(self, X) -> FeatureStacks:
        """Validate X for a fitted estimator: same channels and the same grid as ``fit``."""
        stacks = check_stacks(self, X, reset=False, grid_shape=self.grid_shape)
        explicit = stacks.layout == "4d" or self.grid_shape is not None
        fitted_locations = self.grid_shape_[0] * self.grid_shape_[1]
        if stacks.n_locations != fitted_locations or (
            explicit and tuple(stacks.grid_shape) != tuple(self.grid_shape_)
        ):
            raise ValueError(
                f"X has a {stacks.grid_shape[0]}x{stacks.grid_shape[1]} grid "
                f"({stacks.n_locations} locations), but {type(self).__name__} was fitted on "
                f"a {self.grid_shape_[0]}x{self.grid_shape_[1]} grid; the operator only "
                "applies to that grid."
            )
        return stacks


# --------------------------------------------------------------------------------------------
def _encode_labels(estimator, y, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate class labels; return their codes (n,) in [0, Q) and the classes (Q,)."""
    name = type(estimator).__name__
    if y is None:
        raise ValueError(f"{name} requires y to be passed, but the target y is None.")
    y = column_or_1d(y, warn=True)
    if y.shape[0] != n_samples:
        raise ValueError(f"y has {y.shape[0]} labels but X has {n_samples} samples.")
    check_classification_targets(y)
    encoder = LabelEncoder()
    codes = encoder.fit_transform(y)
    if len(encoder.classes_) < 2:
        raise ValueError(
            f"{name} needs samples of at least two classes to measure separability; got "
            f"1 class ({encoder.classes_[0]})."
        )
    return codes, encoder.classes_


def _check_pair(shape) -> tuple[int, int] | None:
    """Validate ``output_shape``: None or two positive integers."""
    if shape is None:
        return None
    try:
        pair = tuple(int(v) for v in shape)
        valid = len(pair) == 2 and min(pair) >= 1 and all(float(v) == int(v) for v in shape)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            f"output_shape must be None or a pair of positive integers (H', W'), got {shape!r}."
        )
    return pair


def _channel_statistics(stacks: FeatureStacks, batch_size, device, dtype):
    """First pass: per-channel mean and standard deviation over samples and locations."""
    total = None
    for _, batch, _ in stacks.iter_batches(batch_size, device):
        stats = ChannelStatistics.from_batch(batch.to(dtype))
        total = stats if total is None else total.merge(stats)
    return total.mean, total.scale


def _scatter_statistics(
    stacks: FeatureStacks, codes, n_classes, mean, scale, batch_size, device, dtype
) -> ScatterStatistics:
    """Second pass: class means and within-class scatter of the normalised stacks."""
    weights = class_weights_from_labels(codes, n_classes, dtype=dtype)
    total = None
    for index, batch, _ in stacks.iter_batches(batch_size, device):
        normalised = (batch.to(dtype) - mean) / scale
        labels = codes[torch.as_tensor(index, device=device)]
        stats = ScatterStatistics.from_batch(normalised, labels, weights)
        total = stats if total is None else total.merge(stats)
    return total
