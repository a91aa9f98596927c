"""SeparabilityPool2d and separability_pool2d: numbers against a float64 reference and against
SeparabilityPooling.transform, gradients, buffers vs parameters, errors, state_dict."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from torch.autograd import gradcheck, gradgradcheck

from rounding import EPS32, EPS64, EPSBF16, eps
from separability_reference import pooling_bound
from skpool import SeparabilityPooling
from skpool.nn import SeparabilityPool2d
from skpool.nn.functional import separability_pool2d
from testing_utils import DEVICES


def separability_reference(maps, operator, mean=None, scale=None, output_shape=None):
    """Slow float64 reference with explicit loops: (B, C, H, W) -> (B, k*C, H', W')."""
    maps = np.asarray(maps, dtype=np.float64)
    batch, channels = maps.shape[:2]
    n_components, n_out, _ = operator.shape
    mean = np.zeros(channels) if mean is None else mean
    scale = np.ones(channels) if scale is None else scale
    out = np.empty((batch, n_components * channels, n_out))
    for b in range(batch):
        for c in range(channels):
            g = (maps[b, c].reshape(-1) - mean[c]) / scale[c]
            for j in range(n_components):
                for m in range(n_out):
                    out[b, j * channels + c, m] = operator[j, m] @ g * scale[c] + mean[c]
    return out.reshape(batch, n_components * channels, *output_shape)


def stacks_of(maps) -> np.ndarray:
    """Channels-first maps (B, C, H, W) -> float64 stacks (B, N, C) of the same values."""
    maps = np.asarray(maps, dtype=np.float64)
    return maps.reshape(*maps.shape[:2], -1).transpose(0, 2, 1)


def random_layer_inputs(seed=0, n_components=2, channels=3, grid=(4, 5), out=(2, 3)):
    rng = np.random.default_rng(seed)
    operator = rng.standard_normal((n_components, out[0] * out[1], grid[0] * grid[1]))
    mean = rng.standard_normal(channels)
    scale = rng.uniform(0.5, 2.0, channels)
    maps = rng.standard_normal((2, channels, *grid)) * 3 + 1
    return maps, operator, mean, scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_stats", [True, False])
def test_matches_float64_reference(device, dtype, with_stats):
    maps, operator, mean, scale = random_layer_inputs()
    if not with_stats:
        mean = scale = None
    layer = SeparabilityPool2d(
        operator, mean, scale, output_shape=(2, 3), grid_shape=(4, 5), device=device, dtype=dtype
    )
    x = torch.as_tensor(maps, dtype=dtype, device=device)
    out = layer(x)
    assert out.shape == (2, 6, 2, 3) and out.dtype == dtype and out.device.type == device
    # The reference on the same (rounded) maps with the float64 operator and statistics: the
    # layer within the pooling product's bound in its dtype (the operator's and the mean's
    # rounding to it included), the float64 reference within the float64 one.
    values = x.cpu().double().numpy()
    stacks = stacks_of(values)
    bound = (pooling_bound(stacks, operator, mean, scale, eps(dtype))
             + pooling_bound(stacks, operator, mean, scale, EPS64))
    np.testing.assert_allclose(
        out.cpu().double().numpy(),
        separability_reference(values, operator, mean, scale, (2, 3)),
        rtol=0,
        atol=bound,
    )


def test_output_keeps_input_dtype():
    maps, operator, mean, scale = random_layer_inputs()
    layer = SeparabilityPool2d(operator, mean, scale, output_shape=(2, 3))  # float32 buffers
    assert layer(torch.from_numpy(maps)).dtype == torch.float64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "params",
    [
        {"stride": 2},
        {"stride": 2, "n_components": 2, "normalize_channels": False, "norm": "l1"},
        {"output_shape": (2, 2), "dtype": "float32"},
    ],
)
def test_from_estimator_equals_transform(dtype, params):
    """Channels-first layer on x == channels-last estimator.transform on x.permute(0, 2, 3, 1)."""
    rng = np.random.default_rng(3)
    labels = np.arange(40) % 3
    maps_last = (rng.standard_normal((40, 6, 5, 4)) + labels[:, None, None, None]).astype(dtype)
    estimator = SeparabilityPooling(alpha=0.5, device="cpu", **params).fit(maps_last, labels)
    expected = estimator.transform(maps_last)  # (n, H', W', k*C)
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    layer = SeparabilityPool2d.from_estimator(estimator, dtype=torch_dtype)
    assert isinstance(layer.operator, torch.Tensor) and not layer.trainable
    got = layer(torch.from_numpy(maps_last).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape and got.dtype == expected.dtype
    # Two code paths (memory layouts), each within the pooling product's bound in the dtype.
    channel_mean = getattr(estimator, "channel_mean_", None)
    channel_scale = getattr(estimator, "channel_scale_", None)
    if not params.get("normalize_channels", True):
        channel_mean = channel_scale = None
    bound = 2 * pooling_bound(maps_last.reshape(40, 30, 4), estimator.operator_,
                              channel_mean, channel_scale, eps(dtype))
    np.testing.assert_allclose(got, expected, rtol=0, atol=bound)


def test_from_estimator_refuses_an_unfitted_estimator():
    with pytest.raises(NotFittedError, match="fit"):
        SeparabilityPool2d.from_estimator(SeparabilityPooling())


def test_from_estimator_trainable_does_not_alias_the_estimator():
    rng = np.random.default_rng(4)
    labels = np.arange(20) % 2
    maps_last = rng.standard_normal((20, 4, 4, 2)) + labels[:, None, None, None]
    estimator = SeparabilityPooling(device="cpu").fit(maps_last, labels)
    saved = estimator.operator_.copy()
    layer = SeparabilityPool2d.from_estimator(estimator, trainable=True, dtype=torch.float64)
    assert {name for name, _ in layer.named_parameters()} == {
        "operator", "channel_mean", "channel_scale"
    }
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.from_numpy(maps_last).permute(0, 3, 1, 2)).square().sum().backward()
    optimizer.step()
    # Moved by the SGD step (lr 0.1 times gradients of the outputs' size), far beyond
    # allclose's default rtol 1e-5 of a rounding-level change
    assert not np.allclose(layer.operator.detach().numpy(), saved)
    np.testing.assert_array_equal(estimator.operator_, saved)  # never written: exact


def test_buffers_by_default_parameters_when_trainable():
    _, operator, mean, scale = random_layer_inputs()
    frozen = SeparabilityPool2d(operator, mean, scale, output_shape=(2, 3))
    assert list(frozen.parameters()) == []
    assert set(frozen.state_dict()) == {"operator", "channel_mean", "channel_scale"}
    trainable = SeparabilityPool2d(operator, mean, scale, trainable=True, output_shape=(2, 3))
    assert {name for name, _ in trainable.named_parameters()} == set(frozen.state_dict())
    no_stats = SeparabilityPool2d(operator, output_shape=(2, 3), trainable=True)
    assert set(no_stats.state_dict()) == {"operator"}


def test_gradcheck_input_operator_and_statistics():
    maps, operator, mean, scale = random_layer_inputs(n_components=2, grid=(2, 3), out=(1, 2))
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True)
               for a in (maps, operator, mean, scale)]

    def pool(x, op, mu, sigma):
        return separability_pool2d(x, op, (1, 2), mu, sigma)

    assert gradcheck(pool, tensors)
    assert gradgradcheck(pool, tensors)


def test_gradcheck_through_trainable_module():
    maps, operator, mean, scale = random_layer_inputs(n_components=1, grid=(2, 2), out=(1, 1))
    layer = SeparabilityPool2d(
        operator, mean, scale, trainable=True, output_shape=(1, 1), dtype=torch.float64
    )
    names = [name for name, _ in layer.named_parameters()]
    x = torch.tensor(maps, requires_grad=True)

    def pool(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert gradcheck(pool, (x, *params))
    assert gradgradcheck(pool, (x, *params))


def test_wrong_grid_raises_clear_error():
    maps, operator, mean, scale = random_layer_inputs(grid=(4, 5))
    layer = SeparabilityPool2d(operator, mean, scale, output_shape=(2, 3), grid_shape=(4, 5))
    with pytest.raises(ValueError, match="fitted on a 4x5 grid; got input of spatial size 5x4"):
        layer(torch.randn(2, 3, 5, 4))  # same number of locations, another grid
    with pytest.raises(ValueError, match="20 locations.*6x6"):
        SeparabilityPool2d(operator, mean, scale, output_shape=(2, 3))(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="fitted on 3 channels.*4 channels"):
        layer(torch.randn(2, 4, 4, 5))


def test_invalid_construction_raises():
    _, operator, mean, scale = random_layer_inputs()
    with pytest.raises(ValueError, match="output_shape"):
        SeparabilityPool2d(operator, output_shape=(3, 3))
    with pytest.raises(ValueError, match="grid_shape"):
        SeparabilityPool2d(operator, output_shape=(2, 3), grid_shape=(4, 4))
    with pytest.raises(ValueError, match="both"):
        SeparabilityPool2d(operator, mean, output_shape=(2, 3))
    with pytest.raises(ValueError, match=r"\(C,\)"):
        SeparabilityPool2d(operator, mean, scale[:2], output_shape=(2, 3))
    with pytest.raises(ValueError, match=r"\(k, M, N\)"):
        SeparabilityPool2d(operator[0], output_shape=(2, 3))
    with pytest.raises(TypeError):
        SeparabilityPool2d(operator)  # output_shape is required


def test_state_dict_round_trip():
    maps, operator, mean, scale = random_layer_inputs()
    layer = SeparabilityPool2d(operator, mean, scale, output_shape=(2, 3), grid_shape=(4, 5))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = SeparabilityPool2d(
        np.zeros_like(operator), np.zeros(3), np.ones(3), output_shape=(2, 3), grid_shape=(4, 5)
    )
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.as_tensor(maps, dtype=torch.float32)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)  # same code, same data


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("saved_with_stats", [True, False])
def test_state_dict_loads_into_a_layer_built_from_the_operator_shape_alone(
    saved_with_stats, trainable
):
    """Issue 16: a layer built with the operator's shape and no statistics (their length C is
    not known then) accepts the state_dict of a layer fitted with or without them, through a
    file, and then computes what the saved layer computes (buffers or parameters, as asked)."""
    maps, operator, mean, scale = random_layer_inputs()
    stats = (mean, scale) if saved_with_stats else (None, None)
    layer = SeparabilityPool2d(operator, *stats, output_shape=(2, 3), grid_shape=(4, 5))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = SeparabilityPool2d(
        np.zeros_like(operator), trainable=trainable, output_shape=(2, 3), grid_shape=(4, 5)
    )
    result = fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    assert set(fresh.state_dict()) == set(layer.state_dict())
    if trainable:
        assert {name for name, _ in fresh.named_parameters()} == set(layer.state_dict())
    x = torch.as_tensor(maps, dtype=torch.float32)
    # Parameters and buffers may take different kernels: compare within the rounding of a
    # float32 sum of N products, N eps32 sum|terms| (x2 for the mean taken off and put back).
    n_in = operator.shape[-1]
    terms = np.abs(operator).sum(axis=-1).max() * (np.abs(maps).max() + np.abs(mean).max())
    tolerance = 2 * n_in * np.finfo(np.float32).eps * terms
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=tolerance)
    again = SeparabilityPool2d(np.zeros_like(operator), output_shape=(2, 3))
    again.load_state_dict(fresh.state_dict())  # and its own state, once more
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=tolerance)


def test_state_dict_with_bad_statistics_is_refused():
    _, operator, mean, scale = random_layer_inputs()
    state = SeparabilityPool2d(operator, mean, scale, output_shape=(2, 3)).state_dict()
    state["channel_scale"] = -state["channel_scale"]
    with pytest.raises(RuntimeError, match="channel_scale must be > 0"):
        SeparabilityPool2d(np.zeros_like(operator), output_shape=(2, 3)).load_state_dict(state)
    state = SeparabilityPool2d(operator, mean, scale, output_shape=(2, 3)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for channel_mean"):
        SeparabilityPool2d(operator, np.zeros(5), np.ones(5), output_shape=(2, 3)).load_state_dict(
            state
        )


def test_autocast_cpu_bfloat16_and_compile():
    maps, operator, mean, scale = random_layer_inputs()
    layer = SeparabilityPool2d(operator, mean, scale, output_shape=(2, 3), grid_shape=(4, 5))
    x = torch.as_tensor(maps, dtype=torch.float32)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    # bfloat16 input and products (accumulated in float32): the pooling bound at eps_bf16
    # with one more rounding of the same size for the input's rounding to bfloat16, plus
    # the float32 result's own bound.
    stacks = stacks_of(maps)
    products = np.einsum("kmn,bnc->bkmc", np.abs(operator), np.abs(stacks - mean)).max()
    bound = (pooling_bound(stacks, operator, mean, scale, EPSBF16, accumulation_eps=EPS32)
             + EPSBF16 * products + pooling_bound(stacks, operator, mean, scale, EPS32))
    torch.testing.assert_close(low.float(), expected, rtol=0, atol=bound)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    # compiled vs eager: two code paths, each within the float32 bound
    torch.testing.assert_close(compiled(x), expected, rtol=0,
                               atol=2 * pooling_bound(stacks, operator, mean, scale, EPS32))
    torch._dynamo.reset()


def test_extra_repr():
    _, operator, mean, scale = random_layer_inputs()
    text = repr(SeparabilityPool2d(operator, mean, scale, output_shape=(2, 3), grid_shape=(4, 5)))
    assert text == (
        "SeparabilityPool2d(n_components=2, grid_shape=4x5 (20 locations), output_shape=2x3, "
        "channel_statistics=True, trainable=False)"
    )
