"""skpool.nn.fit_pooling: separability pooling fitted at named points of any network.

The operators are checked against SeparabilityPooling fitted by hand on maps collected with
a hand-written hook (channels last, the point's output grid), in float64 networks: the two
fits read the same maps through different code paths (streamed batches vs one array), so they
agree within twice the first-order error bound of a fit (``fit_row_bounds``: each is within
it of the exact rows)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from separability_reference import assert_same_rows, fit_row_bounds, pooling_bound
from skpool import SeparabilityPooling
from skpool.models import ResNet18
from skpool.nn import (
    GeneralizedMaxPool2d,
    PooledConv2d,
    SeparabilityPool2d,
    SequenceGeneralizedMaxPool,
    fit_pooling,
)

EPS64 = float(np.finfo(np.float64).eps)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_any_network():
    spec = importlib.util.spec_from_file_location("example_any_network",
                                                  EXAMPLES / "any_network.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def plain_net(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),  # 4x4 -> 2x2
        nn.Flatten(), nn.Linear(24, 3),
    ).to(dtype)


def labelled_batches(n_batches=3, size=20, dtype=torch.float64, shape=(1, 8, 8), seed=1):
    """Images whose class shifts a bright blob, so the maps carry class information."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        labels = torch.arange(size) % 3
        images = torch.randn(size, *shape, generator=generator, dtype=dtype)
        images[torch.arange(size), :, 2 + labels, 2 + labels] += 3.0
        batches.append((images, labels))
    return batches


def hand_maps(model, module, batches, stride_one_conv=False):
    """(n, H, W, C) float64 maps entering ``module`` (or its stride-1 output), and labels."""
    collected = []

    def hook(mod, inputs, output):
        x = inputs[0]
        if stride_one_conv:
            x = nn.functional.conv2d(x, mod.weight, mod.bias, 1, mod.padding)
        collected.append(x.detach().permute(0, 2, 3, 1).double())

    handle, mode = module.register_forward_hook(hook), model.training
    model.eval()
    with torch.no_grad():
        for images, _ in batches:
            model(images)
    handle.remove()
    model.train(mode)
    return torch.cat(collected).numpy(), torch.cat([y for _, y in batches]).numpy()


def assert_equals_hand_fit(fitted, maps, labels, params):
    hand = SeparabilityPooling(**params, output_shape=fitted.output_shape_, device="cpu",
                               dtype="float64").fit(maps, labels)
    bounds, _ = fit_row_bounds(maps.reshape(len(maps), -1, maps.shape[-1]), labels,
                               maps.shape[1:3], fitted.output_shape_, params["alpha"],
                               params.get("n_components", 1), EPS64)
    assert_same_rows(fitted.operator_, hand.operator_, 2 * bounds)
    return hand


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- a plain nn.Sequential -------------------------------------------------------------------------
def test_sequential_maxpool_and_strided_conv_equal_hand_fits_and_train():
    model, data = plain_net(), labelled_batches()
    model.train()
    before = model(data[0][0]).shape
    pool_maps, labels = hand_maps(model, model[2], data)
    params = {"alpha": 5.0}
    estimators = {"3": SeparabilityPooling(**params, dtype="float64", device="cpu"),
                  "2": SeparabilityPooling(**params, dtype="float64", device="cpu")}
    assert fit_pooling(model, estimators, data) is model
    assert model.training and all(m.training for m in model.modules())  # mode kept
    assert no_hooks(model)
    assert isinstance(model[2], SeparabilityPool2d) and isinstance(model[3], PooledConv2d)
    assert model[2].operator.dtype == model[3].weight.dtype == torch.float64  # dtype kept
    assert model(data[0][0]).shape == before
    # point "2" (the MaxPool2d) was fitted first (network order), on the original maps, for
    # the 4x4 grid the MaxPool2d produced
    assert estimators["2"].grid_shape_ == (8, 8) and estimators["2"].output_shape_ == (4, 4)
    assert_equals_hand_fit(estimators["2"], pool_maps, labels, params)
    # the layer reproduces the estimator's transform (channel statistics included): two
    # float64 code paths, each within the pooling product's rounding bound
    model.eval()
    with torch.no_grad():
        captured = hand_maps(model, model[2], data[:1])[0]
        layer_out = model[2](torch.from_numpy(captured).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    fitted = estimators["2"]
    bound = 2 * pooling_bound(captured.reshape(20, 64, 4), fitted.operator_,
                              fitted.channel_mean_, fitted.channel_scale_)
    np.testing.assert_allclose(layer_out.numpy(), fitted.transform(captured), rtol=0, atol=bound)
    # point "3" (the strided conv) on the network already modified: its stride-1 maps
    conv_maps, labels = hand_maps(model, model[3], data, stride_one_conv=True)
    assert estimators["3"].grid_shape_ == (4, 4) and estimators["3"].output_shape_ == (2, 2)
    assert_equals_hand_fit(estimators["3"], conv_maps, labels, params)
    # the convolution keeps its weights, at stride 1
    assert model[3].stride == (1, 1) and model[3].padding == (1, 1)
    # a training step: the network's parameters move, the frozen operators do not
    model.train()
    operator = model[2].operator.clone()
    weight = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(data[0][0]), data[0][1])
    loss.backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, weight)
    assert torch.equal(model[2].operator, operator) and not model[2].operator.requires_grad


