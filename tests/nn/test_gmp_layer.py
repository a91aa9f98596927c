"""GeneralizedMaxPool2d and generalized_max_pool2d: numbers, masks, gradients, dtypes, devices,
autocast, torch.compile, state_dict and a training smoke test on the embedded digits."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from gmp_reference import (
    EPS32,
    EPS64,
    auto_solve_bound,
    auto_unit_bound,
    solve_error_bound,
    unit_error_bound,
)
from rounding import assert_rows_within, exp_of_log_rtol
from skpool import GeneralizedMaxPooling
from skpool.nn import GeneralizedMaxPool2d
from skpool.nn.functional import generalized_max_pool2d
from testing_utils import DEVICES


def gmp_reference(maps: np.ndarray, lam: float, normalize: bool = True) -> np.ndarray:
    """Slow float64 reference: one primal solve per sample of channels-first maps (B, C, H, W)."""
    out = []
    for sample in np.asarray(maps, dtype=np.float64):
        phi = sample.reshape(sample.shape[0], -1).T  # (N, C)
        xi = np.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.sum(axis=0))
        if normalize and np.linalg.norm(xi) > 0:
            xi = xi / np.linalg.norm(xi)
        out.append(xi)
    return np.stack(out)


def mean_sq_norm(maps: torch.Tensor) -> float:
    return float(maps.double().square().sum(dim=1).mean())


def stacks_of(maps) -> np.ndarray:
    """Channels-first maps (B, C, H, W) -> float64 stacks (B, N, C) of the same values."""
    maps = torch.as_tensor(maps).detach().cpu().double()
    return maps.flatten(2).transpose(1, 2).numpy()


def output_bounds(stacks, lam, dtype, normalize) -> np.ndarray:
    """Per-sample max-abs error bound of the layer's output (refine_steps="auto", the
    default) against the exact GMP of the same values and lam: float64 within the solve's
    first-order bound, float32 within gmp_reference's "auto" bound; un-normalised outputs
    carry the relative bound times ||xi||."""
    bounds = []
    for phi in stacks:
        if normalize:
            bound = (unit_error_bound(phi, lam, EPS64) if dtype == torch.float64
                     else auto_unit_bound(phi, lam))
        else:
            relative = (solve_error_bound(phi, lam, EPS64) if dtype == torch.float64
                        else auto_solve_bound(phi, lam))
            bound = relative * np.linalg.norm(gmp_reference(phi.T[None, :, :, None], lam, False))
        bounds.append(bound)
    return np.array(bounds)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 6, 4, 5), (3, 24, 3, 2)], ids=["N>C", "N<=C"])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_float64_reference(device, dtype, shape, normalize):
    rng = np.random.default_rng(0)
    maps = rng.standard_normal(shape)
    lam = 0.5 * mean_sq_norm(torch.from_numpy(maps))
    layer = GeneralizedMaxPool2d(
        lam=lam, normalize=normalize, lam_scale="absolute", device=device, dtype=dtype
    )
    x = torch.as_tensor(maps, dtype=dtype, device=device)
    out = layer(x)
    assert out.shape == shape[:2] and out.dtype == dtype and out.device.type == device
    # The reference solves the layer's own values: x as rounded to dtype, and its
    # lam = exp(log lam) in dtype. The layer within its bound, the float64 normal-equations
    # reference within the float64 one (normalised: unit_error_bound; else relative x ||xi||).
    values, layer_lam = x.cpu().double().numpy(), float(layer.lam)
    expected = gmp_reference(values, layer_lam, normalize)
    stacks = stacks_of(values)
    bounds = output_bounds(stacks, layer_lam, dtype, normalize)
    bounds = bounds + output_bounds(stacks, layer_lam, torch.float64, normalize)
    assert_rows_within(out.detach().cpu().numpy(), expected, bounds)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_keeps_its_dtype(dtype):
    """Half-precision maps are solved in float32; only the result is rounded back."""
    maps = torch.randn(3, 8, 4, 4).to(dtype)
    out = generalized_max_pool2d(maps, 2.0)
    assert out.dtype == dtype
    # Exact: the same values solved by the same float32 code in the same shapes.
    torch.testing.assert_close(out, generalized_max_pool2d(maps.float(), 2.0).to(dtype),
                               rtol=0, atol=0)


def test_flatten_false_gives_adaptive_pool_shape():
    maps = torch.randn(2, 5, 3, 3)
    out = GeneralizedMaxPool2d(lam=1.0, flatten=False)(maps)
    assert out.shape == (2, 5, 1, 1)
    # Exact: flatten only reshapes the result of the same computation on the same data.
    torch.testing.assert_close(out[:, :, 0, 0], GeneralizedMaxPool2d(lam=1.0)(maps),
                               rtol=0, atol=0)


@pytest.mark.parametrize("lam_scale", ["absolute", "relative"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lam", [1e-2, 1.0, 1e2])
def test_equals_estimator_transform(dtype, lam, lam_scale):
    """Channels-first layer on x == channels-last estimator on x.permute(0, 2, 3, 1)."""
    rng = np.random.default_rng(1)
    maps_last = np.maximum(rng.standard_normal((6, 5, 4, 7)), 0).astype(dtype)  # (n, H, W, C)
    expected = GeneralizedMaxPooling(
        lam=lam, lam_scale=lam_scale, device="cpu"
    ).fit_transform(maps_last)
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    layer = GeneralizedMaxPool2d(lam=lam, lam_scale=lam_scale, dtype=torch_dtype)
    got = layer(torch.from_numpy(maps_last).permute(0, 3, 1, 2)).detach().numpy()
    assert got.dtype == expected.dtype
    # Two code paths (memory layouts, the layer's lam = exp(log lam) in its dtype): each
    # within its bound of the exact result at its own lam; a relative change d of lam moves
    # xi by at most d relative (lam ||(G + lam I)^-1|| <= 1), the unit output by 2 d.
    stacks = maps_last.reshape(6, 20, 7).astype(np.float64)
    lams = lam * (np.sum(stacks**2, axis=(1, 2)) / 20 if lam_scale == "relative" else 1.0)
    lams = np.broadcast_to(lams, (6,))
    shift = abs(float(layer.lam) - lam) / lam
    bounds = np.array([2 * output_bounds(p[None], l, torch_dtype, True)[0] for p, l in
                       zip(stacks, lams)]) + 2 * shift
    assert_rows_within(got, expected, bounds)


def test_masked_padded_batch_equals_each_image_alone():
    rng = np.random.default_rng(2)
    sizes = [(5, 7), (3, 4), (6, 2), (1, 1)]
    channels, lam = 4, 0.3
    images = [rng.standard_normal((channels, h, w)) for h, w in sizes]
    padded = torch.from_numpy(rng.standard_normal((len(sizes), channels, 6, 7)) * 100)
    mask = torch.zeros(len(sizes), 6, 7, dtype=torch.bool)
    for b, image in enumerate(images):
        h, w = image.shape[1:]
        padded[b, :, :h, :w] = torch.from_numpy(image)
        mask[b, :h, :w] = True
    layer = GeneralizedMaxPool2d(lam=lam, lam_scale="absolute", dtype=torch.float64)
    layer_lam = float(layer.lam)  # exp(log 0.3) in float64
    batched = layer(padded, mask=mask).detach()
    for b, image in enumerate(images):
        alone = layer(torch.from_numpy(image)[None]).detach()
        # Padded and masked (42 locations, the zero-filled stack's sums) vs alone: two code
        # paths, each within its bound; against the reference, each within its own.
        phi = stacks_of(image[None])[0]
        padded_phi = np.zeros((42, channels))
        padded_phi[: len(phi)] = phi
        bound = unit_error_bound(phi, layer_lam, EPS64) + unit_error_bound(
            padded_phi, layer_lam, EPS64)
        assert float((batched[b] - alone[0]).abs().max()) <= bound
        assert_rows_within(alone.numpy(), gmp_reference(image[None], layer_lam),
                      np.array([2 * unit_error_bound(phi, layer_lam, EPS64)]))
    # The padding is ignored exactly: pooling without the mask gives something else.
    assert not torch.allclose(layer(padded).detach(), batched)


def test_all_false_mask_pools_to_zero():
    maps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[1] = False
    out = generalized_max_pool2d(maps, 1.0, mask=mask)
    # Exact: a sample without valid locations pools to zero by construction (documented).
    assert torch.equal(out[1], torch.zeros(3, dtype=torch.float64))
    assert torch.all(out[0] != 0)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (2, 7, 2, 2)], ids=["N>C", "N<=C"])
def test_gradcheck_input_and_lam(normalize, shape):
    torch.manual_seed(0)
    maps = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    log_lam = torch.tensor(math.log(0.7), dtype=torch.float64, requires_grad=True)

    def pool(x, theta):
        return generalized_max_pool2d(x, theta.exp(), normalize=normalize)

    assert gradcheck(pool, (maps, log_lam))
    assert gradgradcheck(pool, (maps, log_lam))


def test_gradcheck_per_sample_lam_and_mask():
    torch.manual_seed(1)
    maps = torch.randn(3, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.2, 1.0, 5.0], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 2, 3, dtype=torch.bool)
    mask[0, 1] = False
    mask[2, :, 2] = False

    def pool(x, lam_per_sample):
        return generalized_max_pool2d(x, lam_per_sample, mask=mask)

    assert gradcheck(pool, (maps, lam))
    assert gradgradcheck(pool, (maps, lam))


def test_gradcheck_through_module_parameter():
    torch.manual_seed(2)
    layer = GeneralizedMaxPool2d(lam=0.5, dtype=torch.float64)
    maps = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)

    def pool(x, theta):
        return torch.func.functional_call(layer, {"log_lam": theta}, (x,))

    theta = layer.log_lam.detach().clone().requires_grad_()
    assert gradcheck(pool, (maps, theta))
    assert gradgradcheck(pool, (maps, theta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 16, 3, 3), (4, 8, 6, 6)], ids=["N<=C", "N>C"])
@pytest.mark.parametrize("relative_lam", [1e-6, 1.0, 1e6])
def test_gradients_finite_small_lam_and_zero_descriptors(dtype, shape, relative_lam):
    """ReLU maps with dead locations, a dead channel and an all-zero sample; λ from
    1e-6·mean‖φ‖² up."""
    torch.manual_seed(3)
    maps = torch.relu(torch.randn(*shape, dtype=dtype))
    maps[0, 2] = 0  # a dead channel
    maps[1] = 0  # all descriptors zero
    maps[2, :, :2] = 0  # dead locations
    maps.requires_grad_(True)
    layer = GeneralizedMaxPool2d(lam=relative_lam, lam_scale="relative", dtype=dtype)
    for normalize in (True, False):
        layer.normalize = normalize
        out = layer(maps)
        grad_x, grad_theta = torch.autograd.grad(
            (out * torch.linspace(-1, 1, shape[1], dtype=dtype)).sum(), (maps, layer.log_lam)
        )
        assert torch.isfinite(out).all()
        assert torch.equal(out[1], torch.zeros_like(out[1]))  # all-zero pools to 0: by design
        assert torch.isfinite(grad_x).all() and torch.isfinite(grad_theta)
        assert grad_x[0].abs().sum() > 0


def test_small_lam_equalises_similarities():
    """λ → 0 with N <= C: Φξ = 1 (before normalisation), the defining property of GMP."""
    torch.manual_seed(4)
    maps = torch.randn(2, 12, 2, 3, dtype=torch.float64)
    lam = 1e-6 * mean_sq_norm(maps)
    xi = generalized_max_pool2d(maps, lam, normalize=False)
    similarities = torch.einsum("bcn,bc->bn", maps.flatten(2), xi)
    for phi, x, s in zip(stacks_of(maps), xi.numpy(), similarities.numpy()):
        # Exactly Phi xi = 1 - lam (Phi Phi^T + lam I)^-1 1, off by <= lam sqrt(N) /
        # (sigma_min^2 + lam); rounding: ||Phi|| ||xi|| times xi's relative bound, and the
        # C-term products of the check.
        exact = lam * np.sqrt(len(phi)) / (np.linalg.eigvalsh(phi @ phi.T)[0] + lam)
        rounding = np.linalg.norm(phi, 2) * np.linalg.norm(x) * solve_error_bound(phi, lam, EPS64)
        rounding += phi.shape[1] * EPS64 * (np.abs(phi) @ np.abs(x)).max()
        np.testing.assert_allclose(s, 1.0, rtol=0, atol=exact + rounding)


def test_lam_parametrisation_initialises_and_stays_positive():
    layer = GeneralizedMaxPool2d(lam=123.0)
    assert layer.lam.item() == pytest.approx(123.0, rel=exp_of_log_rtol(123.0, EPS32))
    maps = torch.randn(2, 3, 4, 4)
    maps[1] = 0  # all-zero descriptors: the smallest λ must still give a solvable system
    maps.requires_grad_(True)
    for theta in (1e4, -1e4, 80.0, -80.0):
        with torch.no_grad():
            layer.log_lam.fill_(theta)
        assert torch.isfinite(layer.lam) and layer.lam > 0
        out = layer(maps)
        grad_x, grad_theta = torch.autograd.grad(out[:, 0].sum(), (maps, layer.log_lam))
        assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
        assert torch.isfinite(grad_theta)
    assert isinstance(layer.log_lam, torch.nn.Parameter)
    fixed = GeneralizedMaxPool2d(lam=2.0, learnable=False)
    assert list(fixed.parameters()) == [] and "log_lam" in fixed.state_dict()


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf"), 1e40])
def test_invalid_lam_raises(lam):
    with pytest.raises(ValueError, match="lam"):
        GeneralizedMaxPool2d(lam=lam)
    if lam != 1e40:
        with pytest.raises(ValueError, match="lam"):
            generalized_max_pool2d(torch.randn(1, 2, 2, 2), lam)


def test_invalid_input_raises():
    layer = GeneralizedMaxPool2d()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        layer(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 3, 4, 4), mask=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 3, 4, 4), mask=torch.ones(2, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        generalized_max_pool2d(torch.randn(2, 3, 4, 4), torch.ones(3))


def test_extra_repr():
    text = repr(GeneralizedMaxPool2d(lam=10.0, learnable=False, flatten=False))
    assert text == (
        "GeneralizedMaxPool2d(lam=10, lam_scale='relative', learnable=False, normalize=True, "
        "flatten=False, refine_steps='auto')"
    )


def test_autocast_cpu_bfloat16_solves_in_float32():
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(3, 16, 3)
    layer = GeneralizedMaxPool2d(lam=1.0)
    images = torch.randn(4, 3, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = conv(images)
        out = layer(maps)
    assert maps.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    # The same bfloat16 maps pooled in float32 outside autocast, rounded to bfloat16 at the end.
    expected = layer(maps.detach().float()).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().square().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    assert torch.isfinite(layer.log_lam.grad)


def test_torch_compile_fullgraph_matches_eager():
    """No graph break: ``fullgraph=True`` raises on one. aot_eager traces forward and backward
    through AOTAutograd without the minutes of a C++ build (inductor: the slow test below)."""
    torch.manual_seed(6)
    layer = GeneralizedMaxPool2d(lam=3.0)
    maps = torch.randn(4, 8, 5, 5)
    mask = torch.rand(4, 5, 5) > 0.2
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    _assert_compiled_matches(layer, compiled, maps, mask)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_torch_compile_inductor_matches_eager():
    """In the machine's own instruction set inductor's vectorised code is tested. Where ATen's
    dispatch is forced below it (``ATEN_CPU_CAPABILITY``, CI's narrower floating-point
    environment), inductor still emits vector code for the machine's own width, which torch
    2.13 gets wrong there: ``default`` on an AVX2 machine does not compile (the headers of that
    level lack ``at::vec::Vectorized``), ``avx2`` on an AVX-512 Xeon gave NaN from its
    vectorised ``frexp`` kernel; scalar code (``cpp.simdlen=1``) there.

    The native run also guards against a heap corruption that inductor's AVX-512 code caused
    when the layer's ridge floor went through ``torch.maximum`` under autograd (whose backward
    saved two boolean masks): this test aborted in ``malloc`` then. The floor is now applied
    without autograd (``_RidgeSolve`` takes dD/dlam instead)."""
    import os

    import torch._inductor.config as inductor_config

    torch.manual_seed(7)
    layer = GeneralizedMaxPool2d(lam=3.0)
    scalar = (torch.backends.cpu.get_cpu_capability() == "DEFAULT"
              or "ATEN_CPU_CAPABILITY" in os.environ)
    with inductor_config.patch({"cpp.simdlen": 1} if scalar else {}):
        compiled = torch.compile(layer, fullgraph=True)
        _assert_compiled_matches(layer, compiled, torch.randn(4, 8, 5, 5), None)
    torch._dynamo.reset()


def _assert_compiled_matches(layer, compiled, maps, mask):
    """Compiled and eager code are two code paths (decomposed ops, and "auto" refinement
    means no refinement while tracing): the outputs agree within two float32 solve bounds
    (unit vectors, the ridge lam times each sample's mean squared norm over its valid
    locations). The gradients solve the same systems again (the adjoint) and multiply by
    Phi: their relative error obeys the same first-order bound, doubled by the
    normalisation's derivative, per computation."""
    grads = []
    for module in (layer, compiled):
        x = maps.clone().requires_grad_()
        out = module(x, mask)
        grad_x, grad_theta = torch.autograd.grad(out[:, 0].sum(), (x, layer.log_lam))
        grads.append((out, grad_x, grad_theta))
    stacks = stacks_of(maps)
    valid = (np.ones(stacks.shape[:2], dtype=bool) if mask is None
             else mask.flatten(1).numpy())
    lam = float(layer.lam)
    units, relatives = [], []
    for phi, keep in zip(stacks, valid):
        phi = phi[keep]
        lam_b = lam * np.sum(phi**2) / len(phi)
        units.append(unit_error_bound(phi, lam_b, EPS32))
        relatives.append(solve_error_bound(phi, lam_b, EPS32))
    (out_e, gx_e, gt_e), (out_c, gx_c, gt_c) = grads
    errors = (out_c - out_e).detach().abs().amax(dim=1).double().numpy()
    assert np.all(errors <= 2 * np.array(units)), (errors / np.array(units)).max()
    gradient_rtol = 2 * 2 * 2 * max(relatives)  # two paths x normalisation x forward+adjoint
    for traced, eager in ((gx_c, gx_e), (gt_c, gt_e)):
        difference = float((traced - eager).double().norm())
        assert difference <= gradient_rtol * float(eager.double().norm()) + 1e-30


