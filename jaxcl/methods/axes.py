"""Logical axis names declared where a method creates its state.

``logical(value, names)`` wraps an array (or an abstract ``ShapeDtypeStruct`` under
``jax.eval_shape``) with one logical name per dimension, e.g. ``("layers", "tasks", "rank",
"embed")``; ``split(tree)`` returns the plain arrays and, separately, a tree of ``Axes`` leaves of the
same structure. ``jaxcl.train.sharding`` maps the names to mesh axes with one rules table, for the
model's weights (which declare their names the same way) and every method's state alike.

The vocabulary (shared with the models): ``layers``, ``tasks``, ``rank``, ``experts``, ``embed``
(the model width), ``q_heads``, ``kv_heads``, ``mlp``, ``vocab``, ``expansion`` (Any-SSR's random
features), ``mask`` (MIST's selected entries), ``bottleneck`` (small hidden widths); ``None`` for a
dimension that is never split.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax


@dataclasses.dataclass(frozen=True)
class Axes:
    """The logical names of one array's dimensions (a pytree leaf, not a node)."""

    names: tuple[Optional[str], ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Logical:
    """An array together with its dimensions' logical names (a pytree node over ``value``)."""

    value: Any
    names: tuple = dataclasses.field(metadata=dict(static=True))


def logical(value: Any, names: tuple[Optional[str], ...]) -> Logical:
    """``value`` (ndim = ``len(names)``) tagged with its dimensions' logical names."""
    if len(names) != len(value.shape):
        raise ValueError(f"axes.logical: {len(names)} names {names} for an array of shape {value.shape}")
    return Logical(value, tuple(names))


def _is_logical(x: Any) -> bool:
    return isinstance(x, Logical)


def split(tree: Any) -> tuple[Any, Any]:
    """``(values, axes)``: ``tree`` with every ``Logical`` replaced by its array, and the same tree
    with ``Axes`` leaves. Every array leaf of ``tree`` must be declared."""
    undeclared = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_logical)
                  if not _is_logical(leaf)]
    if undeclared:
        raise ValueError(f"axes.split: state leaves without logical axes: {undeclared}")
    values = jax.tree.map(lambda x: x.value, tree, is_leaf=_is_logical)
    names = jax.tree.map(lambda x: Axes(x.names), tree, is_leaf=_is_logical)
    return values, names


def values(tree: Any) -> Any:
    """``tree`` with every ``Logical`` replaced by its array (undeclared leaves pass through)."""
    return jax.tree.map(lambda x: x.value if _is_logical(x) else x, tree, is_leaf=_is_logical)


def stacked(names: tuple[Optional[str], ...], *leading: Optional[str]) -> tuple[Optional[str], ...]:
    """``names`` with leading dimensions (``"layers"``, ``"tasks"``, ...) put in front."""
    return tuple(leading) + tuple(names)
