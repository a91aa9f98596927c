"""Robustness metrics: hand-computed cases, slow loop references, extreme classifiers, and
measuring a real scikit-learn classifier."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from skpool.datasets import make_svhn_like
from skpool.evaluation import (
    CORRUPTIONS,
    NOISE_PERTURBATIONS,
    PERTURBATIONS,
    corrupt,
    corruption_error,
    evaluate_corruptions,
    evaluate_perturbations,
    flip_probability,
    flip_rate,
    mean_corruption_error,
    mean_flip_rate,
    perturbation_predictions,
)

# ---------------------------------------------------------------------------- slow references


def reference_flip_probability(predictions, noise):
    """Hendrycks & Dietterich's FP, written as the double sum over sequences and frames."""
    m, n = len(predictions), len(predictions[0])
    flips = 0
    for i in range(m):
        for j in range(1, n):
            earlier = predictions[i][0] if noise else predictions[i][j - 1]
            flips += predictions[i][j] != earlier
    return flips / (m * (n - 1))


def reference_corruption_error(errors, baseline):
    """In percent."""
    total, baseline_total = 0.0, 0.0
    for e, b in zip(errors, baseline, strict=True):
        total += e
        baseline_total += b
    return 100 * total / baseline_total


# ---------------------------------------------------------------------------- the formulas


def test_corruption_error_by_hand():
    # percent, as Hendrycks & Dietterich report CE: 1.5 / 1.0 -> 150
    assert corruption_error([0.1, 0.2, 0.3, 0.4, 0.5], [0.2] * 5) == pytest.approx(150.0)
    assert corruption_error([0.0, 0.1], [0.3, 0.1]) == pytest.approx(25.0)
    # mCE: CE 150 and 50 -> mean 100 (percent, like its CEs)
    errors = {"a": [0.1, 0.2, 0.3, 0.4, 0.5], "b": [0.05] * 5}
    baseline = {"a": [0.2] * 5, "b": [0.1] * 5}
    assert mean_corruption_error(errors, baseline) == pytest.approx(100.0)


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float64, 5, elements=st.floats(0, 1)),
    arrays(np.float64, 5, elements=st.floats(0.01, 1)),
)
def test_corruption_error_matches_the_loop(errors, baseline):
    # a sum of 5 numbers in [0, 1] and one division: relative roundoff ~ 5 * 1.1e-16
    assert corruption_error(errors, baseline) == pytest.approx(
        reference_corruption_error(errors, baseline), rel=1e-14, abs=1e-300
    )


def test_flip_probability_by_hand():
    predictions = [[0, 0, 1, 1], [2, 3, 2, 2]]
    # consecutive: row 1 flips once (0->1), row 2 flips twice (2->3->2): 3 of 6 pairs
    assert flip_probability(predictions) == pytest.approx(3 / 6)
    # with the first frame: row 1 differs at frames 3, 4; row 2 at frame 2: 3 of 6
    assert flip_probability([[0, 0, 1, 1], [2, 3, 2, 2]], reference="first") == pytest.approx(3 / 6)
    assert flip_probability([[1, 2, 1, 2]], reference="first") == pytest.approx(2 / 3)
    assert flip_probability([["cat", "dog"], ["dog", "dog"]]) == pytest.approx(0.5)
    assert flip_rate(0.1, 0.2) == pytest.approx(50.0)  # percent
    # FR 50 and 150 -> mFR 100 (percent, like its FRs)
    assert mean_flip_rate({"a": 0.1, "b": 0.3}, {"a": 0.2, "b": 0.2}) == pytest.approx(100.0)


