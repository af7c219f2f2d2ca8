"""Every merge method, by name: collected from the modules of :mod:`dem_jax.merge.methods`.

Adding a method is adding one module there that defines ``METHODS``, a tuple of
:class:`~dem_jax.merge.method.MergeMethod` objects; nothing else is edited.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from dem_jax.errors import DemError, did_you_mean
from dem_jax.merge import methods as _methods_pkg
from dem_jax.merge.method import MergeMethod

# Listed first, in this order (mergekit's own listing), then the rest by module name.
_FIRST = ("task_arithmetic", "linear", "slerp", "model_stock", "parameter_selection")


def _collect() -> dict[str, MergeMethod]:
    names = [m.name for m in pkgutil.iter_modules(_methods_pkg.__path__)]
    ordered = [n for n in _FIRST if n in names] + sorted(n for n in names if n not in _FIRST)
    found: dict[str, MergeMethod] = {}
    for module_name in ordered:
        module = importlib.import_module(f"{_methods_pkg.__name__}.{module_name}")
        for method in getattr(module, "METHODS", ()):
            if method.name in found:
                raise RuntimeError(f"merge method {method.name!r} is defined twice")
            found[method.name] = method
    return found


METHODS: dict[str, MergeMethod] = _collect()
DATA_METHODS = tuple(name for name, m in METHODS.items() if m.data)


def get_method(name: Any, where: str = "merge_method") -> MergeMethod:
    """The method called ``name``, or a DemError: "missing" when there is none, else
    the closest known name and the list of them."""
    if name is None:
        raise DemError(f"{where}: missing (one of: {', '.join(METHODS)})")
    if not isinstance(name, str) or name not in METHODS:
        raise DemError(
            f"{where}: unknown merge method {name!r} "
            f"({did_you_mean(name, METHODS)}known: {', '.join(METHODS)})"
        )
    return METHODS[name]
