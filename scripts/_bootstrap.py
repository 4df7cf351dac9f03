"""Lets ``python scripts/<name>.py`` import the project without an install."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# idle OpenMP threads sleep instead of spinning (a shared machine slowed the DE 11x, now 4x; results unchanged):
# must happen before torch is imported; a wait policy the user set wins (core/threads.py, docs/benchmarks.md)
from vitfl.core.threads import configure_openmp  # noqa: E402

configure_openmp()
