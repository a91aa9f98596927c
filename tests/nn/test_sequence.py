"""Generalized max pooling over token sequences (B, N, D) with a padding mask."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from gmp_reference import auto_unit_bound, unit_error_bound
from rounding import EPS32, EPS64, eps, exp_of_log_rtol
from skpool.nn import GeneralizedMaxPool2d, SequenceGeneralizedMaxPool
from skpool.nn.sequence import generalized_max_pool_sequence
from testing_utils import DEVICES


def reference_gmp(tokens: np.ndarray, lam: float) -> np.ndarray:
    """float64 GMP of one unpadded sequence (N, D), the dual form, normalised."""
    phi = np.asarray(tokens, dtype=np.float64)
    weights = np.linalg.solve(phi @ phi.T + lam * np.eye(len(phi)), np.ones(len(phi)))
    xi = phi.T @ weights
    return xi / np.linalg.norm(xi)


def padded_batch(rng, lengths, dim, n_tokens, fill=np.nan):
    """Tokens (B, n_tokens, D) whose valid positions are scattered (not a prefix) and whose
    padding holds ``fill``; returns the batch, the mask and each sample's valid tokens."""
    batch = np.full((len(lengths), n_tokens, dim), fill)
    mask = np.zeros((len(lengths), n_tokens), dtype=bool)
    samples = []
    for b, length in enumerate(lengths):
        positions = np.sort(rng.choice(n_tokens, size=length, replace=False))
        tokens = rng.standard_normal((length, dim))
        batch[b, positions] = tokens
        mask[b, positions] = True
        samples.append(tokens)
    return torch.from_numpy(batch), torch.from_numpy(mask), samples


def masked_bound(sample, n_tokens, lam, unit=EPS64, eps_out=None):
    """Max-abs bound of a masked pooled row against the exact GMP of ``sample``: the solve's
    bound (gmp_reference.unit_error_bound) for the zero-filled stack of ``n_tokens`` (the
    batch's sums run over every slot, padding as zeros), plus the float64 reference's own."""
    stack = np.zeros((n_tokens, sample.shape[1]))
    stack[: len(sample)] = sample
    return unit_error_bound(stack, lam, unit, eps_out) + unit_error_bound(sample, lam, EPS64)


# Lengths on both sides of D = 6: the core solves the N x N (dual) system for N <= D and the
# D x D (primal) one otherwise; the reference always uses the dual form.
LENGTHS = [1, 2, 5, 6, 7, 12]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fill", [np.nan, np.inf, 1e30, 0.0])
def test_masked_pooling_equals_the_unpadded_reference(rng, fill, device):
    tokens, mask, samples = padded_batch(rng, LENGTHS, dim=6, n_tokens=12, fill=fill)
    lam = 0.5
    pooled = generalized_max_pool_sequence(tokens.to(device), lam, mask.to(device)).cpu().numpy()
    for b, sample in enumerate(samples):
        np.testing.assert_allclose(pooled[b], reference_gmp(sample, lam), rtol=0,
                                   atol=masked_bound(sample, 12, lam))


def test_float32_agrees_with_the_float64_reference(rng):
    tokens, mask, samples = padded_batch(rng, LENGTHS, dim=6, n_tokens=12, fill=0.0)
    lam = 2.0
    pooled = generalized_max_pool_sequence(tokens.float(), lam, mask)
    assert pooled.dtype == torch.float32
    for b, sample in enumerate(samples):
        # plain float32 solve (the functional's default refine_steps=0) of the rounded tokens
        rounded = sample.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(pooled[b].numpy(), reference_gmp(rounded, lam), rtol=0,
                                   atol=masked_bound(rounded, 12, lam, EPS32))


