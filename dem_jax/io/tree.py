"""Paths into nested-dict parameter pytrees (a path is a tuple of dict keys)."""

from __future__ import annotations

from typing import Any


def get_leaf(tree: Any, path: tuple[str, ...]) -> Any:
    """The leaf at ``path`` (a tuple of dict keys) of a nested dict."""
    for key in path:
        tree = tree[key]
    return tree


def set_leaf(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Store ``value`` at ``path`` in a nested dict, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