def test_the_relative_metrics_share_one_scale_percent():
    """A classifier as good as its baseline scores 100 on all four (Hendrycks & Dietterich's
    convention), a twice-as-bad one 200: none is a ratio near 1, none is scaled twice."""
    errors, doubled = {"a": [0.1, 0.2], "b": [0.3, 0.05]}, {"a": [0.2, 0.4], "b": [0.6, 0.1]}
    fp, doubled_fp = {"x": 0.1, "y": 0.25}, {"x": 0.2, "y": 0.5}
    assert corruption_error(errors["a"], errors["a"]) == pytest.approx(100.0)
    assert mean_corruption_error(errors, errors) == pytest.approx(100.0)
    assert flip_rate(fp["x"], fp["x"]) == pytest.approx(100.0)
    assert mean_flip_rate(fp, fp) == pytest.approx(100.0)
    assert corruption_error(doubled["b"], errors["b"]) == pytest.approx(200.0)
    assert mean_corruption_error(doubled, errors) == pytest.approx(200.0)
    assert flip_rate(doubled_fp["y"], fp["y"]) == pytest.approx(200.0)
    assert mean_flip_rate(doubled_fp, fp) == pytest.approx(200.0)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda m: st.integers(2, 7).flatmap(
            lambda n: arrays(np.int64, (m, n), elements=st.integers(0, 2))
        )
    ),
    st.booleans(),
)
def test_flip_probability_matches_the_double_loop(predictions, noise):
    reference = "first" if noise else "previous"
    # a mean of at most 36 indicators: roundoff ~ 36 * 1.1e-16
    assert flip_probability(predictions, reference=reference) == pytest.approx(
        reference_flip_probability(predictions.tolist(), noise), rel=1e-13, abs=1e-15
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: corruption_error([0.1, 0.2], [0.0, 0.0]), "baseline makes no error"),
        (lambda: corruption_error([0.1, 0.2], [0.1, 0.2, 0.3]), "one value per severity"),
        (lambda: corruption_error([0.1, 1.2], [0.1, 0.2]), r"rates in \[0, 1\]"),
        (lambda: corruption_error([0.1, np.nan], [0.1, 0.2]), r"rates in \[0, 1\]"),
        (lambda: corruption_error([], []), "non-empty"),
        (lambda: mean_corruption_error({"a": [0.1]}, {"b": [0.1]}), "same corruptions"),
        (lambda: mean_corruption_error({}, {}), "No corruptions"),
        (lambda: flip_probability([0, 1, 0]), r"shape \(m, n\)"),
        (lambda: flip_probability([[0], [1]]), r"shape \(m, n\)"),
        (lambda: flip_probability([[0, 1]], reference="last"), "reference"),
        (lambda: flip_rate(0.1, 0.0), "flip rate is undefined"),
        (lambda: flip_rate([0.1, 0.2], 0.1), "one number"),
        (lambda: mean_flip_rate({"a": 0.1}, {"a": 0.2, "b": 0.1}), "same perturbations"),
    ],
)
def test_undefined_or_malformed_metrics_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------- extreme classifiers


class Constant:
    def predict(self, X):
        return np.zeros(len(X), dtype=np.int64)


class FlipsEveryCall:
    """Predicts 0, 1, 0, 1, ... on successive calls (one call per frame)."""

    def __init__(self):
        self.calls = 0

    def predict(self, X):
        self.calls += 1
        return np.full(len(X), self.calls % 2)


class ChangesAfterFirstCall:
    def __init__(self):
        self.calls = 0

    def predict(self, X):
        self.calls += 1
        return np.full(len(X), int(self.calls > 1))


@pytest.fixture(scope="module")
def data():
    # without distractors, clutter and noise a linear model learns something (~70% accuracy)
    return make_svhn_like(600, 60, random_state=0, distractors=False, clutter=False, noise=0.0)


def test_a_constant_classifier_never_flips(data):
    fps = evaluate_perturbations(Constant(), data.X_test[:6], n_frames=4)
    assert set(fps) == set(PERTURBATIONS)
    assert all(fp == 0 for fp in fps.values())


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_a_classifier_that_flips_every_frame_has_fp_one(data, perturbation):
    X = data.X_test[:5]

    def fp(classifier):
        return evaluate_perturbations(classifier, X, perturbations=[perturbation], n_frames=5)[
            perturbation
        ]

    if perturbation in NOISE_PERTURBATIONS:
        # compared with the first (clean) frame: every later frame differs -> 1; a classifier
        # alternating 1, 0, 1, 0, 1 matches the first frame at 2 of the 4 later frames -> 0.5
        assert fp(ChangesAfterFirstCall()) == 1
        assert fp(FlipsEveryCall()) == pytest.approx(0.5)
    else:
        assert fp(FlipsEveryCall()) == 1


# ---------------------------------------------------------------------------- a real classifier


def _polarity_free(X):
    """|grey - median| per image, 2x2-averaged: dark-on-light and light-on-dark alike."""
    grey = X.mean(axis=1)
    grey = np.abs(grey - np.median(grey.reshape(len(X), -1), axis=1)[:, None, None])
    return grey.reshape(len(X), 16, 2, 16, 2).mean(axis=(2, 4)).reshape(len(X), -1)


@pytest.fixture(scope="module")
def classifier(data):
    model = make_pipeline(
        FunctionTransformer(_polarity_free), StandardScaler(), LogisticRegression(C=0.1)
    )
    return model.fit(data.X_train, data.y_train)


