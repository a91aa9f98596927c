"""Issue 28, class 5: every public numeric parameter is bounded where it is taken, with a
message naming it; a value that passes never overflows deep inside (OverflowError,
"int too big to convert", "cannot convert float infinity to integer")."""

import numpy as np
import pytest
import torch

from skpool import GeneralizedMaxPooling, SeparabilityPooling
from skpool._parameters import MAX_COUNT, check_integer, check_real
from skpool.datasets import make_svhn_like
from skpool.evaluation import corrupt, evaluate_corruptions, perturbation_sequence
from skpool.models import PoolingCNN, ResNet18

from .helpers import labelled_maps


def _fit_separability(**params):
    maps, labels = labelled_maps(n_samples=8, grid=(4, 4))
    return SeparabilityPooling(device="cpu", **params).fit(maps, labels)


@pytest.mark.parametrize(
    "params",
    [
        {"stride": 10**30},
        {"stride": MAX_COUNT + 1},
        {"max_memory_mb": 1e308},
        {"batch_size": 10**30},
        {"n_components": 10**30},
        {"support_radius": float("inf")},
    ],
)
def test_separability_parameters_beyond_their_bounds_name_themselves(params):
    (name,) = params
    with pytest.raises(ValueError, match=name):
        _fit_separability(**params)


def test_separability_largest_allowed_values_work():
    # Values at the bounds are accepted and give a working fit (no overflow downstream).
    pool = _fit_separability(stride=MAX_COUNT, max_memory_mb=2.0**40, batch_size=MAX_COUNT)
    assert pool.output_shape_ == (1, 1)


def test_gmp_batch_size_bound_names_it():
    maps, _ = labelled_maps(n_samples=4)
    with pytest.raises(ValueError, match="batch_size"):
        GeneralizedMaxPooling(batch_size=10**30, device="cpu").fit(maps)


def test_network_stage_count_is_bounded_by_name():
    with pytest.raises(ValueError, match="n_stages"):
        PoolingCNN(n_stages=10**30)
    with pytest.raises(ValueError, match="n_stages"):  # 64 * 2**40 channels: no network
        PoolingCNN(n_stages=40)


@pytest.mark.parametrize("seed", [2**70, -1])
def test_evaluation_seed_beyond_64_bits_names_random_state(seed):
    images = np.zeros((2, 1, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="random_state"):
        corrupt(images, "gaussian_noise", 1, random_state=seed)
    with pytest.raises(ValueError, match="random_state"):
        perturbation_sequence(images, "gaussian_noise", random_state=seed)


def test_evaluation_largest_seed_works():
    images = np.zeros((2, 1, 8, 8), dtype=np.float32)
    assert corrupt(images, "gaussian_noise", 1, random_state=2**64 - 1).shape == images.shape


def test_evaluate_corruptions_seed_bound():
    class Constant:
        def predict(self, X):
            return np.zeros(len(X), dtype=int)

    images = np.zeros((2, 1, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="random_state"):
        evaluate_corruptions(Constant(), images, np.zeros(2), random_state=2**70)


def test_perturbation_frames_bound_names_n_frames():
    images = np.zeros((1, 1, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="n_frames"):
        perturbation_sequence(images, "translate", n_frames=10**30)


@pytest.mark.parametrize("name", ["n_train", "n_test"])
def test_generator_sizes_bounded_by_name(name):
    with pytest.raises(ValueError, match=name):
        make_svhn_like(**{name: 10**30}, random_state=0)


def test_resnet_width_multiplier_bound_names_it():
    with pytest.raises(ValueError, match="width_multiplier"):
        ResNet18(width_multiplier=1e300)


def test_shared_checks_name_the_parameter():
    with pytest.raises(ValueError, match="stride"):
        check_integer("stride", 10**30)
    with pytest.raises(TypeError, match="stride"):
        check_integer("stride", True)
    with pytest.raises(ValueError, match="lam"):
        check_real("lam", 1e309, 0, None, closed="neither")
    assert check_real("lam", torch.tensor(2.0), 0) == 2.0


@pytest.mark.parametrize("seed", [2**70, -1, 1.5])
def test_skorch_models_seed_is_checked_by_name(seed):
    from skpool.models import PoolingCNNClassifier
    from skpool.models.retrieval import PoolingEmbedder

    images = np.zeros((8, 8, 8), dtype=np.float32)
    for model in (PoolingCNNClassifier, PoolingEmbedder):
        with pytest.raises((TypeError, ValueError), match="random_state"):
            model(random_state=seed, module__width=4, module__n_stages=1, max_epochs=1,
                  device="cpu").fit(images, np.arange(8) % 2)


@pytest.mark.parametrize("params, name", [({"n_batches": 10**30}, "n_batches"),
                                          ({"n_batches": True}, "n_batches"),
                                          ({"n_labels_per_batch": True}, "n_labels_per_batch")])
def test_pk_sampler_sizes_are_bounded_by_name(params, name):
    """n_batches=10**30 gave a sampler whose len() overflowed (found in this issue's review)."""
    from skpool.models.retrieval import PKBatchSampler

    with pytest.raises(ValueError, match=name):
        PKBatchSampler(np.arange(8) % 2, **{"n_labels_per_batch": 2, **params})
