"""Populations of models as one pytree: stack, unstack, shard, and run them.

When each training example is a whole (frozen) model, the models are *data*:
stack their parameters along a leading axis, run them with :func:`vmap_models`
inside the jitted step, and, past one device, shard that axis over a ``models``
mesh axis (:func:`models_mesh`, :func:`shard_stacked`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jfreeze._tree import describe_paths, is_array, leaves_with_paths

# Mesh axis types (Auto / Explicit); a jax without them has Auto axes only.
_AXIS_TYPE = getattr(jax.sharding, "AxisType", None)

__all__ = [
    "models_mesh",
    "population_compiler_options",
    "shard_stacked",
    "stack",
    "unstack",
    "vmap_models",
]


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


def models_mesh(n_models: int, *, axis: str = "models", devices: Sequence[Any] | None = None
                ) -> Mesh:
    """A 1-D mesh ``(axis,)`` over the most local devices that split ``n_models`` evenly.

    With 32 models and 12 devices that is 8 devices (4 models each). On CPU, JAX
    has one device unless asked before its backend starts: call
    ``jax.config.update("jax_num_cpu_devices", len(os.sched_getaffinity(0)))``
    first thing (one device per core; the CPU backend alone reads it, so the line
    is harmless on GPU/TPU). The mesh's axis type is ``Auto``, so ``jax.jit``
    propagates the shardings of :func:`shard_stacked` through the step.

    Args:
      n_models: the population size (the leading axis of the stacked models).
      axis: the mesh axis name.
      devices: the devices to choose from; default ``jax.local_devices()``.

    >>> import jfreeze as jf
    >>> mesh = jf.models_mesh(32)
    >>> mesh.axis_names, 32 % mesh.shape["models"]
    (('models',), 0)
    """
    devices = list(jax.local_devices() if devices is None else devices)
    if n_models < 1 or not devices:
        raise ValueError(f"jf.models_mesh: needs n_models >= 1 and a device, got {n_models} "
                         f"models and {len(devices)} devices.")
    n = max(k for k in range(1, len(devices) + 1) if n_models % k == 0)
    kw = {"axis_types": (_AXIS_TYPE.Auto,)} if _AXIS_TYPE is not None else {}
    return jax.make_mesh((n,), (axis,), devices=devices[:n], **kw)


def population_compiler_options(mesh: Mesh | None = None, *, backend: str | None = None
                                ) -> dict[str, Any]:
    """``jax.jit(step, compiler_options=...)`` for a step that runs :func:`vmap_models`.

    On XLA:CPU:

    * ``xla_cpu_experimental_ynn_fusion_type=""``: jax 0.10's default YNNPACK
      fusions fuse a batched (per-model) matmul with the element-wise backward
      around it into one subgraph that runs at about half the speed of the same
      dots one by one (``benchmarks/NOTES.md``); this turns them off for this one
      program;
    * with a ``mesh`` of at least one CPU device per core this process may use,
      also ``xla_cpu_multi_thread_eigen=False``: the devices already run their
      shares of the models side by side, so each device runs its ops on one
      thread instead of splitting every op over all the cores (measured with 32
      models on 2 cores: 15-24 % faster at 2 blocks, d=64; within 2 % at 4
      blocks, d=128).

    Elsewhere ``{}`` (the options are XLA:CPU's alone; other backends reject them).

    Args:
      mesh: the mesh the step splits the models over (e.g. :func:`models_mesh`).
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``; default ``jax.default_backend()``.

    >>> import jfreeze as jf
    >>> jf.population_compiler_options(backend="cpu"), jf.population_compiler_options(backend="gpu")
    ({'xla_cpu_experimental_ynn_fusion_type': ''}, {})
    """
    if (backend or jax.default_backend()) != "cpu":
        return {}
    options: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}
    if mesh is not None and mesh.size >= _cores() > 1:
        options["xla_cpu_multi_thread_eigen"] = False
    return options


def _cores() -> int:
    # The cores this process may run on (what XLA:CPU sizes its thread pool from).
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def vmap_models(
    apply: Callable[..., Any],
    *,
    remat: str | Callable[..., Any] | None = "dots_saveable",
    chunk: int | None = None,
    mesh: Mesh | None = None,
    axis: str = "models",
) -> Callable[..., Any]:
    """Runs ``apply(params, *inputs)`` once per frozen model of a stacked population.

    Returns ``run(stacked_params, *inputs)``: every array leaf of ``stacked_params``
    and every leaf of ``inputs`` has a leading model axis of the same size K (an
    input shared by all models: ``jnp.broadcast_to`` it), and the outputs have it
    too. Other leaves of the params (an Equinox module's activation functions) are
    the same for every model and reach ``apply`` as they are. Inside ``run``:

    * the stacked params go under ``jax.lax.stop_gradient``: they are data, and no
      weight gradient of a frozen model is computed even when a caller
      differentiates them (gradients still flow through to ``inputs``);
    * ``apply`` is wrapped in ``jax.checkpoint(policy=remat)`` and ``jax.vmap``-ed
      over the models. The default ``"dots_saveable"`` keeps the matmul outputs
      for the backward pass and recomputes the element-wise work inside the
      backward fusions (same matmul FLOPs, less memory, faster on CPU). Under
      ``vmap`` every dot has a batch axis, so ``dots_with_no_batch_dims_saveable``
      recomputes all matmuls. ``None``: no remat;
    * ``chunk=c`` runs c models at a time in a loop of ``K / c`` steps, each
      step's forward under ``jax.checkpoint``: the activations (and, under
      ``jax.grad``, the saved residuals) of only one chunk are alive at once, so
      peak temporary memory falls about ``K / c``-fold. The price is one more
      forward pass of the frozen models in the backward (matmul FLOPs
      ``3 x forward`` instead of ``2 x``). It does not reduce the stacked params
      (they must fit, on each device their share), the inputs, the outputs or
      the input gradients. XLA:CPU moves bf16/f16 data through the loop as f32:
      every value is kept (subnormals, -0.0, inf), but a NaN may come back
      quieted, its payload lost;
    * with a ``mesh`` (or an ambient one from ``jax.set_mesh``) that has
      ``axis``, params, inputs and outputs are constrained to
      ``PartitionSpec(axis)`` (an ``Explicit`` axis is resharded, which jax allows
      only under the mesh's ``jax.set_mesh``): each device runs its K / n models and ``jax.jit``
      all-reduces only what the caller sums over models (the probe's gradients).
      Place the stacked params with :func:`shard_stacked` on the same mesh, so
      no device holds the whole population.

    Use it inside a ``jax.jit`` compiled with
    ``compiler_options=jf.population_compiler_options()``; on CPU, make one JAX
    device per core and take the mesh from :func:`models_mesh`. It also runs
    eagerly.

    Args:
      apply: ``apply(params, *inputs) -> outputs`` for one model (no model axis).
      remat: a ``jax.checkpoint_policies`` name, a policy, or ``None``.
      chunk: models per loop step (over all devices together); must divide K and
        be a multiple of the devices on ``axis``. ``None`` (or ``chunk >= K``): all
        at once.
      mesh: a mesh with an axis ``axis`` to split the models over.
      axis: the mesh axis name.

    Raises:
      ValueError: naming the path of a leaf without the model axis or with a
        different K, an unknown ``remat`` name, a ``chunk`` that does not divide
        K, a mesh without ``axis``, or an ``Explicit`` ``axis`` outside
        ``jax.set_mesh``.

    >>> import jax, jax.numpy as jnp
    >>> import jfreeze as jf
    >>> zoo = {"w": jnp.ones((4, 3, 2))}                 # 4 frozen models
    >>> run = jf.vmap_models(lambda p, x: jnp.tanh(x @ p["w"]), chunk=2)
    >>> x = jnp.ones((4, 5, 3))                          # 5 probe inputs per model
    >>> run(zoo, x).shape
    (4, 5, 2)
    >>> g = jax.grad(lambda zoo, x: run(zoo, x).sum(), argnums=(0, 1))(zoo, x)
    >>> float(jnp.abs(g[0]["w"]).max()), g[1].shape      # no weight gradients
    (0.0, (4, 5, 3))
    """
    policy = _remat_policy(remat)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"jf.vmap_models: chunk must be a positive int or None, got {chunk!r}.")
    if mesh is not None and axis not in mesh.axis_names:
        raise ValueError(f"jf.vmap_models: the mesh has axes {mesh.axis_names}, not {axis!r}.")

    def build(static: Any) -> Callable[..., Any]:
        def one(p: Any, *xs: Any) -> Any:
            return apply(_combine(p, static), *xs)

        return jax.vmap(one if remat is None else jax.checkpoint(one, policy=policy))

    # One function per kind of shared leaves, so eager calls reuse jax.checkpoint's trace
    # (a fresh closure per call retraced the model each time: 3x slower eager calls).
    @functools.lru_cache(maxsize=8)
    def built(treedef: Any, typed: tuple) -> Callable[..., Any]:
        return build(jax.tree.unflatten(treedef, [x for _, x in typed]))

    def run(params: Any, *inputs: Any) -> Any:
        # Non-array leaves (an Equinox module's activation functions) are the same for
        # every model: held as they are, only the arrays are stacked and mapped over.
        params, static = _partition(params)
        leaves, treedef = jax.tree.flatten(static)
        try:
            # Keyed by type too: 1, 1.0 and True are equal, and must not share a function.
            batched = built(treedef, tuple((type(x), x) for x in leaves))
        except TypeError:  # an unhashable shared leaf: built for this call only
            batched = build(static)
        k = _model_count(params, inputs)
        shard, n = _constraint(mesh, axis)
        _check_split(params, inputs, k, n, chunk, axis)
        params, inputs = shard((jax.lax.stop_gradient(params), inputs))
        if chunk is None or chunk >= k:
            return shard(batched(params, *inputs))
        return shard(_chunked(batched, params, inputs, k, chunk, shard))

    return run


def _partition(tree: Any) -> tuple[Any, Any]:
    """``(arrays, rest)``: two trees of ``tree``'s structure, ``None`` where the other holds."""
    arrays = jax.tree.map(lambda x: x if is_array(x) else None, tree)
    return arrays, jax.tree.map(lambda x: None if is_array(x) else x, tree)


def _combine(arrays: Any, rest: Any) -> Any:
    return jax.tree.map(lambda a, r: r if a is None else a, arrays, rest,
                        is_leaf=lambda x: x is None)


def _remat_policy(remat: Any) -> Any:
    if remat is None or callable(remat):
        return remat
    policy = getattr(jax.checkpoint_policies, str(remat), None)
    if policy is None or str(remat).startswith("_"):
        known = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")]
        raise ValueError(f"jf.vmap_models: remat={remat!r} is not a jax.checkpoint_policies "
                         f"name; known: {', '.join(known)}, or None.")
    return policy


def _named_leaves(params: Any, inputs: tuple[Any, ...]) -> list[tuple[str, Any]]:
    # Paths read params/... then inputs/<i>/..., the spelling of every other jf error.
    flat = [("params", p, x) for p, x in leaves_with_paths(params)[0]]
    flat += [("inputs", p, x) for p, x in leaves_with_paths(list(inputs))[0]]
    return [(f"{top}/{p}" if p else top, x) for top, p, x in flat]


def _model_count(params: Any, inputs: tuple[Any, ...]) -> int:
    flat = _named_leaves(params, inputs)
    if not flat:
        raise ValueError("jf.vmap_models: params and inputs have no leaves.")
    first, x0 = flat[0]
    for path, x in flat:
        if np.ndim(x) == 0:
            raise ValueError(f"jf.vmap_models: the leaf at path {path!r} is a scalar; every "
                             "leaf of params and inputs needs a leading (model) axis.")
        if np.shape(x)[0] != np.shape(x0)[0]:
            raise ValueError(
                f"jf.vmap_models: path {path!r} has {np.shape(x)[0]} models (shape "
                f"{list(np.shape(x))}), path {first!r} has {np.shape(x0)[0]}; every leaf "
                "of params and inputs needs the same leading (model) axis.")
    return int(np.shape(x0)[0])


def _constraint(mesh: Mesh | None, axis: str) -> tuple[Callable[[Any], Any], int]:
    """A function constraining a tree's leading axis to ``axis``, and that axis' size."""
    # The ambient mesh of jax.set_mesh (an AbstractMesh) when none is given.
    ambient = jax.sharding.get_abstract_mesh()
    use: Any = ambient if mesh is None else mesh
    if use.empty or axis not in use.axis_names:
        return (lambda tree: tree), 1
    if (_AXIS_TYPE is not None
            and use.axis_types[use.axis_names.index(axis)] == _AXIS_TYPE.Explicit):
        # An Explicit axis is part of the arrays' types: reshard, which jax allows only
        # under the mesh's jax.set_mesh (with_sharding_constraint takes Auto axes only).
        if ambient.empty or axis not in ambient.axis_names:
            raise ValueError(
                f"jf.vmap_models: mesh axis {axis!r} is Explicit; call the step under "
                "`with jax.set_mesh(mesh):` (mesh= may then be left out), or use a mesh "
                "whose axis is Auto (jf.models_mesh makes one).")
        spec = PartitionSpec(axis)
        return (lambda tree: jax.tree.map(lambda x: jax.sharding.reshard(x, spec), tree),
                use.shape[axis])
    sharding = NamedSharding(use, PartitionSpec(axis))
    return (lambda tree: jax.lax.with_sharding_constraint(tree, sharding)), use.shape[axis]


def _check_split(params: Any, inputs: Any, k: int, n: int, chunk: int | None, axis: str) -> None:
    if k % n:
        path = _named_leaves(params, inputs)[0][0]
        raise ValueError(f"jf.vmap_models: {k} models (path {path!r}) do not split evenly over "
                         f"the {n} devices of mesh axis {axis!r}.")
    if chunk is not None and chunk < k and (k % chunk or chunk % n):
        raise ValueError(f"jf.vmap_models: chunk={chunk} must divide the {k} models and be a "
                         f"multiple of the {n} devices of mesh axis {axis!r}.")


def _chunked(batched: Callable[..., Any], params: Any, inputs: tuple[Any, ...], k: int,
             chunk: int, shard: Callable[[Any], Any]) -> Any:
    # Loop step j runs models {i * loops + j}: reshaping (K, ...) to (chunk, loops, ...)
    # keeps each device's contiguous share of the models on that device (no data moves),
    # and the loop indexes the second axis, so every step runs on all devices at once.
    loops = k // chunk
    params, inputs = shard(jax.tree.map(lambda x: x.reshape(chunk, loops, *x.shape[1:]),
                                        (params, inputs)))

    # Under jax.checkpoint, a step saves only its index for the backward pass (params and
    # inputs are loop-invariant), and recomputes its chunk's forward there.
    @jax.checkpoint
    def step(carry: None, j: Any) -> tuple[None, Any]:
        p, xs = shard(jax.tree.map(
            lambda x: jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False),
            (params, inputs)))
        return carry, shard(batched(p, *xs))

    _, out = jax.lax.scan(step, None, jnp.arange(loops))  # (loops, chunk, ...)
    return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(k, *y.shape[2:]), out)
