"""Label functions: ``params -> label tree``, ready for ``optax.partition``."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from typing import Any

from jfreeze.paths import broadcast_prefix, describe_paths
from jfreeze.selectors import FrozenSpec, Selector, _Flat, _is_placeholder, as_selector

__all__ = ["labels", "Labels", "resolve_labels"]

_NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True, repr=False)
class Labels:
    """A pure label function built by :func:`labels` (first matching rule wins)."""

    rules: tuple[tuple[Hashable, Selector], ...]
    default: Any = _NO_DEFAULT

    def __call__(self, tree: Any) -> Any:
        flat = _Flat.of(tree)
        chosen: list[Any] = [_NO_DEFAULT] * len(flat.entries)
        for label, sel in self.rules:
            for i, ((path, _), m) in enumerate(zip(flat.entries, sel.evaluate(flat))):
                if not isinstance(m, bool):
                    raise ValueError(
                        f"jf.labels: rule {label!r} ({sel!r}) selects only some elements "
                        f"of the leaf at path {path!r}. A label applies to whole leaves; "
                        "to freeze elements use jf.freeze(..., frozen=jf.elements(...)), "
                        "which composes with jf.partition."
                    )
                if m and chosen[i] is _NO_DEFAULT:
                    chosen[i] = label
        missing = [p for (p, _), c in zip(flat.entries, chosen) if c is _NO_DEFAULT]
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
    for label in rules:
        if label is None:
            raise TypeError("jf.labels: None is not a label (JAX reads None as an empty subtree)")
    return Labels(tuple((k, as_selector(v)) for k, v in rules.items()), default)


def resolve_labels(
    labels: Any, tree: Any, known: Mapping, *, who: str, noun: str, hint: str = ""
) -> tuple[Any, dict]:
    """The full label tree for ``tree``, and which paths carry each label.

    ``labels`` is a label tree (or a prefix of ``tree``) or a function of the
    tree. A label not in ``known`` is a ``ValueError`` naming the label and the
    paths carrying it; it is checked first, as the likely typo.

    >>> resolve_labels({"a": "x", "b": "y"}, {"a": 1.0, "b": [2.0, 3.0]}, {"x": 0, "y": 0},
    ...                who="demo", noun="entry")
    ({'a': 'x', 'b': ['y', 'y']}, {'x': ['a'], 'y': ['b/0', 'b/1']})
    """
    spec = labels(tree) if callable(labels) else labels
    flat = _Flat.of(tree)
    values = broadcast_prefix(spec, tree, what="label tree", is_hole=_is_placeholder)
    carriers: dict[Any, list[str]] = {}
    for (path, _), label in zip(flat.entries, values):
        try:
            carriers.setdefault(label, []).append(path)
        except TypeError:
            raise TypeError(f"the label at path {path!r} is not hashable: {label!r}") from None
    for label, where_ in carriers.items():
        if label not in known:
            raise ValueError(
                f"{who}: label {label!r} has no {noun}; it is carried by "
                f"{describe_paths(where_)}. Known labels: {', '.join(map(repr, known))}.{hint}"
            )
    return flat.unflatten(values), carriers
