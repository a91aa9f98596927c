"""Issue 28, class 1: a failed refit leaves the previous fitted state intact, for the skorch
models too (the estimators' faults are in test_faults.py). Failures before training (a None
label, NaN images, one class, a bad module parameter) and during it (a fault in the second
training step, also with ``warm_start`` and ``partial_fit``, which train in place)."""

from unittest import mock

import numpy as np
import pytest
import torch

from reliability.helpers import TINY_NET, digits_like
from skpool.models import DGMPClassifier, PoolingCNNClassifier
from skpool.models.retrieval import DGMPEmbedder, PoolingEmbedder

IMAGES, CODES = digits_like(seed=0, n_samples=24, n_classes=3)
LABELS = np.array(["a", "b", "c"], dtype=object)[CODES]
OTHER, OTHER_CODES = digits_like(seed=1, n_samples=24, n_classes=3)
OTHER_LABELS = np.array(["x", "y", "z"], dtype=object)[OTHER_CODES]

CLASSIFIERS = {"pooling": PoolingCNNClassifier, "dgmp": DGMPClassifier}
EMBEDDERS = {"embedder": PoolingEmbedder, "dgmp-embedder": DGMPEmbedder}
EMBEDDER_NET = {**TINY_NET, "n_labels_per_batch": 3, "n_samples_per_label": 2}


def _with_none(labels):
    bad = labels.copy()
    bad[0] = None
    return bad


def _nan_images():
    bad = OTHER.copy()
    bad[3, 2, 2] = np.nan
    return bad


BAD_REFITS = {
    "none-label": lambda: (OTHER, _with_none(OTHER_LABELS)),
    "nan-image": lambda: (_nan_images(), OTHER_LABELS),
    "empty": lambda: (OTHER[:0], OTHER_LABELS[:0]),
    "wrong-length": lambda: (OTHER, OTHER_LABELS[:-1]),
}


def _state(net):
    """What a fitted net answers: its classes, its weights and its history length."""
    weights = {k: v.clone() for k, v in net.module_.state_dict().items()}
    return {"classes": getattr(net, "classes_", None), "weights": weights,
            "epochs": len(net.history_)}


def _assert_state(net, before, outputs, answer):
    if before["classes"] is not None:
        np.testing.assert_array_equal(net.classes_, before["classes"])
    now = net.module_.state_dict()
    for key, value in before["weights"].items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0)  # untouched: bitwise
    assert len(net.history_) == before["epochs"]
    np.testing.assert_array_equal(answer(net), outputs)  # the same weights, the same code


@pytest.mark.parametrize("case", list(BAD_REFITS))
@pytest.mark.parametrize("kind", list(CLASSIFIERS))
def test_classifier_bad_refit_keeps_the_fit(kind, case):
    net = CLASSIFIERS[kind](**TINY_NET, random_state=0).fit(IMAGES, LABELS)
    before, predicted = _state(net), net.predict(IMAGES)
    X, y = BAD_REFITS[case]()
    with pytest.raises(ValueError):
        net.fit(X, y)
    _assert_state(net, before, predicted, lambda n: n.predict(IMAGES))
    assert set(net.predict(IMAGES)) <= {"a", "b", "c"}  # labels, not class indices


@pytest.mark.parametrize("kind", list(CLASSIFIERS))
def test_classifier_one_class_refit_keeps_the_fit(kind):
    net = CLASSIFIERS[kind](**TINY_NET, random_state=0).fit(IMAGES, LABELS)
    before, predicted = _state(net), net.predict(IMAGES)
    with pytest.raises(ValueError, match="at least two classes"):
        net.fit(OTHER, np.full(len(OTHER), "x", dtype=object))
    _assert_state(net, before, predicted, lambda n: n.predict(IMAGES))


class Fault(RuntimeError):
    pass


def _fault_on_second_step(net_class):
    original = net_class.train_step
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Fault("injected in the second training step")
        return original(self, *args, **kwargs)

    return mock.patch.object(net_class, "train_step", flaky)


# DGMPClassifier routes its module__ defaults to the module: it takes a class, not an instance
MODES = [(kind, mode) for kind in CLASSIFIERS
         for mode in ("fit", "warm_start", "partial_fit", "module-instance")
         if (kind, mode) != ("dgmp", "module-instance")]


@pytest.mark.parametrize("kind, mode", MODES)
def test_classifier_fault_during_training_keeps_the_fit(kind, mode):
    params = {**TINY_NET, "random_state": 0, "batch_size": 8}
    if mode == "module-instance":  # trained in place: the module the user gave is restored
        from skpool.models import PoolingCNN

        module = PoolingCNN(width=4, n_stages=2, n_classes=3)
        params = {k: v for k, v in params.items() if not k.startswith("module__")}
        net = CLASSIFIERS[kind](module, **params)
    else:
        net = CLASSIFIERS[kind](**params, warm_start=mode == "warm_start")
    net.fit(IMAGES, LABELS)
    before, predicted = _state(net), net.predict(IMAGES)
    with _fault_on_second_step(CLASSIFIERS[kind]), pytest.raises(Fault):
        if mode == "partial_fit":
            net.partial_fit(IMAGES, LABELS)
        else:
            net.fit(IMAGES, LABELS)
    _assert_state(net, before, predicted, lambda n: n.predict(IMAGES))


@pytest.mark.parametrize("case", ["none-label", "nan-image", "empty"])
@pytest.mark.parametrize("kind", list(EMBEDDERS))
def test_embedder_bad_refit_keeps_the_fit(kind, case):
    net = EMBEDDERS[kind](**EMBEDDER_NET, random_state=0).fit(IMAGES, LABELS)
    before, embedded = _state(net), net.transform(IMAGES)
    X, y = BAD_REFITS[case]()
    with pytest.raises(ValueError):
        net.fit(X, y)
    _assert_state(net, before, embedded, lambda n: n.transform(IMAGES))


@pytest.mark.parametrize("kind", list(EMBEDDERS))
def test_embedder_fault_during_training_keeps_the_fit(kind):
    net = EMBEDDERS[kind](**EMBEDDER_NET, random_state=0).fit(IMAGES, LABELS)
    before, embedded = _state(net), net.transform(IMAGES)
    with _fault_on_second_step(EMBEDDERS[kind]), pytest.raises(Fault):
        net.fit(OTHER, OTHER_LABELS)
    _assert_state(net, before, embedded, lambda n: n.transform(IMAGES))
    np.testing.assert_array_equal(net.classes_, np.unique(LABELS))


def test_separability_classifier_fault_in_its_final_training_keeps_the_fit():
    """SeparabilityPoolingClassifier's own ``fit`` (baseline net, operators, final net) is
    atomic as a whole: PoolingCNNClassifier wraps every subclass's fit."""
    from skpool.models import SeparabilityPoolingClassifier

    net = SeparabilityPoolingClassifier(**TINY_NET, random_state=0).fit(IMAGES, LABELS)
    before, predicted = _state(net), net.predict(IMAGES)
    operator = net.separability_pooling_
    calls = {"n": 0}
    original = PoolingCNNClassifier.train_step

    def flaky(self, *args, **kwargs):  # the baseline trains in 2 steps; fail in the final net
        calls["n"] += 1
        if calls["n"] == 4:
            raise Fault("injected in the final training")
        return original(self, *args, **kwargs)

    with mock.patch.object(PoolingCNNClassifier, "train_step", flaky), pytest.raises(Fault):
        net.fit(OTHER, OTHER_LABELS)
    assert net.separability_pooling_ is operator
    _assert_state(net, before, predicted, lambda n: n.predict(IMAGES))