def test_trainable_operator_gets_gradients():
    model, data = plain_net(torch.float32), labelled_batches(dtype=torch.float32)
    fit_pooling(model, {"2": SeparabilityPooling(alpha=5.0, device="cpu")}, data,
                trainable=True)
    nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()
    assert isinstance(model[2].operator, nn.Parameter) and model[2].operator.grad is not None
    assert model[2].operator.dtype == torch.float32


def test_width_true_convolution_keeps_the_widths():
    model, data = plain_net(), labelled_batches()
    shape = model(data[0][0]).shape
    estimator = SeparabilityPooling(alpha=5.0, n_components=2, device="cpu", dtype="float64")
    fit_pooling(model, {"3": estimator}, data, width_true=True)
    layer = model[3]
    assert layer.out_channels == 3 and layer.pool.operator.shape[0] == 2
    assert layer.pool.channel_mean is None  # the new convolution's channels are not the fit's
    assert model(data[0][0]).shape == shape
    # the operator was fitted on the original convolution's 6 stride-1 channels
    assert estimator.n_channels_in_ == 6


def test_identity_placeholder_uses_the_estimators_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Identity(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    data = labelled_batches()
    fit_pooling(model, {"2": SeparabilityPooling(alpha=5.0, stride=4, device="cpu")}, data)
    assert model[2].output_shape == (2, 2)
    assert model(data[0][0]).shape == (20, 3)


def test_adaptive_pooling_point_gets_its_output_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(3),
                          nn.Flatten(), nn.Linear(36, 3)).double()
    data = labelled_batches()
    fit_pooling(model, {"2": SeparabilityPooling(alpha=5.0, device="cpu")}, data)
    assert model[2].output_shape == (3, 3) and model(data[0][0]).shape == (20, 3)


