"""The skorch classifiers: labels, module arguments, parameters, the multi-stage procedure."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, train_test_split
from skorch.dataset import ValidSplit
from skorch.utils import data_from_dataset

import skpool.models as models_module
from skpool.models import (
    DGMPClassifier,
    PoolingCNNClassifier,
    ResNet18,
    SeparabilityPoolingClassifier,
)
from skpool.nn import GeneralizedMaxPool2d, SeparabilityPool2d
from testing_utils import CUDA_AVAILABLE

SMALL = {"module__width": 16, "module__n_stages": 2, "random_state": 0, "device": "cpu"}
TINY = {"module__width": 4, "module__n_stages": 2, "max_epochs": 1, "batch_size": 16,
        "random_state": 0, "device": "cpu"}
TINY_RESNET = {"module": ResNet18, "module__width_multiplier": 1 / 16, "max_epochs": 1,
               "batch_size": 16, "random_state": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).reshape(-1, 8, 8).astype(np.float32)
    return train_test_split(X, y, train_size=500, random_state=0, stratify=y)


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(0)
    return rng.random((30, 8, 8), dtype=np.float32), np.arange(30) % 3


# -- names, parameters -----------------------------------------------------------------------------
def test_skpool_models_loads_each_classifier_from_its_module():
    from skorch import NeuralNetClassifier

    for name in ("PoolingCNNClassifier", "DGMPClassifier", "SeparabilityPoolingClassifier"):
        assert name in models_module.__all__
        assert issubclass(getattr(models_module, name), NeuralNetClassifier), name


def test_dgmp_lists_its_module_defaults():
    params = DGMPClassifier().get_params()
    assert params["module__lam"] == 1.0 and params["module__global_pool"] == "gmp"
    assert params["module__lam_scale"] == "relative"
    layer = DGMPClassifier(module__lam_scale="absolute", module__lam=5.0).initialize()
    assert layer.module_.global_pool.lam_scale == "absolute"
    net = clone(DGMPClassifier(module__lam=3.0))
    assert net.get_params()["module__lam"] == 3.0
    assert net.set_params(module__lam=7.0).get_params()["module__lam"] == 7.0


def test_refit_does_not_claim_parameters_were_reset(small, capsys):
    X, y = small
    net = DGMPClassifier(**TINY).fit(X, y)
    capsys.readouterr()
    net.set_params(verbose=1)
    net.fit(X, y)
    out = capsys.readouterr().out
    assert "Re-initializing module." in out and "were re-set" not in out
    net.set_params(module__lam=5.0)
    out = capsys.readouterr().out
    assert "because the following parameters were re-set: module__lam." in out


def test_lam_learning_rate_is_a_skorch_param_group(small):
    X, y = small
    net = DGMPClassifier(**TINY, lr=0.01, lam_lr_factor=10.0,
                         optimizer__param_groups=[("head.*", {"lr": 0.5})]).fit(X, y)
    by_parameter = {id(p): group["lr"] for group in net.optimizer_.param_groups
                    for p in group["params"]}
    modules = dict(net.module_.named_parameters())
    # lr x factor: one float64 product
    assert by_parameter[id(modules["global_pool.log_lam"])] == pytest.approx(
        0.1, rel=np.finfo(np.float64).eps)
    assert by_parameter[id(modules["head.weight"])] == 0.5  # the user's group
    assert by_parameter[id(modules["stem.0.weight"])] == 0.01
    assert len(by_parameter) == len(modules)  # every parameter in exactly one group


# -- labels ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [np.array(["cat", "ant", "bee"]), np.array([11, 3, 7]),
                                   np.array([-2, 5, 0])])
def test_labels_as_scikit_learn_classifiers_take_them(small, names):
    X, codes = small
    y = names[codes]
    net = PoolingCNNClassifier(**TINY).fit(X, y)
    order = np.sort(names)
    np.testing.assert_array_equal(net.classes_, order)
    assert net.module_.head.out_features == 3 == net.inferred_module_params_["n_classes"]
    assert net.predict_proba(X).shape == (30, 3)
    # column j of predict_proba is classes_[j]: make the head favour column j alone
    for j in range(3):
        with torch.no_grad():
            net.module_.head.weight.zero_()
            net.module_.head.bias.copy_(torch.eye(3)[j] * 50)
        np.testing.assert_array_equal(net.predict(X[:4]), [order[j]] * 4)
        assert np.all(net.predict_proba(X[:4]).argmax(1) == j)
    # the loss sees class indices in classes_ order
    dataset = net.get_dataset(X, y)
    expected = [int(np.searchsorted(order, v)) for v in y]
    assert [int(dataset[i][1]) for i in range(6)] == expected[:6]
    np.testing.assert_array_equal(data_from_dataset(dataset)[1], expected)
    assert net.score(X, y) == np.mean(net.predict(X) == y)
    partial = PoolingCNNClassifier(**TINY).partial_fit(X, y)  # without fit first
    np.testing.assert_array_equal(partial.classes_, order)
    assert set(partial.predict(X)) <= set(names)


@pytest.mark.parametrize("use_caching", [True, False])
def test_internal_validation_scores_are_right_for_any_labels(small, use_caching):
    """skorch's valid_acc (cached or not) equals the accuracy of the final network on the
    validation fold, computed here from predict's labels."""
    X, codes = small
    X = X * 0.1 + codes[:, None, None]  # learnable in a few epochs
    y = np.array([3, 7, 11])[codes]
    split = ValidSplit(3, stratified=True)
    net = PoolingCNNClassifier(**{**TINY, "max_epochs": 4}, lr=0.02, train_split=split,
                               use_caching=use_caching).fit(X, y)
    _, valid = split(net.get_dataset(X, y), y)
    index = np.asarray(valid.indices)
    accuracy = np.mean(net.predict(X[index]) == y[index])
    # a ratio of counts, which skorch averages over batches weighted by their sizes: a few
    # roundings per batch of a number <= 1
    assert net.history[-1, "valid_acc"] == pytest.approx(
        accuracy, abs=(len(index) + 2) * np.finfo(np.float64).eps)
    assert accuracy > 0


