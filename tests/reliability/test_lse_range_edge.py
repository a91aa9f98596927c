"""Issue 28, class 10: log-sum-exp pooling at the edge of the floating-point range. Finite
float32 maps spanning ±2e38 (float64 ±1e308) pool to finite values, within rounding of an
mpmath reference: x − max no longer overflows (the gaps are scaled by a power of two per
(sample, channel) when the range needs it, exactly 1 otherwise)."""

import mpmath
import numpy as np
import pytest
import torch

from skpool.nn import LogSumExpPool2d
from skpool.nn.functional import log_sum_exp_pool2d

mpmath.mp.prec = 200


def _reference(values, r):
    """(1/r) log((1/N) sum exp(r x)) in 200-bit arithmetic."""
    xs = [mpmath.mpf(float(v)) for v in values]
    r = mpmath.mpf(float(r))
    top = max(xs)
    mean = mpmath.fsum(mpmath.exp(r * (x - top)) for x in xs) / len(xs)
    return top + mpmath.log(mean) / r


CASES = {
    torch.float32: [[2e38, -2e38, 1.0, -1.0], [3.4e38, -3.4e38, -3.4e38, -3.4e38],
                    [-3.4e38, -3.0e38, 3.0e38, 0.0], [1e38, -3e38, 2e38, -1e-30]],
    torch.float64: [[1e308, -1e308, 1.0, -1.0], [1.7e308, -1.7e308, -1.7e308, -1.7e308],
                    [-1.7e308, 5e307, 1.7e308, 0.0]],
}


@pytest.mark.parametrize("dtype", list(CASES))
@pytest.mark.parametrize("r", [1e-30, 1e-3, 1.0, 1e3, 1e30])
def test_maps_spanning_the_range_pool_to_finite_accurate_values(dtype, r):
    x = torch.tensor(CASES[dtype], dtype=dtype).reshape(len(CASES[dtype]), 1, 2, 2)
    got = log_sum_exp_pool2d(x, r)[:, 0]
    assert torch.isfinite(got).all(), got
    eps = torch.finfo(dtype).eps
    for row, value in zip(CASES[dtype], got.tolist()):
        expected = float(_reference(row, r))
        span = max(abs(v) for v in row)
        # Error bound: a few roundings of values of magnitude max|x| (the shift, the scaled
        # gaps, the mean, the final sum): 8 eps * max|x|, plus the output's own rounding.
        assert abs(value - expected) <= 8 * eps * span + eps * abs(expected), (row, r, value,
                                                                             expected)


def test_layer_and_gradient_stay_finite_at_the_edge():
    x = torch.tensor([[2e38, -2e38], [1.0, -1.0]], dtype=torch.float32).reshape(1, 1, 2, 2)
    x.requires_grad_(True)
    layer = LogSumExpPool2d(r=1.0)
    out = layer(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.r_raw.grad).all()


def test_ordinary_maps_unchanged():
    """In the ordinary range the scale is exactly 1: the result equals the textbook formula
    in float64 to float32 rounding (N = 49 terms; 10 eps of slack for the sums)."""
    x = torch.randn(3, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    got = log_sum_exp_pool2d(x, 2.0)
    x64 = x.double().flatten(2)
    expected = (torch.logsumexp(2.0 * x64, dim=-1) - np.log(49)) / 2.0
    torch.testing.assert_close(got.double(), expected, rtol=10 * 1.2e-7, atol=10 * 1.2e-7)
