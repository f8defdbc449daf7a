"""Shared pytest configuration.

Hypothesis runs derandomized everywhere (a failure reproduces on every machine). The ``ci`` profile,
used by ``make test``, draws 100 examples per property; ``dev`` draws 25 for quick local loops
(``HYPOTHESIS_PROFILE=dev pytest``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
