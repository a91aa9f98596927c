"""The CNN and the SGD-learned pooling layer: shapes, widths, gradients, references."""

import doctest
import importlib
import pickle

import pytest
import torch
import torch.nn.functional as torch_F

from rounding import EPS32, EPS64, exp_of_log_rtol
from skpool.models import GLOBAL_POOLINGS, STAGE_POOLINGS, LearnedPool2d, PoolingCNN
from models.helpers import random_layer


@pytest.mark.parametrize("stage_pooling", ["strided", "avg", "max", "sgd"])
@pytest.mark.parametrize("global_pool", GLOBAL_POOLINGS)
def test_cnn_shapes(stage_pooling, global_pool):
    net = PoolingCNN(width=4, n_stages=2, stage_pooling=stage_pooling, global_pool=global_pool,
                     input_size=(8, 8))
    assert net(torch.randn(3, 8, 8)).shape == (3, 10)
    # stage 1 outputs 16 channels; before a 2-component pooling its conv gives 16 / 2
    assert net.stage_maps(torch.randn(3, 1, 8, 8), 1).shape[1] == (8 if stage_pooling == "sgd"
                                                                   else 16)


def stage_outputs(net, x):
    """Channels and grid after every stage (stem included), via forward hooks."""
    shapes = []
    hooks = [pool.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for pool in net.pools]
    net(x)
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("pooling", ["avg", "max", "separability", "sgd"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_cnn_keeps_the_strided_widths(pooling, k):
    """Width-true components: every stage's output has the strided network's channels and grid,
    and the layers after each pooling have the same parameters; only the convolution before a
    k-component pooling is narrower (out/k channels)."""
    config = {"width": 4, "n_stages": 3, "input_size": (8, 8)}
    strided = PoolingCNN(**config, stage_pooling="strided")
    other = PoolingCNN(**config, stage_pooling=pooling, n_components=k)
    if pooling == "separability":
        for stage, grid in enumerate([(8, 8), (4, 4), (2, 2)]):
            other.set_separability_pool(stage, random_layer(k, grid, seed=stage))
    x = torch.randn(2, 8, 8)
    assert stage_outputs(other, x) == stage_outputs(strided, x) == [(8, 4, 4), (16, 2, 2),
                                                                    (32, 1, 1)]
    k_eff = k if pooling in ("separability", "sgd") else 1
    expected = {}
    for name, value in strided.named_parameters():
        shape = tuple(value.shape)
        if name.startswith("convs.") and name.endswith(("0.weight", "1.weight", "1.bias")):
            shape = (shape[0] // k_eff, *shape[1:])  # the narrower conv (and its batch norm)
        expected[name] = shape
    if pooling == "sgd":
        for stage, grid in enumerate([(8, 8), (4, 4), (2, 2)]):
            m = (-(-grid[0] // 2)) * (-(-grid[1] // 2))
            expected[f"pools.{stage}.operator"] = (k, m, grid[0] * grid[1])
    assert {name: tuple(v.shape) for name, v in other.named_parameters()} == expected


def test_cnn_separability_width_must_divide():
    with pytest.raises(ValueError, match="not divisible by its n_components=3"):
        PoolingCNN(width=4, n_stages=1, stage_pooling="separability", n_components=3)
    with pytest.raises(ValueError, match="n_components must be one value or 2"):
        PoolingCNN(width=4, n_stages=2, stage_pooling="sgd", n_components=(1, 2, 2),
                   input_size=(8, 8))


def test_cnn_per_stage_components():
    net = PoolingCNN(width=4, n_stages=2, stage_pooling=("sgd", "separability"),
                     n_components=(1, 4), input_size=(8, 8))
    assert net.convs[0][0].out_channels == 8 and net.convs[1][0].out_channels == 4
    with pytest.raises(ValueError, match="built for 4"):
        net.set_separability_pool(1, random_layer(2, (4, 4)))
    net.set_separability_pool(1, random_layer(4, (4, 4)))
    assert net(torch.randn(2, 8, 8)).shape == (2, 10)


def test_cnn_separability_stage_applies_the_operator():
    """Against a float64 reference: out[j*C + c, m] = sum_n P[j, m, n] x[c, n]."""
    net = PoolingCNN(width=4, n_stages=1, stage_pooling="separability", n_components=2).double()
    layer = random_layer(2, (8, 8)).double()
    net.set_separability_pool(0, layer)
    net.eval()
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    maps = net.stage_maps(x, 0)  # (3, 4, 8, 8)
    pooled = torch.einsum("jmn,bcn->bjcm", layer.operator, maps.flatten(2))
    reference = net.head(net.global_pool(pooled.reshape(3, 8, 4, 4)).flatten(1))
    # Two float64 computations of the same function (the pooling implemented twice, the
    # same average pooling and head after it): each within D eps64 of the exact result
    # times the "absolute" network (|P| |maps|, averaged, |W| . + |b|), D = 64 (the pooling's
    # sums) + 16 + 1 (the global average) + 8 + 1 (the head).
    with torch.no_grad():
        magnitude = torch.einsum("jmn,bcn->bjcm", layer.operator.abs(), maps.abs().flatten(2))
        magnitude = magnitude.reshape(3, 8, 16).mean(dim=-1)
        magnitude = magnitude @ net.head.weight.abs().T + net.head.bias.abs()
        bound = 2 * (64 + 17 + 9) * EPS64 * magnitude
        assert torch.all((net(x) - reference).abs() <= bound)


def test_cnn_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="stage_pooling"):
        PoolingCNN(stage_pooling=("avg", "bogus", "max"))
    with pytest.raises(ValueError, match="global_pool"):
        PoolingCNN(global_pool="median")
    with pytest.raises(ValueError, match="expects images"):
        PoolingCNN(width=4)(torch.randn(2, 64))
    with pytest.raises(ValueError, match="input_size"):
        PoolingCNN(width=4, stage_pooling="sgd")
    with pytest.raises(ValueError, match="takes no options"):
        PoolingCNN(width=4, global_pool="avg", global_pool_options={"lam": 1.0})
    with pytest.raises(ValueError, match="Give λ as lam"):
        PoolingCNN(width=4, global_pool="gmp", global_pool_options={"lam": 1.0})
    net = PoolingCNN(width=4, stage_pooling=("separability", "strided", "strided"))
    with pytest.raises(RuntimeError, match="no fitted operator"):
        net(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="not separability"):
        net.set_separability_pool(1, random_layer(2, (4, 4)))
    with pytest.raises(TypeError, match="SeparabilityPool2d"):
        net.set_separability_pool(0, torch.nn.Identity())
    with pytest.raises(ValueError, match="statistics are for 5 channels"):
        net.set_separability_pool(0, random_layer(2, (8, 8), stats_channels=5))
    with pytest.raises(IndexError, match="stage must be in 0..2"):
        net.stage_maps(torch.randn(2, 8, 8), 3)


def test_global_pool_options_reach_the_layer():
    net = PoolingCNN(width=4, n_stages=1, global_pool="gmp", lam=5.0,
                     global_pool_options={"learnable": False})
    assert not net.global_pool.learnable and float(net.global_pool.lam) == pytest.approx(
        5.0, rel=exp_of_log_rtol(5.0, EPS32))
    assert STAGE_POOLINGS == ("strided", "avg", "max", "separability", "sgd")


# -- LearnedPool2d -------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (1, 3)])
@pytest.mark.parametrize("k", [1, 3])
def test_learned_pool_starts_as_average_pooling(grid, k):
    pool = LearnedPool2d(grid, n_components=k)
    x = torch.randn(2, 4, *grid, dtype=torch.float64)
    average = torch_F.avg_pool2d(x, 2, ceil_mode=True)  # torch's reference (partial windows too)
    out = pool.double()(x)
    assert out.shape == (2, k * 4, *average.shape[2:])
    # Two float64 means of at most 4 numbers (the operator's weights 1/count rounded once,
    # zero weights add nothing): each within (4 + 1) eps64 of the mean of |x|
    bound = 2 * 5 * EPS64 * torch_F.avg_pool2d(x.abs(), 2, ceil_mode=True)
    for j in range(k):  # component-major channels: j * C + c
        assert torch.all((out[:, 4 * j : 4 * j + 4] - average).abs() <= bound)


def test_learned_pool_gradcheck_and_is_trained():
    pool = LearnedPool2d((4, 5), n_components=2).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    operator = pool.operator.detach().clone().requires_grad_(True)

    def apply(x, operator):
        return torch.func.functional_call(pool, {"operator": operator}, (x,))

    assert torch.autograd.gradcheck(apply, (x, operator))
    optimizer = torch.optim.SGD(pool.parameters(), lr=0.1)
    start = pool.operator.detach().clone()
    pool(x).square().sum().backward()
    optimizer.step()
    assert not torch.equal(pool.operator.detach(), start)


def test_learned_pool_state_dict_pickle_and_errors():
    pool = LearnedPool2d((6, 6), n_components=2)
    with torch.no_grad():
        pool.operator.add_(torch.randn_like(pool.operator))
    fresh = LearnedPool2d((6, 6), n_components=2)
    fresh.load_state_dict(pool.state_dict())
    torch.testing.assert_close(fresh.operator, pool.operator, rtol=0, atol=0)  # copied bits
    restored = pickle.loads(pickle.dumps(pool))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(restored(x), pool(x), rtol=0, atol=0)  # same code, same data
    assert "n_components=2, grid_shape=6x6, output_shape=3x3" in repr(pool)
    for bad in [(0, 4), (2.5, 4)]:  # a fraction is refused, not floored to 2
        with pytest.raises(ValueError, match="grid_shape must be a pair of positive integers"):
            LearnedPool2d(bad)
    with pytest.raises(ValueError, match="n_components must be an integer >= 1"):
        LearnedPool2d((4, 4), n_components=0)
    with pytest.raises(ValueError, match="fitted on a 6x6 grid"):
        pool(torch.randn(1, 3, 4, 9))


@pytest.mark.parametrize("module", ["skpool.models.pooling", "skpool.models.cnn",
                                    "skpool.models.resnet"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow  # a fresh interpreter importing torch and skorch: seconds on a loaded machine
def test_models_has_the_public_names_without_importing_skorch():
    import subprocess
    import sys

    code = ("import sys, skpool.models as m; assert 'skorch' not in sys.modules; "
            "from skpool.models import DGMPClassifier, ResNet18, SeparabilityPoolingClassifier; "
            "assert 'skorch' in sys.modules; print(sorted(m.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "ResNet18" in out and "PoolingCNNClassifier" in out