def test_n_classes_from_labels_or_classes(small):
    X, codes = small
    with pytest.raises(ValueError, match="module__n_classes=10, but there are 3 classes"):
        PoolingCNNClassifier(**TINY, module__n_classes=10).fit(X, codes)
    net = PoolingCNNClassifier(**TINY, classes=[0, 1, 2, 3, 4]).fit(X, codes)
    assert net.module_.head.out_features == 5 and list(net.classes_) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"labels the classifier was not fitted with: \[9\]"):
        PoolingCNNClassifier(**TINY, classes=[0, 1, 2]).fit(X, np.where(codes == 2, 9, codes))
    with pytest.raises(ValueError, match="at least two classes"):  # as scikit-learn's
        PoolingCNNClassifier(**TINY).fit(X, np.full(30, "only"))
    with pytest.raises(ValueError, match="Unknown label type"):
        PoolingCNNClassifier(**TINY).fit(X, np.linspace(0, 1, 30))
    warm = PoolingCNNClassifier(**TINY, warm_start=True).fit(X, codes)
    with pytest.raises(ValueError, match="not fitted with"):
        warm.fit(X, codes + 1)


def test_module_arguments_from_the_data(small):
    X, codes = small
    rgb = np.repeat(X[:, None], 3, axis=1)  # (30, 3, 8, 8)
    net = PoolingCNNClassifier(**TINY_RESNET, module__stage_pooling=("sgd", "avg", "strided"))
    net.fit(rgb, codes)
    assert net.inferred_module_params_ == {"n_classes": 3, "in_channels": 3,
                                           "input_size": (8, 8)}
    assert net.module_.stem[0].in_channels == 3 and net.module_.pools[0].grid_shape == (8, 8)
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        net.predict(X)
    explicit = PoolingCNNClassifier(**TINY, module__in_channels=1)
    with pytest.raises(ValueError, match=r"expects images \(B, 1, H, W\)"):
        explicit.fit(rgb, codes)


def test_resnet_classifier_clone_pickle_set_params(small):
    X, codes = small
    net = PoolingCNNClassifier(**TINY_RESNET, module__global_pool="gmp", module__lam=2.0)
    fitted = net.fit(X, codes)
    assert isinstance(fitted.module_, ResNet18)
    assert isinstance(fitted.module_.global_pool, GeneralizedMaxPool2d)
    restored = pickle.loads(pickle.dumps(fitted))
    # exact: the same weights, the same code on the same data
    np.testing.assert_allclose(restored.predict_proba(X), fitted.predict_proba(X), rtol=0,
                               atol=0)
    copy = clone(fitted)
    assert not hasattr(copy, "module_") and copy.get_params()["module__lam"] == 2.0
    copy.set_params(module__width_multiplier=1 / 8).fit(X, codes)
    assert copy.module_.head.in_features == 64


