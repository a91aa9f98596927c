"""SeparabilityPooling: the closed-form learned spatial pooling of Birodkar et al. (2019).

The estimator validates its input, runs the fit protocol of the core
(:mod:`skpool._core.fit`: the passes, the merges, the distributed split, the solve) and stores
the fitted operator (:class:`skpool._fitted.FittedOperator`) as numpy attributes.
"""

from __future__ import annotations

import sys
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import Bunch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils._set_output import _get_output_config
from sklearn.utils.validation import _check_feature_names_in, check_is_fitted

from .._core import distributed as dist
from .._core.fit import (
    DataSummary,
    FitSettings,
    channel_statistics,
    check_process_group,
    codes_of,
    add_label_counts,
    fit_operator,
    on_every_rank,
    output_grid,
    progress_bar,
    scatter_statistics,
)
from .._core.geneig import rayleigh_ratios
from .._core.grid import average_pooling_operator
from .._core.operator import apply_pooling_operator
from .._core.scatter import class_weights_from_labels, standardise
from .._device import resolve_device
from .._fitted import FittedOperator
from .._grid import check_grid
from ._batches import reiterable, split_batch
from ._validation import (
    atomic_fit,
    check_labels,
    check_params,
    check_same_grid,
    check_stacks,
    encode_labels,
)

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

    Data larger than memory: ``fit`` reads ``X`` batch by batch (a :class:`numpy.memmap` stays
    on disk), and :meth:`fit_batches` fits from a re-iterable of ``(X_batch, y_batch)`` batches
    such as a torch ``DataLoader``; both give the in-memory result (the statistics are exact
    sums). With ``distributed=True`` every process of a :mod:`torch.distributed` group fits on
    its own shard and they reduce their statistics into one operator. ``support_radius``
    truncates each row's support to make large grids (64×64 and up) practical.

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
        r < N. Both give the same operator up to rounding. On CPU the low-rank route factors
        each cell's system and whitens A's factor in one blocked pass, a few cells at a time;
        the top components come from a subspace iteration certified by its residual, with
        ``eigh`` as the fallback (:mod:`skpool._core.geneig`).
    device : str or torch.device, default="auto"
        Where to compute: "auto" (CUDA when available), "cpu", "cuda" or "cuda:<index>".
    dtype : {"float64", "float32"}, default="float64"
        Precision of the within-class scatter and of the solve. float32 is faster (about 2×
        on CPU, much more on most GPUs) and agrees with float64 to about 1e-4 on
        well-conditioned data. Whatever the dtype, the channel statistics, the normalisation
        of the features and the class means are computed in float64 (the features are
        rounded to ``dtype`` only once normalised), so large channel means or data beyond
        float32's range cost no accuracy.
    batch_size : int, default=256
        Samples per batch on the device when accumulating statistics and transforming.
    max_memory_mb : float, default=1024
        Memory budget of the work matrices of one chunk of output cells in the solve (a few
        N×N matrices per cell, n×n with ``support_radius``; the formulas per route are in
        :func:`skpool._core.geneig.top_generalized_eigenvectors`). At least one cell is solved
        at a time. The statistics (N×N), the costs and the operator (k·M·N) come on top; the
        peak memory of a fit does not grow with the number of samples.
    support_radius : float, default=None
        Truncated support, in input pixels: row m only weighs the input locations within this
        distance of its cell's centre and is exactly zero elsewhere, so each cell solves an
        n×n problem (n ≈ π·radius² ≪ N) instead of N×N (64×64 grid, M = 1024: seconds
        instead of minutes on a CPU). It is the same maximisation restricted to that support,
        so a row's ratio is at most the exact one. How close the rows stay depends on
        ``alpha``: with a large ``alpha`` the exact rows concentrate near their centre (16×16
        grid, ``alpha=1000``, radius 6: within 0.06 rad of the exact rows), with a small one
        they spread over the grid and truncation changes them (see
        ``benchmarks/bench_large_grid.py``). None (default) solves exactly; a radius covering
        the whole grid gives the exact operator.
    distributed : bool, default=False
        Fit with every process of the initialised default :mod:`torch.distributed` process
        group, each passing its own shard of the data to ``fit`` or ``fit_batches`` (same
        parameters everywhere). Label counts, channel statistics and scatter statistics are
        reduced exactly (all-reduce of sums and centred between-rank corrections), the output
        cells are split between the ranks for the solve and the rows gathered, so every rank
        ends with the same operator as a single-process fit on all the data. An error on one
        rank is raised on every rank. Use the ``gloo`` backend for CPU fits and ``nccl`` for
        CUDA ones.
    verbose : int, default=0
        0 is silent; above 0 ``fit`` and ``fit_batches`` show progress bars (tqdm, on stderr)
        over the batches of each pass and over the output cells of the solve (with
        ``distributed``, on rank 0 only).

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
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of the columns of a 2-D DataFrame seen in ``fit``.
    fitted_operator_ : FittedOperator
        All of the above that defines the operator, with the parameters, as one frozen value
        object (:class:`skpool.io.FittedOperator`: the arrays themselves, not copies); what
        :func:`skpool.io.save_operator` writes and :meth:`FittedOperator.to_module` turns
        into a :class:`skpool.nn.SeparabilityPool2d` layer.

    See Also
    --------
    GeneralizedMaxPooling : Per-sample ridge-weighted global pooling.

    Notes
    -----
    B is singular when there are fewer samples than locations (K·C < N), at constant
    locations, or with ``alpha = 0``; a ridge of N·eps times trace(B + αC_m)/N (grown when a
    factorisation still fails) keeps every system solvable, so the fit never fails or returns
    NaN on such data (see :mod:`skpool._core.geneig`). Any finite ``alpha`` works: the
    systems are scaled by powers of two before the solve (``alpha = 1e39`` in float32 gives
    the ``alpha -> inf`` limit), and maps of any finite magnitude (1e-300 to 1e300) give the
    operator of the same maps at unit scale.

    Rows without class information. Where the data carry none (every sample identical, or
    the same samples in every class) A is zero in exact arithmetic and its computed value is
    rounding, which would decide the rows. A row p is taken for such a row when
    :math:`\|D^\top p\|` (:math:`A = D D^\top`) is within the worst-case rounding bound of
    D (:meth:`skpool._core.scatter.ScatterStatistics.between_noise`, about
    :math:`8 K \ln K` units of float64 roundoff of the data's root mean square at each
    location, K the number of samples); it is replaced by its cell's average-pooling row,
    with ratio 0, whatever the batches, the sample order, the dtype or the solver. A small
    A against B is not a loss of information (the eigenvectors do not depend on A's
    scale): class means 1e-7 of the spread apart are solved as usual.

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
        "support_radius": [Interval(Real, 0, None, closed="neither"), None],
        "distributed": ["boolean"],
        "verbose": ["verbose"],
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
        support_radius=None,
        distributed=False,
        verbose=0,
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

    @atomic_fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Learn the pooling operator from labelled feature maps.

        ``X`` is read in batches of ``batch_size`` samples (twice with channel normalisation:
        once for the channel statistics, once for the scatter statistics), so a 3-D or 4-D
        :class:`numpy.memmap` is never loaded whole, and the pages of a shared memmap are
        released after each batch: the peak memory does not grow with the number of samples.
        (2-D input first goes through scikit-learn's validation, whose finiteness check reads
        the whole array once.) With ``distributed=True``, ``(X, y)`` is this process's shard.

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
            stacks = self._check_fit_input(X)
            labels = check_labels(self, y, stacks.n_samples)
            settings = self._settings()
            classes, counts = np.unique(labels, return_counts=True)
            summary = DataSummary.of(stacks.grid_shape, stacks.n_channels, classes, counts)
            return settings, stacks, labels, summary

        settings, stacks, labels, summary = on_every_rank(validate, self.distributed)
        self._warn_column_grid(stacks)
        summary = summary.whole(self.distributed)
        output_grid(summary, settings)  # before any data is read
        device, progress = settings.device, self._progress()
        codes = torch.as_tensor(np.searchsorted(summary.classes, labels), device=device)

        def channel_pass():
            with progress_bar(progress, "channel statistics", stacks.n_samples) as bar:
                return channel_statistics(_read(stacks, self.batch_size, device), bar)

        def scatter_pass():
            for index, batch in _read_indexed(stacks, self.batch_size, device):
                yield batch, codes[torch.as_tensor(index, device=device)]

        channels = None
        if self.normalize_channels:
            channels = on_every_rank(channel_pass, self.distributed)
        return self._set_fitted(fit_operator(summary, channels, scatter_pass, settings, progress))

    @atomic_fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit_batches(self, batches):
        """Learn the pooling operator from batches of labelled feature maps, read twice.

        For data that do not fit in memory. Pass 1 reads every batch for the channel
        statistics and the class sizes (the class weights :math:`1/K_q` of B need the final
        sizes before any scatter is accumulated); pass 2 reads them again for the scatter
        statistics. The result equals ``fit`` on the concatenated batches (to rounding); only
        one batch (split further into ``batch_size`` samples on the device) is in memory at a
        time.

        Parameters
        ----------
        batches : re-iterable of (X_batch, y_batch), or callable returning an iterator of them
            Must be iterable twice: a torch ``DataLoader``, a list, any object whose
            ``__iter__`` starts afresh, or a function returning a fresh iterator (e.g.
            ``lambda: read_chunks(path)``). A one-shot iterator such as a generator raises
            TypeError. ``X_batch`` is any layout ``fit`` accepts (array, memmap or tensor), all
            batches with the same grid and channels; the grid comes from the first batch
            (4-D) or ``grid_shape``. ``y_batch`` holds its labels (array, list or tensor).
            Both passes must yield the same samples (the order may change, e.g. a shuffling
            DataLoader); the class sizes are checked. With ``distributed=True`` the batches
            are this process's shard (e.g. a DataLoader with a ``DistributedSampler``).

        Returns
        -------
        self
        """
        check_process_group(self.distributed)
        progress = self._progress()
        first_pass = "class sizes" + (" and channel statistics" if self.normalize_channels else "")

        def read_first_pass():
            settings, start_pass = self._settings(), reiterable(batches)
            first, channels, classes, counts = None, None, None, None
            with progress_bar(progress, first_pass) as bar:
                for stacks, labels in self._iter_batches(start_pass, None):
                    first = stacks if first is None else first
                    classes, counts = add_label_counts(classes, counts, labels)
                    if not self.normalize_channels:
                        bar.update(stacks.n_samples)
                        continue
                    batch_stats = _read(stacks, self.batch_size, settings.device)
                    more = channel_statistics(batch_stats, bar)
                    channels = more if channels is None else channels.merge(more)
            if first is None:
                raise ValueError("batches yielded no (X_batch, y_batch) pair; nothing to fit.")
            summary = DataSummary.of(first.grid_shape, first.n_channels, classes, counts)
            return settings, start_pass, channels, summary, first

        settings, start_pass, channels, summary, first = on_every_rank(
            read_first_pass, self.distributed
        )
        self._warn_column_grid(first)
        summary, device = summary.whole(self.distributed), settings.device

        def scatter_pass():
            for stacks, labels in self._iter_batches(start_pass, summary):
                codes = torch.as_tensor(codes_of(labels, summary.classes), device=device)
                for index, batch in _read_indexed(stacks, self.batch_size, device):
                    yield batch, codes[torch.as_tensor(index, device=device)]

        return self._set_fitted(fit_operator(summary, channels, scatter_pass, settings, progress))

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
        check_params(self, ("batch_size", "device", "grid_shape"), "transform")
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
        # In the data's dtype (float32 data carry no more precision than float32 statistics
        # keep), normalised without overflow (standardise), mapped back to the data's scale
        # per output channel j*C + c.
        mean = torch.as_tensor(self.channel_mean_, device=device, dtype=stacks.dtype)
        scale = torch.as_tensor(self.channel_scale_, device=device, dtype=stacks.dtype)
        out_mean, out_scale = mean.repeat(len(operator)), scale.repeat(len(operator))
        out = np.empty((stacks.n_samples, n_out, width), dtype=stacks.numpy_dtype)
        for index, batch in _read_indexed(stacks, self.batch_size, device):
            pooled = apply_pooling_operator(standardise(batch, mean, scale), operator)
            pooled = pooled.mul_(out_scale).add_(out_mean)  # a fresh tensor
            if not bool(torch.isfinite(pooled).all()):
                raise ValueError(
                    f"The pooled values of the batch starting at sample {int(index[0])} exceed "
                    f"the range of {stacks.numpy_dtype} (features near its largest value); "
                    "pass float64 features."
                )
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
        stride×stride block (with ``output_shape``, adaptive average pooling's block). A row
        whose between-class term is within the rounding error of A (data without class
        information, e.g. the same samples in every class) has ratio 0.

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
        check_params(
            self,
            ("batch_size", "device", "grid_shape", "stride", "output_shape"),
            "separability_ratios",
        )
        device = resolve_device(self.device)
        stacks = self._check_transform_input(X)
        codes, classes = encode_labels(self, y, stacks.n_samples)
        dtype = torch.float64
        mean = torch.as_tensor(self.channel_mean_, device=device, dtype=dtype)
        scale = torch.as_tensor(self.channel_scale_, device=device, dtype=dtype)
        codes = torch.as_tensor(codes, device=device)
        weights = class_weights_from_labels(codes, len(classes), dtype=dtype)
        batches = (
            (batch, codes[torch.as_tensor(index, device=device)])
            for index, batch in _read_indexed(stacks, self.batch_size, device)
        )
        stats = scatter_statistics(batches, weights, mean, scale, dtype)
        factor, noise = stats.between_factor(), stats.between_noise()  # ratio 0 within noise
        operator = torch.as_tensor(self.operator_, device=device, dtype=dtype)
        average = average_pooling_operator(
            self.grid_shape_,
            self.output_shape_,
            stride=self.stride if self.output_shape is None else None,
            dtype=dtype,
            device=device,
        )
        return Bunch(
            learned=rayleigh_ratios(operator, factor, stats.within, noise=noise).cpu().numpy(),
            average=rayleigh_ratios(average, factor, stats.within, noise=noise).cpu().numpy(),
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
            params=self.get_params(deep=False),
        )

    def __setstate__(self, state):
        state.setdefault("verbose", 0)  # pickled before skpool had the parameter
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ------------------------------------------------------------------- fitting machinery
    def _settings(self) -> FitSettings:
        """The parameters as the core takes them (device resolved here: on every rank)."""
        return FitSettings(
            alpha=float(self.alpha),
            stride=int(self.stride),
            output_shape=check_grid(self.output_shape, "output_shape", optional=True),
            n_components=int(self.n_components),
            norm=self.norm,
            normalize_channels=bool(self.normalize_channels),
            solver=self.solver,
            support_radius=self.support_radius,
            max_memory_bytes=int(self.max_memory_mb * 2**20),
            dtype=_DTYPES[self.dtype],
            device=resolve_device(self.device),
            distributed=bool(self.distributed),
        )

    def _progress(self):
        """A tqdm bar factory for the core when ``verbose`` (on rank 0), else None."""
        if not self.verbose or (self.distributed and dist.rank() != 0):
            return None
        from tqdm.auto import tqdm

        def bar(description: str, total, unit: str):
            name = f"{type(self).__name__} {description}"
            return tqdm(desc=name, total=total, unit=unit, file=sys.stderr, disable=False)

        return bar

    def _set_fitted(self, fitted: FittedOperator, *, input_attributes: bool = False):
        """Store ``fitted`` as the fitted attributes; with ``input_attributes`` also
        ``n_channels_in_`` and ``n_features_in_`` (``fit`` records those from the data)."""
        self.operator_, self.eigenvalues_ = fitted.operator, fitted.eigenvalues
        self.channel_mean_, self.channel_scale_ = fitted.channel_mean, fitted.channel_scale
        self.grid_shape_, self.output_shape_ = fitted.grid_shape, fitted.output_shape
        self.classes_ = fitted.classes
        if input_attributes:
            self.n_channels_in_ = fitted.n_channels
            self.n_features_in_ = fitted.n_locations * fitted.n_channels
        return self

    def _check_fit_input(self, X, position: int = 0, first=None):
        """Validated stacks of one batch for ``fit`` (the first records ``n_features_in_``,
        the others must have its grid and channels)."""
        stacks = check_stacks(self, X, reset=first is None, grid_shape=self.grid_shape)
        if first is not None:
            check_same_grid(stacks, first, position)
        return stacks

    def _warn_column_grid(self, stacks) -> None:
        """Say so where 2-D (n, F) input without ``grid_shape`` became an F×1 grid (F > 1):
        flattened maps passed without their grid pool along a column, silently otherwise."""
        if stacks.layout == "2d" and self.grid_shape is None and stacks.n_locations > 1:
            warnings.warn(
                f"{type(self).__name__}: 2-D input (n, {stacks.n_locations}) without "
                f"grid_shape is treated as a {stacks.n_locations}x1 grid with one channel; "
                "pass grid_shape=(H, W) for flattened (H, W, C) maps (grid_shape="
                f"({stacks.n_locations}, 1) keeps the column and silences this warning).",
                UserWarning,
                stacklevel=5,  # the caller of fit: _warn, fit, _fit_context, atomic_fit
            )

    def _iter_batches(self, start_pass, summary):
        """Validated (stacks, labels) of every batch of one pass; the first pass (``summary``
        is None) records ``n_features_in_`` from the first batch, the second checks it."""
        first = summary
        for position, item in enumerate(start_pass()):
            features, labels = split_batch(item, position)
            stacks = self._check_fit_input(features, position, first)
            first = stacks if first is None else first
            if isinstance(labels, torch.Tensor):
                labels = labels.detach().cpu().numpy()
            yield stacks, check_labels(self, labels, stacks.n_samples)

    def _check_transform_input(self, X):
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


def _read_indexed(stacks, batch_size, device):
    """(sample indices, batch (b, N, C)) on the device; a memmap's pages are released after
    every batch (:meth:`FeatureStacks.iter_batches`)."""
    for index, batch, _ in stacks.iter_batches(batch_size, device):
        yield index, batch


def _read(stacks, batch_size, device):
    """Batches (b, N, C) on the device (see :func:`_read_indexed`)."""
    for _, batch in _read_indexed(stacks, batch_size, device):
        yield batch
