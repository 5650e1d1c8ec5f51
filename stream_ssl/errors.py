"""The trainer's errors, shared by every layer (a leaf module: it imports nothing of the package)."""

from __future__ import annotations


class RunError(ValueError):
    """A problem with the run's settings or its output folder, reported as one line `error: ...`."""
