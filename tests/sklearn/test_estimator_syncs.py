"""The estimators' host-device synchronisations per batch (issue 27, item 1).

A fit reads its batches from the host, so a few synchronisations per batch cost nothing next to
the host-to-device copy; what must not happen is a count that grows with the problem's size
(the number of output cells, for the separability solve). Counted with tests/sync_counter.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from skpool import GeneralizedMaxPooling, SeparabilityPooling
from sync_counter import SyncCounter

BATCH = 10


def _count(run) -> int:
    with SyncCounter() as counter:
        run()
    return counter.total


@pytest.mark.parametrize("stride", [4, 2, 1])  # 4, 16 and 64 output cells of an 8x8 grid
def test_separability_fit_synchronises_per_batch_not_per_cell(rng, stride):
    def fit(n_samples):
        X = rng.standard_normal((n_samples, 8, 8, 3)).astype(np.float32)
        y = np.arange(n_samples) % 4
        return _count(lambda: SeparabilityPooling(stride=stride, batch_size=BATCH).fit(X, y))

    small, large = fit(4 * BATCH), fit(8 * BATCH)
    per_batch = (large - small) / (4 * BATCH / BATCH)
    # measured: 3 per batch (a finiteness check and two pass bookkeeping reads) and 22 for
    # the whole solve, whatever the number of cells; the bounds leave room for one more each
    assert per_batch <= 4, per_batch
    assert small - 4 * per_batch <= 30, small


def test_separability_fit_count_does_not_depend_on_cells(rng):
    X = rng.standard_normal((4 * BATCH, 8, 8, 3)).astype(np.float32)
    y = np.arange(len(X)) % 4
    counts = [
        _count(lambda: SeparabilityPooling(stride=stride, batch_size=BATCH).fit(X, y))
        for stride in (4, 2, 1)
    ]
    assert len(set(counts)) == 1, counts


def test_gmp_transform_synchronises_per_batch(rng):
    def transform(n_samples):
        X = rng.standard_normal((n_samples, 6, 6, 8)).astype(np.float32)
        estimator = GeneralizedMaxPooling(batch_size=BATCH).fit(X)
        return _count(lambda: estimator.transform(X))

    small, large = transform(4 * BATCH), transform(8 * BATCH)
    per_batch = (large - small) / 4
    # measured: 6 per batch ("auto" refinement's two host decisions, the finiteness checks,
    # the copy back to numpy), nothing else
    assert per_batch <= 8, per_batch
    assert small <= 8 * 4 + 8, small
