r"""Learned pooling for any network: observe the maps at named points, fit, swap.

The shape of :mod:`torch.ao.quantization`'s prepare/convert: a forward hook on the module at a
point observes the maps that reach it, streamed batch by batch into
:meth:`skpool.SeparabilityPooling.fit_batches` (two passes, one batch in memory), then the
module is swapped by its qualified name. Hooks are removed whatever happens, and a failure
undoes every swap of the call.

- A pooling point (:class:`~torch.nn.MaxPool2d`, :class:`~torch.nn.AvgPool2d`, their adaptive
  forms, or an :class:`~torch.nn.Identity` placeholder) is fitted on the maps entering it, for
  the output grid it produced (an Identity: the estimator's own ``stride``/``output_shape``),
  and replaced by the fitted :class:`~skpool.nn.SeparabilityPool2d`.
- A strided :class:`~torch.nn.Conv2d` point gets Birodkar et al.'s replacement
  (:class:`PooledConv2d`): the same convolution at stride 1, then the pooling fitted on that
  stride-1 output, for the strided convolution's output grid.

:func:`fit_pooling` is the public face; :class:`~skpool.models.SeparabilityPoolingClassifier`
runs its procedure with the same two steps (:func:`fit_point`, :func:`replace_point`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .modules import SeparabilityPool2d

__all__ = ["fit_pooling", "PooledConv2d", "POOLING_POINTS"]

#: The module types that can be a pooling point (replaced by the fitted layer itself).
POOLING_POINTS = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.Identity,
)


class PooledConv2d(nn.Conv2d):
    r"""A stride-1 convolution followed by a pooling layer, in place of a strided convolution.

    Birodkar et al.'s replacement of a stride-s convolution: the convolution at stride 1 (its
    weights, padding, dilation and groups), then a learned pooling (``pool``, usually a fitted
    :class:`~skpool.nn.SeparabilityPool2d`) from the full grid to the strided convolution's
    output grid. It is an :class:`~torch.nn.Conv2d` (``weight`` and ``bias`` keep their names
    in ``state_dict``, initialisation loops over ``Conv2d`` still reach it) with one more
    submodule, ``pool``.

    Args:
        conv_args: the :class:`~torch.nn.Conv2d` arguments (``stride`` is forced to 1).
        pool: the pooling applied to the convolution's output.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`.
        - Output: ``pool``'s output on :math:`(B, C_{out}, H_1, W_1)`, the stride-1 output.
    """

    def __init__(self, *conv_args, pool: nn.Module, **conv_kwargs) -> None:
        conv_kwargs["stride"] = 1
        super().__init__(*conv_args, **conv_kwargs)
        self.pool = pool

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, pool: nn.Module, out_channels: int | None = None):
        """The replacement of ``conv``: its arguments at stride 1, then ``pool``.

        With ``out_channels`` None, ``conv``'s weights and bias are copied; with another
        count (the width-true variant) the convolution is a new, freshly initialised one.
        """
        weight = conv.weight
        width_true = out_channels is not None and out_channels != conv.out_channels
        layer = cls(
            conv.in_channels, conv.out_channels if out_channels is None else out_channels,
            conv.kernel_size, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, pool=pool,
            device=weight.device, dtype=weight.dtype,
        )
        if not width_true:
            with torch.no_grad():
                layer.weight.copy_(conv.weight)
                if conv.bias is not None:
                    layer.bias.copy_(conv.bias)
            layer.weight.requires_grad_(conv.weight.requires_grad)
            if conv.bias is not None:
                layer.bias.requires_grad_(conv.bias.requires_grad)
        return layer.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(super().forward(x))


def fit_pooling(
    model: nn.Module,
    estimators: Mapping,
    data,
    *,
    device=None,
    trainable: bool = False,
    width_true: bool = False,
    channel_statistics: bool = True,
) -> nn.Module:
    r"""Fit separability pooling at named points of any network and swap it in, in place.

    For each name of ``estimators`` (a module name of ``model.named_modules()``), in the
    order the network calls them, each on the network as already modified:

    - a pooling module (:class:`~torch.nn.MaxPool2d`, :class:`~torch.nn.AvgPool2d`, their
      adaptive forms, or an :class:`~torch.nn.Identity` placeholder): the maps entering it
      are streamed through a forward hook into the estimator's
      :meth:`~skpool.SeparabilityPooling.fit_batches` (channels last; two passes over
      ``data``, one batch in memory), with ``output_shape`` the grid the module produced (an
      Identity keeps the estimator's own ``stride``/``output_shape``); the module is replaced
      by :meth:`SeparabilityPool2d.from_estimator <skpool.nn.SeparabilityPool2d.from_estimator>`.
    - a strided :class:`~torch.nn.Conv2d`: the same convolution (weights, bias, padding) at
      stride 1 followed by the pooling fitted on that stride-1 output, with the strided
      convolution's output grid (:class:`PooledConv2d`, same ``weight``/``bias`` names).

    A module called more than once per forward (skpool's ResNet-18 pools both paths of a
    block with one module) is fitted on the maps of its first call and replaced for all.

    Channels: ``n_components = k`` gives k·C output channels. At a pooling point or a
    convolution keeping its weights that changes the network's widths, so it is refused
    (k = 1 there). With ``width_true=True`` a convolution point gets a *new* convolution of
    ``out/k`` channels (freshly initialised) whose pooled output has the strided
    convolution's ``out``: the paper's network, to retrain (the operator is applied alone,
    without the fit's channel statistics, which describe the old convolution's channels).

    Mode, device and dtype are kept: the maps are taken in eval mode (batch norm's running
    statistics are read, not updated) and every module's ``training`` flag is restored; the new
    layers live on the device and in the dtype of the maps (of the convolution's weights). For
    k = 1 the network's output shape is unchanged (an Identity point changes the grid it
    passes on, by construction). Forward hooks are removed even when a fit fails, and a
    failure undoes every swap of the call: the model is left as it was. The estimators are
    fitted in place (inspect their ``operator_``, ``eigenvalues_``; those fitted before a
    failure stay fitted).

    Args:
        model: the network, trained (its maps should separate the classes).
        estimators: ``{module name: SeparabilityPooling}``, unfitted, each with its own
            ``alpha``, ``norm``, ``n_components``, ``support_radius``, …
        data: re-iterable ``(images, labels)`` batches (a ``DataLoader``, a list, or a
            callable returning a fresh iterator); ``images`` is what ``model`` takes.
        device: where the images are sent for the forward passes. Default: the device of the
            model's first parameter (or buffer; CPU if it has none).
        trainable: the swapped-in operators are ``nn.Parameter`` (trained with the network)
            instead of frozen buffers. Default: False.
        width_true: at convolution points with k > 1, a new convolution of ``out/k``
            channels (see above). Default: False.
        channel_statistics: the layers apply the fit's channel normalisation (the result is
            then exactly the estimator's ``transform``); False applies the operator alone.
            Default: True.

    Returns:
        ``model``, modified in place.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from skpool import SeparabilityPooling
        >>> from skpool.nn import fit_pooling
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Flatten(),
        ...                     nn.LazyLinear(3))
        >>> data = [(torch.randn(20, 1, 8, 8), torch.arange(20) % 3) for _ in range(2)]
        >>> _ = net(data[0][0])  # materialise the lazy layer
        >>> estimators = {"2": SeparabilityPooling(alpha=10.0, device="cpu"),
        ...               "3": SeparabilityPooling(alpha=10.0, device="cpu")}
        >>> before = net(data[0][0]).shape
        >>> net = fit_pooling(net, estimators, data)
        >>> [type(module).__name__ for module in net[2:4]], net(data[0][0]).shape == before
        (['SeparabilityPool2d', 'PooledConv2d'], True)
        >>> net[3].pool.output_shape, estimators["3"].operator_.shape  # 4x4 -> 2x2
        ((2, 2), (1, 4, 16))
    """
    from .._sklearn._batches import reiterable

    names = _check_names(model, estimators)
    for name in names:
        check_point(name, model.get_submodule(name), estimators[name], width_true)
    batches = reiterable(data, "data")
    device = _model_device(model) if device is None else torch.device(device)
    undo = []
    try:
        for name in network_order(model, names, batches, device):
            layer = fit_point(
                model, name, estimators[name], batches, device, trainable=trainable,
                channel_statistics=channel_statistics and not _resized(
                    model.get_submodule(name), estimators[name], width_true),
            )
            undo.append(replace_point(model, name, layer, width_true=width_true))
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise
    return model


# -- observe ------------------------------------------------------------------------------------
class _Captured(Exception):
    """Raised by an observing hook once it has the maps: the rest of the forward is skipped."""


def fit_point(model, name, estimator, batches: Callable, device, *, trainable=False,
              channel_statistics=True) -> SeparabilityPool2d:
    """Fit ``estimator`` on the maps reaching point ``name`` and return the fitted layer.

    The maps are those entering a pooling module, or a strided convolution's stride-1 output;
    the output grid is the module's own (an Identity: the estimator's). ``batches`` is a
    function starting a new pass over ``(images, labels)``. The model is run in eval mode
    under ``no_grad``, its training flags restored and the hook removed afterwards; the model
    itself is not changed.
    """
    target = model.get_submodule(name)
    observed = {}

    def observe(module, inputs, output):
        maps = inputs[0]
        if isinstance(module, nn.Conv2d):
            maps = _stride_one(module, maps)
        if not isinstance(module, nn.Identity):
            observed.setdefault("grid", tuple(output.shape[-2:]))
        observed.setdefault("like", maps.new_empty(0))  # the new layer's device and dtype
        observed["maps"] = maps
        raise _Captured

    def maps_and_labels():
        for position, item in enumerate(batches()):
            images, labels = _split(item, position)
            observed.pop("maps", None)
            try:
                model(_to_device(images, device))
            except _Captured:
                pass
            if "maps" not in observed:
                raise RuntimeError(
                    f"The forward pass did not reach module {name!r}: it is not called by "
                    f"{type(model).__name__}.forward."
                )
            yield observed.pop("maps").permute(0, 2, 3, 1), labels

    class Passes:  # fit_batches reads the data twice
        def __iter__(self):
            return maps_and_labels()

    with _eval_mode(model), torch.no_grad():
        handle = target.register_forward_hook(observe)
        try:
            if not isinstance(target, nn.Identity):  # the output grid, before the fit
                next(iter(Passes()), None)
                estimator.set_params(output_shape=observed["grid"])
            estimator.fit_batches(Passes())
        finally:
            handle.remove()
    reference = observed["like"]
    return SeparabilityPool2d.from_operator(
        estimator.fitted_operator_, trainable, channel_statistics=channel_statistics,
        device=reference.device, dtype=reference.dtype,
    ).train(target.training)


def network_order(model, names, batches: Callable, device) -> list[str]:
    """``names`` in the order the forward pass first calls them (one forward on the first
    batch). Raises ValueError for a point the forward does not call."""
    calls = []
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda module, inputs, output, name=name: calls.append(name)) for name in names]
    try:
        first = next(iter(batches()), None)
        if first is None:
            raise ValueError("data has no batches.")
        images, _ = _split(first, 0)
        with _eval_mode(model), torch.no_grad():
            model(_to_device(images, device))
    finally:
        for hook in hooks:
            hook.remove()
    for name in names:
        if name not in calls:
            raise ValueError(
                f"Module {name!r} is not called by {type(model).__name__}.forward: it cannot "
                "be a pooling point."
            )
    return list(dict.fromkeys(calls))


# -- convert ------------------------------------------------------------------------------------
def replace_point(model, name, layer: nn.Module, *, width_true=False) -> Callable[[], None]:
    """Swap the module at ``name`` for ``layer`` (a strided convolution: for a
    :class:`PooledConv2d` around it); returns the function that undoes the swap."""
    old = model.get_submodule(name)
    if isinstance(old, nn.Conv2d):
        k = layer.operator.shape[0]
        channels = old.out_channels // k if width_true and k > 1 else None
        layer = PooledConv2d.from_conv(old, layer, out_channels=channels)
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attribute, layer)
    return lambda: setattr(parent, attribute, old)


# -- checks and helpers -------------------------------------------------------------------------
def _check_names(model, estimators) -> list[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(estimators, Mapping) or not estimators:
        raise TypeError(
            "estimators must be a non-empty mapping {module name: SeparabilityPooling}, got "
            f"{estimators!r}."
        )
    modules = dict(model.named_modules())
    names = list(estimators)
    for name in names:
        if not isinstance(name, str) or name not in modules or name == "":
            close = [m for m in modules if m and m.split(".")[-1] == str(name).split(".")[-1]]
            raise ValueError(
                f"{name!r} is not a submodule name of the model (names as in "
                f"model.named_modules(){', e.g. ' + repr(close[:3]) if close else ''})."
            )
    return names


def check_point(name, module, estimator, width_true) -> None:
    from .. import SeparabilityPooling

    if not isinstance(estimator, SeparabilityPooling):
        raise TypeError(
            f"estimators[{name!r}] must be a SeparabilityPooling, got "
            f"{type(estimator).__name__}."
        )
    estimator._validate_params()
    k = estimator.n_components
    if isinstance(module, nn.Conv2d):
        if type(module) is not nn.Conv2d or tuple(module.stride) == (1, 1):
            raise ValueError(
                f"Module {name!r} is a {type(module).__name__} with stride "
                f"{tuple(module.stride)}: only a strided nn.Conv2d (stride > 1) is a "
                "downsampling point."
            )
        if k > 1 and not width_true:
            raise ValueError(
                f"n_components={k} at the convolution {name!r} would give {k}x"
                f"{module.out_channels} channels where the network takes {module.out_channels}."
                f" Use n_components=1, or width_true=True (a new convolution of "
                f"{module.out_channels}/{k} channels, to retrain)."
            )
        if k > 1 and module.out_channels % k:
            raise ValueError(
                f"width_true needs the convolution {name!r}'s {module.out_channels} channels "
                f"divisible by n_components={k}."
            )
        return
    if not isinstance(module, POOLING_POINTS):
        raise TypeError(
            f"Module {name!r} is a {type(module).__name__}; a point must be a pooling module "
            "(MaxPool2d, AvgPool2d, AdaptiveMaxPool2d, AdaptiveAvgPool2d, an Identity "
            "placeholder) or a strided Conv2d."
        )
    if k > 1:
        raise ValueError(
            f"n_components={k} at the pooling module {name!r} would give {k}x its input "
            "channels where the next layer takes them once; use n_components=1 there (or "
            "name the strided convolution before it, with width_true=True)."
        )


def _resized(module, estimator, width_true) -> bool:
    """Whether the point's new convolution has other channels than the maps fitted on."""
    return isinstance(module, nn.Conv2d) and width_true and estimator.n_components > 1


def _stride_one(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if conv.padding_mode != "zeros":
        x = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    return nn.functional.conv2d(x, conv.weight, conv.bias, 1, padding, conv.dilation,
                                conv.groups)


def _parameter_of(module, model) -> torch.Tensor:
    for tensor in (*module.parameters(), *module.buffers(), *model.parameters(),
                   *model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return torch.empty(0)


def _model_device(model) -> torch.device:
    return _parameter_of(model, model).device


def _to_device(images, device):
    return torch.as_tensor(images).to(device)


def _split(item, position):
    try:
        images, labels = item
    except (TypeError, ValueError):
        raise TypeError(
            f"Batch {position} of data is not a pair (images, labels); got "
            f"{type(item).__name__}."
        ) from None
    return images, labels


class _eval_mode:
    """Eval mode for the duration, then every module's own ``training`` flag back."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = [(module, module.training) for module in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for module, flag in self.flags:
            module.training = flag
        return False

