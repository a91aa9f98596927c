"""Shared fixtures: a seeded numpy generator and a seeded torch for every test."""

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

# numpy/scipy's OpenBLAS (used by scikit-learn's solvers and the float64 references) on one
# thread: its problems here are tiny, and on a busy 2-core machine its threads spin against
# torch's (one LogisticRegression fit on 1797 x 32 features measured 3.5 s with 2 BLAS
# threads, 0.09 s with 1). torch's own MKL/OpenMP threads are not affected (threadpoolctl's
# "blas" API only reaches the shared BLAS libraries numpy and scipy load).
threadpool_limits(1, user_api="blas")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield
