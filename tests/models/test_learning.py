"""The deep models learn with their defaults (issue 24): per-image standardisation inside the
networks, the classifiers' batch size and weight decay, and the embedders' cross-entropy
pre-training. The fast tests check the pieces; the slow ones are the issue's "done when"."""

import numpy as np
import pytest
import torch
from sklearn.base import clone

from rounding import EPS32
from skpool.models import (
    DGMPEmbedder,
    PoolingCNN,
    PoolingCNNClassifier,
    PoolingEmbedder,
    ResNet18,
    SeparabilityPoolingClassifier,
)
from skpool.models.pooling import STANDARDIZE_EPS, standardize_images
from skpool.evaluation import mean_average_precision


def test_standardize_images_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.05, 0.95, (5, 3, 7, 6)).astype(np.float32)
    images[1] = 0.4  # a constant image: zeros, not NaN
    out = standardize_images(torch.from_numpy(images)).numpy()
    ref = images.astype(np.float64)
    mean = ref.mean(axis=(1, 2, 3), keepdims=True)
    var = ref.var(axis=(1, 2, 3), keepdims=True)
    ref = (ref - mean) / np.sqrt(var + STANDARDIZE_EPS)
    # float32 mean and variance over 126 values, then one subtraction and one product: a few
    # float32 roundings on values of size <= ~3 (unit variance), times a safety factor 10
    assert np.max(np.abs(out - ref)) <= 10 * 126 * EPS32 * 3
    assert np.all(out[1] == 0)


@pytest.mark.parametrize("network", [
    lambda s: PoolingCNN(width=4, n_stages=2, standardize=s),
    lambda s: ResNet18(in_channels=1, width_multiplier=1 / 16, standardize=s),
])
def test_networks_standardise_their_input_unless_told_not_to(network):
    torch.manual_seed(0)
    net = network(True).eval()
    x = torch.rand(4, 1, 16, 16)
    # An affine change of intensity (gain 3, offset -1, like a polarity-kept contrast change)
    # leaves the standardised input equal up to float32 rounding of the statistics.
    standardised = (net(x) - net(3 * x - 1)).abs().max()
    assert standardised <= 1e-5  # float32 rounding of logits of size ~0.1, with margin
    raw = network(False).eval()
    raw.load_state_dict(net.state_dict())
    assert (raw(x) - raw(3 * x - 1)).abs().max() > 100 * standardised  # raw: the change shows
    # stage_maps (what a separability operator is fitted on) sees the same standardised input
    assert torch.allclose(net.stage_maps(x, 1), net.stage_maps(3 * x - 1, 1), atol=1e-4)


def test_standardize_routes_through_the_classifiers_and_clone():
    images = np.random.default_rng(0).random((40, 8, 8), dtype=np.float32)
    labels = np.arange(40) % 2
    net = PoolingCNNClassifier(module__width=4, module__n_stages=2, module__standardize=False,
                               max_epochs=1, random_state=0, device="cpu")
    assert clone(net).get_params()["module__standardize"] is False
    assert net.fit(images, labels).module_.standardize is False
    assert PoolingCNNClassifier(module__width=4, module__n_stages=2, max_epochs=1,
                                device="cpu").fit(images, labels).module_.standardize is True
    params = PoolingCNNClassifier().get_params()
    assert params["batch_size"] == 32 and params["optimizer__weight_decay"] == 5e-4
    optimizer = net.optimizer_
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4


def _digits_images(n=120, seed=0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X[:n] / 16).reshape(-1, 8, 8).astype(np.float32), y[:n]


def test_pretraining_moves_the_trunk_and_zero_skips_it():
    X, y = _digits_images()
    tiny = dict(module__width=4, module__n_stages=2, max_epochs=1, random_state=0,
                device="cpu", n_labels_per_batch=4)
    plain = PoolingEmbedder(pretrain_epochs=0, **tiny).initialize()
    start = {k: v.clone() for k, v in plain.module_.state_dict().items()}
    # pre-training alone (no triplet step): max_epochs=0 keeps only the pre-training's effect
    pre = PoolingEmbedder(pretrain_epochs=2, **{**tiny, "max_epochs": 0}).fit(X, y)
    none = PoolingEmbedder(pretrain_epochs=0, **{**tiny, "max_epochs": 0}).fit(X, y)
    moved = pre.module_.state_dict()["cnn.stem.0.weight"]
    assert not torch.equal(moved, start["cnn.stem.0.weight"])
    assert torch.equal(none.module_.state_dict()["cnn.stem.0.weight"], start["cnn.stem.0.weight"])
    assert PoolingEmbedder().get_params()["pretrain_epochs"] == 5


