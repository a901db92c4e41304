"""Shared pytest set-up: hypothesis profiles.

"ci" (chosen when CI=true, as .ci/run sets it) is derandomized so a CI run is reproducible and
prints the blob to replay a failure; "dev" is the quick default for a developer's loop.
HYPOTHESIS_PROFILE=name overrides the choice. Tests that set their own max_examples keep them.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                      or ("ci" if os.environ.get("CI") == "true" else "dev"))