# -- failures: checked before any work, or undone --------------------------------------------------
@pytest.mark.parametrize(
    "estimators, options, error, message",
    [
        ({"9": SeparabilityPooling()}, {}, ValueError, "not a submodule name"),
        ({"1": SeparabilityPooling()}, {}, TypeError, "a point must be a pooling module"),
        ({"0": SeparabilityPooling()}, {}, ValueError, r"stride \(1, 1\)"),
        ({"2": SeparabilityPooling(n_components=2)}, {}, ValueError, "n_components=2 at the "
         "pooling module"),
        ({"3": SeparabilityPooling(n_components=2)}, {}, ValueError, "width_true=True"),
        ({"3": SeparabilityPooling(n_components=4)}, {"width_true": True}, ValueError,
         "divisible"),
        ({"2": "not an estimator"}, {}, TypeError, "must be a SeparabilityPooling"),
        ({"2": SeparabilityPooling(alpha=-1.0)}, {}, ValueError, "alpha"),
        ({}, {}, TypeError, "non-empty mapping"),
    ],
)
def test_bad_points_are_refused_before_any_work(estimators, options, error, message):
    model, data = plain_net(), labelled_batches()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        fit_pooling(model, estimators, data, **options)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_module_the_forward_does_not_call_is_refused():
    model, data = plain_net(), labelled_batches()
    model[0].unused = nn.MaxPool2d(2)  # a submodule Conv2d.forward does not call
    with pytest.raises(ValueError, match="not called"):
        fit_pooling(model, {"0.unused": SeparabilityPooling()}, data)
    assert no_hooks(model)


class FailingPooling(SeparabilityPooling):
    def fit_batches(self, batches):
        for index, _ in enumerate(batches):  # fail midway through the first pass
            if index == 1:
                raise RuntimeError("disk gone")
        raise AssertionError("not reached")


