"""MERGE.yaml's ``chat_template``: which template the merged model's tokenizer gets.

mergekit 0.1.5 (``mergekit/merge.py``, ``_set_chat_template``) takes three kinds of
value, tried in this order:

* ``auto``: the template most of the input models' tokenizers have (compared after
  stripping surrounding whitespace; the base model counts as an input). None of them
  has one: the output keeps its tokenizer's own. A tie goes to the model listed first
  (mergekit's pick among tied templates depends on set order).
* the name of a template mergekit ships (``alpaca``, ``chatml``, ``exaone``,
  ``llama3``, ``mistral``): a single line under 256 characters without ``{``. The
  text is read from the installed mergekit package, which dem-jax does not bundle.
* a literal Jinja template: at least 20 characters and a ``{``.

Anything else is refused. The output then carries the chosen text in
``chat_template.jinja`` (:func:`dem_jax.io.assets.stage_assets`).
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from dem_jax.errors import DemError
from dem_jax.io.assets import read_chat_template

AUTO = "auto"
# The templates mergekit 0.1.5 ships in mergekit/_data/chat_templates/.
MERGEKIT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def _looks_like_name(value: str) -> bool:
    """mergekit's test for a template name rather than a template."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def mergekit_template(name: str) -> str | None:
    """The text of a template mergekit ships; None if it has no such template.

    DemError if the name is one mergekit ships but mergekit is not installed."""
    spec = importlib.util.find_spec("mergekit")  # finds the package without importing it
    if spec is None or spec.origin is None:
        if name in MERGEKIT_TEMPLATES:
            raise DemError(
                f"chat_template: {name!r} is one of mergekit's templates, read from the "
                "mergekit package, which is not installed (pip install mergekit, or give "
                "the Jinja template itself)"
            )
        return None
    if not re.fullmatch(r"\w[\w.-]*", name):  # a file name, never a path
        return None
    path = Path(spec.origin).parent / "_data" / "chat_templates" / f"{name}.jinja"
    return path.read_text() if path.is_file() else None


def majority_template(model_dirs: Iterable) -> str | None:
    """The template most of ``model_dirs`` have (whitespace-stripped; ties to the first
    listed), or None when none has one."""
    found = [t.strip() for t in map(read_chat_template, model_dirs) if t and t.strip()]
    return Counter(found).most_common(1)[0][0] if found else None


def resolve_chat_template(value: str | None, model_dirs: Iterable) -> str | None:
    """The template text MERGE.yaml's ``chat_template`` asks for (None: leave the
    tokenizer's own), given the input models' directories (for ``auto``)."""
    if value is None:
        return None
    if value == AUTO:
        return majority_template(model_dirs)
    if _looks_like_name(value):
        text = mergekit_template(value)
        if text is not None:
            return text
    if len(value) < 20 or "{" not in value:
        raise DemError(
            f"chat_template: {value!r} is neither 'auto', a template mergekit ships "
            f"({', '.join(MERGEKIT_TEMPLATES)}) nor a Jinja template"
        )
    return value
