"""SeparabilityPooling (Birodkar et al. 2019): validates its input, runs the core's fit protocol
(:mod:`skpool._core.fit`) and stores the fitted operator as numpy attributes."""

from __future__ import annotations

from functools import partial
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import Bunch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils._set_output import _get_output_config
from sklearn.utils.validation import _check_feature_names_in, check_is_fitted

from .._core.apply import pool_into, separability_ratios
from .._core.fit import FitSettings, check_process_group, fit_batches, fit_stacks
from .._core.grid import average_pooling_operator, output_grid_shape
from .._device import resolve_device
from .._fitted import FittedOperator
from .._parameters import SEPARABILITY_POOLING as _DEFAULTS
from .._parameters import MAX_COUNT as _MAX_COUNT
from .._parameters import MAX_MEMORY_MB as _MAX_MEMORY_MB
from .._parameters import SEPARABILITY_POOLING_CHOICES as _CHOICES
from ._batches import reiterable
from ._fit_input import (
    check_fitted_grid,
    check_labels,
    device_batches,
    encode_labels,
    labelled_batches,
    progress_bars,
    warn_column_grid,
)
from ._validation import atomic_fit, check_params, check_stacks

__all__ = ["SeparabilityPooling"]


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

    Data larger than memory: ``fit`` reads ``X`` batch by batch (a :class:`numpy.memmap` stays
    on disk), and :meth:`fit_batches` fits from a re-iterable of ``(X_batch, y_batch)`` batches
    such as a torch ``DataLoader``; both give the in-memory result (the statistics are exact
    sums). With ``distributed=True`` the processes of a :mod:`torch.distributed` group fit one
    operator on their shards. Everything runs in torch, batched over the output cells, on CPU
    or GPU; the protocol is :mod:`skpool._core.fit`, the solve :mod:`skpool._core.solve`.

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
        flattened ``(H, W, C)`` stacks (C = F / (H·W)). Without it, 3-D input is an N×1 grid
        and 2-D input F locations (an F×1 grid) with one channel; ``fit`` warns about the
        latter when F > 1 (flattened maps passed without their grid are a common mistake;
        ``grid_shape=(F, 1)`` says the column is meant).
    solver : {"auto", "low_rank", "full"}, default="auto"
        Route of the eigenproblem: ``"low_rank"`` solves an r×r problem with r ≤ (Q−1)·C
        (needs ``n_components <= r``), ``"full"`` an N×N one; ``"auto"`` picks low-rank when
        r < N. Both give the same operator up to rounding.
    device : str or torch.device, default="auto"
        Where to compute: "auto" (CUDA when available), "cpu", "cuda" or "cuda:<index>".
    dtype : {"auto", "float64", "float32"}, default="auto"
        Precision of the within-class scatter and of the solve. ``"auto"`` follows the data,
        as scikit-learn's dtype-preserving transformers do: float32 when the samples are
        float32 (or narrower), float64 otherwise. float32 is faster and its rows agree closely
        with float64's (both measured in ``benchmarks/README.md``). The channel
        statistics, the normalisation and the class means are float64 whatever the dtype.
    batch_size : int, default=256
        Samples per batch on the device when accumulating statistics and transforming.
    max_memory_mb : float, default=None
        Memory budget (MiB) of the work matrices of one chunk of output cells in the solve (a
        few N×N matrices per cell, n×n with ``support_radius``; the formulas per route are in
        :func:`skpool._core.solve.top_generalized_eigenvectors`). At least one cell is solved
        at a time. The statistics (N×N), the costs and the operator (k·M·N) come on top; the
        peak memory of a fit does not grow with the number of samples. None (default): from
        the memory free on the device when the solve starts, read again at every fit: on
        CUDA half of what the device has free (:func:`torch.cuda.mem_get_info`, plus what
        PyTorch's allocator holds unused), at most 16 GiB; on the CPU a quarter of the host's
        available memory, at most 1 GiB (1 GiB where it cannot be read)
        (:func:`skpool._device.memory_budget`). Before version 0.2 the default was 1024.
    support_radius : float, default=None
        Truncated support, in input pixels: row m only weighs the input locations within this
        distance of its cell's centre (exactly zero elsewhere), so each cell solves an n×n
        problem (n ≈ π·radius² ≪ N) instead of an N×N one. The rows are close to the exact
        ones only where ``alpha`` is large, which concentrates them near their centres (speed
        and angles measured in ``benchmarks/README.md``). None (default) solves exactly.
    distributed : bool, default=False
        Fit with every process of the initialised default :mod:`torch.distributed` process
        group, each passing its own shard to ``fit`` or ``fit_batches`` (same parameters
        everywhere): the statistics are reduced exactly, the output cells split between the
        ranks and the rows gathered, so every rank ends with the operator of a single fit on
        all the data; an error on one rank is raised on all. Any backend: ``gloo`` reduces
        CPU tensors, ``nccl`` CUDA ones, and statistics on a device the group's backend lacks
        are copied to one it has for each reduction (:mod:`skpool._core.distributed`).
    verbose : int, default=0
        0 is silent; above 0 ``fit`` and ``fit_batches`` show progress bars (tqdm, on stderr)
        over the batches of each pass and over the output cells of the solve (with
        ``distributed``, on rank 0 only).
    flatten : bool, default=False
        ``transform`` returns one row per sample, ``(n, H'·W'·k·C)`` whatever the input's
        layout, the columns in the order of :meth:`get_feature_names_out` (cell, then
        component, then channel), so that a classifier can follow in a pipeline. False keeps
        the input's layout: ``(n, H', W', k·C)`` maps for 4-D input.

    Attributes
    ----------
    operator_ : ndarray of shape (n_components, M, N)
        The learned operator, rows normalised (dtype of the solve).
    eigenvalues_ : ndarray of shape (n_components, M)
        The generalised eigenvalues :math:`p^\top A p / p^\top (B + \alpha C_m) p` of the rows
        of ``operator_`` on the training data, the locality term included (not the ratios
        :math:`p^\top A p / p^\top B p` of :meth:`separability_ratios`); 0 for the rows
        without class information (Notes).
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
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of the columns of a 2-D DataFrame seen in ``fit``.
    fitted_operator_ : FittedOperator
        The operator, grids, channel statistics, eigenvalues, classes and parameters as one
        frozen :class:`skpool.io.FittedOperator` (the arrays above, not copies): what
        :func:`skpool.io.save_operator` writes; ``.to_module()`` gives the layer.

    See Also
    --------
    GeneralizedMaxPooling : Per-sample ridge-weighted global pooling.

    Notes
    -----
    B is singular with fewer samples than locations (K·C < N), at constant locations, or
    with ``alpha = 0``: a ridge of N·eps times trace(B + αC_m)/N keeps every system
    solvable, never a failure or NaN. Any finite ``alpha`` and maps of any finite magnitude
    work (everything is scaled by powers of two). Where the data carry no class information
    (identical samples, or the same samples in every class) A is rounding noise: a row p
    with :math:`\|D^\top p\|` (:math:`A = D D^\top`) within the rounding bound of D is
    replaced by its cell's average-pooling row, with ratio 0, whatever the batches, order,
    dtype or solver (:mod:`skpool._core.solve`). A small A is not such a case: class means
    1e-7 of the spread apart are solved as usual.

    4-D maps are channels last, ``(n, H, W, C)``; the torch layers take channels first. A
    channels-first array is refused with a hint when its shape differs from the fitted one;
    where H = W = C both layouts have the same shape and no check can tell them apart.

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
        "alpha": [Interval(Real, 0, np.inf, closed="left")],
        "stride": [Interval(Integral, 1, _MAX_COUNT, closed="both")],
        "output_shape": [tuple, list, None],
        "n_components": [Interval(Integral, 1, _MAX_COUNT, closed="both")],
        "norm": [StrOptions(set(_CHOICES["norm"]))],
        "normalize_channels": ["boolean"],
        "grid_shape": [tuple, list, None],
        "solver": [StrOptions(set(_CHOICES["solver"]))],
        "device": [str, torch.device],
        "dtype": [StrOptions(set(_CHOICES["dtype"]))],
        "batch_size": [Interval(Integral, 1, _MAX_COUNT, closed="both")],
        "max_memory_mb": [Interval(Real, 0, _MAX_MEMORY_MB, closed="right"), None],
        "support_radius": [Interval(Real, 0, np.inf, closed="neither"), None],
        "distributed": ["boolean"],
        "verbose": ["verbose"],
        "flatten": ["boolean"],
    }

    def __init__(
        self,
        alpha=_DEFAULTS.alpha,
        *,
        stride=_DEFAULTS.stride,
        output_shape=_DEFAULTS.output_shape,
        n_components=_DEFAULTS.n_components,
        norm=_DEFAULTS.norm,
        normalize_channels=_DEFAULTS.normalize_channels,
        grid_shape=_DEFAULTS.grid_shape,
        solver=_DEFAULTS.solver,
        device=_DEFAULTS.device,
        dtype=_DEFAULTS.dtype,
        batch_size=_DEFAULTS.batch_size,
        max_memory_mb=_DEFAULTS.max_memory_mb,
        support_radius=_DEFAULTS.support_radius,
        distributed=_DEFAULTS.distributed,
        verbose=_DEFAULTS.verbose,
        flatten=_DEFAULTS.flatten,
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
        self.support_radius = support_radius
        self.distributed = distributed
        self.verbose = verbose
        self.flatten = flatten

    @atomic_fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Learn the pooling operator from labelled feature maps.

        ``X`` is read in batches of ``batch_size`` samples, twice with channel normalisation
        (a 3-D or 4-D :class:`numpy.memmap` is never loaded whole; 2-D input is first scanned
        once by scikit-learn's finiteness check). With ``distributed=True``, ``(X, y)`` is this
        process's shard.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, H, W, C), (n, N, C) or (n, F)
        y : array-like of shape (n,)
            Class labels; at least two classes.

        Returns
        -------
        self
        """
        check_process_group(self.distributed)

        def validate():
            stacks = check_stacks(self, X, reset=True, grid_shape=self.grid_shape)
            warn_column_grid(self, stacks)
            labels = check_labels(self, y, stacks.n_samples)
            return FitSettings.from_params(self.get_params()), stacks, labels

        read = partial(device_batches, batch_size=self.batch_size)
        fitted = fit_stacks(validate, read, self.distributed, progress_bars(self))
        return self._set_fitted(fitted)

    @atomic_fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit_batches(self, batches):
        """Learn the pooling operator from batches of labelled feature maps, read twice.

        For data that do not fit in memory. Pass 1 reads every batch for the class sizes (B's
        weights :math:`1/K_q` need them first) and channel statistics, pass 2 for the scatter
        statistics. The result equals ``fit`` on the concatenated batches (to rounding); one
        batch at a time is in memory.

        Parameters
        ----------
        batches : re-iterable of (X_batch, y_batch), or callable returning an iterator of them
            Iterable twice: a torch ``DataLoader``, a list, or a function returning a fresh
            iterator (``lambda: read_chunks(path)``); a generator is a TypeError. ``X_batch``
            is any layout ``fit`` accepts, every batch with the first one's grid and
            channels; ``y_batch`` its labels. Both passes must yield the same samples (in any
            order; the class sizes are checked). With ``distributed=True``, this process's
            shard (e.g. a DataLoader with a ``DistributedSampler``).

        Returns
        -------
        self
        """
        check_process_group(self.distributed)

        def start():
            return FitSettings.from_params(self.get_params()), reiterable(batches)

        passes = partial(labelled_batches, self)
        read = partial(device_batches, batch_size=self.batch_size)
        fitted = fit_batches(start, passes, read, self.distributed, progress_bars(self))
        return self._set_fitted(fitted)

    def transform(self, X):
        """Pool each feature map with the learned operator.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, H, W, C), (n, N, C) or (n, F)
            The grid and channel count of ``fit``.

        Returns
        -------
        ndarray of shape (n, H', W', k*C) for 4-D input, (n, M, k*C) for 3-D input and
        (n, M*k*C) for 2-D input or with ``flatten=True``
            Channels component-major (``j*C + c``); float32 for floating input of at most
            32 bits (float16, bfloat16, float32; a list of float32 rows), float64 otherwise.
        """
        check_is_fitted(self)
        check_params(self, ("batch_size", "device", "grid_shape"), "transform")
        device = resolve_device(self.device)
        stacks = check_fitted_grid(self, X)
        flat = self.flatten or stacks.layout == "2d"
        if not flat and _get_output_config("transform", self)["dense"] != "default":
            raise ValueError(
                "set_output(transform='pandas'/'polars') needs 2-D output: pass "
                f"flatten=True, or 2-D input (n, F), not {stacks.layout} input."
            )
        n_components, n_out, _ = self.operator_.shape
        width = n_components * stacks.n_channels
        out = np.empty((stacks.n_samples, n_out, width), dtype=stacks.numpy_dtype)
        arrays = (self.operator_, self.channel_mean_, self.channel_scale_)
        tensors = [torch.as_tensor(a, device=device, dtype=stacks.dtype) for a in arrays]
        pool_into(out, device_batches(stacks, device, self.batch_size), *tensors)
        if flat:
            return out.reshape(stacks.n_samples, n_out * width)
        if stacks.layout == "4d":
            return out.reshape(stacks.n_samples, *self.output_shape_, width)
        return out

    def separability_ratios(self, X, y):
        r"""Per output cell, the separability ratio of the learned rows vs. average pooling.

        With the scatters A and B of ``(X, y)`` (fitted channel normalisation), the ratio
        :math:`p^\top A p / p^\top B p` (no locality term) of every row p says how well the
        pooled value separates the classes. Average pooling's row is uniform over the cell's
        stride×stride block (adaptive pooling's with ``output_shape``). A row whose
        between-class term is within the rounding error of A has ratio 0.

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
        check_params(self, ("batch_size", "device", "grid_shape"), "separability_ratios")
        device = resolve_device(self.device)
        stacks = check_fitted_grid(self, X)
        codes, classes = encode_labels(self, y, stacks.n_samples)
        as_tensor = partial(torch.as_tensor, device=device, dtype=torch.float64)
        # average pooling's blocks as in the fit (stride or output_shape of the fit, not
        # values set since without a refit)
        fitted = self.fitted_operator_.params
        stride = fitted["stride"] if fitted["output_shape"] is None else None
        average = average_pooling_operator(
            self.grid_shape_, self.output_shape_, stride=stride, dtype=torch.float64, device=device
        )
        learned, average = separability_ratios(
            device_batches(stacks, device, self.batch_size),
            torch.as_tensor(codes, device=device),
            len(classes),
            [as_tensor(self.operator_), average],
            as_tensor(self.channel_mean_),
            as_tensor(self.channel_scale_),
        )
        return Bunch(learned=learned, average=average, output_shape=self.output_shape_)

    def get_feature_names_out(self, input_features=None):
        """Names of the 2-D output columns: ``separabilitypooling_m{m}_j{j}_c{c}``.

        m is the output cell (row-major over H'×W': cell (u, v) is m = u·W' + v), j the
        component and c the input channel, in the order of the columns of ``transform`` with
        ``flatten=True`` or on 2-D input.

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
        cells = np.ndindex(self.operator_.shape[1], self.operator_.shape[0], self.n_channels_in_)
        return np.asarray([f"{prefix}_m{m}_j{j}_c{c}" for m, j, c in cells], dtype=object)

    @property
    def fitted_operator_(self) -> FittedOperator:
        """The fitted operator and the parameters as one value object (see Attributes)."""
        check_is_fitted(self)
        return FittedOperator(
            operator=self.operator_,
            channel_mean=self.channel_mean_,
            channel_scale=self.channel_scale_,
            grid_shape=tuple(int(v) for v in self.grid_shape_),
            output_shape=tuple(int(v) for v in self.output_shape_),
            classes=getattr(self, "classes_", None),
            eigenvalues=getattr(self, "eigenvalues_", None),
            params=self._fitted_params(),
        )

    def _fitted_params(self) -> dict:
        """The parameters of the fit (``set_params`` since then changes the next fit only).
        An estimator pickled before they were kept has the current ones, checked against its
        fitted grid."""
        saved = self.__dict__.get("_fit_params")
        if saved is not None:
            return dict(saved)
        params = self.get_params(deep=False)
        try:
            expected = output_grid_shape(self.grid_shape_, params["stride"], params["output_shape"])
        except (TypeError, ValueError):
            expected = None
        if expected != tuple(self.output_shape_):
            raise ValueError(
                f"stride={params['stride']!r} and output_shape={params['output_shape']!r} do not "
                f"give the fitted output grid {tuple(self.output_shape_)} (set_params after a fit "
                "saved by an older skpool): refit, or set them back."
            )
        return params

    def __setstate__(self, state):
        state.setdefault("verbose", 0)  # pickled before skpool had the parameter
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _set_fitted(self, fitted: FittedOperator, *, input_attributes: bool = False):
        """Store ``fitted`` as the fitted attributes; with ``input_attributes`` also
        ``n_channels_in_`` and ``n_features_in_`` (``fit`` records those from the data)."""
        self.operator_, self.eigenvalues_ = fitted.operator, fitted.eigenvalues
        self.channel_mean_, self.channel_scale_ = fitted.channel_mean, fitted.channel_scale
        self.grid_shape_, self.output_shape_ = fitted.grid_shape, fitted.output_shape
        self.classes_ = fitted.classes
        # the parameters of this fit: those saved with the operator, else the current ones
        self._fit_params = {**self.get_params(deep=False), **fitted.params}
        if input_attributes:
            self.n_channels_in_ = fitted.n_channels
            self.n_features_in_ = fitted.n_locations * fitted.n_channels
        return self
