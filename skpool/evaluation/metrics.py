r"""Robustness metrics of Hendrycks & Dietterich (2019): corruption error and flip rate.

D. Hendrycks and T. Dietterich, *Benchmarking Neural Network Robustness to Common Corruptions
and Perturbations*, ICLR 2019 (CIFAR-10-C and CIFAR-10-P); Birodkar et al. (2019, Tables 2–3)
report them for separability pooling against a strided baseline.

Every relative metric is in percent, as Hendrycks & Dietterich report CE, mCE, FR and mFR:
100 means "as the baseline", below 100 more robust. The flip probability is a fraction.

- **Corruption error** of a classifier f on corruption c, relative to a baseline classifier:

  .. math:: \mathrm{CE}_c = 100 \sum_{s=1}^{5} E_{s,c}(f) \Big/ \sum_{s=1}^{5} E_{s,c}(\text{baseline}),

  with :math:`E_{s,c}` the top-1 error on the test set corrupted by c at severity s;
  the **mean corruption error** mCE is the mean of :math:`\mathrm{CE}_c` over the
  corruptions, also in percent.
- **Flip probability** over m sequences of n frames :math:`x^{(i)}_1..x^{(i)}_n`:

  .. math:: \mathrm{FP} = \frac{1}{m(n-1)} \sum_{i=1}^m \sum_{j=2}^n
            \mathbb{1}\big[f(x^{(i)}_j) \ne f(x^{(i)}_{j-1})\big],

  and for noise sequences, whose frames are not ordered in time,
  :math:`\mathbb{1}[f(x^{(i)}_j) \ne f(x^{(i)}_1)]` (the first frame is the clean image).
  The **flip rate** is :math:`\mathrm{FR} = 100\, \mathrm{FP}(f) / \mathrm{FP}(\text{baseline})`
  in percent, and mFR the mean flip rate over perturbations, also in percent.

:func:`evaluate_corruptions` and :func:`evaluate_perturbations` measure the errors and flip
probabilities of any object with a ``predict`` method that takes images (n, C, H, W) — the
skorch classifiers of :mod:`skpool.models`, or a scikit-learn pipeline that starts by
flattening them. Pass the same integer ``random_state`` for a model and its baseline so that
both see the same corrupted images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from numbers import Integral

import numpy as np

from ._images import check_images, seed_from
from .corruptions import CORRUPTIONS, corrupt
from .perturbations import NOISE_PERTURBATIONS, PERTURBATIONS, iter_frames

__all__ = [
    "corruption_error",
    "mean_corruption_error",
    "flip_probability",
    "flip_rate",
    "mean_flip_rate",
    "evaluate_corruptions",
    "evaluate_perturbations",
    "perturbation_predictions",
]

# ------------------------------------------------------------------------------ the formulas


def corruption_error(errors, baseline_errors) -> float:
    r"""Corruption error in percent, :math:`\mathrm{CE}_c = 100 \sum_s E_{s,c}(f) / \sum_s E_{s,c}(\mathrm{base})`.

    Parameters
    ----------
    errors, baseline_errors : array-like of shape (n_severities,)
        Top-1 error rates in [0, 1] of the classifier and of the baseline on one corruption,
        one per severity (the same severities, in the same order).

    Returns
    -------
    ce : float
        In percent: 100 when both make as many errors, below 100 for the more robust
        classifier.

    Raises
    ------
    ValueError
        When the baseline makes no error at all (CE is then undefined).
    """
    errors = _check_rates(errors, "errors")
    baseline = _check_rates(baseline_errors, "baseline_errors")
    if errors.shape != baseline.shape:
        raise ValueError(
            f"errors and baseline_errors need one value per severity each; got shapes "
            f"{errors.shape} and {baseline.shape}."
        )
    if baseline.sum() == 0:
        raise ValueError("The baseline makes no error at any severity: CE is undefined.")
    return 100.0 * float(errors.sum() / baseline.sum())


def mean_corruption_error(errors: Mapping, baseline_errors: Mapping) -> float:
    r"""mCE in percent: the mean of :math:`\mathrm{CE}_c` (percent) over corruptions
    (Hendrycks & Dietterich).

    Parameters
    ----------
    errors, baseline_errors : mapping of corruption name to array-like (n_severities,)
        As returned by :func:`evaluate_corruptions`, with the same corruptions.

    Returns
    -------
    mce : float
        In percent: 100 as robust as the baseline, below 100 more robust.
    """
    names = _same_keys(errors, baseline_errors, "corruptions")
    return float(np.mean([corruption_error(errors[c], baseline_errors[c]) for c in names]))


def flip_probability(predictions, *, reference="previous") -> float:
    r"""Flip probability of predictions over perturbation sequences (Hendrycks & Dietterich).

    .. math:: \mathrm{FP} = \frac{1}{m(n-1)} \sum_{i=1}^m \sum_{j=2}^n
              \mathbb{1}\big[f(x^{(i)}_j) \ne f(x^{(i)}_{r(j)})\big],

    with r(j) = j − 1 (``reference="previous"``, for sequences ordered in time) or
    r(j) = 1 (``reference="first"``, for noise sequences, whose first frame is the clean
    image).

    Parameters
    ----------
    predictions : array-like of shape (m, n)
        Predicted labels (any comparable type) of frame j of sequence i, n >= 2.
    reference : {"previous", "first"}, default="previous"

    Returns
    -------
    fp : float in [0, 1]
        0 for a classifier that never changes its answer along a sequence, 1 for one that
        changes it at every frame.
    """
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[0] < 1 or predictions.shape[1] < 2:
        raise ValueError(
            "predictions must have shape (m, n): m >= 1 sequences of n >= 2 frames; got shape "
            f"{predictions.shape}."
        )
    if reference == "previous":
        compared = predictions[:, :-1]
    elif reference == "first":
        compared = predictions[:, :1]
    else:
        raise ValueError(f'reference must be "previous" or "first", got {reference!r}.')
    return float(np.mean(predictions[:, 1:] != compared))


def flip_rate(flip_probability, baseline_flip_probability) -> float:
    r"""Flip rate in percent, :math:`\mathrm{FR} = 100\, \mathrm{FP}(f) / \mathrm{FP}(\text{baseline})`.

    Parameters
    ----------
    flip_probability, baseline_flip_probability : float in [0, 1]
        Flip probabilities (:func:`flip_probability`) of the classifier and of the baseline
        on one perturbation.

    Returns
    -------
    fr : float
        In percent: 100 when both flip as often, below 100 when the classifier flips less.

    Raises
    ------
    ValueError
        When the baseline never flips (FR is then undefined).
    """
    fp = _check_rates(flip_probability, "flip_probability", scalar=True)
    baseline = _check_rates(baseline_flip_probability, "baseline_flip_probability", scalar=True)
    if baseline == 0:
        raise ValueError("The baseline's flip probability is 0: the flip rate is undefined.")
    return 100.0 * float(fp / baseline)


def mean_flip_rate(flip_probabilities: Mapping, baseline_flip_probabilities: Mapping) -> float:
    """mFR in percent: the mean flip rate (percent) over perturbations.

    Parameters
    ----------
    flip_probabilities, baseline_flip_probabilities : mapping of perturbation name to float
        As returned by :func:`evaluate_perturbations`, with the same perturbations.
    """
    names = _same_keys(flip_probabilities, baseline_flip_probabilities, "perturbations")
    rates = [flip_rate(flip_probabilities[p], baseline_flip_probabilities[p]) for p in names]
    return float(np.mean(rates))


# ------------------------------------------------------------------------------ measuring a model


def evaluate_corruptions(
    estimator,
    X,
    y,
    *,
    corruptions=None,
    severities=(1, 2, 3, 4, 5),
    random_state=0,
    value_range=(0.0, 1.0),
) -> dict[str, np.ndarray]:
    """Top-1 error of ``estimator`` on ``X`` under each corruption and severity.

    Parameters
    ----------
    estimator : object with ``predict``
        Takes images of ``X``'s kind and shape (n, C, H, W) and returns n labels.
    X : array or tensor of shape (n, C, H, W)
        Clean test images with values in ``value_range``.
    y : array-like of shape (n,)
        Their labels.
    corruptions : sequence of str or None, default=None
        Names from :data:`~skpool.evaluation.CORRUPTIONS`; None takes all of them.
    severities : sequence of int in 1..5, default=(1, 2, 3, 4, 5)
    random_state : int, RandomState, Generator or None, default=0
        Seeds the corruptions (the same for every corruption and severity): keep the default
        or another int so that a model and its baseline are measured on the same images.
    value_range : (float, float), default=(0.0, 1.0)
        The range ``X`` is scaled to.

    Returns
    -------
    errors : dict of corruption name to ndarray of shape (n_severities,)
        :math:`E_{s,c}`, the fraction of misclassified images, ready for
        :func:`corruption_error` and :func:`mean_corruption_error`. Memory: about three
        copies of ``X`` at a time.
    """
    predict = _check_estimator(estimator)
    n_images = len(check_images(X, value_range)[0])
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n_images:
        raise ValueError(f"y must have shape ({n_images},) to match X; got shape {y.shape}.")
    names = _check_names(corruptions, CORRUPTIONS, "corruptions")
    severities = _check_severities(severities)
    seed = seed_from(random_state)
    errors = {}
    for name in names:
        per_severity = []
        for severity in severities:
            corrupted = corrupt(X, name, severity, random_state=seed, value_range=value_range)
            per_severity.append(np.mean(_predict(predict, corrupted, n_images) != y))
        errors[name] = np.array(per_severity)
    return errors


def perturbation_predictions(
    estimator, X, perturbation, *, n_frames=None, random_state=0, value_range=(0.0, 1.0)
) -> np.ndarray:
    """Predictions of ``estimator`` on every frame of every image's perturbation sequence.

    Frames are made and predicted one at a time for all images (two copies of ``X`` in
    memory, whatever ``n_frames``). Arguments as in :func:`evaluate_perturbations` and
    :func:`~skpool.evaluation.perturbation_sequence`.

    Returns
    -------
    predictions : ndarray of shape (n, n_frames)
        Row i holds the labels predicted along image i's sequence (for
        :func:`flip_probability`, or to see at which strength predictions change).
    """
    predict = _check_estimator(estimator)
    frames = iter_frames(X, perturbation, n_frames, seed_from(random_state), value_range)
    return np.stack([_predict(predict, frame, len(X)) for frame in frames], axis=1)


def evaluate_perturbations(
    estimator, X, *, perturbations=None, n_frames=None, random_state=0, value_range=(0.0, 1.0)
) -> dict[str, float]:
    """Flip probability of ``estimator`` on the perturbation sequences of ``X``.

    Parameters
    ----------
    estimator : object with ``predict``
        Takes images of ``X``'s kind and shape (n, C, H, W) and returns n labels.
    X : array or tensor of shape (n, C, H, W)
        Clean images with values in ``value_range``; each starts one sequence.
    perturbations : sequence of str or None, default=None
        Names from :data:`~skpool.evaluation.PERTURBATIONS`; None takes all of them.
    n_frames : int >= 2 or None, default=None
        Frames per sequence; None takes CIFAR-10-P's (16 for translate, 31 otherwise).
    random_state : int, RandomState, Generator or None, default=0
        Seeds the noise sequences.
    value_range : (float, float), default=(0.0, 1.0)

    Returns
    -------
    flip_probabilities : dict of perturbation name to float
        FP, comparing consecutive frames, or each frame with the first (clean) one for the
        noise sequences; ready for :func:`flip_rate` and :func:`mean_flip_rate`.
    """
    names = _check_names(perturbations, PERTURBATIONS, "perturbations")
    seed = seed_from(random_state)  # one seed: every call draws the same noise
    return {
        name: flip_probability(
            perturbation_predictions(
                estimator, X, name, n_frames=n_frames, random_state=seed, value_range=value_range
            ),
            reference="first" if name in NOISE_PERTURBATIONS else "previous",
        )
        for name in names
    }


# ------------------------------------------------------------------------------ checks


def _check_rates(values, name, scalar=False) -> np.ndarray:
    raw = np.asarray(values)
    if raw.dtype == bool or raw.dtype.kind not in "iuf":  # True is not an error rate of 1
        raise TypeError(f"{name} must be error rates (real numbers in [0, 1]), got {values!r}.")
    array = raw.astype(np.float64)
    if scalar and array.ndim != 0:
        raise ValueError(f"{name} must be one number, got shape {array.shape}.")
    if not scalar and (array.ndim != 1 or array.size == 0):
        raise ValueError(
            f"{name} must be a non-empty 1-D array (one per severity), got shape {array.shape}."
        )
    if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array > 1):
        raise ValueError(f"{name} must be rates in [0, 1], got {array}.")
    return array


def _same_keys(values: Mapping, baseline: Mapping, what: str) -> list:
    if not isinstance(values, Mapping) or not isinstance(baseline, Mapping):
        raise TypeError(f"Pass the {what} as mappings of name to value, e.g. dicts.")
    if set(values) != set(baseline):
        raise ValueError(
            f"The model and the baseline must be measured on the same {what}; got "
            f"{sorted(values)} and {sorted(baseline)}."
        )
    if not values:
        raise ValueError(f"No {what} given.")
    return list(values)


def _check_estimator(estimator):
    predict = getattr(estimator, "predict", None)
    if not callable(predict):
        raise TypeError(f"estimator must have a predict method; got {type(estimator).__name__}.")
    return predict


def _predict(predict, images, n_images) -> np.ndarray:
    labels = np.asarray(predict(images))
    if labels.shape != (n_images,):
        raise ValueError(
            f"estimator.predict must return one label per image, shape ({n_images},); got "
            f"shape {labels.shape}."
        )
    return labels


def _check_names(names, known, what) -> tuple[str, ...]:
    if names is None:
        return known
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, Iterable):
        raise TypeError(f"{what} must be a name or a sequence of names, got {names!r}.")
    names = tuple(names)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"{what} must be names from {', '.join(known)}; got {list(names)}.")
    return names


def _check_severities(severities) -> tuple[int, ...]:
    if isinstance(severities, (str, bytes)) or not isinstance(severities, Iterable):
        raise TypeError(
            f"severities must be a sequence of integers in 1..5, e.g. (3,) for one; got "
            f"{severities!r}."
        )
    severities = tuple(severities)
    if not severities or any(
        isinstance(s, bool) or not isinstance(s, Integral) or not 1 <= s <= 5 for s in severities
    ):
        raise ValueError(f"severities must be integers in 1..5, got {list(severities)}.")
    if len(set(severities)) != len(severities):
        raise ValueError(f"severities must not repeat, got {list(severities)}.")
    return severities
