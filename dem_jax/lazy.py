"""JAX imported on first use.

Importing ``jax`` costs a command 1.5-2 s and 160 MB before it does anything, which
is most of a small merge's wall time (issue #12). Modules that declare things a
command needs without computing (merge methods' parameters, the MERGE.yaml parser)
take ``jax`` and ``jnp`` from here: the real module is imported the first time an
attribute is read, so a command that never computes with JAX (the host merge
executor, ``--help``) never imports it. The idea is TensorFlow's ``LazyLoader``; PEP
810 brings ``lazy import`` to Python 3.15.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A stand-in for module ``name`` that imports it on first attribute access."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)


jax: Any = LazyModule("jax")
jnp: Any = LazyModule("jax.numpy")


def jax_imported() -> bool:
    """Whether anything in this process has imported JAX (a process that has not cannot
    be part of a multi-process JAX job)."""
    return "jax" in sys.modules


def process_index() -> int:
    """``jax.process_index()``, 0 without importing JAX when nothing has."""
    return sys.modules["jax"].process_index() if jax_imported() else 0


def process_count() -> int:
    """``jax.process_count()``, 1 without importing JAX when nothing has."""
    return sys.modules["jax"].process_count() if jax_imported() else 1


def lazy_jit(fun=None, **options):
    """``jax.jit(fun, **options)`` as a decorator, built on the first call (a module-level
    ``@jax.jit`` would import JAX with the module)."""
    if fun is None:
        return functools.partial(lazy_jit, **options)
    jitted = None

    @functools.wraps(fun)
    def call(*args, **kwargs):
        nonlocal jitted
        if jitted is None:
            jitted = jax.jit(fun, **options)
        return jitted(*args, **kwargs)

    return call
