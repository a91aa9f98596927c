"""Full float32 precision in the numerical core whatever the user's global setting, and the
layers under autocast (issue 27, item 2).

``torch.set_float32_matmul_precision("medium")`` lets matmuls use bfloat16 (or TF32 with
"high") internally; on CPUs with AMX and on Ampere-or-later GPUs that loses three digits of
the Gram matrices and scatter statistics. The core's entry points run at "highest" and restore
the caller's setting, also when they raise. Spies on the core's matmul-based kernels record
the setting they ran under (on a CPU "medium" may change nothing measurable, so the results
alone could not tell).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import skpool._core.fit as fit_module
from skpool import GeneralizedMaxPooling, SeparabilityPooling
from skpool._core.gmp import generalized_max_pool
from skpool.nn import GeneralizedMaxPool2d, SequenceGeneralizedMaxPool

# float32 results of the same computation at one precision setting: identical kernels, so any
# difference would come from the setting; the tolerance allows the rounding of a float32 solve
# of these well-conditioned systems (relative lam = 1: cond(G + lam I) <= N + 1 = 37) should
# the backend reorder its sums: 4 (N + 1) eps32.
FLOAT32_TOLERANCE = 4 * 37 * float(torch.finfo(torch.float32).eps)


@pytest.fixture
def medium():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.fixture
def seen(monkeypatch):
    """The precision settings under which cholesky_ex / cholesky_solve / solve_triangular of
    the core ran (spied where skpool calls them)."""
    record = []

    def spy(function):
        def wrapper(*args, **kwargs):
            record.append(torch.get_float32_matmul_precision())
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy(torch.linalg.cholesky_ex))
    monkeypatch.setattr(torch, "cholesky_solve", spy(torch.cholesky_solve))
    monkeypatch.setattr(torch.linalg, "solve_triangular", spy(torch.linalg.solve_triangular))
    return record


def _maps(rng, shape=(4, 36, 8)):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def test_gmp_forward_and_backward_run_at_highest_and_restore(rng, medium, seen):
    phi = _maps(rng).requires_grad_(True)
    lam = torch.tensor(1.0, requires_grad=True)
    out = generalized_max_pool(phi, lam, lam_scale="relative", refine_steps=2)
    assert torch.get_float32_matmul_precision() == "medium"
    n_forward = len(seen)
    (out * torch.arange(8.0)).sum().backward()
    assert len(seen) > n_forward  # the backward's solve was seen too
    assert set(seen) == {"highest"}
    assert torch.get_float32_matmul_precision() == "medium"
    torch.set_float32_matmul_precision("highest")
    reference = generalized_max_pool(phi.detach(), 1.0, lam_scale="relative", refine_steps=2)
    torch.testing.assert_close(out.detach(), reference, rtol=FLOAT32_TOLERANCE, atol=0)


def test_gmp_layer_training_step_at_highest(rng, medium, seen):
    layer = GeneralizedMaxPool2d()
    maps = torch.from_numpy(rng.standard_normal((3, 8, 6, 6)).astype(np.float32))
    layer(maps.requires_grad_(True)).sum().backward()
    assert seen and set(seen) == {"highest"}
    assert torch.get_float32_matmul_precision() == "medium"


def test_gmp_estimator_transform_at_highest(rng, medium, seen):
    X = rng.standard_normal((6, 5, 5, 8)).astype(np.float32)
    GeneralizedMaxPooling().fit(X).transform(X)
    assert seen and set(seen) == {"highest"}
    assert torch.get_float32_matmul_precision() == "medium"


def test_separability_fit_at_highest_and_equal_to_highest(rng, monkeypatch, medium):
    X = rng.standard_normal((40, 6, 6, 3)).astype(np.float32)
    y = np.arange(40) % 4
    record = []
    original = fit_module.scatter_statistics

    def spy(*args, **kwargs):
        record.append(torch.get_float32_matmul_precision())
        return original(*args, **kwargs)

    monkeypatch.setattr(fit_module, "scatter_statistics", spy)
    under_medium = SeparabilityPooling(stride=3, dtype="float32").fit(X, y).operator_
    assert record == ["highest"]
    assert torch.get_float32_matmul_precision() == "medium"
    torch.set_float32_matmul_precision("highest")
    at_highest = SeparabilityPooling(stride=3, dtype="float32").fit(X, y).operator_
    # the same float32 computation at the same setting: README's float32 operator bound 1e-3
    # would be the bound across settings; here the kernels are the same, so float32 rounding
    np.testing.assert_allclose(under_medium, at_highest, rtol=0, atol=1e-5)


def test_failing_calls_restore_the_setting(rng, monkeypatch, medium):
    with pytest.raises(ValueError):
        generalized_max_pool(torch.zeros(3, 4), 1.0)  # 2-D: refused inside the core
    assert torch.get_float32_matmul_precision() == "medium"

    def fail(*args, **kwargs):
        assert torch.get_float32_matmul_precision() == "highest"
        raise RuntimeError("planted failure in pass 2")

    monkeypatch.setattr(fit_module, "scatter_statistics", fail)
    X = rng.standard_normal((12, 4, 4, 2)).astype(np.float32)
    with pytest.raises(RuntimeError, match="planted"):
        SeparabilityPooling(stride=2).fit(X, np.arange(12) % 3)
    assert torch.get_float32_matmul_precision() == "medium"


@pytest.mark.parametrize("layer_type", ["2d", "sequence"])
def test_layers_under_cpu_autocast_solve_in_float32(rng, layer_type, seen, monkeypatch):
    """Under autocast the layers return the dtype of their input (the autocast dtype after an
    autocast layer, float32 after a float32 one) and solve in float32."""
    dtypes = []
    original = torch.linalg.cholesky_ex

    def spy(matrix, *args, **kwargs):
        dtypes.append(matrix.dtype)
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    linear = torch.nn.Linear(8, 8)
    layer = GeneralizedMaxPool2d() if layer_type == "2d" else SequenceGeneralizedMaxPool()
    tokens = torch.from_numpy(rng.standard_normal((3, 9, 8)).astype(np.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = linear(tokens)  # bfloat16 under autocast
        if layer_type == "2d":
            features = features.transpose(1, 2).reshape(3, 8, 3, 3)
        out = layer(features)
        float32_out = layer(features.float())
    assert features.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert float32_out.dtype == torch.float32
    assert set(dtypes) == {torch.float32}
    # the float32 solve of the same bfloat16 values, rounded to bfloat16 (one rounding of a
    # unit vector's entries: 2**-8 relative)
    torch.testing.assert_close(out.float(), float32_out.detach(), rtol=2**-8, atol=2**-9)
    out.float().sum().backward()
    assert linear.weight.grad.dtype == torch.float32
    assert torch.isfinite(linear.weight.grad).all() and torch.isfinite(layer.log_lam.grad)
