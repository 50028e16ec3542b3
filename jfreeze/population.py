"""Populations of models as one pytree: stack, unstack, shard along a mesh axis.

When each training example is a whole (frozen) model, the models are *data*:
stack their parameters along a leading axis, ``jax.vmap`` over it inside the
jitted step, and, past one device, shard that axis over a ``models`` mesh axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jfreeze._tree import describe_paths, leaves_with_paths

__all__ = ["shard_stacked", "stack", "unstack"]


def stack(trees: Sequence[Any]) -> Any:
    """Stacks same-structure pytrees into one tree whose leaves have a leading axis.

    Leaves become NumPy arrays (host memory; ``jax.device_put`` or
    :func:`shard_stacked` places them). A structure, shape or dtype mismatch is
    a ``ValueError`` naming the model and the path.

    >>> import numpy as np
    >>> import jfreeze as jf
    >>> zoo = jf.stack([{"w": np.zeros(2), "b": 0.0}, {"w": np.ones(2), "b": 1.0}])
    >>> zoo["w"].shape, zoo["b"]
    ((2, 2), array([0., 1.]))
    """
    trees = list(trees)
    if not trees:
        raise ValueError("jf.stack: needs at least one tree.")
    first, treedef = leaves_with_paths(trees[0])
    columns: list[list[Any]] = [[x] for _, x in first]
    for i, tree in enumerate(trees[1:], start=1):
        flat, other = leaves_with_paths(tree)
        if other != treedef:
            odd = sorted({p for p, _ in flat} ^ {p for p, _ in first})
            raise ValueError(
                f"jf.stack: tree {i} does not have the structure of tree 0"
                + (f" (paths only in one: {describe_paths(odd)})." if odd else ".")
            )
        for col, (path, x), (_, x0) in zip(columns, flat, first, strict=True):
            s, s0 = np.shape(x), np.shape(x0)
            d, d0 = _dtype(x), _dtype(x0)
            if s != s0 or d != d0:
                raise ValueError(
                    f"jf.stack: tree {i} has {d}{list(s)} at path {path!r}, "
                    f"tree 0 has {d0}{list(s0)}."
                )
            col.append(x)
    return treedef.unflatten([np.stack([np.asarray(x) for x in col]) for col in columns])


def _dtype(x: Any) -> np.dtype:
    # A jax array's own dtype (np.result_type on one is deprecated); Python
    # scalars as NumPy reads them.
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def unstack(tree: Any) -> list[Any]:
    """Inverse of :func:`stack`: one tree per index of the leading axis.

    >>> import numpy as np
    >>> import jfreeze as jf
    >>> [t["w"].tolist() for t in jf.unstack({"w": np.arange(4).reshape(2, 2)})]
    [[0, 1], [2, 3]]
    """
    flat, treedef = leaves_with_paths(tree)
    if not flat:
        return []
    for path, x in flat:
        if np.ndim(x) == 0:
            raise ValueError(
                f"jf.unstack: the leaf at path {path!r} is a scalar; every leaf needs "
                "a leading (model) axis."
            )
    (first, x0), n = flat[0], np.shape(flat[0][1])[0]
    for path, x in flat:
        if np.shape(x)[0] != n:
            raise ValueError(
                f"jf.unstack: every leaf needs the same leading axis; path {path!r} has "
                f"shape {list(np.shape(x))}, path {first!r} has {list(np.shape(x0))}."
            )
    return [treedef.unflatten([x[i] for _, x in flat]) for i in range(n)]


def shard_stacked(tree: Any, mesh: Mesh, axis: str = "models") -> Any:
    """Places a stacked tree on ``mesh``, its leading axis split over mesh axis ``axis``.

    Each device then holds its share of the population; other arrays (the
    trainable probe) are replicated with ``NamedSharding(mesh, PartitionSpec())``,
    and ``jax.jit`` all-reduces only what the step reduces over models (the
    probe's gradients). The leading axis must divide evenly.

    >>> import jax, numpy as np
    >>> import jfreeze as jf
    >>> mesh = jax.make_mesh((1,), ("models",))
    >>> zoo = jf.shard_stacked({"w": np.zeros((4, 3))}, mesh)
    >>> zoo["w"].sharding.spec == jax.sharding.PartitionSpec("models")
    True
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"jf.shard_stacked: the mesh has axes {mesh.axis_names}, not {axis!r}.")
    k = mesh.shape[axis]
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    for path, x in leaves_with_paths(tree)[0]:
        if np.ndim(x) == 0 or np.shape(x)[0] % k:
            raise ValueError(
                f"jf.shard_stacked: the leaf at path {path!r} has shape {list(np.shape(x))}; "
                f"its leading axis must be divisible by the {k} devices of mesh axis {axis!r}."
            )
    return jax.device_put(tree, sharding)
