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

from dataclasses import dataclass

import torch

__all__ = [
    "ChannelStatistics",
    "ScatterStatistics",
    "between_class_factor",
    "class_weights_from_labels",
]


@dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel count, mean and centred sum of squares over samples and locations.

    Attributes
    ----------
    count : Tensor of shape ()
        Number of values per channel seen (samples × locations), in the statistics' dtype.
    mean : Tensor of shape (C,)
    sum_squares : Tensor of shape (C,)
        :math:`\\sum (f - \\text{mean})^2` per channel.
    """

    count: torch.Tensor
    mean: torch.Tensor
    sum_squares: torch.Tensor

    @classmethod
    def from_batch(cls, features: torch.Tensor) -> ChannelStatistics:
        """Statistics of one batch of stacks (b, N, C) (or any (..., C) tensor)."""
        flat = features.reshape(-1, features.shape[-1])
        count = torch.tensor(flat.shape[0], dtype=flat.dtype, device=flat.device)
        if flat.shape[0] == 0:
            zeros = flat.new_zeros(flat.shape[-1])
            return cls(count, zeros, zeros.clone())
        mean = flat.mean(dim=0)
        return cls(count, mean, (flat - mean).square().sum(dim=0))

    def merge(self, other: ChannelStatistics) -> ChannelStatistics:
        """Exact statistics of the union of both batches (Chan et al.'s pairwise update)."""
        count = self.count + other.count
        weight = other.count / count.clamp_min(1)
        delta = other.mean - self.mean
        mean = self.mean + weight * delta
        sum_squares = self.sum_squares + other.sum_squares + delta.square() * self.count * weight
        return ChannelStatistics(count, mean, sum_squares)

    @property
    def scale(self) -> torch.Tensor:
        """Population standard deviation per channel (C,); 1 where it is 0 (dead channels)."""
        std = (self.sum_squares / self.count.clamp_min(1)).sqrt()
        return torch.where(std > 0, std, torch.ones_like(std))


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
        cls, features: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor
    ) -> ScatterStatistics:
        """Statistics of one batch.

        Parameters
        ----------
        features : Tensor of shape (b, N, C)
        labels : integer Tensor of shape (b,)
            Class codes in ``[0, Q)``.
        class_weights : Tensor of shape (Q,)
            :math:`w_q`, usually ``1 / K_q`` with :math:`K_q` the class sizes of all the data
            (see :func:`class_weights_from_labels`).
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
        centred = (features - means[labels]) * weights[labels].sqrt()[:, None, None]
        columns = centred.permute(1, 0, 2).reshape(n_locations, batch * n_channels)
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
        within = self.within + other.within + columns @ columns.T
        return ScatterStatistics(counts, means, within, self.class_weights)

    def between_factor(self) -> torch.Tensor:
        """D of shape (N, (Q-1)·C), :math:`A = D D^\\top` (:func:`between_class_factor`)."""
        return between_class_factor(self.means)

    def between(self) -> torch.Tensor:
        """A of shape (N, N)."""
        factor = self.between_factor()
        return factor @ factor.T


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