def test_failure_midway_leaves_the_model_unchanged_and_hooks_removed():
    model, data = plain_net(), labelled_batches()
    model.train()
    model[1].eval()  # a mixed mode, to be kept
    modes = [m.training for m in model.modules()]
    modules = list(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    estimators = {"2": SeparabilityPooling(alpha=5.0, device="cpu"),
                  "3": FailingPooling(alpha=5.0, device="cpu")}
    with pytest.raises(RuntimeError, match="disk gone"):
        fit_pooling(model, estimators, data)
    assert hasattr(estimators["2"], "operator_")  # the first point was fitted and swapped ...
    assert list(model) == modules  # ... and the swap undone
    assert no_hooks(model)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_data_errors_are_clear():
    model = plain_net()
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit_pooling(model, {"2": SeparabilityPooling()}, iter(labelled_batches()))
    with pytest.raises(ValueError, match="no batches"):
        fit_pooling(model, {"2": SeparabilityPooling()}, [])
    assert no_hooks(model) and isinstance(model[2], nn.MaxPool2d)


# -- skpool's ResNet-18 and a torchvision-style ResNet ---------------------------------------------
def test_skpool_resnet18_avg_point_and_strided_conv():
    torch.manual_seed(0)
    model = ResNet18(in_channels=1, n_classes=3, width_multiplier=1 / 16,
                     stage_pooling=("avg", "strided", "strided")).double()
    data = labelled_batches()
    shape = model(data[0][0]).shape
    # the block's pooling is called by both paths: it is fitted on the main path's maps (the
    # first call), which are those stage_maps gives (taken in eval mode, as fit_pooling does)
    model.eval()
    with torch.no_grad():
        maps = torch.cat([model.stage_maps(x, 0) for x, _ in data]).permute(0, 2, 3, 1)
    model.train()
    estimators = {"layer2.0.pool": SeparabilityPooling(alpha=5.0, device="cpu"),
                  "layer3.0.conv1": SeparabilityPooling(alpha=5.0, device="cpu")}
    fit_pooling(model, estimators, data)
    assert isinstance(model.layer2[0].pool, SeparabilityPool2d)
    assert isinstance(model.layer3[0].conv1, PooledConv2d)
    labels = torch.cat([y for _, y in data]).numpy()
    assert_equals_hand_fit(estimators["layer2.0.pool"], maps.numpy(), labels, {"alpha": 5.0})
    assert model.training and model(data[0][0]).shape == shape
    model.train()
    nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()


def test_torchvision_style_resnet18():
    example = load_any_network()
    torch.manual_seed(0)
    model = example.ResNet18Like(num_classes=3, width=4).double()
    data = labelled_batches(n_batches=2, shape=(3, 16, 16))
    shape = model(data[0][0]).shape
    estimators = {"maxpool": SeparabilityPooling(alpha=5.0, device="cpu", dtype="float64"),
                  "layer2.0.conv1": SeparabilityPooling(alpha=5.0, device="cpu"),
                  "layer2.0.downsample.0": SeparabilityPooling(alpha=5.0, device="cpu")}
    maps, labels = hand_maps(model, model.maxpool, data)
    fit_pooling(model, estimators, data)
    assert isinstance(model.maxpool, SeparabilityPool2d)
    assert estimators["maxpool"].output_shape_ == (4, 4)
    assert isinstance(model.layer2[0].conv1, PooledConv2d)
    assert isinstance(model.layer2[0].downsample[0], PooledConv2d)  # the 1x1 strided shortcut
    assert model(data[0][0]).shape == shape
    assert_equals_hand_fit(estimators["maxpool"], maps, labels, {"alpha": 5.0})
    model.train()
    optimizer = torch.optim.Adam(model.parameters())
    nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()
    optimizer.step()


# -- GMP heads -------------------------------------------------------------------------------------
def test_gmp_head_in_place_of_avgpool():
    example = load_any_network()
    torch.manual_seed(0)
    model = example.ResNet18Like(num_classes=3, width=4)
    model.avgpool = GeneralizedMaxPool2d(flatten=False)  # the README's one-liner
    images, labels = labelled_batches(1, dtype=torch.float32, shape=(3, 32, 32))[0]
    logits = model(images)
    assert logits.shape == (20, 3)
    nn.functional.cross_entropy(logits, labels).backward()
    assert model.avgpool.log_lam.grad is not None


class TinyEncoder(nn.Module):
    """A small transformer classifier with mean pooling over the valid tokens."""

    def __init__(self, dim=16, n_classes=3):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.pool = None  # None: masked mean
        self.head = nn.Linear(dim, n_classes)

    def forward(self, tokens, valid):
        hidden = self.encoder(tokens, src_key_padding_mask=~valid)
        if self.pool is None:
            weights = valid.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
        else:
            pooled = self.pool(hidden, valid)
        return self.head(pooled)


def test_sequence_gmp_in_place_of_mean_pooling():
    torch.manual_seed(0)
    model = TinyEncoder()
    tokens = torch.randn(4, 7, 16)
    valid = torch.arange(7) < torch.tensor([[7], [5], [3], [1]])
    mean_logits = model(tokens, valid)
    model.pool = SequenceGeneralizedMaxPool(lam=1.0)  # the README's one-liner
    logits = model(tokens, valid)
    assert logits.shape == mean_logits.shape == (4, 3)
    # padding is ignored: changing a padded token does not change the output
    changed = tokens.clone()
    changed[3, 2:] = 100.0
    torch.testing.assert_close(model(changed, valid), logits)  # same computation: same values
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    assert model.encoder.layers[0].linear1.weight.grad is not None


# -- the skorch procedure on a user's network, through the same mechanism --------------------------
class UserNet(nn.Module):
    """A network skpool knows nothing about; its downsampling points are named."""

    def __init__(self, n_classes=10, in_channels=1, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)  # 4x4 -> 2x2
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x):
        x = x[:, None] if x.ndim == 3 else x
        x = torch.relu(self.down(self.pool(torch.relu(self.conv(x)))))
        return self.head(x.mean(dim=(2, 3)))


