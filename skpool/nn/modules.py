r"""PyTorch layers: generalized max pooling with a learnable λ, separability pooling, and the
two baselines of the Deep GMP paper (mixed max/average and log-sum-exp pooling).

Each module holds its hyperparameters and (learnable) parameters; ``forward`` is one call into
:mod:`skpool.nn.functional`. Learnable scalars are stored through a parametrisation that keeps
them in their domain whatever the optimiser does: λ = exp(θ), r = r_min + softplus(ρ),
a = sigmoid(ω).
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import nn

from .._core.gmp import check_options
from .._device import CheckedMoves, check_device
from .._grid import check_grid
from .._parameters import MAX_REFINE_STEPS, check_bool, check_integer
from . import functional as F
from ._layer_parameters import _check_float_dtype, _check_positive, _register_scalar

__all__ = ["GeneralizedMaxPool2d", "SeparabilityPool2d"]

#: θ = log λ is clamped to this range in ``forward``: exp stays finite and positive in float32
#: (exp(±80) ≈ 5.5e34, 1.8e-35). Outside it the gradient w.r.t. θ is zero.
LOG_LAM_RANGE = (-80.0, 80.0)


def _setup_learnable_lam(
    module, lam, learnable, normalize, lam_scale, refine_steps, device, dtype
) -> None:
    """Check and store the options of a GMP layer (2-D or sequence) and register its
    θ = log λ (an ``nn.Parameter`` when ``learnable``, else a buffer), in
    :data:`LOG_LAM_RANGE`."""
    lam = _check_positive("lam", lam)
    learnable, normalize = check_bool("learnable", learnable), check_bool("normalize", normalize)
    if isinstance(refine_steps, Integral) and not isinstance(refine_steps, bool):
        refine_steps = check_integer("refine_steps", refine_steps, 0, MAX_REFINE_STEPS)
    check_options(lam_scale, refine_steps)
    log_lam = math.log(lam)
    if not LOG_LAM_RANGE[0] <= log_lam <= LOG_LAM_RANGE[1]:
        raise ValueError(
            f"lam must lie in [exp({LOG_LAM_RANGE[0]:g}), exp({LOG_LAM_RANGE[1]:g})], "
            f"got {lam!r}."
        )
    module.learnable = learnable
    module.normalize = normalize
    module.lam_scale = lam_scale
    module.refine_steps = refine_steps
    _register_scalar(module, "log_lam", log_lam, learnable, device, dtype)


class GeneralizedMaxPool2d(CheckedMoves, nn.Module):
    r"""Global generalized max pooling with a learnable ridge λ (Deep GMP).

    Each sample's :math:`N = H W` descriptors :math:`\phi_i \in \mathbb{R}^C` (the rows of
    :math:`\Phi`) pool to the ridge-regression solution that gives every descriptor the same
    similarity to the result (Murray & Perronnin 2014; Christlein et al. 2019):

    .. math::

        \xi = \arg\min_\xi \|\Phi\xi - 1_N\|^2 + \lambda \|\xi\|^2
            = (\Phi^\top\Phi + \lambda I_C)^{-1} \Phi^\top 1_N ,
        \qquad \text{out} = \xi / \|\xi\|_2 \ \text{(with normalize)} .

    Large λ (relative to the mean squared descriptor norm) points like sum/average pooling;
    small λ equalises the descriptors' contributions like max pooling does. λ is learned as
    :math:`\lambda = \exp(\theta)`, so it stays positive and finite (θ is clamped to
    :data:`LOG_LAM_RANGE` in ``forward``). With ``lam_scale="relative"`` (the default) the
    ridge of each sample is :math:`\exp(\theta)\,\mathrm{trace}(\Phi^\top\Phi)/N`, its
    mean squared descriptor norm times the learned factor, so the pooled direction does not
    depend on the scale of the features (:math:`x \to s x`); the mean squared norm is not
    detached: the layer's gradient is the true gradient of the scale-invariant function it
    computes (it passes ``gradcheck``, and it is orthogonal to the input, so it never pushes
    the features' scale), where a detached norm would give the gradient of another function.

    The solve (batched Cholesky on the smaller of the C×C and N×N Gram matrices) runs in
    float32 at least and at "highest" float32 matmul precision, also under autocast and
    whatever ``torch.set_float32_matmul_precision`` says; the output keeps the input's dtype
    (under autocast, the dtype the previous layer produced: float16/bfloat16 after an
    autocast convolution, float32 after a float32 one). The backward is analytic: one more
    solve with the forward's Cholesky factor and O(N·C) products per sample (double backward
    works too). In eval mode (``refine_steps="auto"``, the default) float32 results agree with
    the float64 solution of the same values, also when channels or locations differ in scale
    by orders of magnitude: samples whose error bound asks for it are refined in float64 or
    solved in float64 (device synchronisations per forward); so it does under
    ``torch.no_grad``. In a training step (training mode, autograd recording) ``"auto"`` is
    the plain float32 solve: its host decisions would stall a GPU every step, and the
    gradients are computed in float32 anyway; the training step makes no host-device
    synchronisation (an int ``refine_steps`` refines that many steps without one), and a
    sample whose solve fails (non-finite descriptors) gives NaN where eval mode raises. The
    layer compiles with ``torch.compile(fullgraph=True)``
    (no graph break: while tracing, ``"auto"`` means no refinement and the core's check for
    overflowing Gram matrices is skipped, so compiled code is a plain float32 solve and assumes
    descriptors of moderate magnitude). TorchScript is not supported: the core uses Python
    features ``torch.jit.script`` cannot compile.

    **Default λ.** ``lam=1.0`` relative: on digits, relative 0.1 to 1 was the best of the λ
    tried on a 4×4 head grid and within 0.03 of the best on a 2×2 one (measurements in
    ``benchmarks/README.md``), and it needs no float64 refinement up to about 800 locations
    (its error bound is eps32 · (N + 1)). The
    papers' absolute λ (Christlein et al.: λ₀ ∈ {1, 1e3, 1e5} for ResNet-50 features) is
    ``lam_scale="absolute"``.

    Args:
        lam: initial λ > 0 (or its factor, with ``lam_scale="relative"``). Default: 1.0.
        learnable: learn λ (θ is an ``nn.Parameter``); otherwise θ is a buffer. Default: True.
        normalize: l2-normalise the pooled vectors (zero stays zero). Default: True.
        flatten: return :math:`(B, C)`; with False, :math:`(B, C, 1, 1)` like
            ``nn.AdaptiveAvgPool2d(1)``. Default: True.
        lam_scale: ``"relative"`` (λ = exp(θ) × each sample's mean squared descriptor norm)
            or ``"absolute"`` (λ = exp(θ), in units of a squared descriptor norm, the papers'
            convention). Keyword-only, so skorch routes it as ``module__lam_scale`` where the
            network passes it on. Default: "relative".
        refine_steps: float64 refinement of float32 solves (see
            :func:`skpool._core.gmp.generalized_max_pool`): ``"auto"`` (the default; in eval
            mode agrees with float64 wherever the error bound needs it, at one device
            synchronisation per forward and more where it refines; in a training step 0), an
            int (that many steps, forward and backward, without synchronisation), or 0
            (fastest: a plain float32 solve, whose relative error is about
            eps32 · cond(G + λI): 1e-2 at λ = 1e-6·mean‖φ‖² with N = C, and O(1) when one
            channel (N ≤ C) or one location (N > C) is 1e3 times the others).

    Shape:
        - Input: :math:`(B, C, H, W)`, optional ``mask`` :math:`(B, H, W)` bool, True at the
          real locations of a padded batch (the result then equals pooling each unpadded
          image alone).
        - Output: :math:`(B, C)`, or :math:`(B, C, 1, 1)` with ``flatten=False``.

    Attributes:
        log_lam: θ = log λ, a scalar.
        lam: the current λ (a tensor, differentiable in θ).

    Examples::

        >>> import torch
        >>> from skpool.nn import GeneralizedMaxPool2d
        >>> pool = GeneralizedMaxPool2d()  # λ = mean squared descriptor norm, learned
        >>> pool(torch.randn(8, 64, 7, 7)).shape
        torch.Size([8, 64])
        >>> GeneralizedMaxPool2d(flatten=False)(torch.randn(8, 64, 7, 7)).shape
        torch.Size([8, 64, 1, 1])
    """

    def __init__(
        self,
        lam: float = 1.0,
        learnable: bool = True,
        normalize: bool = True,
        flatten: bool = True,
        *,
        lam_scale: str = "relative",
        refine_steps: int | str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.flatten = check_bool("flatten", flatten)
        _setup_learnable_lam(
            self, lam, learnable, normalize, lam_scale, refine_steps, device, dtype
        )

    @property
    def lam(self) -> torch.Tensor:
        """The current λ = exp(clamp(θ)), in float32 at least."""
        return _at_least_float32(self.log_lam).clamp(*LOG_LAM_RANGE).exp()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F._generalized_max_pool2d(
            x, self.lam, self.normalize, mask, not self.flatten, self.lam_scale,
            _step_refinement(self),
        )

    def extra_repr(self) -> str:
        return (
            f"lam={float(self.lam.detach()):.4g}, lam_scale={self.lam_scale!r}, "
            f"learnable={self.learnable}, normalize={self.normalize}, flatten={self.flatten}, "
            f"refine_steps={self.refine_steps!r}"
        )


class SeparabilityPool2d(CheckedMoves, nn.Module):
    r"""Separability pooling (Birodkar et al. 2019) with a fitted, spatially varying operator.

    A linear pooling operator :math:`P \in \mathbb{R}^{k \times M \times N}` maps the
    :math:`N = H W` input locations to :math:`M = H' W'` output cells, the same for every
    channel; k components per cell give k·C output channels (component-major: channel
    ``j * C + c``). With the channel statistics :math:`\mu_c, \sigma_c` of the fit,

    .. math::

        \text{out}_{j C + c,\, m} = \sigma_c \sum_{n=1}^{N} P_{j, m, n}\,
            \frac{x_{c, n} - \mu_c}{\sigma_c} + \mu_c .

    The operator is learned in closed form by :class:`skpool.SeparabilityPooling` (maximising
    class separability with a locality penalty); build the layer with :meth:`from_estimator`,
    or from saved arrays. It replaces a strided pooling layer of a network.

    Args:
        operator: array or tensor of shape :math:`(k, M, N)`, real and finite.
        channel_mean: array or tensor of shape :math:`(C,)`, or None (no normalisation).
        channel_scale: array or tensor of shape :math:`(C,)`, positive; with
            ``channel_mean``.
        trainable: hold the operator and statistics as ``nn.Parameter`` (fine-tuning);
            by default they are buffers (frozen, but saved in ``state_dict`` and moved by
            ``.to()``). Default: False.
        output_shape: the output grid :math:`(H', W')`, :math:`H' W' = M`. Required
            (keyword-only).
        grid_shape: the input grid :math:`(H, W)` the operator was fitted on; inputs of another
            grid raise ValueError. With None, any grid with :math:`H W = N` is accepted.

    Shape:
        - Input: :math:`(B, C, H, W)` with :math:`H W = N`, channels first (the estimators
          take channels last: ``x.permute(0, 3, 1, 2)`` converts their maps). A shape error
          says so; where :math:`H = W = C` a channels-last map has the same shape and no check
          can see the mistake.
        - Output: :math:`(B, k C, H', W')`, in the input's dtype.

    Examples::

        >>> import torch
        >>> from skpool.nn import SeparabilityPool2d
        >>> operator = torch.full((1, 16, 64), 1 / 64)  # k=1, 8x8 -> 4x4, a global mean
        >>> pool = SeparabilityPool2d(operator, output_shape=(4, 4), grid_shape=(8, 8))
        >>> pool(torch.randn(2, 32, 8, 8)).shape
        torch.Size([2, 32, 4, 4])

        With a fitted :class:`skpool.SeparabilityPooling` ``sep`` (channels-last data)::

        >>> pool = SeparabilityPool2d.from_estimator(sep)  # doctest: +SKIP
    """

    def __init__(
        self,
        operator,
        channel_mean=None,
        channel_scale=None,
        trainable: bool = False,
        *,
        output_shape: tuple[int, int],
        grid_shape: tuple[int, int] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_device(device)
        _check_float_dtype(dtype)
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        operator = _copy_as_tensor(operator, factory, "operator")
        if operator.ndim != 3:
            raise ValueError(f"operator must have shape (k, M, N), got {tuple(operator.shape)}.")
        self.output_shape = check_grid(output_shape, "output_shape", n_locations=operator.shape[1])
        self.grid_shape = check_grid(
            grid_shape, "grid_shape", n_locations=operator.shape[2], optional=True
        )
        if (channel_mean is None) != (channel_scale is None):
            raise ValueError("Give both channel_mean and channel_scale, or neither.")
        stats = {"channel_mean": channel_mean, "channel_scale": channel_scale}
        if channel_mean is not None:
            stats = {name: _copy_as_tensor(stat, factory, name) for name, stat in stats.items()}
            if stats["channel_mean"].ndim != 1 or (
                stats["channel_scale"].shape != stats["channel_mean"].shape
            ):
                raise ValueError(
                    "channel_mean and channel_scale must both have shape (C,), got "
                    f"{tuple(stats['channel_mean'].shape)} and "
                    f"{tuple(stats['channel_scale'].shape)}."
                )
            if not bool((stats["channel_scale"] > 0).all()):
                raise ValueError(
                    "channel_scale must be > 0 everywhere (a fitted scale is 1 for a constant "
                    "channel); it divides the input."
                )
        self.trainable = trainable = check_bool("trainable", trainable)
        for name, value in {"operator": operator, **stats}.items():
            if trainable and value is not None:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    @classmethod
    def from_operator(
        cls, fitted, trainable: bool = False, *, channel_statistics: bool = True, device=None,
        dtype=None,
    ):
        """Build the layer from a fitted operator (:class:`skpool.io.FittedOperator`: an
        estimator's ``fitted_operator_``, or what :func:`skpool.io.load_operator` read).

        Args:
            fitted: the fitted operator.
            trainable, device, dtype: as in the constructor.
            channel_statistics: apply the fit's channel normalisation, as the estimator's
                ``transform`` does; with False the layer applies the operator alone.
        """
        channel_statistics = check_bool("channel_statistics", channel_statistics)
        stats = (fitted.channel_mean, fitted.channel_scale) if channel_statistics else ()
        return cls(
            fitted.operator, *stats, trainable=trainable, output_shape=fitted.output_shape,
            grid_shape=fitted.grid_shape, device=device, dtype=dtype,
        )

    @classmethod
    def from_estimator(cls, estimator, trainable: bool = False, *, device=None, dtype=None):
        """Build the layer from a fitted :class:`skpool.SeparabilityPooling` (its
        ``fitted_operator_``, :meth:`from_operator`).

        The layer reproduces ``estimator.transform`` on channels-first data: for maps ``x`` of
        shape (B, C, H, W), ``layer(x)`` equals ``transform(x.permute(0, 2, 3, 1))`` permuted
        back to (B, k·C, H', W').
        """
        if not hasattr(estimator, "operator_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(
                f"This {type(estimator).__name__} instance is not fitted yet (no operator_): "
                "call fit before SeparabilityPool2d.from_estimator."
            )
        return cls.from_operator(estimator.fitted_operator_, trainable, device=device, dtype=dtype)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ):
        # A layer built without channel statistics holds None in their place, and their
        # length C is not known from the operator. A state_dict that has them (saved from a
        # layer fitted with them) creates them here, as torch's lazy modules materialise their
        # parameters, so that a layer built with the operator's shape accepts the state of any
        # layer of that shape; the values are then copied and checked as usual.
        names = ("channel_mean", "channel_scale")
        incoming = [state_dict.get(prefix + name) for name in names]
        if self.channel_mean is None and all(
            isinstance(value, torch.Tensor) and value.ndim == 1 for value in incoming
        ):
            for name, value in zip(names, incoming):
                placeholder = torch.ones(
                    value.shape, device=self.operator.device, dtype=self.operator.dtype
                )
                del self._buffers[name]
                if self.trainable:
                    self.register_parameter(name, nn.Parameter(placeholder))
                else:
                    self.register_buffer(name, placeholder)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        scale = self.channel_scale
        if scale is not None and not bool((scale.detach() > 0).all()):
            error_msgs.append(
                "channel_scale must be > 0 everywhere (it divides the input); the state_dict "
                "holds a non-positive value."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.separability_pool2d(
            x,
            self.operator,
            self.output_shape,
            self.channel_mean,
            self.channel_scale,
            grid_shape=self.grid_shape,
        )

    def extra_repr(self) -> str:
        n_components, _, n_in = self.operator.shape
        grid = "?" if self.grid_shape is None else "x".join(map(str, self.grid_shape))
        return (
            f"n_components={n_components}, grid_shape={grid} ({n_in} locations), "
            f"output_shape={'x'.join(map(str, self.output_shape))}, "
            f"channel_statistics={self.channel_mean is not None}, trainable={self.trainable}"
        )


def _step_refinement(module) -> int | str:
    """The refinement of this forward: ``"auto"`` decides on the host which samples to refine
    (device synchronisations), so in a training step (training mode with autograd recording)
    it is a plain float32 solve, the precision of the backward's gradients anyway (an int
    refines without synchronising); in eval mode, and under ``torch.no_grad``, it refines."""
    steps = module.refine_steps
    training_step = module.training and torch.is_grad_enabled()
    return 0 if steps == "auto" and training_step else steps


def _copy_as_tensor(value, factory, name: str) -> torch.Tensor:
    """A real, finite tensor copy of an array or tensor: the layer never aliases (then trains)
    its source."""
    tensor = torch.as_tensor(value).detach()
    if tensor.is_complex():
        raise TypeError(f"{name} must be real, got {tensor.dtype}.")
    tensor = tensor.to(**factory, copy=True)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinity.")
    return tensor


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()

