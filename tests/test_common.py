"""scikit-learn's own estimator checks, run once for every estimator of skpool."""

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpool import GeneralizedMaxPooling, SeparabilityPooling

ESTIMATORS = [
    GeneralizedMaxPooling(device="cpu"),
    SeparabilityPooling(device="cpu"),
    SeparabilityPooling(flatten=True, device="cpu"),
]

#: Checks expected to fail, per estimator, each with the reason.
EXPECTED_FAILED_CHECKS = {}


# The checks fit generic 2-D (n, F) data, which SeparabilityPooling takes as an Fx1 grid and
# says so (tests/sklearn/test_fit_protocol.py tests that warning).
@pytest.mark.filterwarnings("ignore:SeparabilityPooling. 2-D input:UserWarning")
@parametrize_with_checks(
    ESTIMATORS,
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS.get(type(est).__name__, {}),
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
