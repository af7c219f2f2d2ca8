"""User-facing errors.

Anything wrong with what the user handed us (a config, a data file, a model
directory, a shape) is raised as :class:`DemError`. The CLI turns it into one
line on stderr and exit status 2; library callers can catch it like any
``ValueError``.
"""


class DemError(ValueError):
    """Bad input: the message names the file, field or tensor and what is wrong."""


def first_line(e: BaseException) -> str:
    """The first line of an exception from a library (Orbax, TensorStore...), for a
    one-line DemError: its message, cut to 300 characters, else its type."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def did_you_mean(name: object, known) -> str:
    """``"did you mean 'x'? "`` for the known name closest to ``name``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f"did you mean {close[0]!r}? " if close else ""