def test_evaluate_corruptions_counts_the_errors_of_each_severity(data, classifier):
    X, y = data.X_test, data.y_test
    errors = evaluate_corruptions(
        classifier, X, y, corruptions=["rotate", "contrast"], random_state=3
    )
    assert set(errors) == {"rotate", "contrast"} and errors["rotate"].shape == (5,)
    for name, values in errors.items():
        for s, value in zip(range(1, 6), values, strict=True):
            wrong = 0
            corrupted = corrupt(X, name, s, random_state=3)
            for image, label in zip(corrupted, y, strict=True):  # one image at a time
                wrong += classifier.predict(image[None])[0] != label
            assert value == pytest.approx(wrong / len(y), abs=1e-15)
    # the same model as its own baseline has CE 100 (percent) on every corruption
    assert mean_corruption_error(errors, errors) == pytest.approx(100.0)


@pytest.mark.parametrize("corruption", ["contrast", "gaussian_blur", "pixelate", "zoom_blur"])
def test_deterministic_corruptions_do_not_depend_on_the_batch(data, classifier, corruption):
    X, y = data.X_test[:20], data.y_test[:20]
    batched = evaluate_corruptions(classifier, X, y, corruptions=[corruption])[corruption]
    single = np.zeros(5)
    for i in range(len(X)):  # each image corrupted on its own
        one = evaluate_corruptions(classifier, X[i : i + 1], y[i : i + 1], corruptions=[corruption])
        single += one[corruption]
    np.testing.assert_allclose(batched, single / len(X), atol=1e-12)


def test_all_corruptions_and_a_baseline(data, classifier):
    X, y = data.X_test, data.y_test
    errors = evaluate_corruptions(classifier, X, y, severities=(1, 5))
    assert set(errors) == set(CORRUPTIONS)
    again = evaluate_corruptions(classifier, X, y, severities=(1, 5))
    for name in CORRUPTIONS:  # the same seed: the same corrupted images, the same errors
        np.testing.assert_array_equal(errors[name], again[name])
    baseline = evaluate_corruptions(Constant(), X, y, severities=(1, 5))
    chance = np.mean(y != 0)
    for name in CORRUPTIONS:
        np.testing.assert_allclose(baseline[name], chance)
    mild = {name: values[:1] for name, values in errors.items()}  # severity 1
    mild_baseline = {name: values[:1] for name, values in baseline.items()}
    assert mean_corruption_error(mild, mild_baseline) < 100  # better than always saying 0


def test_perturbation_predictions_are_the_per_frame_predictions(data, classifier):
    X = data.X_test[:10]
    predictions = perturbation_predictions(classifier, X, "rotate", n_frames=4)
    assert predictions.shape == (10, 4)
    from skpool.evaluation import perturbation_sequence

    frames = perturbation_sequence(X, "rotate", n_frames=4)
    for j in range(4):
        np.testing.assert_array_equal(predictions[:, j], classifier.predict(frames[:, j]))
    fp = evaluate_perturbations(classifier, X, perturbations=["rotate"], n_frames=4)["rotate"]
    assert fp == pytest.approx(reference_flip_probability(predictions.tolist(), noise=False))


class WrongShape:
    def predict(self, X):
        return np.zeros((len(X), 2))


@pytest.mark.parametrize(
    "estimator, change, error, match",
    [
        (object(), {}, TypeError, "predict"),
        (WrongShape(), {}, ValueError, "one label per image"),
        (Constant(), {"y": "short"}, ValueError, "y must have shape"),
        (Constant(), {"corruptions": ["fog"]}, ValueError, "corruptions must be"),
        (Constant(), {"severities": [0, 1]}, ValueError, "severities"),
        (Constant(), {"severities": [2, 2]}, ValueError, "repeat"),
        (Constant(), {"X": "scaled to 255"}, ValueError, "value_range"),
    ],
)
def test_bad_corruption_evaluation_arguments(data, estimator, change, error, match):
    arguments = {"X": data.X_test, "y": data.y_test, **change}
    if isinstance(arguments["y"], str):  # "short"
        arguments["y"] = data.y_test[:-1]
    if isinstance(arguments["X"], str):  # "scaled to 255"
        arguments["X"] = data.X_test * 255
    with pytest.raises(error, match=match):
        evaluate_corruptions(estimator, **arguments)


@pytest.mark.parametrize(
    "estimator, perturbations, error, match",
    [
        (Constant(), ["fog"], ValueError, "perturbations must be"),
        (object(), None, TypeError, "predict"),
    ],
)
def test_bad_perturbation_evaluation_arguments(data, estimator, perturbations, error, match):
    with pytest.raises(error, match=match):
        evaluate_perturbations(estimator, data.X_test, perturbations=perturbations)
