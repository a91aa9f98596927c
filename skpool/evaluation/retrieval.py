r"""Retrieval metrics for embeddings: mean average precision and top-1 accuracy, leave-one-out.

Every sample queries all the others, ranked by Euclidean distance to it (for l2-normalised
embeddings the order of cosine similarity); the relevant samples are those with the query's
label. For query q with :math:`R_q` relevant samples among the :math:`S = n - 1` others,

.. math::

    \mathrm{AP}_q = \frac{1}{R_q} \sum_{r=1}^{S} \Pr_q(r)\, \mathrm{rel}_q(r),
    \qquad \mathrm{mAP} = \frac{1}{|Q|} \sum_{q \in Q} \mathrm{AP}_q,

where :math:`\Pr_q(r)` is the precision of the first r results and :math:`\mathrm{rel}_q(r)`
is 1 when the r-th result is relevant (the writer-retrieval protocol of Christlein et al.
2019). Top-1 accuracy is the fraction of queries whose nearest other sample is relevant.

**Ties** are handled deterministically and independently of the order of the samples:
samples at exactly the same distance from the query form one group, and every relevant sample
of a group gets the precision at the group's *end* (the number of relevant samples up to and
including the group, divided by the number of samples up to and including it). This is the
step-wise AP of :func:`sklearn.metrics.average_precision_score` over the scores
``-distance``. For top-1, a tie for the nearest place counts the fraction of the tied
samples that are relevant (the expected top-1 of a random tie break). Distances are computed
in float64 from the differences of the embeddings, so identical embeddings tie exactly.

**Queries without a relevant sample** (a label that occurs once) have no AP; they are left
out of both means (:func:`average_precision_per_query` reports NaN for them). Data in which no
label occurs twice is an error.

The scorers (``scorer(estimator, X, y)``) call ``estimator.transform(X)`` and score the
embeddings: pass them as ``scoring=`` to :class:`~sklearn.model_selection.GridSearchCV`.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_array, column_or_1d

__all__ = [
    "average_precision_per_query",
    "mean_average_precision",
    "top1_accuracy",
    "mean_average_precision_scorer",
    "top1_accuracy_scorer",
]

#: Entries of the (queries, samples, dims) difference block computed at once (32 MiB float64).
_BLOCK_ENTRIES = 1 << 22


def average_precision_per_query(embeddings, labels) -> np.ndarray:
    """Average precision of every sample querying all the others.

    Parameters
    ----------
    embeddings : array-like of shape (n_samples, n_dims)
        Finite real numbers (numpy, lists, or CPU/GPU torch tensors).
    labels : array-like of shape (n_samples,)
        Any labels scikit-learn accepts (ints, strings, ...); relevant = equal label.

    Returns
    -------
    ndarray of shape (n_samples,), float64
        :math:`AP_q` per query, NaN for queries whose label occurs only once.

    Examples
    --------
    >>> import numpy as np
    >>> from skpool.evaluation import average_precision_per_query
    >>> points = np.array([[0.0], [1.0], [3.0], [6.0]])
    >>> average_precision_per_query(points, ["a", "a", "b", "a"])  # query 3 ranks b, a, a
    array([0.83333333, 0.83333333,        nan, 0.58333333])
    """
    ranks = _rank_all(embeddings, labels)
    return ranks.average_precision


def mean_average_precision(embeddings, labels) -> float:
    """Mean of :func:`average_precision_per_query` over the queries that have a relevant sample.

    Examples
    --------
    >>> import numpy as np
    >>> from skpool.evaluation import mean_average_precision
    >>> points = np.array([[0.0], [0.1], [5.0], [5.1]])
    >>> mean_average_precision(points, [0, 0, 1, 1])
    1.0
    """
    ranks = _rank_all(embeddings, labels)
    return float(np.mean(ranks.average_precision[ranks.has_relevant]))


def top1_accuracy(embeddings, labels) -> float:
    """Fraction of queries whose nearest other sample has their label (ties: see the module).

    Queries whose label occurs only once are left out, as for :func:`mean_average_precision`.

    Examples
    --------
    >>> import numpy as np
    >>> from skpool.evaluation import top1_accuracy
    >>> top1_accuracy(np.array([[0.0], [1.0], [1.5], [3.0]]), [0, 1, 0, 1])
    0.0
    """
    ranks = _rank_all(embeddings, labels)
    return float(np.mean(ranks.top1[ranks.has_relevant]))


def mean_average_precision_scorer(estimator, X, y) -> float:
    """Scorer for GridSearchCV: :func:`mean_average_precision` of ``estimator.transform(X)``.

    Examples
    --------
    >>> from sklearn.model_selection import GridSearchCV
    >>> from skpool.models.retrieval import DGMPEmbedder
    >>> from skpool.evaluation import mean_average_precision_scorer
    >>> search = GridSearchCV(
    ...     DGMPEmbedder(max_epochs=2),
    ...     {"criterion__margin": [0.1, 0.5], "module__lam": [1.0, 1e3]},
    ...     scoring=mean_average_precision_scorer,
    ... )  # then search.fit(images, labels)
    """
    return mean_average_precision(estimator.transform(X), y)


def top1_accuracy_scorer(estimator, X, y) -> float:
    """Scorer for GridSearchCV: :func:`top1_accuracy` of ``estimator.transform(X)``."""
    return top1_accuracy(estimator.transform(X), y)


class _Ranks:
    """Per-query AP, top-1 and whether the query has any relevant sample."""

    def __init__(self, average_precision, top1, has_relevant):
        self.average_precision = average_precision
        self.top1 = top1
        self.has_relevant = has_relevant


def _rank_all(embeddings, labels) -> _Ranks:
    points, codes = _check_retrieval_data(embeddings, labels)
    n_samples, n_dims = points.shape
    average_precision = np.empty(n_samples)
    top1 = np.empty(n_samples)
    block = max(1, _BLOCK_ENTRIES // max(1, n_samples * n_dims))
    for start in range(0, n_samples, block):
        queries = np.arange(start, min(start + block, n_samples))
        average_precision[queries], top1[queries] = _rank_queries(points, codes, queries)
    has_relevant = ~np.isnan(average_precision)
    return _Ranks(average_precision, top1, has_relevant)


def _rank_queries(points, codes, queries):
    """AP and top-1 of a block of queries against all the other samples (see the module)."""
    # Squared distances from the differences (not the Gram expansion): each pair's value
    # depends on its two vectors only, so identical embeddings tie exactly.
    distances = np.square(points[queries, None, :] - points[None, :, :]).sum(axis=2)
    rows = np.arange(len(queries))
    distances[rows, queries] = np.inf  # the query itself: ranked last, then dropped
    order = np.argsort(distances, axis=1, kind="stable")[:, :-1]
    sorted_distances = np.take_along_axis(distances, order, axis=1)
    relevant = codes[order] == codes[queries, None]
    n_others = order.shape[1]

    # Index of the last sample of each sample's tie group.
    positions = np.arange(n_others)
    is_group_end = np.ones(sorted_distances.shape, dtype=bool)
    is_group_end[:, :-1] = sorted_distances[:, :-1] != sorted_distances[:, 1:]
    group_end = np.where(is_group_end, positions, n_others)
    group_end = np.minimum.accumulate(group_end[:, ::-1], axis=1)[:, ::-1]

    hits = np.cumsum(relevant, axis=1)
    precision_at_end = np.take_along_axis(hits, group_end, axis=1) / (group_end + 1)
    n_relevant = hits[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        average_precision = (relevant * precision_at_end).sum(axis=1) / n_relevant
    average_precision[n_relevant == 0] = np.nan
    top1 = precision_at_end[:, 0]  # relevant fraction of the nearest tie group
    return average_precision, top1


def _check_retrieval_data(embeddings, labels):
    """float64 (n, d) finite embeddings and integer label codes (n,)."""
    if hasattr(embeddings, "detach") and hasattr(embeddings, "cpu"):  # a torch tensor
        embeddings = embeddings.detach().cpu().numpy()
    points = check_array(
        embeddings, dtype=np.float64, ensure_min_samples=2, input_name="embeddings"
    )
    if hasattr(labels, "detach") and hasattr(labels, "cpu"):
        labels = labels.detach().cpu().numpy()
    labels = column_or_1d(labels, warn=True)
    if len(labels) != len(points):
        raise ValueError(
            f"labels has {len(labels)} entries for {len(points)} embeddings; give one label "
            "per embedding."
        )
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        raise ValueError(
            "No label occurs twice: no query has a relevant sample, so retrieval precision is "
            "undefined."
        )
    return points, codes.reshape(-1)
