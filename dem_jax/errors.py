"""User-facing errors.

Anything wrong with what the user handed us (a config, a data file, a model
directory, a shape) is raised as :class:`DemError`. The CLI turns it into one
line on stderr and exit status 2; library callers can catch it like any
``ValueError``.
"""


class DemError(ValueError):
    """Bad input: the message names the file, field or tensor and what is wrong."""
