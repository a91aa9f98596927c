r"""Applying a fitted separability pooling operator (Birodkar et al. 2019) to feature stacks.

The operator :math:`P` has shape (k, M, N): k components, M output locations, N input
locations. With channel statistics :math:`\mu_c, \sigma_c` (from the fit), each sample's
stack :math:`F` (N×C) is normalised, pooled and mapped back to the input's scale and centre:

.. math::

    G = (F - \mu)/\sigma, \qquad Z_j = P_j G, \qquad \text{out}_j = Z_j \sigma + \mu .

Output channels are component-major: channel index ``j * C + c``.
"""

from __future__ import annotations

import torch

__all__ = ["apply_pooling_operator"]


def apply_pooling_operator(
    features: torch.Tensor,
    operator: torch.Tensor,
    channel_mean: torch.Tensor | None = None,
    channel_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool ``features`` (B, N, C) with ``operator`` (k, M, N) into (B, M, k*C).

    Parameters
    ----------
    features : Tensor of shape (B, N, C)
    operator : Tensor of shape (k, M, N)
    channel_mean, channel_scale : Tensor of shape (C,), optional
        Channel normalisation of the fit; both or neither.

    Returns
    -------
    Tensor of shape (B, M, k*C), in the promoted dtype of features and operator. One batched
    matrix product; differentiable in all inputs.
    """
    if features.ndim != 3 or operator.ndim != 3:
        raise ValueError(
            "apply_pooling_operator expects features (B, N, C) and operator (k, M, N); got "
            f"{tuple(features.shape)} and {tuple(operator.shape)}."
        )
    batch, n_locations, n_channels = features.shape
    n_components, n_out, n_in = operator.shape
    if n_in != n_locations:
        raise ValueError(
            f"The operator pools {n_in} input locations but the features have {n_locations}."
        )
    if (channel_mean is None) != (channel_scale is None):
        raise ValueError("Give both channel_mean and channel_scale, or neither.")
    if channel_mean is not None:
        features = (features - channel_mean) / channel_scale
    pooled = operator.reshape(n_components * n_out, n_in) @ features  # (B, k*M, C)
    if channel_mean is not None:
        pooled = pooled * channel_scale + channel_mean
    pooled = pooled.reshape(batch, n_components, n_out, n_channels).transpose(1, 2)
    return pooled.reshape(batch, n_out, n_components * n_channels)
