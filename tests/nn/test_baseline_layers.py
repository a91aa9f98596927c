"""The Deep GMP paper's baselines: MixedMaxAvgPool2d and LogSumExpPool2d (and their functional
forms) against float64 references, limits, masks, gradients, parametrisations, dtypes, devices,
autocast, torch.compile and state_dict."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch.autograd import gradcheck, gradgradcheck

from rounding import (
    EPS32,
    EPS64,
    EPSBF16,
    eps,
    lse_bound,
    mean_bound,
    sigmoid_of_logit_rtol,
    softplus_shift_rtol,
)
from skpool.nn import LogSumExpPool2d, MixedMaxAvgPool2d
from skpool.nn.functional import _log_sum_exp_pool2d, log_sum_exp_pool2d, mixed_max_avg_pool2d
from testing_utils import DEVICES


def mixed_reference(maps, mix):
    flat = np.asarray(maps, dtype=np.float64).reshape(*maps.shape[:2], -1)
    return mix * flat.max(axis=-1) + (1 - mix) * flat.mean(axis=-1)


def lse_reference(maps, r):
    flat = np.asarray(maps, dtype=np.float64).reshape(*maps.shape[:2], -1)
    return (logsumexp(r * flat, axis=-1) - math.log(flat.shape[-1])) / r


LAYERS = {
    "mixed": (lambda **kw: MixedMaxAvgPool2d(mix=0.3, **kw), lambda m: mixed_reference(m, 0.3)),
    "lse": (lambda **kw: LogSumExpPool2d(r=2.5, **kw), lambda m: lse_reference(m, 2.5)),
}
#: The reference at a layer's own parameter (sigmoid(logit a) or r_min + softplus(rho) in its
#: dtype), so that the comparison measures the pooling's rounding alone.
OWN_REFERENCE = {
    "mixed": lambda layer, m: mixed_reference(m, float(layer.mix)),
    "lse": lambda layer, m: lse_reference(m, float(layer.r)),
}


def rounding_bound(name, flat, unit):
    """Per-row (rows, N) rounding bound of one computation of the layer: the log-sum-exp
    bound of ``rounding.lse_bound``; for the mixed layer the mean's (N + 1) eps max|x| and
    three more roundings (a max, (1 - a) mean, the sum) of the same size."""
    if name == "lse":
        return lse_bound(flat, unit)
    return mean_bound(flat, unit) + 3 * unit * np.abs(flat).max(axis=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_matches_float64_reference(device, dtype, name):
    make, reference = LAYERS[name]
    maps = np.random.default_rng(0).standard_normal((3, 4, 5, 6))
    layer = make(device=device, dtype=dtype)
    x = torch.as_tensor(maps, dtype=dtype, device=device)
    out = layer(x)
    assert out.shape == (3, 4) and out.dtype == dtype and out.device.type == device
    # Against the float64 reference of the same (rounded) values at the layer's own
    # parameter: the layer's rounding bound, and the float64 reference's own.
    values = x.cpu().double().numpy()
    flat = values.reshape(12, -1)
    bound = rounding_bound(name, flat, eps(dtype)) + rounding_bound(name, flat, EPS64)
    errors = np.abs(out.detach().cpu().double().numpy() - OWN_REFERENCE[name](layer, values))
    np.testing.assert_array_less(errors.ravel(), bound)
    # The parameter itself: within the rounding of its parametrisation
    value, rtol = ((float(layer.mix), sigmoid_of_logit_rtol(0.3, eps(dtype))) if name == "mixed"
                   else (float(layer.r), softplus_shift_rtol(2.5, 1e-3, eps(dtype))))
    assert value == pytest.approx(0.3 if name == "mixed" else 2.5, rel=rtol)
    assert layer.__class__(flatten=False, device=device, dtype=dtype)(
        torch.as_tensor(maps, dtype=dtype, device=device)
    ).shape == (3, 4, 1, 1)


def test_lse_accurate_at_small_r_in_float32():
    """The textbook (logsumexp(r x) - log N) / r loses ~eps·log N / r; ours does not.

    Bound: rounding.lse_bound in float32 (about 1.3e-5 here; the earlier fixed 2e-6 was
    tighter than any bound, loosened to it), which the textbook formula's error eps32 log N / r
    (5e-5 at r = 1e-2, 5e-4 at r = 1e-3) exceeds."""
    maps = np.random.default_rng(1).standard_normal((2, 3, 8, 8))
    x = torch.as_tensor(maps, dtype=torch.float32)
    values = x.double().numpy()  # the same rounded values
    flat = values.reshape(6, -1)
    bound = lse_bound(flat, EPS32) + lse_bound(flat, EPS64)
    assert np.all(bound < EPS32 * np.log(64) / 1e-2)  # the textbook's error is above it
    for r in (1e-3, 1e-2):
        expected = lse_reference(values, r).ravel()
        got = log_sum_exp_pool2d(x, r).double().numpy().ravel()
        np.testing.assert_array_less(np.abs(got - expected), bound)


def test_lse_limits_are_average_and_max():
    """Exact limits (Hoeffding's lemma and the log-mean-exp sandwich): mean <= LSE_r <=
    mean + r (max - min)^2 / 8, and max - log(N) / r <= LSE_r <= max; plus the rounding
    bound of the computation and of the mean or max compared with."""
    maps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    flat = maps.flatten(2)
    values = flat.reshape(6, -1).numpy()
    spread = torch.from_numpy(values.max(axis=1) - values.min(axis=1)).reshape(2, 3)
    rounding = torch.from_numpy(lse_bound(values, EPS64) + mean_bound(values, EPS64))
    gap = log_sum_exp_pool2d(maps, 1e-8) - flat.mean(-1)
    assert torch.all(gap.abs() <= 1e-8 * spread**2 / 8 + rounding.reshape(2, 3))
    gap = log_sum_exp_pool2d(maps, 1e6) - flat.amax(-1)
    assert torch.all(gap.abs() <= math.log(16) / 1e6 + rounding.reshape(2, 3))
    # No overflow where exp(r x) overflows.
    scaled = maps.float() * 100  # rounded to float32: the max moves by eps32 |max|
    big = log_sum_exp_pool2d(scaled, 50.0)
    assert torch.isfinite(big).all()
    big_values = scaled.double().flatten(2).reshape(6, -1).numpy()
    bound = (math.log(16) / 50 + lse_bound(big_values, EPS32)
             + EPS32 * np.abs(big_values).max(axis=1))
    gap = (big.double() - flat.amax(-1) * 100).reshape(6).numpy()
    np.testing.assert_array_less(np.abs(gap), bound)


def test_mixed_limits_are_max_and_average():
    maps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    # Exact: 1 * max + 0 * mean is the max in floating point (the mean is finite).
    torch.testing.assert_close(mixed_max_avg_pool2d(maps, 1.0), maps.flatten(2).amax(-1),
                               rtol=0, atol=0)
    # 0 * max + 1 * mean: the layer's mean and torch.mean (two summation orders), each
    # within (N + 1) eps64 max|x|.
    bound = 2 * mean_bound(maps.flatten(2).numpy(), EPS64)
    difference = (mixed_max_avg_pool2d(maps, 0.0) - maps.mean(dim=(2, 3))).abs().numpy()
    np.testing.assert_array_less(difference, bound)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_masked_padded_batch_equals_each_image_alone(name):
    make, _ = LAYERS[name]
    layer = make(dtype=torch.float64)
    rng = np.random.default_rng(2)
    sizes = [(5, 7), (3, 4), (1, 1)]
    images = [torch.from_numpy(rng.standard_normal((4, h, w))) for h, w in sizes]
    padded = torch.from_numpy(rng.standard_normal((3, 4, 6, 7)) * 100)
    mask = torch.zeros(3, 6, 7, dtype=torch.bool)
    for b, image in enumerate(images):
        h, w = image.shape[1:]
        padded[b, :, :h, :w] = image
        mask[b, :h, :w] = True
    padded[0, 0, 5, 6] = torch.inf  # padding is ignored even where it is not finite
    batched = layer(padded, mask=mask).detach()
    for b, image in enumerate(images):
        alone = layer(image[None]).detach()[0]
        # Padded and masked (sums over 42 slots, padding as zeros) vs alone: two code paths,
        # each within its rounding bound (the padded one's with N = 42).
        flat = image.flatten(1).numpy()
        padded_flat = np.zeros((4, 42))
        padded_flat[:, : flat.shape[1]] = flat
        padded_flat[:, flat.shape[1]:] = flat[:, :1]  # the bound's scale: the valid values'
        bound = rounding_bound(name, flat, EPS64) + rounding_bound(name, padded_flat, EPS64)
        np.testing.assert_array_less((batched[b] - alone).abs().numpy(), bound)
    assert torch.isfinite(batched).all()
    empty = layer(padded, mask=torch.zeros_like(mask)).detach()
    assert torch.equal(empty, torch.zeros_like(empty))  # no valid location: 0 by design


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradcheck_input_and_parameter(name, masked):
    make, _ = LAYERS[name]
    layer = make(dtype=torch.float64)
    (param_name, param), = layer.named_parameters()
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 3, 3) > 0.3 if masked else None

    def pool(x, value):
        return torch.func.functional_call(layer, {param_name: value}, (x, mask))

    value = param.detach().clone().requires_grad_()
    assert gradcheck(pool, (maps, value))
    assert gradgradcheck(pool, (maps, value))


def test_gradcheck_functional_per_channel_coefficients():
    torch.manual_seed(1)
    maps = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.01, 1.0, 20.0], dtype=torch.float64, requires_grad=True)
    mix = torch.tensor([[0.2], [0.9]], dtype=torch.float64, requires_grad=True)
    assert gradcheck(log_sum_exp_pool2d, (maps, r))
    assert gradgradcheck(log_sum_exp_pool2d, (maps, r))
    assert gradcheck(mixed_max_avg_pool2d, (maps, mix))
    assert gradgradcheck(mixed_max_avg_pool2d, (maps, mix))


def test_lse_r_has_a_floor_and_never_nan():
    layer = LogSumExpPool2d(r=0.5, r_min=1e-3)
    assert layer.r.item() == pytest.approx(0.5, rel=softplus_shift_rtol(0.5, 1e-3, EPS32))
    assert LogSumExpPool2d(r=1e3).r.item() == pytest.approx(  # no overflow
        1e3, rel=softplus_shift_rtol(1e3, 1e-3, EPS32))
    maps = torch.randn(2, 3, 4, 4, requires_grad=True)
    for raw in (-1e4, -50.0, 50.0, 1e4):
        with torch.no_grad():
            layer.r_raw.fill_(raw)
        assert layer.r.item() >= 1e-3 and math.isfinite(layer.r.item())
        out = layer(maps)
        grad_x, grad_raw = torch.autograd.grad(out.sum(), (maps, layer.r_raw))
        assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
        assert torch.isfinite(grad_raw)
    with torch.no_grad():
        layer.r_raw.fill_(-1e4)
    # r = r_min: LSE_r - mean <= r (max - min)^2 / 8 (Hoeffding), plus both roundings
    values = maps.detach().double().flatten(2).reshape(6, -1).numpy()
    bound = (float(layer.r) * (values.max(axis=1) - values.min(axis=1)) ** 2 / 8
             + lse_bound(values, EPS32) + mean_bound(values, EPS32))
    gap = (layer(maps) - maps.mean(dim=(2, 3))).detach().double().reshape(6).numpy()
    np.testing.assert_array_less(np.abs(gap), bound)


def test_mix_stays_in_unit_interval():
    layer = MixedMaxAvgPool2d(mix=0.25)
    assert layer.mix.item() == pytest.approx(0.25, rel=sigmoid_of_logit_rtol(0.25, EPS32))
    maps = torch.randn(2, 3, 4, 4)
    for logit in (-1e4, 1e4):
        with torch.no_grad():
            layer.mix_logit.fill_(logit)
        assert 0.0 <= layer.mix.item() <= 1.0
        assert torch.isfinite(layer(maps)).all()


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: MixedMaxAvgPool2d(mix=0.0), "mix"),
        (lambda: MixedMaxAvgPool2d(mix=1.5), "mix"),
        (lambda: LogSumExpPool2d(r=0.0), "r"),
        (lambda: LogSumExpPool2d(r=1e-4, r_min=1e-3), "r_min"),
        (lambda: LogSumExpPool2d(r_min=-1.0), "r_min"),
        (lambda: log_sum_exp_pool2d(torch.randn(1, 2, 2, 2), -1.0), "r"),
        (lambda: mixed_max_avg_pool2d(torch.randn(1, 2, 2, 2), 2.0), "mix"),
        (lambda: log_sum_exp_pool2d(torch.randn(2, 2, 2), 1.0), r"\(B, C, H, W\)"),
    ],
)
def test_invalid_arguments_raise(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_fixed_parameters_are_buffers():
    for layer in (MixedMaxAvgPool2d(learnable=False), LogSumExpPool2d(learnable=False)):
        assert list(layer.parameters()) == [] and len(layer.state_dict()) == 1


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_autocast_compile_and_state_dict(name):
    make, _ = LAYERS[name]
    layer = make()
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 8, 3)
    images = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = conv(images)
        low = layer(maps)
    assert maps.dtype == torch.bfloat16 and low.dtype == torch.bfloat16
    # The same bfloat16 values pooled outside autocast in float32, rounded to bfloat16.
    # Log-sum-exp computes in float32 for bfloat16 input either way: the same code on the
    # same values, exact. The mixed layer computes in bfloat16 under autocast: within its
    # rounding bound in bfloat16 and float32, plus half an ulp of bfloat16 of the result.
    expected = layer(maps.float()).to(torch.bfloat16)
    if name == "lse":
        torch.testing.assert_close(low, expected, rtol=0, atol=0)
    else:
        flat = maps.detach().double().flatten(2).reshape(-1, 16).numpy()
        bound = (rounding_bound(name, flat, EPSBF16) + rounding_bound(name, flat, EPS32)
                 + EPSBF16 / 2 * np.abs(flat).max(axis=1))
        gap = (low.double() - expected.double()).detach().reshape(-1).numpy()
        np.testing.assert_array_less(np.abs(gap), bound)

    x = torch.randn(2, 8, 4, 4)
    mask = torch.rand(2, 4, 4) > 0.2
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    # Compiled vs eager (decomposed ops): two code paths, each within the rounding bound of
    # the valid values (padding filled in, N = 16 slots).
    bound = np.stack([
        2 * rounding_bound(name, np.where(keep, sample, sample[:, keep][:, :1]), EPS32)
        for sample, keep in zip(x.flatten(2).double().numpy(), mask.flatten(1).numpy())
    ])
    gap = (compiled(x, mask) - layer(x, mask)).detach().double().abs().numpy()
    np.testing.assert_array_less(gap, bound)
    torch._dynamo.reset()

    with torch.no_grad():
        next(layer.parameters()).add_(0.3)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)  # same code, same data


def test_extra_repr():
    assert repr(MixedMaxAvgPool2d(mix=0.3)) == (
        "MixedMaxAvgPool2d(mix=0.3, learnable=True, flatten=True)"
    )
    assert repr(LogSumExpPool2d(r=2.0, flatten=False)) == (
        "LogSumExpPool2d(r=2, learnable=True, r_min=0.001, flatten=False)"
    )


# --------------------------------------------------------------------------------------------
# Log-sum-exp at every r (issue 14, item 10)
LSE_RS = [1e-300, 1e-100, 1e-30, 1e-8, 1e-3, 0.05, 0.5, 3.0, 50.0, 1e3, 1e8, 1e30, 1e300]


def lse_mpmath(flat, r):
    """(1/r) log mean exp(r x) per row of (rows, N) in 60-digit arithmetic, as
    m + log1p(mean(expm1(r (x - m)))) / r (exact for any r at that precision)."""
    import mpmath

    mpmath.mp.dps = 60
    out = []
    for row in np.asarray(flat, dtype=np.float64):
        m = mpmath.mpf(float(row.max()))
        rate = mpmath.mpf(r)
        excess = mpmath.fsum(mpmath.expm1(rate * (mpmath.mpf(float(v)) - m)) for v in row)
        out.append(float(m + mpmath.log1p(excess / len(row)) / rate))
    return np.array(out)


@pytest.mark.parametrize("r", LSE_RS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_lse_accurate_for_every_r(dtype, r):
    """Against a 60-digit reference on the same (rounded) values. Bound: the evaluation rounds
    each term a few times and sums N of them: (8 + log2 N) eps * (|max| + spread) in the
    compute dtype (float32 for bfloat16, which then adds half an ulp of bfloat16 of |result|).
    A float r beyond the dtype's range acts as its largest finite value (max pooling to
    working precision); one below it as 0 (average pooling to working precision)."""
    maps = torch.from_numpy(np.random.default_rng(11).standard_normal((2, 3, 4, 5)) * 3)
    x = maps.to(dtype)
    got = log_sum_exp_pool2d(x, r)
    assert got.dtype == dtype and torch.isfinite(got).all()
    flat = x.double().flatten(2).reshape(6, -1).numpy()
    expected = lse_mpmath(flat, r)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    eps = torch.finfo(compute).eps
    scale = np.abs(flat.max(axis=1)) + (flat.max(axis=1) - flat.min(axis=1))
    bound = (8 + np.log2(flat.shape[1])) * eps * scale
    if dtype == torch.bfloat16:
        bound = bound + 0.5 * torch.finfo(dtype).eps * np.abs(expected)
    errors = np.abs(got.double().flatten().numpy() - expected)
    assert np.all(errors <= bound), (errors / bound).max()


@pytest.mark.parametrize("r", [1e-300, 1e-8, 0.5, 3.0, 1e3])
def test_lse_gradcheck_at_every_r(r):
    """gradcheck's finite differences in x and r (r perturbed by 1e-6 even at r = 1e-300,
    where the formula is the average pooling's plus r var/2: it stays defined for r < 0). The
    unchecked form, as the layer calls it: the public one refuses a tensor r <= 0."""
    maps = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    rate = torch.tensor(r, dtype=torch.float64, requires_grad=True)

    def pool(x, rate):
        return _log_sum_exp_pool2d(x, rate, None, False)

    assert gradcheck(pool, (maps, rate))
    if r <= 3.0:  # at r = 1e3 second differences of a near-max are below the check's resolution
        assert gradgradcheck(pool, (maps, rate))


def test_lse_gradient_in_r_at_tiny_r_is_half_the_variance():
    """d/dr (1/r) log mean exp(r x) -> var(x) / 2 as r -> 0 (the second cumulant): the
    gradient keeps its meaning where r x underflows. The r-term (r times the third cumulant)
    is below 1e-299; rounding: both sides sum N squared deviations per row (the layer's from
    the max, mean(d^2) - mean(d)^2, whose terms are up to (max - min)^2), (N + 4) eps64 of
    the sum of their sizes, for each of the two computations."""
    maps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    rate = torch.tensor(1e-300, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_sum_exp_pool2d(maps, rate).sum(), (rate,))
    expected = maps.flatten(2).var(dim=-1, unbiased=False).sum() / 2
    flat = maps.flatten(2).reshape(6, -1).numpy()
    gaps = flat - flat.max(axis=1, keepdims=True)
    size = np.sum(np.mean(gaps**2, axis=1) + np.mean(gaps, axis=1) ** 2) / 2
    torch.testing.assert_close(grad, expected, rtol=0, atol=2 * (16 + 4) * EPS64 * size)


def test_lse_layer_r_min_must_be_representable_in_its_dtype():
    """r_min = 1e-300 underflows to 0 in float32 (the floor would vanish): a clear error;
    float64 parameters hold it, and r near such a floor still gives the average, not NaN."""
    with pytest.raises(ValueError, match=r"r_min=1e-300 underflows in torch.float32"):
        LogSumExpPool2d(r=1.0, r_min=1e-300)
    layer = LogSumExpPool2d(r=2e-300, r_min=1e-300, dtype=torch.float64)
    assert layer.r.item() == pytest.approx(2e-300, rel=softplus_shift_rtol(2e-300, 1e-300, EPS64))
    maps = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = layer(maps)
    out.sum().backward()
    # r (max - min)^2 / 8 < 1e-298 from the mean (Hoeffding): the two float32 roundings only
    values = maps.detach().double().flatten(2).reshape(6, -1).numpy()
    bound = lse_bound(values, EPS32) + mean_bound(values, EPS32)
    gap = (out - maps.detach().mean(dim=(2, 3))).detach().double().reshape(6).numpy()
    np.testing.assert_array_less(np.abs(gap), bound)
    assert torch.isfinite(maps.grad).all() and torch.isfinite(layer.r_raw.grad)


# -- found by an adversarial review (third session) ---------------------------------------------


def test_log_sum_exp_layer_of_float32_params_takes_float64_maps():
    """A float32 layer on float64 maps: the output is float64 (as for the other layers), and it
    is the functional form's with the same r. The layer's r is a float32 value, exactly
    representable in float64, so both run the same float64 operations on the same numbers:
    the tolerance is a few float64 roundings of values of order 1."""
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = LogSumExpPool2d(r=2.5)
    out = layer(x)
    assert out.dtype == torch.float64
    expected = log_sum_exp_pool2d(x, float(layer.r))
    torch.testing.assert_close(out, expected, rtol=8 * EPS64, atol=8 * EPS64)


@pytest.mark.parametrize("r", [-1.0, 0.0, math.nan, math.inf])
def test_functional_log_sum_exp_refuses_a_bad_tensor_r(r):
    """A tensor r is checked like a float one (not a silent soft-min or NaN)."""
    with pytest.raises(ValueError, match="r must be finite and > 0"):
        log_sum_exp_pool2d(torch.randn(1, 2, 3, 3), torch.tensor(r))


@pytest.mark.parametrize("mix", [-0.1, 1.5, math.nan])
def test_functional_mixed_refuses_a_mix_tensor_outside_the_unit_interval(mix):
    with pytest.raises(ValueError, match=r"mix must lie in \[0, 1\]"):
        mixed_max_avg_pool2d(torch.randn(1, 2, 3, 3), torch.tensor(mix))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_mixed_layer_is_finite_near_the_largest_float32(sign):
    """Four values of 3e38 (finite in float32, their sum is not): the mean and the mix stay
    3e38. Each term is divided by the count before the sum (one rounding each), the sum adds
    three roundings and the blend two: well within 16 float32 units of the value."""
    x = torch.full((1, 1, 2, 2), sign * 3e38)
    out = MixedMaxAvgPool2d(mix=0.3)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full((1, 1), sign * 3e38), rtol=16 * EPS32, atol=0)