@pytest.mark.parametrize("kwargs, error, match", [
    ({"pretrain_epochs": -1}, ValueError, "pretrain_epochs"),
    ({"pretrain_epochs": 1.5}, ValueError, "pretrain_epochs"),
    ({"pretrain_lr": 0.0}, ValueError, "pretrain_lr"),
    ({"pretrain_lr": float("nan")}, ValueError, "pretrain_lr"),
])
def test_pretraining_parameters_are_checked_before_training(kwargs, error, match):
    X, y = _digits_images(40)
    with pytest.raises(error, match=match):
        PoolingEmbedder(module__width=4, module__n_stages=2, device="cpu", **kwargs).fit(X, y)


def test_pretraining_needs_a_features_method():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 8)

        def forward(self, x):
            return torch.nn.functional.normalize(self.linear(x.flatten(1)), dim=1)

    X, y = _digits_images(40)
    with pytest.raises(TypeError, match="features"):
        PoolingEmbedder(Plain, device="cpu", pretrain_epochs=1).fit(X, y)
    PoolingEmbedder(Plain, device="cpu", pretrain_epochs=0, max_epochs=1).fit(X, y)  # works


# ------------------------------------------------------------------------------ done when (slow)


@pytest.fixture(scope="module")
def svhn_like():
    from skpool.datasets import make_svhn_like

    return make_svhn_like(n_train=3000, n_test=500, random_state=0)


@pytest.mark.slow  # 3,000 images x 8 epochs: ~20 s on an idle core
def test_strided_cnn_learns_svhn_like_with_its_defaults(svhn_like):
    torch.set_num_threads(1)
    net = PoolingCNNClassifier(module__width=16, max_epochs=8, random_state=0, device="cpu")
    net.fit(svhn_like.X_train, svhn_like.y_train)
    error = np.mean(net.predict(svhn_like.X_test) != svhn_like.y_test)
    # issue 24: below 35% (chance 90%; measured 28.4 / 33.2 / 30.0% on seeds 0-2)
    assert error < 0.35, error


@pytest.mark.slow  # two trainings and an operator fit at 16x16: ~60 s on an idle core
def test_separability_cnn_learns_svhn_like_with_its_defaults(svhn_like):
    torch.set_num_threads(1)
    net = SeparabilityPoolingClassifier(stage=1, module__width=16, max_epochs=8, random_state=0,
                                        device="cpu")
    net.fit(svhn_like.X_train, svhn_like.y_train)
    error = np.mean(net.predict(svhn_like.X_test) != svhn_like.y_test)
    assert error < 0.35, error  # issue 24's criterion


@pytest.mark.slow  # 1,500 images, 5 + 8 epochs: ~40 s on an idle core
def test_dgmp_embedder_retrieves_unseen_classes_and_does_not_collapse(svhn_like):
    torch.set_num_threads(1)
    seen, unseen = svhn_like.y_train < 5, svhn_like.y_test >= 5
    X_query, y_query = svhn_like.X_test[unseen], svhn_like.y_test[unseen]
    embedder = DGMPEmbedder(module__width=16, max_epochs=8, random_state=0, device="cpu")
    untrained = mean_average_precision(embedder.initialize().transform(X_query), y_query)
    embedder.fit(svhn_like.X_train[seen], svhn_like.y_train[seen])
    embeddings = embedder.transform(X_query)
    trained = mean_average_precision(embeddings, y_query)
    # issue 24: >= 1.25x the untrained mAP (measured 34.2 vs 21.7 on seed 0)
    assert trained >= 1.25 * untrained, (trained, untrained)
    # no collapse: triplet training from scratch brought the mean pairwise distance to ~0.29
    # (unit vectors: 2 is antipodal, ~1.4 orthogonal); pre-trained it stays ~1.16
    distances = np.linalg.norm(embeddings[:, None] - embeddings[None], axis=-1)
    assert distances.sum() / (len(y_query) * (len(y_query) - 1)) > 0.6
