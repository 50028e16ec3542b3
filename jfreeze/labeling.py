"""Label functions: ``params -> label tree``, ready for ``optax.partition``.

(The module is ``jfreeze.labeling``; its function is ``jf.labels``.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from typing import Any

from jfreeze._tree import Flat, describe_paths
from jfreeze.selectors import FrozenSpec, Selector, as_selector

__all__ = ["Labels", "labels"]

_NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True, repr=False)
class Labels:
    """A pure label function built by :func:`labels` (first matching rule wins)."""

    rules: tuple[tuple[Hashable, Selector], ...]
    default: Any = _NO_DEFAULT

    def __call__(self, tree: Any) -> Any:
        flat = Flat.of(tree)
        chosen: list[Any] = [_NO_DEFAULT] * len(flat.entries)
        for label, sel in self.rules:
            for i, (path, m) in enumerate(zip(flat.paths, sel.evaluate(flat), strict=True)):
                if not isinstance(m, bool):
                    raise ValueError(
                        f"jf.labels: rule {label!r} ({sel!r}) selects only some elements "
                        f"of the leaf at path {path!r}. A label applies to whole leaves; "
                        "to freeze elements use jf.freeze(..., frozen=jf.elements(...)), "
                        "which composes with jf.partition."
                    )
                if m and chosen[i] is _NO_DEFAULT:
                    chosen[i] = label
        missing = [p for p, c in zip(flat.paths, chosen, strict=True) if c is _NO_DEFAULT]
        if missing and self.default is _NO_DEFAULT:
            raise ValueError(
                f"jf.labels: no rule matches the leaves at {describe_paths(missing)} and "
                "no default= is given. Add a rule or a default label."
            )
        return flat.unflatten([self.default if c is _NO_DEFAULT else c for c in chosen])

    def __repr__(self) -> str:
        rules = ", ".join(f"{k!r}: {v!r}" for k, v in self.rules)
        default = "" if self.default is _NO_DEFAULT else f", default={self.default!r}"
        return f"labels({{{rules}}}{default})"


def labels(rules: Mapping[Hashable, FrozenSpec], *, default: Hashable = _NO_DEFAULT) -> Labels:
    """A label function ``params -> label tree`` for ``optax.partition``.

    Each leaf gets the label of the first rule (in dict order) whose selector
    matches it, else ``default``; with no default, an unmatched leaf is an
    error naming its path. Labels apply to whole leaves: an element-wise
    selector here is an error (use :func:`jfreeze.freeze` for elements).

    Give optax the label *function*, not the label tree it returns: the tree
    has the params' type, and optax calls a callable label tree, which an
    Equinox module is (paths there are attribute names and list indices,
    ``layers/0/weight``). :func:`jfreeze.partition` accepts either.

    Args:
      rules: ``{label: selector}``; a selector may also be anything ``frozen=``
        accepts (a bool mask tree or mask function).
      default: the label of leaves no rule matches.

    >>> import jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"backbone": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    >>> label_fn = jf.labels({"frozen": jf.paths("backbone/**")}, default="train")
    >>> label_fn(params)
    {'backbone': {'w': 'frozen'}, 'head': {'w': 'train'}}
    >>> tx = optax.partition({"frozen": optax.set_to_zero(), "train": optax.adam(1e-3)}, label_fn)
    >>> state = tx.init(params)
    """
    if not isinstance(rules, Mapping):
        raise TypeError(f"jf.labels takes a dict {{label: selector}}, got {type(rules).__name__}")
    for label in (*rules, default):
        if label is None:
            raise TypeError(
                "jf.labels: None is not a label, as a rule's key or as default= (JAX reads "
                "None as an empty subtree); map a label to None in jf.partition to freeze."
            )
    return Labels(tuple((k, as_selector(v)) for k, v in rules.items()), default)
