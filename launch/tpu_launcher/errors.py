"""The launcher's errors; `cli.main` prints them as ``dem_tpu.py: error: ...`` (status 2)."""

from __future__ import annotations


class LaunchError(Exception):
    """Bad settings or a failed step; the message says which."""


class StepFailed(LaunchError):
    """A command this script ran exited non-zero."""
