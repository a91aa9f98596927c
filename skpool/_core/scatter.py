r"""Class scatter statistics of feature stacks (Birodkar et al. 2019, Algorithm 1).

Each sample is a stack :math:`F_k` of N locations × C channels. With channel normalisation
:math:`G_k = (F_k - \mu)/\sigma` (per channel, over all samples and locations), class means
:math:`\bar X_q` (the mean of the :math:`G_k` of class q, which has :math:`K_q` samples) and
their unweighted mean :math:`\bar X = \frac1Q\sum_q \bar X_q`, the N×N matrices are

.. math::

    A = \sum_q (\bar X_q - \bar X)(\bar X_q - \bar X)^\top ,
    \qquad
    B = \sum_q \frac{1}{K_q} \sum_{k:\,y_k = q} (G_k - \bar X_q)(G_k - \bar X_q)^\top ,

a sum over channels of between-class and (class-averaged) within-class covariances of the
locations. A has rank at most :math:`(Q-1)\,C`; it is returned as a factor D with
:math:`A = D D^\top` and :math:`(Q-1)\,C` columns (:func:`between_class_factor`).

Both statistics are sums over samples, so they are accumulated batch by batch and merged
exactly (across batches, files or processes) with the pairwise, centred update of Chan, Golub
and LeVeque: no uncentred second moments are ever formed, so large means do not cancel
catastrophically. Every batch costs one large matrix product (the batch reshaped to
(N, b·C)); nothing loops over samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _device

__all__ = [
    "ChannelStatistics",
    "ScatterStatistics",
    "between_class_factor",
    "class_weights_from_labels",
    "power_of_two_below",
    "standardise",
]


@dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel count, mean and standard deviation over samples and locations.

    Computed and merged without overflow or underflow for any finite input: each batch is
    scaled by a power of two near its largest magnitude per channel before anything is
    squared (exact: only the exponent changes), and merges square only ratios to a common
    power of two. The standard deviation of finite values is at most their largest
    magnitude, so it is representable whenever the values are (float64 maps of magnitude
    1e-300 or 1e300 alike); a sum of squares of such values would not be.

    Attributes
    ----------
    count : Tensor of shape ()
        Number of values per channel seen (samples × locations), in the statistics' dtype.
    mean : Tensor of shape (C,)
    std : Tensor of shape (C,)
        Population standard deviation per channel (0 for a constant channel).
    """

    count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_batch(cls, features: torch.Tensor) -> ChannelStatistics:
        """Statistics of one batch of stacks (b, N, C) (or any (..., C) tensor)."""
        flat = features.reshape(-1, features.shape[-1])
        count = torch.tensor(flat.shape[0], dtype=flat.dtype, device=flat.device)
        if flat.shape[0] == 0:
            zeros = flat.new_zeros(flat.shape[-1])
            return cls(count, zeros, zeros.clone())
        largest = torch.maximum(flat.amax(dim=0), -flat.amin(dim=0))  # (C,) max |x|, one
        # pass each (abs().amax() materialises |flat|). Channels beyond 2**(±exponent range / 4),
        # whose squares summed over the count could overflow or underflow, are divided by
        # their power of two (|flat / unit| < 2, exact); the rest keep unit 1, and without
        # such channels the data is not copied at all.
        unit = power_of_two_below(largest)
        finfo = torch.finfo(flat.dtype)
        low, high = (math.ldexp(1.0, math.frexp(v)[1] // 4) for v in (finfo.tiny, finfo.max))
        in_range = (largest > low) & (largest < high)
        unit = torch.where(in_range, torch.ones_like(unit), unit)
        scaled = flat if bool(in_range.all()) else flat / unit
        # Centred second moment in one pass (torch's var is Welford-stable: a mean of 1e8 and
        # a std of 1 keep their digits, unlike E[x^2] - E[x]^2).
        variance, mean = torch.var_mean(scaled, dim=0, correction=0)
        return cls(count, mean * unit, variance.sqrt() * unit)

    def merge(self, other: ChannelStatistics) -> ChannelStatistics:
        """Exact statistics of the union of both batches (Chan et al.'s pairwise update).

        Everything is expressed in units of a common power of two per channel, so that the
        squares stay in range: the centred sums of squares are ``count * std**2`` and the
        update adds ``delta**2 * n_a * n_b / (n_a + n_b)``.
        """
        count = self.count + other.count
        weight = other.count / count.clamp_min(1)
        largest = torch.stack([self.mean.abs(), other.mean.abs(), self.std, other.std]).amax(0)
        unit = power_of_two_below(largest)  # every ratio below is < 2 in magnitude
        mean_a, mean_b = self.mean / unit, other.mean / unit
        delta = mean_b - mean_a
        mean = mean_a + weight * delta
        variance = (
            self.count * (self.std / unit).square()
            + other.count * (other.std / unit).square()
            + delta.square() * self.count * weight
        ) / count.clamp_min(1)
        return ChannelStatistics(count, mean * unit, variance.sqrt() * unit)

    @property
    def scale(self) -> torch.Tensor:
        """Population standard deviation per channel (C,); 1 where it is 0 (dead channels)."""
        return torch.where(self.std > 0, self.std, torch.ones_like(self.std))


def power_of_two_below(magnitude: torch.Tensor) -> torch.Tensor:
    r"""The power of two :math:`2^e \le m < 2^{e+1}` of each magnitude m (1 where m is 0).

    Dividing by it only changes exponents (exact, except for values so much smaller than m
    that they become subnormal) and leaves values of magnitude at most m below 2; it is
    finite for every finite m (at most :math:`2^{1023}` in float64).
    """
    _, exponent = torch.frexp(magnitude)  # m = mantissa * 2**exponent, mantissa in [0.5, 1)
    unit = torch.ldexp(torch.ones_like(magnitude), exponent - 1)
    return torch.where(magnitude > 0, unit, torch.ones_like(magnitude))


def standardise(
    features: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    r""":math:`(F - \mu)/\sigma` per channel, without overflow for any finite input.

    Computed as :math:`(F/2 - \mu/2)/(\sigma/2)`: halving is exact, so the result is the
    same as the plain formula wherever that one does not overflow, while :math:`F - \mu` of
    two values near the largest float would. The result itself is at most
    :math:`\sqrt{\text{count}}` in magnitude for the data the statistics came from (no value
    lies further than that many standard deviations from the mean). One new tensor; the
    input is not modified.
    """
    return features.mul(0.5).sub_(mean * 0.5).div_(scale * 0.5)


#: Elements of the per-chunk float64 intermediates of :meth:`ScatterStatistics.from_batch`
#: on CPU (1 MiB: cache-sized).
_CENTRING_CHUNK = 1 << 17


@dataclass(frozen=True)
class ScatterStatistics:
    r"""Class counts, class means and the weighted within-class scatter of (normalised) stacks.

    Attributes
    ----------
    counts : Tensor of shape (Q,)
        Samples seen per class.
    means : Tensor of shape (Q, N, C)
        Class means of the stacks seen (zero for a class not seen yet).
    within : Tensor of shape (N, N)
        :math:`\sum_q w_q \sum_{k: y_k=q} (G_k - \bar X_q)(G_k - \bar X_q)^\top` over the
        samples seen, centred at the class means *of those samples*. With
        :math:`w_q = 1/K_q` (the class sizes of the whole data set) it is B once every
        sample has been merged in.
    class_weights : Tensor of shape (Q,)
        The fixed weights :math:`w_q`. B needs the final class sizes, which are known from the
        labels before the features are read (for streamed labels, all-reduce their counts
        first); fixing them keeps one N×N matrix instead of one per class.
    """

    counts: torch.Tensor
    means: torch.Tensor
    within: torch.Tensor
    class_weights: torch.Tensor

    @classmethod
    def from_batch(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor,
        class_weights: torch.Tensor,
        within_dtype: torch.dtype | None = None,
    ) -> ScatterStatistics:
        """Statistics of one batch.

        Parameters
        ----------
        features : Tensor of shape (b, N, C)
            The counts and class means are computed in its dtype.
        labels : integer Tensor of shape (b,)
            Class codes in ``[0, Q)``.
        class_weights : Tensor of shape (Q,)
            :math:`w_q`, usually ``1 / K_q`` with :math:`K_q` the class sizes of all the data
            (see :func:`class_weights_from_labels`).
        within_dtype : torch.dtype, optional
            dtype of the within-class scatter (default: that of ``features``). The estimator
            passes float64 features with ``within_dtype=torch.float32`` for a float32 solve:
            the deviations from the class means are formed in float64 and rounded once, and
            the class means (A's factor) keep float64 accuracy, for the cost of float32
            products in the one large (N, b·C) @ (b·C, N) product.
        """
        batch, n_locations, n_channels = features.shape
        n_classes = class_weights.shape[0]
        labels = labels.to(device=features.device, dtype=torch.long)
        weights = class_weights.to(device=features.device, dtype=features.dtype)
        one_hot = torch.nn.functional.one_hot(labels, n_classes).to(features.dtype)  # (b, Q)
        counts = one_hot.sum(dim=0)
        sums = one_hot.T @ features.reshape(batch, -1)  # a product, faster than index_add_
        sums = sums.reshape(n_classes, n_locations, n_channels)
        means = sums / counts.clamp_min(1)[:, None, None]
        # One product for all classes: centre each sample at its class mean and weight it by
        # sqrt(w_q); (N, b*C) @ (b*C, N) sums the outer products over samples and channels.
        # Built a few samples at a time straight into the (N, b, C) layout of the product,
        # so that the float64 intermediates stay in cache (one write of the columns instead
        # of five passes over batch-sized arrays); the same values as centring the whole
        # batch at once.
        columns = features.new_empty(
            (n_locations, batch, n_channels), dtype=within_dtype or features.dtype
        )
        roots = weights.sqrt()
        step = max(1, _CENTRING_CHUNK // max(1, n_locations * n_channels))
        if _device.takes_gpu_paths(features.device):  # a GPU streams the batch at once:
            step = max(1, batch)  # per-chunk kernel launches would cost more than they save
        for start in range(0, batch, step):
            codes = labels[start : start + step]
            part = features[start : start + step] - means[codes]
            part.mul_(roots[codes][:, None, None])
            columns[:, start : start + step].copy_(part.permute(1, 0, 2))
        columns = columns.view(n_locations, batch * n_channels)
        within = columns @ columns.T
        return cls(counts, means, within, weights)

    def merge(self, other: ScatterStatistics) -> ScatterStatistics:
        r"""Exact statistics of the union of both batches (per class, Chan et al.'s update).

        The within-class scatter gains, per class, :math:`w_q \frac{n_a n_b}{n_a + n_b}
        \Delta_q \Delta_q^\top` with :math:`\Delta_q` the difference of the two class means
        (N×C): one (N, Q·C) product for all classes.
        """
        if not torch.equal(self.class_weights, other.class_weights):
            raise ValueError("Cannot merge scatter statistics with different class weights.")
        counts = self.counts + other.counts
        share = other.counts / counts.clamp_min(1)  # n_b / (n_a + n_b), 0 for unseen classes
        delta = other.means - self.means  # (Q, N, C)
        means = self.means + share[:, None, None] * delta
        gain = (self.class_weights * self.counts * share).sqrt()  # w_q n_a n_b / (n_a + n_b)
        columns = (delta * gain[:, None, None]).permute(1, 0, 2).reshape(delta.shape[1], -1)
        columns = columns.to(self.within.dtype)
        within = self.within + other.within + columns @ columns.T
        return ScatterStatistics(counts, means, within, self.class_weights)

    def between_factor(self) -> torch.Tensor:
        """D of shape (N, (Q-1)·C), :math:`A = D D^\\top` (:func:`between_class_factor`)."""
        return between_class_factor(self.means)

    def between(self) -> torch.Tensor:
        """A of shape (N, N)."""
        factor = self.between_factor()
        return factor @ factor.T

    def between_noise(self) -> torch.Tensor:
        r"""Per location n, a bound on the rounding error of row n of :meth:`between_factor`.

        Returns a Tensor of shape (N,), in the dtype of ``means``: :math:`\tau \sqrt{T_{nn}}`
        with :math:`T_{nn} = B_{nn} + \sum_q \|\bar X_q[n]\|^2` (for
        :math:`w_q = 1/K_q`, the class-averaged mean square of the stacks at location n,
        :math:`\sum_q \frac{1}{K_q} \sum_{k: y_k = q} \|G_k[n]\|^2`) and

        .. math::

            \tau = \bigl(8 K (1 + \ln K) + Q + 8\bigr)\, u ,

        K the number of samples, Q the number of classes, u the unit roundoff of ``means``.

        Derivation (worst case, no probabilistic assumption). A class mean is formed from
        the sums of batches of b samples (error at most :math:`(b - 1)\,u \sum |g|`, Higham,
        *Accuracy and Stability of Numerical Algorithms*, 2002, eq. 4.4) and the pairwise
        merges :math:`m = m_a + s (m_b - m_a)` of :meth:`merge`, each with an error of at most
        :math:`3 u |m|`. The mean after the j-th merge covers at least j·b samples, so
        :math:`|m| \le (K / (j b)) \cdot \text{mean}|g|`; a merge weights earlier errors by
        convex weights, so they do not grow. Summed over the K/b merges and with
        :math:`\text{mean}|g| \le \text{rms}(g)`, the error of a class mean is at most
        :math:`(b + 3 (K/b)(1 + \ln K) + 2)\, u\, \text{rms}(g) \le
        (4 K (1 + \ln K) + 2)\, u\, \text{rms}(g)`. D's columns combine the class means
        with an orthonormal basis (:func:`between_class_factor`: Q more roundings), so the
        error of row n of D (a vector over classes and channels) is at most
        :math:`(4 K (1 + \ln K) + Q + 2)\, u \sqrt{T_{nn}}`. The bound above doubles the
        K term, which covers an all-reduce of the class sums over up to K processes
        (:mod:`skpool._core.distributed`) and the rounding of the channel normalisation, and
        adds 6 for the evaluation of the tests that use it.

        A use: where the data carry no class information the exact D is 0, so every row p of
        an operator has :math:`\|D^\top p\| \le \sum_n |p_n| \, \text{noise}_n`
        (:func:`skpool._core.solve.ratios.rows_without_class_information`). Computed without
        overflow for any finite statistics.
        """
        dtype = self.means.dtype
        samples = float(self.counts.sum())
        n_classes = self.means.shape[0]
        unit_roundoff = torch.finfo(dtype).eps / 2
        tau = (8 * samples * (1 + math.log(max(samples, 1.0))) + n_classes + 8) * unit_roundoff
        within = self.within.diagonal().to(dtype).clamp_min(0)  # (N,)
        means = self.means.transpose(0, 1).reshape(within.shape[0], -1)  # (N, Q*C)
        largest = torch.maximum(within.sqrt(), means.abs().amax(dim=1))
        unit = power_of_two_below(largest)  # squares of the ratios below stay in range
        second_moment = within / unit / unit + (means / unit[:, None]).square().sum(dim=1)
        return tau * second_moment.sqrt() * unit


def class_weights_from_labels(
    labels: torch.Tensor, n_classes: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """:math:`w_q = 1/K_q` from all the labels (Q,); 0 for a class without samples."""
    counts = torch.bincount(labels.to(torch.long), minlength=n_classes).to(dtype)
    return class_weights_from_counts(counts)


def class_weights_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """:math:`w_q = 1/K_q` from the class sizes (Q,); 0 for a class without samples."""
    return torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))


def between_class_factor(class_means: torch.Tensor) -> torch.Tensor:
    r"""A factor D (N, (Q-1)·C) of the between-class scatter, :math:`A = D D^\top`.

    With the class means :math:`E_c` (N×Q) of channel c and the centring matrix
    :math:`J = I_Q - \frac1Q 1 1^\top = H H^\top` (H: an orthonormal basis, Q×(Q-1), of the
    vectors orthogonal to :math:`1_Q`),
    :math:`A = \sum_c E_c J E_c^\top = \sum_c (E_c H)(E_c H)^\top`: D holds the
    :math:`E_c H` side by side, (Q-1)·C columns instead of Q·C, as the rank of A allows.

    Parameters
    ----------
    class_means : Tensor of shape (Q, N, C)
    """
    n_classes = class_means.shape[0]
    centring = torch.eye(n_classes, dtype=class_means.dtype, device=class_means.device)
    centring = centring - 1.0 / n_classes
    basis, _ = torch.linalg.qr(centring[:, : n_classes - 1])  # (Q, Q-1), orthonormal
    factor = torch.einsum("qnc,qj->njc", class_means, basis)
    return factor.reshape(class_means.shape[1], -1)
