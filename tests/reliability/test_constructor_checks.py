"""Issue 28, class 7: layer and network constructor parameters are checked in the constructor,
with a message naming the parameter: no truthiness (``flatten="no"`` flattening,
``normalize=None`` turning normalisation off), no bare ``float()`` errors, no failure inside
``Conv2d``."""

import numpy as np
import pytest
import torch

from skpool.models import PoolingCNN, ResNet18
from skpool.models.retrieval import PoolingEmbeddingNet
from skpool.nn import (
    GeneralizedMaxPool2d,
    LogSumExpPool2d,
    MixedMaxAvgPool2d,
    SeparabilityPool2d,
    SequenceGeneralizedMaxPool,
)

GMP_LAYERS = [GeneralizedMaxPool2d, SequenceGeneralizedMaxPool]


@pytest.mark.parametrize("layer", GMP_LAYERS)
@pytest.mark.parametrize("name", ["learnable", "normalize"])
@pytest.mark.parametrize("value", ["no", None, 0, 1.0])
def test_gmp_layer_flags_must_be_booleans(layer, name, value):
    with pytest.raises(TypeError, match=name):
        layer(**{name: value})


@pytest.mark.parametrize(
    "layer", [GeneralizedMaxPool2d, MixedMaxAvgPool2d, LogSumExpPool2d]
)
@pytest.mark.parametrize("value", ["no", None, 0])
def test_flatten_must_be_a_boolean(layer, value):
    with pytest.raises(TypeError, match="flatten"):
        layer(flatten=value)


@pytest.mark.parametrize("layer", [MixedMaxAvgPool2d, LogSumExpPool2d])
def test_baselines_learnable_must_be_a_boolean(layer):
    with pytest.raises(TypeError, match="learnable"):
        layer(learnable="yes")


@pytest.mark.parametrize("layer", GMP_LAYERS)
@pytest.mark.parametrize("value", [None, "abc", "1.0", [1.0]])
def test_lam_of_the_wrong_type_names_lam(layer, value):
    with pytest.raises(TypeError, match="lam"):
        layer(lam=value)


@pytest.mark.parametrize("value", [None, "abc"])
def test_mix_of_the_wrong_type_names_mix(value):
    with pytest.raises(TypeError, match="mix"):
        MixedMaxAvgPool2d(mix=value)


@pytest.mark.parametrize("name", ["r", "r_min"])
def test_lse_sharpness_of_the_wrong_type_names_it(name):
    with pytest.raises(TypeError, match=name):
        LogSumExpPool2d(**{name: "abc"})


@pytest.mark.parametrize("layer", GMP_LAYERS)
def test_refine_steps_bound(layer):
    with pytest.raises(ValueError, match="refine_steps"):
        layer(refine_steps=10**30)


def test_separability_layer_trainable_must_be_a_boolean():
    with pytest.raises(TypeError, match="trainable"):
        SeparabilityPool2d(np.eye(4)[None], trainable="no", output_shape=(2, 2))


def test_valid_values_still_work():
    x = torch.randn(2, 3, 4, 4)
    assert GeneralizedMaxPool2d(lam=np.float32(0.5), flatten=np.bool_(False))(x).shape == (
        2, 3, 1, 1,
    )
    assert MixedMaxAvgPool2d(mix=torch.tensor(0.3))(x).shape == (2, 3)


@pytest.mark.parametrize(
    "params, name",
    [
        ({"width": 0}, "width"),
        ({"width": 2.5}, "width"),
        ({"n_classes": -2}, "n_classes"),
        ({"n_classes": 0}, "n_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"n_stages": 0}, "n_stages"),
        ({"lam": None, "global_pool": "gmp"}, "lam"),
    ],
)
def test_pooling_cnn_parameters_named(params, name):
    with pytest.raises((TypeError, ValueError), match=name):
        PoolingCNN(**params)


@pytest.mark.parametrize(
    "params, name",
    [
        ({"n_classes": -2}, "n_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"width_multiplier": "abc"}, "width_multiplier"),
    ],
)
def test_resnet_parameters_named(params, name):
    with pytest.raises((TypeError, ValueError), match=name):
        ResNet18(**params)


def test_embedding_net_dimension_bound():
    with pytest.raises(ValueError, match="embedding_dim"):
        PoolingEmbeddingNet(width=4, n_stages=1, embedding_dim=10**30)


# ----------------------------------------------------------------- found in this review
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float32", np.float32])
def test_layer_dtype_must_be_a_floating_torch_dtype(dtype):
    """An integer dtype truncated the operator (SeparabilityPool2d then blamed its channel
    scales: "must be > 0") or failed inside nn.Parameter."""
    for make in (lambda: GeneralizedMaxPool2d(dtype=dtype), lambda: LogSumExpPool2d(dtype=dtype),
                 lambda: SeparabilityPool2d(np.eye(4)[None], np.zeros(2), np.ones(2),
                                            output_shape=(2, 2), dtype=dtype)):
        with pytest.raises(TypeError, match="dtype"):
            make()
    assert GeneralizedMaxPool2d(dtype=torch.float64).log_lam.dtype == torch.float64


def test_to_module_channel_statistics_must_be_a_boolean():
    """``channel_statistics="no"`` applied the statistics (truthiness)."""
    from skpool import SeparabilityPooling

    from .helpers import labelled_maps

    maps, labels = labelled_maps(n_samples=8, grid=(4, 4))
    fitted = SeparabilityPooling(device="cpu").fit(maps, labels).fitted_operator_
    with pytest.raises(TypeError, match="channel_statistics"):
        fitted.to_module(channel_statistics="no")
    assert fitted.to_module(channel_statistics=False).channel_mean is None