def test_skorch_procedure_on_a_user_network():
    import pickle

    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    from skpool.models import SeparabilityPoolingClassifier

    rng = np.random.default_rng(0)
    X, y = rng.random((36, 8, 8), dtype=np.float32), np.arange(36) % 3
    X[np.arange(36), 2 + y, 2 + y] += 2.0
    net = SeparabilityPoolingClassifier(
        UserNet, points=("pool", "down"), n_components=(1, 2), alpha=(5.0, 1.0),
        module__width=6, max_epochs=1, batch_size=12, random_state=0, device="cpu",
    ).fit(X, y)
    first, second = net.separability_poolings_
    assert first.grid_shape_ == (8, 8) and first.output_shape_ == (4, 4)
    assert second.grid_shape_ == (4, 4) and second.output_shape_ == (2, 2)
    assert second.n_channels_in_ == 12  # the trained strided conv's channels, at stride 1
    middle = net.intermediate_nets_[1].module_
    assert isinstance(middle.pool, SeparabilityPool2d) and type(middle.down) is nn.Conv2d
    final = net.module_
    assert isinstance(final.pool, SeparabilityPool2d) and final.pool.channel_mean is None
    assert isinstance(final.down, PooledConv2d) and final.down.out_channels == 6  # 12 / k
    assert final.down.pool.operator.shape == (2, 4, 16)
    np.testing.assert_allclose(final.pool.operator.double().numpy(), first.operator_,
                               rtol=np.finfo(np.float32).eps / 2, atol=0)  # a float32 copy
    assert net.predict_proba(X).shape == (36, 3)
    copy = pickle.loads(pickle.dumps(net))
    np.testing.assert_array_equal(copy.predict(X), net.predict(X))  # same module, same input
    assert clone(net).get_params()["points"] == ("pool", "down")
    search = GridSearchCV(clone(net).set_params(max_epochs=1), {"module__width": [2, 4]},
                          cv=2).fit(X, y)
    assert search.best_estimator_.module_.conv.out_channels in (2, 4)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"points": "head"}, "a point must be a pooling module"),
        ({"points": ("pool",), "n_components": 2}, "n_components=2 at the pooling module"),
        ({"points": ("nope",)}, "points must be a module name"),
        ({"points": ("pool", "pool")}, "points lists a module twice"),
        ({}, "name its downsampling points with points="),
    ],
)
def test_skorch_procedure_checks_the_points_before_training(params, message, monkeypatch):
    from skpool.models import PoolingCNNClassifier, SeparabilityPoolingClassifier

    monkeypatch.setattr(PoolingCNNClassifier, "fit", lambda *a, **k: pytest.fail("trained"))
    net = SeparabilityPoolingClassifier(UserNet, **{"n_components": 1, **params}, device="cpu")
    X, y = np.zeros((6, 8, 8), dtype=np.float32), np.arange(6) % 2
    with pytest.raises((ValueError, TypeError), match=message):
        net.fit(X, y)


# -- the example -----------------------------------------------------------------------------------
def test_any_network_example_runs_small(capsys):
    example = load_any_network()
    results = example.main(n_train=60, n_test=30, epochs=1, retrain_epochs=1, width=2,
                           points=("maxpool", "layer2.0.conv1"), batch_size=30)
    assert set(results["points"]) == {"maxpool", "layer2.0.conv1"}
    for key in ("error_before", "error_swapped", "error_after", "error_baseline"):
        assert 0.0 <= results[key] <= 1.0
    out = capsys.readouterr().out
    assert "wall time" in out and results["machine"] in out


def test_fit_pooling_docstring_example():
    import doctest

    import skpool.nn._fit_pooling as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_skorch_procedure_finetune_keeps_the_convolution_weights():
    """retrain="finetune": the learned network starts from the trained one; a strided
    convolution point (k = 1) keeps its weights, under the same names (PooledConv2d)."""
    from skpool.models import SeparabilityPoolingClassifier

    rng = np.random.default_rng(0)
    X, y = rng.random((24, 8, 8), dtype=np.float32), np.arange(24) % 2
    net = SeparabilityPoolingClassifier(
        UserNet, points="down", n_components=1, retrain="finetune", max_epochs=0,
        random_state=0, device="cpu",
    ).fit(X, y)
    trained = net.intermediate_nets_[0].module_
    assert isinstance(net.module_.down, PooledConv2d)
    assert torch.equal(net.module_.down.weight, trained.down.weight)  # copied, not trained
    assert torch.equal(net.module_.conv.weight, trained.conv.weight)
