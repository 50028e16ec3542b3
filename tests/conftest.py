"""Shared test setup: hypothesis is derandomized under CI.

Locally every run draws new examples (and so keeps finding new cases); CI (``CI=true``) draws
the same ones each time, so a landing is never decided by the luck of one draw.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
