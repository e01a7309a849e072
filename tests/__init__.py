"""
Trial tests for smartrelay.

Hypothesis runs deterministically by default; set SMARTRELAY_HYPOTHESIS=long
for a longer, randomised run.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    deadline=None,
    max_examples=2000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    "long" if os.environ.get("SMARTRELAY_HYPOTHESIS") == "long" else "ci"
)
