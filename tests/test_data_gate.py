"""The estimators' one data gate (skpool._sklearn._validation) refuses torch tensors whose
values cannot be read as a dense array — sparse layouts, nested tensors, 'meta' and quantized
tensors — with a TypeError that says what to pass, at every entry point, as scikit-learn
refuses scipy sparse matrices; never a NotImplementedError from inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch

from gmp_reference import EPS64, unit_error_bound
from skpool import GeneralizedMaxPooling, SeparabilityPooling

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch: beta/prototype layouts

N, GRID, CHANNELS = 12, (4, 4), 2
LABELS = np.arange(N) % 3


def maps() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(N, *GRID, CHANNELS)))


def flat() -> torch.Tensor:
    return maps().reshape(N, -1)


# Each value: (tensor, message fragment). 2-D layouts (CSR, CSC, BSR, BSC) are the flattened
# (n, F) form with grid_shape; COO, meta and quantized keep the 4-D maps.
UNREADABLE = {
    "sparse COO": (lambda: maps().to_sparse(), "sparse torch tensor.*to_dense"),
    "sparse COO 2-D": (lambda: flat().to_sparse(), "sparse torch tensor"),
    "sparse CSR": (lambda: flat().to_sparse_csr(), "layout torch.sparse_csr"),
    "sparse CSC": (lambda: flat().to_sparse_csc(), "layout torch.sparse_csc"),
    "sparse BSR": (lambda: flat().to_sparse_bsr((2, 2)), "layout torch.sparse_bsr"),
    "sparse BSC": (lambda: flat().to_sparse_bsc((2, 2)), "layout torch.sparse_bsc"),
    "meta": (lambda: maps().to("meta"), "'meta' torch tensor"),
    "quantized": (lambda: torch.quantize_per_tensor(maps().float(), 0.1, 0, torch.qint8),
                  "quantized torch tensor.*dequantize"),
    "nested": (lambda: torch.nested.nested_tensor([torch.randn(16, 2), torch.randn(9, 2)]),
               "nested"),
}


def entry_points(X):
    """Every estimator method that takes X, as (name, call) pairs; fitted on dense data."""
    grid = GRID if X.ndim == 2 else None
    dense = maps().numpy()
    gmp = GeneralizedMaxPooling(device="cpu", grid_shape=grid)
    fitted_gmp = GeneralizedMaxPooling(device="cpu").fit(dense)
    sep = SeparabilityPooling(device="cpu", grid_shape=grid)
    fitted_sep = SeparabilityPooling(device="cpu").fit(dense, LABELS)
    if grid is not None:
        fitted_sep.set_params(grid_shape=grid)
        fitted_gmp.set_params(grid_shape=grid)
    return {
        "GMP.fit": lambda: gmp.fit(X),
        "GMP.fit_transform": lambda: gmp.fit_transform(X),
        "GMP.transform": lambda: fitted_gmp.transform(X),
        "SEP.fit": lambda: sep.fit(X, LABELS),
        "SEP.fit_transform": lambda: sep.fit_transform(X, LABELS),
        "SEP.fit_batches": lambda: sep.fit_batches([(X, LABELS)]),
        "SEP.transform": lambda: fitted_sep.transform(X),
        "SEP.separability_ratios": lambda: fitted_sep.separability_ratios(X, LABELS),
    }


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_tensors_are_a_clear_type_error_everywhere(case):
    make, message = UNREADABLE[case]
    X = make()
    for name, call in entry_points(X).items():
        with pytest.raises(TypeError, match=message):
            call()


@pytest.mark.parametrize("case", ["sparse COO 2-D", "meta", "quantized"])
def test_in_a_ragged_list_the_stack_is_named(case):
    make, message = UNREADABLE[case]
    bad = make()
    stack = bad.reshape(-1, CHANNELS) if case != "sparse COO 2-D" else bad
    with pytest.raises(TypeError, match=f"Stack 1 .*{message.split('.*')[0]}"):
        GeneralizedMaxPooling(device="cpu").fit_transform([torch.randn(5, stack.shape[1]), stack])


def test_dense_views_of_the_same_values_are_accepted():
    """The refusal is about the layout, not the values: the dense forms pool as usual."""
    X = maps()
    expected = GeneralizedMaxPooling(device="cpu").fit_transform(X.numpy())
    # The same float64 values in other memory layouts (other kernels may sum in another
    # order): each within the solve's bound (unit vectors, the default relative ridge)
    stacks = X.reshape(N, -1, CHANNELS).numpy()
    bounds = np.array([2 * unit_error_bound(phi, np.sum(phi**2) / len(phi), EPS64)
                       for phi in stacks])
    for dense in (X.to_sparse().to_dense(), X.permute(0, 2, 1, 3).transpose(1, 2)):
        got = GeneralizedMaxPooling(device="cpu").fit_transform(dense)
        errors = np.abs(got - expected).max(axis=1)
        assert np.all(errors <= bounds), (errors / bounds).max()


def test_scipy_sparse_is_refused_like_torch_sparse():
    X = scipy.sparse.csr_matrix(flat().numpy())
    for estimator in (GeneralizedMaxPooling(device="cpu"), SeparabilityPooling(device="cpu")):
        with pytest.raises(TypeError, match="[Ss]parse"):
            estimator.fit(X, LABELS)
