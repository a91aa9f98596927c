r"""A fitted separability pooling operator applied to data, batch by batch: the pooled maps
(the estimator's ``transform``) and the separability ratios of its rows on labelled data.

With the channel statistics :math:`\mu, \sigma` of the fit, a stack F (N×C) is normalised,
pooled by every component and mapped back to the input's scale and centre,
:math:`\text{out}_j = P_j (F - \mu)/\sigma \cdot \sigma + \mu` (output channel ``j*C + c``).
"""

from __future__ import annotations

import numpy as np
import torch

from .fit import labelled, scatter_statistics
from .solve import rayleigh_ratios
from .operator import apply_pooling_operator
from .scatter import class_weights_from_labels, standardise

__all__ = ["pool_into", "separability_ratios"]


def pool_into(out: np.ndarray, indexed_batches, operator, mean, scale) -> np.ndarray:
    """``out[index]`` = the pooled batch (b, M, k·C) of every ``(sample indices, batch)``.

    ``operator`` (k, M, N), ``mean`` and ``scale`` (C,) are tensors in the batches' dtype and
    on their device (float32 data carry no more precision than float32 statistics keep). The
    batches are normalised without overflow (:func:`~skpool._core.scatter.standardise`);
    pooled values beyond the range of ``out``'s dtype are a ValueError, never infinity.
    """
    out_mean, out_scale = mean.repeat(len(operator)), scale.repeat(len(operator))
    for index, batch in indexed_batches:
        pooled = apply_pooling_operator(standardise(batch, mean, scale), operator)
        pooled = pooled.mul_(out_scale).add_(out_mean)  # a fresh tensor
        if not bool(torch.isfinite(pooled).all()):
            raise ValueError(
                f"The pooled values of the batch starting at sample {int(index[0])} exceed "
                f"the range of {out.dtype} (features near its largest value); pass float64 "
                "features."
            )
        out[index] = pooled.cpu().numpy()
    return out


def separability_ratios(indexed_batches, codes, n_classes, rows, mean, scale) -> list:
    r"""The ratios :math:`p^\top A p / p^\top B p` (no locality term) of the operator rows in
    ``rows`` (each (..., N), float64) on labelled data, as float64 numpy arrays (..., ).

    The scatters A and B come from the ``(sample indices, batch)`` pairs with class
    ``codes`` (n,) in [0, Q), normalised with the fitted float64 ``mean`` and ``scale``; a
    row whose between-class term is within the rounding error of A has ratio 0.
    """
    weights = class_weights_from_labels(codes, n_classes, dtype=torch.float64)
    batches = labelled(indexed_batches, codes)
    stats = scatter_statistics(batches, weights, mean, scale, torch.float64)
    factor, noise = stats.between_factor(), stats.between_noise()
    return [rayleigh_ratios(p, factor, stats.within, noise=noise).cpu().numpy() for p in rows]
