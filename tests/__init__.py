"""
Shifter's tests.

Property tests (hypothesis) run without a per-example deadline: the
machines that run the suite are shared and busy, and a test never asserts
a timing.
"""

from hypothesis import settings

settings.register_profile("shifter", deadline=None)
settings.load_profile("shifter")