def test_state_dict_round_trip():
    layer = GeneralizedMaxPool2d(lam=5.0)
    with torch.no_grad():
        layer.log_lam.add_(0.25)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    reloaded = GeneralizedMaxPool2d()
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    # float32 theta = fl(fl(log 5) + 0.25): two roundings of theta, then exp
    expected = 5.0 * math.exp(0.25)
    rtol = exp_of_log_rtol(5.0, EPS32) + exp_of_log_rtol(expected, EPS32)
    assert reloaded.lam.item() == pytest.approx(expected, rel=rtol)
    maps = torch.randn(2, 3, 4, 4)
    # Exact: the same theta bits, the same code on the same data (deterministic).
    torch.testing.assert_close(reloaded(maps), layer(maps), rtol=0, atol=0)


@pytest.mark.slow
def test_learns_digits_and_moves_lam():
    """A tiny CNN ending in GeneralizedMaxPool2d learns the embedded 8x8 digits; λ is trained."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.tensor(labels)
    order = torch.randperm(len(labels))
    train, test = order[:1400], order[1400:]
    pool = GeneralizedMaxPool2d()  # lam = 1 x the mean squared descriptor norm
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        pool,
        torch.nn.Linear(32, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):
        for batch in train[torch.randperm(len(train))].split(64):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(dim=1) == labels[test]).float().mean().item()
    assert accuracy > 0.8  # chance: 0.1
    assert abs(math.log(pool.lam.item())) > 1e-3  # theta moved by training, far above eps32


def test_refine_steps_recover_float64_accuracy_at_tiny_lambda():
    """The module's refine_steps="auto" (the default) matches the float64 layer in eval mode
    where plain float32 (refine_steps=0) does not; in training mode "auto" is the plain
    float32 solve (no host decision in the training step)."""
    from skpool._core.gmp import AUTO_REFINE_TOLERANCE

    torch.manual_seed(1)
    x = torch.randn(4, 64, 8, 8)  # N = C = 64
    lam = 1e-6 * float(x.double().square().sum(1).mean())
    kwargs = {"learnable": False, "lam_scale": "absolute"}
    layer64 = GeneralizedMaxPool2d(lam, dtype=torch.float64, **kwargs)
    exact = layer64(x.double())
    plain = GeneralizedMaxPool2d(lam, refine_steps=0, **kwargs)(x)
    layer32 = GeneralizedMaxPool2d(lam, **kwargs)  # refine_steps="auto", the default
    assert torch.equal(layer32(x), plain)  # training mode: the same plain solve
    refined = layer32.eval()(x)
    # plain float32 misses AUTO_REFINE_TOLERANCE (the accuracy "auto" accepts unrefined)
    assert (plain.double() - exact).norm(dim=1).max() > AUTO_REFINE_TOLERANCE
    # "auto" within gmp_reference.auto_unit_bound at its own lam (exp(log lam) in
    # float32), the float64 layer within its bound at its own; the two lams differ by a
    # relative d, which moves the unit output by at most 2 d.
    lam32, lam64 = float(layer32.lam), float(layer64.lam)
    shift = 2 * abs(lam32 - lam64) / lam64
    stacks = stacks_of(x)
    bounds = np.array([auto_unit_bound(phi, lam32) + unit_error_bound(phi, lam64, EPS64)
                       for phi in stacks]) + shift
    assert_rows_within(refined.double().numpy(), exact.numpy(), bounds)
    with pytest.raises(ValueError, match="refine_steps"):
        GeneralizedMaxPool2d(refine_steps=-1)
