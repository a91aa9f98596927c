"""Rounding-error bounds of small computations, for the tests' tolerances (importable as
``rounding`` because pyproject sets ``pythonpath = ["tests"]``).

``eps`` is the machine epsilon of a dtype (twice the unit roundoff u). Elementary functions
(exp, log, sigmoid, softplus) are taken as correctly rounded to within 1 ulp, i.e. a relative
error <= eps, which libm, SLEEF's u10 kernels and CUDA's float functions all meet.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EPS16 = float(torch.finfo(torch.float16).eps)
EPSBF16 = float(torch.finfo(torch.bfloat16).eps)
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


def eps(dtype) -> float:
    """Machine epsilon of a numpy or torch floating dtype."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def exp_of_log_rtol(value: float, unit: float) -> float:
    """Relative error of ``exp(fl(log(value)))`` in a precision of machine epsilon ``unit``
    (the layers' lam = exp(theta)): rounding theta moves it by u |theta| absolute, a relative
    change of u |theta| of the value, and exp adds eps."""
    return unit * (abs(math.log(value)) / 2 + 1)


def sigmoid_of_logit_rtol(value: float, unit: float) -> float:
    """Relative error of ``sigmoid(fl(logit(value)))`` (the mixed layer's weight): rounding
    omega moves a by a (1 - a) u |omega|, at most u |omega| relative, and sigmoid adds eps."""
    return unit * (abs(math.log(value) - math.log1p(-value)) / 2 + 1)


def softplus_shift_rtol(value: float, floor: float, unit: float) -> float:
    """Relative error of ``floor + softplus(fl(rho))`` with rho = softplus^-1(value - floor)
    (the log-sum-exp layer's r): d softplus / d rho = sigmoid(rho), so rounding rho moves r
    by sigmoid(rho) u |rho|; softplus (a few operations) and the addition add 3 eps of r."""
    excess = value - floor
    rho = excess + math.log(-math.expm1(-excess))
    slope = 1 / (1 + math.exp(-rho)) if rho > -700 else math.exp(rho)
    return unit * (slope * abs(rho) / 2 / value + 3)


def lse_bound(flat: np.ndarray, unit: float) -> np.ndarray:
    """Per-row rounding bound of skpool's log-sum-exp pooling of (rows, N) values in a
    precision of machine epsilon ``unit`` (stated in test_baseline_layers): each term is
    rounded a few times and N of them are summed pairwise, (8 + log2 N) eps times the size of
    the terms, |max| + spread."""
    flat = np.asarray(flat, dtype=np.float64)
    scale = np.abs(flat.max(axis=-1)) + (flat.max(axis=-1) - flat.min(axis=-1))
    return (8 + np.log2(flat.shape[-1])) * unit * scale


def mean_bound(flat: np.ndarray, unit: float) -> np.ndarray:
    """Per-row rounding bound of a mean of (rows, N) values: an N-term sum in any order
    (Higham's gamma_N, N eps) and the division, (N + 1) eps max|x|."""
    flat = np.asarray(flat, dtype=np.float64)
    return (flat.shape[-1] + 1) * unit * np.abs(flat).max(axis=-1)


def assert_rows_within(actual, expected, bounds) -> None:
    """Per row (sample), the max-abs difference is within that row's bound ((rows,) array)."""
    errors = np.abs(np.asarray(actual, dtype=np.float64) - np.asarray(expected)).max(axis=1)
    bounds = np.broadcast_to(np.asarray(bounds, dtype=np.float64), errors.shape)
    assert np.all(errors <= bounds), (errors / np.maximum(bounds, 1e-300)).max()