@pytest.mark.skipif(CUDA_AVAILABLE, reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error(small):
    X, y = small
    with pytest.raises(ValueError, match="CUDA is not available"):
        PoolingCNNClassifier(**{**TINY, "device": "cuda"}).fit(X, y)


def test_same_seed_same_network(small):
    X, y = small
    first = PoolingCNNClassifier(**TINY).fit(X, y)
    second = PoolingCNNClassifier(**TINY).fit(X, y)
    # exact: the same seed, code, data and shapes (deterministic on CPU)
    np.testing.assert_array_equal(first.predict_proba(X), second.predict_proba(X))


# -- the separability procedure -------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, message",
    [
        ({"stage": (0, 1), "alpha": (1.0, 2.0, 3.0)}, r"alpha must be one value or one per stage"),
        ({"stage": (1, 1)}, "stage lists a point twice"),
        ({"stage": (0, 2)}, r"stage must be an integer in 0..1"),
        ({"stage": ()}, r"stage must be an integer in 0..1"),
        ({"norm": ("l2", "max"), "stage": (0, 1)}, "'norm' parameter"),
        ({"separability__stride": 3}, "separability__stride is not a SeparabilityPooling"),
        ({"separability__alpha": 3.0}, "separability__alpha is not"),
        ({"separability__bogus": 1}, "separability__bogus is not"),
        ({"separability__dtype": "float16"}, "'dtype' parameter"),
        ({"max_samples_per_class": 0}, "max_samples_per_class must be an int >= 1"),
        ({"module__stage_pooling": ("strided", "separability")},
         "'separability' at a point not in stage"),
    ],
)
def test_procedure_checks_its_parameters_before_training(small, params, message, monkeypatch):
    X, y = small
    net = SeparabilityPoolingClassifier(**{**TINY, **params})
    monkeypatch.setattr(PoolingCNNClassifier, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=message):
        net.fit(X, y)


def test_procedure_needs_a_module_class(small):
    X, y = small
    with pytest.raises(TypeError, match="give the module class"):
        SeparabilityPoolingClassifier(ResNet18(in_channels=1, width_multiplier=1 / 16)).fit(X, y)


def test_procedure_parameters_come_from_one_place():
    net = SeparabilityPoolingClassifier(separability__support_radius=2.0, module__width=4)
    net_params = net._net_params()
    for name in ("stage", "alpha", "norm", "n_components", "baseline_pooling", "retrain",
                 "max_samples_per_class", "separability__support_radius"):
        assert name not in net_params
    assert net_params["module__width"] == 4 and "lr" in net_params
    copy = clone(net)
    assert copy.get_params()["separability__support_radius"] == 2.0
    copy.set_params(separability__support_radius=3.0, alpha=(1.0, 2.0))
    assert copy.get_params()["separability__support_radius"] == 3.0
    assert copy.get_params()["alpha"] == (1.0, 2.0)


def test_capped_samples_per_class():
    labels = np.repeat([0, 1, 2], [5, 12, 2])
    net = SeparabilityPoolingClassifier(max_samples_per_class=4, random_state=3)
    chosen = net._capped_indices(labels)
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [4, 4, 2])
    np.testing.assert_array_equal(chosen, net._capped_indices(labels))  # same seed, same draw
    assert len(np.unique(chosen)) == len(chosen)
    net.set_params(max_samples_per_class=None)
    np.testing.assert_array_equal(net._capped_indices(labels), np.arange(len(labels)))


@pytest.mark.slow
def test_procedure_learns_points_in_the_order_given(small):
    X, codes = small
    y = np.array([3, 7, 11])[codes]
    net = SeparabilityPoolingClassifier(
        **TINY, stage=(1, 0), alpha=(15.0, 65.0), norm=("l2", "l1"), n_components=(2, 1),
        separability__support_radius=3.0, max_samples_per_class=6,
    ).fit(X, y)
    first, second = net.separability_poolings_
    assert (first.alpha, first.norm, first.n_components) == (15.0, "l2", 2)
    assert (second.alpha, second.norm, second.n_components) == (65.0, "l1", 1)
    assert first.grid_shape_ == (4, 4) and second.grid_shape_ == (8, 8)
    assert first.support_radius == second.support_radius == 3.0
    assert first.stride == net.module_.stage_stride == 2
    assert sorted(first.classes_) == [0, 1, 2]  # fitted on the class indices
    nets = net.intermediate_nets_
    assert nets[0] is net.baseline_net_ and nets[0].module_.stage_pooling == ("avg", "avg")
    assert nets[1].module_.stage_pooling == ("avg", "separability")
    assert net.module_.stage_pooling == ("separability", "separability")
    # the intermediate net already pools stage 1 with the first operator: a float32 copy,
    # within half an ulp (round to nearest)
    np.testing.assert_allclose(nets[1].module_.pools[1].operator.double().numpy(),
                               first.operator_, rtol=np.finfo(np.float32).eps / 2, atol=0)
    for point, estimator in ((1, first), (0, second)):
        layer = net.module_.pools[point]
        assert isinstance(layer, SeparabilityPool2d) and layer.channel_mean is None
        np.testing.assert_allclose(layer.operator.double().numpy(), estimator.operator_,
                                   rtol=np.finfo(np.float32).eps / 2, atol=0)  # float32 copy
    # width-true: the final network has the strided widths (stage 0: k = 1, stage 1: k = 2)
    assert net.module_.convs[0][0].out_channels == 8 and net.module_.convs[1][0].out_channels == 8
    assert set(net.predict(X)) <= {3, 7, 11}


