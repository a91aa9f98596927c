"""Parameter helpers shared by the layers of :mod:`skpool.nn.modules` and
:mod:`skpool.nn.baselines` (their own module, so that neither imports the other)."""

from __future__ import annotations

import torch
from torch import nn

from .._device import check_device
from .._parameters import check_real


def _check_positive(name: str, value) -> float:
    """A finite float > 0 (a TypeError naming ``name`` for None, strings, bools)."""
    return check_real(name, value, 0.0, None, closed="neither")


def _check_float_dtype(dtype) -> None:
    """A layer's ``dtype`` is None (the default dtype) or a floating torch dtype: an integer
    dtype would truncate λ or the operator (its channel scales to 0) and fail far from here."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch dtype, got {dtype!r}.")


def _register_scalar(module, name, value, learnable, device, dtype):
    """A scalar parameter (learnable) or buffer (fixed), saved in the state_dict either way."""
    check_device(device)
    _check_float_dtype(dtype)
    tensor = torch.tensor(value, device=device, dtype=dtype or torch.get_default_dtype())
    if learnable:
        module.register_parameter(name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)
