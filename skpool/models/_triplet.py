"""The batch-hard triplet loss (Hermans, Beyer & Leibe 2017) and the P x K batch sampler it
needs, for :mod:`skpool.models.retrieval` (which re-exports both) or any torch training loop.
Torch and numpy only: no skorch or scikit-learn."""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._parameters import MAX_COUNT

__all__ = ["HardBatchTripletLoss", "PKBatchSampler"]


class HardBatchTripletLoss(nn.Module):
    r"""The batch-hard triplet loss (Hermans, Beyer & Leibe 2017).

    For every anchor a of the batch, the hardest positive is the farthest sample with a's
    label (a itself excluded) and the hardest negative the nearest sample with another label:

    .. math::

        \ell = \frac{1}{|A|} \sum_{a \in A} \big[\, m + \max_{p:\, y_p = y_a,\, p \ne a}
            d(a, p) - \min_{n:\, y_n \ne y_a} d(a, n) \big]_+ ,

    with :math:`d` the Euclidean distance between embeddings and A the anchors that have both
    a positive and a negative in the batch (the others are left out of the mean; a batch
    without any such anchor gives a zero loss, with zero gradients). The hardest samples are
    chosen without gradient; the loss is then differentiable in the embeddings (at coinciding
    embeddings the distance's subgradient 0 is used).

    Args:
        margin: :math:`m \ge 0`, in units of embedding distance (l2-normalised embeddings
            lie within distance 2 of each other). Default: 0.2.

    Shape:
        - Input: embeddings :math:`(B, D)`, labels :math:`(B,)` (integers).
        - Output: a scalar.

    Examples::

        >>> import torch
        >>> from skpool.models.retrieval import HardBatchTripletLoss
        >>> embeddings = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> HardBatchTripletLoss(margin=0.3)(embeddings, labels).shape
        torch.Size([])
    """

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        if not (isinstance(margin, Real) and math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}.")
        self.margin = float(margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
            raise ValueError(
                "HardBatchTripletLoss expects embeddings (B, D) and labels (B,), got shapes "
                f"{tuple(embeddings.shape)} and {tuple(labels.shape)}."
            )
        positive, negative, valid = _hardest_pairs(embeddings, labels)
        if not bool(valid.any()):
            return embeddings.sum() * 0.0  # keeps the graph: zero gradients, no NaN
        anchors = embeddings[valid]
        d_positive = torch.linalg.vector_norm(anchors - embeddings[positive[valid]], dim=1)
        d_negative = torch.linalg.vector_norm(anchors - embeddings[negative[valid]], dim=1)
        return F.relu(self.margin + d_positive - d_negative).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}"


@torch.no_grad()
def _hardest_pairs(embeddings, labels):
    """Index of each anchor's farthest positive and nearest negative, and which anchors have
    both. Distances from the differences (no Gram expansion), so near-equal ones stay ordered
    to working precision."""
    distances = torch.cdist(
        embeddings.detach(), embeddings.detach(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    other = labels[:, None] != labels[None, :]
    positive = distances.masked_fill(~same, -torch.inf).argmax(dim=1)
    negative = distances.masked_fill(~other, torch.inf).argmin(dim=1)
    return positive, negative, same.any(dim=1) & other.any(dim=1)


class PKBatchSampler(torch.utils.data.Sampler):
    """Batches of P labels × K samples for the batch-hard triplet loss (Hermans et al. 2017).

    Each batch draws P distinct labels uniformly at random, then K distinct samples of each
    (all of a label's samples when it has fewer than K), so every anchor has positives and
    negatives. Only labels with at least two samples are drawn: a label seen once can give no
    positive pair. P is capped at the number of such labels. Each pass (epoch) draws fresh
    batches; the randomness comes from ``generator`` or, without one, from torch's global
    generator (so ``torch.manual_seed`` makes the batches reproducible).

    Args:
        labels: array-like of shape (n_samples,), any labels (compared for equality).
        n_labels_per_batch: P >= 2. Default: 18 (Hermans et al.).
        n_samples_per_label: K >= 2. Default: 4 (Hermans et al.).
        n_batches: batches per pass. Default: about one pass over the drawable samples,
            ``ceil(n / (P K))`` with n the number of samples whose label occurs at least twice.
        generator: optional :class:`torch.Generator`.

    Examples::

        >>> from skpool.models.retrieval import PKBatchSampler
        >>> sampler = PKBatchSampler([0, 0, 0, 1, 1, 2, 2, 2, 3], 2, 2, n_batches=3)
        >>> [len(batch) for batch in sampler]
        [4, 4, 4]
    """

    def __init__(
        self,
        labels,
        n_labels_per_batch: int = 18,
        n_samples_per_label: int = 4,
        *,
        n_batches: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        for name, value in (
            ("n_labels_per_batch", n_labels_per_batch),
            ("n_samples_per_label", n_samples_per_label),
        ):
            if isinstance(value, bool) or not (isinstance(value, Integral) and value >= 2):
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}.")
        if n_batches is not None and (
            isinstance(n_batches, bool)
            or not (isinstance(n_batches, Integral) and 1 <= n_batches <= MAX_COUNT)
        ):  # len() of a sampler must fit in an index
            raise ValueError(
                f"n_batches must be an integer in [1, {MAX_COUNT}], got {n_batches!r}."
            )
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
        _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
        drawable = np.flatnonzero(counts >= 2)
        if len(drawable) < 2:
            raise ValueError(
                "The batch-hard triplet loss needs at least two labels with two or more "
                f"samples each; got {len(drawable)} such label(s) among {len(counts)}."
            )
        order = np.argsort(codes.reshape(-1), kind="stable")
        members = np.split(order, np.cumsum(counts)[:-1])
        self.groups = [members[code] for code in drawable]
        self.n_labels_per_batch = min(int(n_labels_per_batch), len(self.groups))
        self.n_samples_per_label = int(n_samples_per_label)
        n_drawable = sum(len(group) for group in self.groups)
        per_batch = self.n_labels_per_batch * self.n_samples_per_label
        self.n_batches = int(n_batches) if n_batches else max(1, math.ceil(n_drawable / per_batch))
        self.generator = generator

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        seed = int(torch.randint(2**62, (), generator=self.generator))
        rng = np.random.default_rng(seed)
        for _ in range(self.n_batches):
            batch = []
            for label in rng.choice(len(self.groups), self.n_labels_per_batch, replace=False):
                group = self.groups[label]
                if len(group) > self.n_samples_per_label:
                    group = rng.choice(group, self.n_samples_per_label, replace=False)
                batch.extend(int(index) for index in group)
            yield batch
