"""Zero host-device synchronisations per training step in every layer (issue 27, item 1).

A ``TorchFunctionMode`` (tests/sync_counter.py) counts the calls that make the host wait for
the device (item, tolist, __bool__, __float__, __int__, cpu, numpy, nonzero, boolean-mask
indexing...) during a whole training step: forward, loss, backward, optimiser step. On a CPU
they cost nothing, which is why only a count can prove their absence before a GPU runs it.
"""

from __future__ import annotations

import pytest
import torch

from skpool.models import LearnedPool2d
from skpool.nn import (
    GeneralizedMaxPool2d,
    LogSumExpPool2d,
    MixedMaxAvgPool2d,
    SeparabilityPool2d,
    SequenceGeneralizedMaxPool,
)
from sync_counter import SyncCounter


def _separability(trainable):
    operator = torch.rand(2, 4, 16)
    mean, scale = torch.randn(6), torch.rand(6) + 0.5
    return SeparabilityPool2d(
        operator, mean, scale, trainable, output_shape=(2, 2), grid_shape=(4, 4)
    )


# (name, layer factory, input factory, mask factory or None)
IMAGES = lambda: torch.randn(5, 6, 4, 4, requires_grad=True)  # noqa: E731
WIDE = lambda: torch.randn(5, 32, 3, 3, requires_grad=True)  # noqa: E731  (N < C: dual)
IMAGE_MASK = lambda: torch.rand(5, 4, 4) > 0.3  # noqa: E731
TOKENS = lambda: torch.randn(5, 7, 6, requires_grad=True)  # noqa: E731
TOKEN_MASK = lambda: torch.arange(7) < torch.tensor([[7], [3], [1], [0], [5]])  # noqa: E731
LAYERS = {
    "gmp default (relative, auto)": (GeneralizedMaxPool2d, IMAGES, None),
    "gmp dual, mask": (GeneralizedMaxPool2d, WIDE, lambda: torch.rand(5, 3, 3) > 0.3),
    "gmp primal, mask": (GeneralizedMaxPool2d, IMAGES, IMAGE_MASK),
    "gmp absolute": (lambda: GeneralizedMaxPool2d(1e2, lam_scale="absolute"), IMAGES, None),
    "gmp 2 refinement steps": (lambda: GeneralizedMaxPool2d(refine_steps=2), IMAGES, None),
    "gmp unnormalised": (lambda: GeneralizedMaxPool2d(normalize=False), WIDE, None),
    "sequence gmp": (SequenceGeneralizedMaxPool, TOKENS, TOKEN_MASK),
    "sequence gmp 1 step": (
        lambda: SequenceGeneralizedMaxPool(refine_steps=1), TOKENS, TOKEN_MASK
    ),
    "separability": (lambda: _separability(False), IMAGES, None),
    "separability trainable": (lambda: _separability(True), IMAGES, None),
    "learned (sgd)": (lambda: LearnedPool2d((4, 4), n_components=2), IMAGES, None),
    "mixed": (MixedMaxAvgPool2d, IMAGES, None),
    "mixed, mask": (MixedMaxAvgPool2d, IMAGES, IMAGE_MASK),
    "log-sum-exp": (LogSumExpPool2d, IMAGES, None),
    "log-sum-exp, mask": (LogSumExpPool2d, IMAGES, IMAGE_MASK),
}


def _training_step(layer, x, mask, optimizer):
    optimizer.zero_grad(set_to_none=True)
    out = layer(x) if mask is None else layer(x, mask)
    loss = out.square().sum() + out.sum()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("name", list(LAYERS))
def test_training_step_has_no_synchronisation(name):
    make_layer, make_input, make_mask = LAYERS[name]
    layer = make_layer().train()
    x = make_input()
    mask = None if make_mask is None else make_mask()
    parameters = list(layer.parameters()) + [x]
    optimizer = torch.optim.SGD(parameters, lr=1e-3)
    _training_step(layer, x, mask, optimizer)  # lazy initialisation outside the count
    with SyncCounter() as counter:
        for _ in range(2):
            _training_step(layer, x, mask, optimizer)
    assert counter.total == 0, dict(counter.calls)
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_counter_sees_synchronisations_in_forward_and_custom_backward():
    """The counter is not blind: it counts a __bool__ in a layer's forward and one in a custom
    Function's backward (which the autograd engine runs), and the eval-mode GMP layer, whose
    "auto" refinement decides on the host, synchronises."""

    class Checked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            bool((grad > 0).any())
            return grad * 2

    x = torch.randn(3, requires_grad=True)
    with SyncCounter() as counter:
        y = Checked.apply(x)
        bool((y > 0).any())
        y.sum().backward()
        x[x > 0]
    assert counter.calls["__bool__"] == 2 and counter.calls["__getitem__[bool]"] == 1

    layer = GeneralizedMaxPool2d().eval()
    with SyncCounter() as counter:
        layer(torch.randn(2, 6, 4, 4))
    assert counter.total >= 1
