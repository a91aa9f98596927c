"""Robustness evaluation after Hendrycks & Dietterich (2019): corruptions, sequences, metrics.

D. Hendrycks and T. Dietterich, *Benchmarking Neural Network Robustness to Common Corruptions
and Perturbations*, ICLR 2019.

- :func:`corrupt` — 13 corruptions at severities 1–5 (:data:`GEOMETRIC_CORRUPTIONS`:
  translate, rotate, scale, shear, tilt, zoom blur; :data:`NON_GEOMETRIC_CORRUPTIONS`:
  Gaussian and shot noise, Gaussian blur, brightness, contrast, pixelate, quantize), as in
  CIFAR-10-C.
- :func:`perturbation_sequence` — gradually perturbed frames of each image (translate,
  rotate, scale, shear, tilt, zoom blur, brightness, blur; noise), as in CIFAR-10-P.
- :func:`evaluate_corruptions`, :func:`evaluate_perturbations` — a classifier's errors and flip
  probabilities (anything with ``predict`` taking (n, C, H, W) images);
  :func:`corruption_error`, :func:`mean_corruption_error`, :func:`flip_probability`,
  :func:`flip_rate`, :func:`mean_flip_rate` — the metrics, relative to a baseline.
- :func:`mean_average_precision`, :func:`average_precision_per_query`, :func:`top1_accuracy`
  and their scikit-learn scorers — retrieval metrics (every sample queries all the others;
  relevant = same label), as in Christlein et al.'s writer retrieval.

Images are (n, C, H, W) floating numpy arrays or torch tensors in ``value_range`` (default
[0, 1]); the computations are batched torch on the images' device.
"""

from .corruptions import (
    CORRUPTIONS,
    GEOMETRIC_CORRUPTIONS,
    NON_GEOMETRIC_CORRUPTIONS,
    SEVERITY_PARAMETERS,
    corrupt,
)
from .metrics import (
    corruption_error,
    evaluate_corruptions,
    evaluate_perturbations,
    flip_probability,
    flip_rate,
    mean_corruption_error,
    mean_flip_rate,
    perturbation_predictions,
)
from .retrieval import (
    average_precision_per_query,
    mean_average_precision,
    mean_average_precision_scorer,
    top1_accuracy,
    top1_accuracy_scorer,
)
from .perturbations import (
    GEOMETRIC_PERTURBATIONS,
    NOISE_PERTURBATIONS,
    NON_GEOMETRIC_PERTURBATIONS,
    PERTURBATIONS,
    SWEEP_RANGES,
    perturbation_sequence,
)

__all__ = [
    "CORRUPTIONS",
    "GEOMETRIC_CORRUPTIONS",
    "NON_GEOMETRIC_CORRUPTIONS",
    "SEVERITY_PARAMETERS",
    "corrupt",
    "PERTURBATIONS",
    "GEOMETRIC_PERTURBATIONS",
    "NON_GEOMETRIC_PERTURBATIONS",
    "NOISE_PERTURBATIONS",
    "SWEEP_RANGES",
    "perturbation_sequence",
    "corruption_error",
    "mean_corruption_error",
    "flip_probability",
    "flip_rate",
    "mean_flip_rate",
    "evaluate_corruptions",
    "evaluate_perturbations",
    "perturbation_predictions",
    "mean_average_precision",
    "average_precision_per_query",
    "top1_accuracy",
    "mean_average_precision_scorer",
    "top1_accuracy_scorer",
]