def test_unmasked_equals_the_reference_and_the_2d_layer(rng):
    tokens = torch.from_numpy(rng.standard_normal((4, 9, 5)))
    lam = 3.0
    pooled = generalized_max_pool_sequence(tokens, lam)
    for b in range(4):
        np.testing.assert_allclose(pooled[b].numpy(), reference_gmp(tokens[b].numpy(), lam),
                                   rtol=0, atol=masked_bound(tokens[b].numpy(), 9, lam))
    # The same core as the 2-D layer: (B, N, D) tokens are (B, D, N, 1) maps.
    layer_2d = GeneralizedMaxPool2d(lam=lam, dtype=torch.float64)
    layer_seq = SequenceGeneralizedMaxPool(lam=lam, dtype=torch.float64)
    maps = tokens.transpose(1, 2)[..., None]
    # Both compute exp(log(lam)) and the same solve; the layouts differ (two code paths),
    # and with the default lam_scale="relative" each sample's ridge is lam' = lam x its mean
    # squared norm: each within its bound.
    layer_lam = float(layer_seq.lam)
    assert layer_lam == float(layer_2d.lam)
    bounds = torch.tensor([2 * unit_error_bound(phi, layer_lam * np.sum(phi**2) / len(phi),
                                                EPS64) for phi in tokens.numpy()])
    errors = (layer_seq(tokens) - layer_2d(maps)).detach().abs().amax(dim=1)
    assert torch.all(errors <= bounds), (errors / bounds).max()


def test_all_padding_rows_pool_to_zeros_with_finite_gradients(rng):
    tokens = torch.from_numpy(rng.standard_normal((3, 4, 5))).requires_grad_(True)
    mask = torch.tensor([[True, True, False, True], [False] * 4, [True] * 4])
    pool = SequenceGeneralizedMaxPool(lam=1.0, dtype=torch.float64)
    pooled = pool(tokens, mask)
    # Exact zeros by construction: no valid token pools to 0, and padding (masked out
    # before any arithmetic) gets no gradient.
    assert torch.equal(pooled[1], torch.zeros(5, dtype=torch.float64))
    # l2-normalised rows: norm 1 to the rounding of two 5-term norms and a division
    norms = pooled[[0, 2]].detach().norm(dim=1)
    assert torch.all((norms - 1).abs() <= (2 * 5 + 2) * EPS64)
    (pooled * torch.randn_like(pooled)).sum().backward()
    assert torch.isfinite(tokens.grad).all() and torch.isfinite(pool.log_lam.grad)
    assert torch.equal(tokens.grad[1], torch.zeros(4, 5, dtype=torch.float64))
    assert torch.equal(tokens.grad[0, 2], torch.zeros(5, dtype=torch.float64))  # padding