@pytest.mark.slow
def test_separability_classifier_runs_the_papers_procedure(digits):
    X_train, X_test, y_train, y_test = digits
    net = SeparabilityPoolingClassifier(max_epochs=10, stage=0, alpha=1.0, **SMALL)
    net.fit(X_train, y_train)
    assert np.mean(net.predict(X_test) == y_test) >= 0.9
    layer = net.module_.pools[0]
    np.testing.assert_allclose(  # a float32 copy: within half an ulp (round to nearest)
        layer.operator.double().numpy(), net.separability_pooling_.operator_,
        rtol=np.finfo(np.float32).eps / 2, atol=0)
    # The learned pooling separates the classes better than the average pooling it replaced,
    # on the stage's training maps of the first network.
    baseline = net.baseline_net_.module_.eval()
    with torch.no_grad():
        maps = baseline.stage_maps(torch.from_numpy(X_train), 0).permute(0, 2, 3, 1).numpy()
    ratios = net.separability_pooling_.separability_ratios(maps, y_train)
    assert np.all(ratios.learned[0] > ratios.average)
    restored = pickle.loads(pickle.dumps(net))
    # exact: the same weights, the same code on the same data
    np.testing.assert_array_equal(restored.predict_proba(X_test), net.predict_proba(X_test))
    assert clone(net).get_params()["alpha"] == 1.0 and not hasattr(clone(net), "module_")


@pytest.mark.slow
def test_dgmp_learns_digits_and_lambda_moves(digits):
    X_train, X_test, y_train, y_test = digits
    net = DGMPClassifier(max_epochs=10, module__lam=10.0, lam_lr_factor=10.0, **SMALL)
    net.fit(X_train, y_train)
    assert isinstance(net.module_.global_pool, GeneralizedMaxPool2d)
    assert np.mean(net.predict(X_test) == y_test) >= 0.9
    assert abs(float(net.module_.global_pool.lam.detach()) - 10.0) > 0.1


@pytest.mark.slow
def test_sgd_pooling_is_learned_with_the_network(digits):
    X_train, _, y_train, _ = digits
    net = PoolingCNNClassifier(**{**TINY, "max_epochs": 3},
                               module__stage_pooling=("sgd", "strided")).fit(X_train, y_train)
    pool = net.module_.pools[0]
    start = pool.__class__((8, 8), n_components=2).operator
    assert (pool.operator.detach() - start).abs().max() > 1e-3  # moved from average pooling


@pytest.mark.slow
def test_grid_searches_with_plain_sklearn_syntax(digits):
    X_train, _, y_train, _ = digits
    X, y = X_train[:200], np.array(list("abcdefghij"))[y_train[:200]]
    resnet = GridSearchCV(
        SeparabilityPoolingClassifier(**TINY_RESNET, stage=(2, 0), norm=("l2", "l1")),
        {"alpha": [(15.0, 65.0), (1.0, 1.0)], "n_components": [2, 1]},
        cv=2,
    ).fit(X, y)
    assert set(resnet.best_params_) == {"alpha", "n_components"}
    assert len(resnet.cv_results_["mean_test_score"]) == 4
    assert isinstance(resnet.best_estimator_.module_, ResNet18)
    assert set(resnet.predict(X)) <= set("abcdefghij")
    dgmp = GridSearchCV(DGMPClassifier(**TINY_RESNET), {"module__lam": [1.0, 100.0]},
                        cv=2).fit(X, y)
    assert dgmp.best_params_["module__lam"] in (1.0, 100.0)
    learned = float(dgmp.best_estimator_.module_.global_pool.lam.detach())
    assert learned != dgmp.best_params_["module__lam"]
    pooling = GridSearchCV(
        PoolingCNNClassifier(**TINY_RESNET),
        {"module__stage_pooling": ["strided", ("avg", "sgd", "max")]}, cv=2,
    ).fit(X, y)
    assert len(pooling.cv_results_["mean_test_score"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("module", ["skpool.models._skorch", "skpool.models._procedure"])
def test_classifier_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
