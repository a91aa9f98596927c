"""ResNet-18: shapes, the strided baseline's widths, the shortcut at a learned pooling point."""

import pickle

import pytest
import torch
import torch.nn.functional as torch_F

from skpool.models import GLOBAL_POOLINGS, LearnedPool2d, ResNet18
from skpool.nn import SeparabilityPool2d
from models.helpers import random_layer

TINY = {"in_channels": 1, "width_multiplier": 1 / 16, "input_size": (16, 16)}  # widths 4..32
#: The grids the three downsampling points receive on a 16x16 input.
POINT_GRIDS = [(16, 16), (8, 8), (4, 4)]


def filled(net, k, seed=0, stats=False):
    """Install random separability operators at every "separability" point."""
    for point, pooling in enumerate(net.stage_pooling):
        if pooling == "separability":
            channels = net._stage_channels(point) if stats else None
            net.set_separability_pool(
                point, random_layer(k, POINT_GRIDS[point], seed + point, channels)
            )
    return net


@pytest.mark.parametrize("pooling", ["strided", "avg", "max", "separability", "sgd"])
@pytest.mark.parametrize("global_pool", GLOBAL_POOLINGS)
def test_resnet_forward_backward_shapes(pooling, global_pool):
    net = filled(ResNet18(**TINY, stage_pooling=pooling, global_pool=global_pool, lam=1.0), 2)
    x = torch.randn(3, 16, 16)
    out = net(x)
    assert out.shape == (3, 10)
    out.logsumexp(1).sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def block_outputs(net, x):
    shapes = []
    hooks = [layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for layer in (net.stem, net.layer1, net.layer2, net.layer3, net.layer4)]
    net(x)
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("pooling", ["avg", "max", "separability", "sgd"])
@pytest.mark.parametrize("k", [1, 2])
def test_resnet_keeps_the_strided_widths(pooling, k):
    """Every stage has the strided network's channels and grid; parameters differ only in the
    convolutions before a k-component pooling (conv1 and the shortcut's 1x1 conv give out/k
    channels, bn1 follows conv1) and in the learned operators."""
    strided = ResNet18(**TINY)
    other = filled(ResNet18(**TINY, stage_pooling=pooling, n_components=k), k)
    x = torch.randn(2, 1, 16, 16)
    assert block_outputs(other, x) == block_outputs(strided, x) == [
        (4, 16, 16), (4, 16, 16), (8, 8, 8), (16, 4, 4), (32, 2, 2)]
    k_eff = k if pooling in ("separability", "sgd") else 1
    expected = {}
    for name, value in strided.named_parameters():
        shape = tuple(value.shape)
        if name.split(".")[0] in ("layer2", "layer3", "layer4") and name.split(".")[1] == "0":
            if name.endswith(("conv1.weight", "bn1.weight", "bn1.bias", "shortcut_conv.weight")):
                shape = (shape[0] // k_eff, *shape[1:])
        expected[name] = shape
    if pooling == "sgd":
        for point, grid in enumerate(POINT_GRIDS):
            m = (grid[0] // 2) * (grid[1] // 2)
            expected[f"layer{point + 2}.0.pool.operator"] = (k, m, grid[0] * grid[1])
    assert {name: tuple(v.shape) for name, v in other.named_parameters()} == expected
    # the strided network's downsampling convolutions have stride 2; the others stride 1
    for block in (other.layer2[0], other.layer3[0], other.layer4[0]):
        assert block.conv1.stride == block.shortcut_conv.stride == (1, 1)
    assert strided.layer2[0].conv1.stride == strided.layer2[0].shortcut_conv.stride == (2, 2)


def reference_block(block, x, operator, stats=None):
    """A float64 reference of a downsampling block with operator P (k, M, N): the main path
    pools relu(bn1(conv1 x)) with P (and the channel statistics, if any), the shortcut pools
    conv_s(x) with P alone; both land on the same (H', W') grid."""
    out_grid = block.pool.output_shape

    def pool(maps, mean=None, scale=None):
        batch, channels = maps.shape[:2]
        flat = maps.flatten(2)
        if mean is not None:
            flat = (flat - mean[:, None]) / scale[:, None]
        pooled = torch.einsum("jmn,bcn->bjcm", operator, flat)
        if mean is not None:
            pooled = pooled * scale[:, None] + mean[:, None]
        return pooled.reshape(batch, -1, *out_grid)

    main_pooled = pool(torch.relu(block.bn1(block.conv1(x))), *(stats or ()))
    main = block.bn2(block.conv2(main_pooled))
    shortcut_pooled = pool(block.shortcut_conv(x))
    shortcut = block.shortcut_bn(shortcut_pooled)
    assert main.shape == shortcut.shape  # same channels, same grid
    return torch.relu(main + shortcut), main_pooled.shape, shortcut_pooled.shape


EPS64 = torch.finfo(torch.float64).eps


def _abs_bn(bn, magnitude):
    """|bn(x)| <= (|x| + |running_mean|) |gamma| / sqrt(running_var + eps) + |beta| (eval)."""
    scale = (bn.weight.abs() / (bn.running_var + bn.eps).sqrt())[:, None, None]
    return (magnitude + bn.running_mean.abs()[:, None, None]) * scale + bn.bias.abs()[:, None, None]


def _abs_pool(operator, magnitude, stats=None):
    """|pool(maps)| bound: |P| (|maps| + |mu|) (+ |mu|), the reference's layout."""
    channels = magnitude.shape[1]
    flat = magnitude.flatten(2)
    mean = torch.zeros(channels, dtype=flat.dtype) if stats is None else stats[0].abs()
    pooled = torch.einsum("jmn,bcn->bjcm", operator.abs(), flat + mean[:, None])
    return pooled + mean[:, None]


def block_rounding_bound(block, x, operator, stats=None):
    """Elementwise bound on |block(x) - reference_block(...)|: both compute the same float64
    function (the same modules around two implementations of the pooling), so each is within
    D eps64 of the exact result times the "absolute" network (every weight, mean and input by
    its magnitude; relu is 1-Lipschitz and |relu(v)| <= |v|), with D the longest chain of
    roundings: the pooling's N-term sums and 5 operations, conv2's 9 C taps, two batch norms
    (4 each) and the sum (Higham's gamma bounds for compositions, first order)."""
    out_grid = block.pool.output_shape
    with torch.no_grad():
        main_in = block.pool_input(x).abs()
        short_in = block.shortcut_conv(x).abs()
        pooled = _abs_pool(operator, main_in, stats).reshape(len(x), -1, *out_grid)
        conv = torch_F.conv2d(pooled, block.conv2.weight.abs(), padding=1)
        main = _abs_bn(block.bn2, conv)
        short = _abs_pool(operator, short_in).reshape(len(x), -1, *out_grid)
        magnitude = main + _abs_bn(block.shortcut_bn, short)
    n_locations = operator.shape[-1]
    depth = n_locations + 5 + 9 * block.conv2.in_channels + 4 + 4 + 1
    return 2 * depth * EPS64 * magnitude


def pool_gradient_bound(block, x, operator):
    """Elementwise bound on the difference of two float64 computations of d sum(block(x)) /
    dP (the "sgd" point, no statistics): the gradient is sum_{b,c} G[b, c, m] maps[b, c, n]
    over both paths, with |G| <= conv2^T(|W2|) |gamma2| / sqrt(var2 + eps) on the main path
    and |gamma_s| / sqrt(var_s + eps) on the shortcut (relu' <= 1); the longest chain of
    roundings: conv2's transposed taps (9 C), the batch norms (4), the B C-term sum (and the
    relu masks, which coincide unless an output is within rounding of 0)."""
    with torch.no_grad():
        main_in = block.pool_input(x).abs().flatten(2)  # (B, C, N)
        short_in = block.shortcut_conv(x).abs().flatten(2)
        scale2 = (block.bn2.weight.abs() / (block.bn2.running_var + block.bn2.eps).sqrt())
        scale_s = (block.shortcut_bn.weight.abs()
                   / (block.shortcut_bn.running_var + block.shortcut_bn.eps).sqrt())
        out_shape = (len(x), block.conv2.out_channels, *block.pool.output_shape)
        upstream = scale2[None, :, None, None].expand(out_shape)
        main_grad = torch_F.conv_transpose2d(upstream, block.conv2.weight.abs(), padding=1)
        k = operator.shape[0]
        channels = main_in.shape[1]
        main_grad = main_grad.reshape(len(x), k, channels, -1)  # (B, k, C, M)
        short_grad = scale_s.reshape(k, channels)[None, :, :, None].expand_as(main_grad)
        magnitude = (torch.einsum("bjcm,bcn->jmn", main_grad, main_in)
                     + torch.einsum("bjcm,bcn->jmn", short_grad, short_in))
    depth = 9 * block.conv2.in_channels + 4 + len(x) * main_in.shape[1] + 4
    return 2 * depth * EPS64 * magnitude


@pytest.mark.parametrize("stats", [False, True])
def test_resnet_shortcut_pools_with_the_same_fitted_operator(stats):
    net = filled(ResNet18(**TINY, stage_pooling="separability", n_components=2), 2,
                 stats=stats).double().eval()
    block = net.layer3[0]
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    layer = block.pool
    statistics = (layer.channel_mean, layer.channel_scale) if stats else None
    expected, main_shape, shortcut_shape = reference_block(block, x, layer.operator, statistics)
    assert main_shape == shortcut_shape == (2, 16, 4, 4)
    bound = block_rounding_bound(block, x, layer.operator, statistics)
    assert torch.all((block(x) - expected).abs() <= bound)


def test_resnet_learned_operator_is_trained_through_both_paths():
    """The "sgd" point's one parameter pools both paths: output and gradient equal a reference
    that applies it to each; with the main path cut off the gradient still reaches it."""
    net = ResNet18(**TINY, stage_pooling="sgd", n_components=2).double().eval()
    block = net.layer2[0]
    assert isinstance(block.pool, LearnedPool2d)
    with torch.no_grad():
        block.pool.operator.add_(0.1 * torch.randn_like(block.pool.operator))
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    block(x).sum().backward()
    grad = block.pool.operator.grad.clone()
    operator = block.pool.operator.detach().clone().requires_grad_(True)
    expected, _, _ = reference_block(block, x, operator)
    expected.sum().backward()
    bound = block_rounding_bound(block, x, operator.detach())
    assert torch.all((block(x) - expected).detach().abs() <= bound)
    gradient_bound = pool_gradient_bound(block, x, operator.detach())
    assert torch.all((grad - operator.grad).abs() <= gradient_bound)

    block.pool.operator.grad = None
    with torch.no_grad():
        block.conv2.weight.zero_()  # the main path's pooled maps no longer reach the output
    block(x).sum().backward()
    assert block.pool.operator.grad.abs().max() > 0


def test_resnet_stage_maps_are_what_the_pooling_receives():
    net = filled(ResNet18(**TINY, stage_pooling=("max", "separability", "sgd")), 2).eval()
    x = torch.randn(2, 16, 16)
    received = []
    for point, block in enumerate((net.layer2[0], net.layer3[0], net.layer4[0])):
        block.pool.register_forward_pre_hook(lambda m, args: received.append(args[0]))
    net(x)
    # each pooling runs on the main path first (the shortcut's call comes after it)
    main_inputs = received[0::2]
    for point in range(3):  # exact: the same modules on the same input (same code, same data)
        torch.testing.assert_close(net.stage_maps(x, point), main_inputs[point], rtol=0, atol=0)
    assert [tuple(m.shape[1:]) for m in main_inputs] == [(8, 16, 16), (8, 8, 8), (16, 4, 4)]


def test_resnet_width_multiplier_and_errors():
    assert ResNet18().head.in_features == 512 and ResNet18().stem[0].out_channels == 64
    assert ResNet18(width_multiplier=0.5).head.in_features == 256
    with pytest.raises(ValueError, match="width_multiplier"):
        ResNet18(width_multiplier=0.001)
    with pytest.raises(ValueError, match="width_multiplier"):
        ResNet18(width_multiplier=float("nan"))
    with pytest.raises(ValueError, match="stage_pooling must be one of .* or 3 of them"):
        ResNet18(stage_pooling=("avg", "max"))
    with pytest.raises(ValueError, match="input_size"):
        ResNet18(stage_pooling="sgd")
    with pytest.raises(ValueError, match="not divisible"):
        ResNet18(width_multiplier=1 / 16, stage_pooling="separability", n_components=3)
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        ResNet18(width_multiplier=1 / 16)(torch.randn(2, 8, 8))


def test_resnet_state_dict_and_pickle():
    net = filled(ResNet18(**TINY, stage_pooling=("separability", "sgd", "avg")), 2).eval()
    x = torch.randn(2, 16, 16)
    restored = pickle.loads(pickle.dumps(net))
    # exact: the same weights and buffers, the same code on the same data
    torch.testing.assert_close(restored(x), net(x), rtol=0, atol=0)
    fresh = filled(ResNet18(**TINY, stage_pooling=("separability", "sgd", "avg")), 2, seed=7)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh.eval()(x), net(x), rtol=0, atol=0)
    assert isinstance(net.pools[0], SeparabilityPool2d) and len(net.pools) == 3
