"""The deep models: the CNN, and the skorch classifiers trained for real on digits."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, train_test_split

from skpool.models import PoolingCNN
from skpool.models.classifiers import (
    DGMPClassifier,
    PoolingCNNClassifier,
    SeparabilityPoolingClassifier,
)
from skpool.nn import GeneralizedMaxPool2d, SeparabilityPool2d
from testing_utils import CUDA_AVAILABLE

SMALL = {"module__width": 16, "module__n_stages": 2, "random_state": 0}


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).reshape(-1, 8, 8).astype(np.float32)
    return train_test_split(X, y, train_size=500, random_state=0, stratify=y)


@pytest.mark.parametrize("stage_pooling", ["strided", "avg", "max"])
@pytest.mark.parametrize("global_pool", ["avg", "max", "gmp", "mixed", "lse"])
def test_cnn_shapes(stage_pooling, global_pool):
    net = PoolingCNN(width=4, n_stages=2, stage_pooling=stage_pooling, global_pool=global_pool)
    assert net(torch.randn(3, 8, 8)).shape == (3, 10)
    assert net.stage_maps(torch.randn(3, 1, 8, 8), 1).shape[:2] == (3, 16)


def test_cnn_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="stage_pooling"):
        PoolingCNN(stage_pooling=("avg", "bogus", "max"))
    with pytest.raises(ValueError, match="global_pool"):
        PoolingCNN(global_pool="median")
    with pytest.raises(ValueError, match="expects images"):
        PoolingCNN(width=4)(torch.randn(2, 64))
    net = PoolingCNN(width=4, stage_pooling=("separability", "strided", "strided"))
    with pytest.raises(RuntimeError, match="no fitted operator"):
        net(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="not separability"):
        net.set_separability_pool(1, None)


@pytest.mark.parametrize(
    "X, y, error, match",
    [
        (np.zeros((10, 64)), np.zeros(10, dtype=int), ValueError, "Reshape flat digits"),
        (np.full((10, 8, 8), np.nan), np.zeros(10, dtype=int), ValueError, "NaN"),
        (np.zeros((10, 8, 8)), np.zeros(9, dtype=int), ValueError, "one label per image"),
        (np.zeros((10, 8, 8)), np.zeros(10), ValueError, "integer class indices"),
    ],
)
def test_classifiers_reject_bad_input(X, y, error, match):
    with pytest.raises(error, match=match):
        PoolingCNNClassifier(max_epochs=1, **SMALL).fit(X, y)


@pytest.mark.skipif(CUDA_AVAILABLE, reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error(digits):
    X_train, _, y_train, _ = digits
    with pytest.raises(ValueError, match="CUDA is not available"):
        PoolingCNNClassifier(device="cuda", max_epochs=1, **SMALL).fit(X_train[:20], y_train[:20])


def test_same_seed_same_network(digits):
    X_train, X_test, y_train, _ = digits
    first = PoolingCNNClassifier(max_epochs=2, **SMALL).fit(X_train[:200], y_train[:200])
    second = PoolingCNNClassifier(max_epochs=2, **SMALL).fit(X_train[:200], y_train[:200])
    np.testing.assert_array_equal(first.predict_proba(X_test), second.predict_proba(X_test))


@pytest.mark.slow
def test_dgmp_learns_digits_and_lambda_moves(digits):
    X_train, X_test, y_train, y_test = digits
    net = DGMPClassifier(max_epochs=10, module__lam=10.0, lam_lr_factor=10.0, **SMALL)
    net.fit(X_train, y_train)
    assert isinstance(net.module_.global_pool, GeneralizedMaxPool2d)
    assert np.mean(net.predict(X_test) == y_test) >= 0.9
    assert abs(float(net.module_.global_pool.lam.detach()) - 10.0) > 0.1
    groups = net.optimizer_.param_groups
    assert groups[-1]["lr"] == pytest.approx(10.0 * net.lr)  # λ's own learning rate


@pytest.mark.slow
def test_separability_classifier_runs_the_papers_procedure(digits):
    X_train, X_test, y_train, y_test = digits
    net = SeparabilityPoolingClassifier(max_epochs=10, stage=0, alpha=1.0, **SMALL)
    net.fit(X_train, y_train)
    assert np.mean(net.predict(X_test) == y_test) >= 0.9

    layer = net.module_.pools[0]
    assert isinstance(layer, SeparabilityPool2d)
    np.testing.assert_allclose(
        layer.operator.double().numpy(), net.separability_pooling_.operator_, rtol=1e-6, atol=1e-7
    )
    # The learned pooling separates the classes better than the average pooling it replaced,
    # on the stage's training maps of the first network.
    baseline = net.baseline_net_.module_.eval()
    with torch.no_grad():
        maps = baseline.stage_maps(torch.from_numpy(X_train), 0).permute(0, 2, 3, 1).numpy()
    ratios = net.separability_pooling_.separability_ratios(maps, y_train)
    assert np.all(ratios.learned[0] > ratios.average)

    restored = pickle.loads(pickle.dumps(net))
    np.testing.assert_allclose(restored.predict_proba(X_test), net.predict_proba(X_test))
    assert clone(net).get_params()["alpha"] == 1.0 and not hasattr(clone(net), "module_")


@pytest.mark.slow
def test_grid_searches_with_plain_sklearn_syntax(digits):
    X_train, _, y_train, _ = digits
    X, y = X_train[:300], y_train[:300]
    separability = GridSearchCV(
        SeparabilityPoolingClassifier(max_epochs=3, stage=0, **SMALL),
        {"alpha": [0.1, 10.0], "norm": ["l1", "l2"]},
        cv=2,
    ).fit(X, y)
    assert set(separability.best_params_) == {"alpha", "norm"}
    assert len(separability.cv_results_["mean_test_score"]) == 4
    dgmp = GridSearchCV(
        DGMPClassifier(max_epochs=3, **SMALL), {"module__lam": [1.0, 100.0]}, cv=2
    ).fit(X, y)
    assert dgmp.best_params_["module__lam"] in (1.0, 100.0)
    assert float(dgmp.best_estimator_.module_.global_pool.lam.detach()) != dgmp.best_params_["module__lam"]
