"""Determinism: the same seed gives the same deep model on CPU, the estimators and layers give
bit-identical results on repeated calls (the same code on the same data: deterministic), and
CPU and CUDA (two code paths: other kernels, other summation orders) agree within the sum of
two first-order bounds computed from the data (skipped without CUDA): GMP per sample
(``gmp_reference.unit_error_bound`` / ``auto_unit_bound``), separability rows and ratios
(``separability_reference.fit_row_bounds``) and transforms (``pooling_bound``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import separability_reference as ref
from gmp_reference import EPS32, EPS64, auto_unit_bound, unit_error_bound
from reliability.helpers import TINY_NET, digits_like, labelled_maps
from skpool import GeneralizedMaxPooling, SeparabilityPooling
from skpool.models import (
    DGMPClassifier,
    PoolingCNNClassifier,
    SeparabilityPoolingClassifier,
)
from skpool.nn import GeneralizedMaxPool2d, LogSumExpPool2d, MixedMaxAvgPool2d, SeparabilityPool2d
from testing_utils import requires_cuda

IMAGES, DIGITS = digits_like(n_samples=32)
MAPS, LABELS = labelled_maps(seed=2, n_samples=30, grid=(6, 5), n_channels=3, n_classes=3)

CLASSIFIERS = {
    "pooling-max-stages": lambda seed: PoolingCNNClassifier(
        **TINY_NET, random_state=seed, module__stage_pooling="max", module__global_pool="lse"
    ),
    "dgmp": lambda seed: DGMPClassifier(**TINY_NET, random_state=seed, lam_lr_factor=10.0),
    "separability": lambda seed: SeparabilityPoolingClassifier(
        **TINY_NET, random_state=seed, stage=0, alpha=1.0
    ),
}


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_same_seed_same_model_on_cpu(name):
    """random_state seeds the weights and the batch order: two fits with one seed give the same
    weights and probabilities bit for bit, although torch's global generator is moved between
    them (a fit that ignored random_state would differ)."""
    first = CLASSIFIERS[name](0).fit(IMAGES, DIGITS)
    torch.manual_seed(1234)
    torch.rand(17)
    second = CLASSIFIERS[name](0).fit(IMAGES, DIGITS)
    # Exact: the same seed, code, data and shapes (deterministic on CPU)
    np.testing.assert_array_equal(second.predict_proba(IMAGES), first.predict_proba(IMAGES))
    for key, value in first.module_.state_dict().items():
        assert torch.equal(second.module_.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["pooling-max-stages", "dgmp"])
def test_another_seed_gives_another_network(name):
    weights = [dict(CLASSIFIERS[name](seed).initialize().module_.state_dict()) for seed in (0, 1)]
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_estimators_are_bit_identical_on_repeated_calls(dtype):
    """Exact: a repeated call runs the same code on the same data and shapes."""
    maps = MAPS.astype(dtype)
    gmp = GeneralizedMaxPooling(lam=1e-3, device="cpu")  # small lam: the refined float32 path
    np.testing.assert_array_equal(gmp.fit_transform(maps), gmp.fit_transform(maps))
    for solver in ("auto", "full"):
        params = {"alpha": 0.5, "n_components": 2, "solver": solver, "device": "cpu",
                  "dtype": "float32" if dtype == np.float32 else "float64"}
        first = SeparabilityPooling(**params).fit(maps, LABELS)
        second = SeparabilityPooling(**params).fit(maps, LABELS)
        for attribute in ("operator_", "eigenvalues_", "channel_mean_", "channel_scale_"):
            np.testing.assert_array_equal(getattr(second, attribute), getattr(first, attribute))
        np.testing.assert_array_equal(first.transform(maps), second.transform(maps))
        np.testing.assert_array_equal(first.transform(maps), first.transform(maps))


def test_layers_are_bit_identical_on_repeated_calls():
    """Forward and backward (input and parameter gradients) repeat bit for bit on CPU."""
    x = torch.from_numpy(MAPS).permute(0, 3, 1, 2).float().requires_grad_(True)
    operator = np.random.default_rng(0).random((1, 9, 30))
    layers = [GeneralizedMaxPool2d(lam=0.1), MixedMaxAvgPool2d(), LogSumExpPool2d(r=4.0),
              SeparabilityPool2d(operator, output_shape=(3, 3), trainable=True)]
    for layer in layers:
        inputs = [x, *layer.parameters()]
        runs = []
        for _ in range(2):
            out = layer(x)
            runs.append((out, torch.autograd.grad((out * out).sum(), inputs)))
        (out1, grads1), (out2, grads2) = runs
        assert torch.equal(out1, out2), type(layer).__name__
        for first, second in zip(grads1, grads2):
            assert torch.equal(first, second), type(layer).__name__


# ============================================================================================
# CPU vs CUDA
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gmp_cpu_and_cuda_agree(dtype):
    maps = MAPS.astype(dtype)
    stacks = maps.reshape(len(maps), -1, maps.shape[-1]).astype(np.float64)
    for lam in (1e-3, 1.0, 1e3):
        cpu = GeneralizedMaxPooling(lam=lam, device="cpu").fit_transform(maps)
        cuda = GeneralizedMaxPooling(lam=lam, device="cuda").fit_transform(maps)
        assert cuda.dtype == dtype
        # the default relative lam: lam x each sample's mean squared norm
        ridges = lam * np.sum(stacks**2, axis=(1, 2)) / stacks.shape[1]
        bounds = np.array([
            unit_error_bound(phi, ridge, EPS64) if dtype == np.float64
            else auto_unit_bound(phi, ridge) for phi, ridge in zip(stacks, ridges)
        ])
        errors = np.abs(cuda.astype(np.float64) - cpu).max(axis=1)
        assert np.all(errors <= 2 * bounds), (errors / bounds).max()


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("solve_dtype", ["float64", "float32"])
@pytest.mark.parametrize("solver", ["auto", "full"])
def test_separability_cpu_and_cuda_agree(solve_dtype, solver):
    params = {"alpha": 0.5, "n_components": 2, "solver": solver, "dtype": solve_dtype}
    cpu = SeparabilityPooling(device="cpu", **params).fit(MAPS, LABELS)
    cuda = SeparabilityPooling(device="cuda", **params).fit(MAPS, LABELS)
    stacks = MAPS.reshape(len(MAPS), -1, MAPS.shape[-1])
    vectors, values = ref.fit_row_bounds(stacks, LABELS, (6, 5), (3, 3), 0.5, 2,
                                         EPS32 if solve_dtype == "float32" else EPS64)
    ref.assert_same_rows(cuda.operator_, cpu.operator_.astype(np.float64), 2 * vectors)
    np.testing.assert_array_less(np.abs(cuda.eigenvalues_ - cpu.eigenvalues_), 2 * values)
    for maps in (MAPS, MAPS.astype(np.float32)):
        same_operator = SeparabilityPooling(device="cuda", **params).fit(MAPS, LABELS)
        for name in ("operator_", "channel_mean_", "channel_scale_"):
            setattr(same_operator, name, getattr(cpu, name))
        expected = cpu.transform(maps)
        bound = 2 * ref.pooling_bound(stacks, cpu.operator_, cpu.channel_mean_,
                                      cpu.channel_scale_, np.finfo(maps.dtype).eps)
        np.testing.assert_allclose(same_operator.transform(maps), expected, rtol=0, atol=bound)
