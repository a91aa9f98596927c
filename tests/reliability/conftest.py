"""Settings of the reliability suite: hypothesis profiles sized for CI.

- ``skpool-ci`` (the default): 25 examples per property, no deadline (the first example of a
  test pays for torch's lazy initialisation), no database writes, derandomized so that a CI
  run is reproducible and never flaky.
- ``skpool-thorough``: 500 random examples per property, for a local hunt
  (``SKPOOL_HYPOTHESIS_PROFILE=skpool-thorough python -m pytest tests/reliability``).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "skpool-ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "skpool-thorough",
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("SKPOOL_HYPOTHESIS_PROFILE", "skpool-ci"))
