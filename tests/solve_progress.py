"""A fixture for the tests of progress bars: the solve as the fit protocol calls it.

``top_generalized_eigenvectors`` takes ``progress`` (the bar of the output cells) once the
solve package has it. Where it does not yet, a wrapper stands in for that keyword: it solves,
then reports every cell at once. Where it does, the real function runs and this fixture
changes nothing, so the tests then check the solve's own reports.
"""

import inspect

import pytest

import skpool._core.fit as fit_protocol


@pytest.fixture
def solve_with_progress(monkeypatch):
    real = fit_protocol.top_generalized_eigenvectors
    if "progress" in inspect.signature(real).parameters:
        return

    def solve(*args, progress=None, **kwargs):
        operator, eigenvalues = real(*args, **kwargs)
        if progress is not None:
            progress.update(operator.shape[1])
        return operator, eigenvalues

    monkeypatch.setattr(fit_protocol, "top_generalized_eigenvectors", solve)
