"""What a fitted separability pooling operator is: one value object of plain numpy arrays.

:class:`FittedOperator` is what :meth:`skpool.SeparabilityPooling.fit` produces (through the
core, :func:`skpool._core.fit.fit_operator`), what the estimator exposes as
``fitted_operator_`` and rebuilds its fitted attributes from, what :mod:`skpool.io` writes to
and reads from an operator file, what :class:`skpool.nn.SeparabilityPool2d` is built from
(:meth:`FittedOperator.to_module`), and what the command line and the models read. Its fields
are the operator file's arrays; :data:`FORMAT_VERSION` is the file layout's version.

This module imports numpy only (the layer is imported by :meth:`FittedOperator.to_module`), so
``skpool info`` reads operator files without torch or scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FORMAT_VERSION", "FittedOperator"]

#: Version of the operator file layout (:func:`skpool.io.save_operator`). Readers accept files of
#: this version or older; a newer file means a newer skpool wrote it.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FittedOperator:
    r"""A fitted separability pooling operator (Birodkar et al. 2019) and what it needs.

    With channel statistics :math:`\mu, \sigma`, a stack F (N×C) is pooled into
    :math:`Z_j = P_j (F - \mu)/\sigma \cdot \sigma + \mu` for each component j (output channel
    ``j*C + c``); see :class:`skpool.SeparabilityPooling`.

    Attributes
    ----------
    operator : ndarray of shape (k, M, N)
        k components, M = H'·W' output cells, N = H·W input locations.
    channel_mean, channel_scale : ndarray of shape (C,)
        :math:`\mu` and :math:`\sigma` (zeros and ones without channel normalisation).
    grid_shape : tuple (H, W)
        Input grid, N = H·W.
    output_shape : tuple (H', W')
        Output grid, M = H'·W'.
    classes : ndarray of shape (Q,) or None
        The class labels of the fit.
    eigenvalues : ndarray of shape (k, M) or None
        :math:`p^\top A p / p^\top (B + \alpha C_m) p` of every row on the training data.
    params : dict
        The estimator's parameters at fit time.
    format_version : int
        The operator file layout it was read from (:data:`FORMAT_VERSION` when fitted here).
    """

    operator: np.ndarray
    channel_mean: np.ndarray
    channel_scale: np.ndarray
    grid_shape: tuple[int, int]
    output_shape: tuple[int, int]
    classes: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def n_components(self) -> int:
        """k, the components per output cell."""
        return int(self.operator.shape[0])

    @property
    def n_channels(self) -> int:
        """C, the channels per input location."""
        return int(self.channel_mean.shape[0])

    @property
    def n_locations(self) -> int:
        """N = H·W, the input locations."""
        return int(self.operator.shape[2])

    @property
    def n_cells(self) -> int:
        """M = H'·W', the output cells."""
        return int(self.operator.shape[1])

    def problems(self) -> list[str]:
        """What makes the arrays inconsistent (empty when they are a valid operator): shapes
        that do not match the grids, non-float or non-finite values, a scale that is not > 0.
        """
        operator, mean, scale = self.operator, self.channel_mean, self.channel_scale
        grid, out, eigenvalues = self.grid_shape, self.output_shape, self.eigenvalues
        problems = []
        if operator.ndim != 3 or operator.dtype.kind != "f":
            problems.append(f"operator must be a float (k, M, N) array, got {operator.shape}")
        elif grid[0] * grid[1] != operator.shape[2] or out[0] * out[1] != operator.shape[1]:
            problems.append(f"operator {operator.shape} does not map a {grid} grid to a {out} grid")
        elif eigenvalues is not None and eigenvalues.shape != operator.shape[:2]:
            problems.append(
                f"eigenvalues {eigenvalues.shape} must be (k, M) = {operator.shape[:2]}"
            )
        if mean.ndim != 1 or mean.shape != scale.shape:
            problems.append(
                f"channel_mean {mean.shape} and channel_scale {scale.shape} must both be (C,)"
            )
        elif mean.dtype.kind != "f" or scale.dtype.kind != "f":
            problems.append(
                f"channel_mean and channel_scale must be float arrays, got {mean.dtype} and "
                f"{scale.dtype}"
            )
        elif not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
            problems.append("channel_mean must be finite and channel_scale finite and > 0")
        if operator.dtype.kind == "f" and not np.isfinite(operator).all():
            problems.append("operator contains NaN or infinity")
        if self.classes is not None and self.classes.ndim != 1:
            problems.append(f"classes must be 1-D, got shape {self.classes.shape}")
        if eigenvalues is not None and eigenvalues.dtype.kind not in "fiu":
            problems.append(f"eigenvalues must be numbers, got {eigenvalues.dtype}")
        return problems

    def to_module(
        self, trainable: bool = False, *, channel_statistics: bool = True, device=None,
        dtype=None,
    ):
        """The operator as a :class:`skpool.nn.SeparabilityPool2d` layer (channels first).

        ``layer(x)`` for ``x`` of shape (B, C, H, W) equals the estimator's ``transform`` of
        ``x.permute(0, 2, 3, 1)``, permuted back to (B, k·C, H', W'). With
        ``channel_statistics=False`` the layer applies P alone (the models do so: the
        statistics describe the channels of the network the operator was fitted on).
        """
        from .nn import SeparabilityPool2d

        return SeparabilityPool2d.from_operator(
            self, trainable, channel_statistics=channel_statistics, device=device, dtype=dtype
        )