def test_gradcheck_tokens_and_lambda(rng):
    tokens, mask, _ = padded_batch(rng, [2, 5, 7], dim=4, n_tokens=7, fill=0.0)
    tokens.requires_grad_(True)
    log_lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def pool(x, theta):
        return generalized_max_pool_sequence(x, theta.exp(), mask)

    assert torch.autograd.gradcheck(pool, (tokens, log_lam))
    assert torch.autograd.gradcheck(
        lambda x, theta: generalized_max_pool_sequence(x, theta.exp(), mask, normalize=False),
        (tokens, log_lam),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(rng, dtype):
    tokens, mask, samples = padded_batch(rng, [3, 8], dim=6, n_tokens=8, fill=0.0)
    layer = SequenceGeneralizedMaxPool(lam=2.0, lam_scale="absolute")
    with torch.no_grad():
        pooled = layer(tokens.to(dtype), mask)
    assert pooled.dtype == dtype
    lam = float(layer.lam)  # exp(log 2) in float32: the layer's own ridge
    rounded_tokens = tokens.to(dtype).double().numpy()
    for b, (sample, keep) in enumerate(zip(rounded_tokens, mask.numpy())):
        # The reference of the tokens as rounded to `dtype`. The solve runs in float32 at
        # least with refine_steps="auto" (the layer's default): gmp_reference's float32
        # bound, or the float64 solve's bound; rounding the result to `dtype` adds its eps.
        phi = np.zeros_like(sample)
        phi[: keep.sum()] = sample[keep]
        if dtype == torch.float64:
            bound = unit_error_bound(phi, lam, EPS64)
        else:
            bound = auto_unit_bound(phi, lam) + eps(dtype)
        bound += unit_error_bound(sample[keep], lam, EPS64)  # the reference's own
        np.testing.assert_allclose(pooled[b].double().numpy(),
                                   reference_gmp(sample[keep], lam), rtol=0, atol=bound)


def test_layer_parameters_state_and_pickle(rng):
    pool = SequenceGeneralizedMaxPool(lam=10.0)
    assert [name for name, _ in pool.named_parameters()] == ["log_lam"]
    assert float(pool.lam.detach()) == pytest.approx(10.0, rel=exp_of_log_rtol(10.0, EPS32))
    assert "lam=10" in repr(pool)
    frozen = SequenceGeneralizedMaxPool(lam=10.0, learnable=False)
    assert list(frozen.parameters()) == [] and "log_lam" in frozen.state_dict()
    tokens = torch.randn(2, 5, 3)
    restored = pickle.loads(pickle.dumps(pool))
    torch.testing.assert_close(restored(tokens), pool(tokens), rtol=0, atol=0)  # same path


def test_replaces_mean_pooling_after_a_transformer_encoder():
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True),
        num_layers=1,
    )
    pool = SequenceGeneralizedMaxPool(lam=1.0)
    tokens = torch.randn(3, 6, 8)
    valid = torch.arange(6) < torch.tensor([[6], [3], [1]])
    pooled = pool(encoder(tokens, src_key_padding_mask=~valid), valid)
    pooled.square().sum(dim=1).mean().backward()  # any loss
    assert pooled.shape == (3, 8)
    assert pool.log_lam.grad is not None and torch.isfinite(pool.log_lam.grad)
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "x, mask, lam, error, match",
    [
        (torch.randn(2, 3), None, 1.0, ValueError, r"\(B, N, D\)"),
        (torch.ones(2, 3, 4, dtype=torch.int64), None, 1.0, TypeError, "floating-point"),
        (torch.randn(2, 0, 4), None, 1.0, ValueError, "no tokens"),
        (torch.randn(2, 3, 4), torch.ones(2, 3), 1.0, ValueError, "bool tensor of shape"),
        (torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool), 1.0, ValueError, "shape"),
        (torch.randn(2, 3, 4), np.ones((2, 3), dtype=bool), 1.0, TypeError, "mask"),
        (torch.randn(2, 3, 4), None, 0.0, ValueError, "lam"),
        (torch.randn(2, 3, 4), None, float("nan"), ValueError, "lam"),
        (torch.randn(2, 3, 4), None, torch.ones(3), ValueError, "lam"),
        (np.ones((2, 3, 4)), None, 1.0, TypeError, "torch.Tensor"),
        (torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool, device="meta"), 1.0,
         ValueError, "mask is on meta"),
    ],
)
def test_bad_input_is_a_clear_error(x, mask, lam, error, match):
    with pytest.raises(error, match=match):
        generalized_max_pool_sequence(x, lam, mask)


@pytest.mark.parametrize("kwargs", [{"lam": -1.0}, {"lam": 1e40}, {"refine_steps": -1}])
def test_bad_layer_arguments(kwargs):
    with pytest.raises(ValueError):
        SequenceGeneralizedMaxPool(**kwargs)


def test_relative_lambda_is_scale_free_and_ignores_padding(rng):
    """lam_scale="relative": lambda = lam * trace(Phi^T Phi) / N_b over the valid tokens only,
    so padding does not change it and scaling a sequence does not change its pooled direction.
    Reference: the absolute reference at that lambda, within the solve's bounds."""
    tokens = torch.from_numpy(rng.standard_normal((2, 8, 5)))
    mask = torch.tensor([[True] * 6 + [False] * 2, [True] * 8])
    tokens[0, 6:] = 1e6  # padding that would dominate the trace if it were counted
    pooled = generalized_max_pool_sequence(tokens, 0.5, mask, lam_scale="relative")
    for b, n_valid in enumerate((6, 8)):
        phi = tokens[b, :n_valid].numpy()
        lam = 0.5 * np.trace(phi.T @ phi) / n_valid
        np.testing.assert_allclose(pooled[b].numpy(), reference_gmp(phi, lam), rtol=0,
                                   atol=masked_bound(phi, 8, lam))
    scaled = generalized_max_pool_sequence(tokens * 1e3, 0.5, mask, lam_scale="relative")
    # Scaled tokens (rounded once more by the product: within the bound at twice the unit)
    # and the originals, each within its bound of the same exact direction.
    for b, n_valid in enumerate((6, 8)):
        phi = tokens[b, :n_valid].numpy()
        lam = 0.5 * np.trace(phi.T @ phi) / n_valid
        stack = np.zeros((8, 5))
        stack[:n_valid] = phi
        bound = unit_error_bound(stack, lam, EPS64) + unit_error_bound(stack, lam, 2 * EPS64)
        assert float((scaled[b] - pooled[b]).abs().max()) <= bound
