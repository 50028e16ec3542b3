"""Trainable-only checkpoints with a freeze manifest, saved with orbax (an optional extra).

Orbax is imported inside the functions that use it, so ``import jfreeze`` does
not need it; install it with ``pip install "jfreeze[orbax]"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfreeze._tree import (
    Flat,
    Mask,
    describe_paths,
    is_array,
    leaves_with_paths,
    mask_count,
    runs,
    shape_dtype,
    simplify,
    slab,
)
from jfreeze.selectors import FrozenSpec, Selector, as_selector

__all__ = ["check_manifest", "freeze_manifest", "restore_trainable", "save_trainable"]

FORMAT = "jfreeze.trainable_checkpoint"
# 2: collections. 3: the frozen layers of a stack are saved by reference (an entry's
# "layers"): its array on disk holds the trainable layers only. Versions 1 and 2 still load.
VERSION = 3
_SHOWN = 8  # mismatches listed in an error


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "jfreeze checkpoints need orbax: pip install 'jfreeze[orbax]' (orbax-checkpoint)"
        ) from e
    return ocp


def _mask_hash(mask: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr(tuple(mask.shape)).encode())
    h.update(np.packbits(mask.astype(bool, copy=False), axis=None).tobytes())  # no copy of a view
    return h.hexdigest()[:16]


def _record(path: str, x: Any) -> dict[str, Any]:
    """A leaf's manifest entry: its path, shape and dtype (a type name for non-arrays).

    A Python scalar is spelled as the array it is saved as (``int`` as ``int32``),
    so a fresh ``TrainState``'s ``step=0`` matches the saved ``step`` array.
    """
    if isinstance(x, bool | int | float | complex):
        x = jnp.asarray(x)
    if not is_array(x):
        dtype = type(x).__name__
    elif _is_key(x):
        dtype = str(x.dtype)  # key<fry>: NumPy has no name for it
    else:
        dtype = str(np.dtype(x.dtype))
    return {"path": path, "shape": list(getattr(x, "shape", ())), "dtype": dtype}


def _is_key(x: Any) -> bool:
    """A typed PRNG key array (``jax.random.key``), or its shape, as a TrainState's ``rng``."""
    return is_array(x) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(x: Any) -> Any:
    """What is saved and fingerprinted of a leaf: a typed key's ``uint32`` data, else itself."""
    return jax.random.key_data(x) if _is_key(x) else x


def _state_entries(opt_state: Any) -> list[dict[str, Any]]:
    return [_record(p, x) for p, x in leaves_with_paths(opt_state)[0]]


def _spelled(entries: list[dict[str, Any]]) -> dict[str, str]:
    """``{path: "float32[2, 3]"}`` of manifest entries."""
    return {e["path"]: f"{e['dtype']}{e['shape']}" for e in entries}


def _refuse_shared_paths(paths: Sequence[str], what: str) -> None:
    """Checkpoints match leaves by path, so no two leaves may share a path string."""
    counts = Counter(paths)
    shared = [p for p, n in counts.items() if n > 1]
    if shared:
        raise ValueError(
            f"two leaves of the {what} share the path {describe_paths(shared)} (e.g. a dict key "
            "'a/b' and a nested a -> b), so they cannot be matched by path in a checkpoint: "
            "rename one of them."
        )


def _bit_width(dtype: Any) -> int:
    # jnp.issubdtype knows the ml_dtypes (bf16, fp8, int4: NumPy kind 'V').
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits  # int4, uint2, ... are narrower than their itemsize
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.finfo(dtype).bits
    return 8 * np.dtype(dtype).itemsize


def _as_words(x: Any, xp: Any) -> Any:
    """The bits of ``x`` as a flat uint32 array, the same for NumPy (``xp=np``) and JAX.

    Reinterprets, never converts, except booleans and sub-byte dtypes, whose
    conversion by value is exact and one to one. Complex numbers are split into
    real and imaginary parts (interleaved, as in memory); an 8-byte word becomes
    two uint32 words.
    """
    if x.dtype == np.bool_:
        return x.astype(np.uint32).ravel()
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        if xp is np:
            x = np.ascontiguousarray(x).reshape(-1).view(x.real.dtype)
        else:
            x = jnp.stack([jax.lax.real(x), jax.lax.imag(x)], axis=-1)
    width = _bit_width(x.dtype)
    if width < 8:  # int4, float4_e2m1fn, ...: no NaN payloads, widen by value
        x = x.astype(np.int32 if jnp.issubdtype(x.dtype, jnp.integer) else np.float32)
        width = 32
    word = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint32}[width]
    if xp is np:
        return np.ascontiguousarray(x).reshape(-1).view(word).astype(np.uint32)
    return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32).ravel()


@jax.jit
def _fingerprints(words: list) -> list:
    """A 64-bit position-weighted checksum of each leaf's bits, computed on device.

    A leaf is a JAX array, or a NumPy array already turned into words by
    :func:`_as_words` on the host.

    Any single flipped bit changes ``b``: the product term changes at or above
    the flipped bit, the shifted term only below it.
    """
    out = []
    for bits in words:
        bits = _as_words(bits, jnp)
        idx = jax.lax.iota(jnp.uint32, bits.size)
        # dtype=uint32: the same sums (and fingerprints) with jax_enable_x64 on.
        a = jnp.sum(bits * (idx * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)),
                    dtype=jnp.uint32)
        b = jnp.sum((bits + idx) * jnp.uint32(0x85EBCA6B) ^ (bits >> 7), dtype=jnp.uint32)
        out.append(jnp.stack([a, b]))
    return out


def _fingerprint_all(leaves: Sequence[Any]) -> list[str]:
    if not leaves:
        return []
    # NumPy leaves are turned into words on the host: handing a float64 array to
    # jit without x64 would round it to float32 first.
    words = [_as_words(x, np) if isinstance(x, np.ndarray) else _key_data(x) for x in leaves]
    return [f"{int(a):08x}{int(b):08x}" for a, b in jax.device_get(_fingerprints(words))]


Collections = Mapping[str, Any]
"""Named trees beside the params (``{"batch_stats": stats}``), saved and checked by path."""


def _frozen_layers(x: Any, m: Mask) -> dict[str, Any] | None:
    """``{"axis": a, "frozen": [layers]}`` of a stack (2 or more dims, as jf.summary
    counts them) frozen by whole slices along one axis, else None."""
    if isinstance(m, bool) or len(getattr(x, "shape", ())) < 2:
        return None
    found = slab(np.broadcast_to(m, x.shape))
    if found is None:
        return None
    return {"axis": found[0], "frozen": [int(i) for i in np.flatnonzero(found[1])]}


def _entries(flat: Flat, masks: Sequence[Mask], include_frozen: bool) -> list[dict[str, Any]]:
    """The manifest entries of a tree's leaves: path, shape, dtype, status, saved, and
    for a stack frozen by layers (not ``include_frozen``), which layers stay on disk."""
    leaves = []
    for (path, x), m in zip(flat.entries, masks, strict=True):
        entry = _record(path, x)
        if m is True:
            entry["status"] = "frozen"
        elif m is False:
            entry["status"] = "trainable"
        else:
            entry.update(status="partial", mask_sha256=_mask_hash(m),
                         frozen_elements=mask_count(m, m.size))
            layers = None if include_frozen else _frozen_layers(x, m)
            if layers is not None:
                entry["layers"] = layers  # the trainable layers are saved, the frozen referenced
        entry["saved"] = bool(m is not True or include_frozen)  # JSON true/false, never 1
        leaves.append(entry)
    return leaves


def _slices(x: Any, axis: int, index: Sequence[int]) -> Any:
    """The layers ``index`` of ``x`` along ``axis``, stacked, every bit kept."""
    at = (slice(None),) * axis + (np.asarray(index, dtype=np.int32),)
    if isinstance(x, np.ndarray):
        return x[at]
    return _on_bits(lambda b: b[at], x)


def _on_bits(f: Any, x: Any, *more: Any) -> Any:
    """``f`` applied to the bits of JAX float arrays (as uints of their width), so that
    XLA cannot quiet a NaN or flush a subnormal on the way (it computes a bf16
    scatter in float32); other dtypes as they are."""
    width = 8 * np.dtype(x.dtype).itemsize
    if not jnp.issubdtype(x.dtype, jnp.floating) or _bit_width(x.dtype) != width:
        return f(x, *more)
    word = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[width]
    bits = [jax.lax.bitcast_convert_type(a, word) for a in (x, *more)]
    return jax.lax.bitcast_convert_type(f(*bits), x.dtype)


def _layer(x: Any, axis: int, i: int) -> Any:
    return x[(slice(None),) * axis + (i,)]


def _trainable_layers(e: dict[str, Any]) -> list[int]:
    frozen = set(e["layers"]["frozen"])
    return [i for i in range(e["shape"][e["layers"]["axis"]]) if i not in frozen]


def _saved_value(x: Any, e: dict[str, Any]) -> Any:
    """What is written for a saved leaf: its (key) data, only the trainable layers of a stack."""
    v = _key_data(x)
    return _slices(v, e["layers"]["axis"], _trainable_layers(e)) if "layers" in e else v


def _holds_values(x: Any) -> bool:
    """An array with values (not a ``jax.ShapeDtypeStruct`` template): can be fingerprinted."""
    return isinstance(x, jax.Array | np.ndarray)


def _add_fingerprints(entries: list[dict[str, Any]], flat: Flat) -> None:
    """A fingerprint of each frozen leaf, and of each frozen layer of a stack (that of
    the slice as a leaf of its own), so that a mismatch names the layer."""
    pairs = list(zip(entries, flat.entries, strict=True))
    frozen_at = [i for i, (e, (_, x)) in enumerate(pairs)
                 if e["status"] == "frozen" and _holds_values(x)]
    stacks = [(e, _key_data(x)) for e, (_, x) in pairs if "layers" in e and _holds_values(x)]
    layers = [_layer(v, e["layers"]["axis"], i) for e, v in stacks for i in e["layers"]["frozen"]]
    prints = _fingerprint_all([flat.entries[i][1] for i in frozen_at] + layers)
    for i, fp in zip(frozen_at, prints[:len(frozen_at)], strict=True):
        entries[i]["fingerprint"] = fp
    prints = prints[len(frozen_at):]
    for e, _ in stacks:
        k = len(e["layers"]["frozen"])
        e["layers"]["fingerprints"], prints = prints[:k], prints[k:]


def _collection_masks(name: str, flat: Flat, sel: Selector,
                      collection_frozen: Mapping[str, FrozenSpec] | None) -> list[Mask]:
    """What is frozen in one collection: its own selector, or ``frozen=`` by path.

    A selector given for the collection is strict (it was written for it);
    ``frozen=`` is not (it was written for the params, and was checked there:
    ``backbone/**`` matches the backbone's statistics, a pattern naming a kernel
    matches none, and neither is a typo), and never freezes a collection that
    is a single leaf (its path is ``''``, no params path).
    """
    if collection_frozen is not None and name in collection_frozen:
        try:
            return as_selector(collection_frozen[name]).evaluate(flat)
        except ValueError as e:
            raise ValueError(f"collection_frozen[{name!r}]: {e}") from None
    # A collection that is one leaf (a TrainState's step) has no params path: the
    # params' frozen= (say ~jf.paths("head/**"), which matches '') does not freeze it,
    # and a collection with no leaf (batch_stats=None) has nothing to freeze.
    if all(p == "" for p in flat.paths):
        return [False] * len(flat.entries)
    if not sel.per_leaf:
        raise TypeError(
            f"frozen={sel!r} is a mask tree or mask function of the params, so it cannot say "
            f"what is frozen in the collection {name!r}: pass collection_frozen={{{name!r}: "
            "...} (a selector such as jf.paths('backbone/**'), or jf.nothing to save it all)."
        )
    try:
        return [p != "" and simplify(sel.leaf_mask(p, shape_dtype(x))) for p, x in flat.entries]
    except (ValueError, TypeError) as e:
        raise type(e)(f"the collection {name!r}, frozen by the params' frozen= on its paths: "
                      f"{e} (pass collection_frozen={{{name!r}: ...}} to say what is frozen "
                      "there)") from None


def _check_collection_args(collections: Any, collection_frozen: Any) -> None:
    if not isinstance(collections, Mapping) or not all(isinstance(k, str) for k in collections):
        raise TypeError(
            "collections= takes a dict of named trees, e.g. {'batch_stats': stats}; got "
            f"{type(collections).__name__}"
        )
    unknown = sorted(set(collection_frozen or ()) - set(collections))
    if unknown:
        raise ValueError(
            f"collection_frozen= names the collection {unknown[0]!r}, which is not in "
            f"collections= (it holds {sorted(collections)})"
        )


def _collection_entries(
    collections: Collections, sel: Selector, collection_frozen: Any, include_frozen: bool,
    fingerprint: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Manifest entries of each collection, by name (sorted)."""
    _check_collection_args(collections, collection_frozen)
    out = {}
    for name in sorted(collections):
        flat = Flat.of(collections[name])
        _refuse_shared_paths(flat.paths, f"collection {name!r}")
        out[name] = _entries(flat, _collection_masks(name, flat, sel, collection_frozen),
                             include_frozen)
        if fingerprint:
            _add_fingerprints(out[name], flat)
    return out


def freeze_manifest(
    params: Any,
    *,
    frozen: FrozenSpec,
    opt_state: Any = None,
    collections: Collections | None = None,
    collection_frozen: Mapping[str, FrozenSpec] | None = None,
    include_frozen: bool = False,
    frozen_source: str | None = None,
    fingerprint: bool = True,
) -> dict:
    """A JSON-able record of what is frozen in ``params``, and of the optimizer state.

    For each leaf: its path, shape, dtype and status (``"frozen"``,
    ``"trainable"`` or ``"partial"`` with the hash of its element mask), and,
    for frozen leaves, a fingerprint of their values (a 64-bit checksum computed
    on device over the leaf's bits, every dtype, not a cryptographic hash) so
    that a resumed run can check that it was handed the same frozen weights.
    A stack frozen by whole layers (a leaf of 2 or more dimensions whose mask
    selects whole slices along one axis, as :func:`jfreeze.layers` does) is
    recorded with ``"layers"``: its ``axis``, the ``frozen`` layers and a
    fingerprint per frozen layer (unless ``include_frozen``).
    The optimizer state is recorded by path too. ``collections`` (named trees
    beside the params, such as a linen model's ``batch_stats``) are recorded
    like the params, each leaf frozen or not by ``collection_frozen[name]`` if
    given, else by ``frozen`` on its path (the statistics of a frozen
    ``backbone/**`` are frozen). Leaves are matched by path,
    so two leaves that share a path string (a dict key ``"a/b"`` and a nested
    ``a`` → ``b``) are a ``ValueError``. :func:`save_trainable` writes it;
    :func:`check_manifest` compares it with a current freeze. Use the two
    directly to add the manifest to your own ``orbax`` ``CheckpointManager``
    items (``ocp.args.JsonSave(manifest)``).

    >>> import jax.numpy as jnp
    >>> import jfreeze as jf
    >>> m = jf.freeze_manifest({"a": jnp.ones(2), "b": jnp.ones(3)}, frozen=jf.paths("a"),
    ...                        collections={"stats": {"a": jnp.zeros(2), "b": jnp.zeros(3)}})
    >>> [(leaf["path"], leaf["status"]) for leaf in m["params"]]
    [('a', 'frozen'), ('b', 'trainable')]
    >>> [(leaf["path"], leaf["status"]) for leaf in m["collections"]["stats"]]
    [('a', 'frozen'), ('b', 'trainable')]
    >>> m["selector"]
    "paths('a')"
    >>> stack = {"w": jnp.ones((4, 2, 2))}
    >>> m = jf.freeze_manifest(stack, frozen=jf.layers("w", [0, 1]))
    >>> entry = m["params"][0]
    >>> entry["status"], entry["layers"]["axis"], entry["layers"]["frozen"], m["version"]
    ('partial', 0, [0, 1], 3)
    """
    sel = as_selector(frozen)
    flat = Flat.of(params)
    _refuse_shared_paths(flat.paths, "params")
    leaves = _entries(flat, sel.evaluate(flat), include_frozen)
    if fingerprint:
        _add_fingerprints(leaves, flat)
    state = None
    if opt_state is not None:
        state = _state_entries(opt_state)
        _refuse_shared_paths([e["path"] for e in state], "optimizer state")
    colls = _collection_entries(collections or {}, sel, collection_frozen, include_frozen,
                                fingerprint)
    import jfreeze

    return {
        "format": FORMAT,
        "version": VERSION,
        "selector": repr(sel),
        "include_frozen": bool(include_frozen),
        "frozen_source": frozen_source,
        "params": leaves,
        "opt_state": state,
        "collections": colls,
        "versions": {"jfreeze": jfreeze.__version__, "jax": jax.__version__},
    }


def _list(problems: list[str]) -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:_SHOWN])
    more = len(problems) - _SHOWN
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


_STATUSES = ("frozen", "trainable", "partial")


def _entry_problem(e: Any, include_frozen: bool, state: bool) -> str | None:
    """What is wrong with one leaf entry of a manifest, or None."""
    if not isinstance(e, dict):
        return f"is {e!r:.60}, not an object"
    if not isinstance(e.get("path"), str):
        return "has no 'path' string"
    shape = e.get("shape")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return f"has 'shape' {shape!r:.60}, not a list of sizes"
    if not isinstance(e.get("dtype"), str):
        return "has no 'dtype' string"
    if state:
        return None
    status = e.get("status")
    if status not in _STATUSES:
        return f"has 'status' {status!r:.60}, not one of {_STATUSES}"
    if type(e.get("saved")) is not bool or e["saved"] != (status != "frozen" or include_frozen):
        return f"has 'saved' {e.get('saved')!r:.60}, which contradicts its status {status!r}"
    if status == "partial" and not (
        isinstance(e.get("mask_sha256"), str) and type(e.get("frozen_elements")) is int
    ):
        return "is partially frozen without a 'mask_sha256' string and 'frozen_elements' count"
    if not isinstance(e.get("fingerprint", ""), str):
        return "has a 'fingerprint' that is not a string"
    if "layers" in e:
        return _layers_problem(e)
    return None


def _layers_problem(e: dict) -> str | None:
    """What is wrong with the ``layers`` of an entry (version 3: a stack's frozen layers)."""
    layers, shape = e["layers"], e["shape"]
    if e["status"] != "partial" or not e["saved"] or not isinstance(layers, dict):
        return f"has 'layers' {layers!r:.60} but is not a saved, partially frozen leaf"
    axis, frozen = layers.get("axis"), layers.get("frozen")
    if type(axis) is not int or not 0 <= axis < len(shape):
        return f"has 'layers' with 'axis' {axis!r:.60}, not an axis of its shape {shape}"
    n = shape[axis]
    if not (isinstance(frozen, list) and all(type(i) is int for i in frozen)
            and frozen == sorted(set(frozen)) and 0 < len(frozen) < n
            and frozen[0] >= 0 and frozen[-1] < n):
        return f"has 'layers' with 'frozen' {frozen!r:.60}, not some of its {n} layers"
    prints = layers.get("fingerprints", [""] * len(frozen))  # none: saved without them
    if not (isinstance(prints, list) and len(prints) == len(frozen)
            and all(isinstance(p, str) for p in prints)):
        return "has 'layers' whose 'fingerprints' are not one string per frozen layer"
    return None


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a manifest (read back from disk: anything JSON can hold), or None."""
    if not isinstance(m, dict):
        return f"it is {m!r:.60}, not a JSON object"
    if m.get("format") != FORMAT:
        return f"its 'format' is {m.get('format')!r:.60}, not {FORMAT!r}"
    version = m.get("version")
    if type(version) is not int or version < 1:
        return f"its 'version' is {version!r:.60}, not a positive integer"
    if version > VERSION:
        return f"its 'version' is {version}; this jfreeze reads up to version {VERSION}"
    for key, types, what in [("selector", str, "a string"), ("include_frozen", bool, "a bool"),
                             ("frozen_source", (str, type(None)), "a string or null"),
                             ("params", list, "a list"), ("opt_state", (list, type(None)),
                                                          "a list or null")]:
        if key not in m:
            return f"it has no {key!r}"
        if not isinstance(m[key], types):
            return f"its {key!r} is {m[key]!r:.60}, not {what}"
    for key in ("params", "opt_state"):
        for i, e in enumerate(m[key] or []):
            problem = _entry_problem(e, m["include_frozen"], state=key == "opt_state")
            if problem:
                return f"{key}[{i}] " + problem
    return _collections_problem(m)


def _collections_problem(m: dict) -> str | None:
    """Version 1 manifests have no ``collections``; from version 2 it is a dict of lists."""
    if "collections" not in m:
        return "it has no 'collections'" if m["version"] >= 2 else None
    colls = m["collections"]
    if not isinstance(colls, dict):
        return f"its 'collections' is {colls!r:.60}, not an object"
    for name, entries in colls.items():
        if not isinstance(entries, list):
            return f"its collection {name!r} is {entries!r:.60}, not a list"
        for i, e in enumerate(entries):
            problem = _entry_problem(e, m["include_frozen"], state=False)
            if problem:
                return f"collections[{name!r}][{i}] " + problem
    return None


def check_manifest(
    manifest: dict,
    params: Any,
    *,
    frozen: FrozenSpec,
    opt_state: Any = None,
    collections: Collections | None = None,
    collection_frozen: Mapping[str, FrozenSpec] | None = None,
    verify_frozen: bool = True,
) -> None:
    """Raises ``ValueError`` naming every path where ``manifest`` and the current freeze differ.

    Checked: the same leaf paths, shapes and dtypes; each leaf frozen,
    trainable or partially frozen as it was, with the same element mask; the
    optimizer state's paths, shapes and dtypes (if both are given); the
    ``collections`` (if given) as the params, each error naming the collection,
    and the same collection names as saved; and, with ``verify_frozen``, the
    values of frozen leaves that were not saved (their fingerprint), and of the
    frozen layers of stacks (a fingerprint per layer: an error names the path
    and the layer, ``'layers/w' layer 3 of 12 on axis 0``), since the resumed
    run will use the ones in ``params`` and ``collections``.
    Leaves are compared by path, so the same leaves in another order (fields
    reordered in a refactor) are no difference: :func:`restore_trainable` reads
    them back by path as well. A manifest that is not one jfreeze wrote (wrong
    format, newer version, missing or ill-typed fields), or two leaves sharing
    a path string, is a ``ValueError`` too.

    >>> import jax.numpy as jnp
    >>> import jfreeze as jf
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> m = jf.freeze_manifest(params, frozen=jf.paths("a"))
    >>> jf.check_manifest(m, params, frozen=jf.paths("b"))
    Traceback (most recent call last):
    ValueError: the checkpoint was saved under a different freeze ...
      - 'a': frozen when saved, trainable now
      - 'b': trainable when saved, frozen now
    """
    problem = _manifest_problem(manifest)
    if problem:
        raise ValueError(f"not a valid jfreeze trainable-only checkpoint manifest: {problem}")
    for key, what in [("params", "saved params"), ("opt_state", "saved optimizer state")]:
        _refuse_shared_paths([e["path"] for e in manifest[key] or []], what)
    sel = as_selector(frozen)
    now = freeze_manifest(params, frozen=sel, fingerprint=False)
    was = {e["path"]: e for e in manifest["params"]}
    problems = _freeze_differences(was, {e["path"]: e for e in now["params"]}, "params")
    if problems:
        raise ValueError(
            "the checkpoint was saved under a different freeze (saved with frozen="
            f"{manifest['selector']}, now frozen={now['selector']}):\n" + _list(problems)
        )
    if opt_state is not None and manifest.get("opt_state") is not None:
        _check_state(manifest["opt_state"], _state_entries(opt_state))
    if collections is not None:
        _check_collections(manifest, collections, sel, collection_frozen)
    if verify_frozen:
        _verify_frozen(manifest, "", was, Flat.of(params))
        for name, tree in (collections or {}).items():
            saved = {e["path"]: e for e in manifest["collections"][name]}
            _verify_frozen(manifest, name, saved, Flat.of(tree))


def _check_collections(manifest: dict, collections: Collections, sel: Selector,
                       collection_frozen: Any) -> None:
    """The same collection names as saved; each collection's leaves as the params'."""
    _check_collection_args(collections, collection_frozen)
    saved = manifest.get("collections", {})  # version 1: none
    for name in sorted(set(collections) - set(saved)):
        raise ValueError(
            f"the checkpoint holds no collection {name!r} (it holds "
            f"{sorted(saved) if saved else 'none'})"
        )
    for name in sorted(set(saved) - set(collections)):
        raise ValueError(
            f"the checkpoint holds the collection {name!r} ({len(saved[name])} leaves), which "
            f"is not in collections=: pass collections={{{name!r}: ...}} to restore it"
        )
    for name in sorted(collections):
        _refuse_shared_paths([e["path"] for e in saved[name]], f"saved collection {name!r}")
        flat = Flat.of(collections[name])
        now = _entries(flat, _collection_masks(name, flat, sel, collection_frozen), False)
        was = {e["path"]: e for e in saved[name]}
        problems = _freeze_differences(was, {e["path"]: e for e in now},
                                       f"collection {name!r}")
        if problems:
            raise ValueError(
                f"the collection {name!r} does not match the one saved (another model, or "
                "another freeze):\n" + _list(problems)
            )


def _verify_frozen(manifest: dict, collection: str, was: dict[str, dict], flat: Flat) -> None:
    """Frozen leaves and frozen layers of stacks saved by reference must be those the
    checkpoint was trained with."""
    moved, layers = _moved_frozen(was, flat), _moved_layers(was, flat)
    if not (moved or layers):
        return
    source = manifest.get("frozen_source")
    by_ref = f" (saved by reference to {source!r})" if source else ""
    of = f" of the collection {collection!r}" if collection else ""
    what = [f"the frozen leaves{of} at {describe_paths(moved)}"] if moved else []
    what += [f"the frozen layers{of} at {', '.join(layers[:_SHOWN])}"] if layers else []
    differ = f"{' and '.join(what)} differ from those the checkpoint was trained with{by_ref}"
    if layers and not moved:
        differ += " (the trainable layers of a stack may hold anything)"
    if not collection:
        raise ValueError(f"{differ}: load the same frozen weights, or pass verify_frozen=False.")
    raise ValueError(
        f"{differ}: load the same ones; if they "
        "change in training (BatchNorm statistics of a frozen part updated in train mode), "
        f"they are not frozen: save them with collection_frozen={{{collection!r}: "
        "jf.nothing}; or pass verify_frozen=False."
    )


def _freeze_differences(was: dict[str, dict], cur: dict[str, dict], what: str) -> list[str]:
    """Per path: leaves only in one, or saved with another shape, dtype, status or mask."""
    problems = [f"{p!r}: in the checkpoint, not in the {what}" for p in was if p not in cur]
    problems += [f"{p!r}: in the {what}, not in the checkpoint" for p in cur if p not in was]
    for p, e in cur.items():
        w = was.get(p)
        if w is None:
            continue
        if (w["shape"], w["dtype"]) != (e["shape"], e["dtype"]):
            problems.append(
                f"{p!r}: saved as {w['dtype']}{w['shape']}, now {e['dtype']}{e['shape']}"
            )
        elif w["status"] != e["status"]:
            problems.append(f"{p!r}: {w['status']} when saved, {e['status']} now")
        elif w["status"] == "partial" and w["mask_sha256"] != e["mask_sha256"]:
            problems.append(
                f"{p!r}: partially frozen with a different element mask ({w['frozen_elements']} "
                f"frozen elements when saved, {e['frozen_elements']} now)"
            )
    return problems


def _check_state(saved_state: list[dict], cur_state: list[dict]) -> None:
    """The optimizer state's paths, shapes and dtypes, compared by path."""
    _refuse_shared_paths([e["path"] for e in cur_state], "optimizer state")
    was_s, now_s = _spelled(saved_state), _spelled(cur_state)
    if was_s == now_s:  # by path: the same leaves in another order are read back by path
        return
    diff = [f"{p!r}: in the saved state only ({t})" for p, t in was_s.items() if p not in now_s]
    diff += [f"{p!r}: in the current state only ({t})" for p, t in now_s.items()
             if p not in was_s]
    diff += [f"{p!r}: saved {t}, now {now_s[p]}" for p, t in was_s.items()
             if p in now_s and now_s[p] != t]
    raise ValueError(
        f"the optimizer state does not match the one saved ({len(saved_state)} leaves "
        f"saved, {len(cur_state)} now): another optimizer, or another freeze inside "
        "it:\n" + _list(diff)
    )


def _moved_frozen(was: dict[str, dict], flat: Flat) -> list[str]:
    """Paths of frozen leaves, not saved, whose fingerprint differs from the manifest's."""
    check = [
        (p, x) for p, x in flat.entries
        if "fingerprint" in was.get(p, {}) and not was[p]["saved"]
        and _holds_values(x)
    ]
    prints = _fingerprint_all([x for _, x in check])
    return [p for (p, _), fp in zip(check, prints, strict=True) if fp != was[p]["fingerprint"]]


def _moved_layers(was: dict[str, dict], flat: Flat) -> list[str]:
    """``"'stack/w' layer 3 of 12 on axis 0"`` for each stack whose frozen layers, not
    saved, differ from their fingerprints in the manifest."""
    check = [(p, x, was[p]["layers"]) for p, x in flat.entries
             if "fingerprints" in was.get(p, {}).get("layers", {}) and _holds_values(x)]
    prints = _fingerprint_all([_layer(_key_data(x), layers["axis"], i)
                               for _, x, layers in check for i in layers["frozen"]])
    out = []
    for p, _, layers in check:
        k = len(layers["frozen"])
        now, prints = prints[:k], prints[k:]
        moved = [i for i, a, b in zip(layers["frozen"], now, layers["fingerprints"], strict=True)
                 if a != b]
        if moved:
            out.append(_named_layers(p, was[p], moved))
    return out


def _named_layers(path: str, e: dict[str, Any], index: Sequence[int]) -> str:
    """``"'stack/w' layers 0-7 of 12 on axis 0"`` (runs of the sorted ``index``)."""
    axis = e["layers"]["axis"]
    n = e["shape"][axis]
    spans = ", ".join(str(a) if b == a + 1 else f"{a}-{b - 1}"
                      for a, b, v in runs(np.isin(np.arange(n), index)) if v)
    word = "layer" if len(index) == 1 else "layers"
    return f"{path!r} {word} {spans} of {n} on axis {axis}"


def _abstract(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if _is_key(x):  # read as the key's data: (*shape, *key_shape) uint32
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _abstract_layers(x: Any, axis: int, k: int) -> Any:
    """What is read of a stack saved by layers: ``k`` layers along ``axis``, sharded as
    the template where ``k`` layers can be (else not split along the layer axis)."""
    whole = _abstract(x)
    shape = (*whole.shape[:axis], k, *whole.shape[axis + 1:])
    sharding = whole.sharding
    try:
        sharding.shard_shape(shape)
    except ValueError:  # e.g. 12 layers on 4 devices, 4 of them trainable: 4 % 3 != 0
        if not isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            spec = [*sharding.spec, *[None] * (len(shape) - len(sharding.spec))]
            spec[axis] = None
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.ShapeDtypeStruct(shape, whole.dtype, sharding=sharding)


def _put_layers(x: Any, got: Any, e: dict[str, Any]) -> Any:
    """The template's stack (its frozen layers) with the trainable layers read back."""
    axis, index = e["layers"]["axis"], _trainable_layers(e)
    base = _key_data(x)
    if isinstance(base, np.ndarray):
        out = np.array(base)
        out[(slice(None),) * axis + (np.asarray(index),)] = np.asarray(got)
    else:
        out = jax.jit(_scatter_layers, static_argnums=(2, 3),
                      out_shardings=base.sharding)(base, got, axis, tuple(index))
    return _value_of(x, out) if _is_key(x) else out


def _scatter_layers(x: Any, got: Any, axis: int, index: tuple[int, ...]) -> Any:
    at = (slice(None),) * axis + (np.asarray(index),)
    return _on_bits(lambda a, b: a.at[at].set(b), x, got)


def save_trainable(
    directory: str | os.PathLike,
    params: Any,
    opt_state: Any = None,
    *,
    frozen: FrozenSpec,
    collections: Collections | None = None,
    collection_frozen: Mapping[str, FrozenSpec] | None = None,
    include_frozen: bool = False,
    frozen_source: str | None = None,
    fingerprint: bool = True,
    force: bool = False,
) -> dict:
    """Saves the trainable parameters, the optimizer state and collections, with a manifest.

    Whole frozen leaves are left out (``include_frozen=False``) and recorded by
    reference: ``frozen_source`` (e.g. the path of the pretrained checkpoint) and
    a fingerprint of their values go into the manifest. So are the frozen layers
    of a stack (a leaf of 2 or more dimensions frozen by whole slices along one
    axis: :func:`jfreeze.layers`, or whole columns of a kernel): only its
    trainable layers are written, and each frozen layer is fingerprinted;
    :func:`restore_trainable` takes the frozen layers from the ``params`` it is
    given. Other partially frozen leaves are saved whole. The optimizer state
    under :func:`jfreeze.freeze` already holds nothing for frozen leaves (nor,
    for a stack, for its frozen layers). ``collections`` are the other trees a
    training state carries (a linen model's ``batch_stats``, the step, EMA
    params), by name: each is saved like the params, its frozen leaves by
    reference, where frozen means ``collection_frozen[name]`` if given, else
    ``frozen`` applied to the collection's own paths (``jf.paths("backbone/**")``
    freezes the backbone's ``batch_stats`` too). One orbax checkpoint with the
    items ``manifest`` (JSON), ``params``, ``opt_state`` and ``collections``.
    To save a whole Flax ``TrainState``, see ``jf.flax.save_train_state``.

    Args:
      directory: where to write (a new directory; ``force=True`` overwrites).
      params: the parameter tree.
      opt_state: the optimizer state, or None.
      frozen: what is frozen (anything ``frozen=`` takes).
      collections: named trees to save beside the params, e.g.
        ``{"batch_stats": stats}``.
      collection_frozen: what is frozen in a collection, by its name, when it
        is not ``frozen`` on the collection's paths: ``{"batch_stats":
        jf.nothing}`` saves all statistics (a frozen backbone whose BatchNorm
        still updates them in train mode).
      include_frozen: also save the frozen leaves (and stacks whole, every layer).
      frozen_source: where the frozen weights come from, recorded as is.
      fingerprint: record a checksum of the frozen leaves' values.
      force: overwrite an existing checkpoint.

    Returns:
      The manifest written.

    >>> import tempfile, os, jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"backbone": jnp.ones(3), "head": jnp.zeros(2)}
    >>> stats = {"backbone": jnp.full(3, 0.5), "head": jnp.full(2, 0.25)}
    >>> tx = jf.freeze(optax.adam(1e-3), frozen=jf.paths("backbone"))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     d = os.path.join(tmp, "ckpt")
    ...     manifest = jf.save_trainable(d, params, tx.init(params), frozen=jf.paths("backbone"),
    ...                                  collections={"batch_stats": stats})
    ...     fresh = {"backbone": stats["backbone"], "head": jnp.zeros(2)}  # backbone: pretrained
    ...     restored, state, colls = jf.restore_trainable(
    ...         d, params, tx.init(params), frozen=jf.paths("backbone"),
    ...         collections={"batch_stats": fresh})
    >>> restored["head"], colls["batch_stats"]["head"]
    (Array([0., 0.], dtype=float32), Array([0.25, 0.25], dtype=float32))
    """
    ocp = _ocp()
    where = f"jf.save_trainable({str(directory)!r})"
    manifest = freeze_manifest(
        params, frozen=frozen, opt_state=opt_state, collections=collections,
        collection_frozen=collection_frozen, include_frozen=include_frozen,
        frozen_source=frozen_source, fingerprint=fingerprint,
    )
    _refuse_non_arrays(params, opt_state, collections or {}, where)
    if os.path.exists(directory) and not force:
        raise ValueError(f"{where}: {os.path.abspath(directory)!r} already exists; pass "
                         "force=True to overwrite it, or save to a new directory.")
    flat = Flat.of(params)
    items: dict[str, Any] = {"manifest": ocp.args.JsonSave(manifest)}
    pairs = zip(flat.leaves, manifest["params"], strict=True)
    saved = {f"p{i}": _saved_value(x, e) for i, (x, e) in enumerate(pairs) if e["saved"]}
    if saved:
        items["params"] = ocp.args.StandardSave(saved)
    if opt_state is not None:
        state = {f"s{i}": _key_data(x)
                 for i, (_, x) in enumerate(leaves_with_paths(opt_state)[0])}
        if state:
            items["opt_state"] = ocp.args.StandardSave(state)
    colls = {
        f"c{c}_{i}": _saved_value(x, e)
        for c, name in enumerate(manifest["collections"])
        for i, (x, e) in enumerate(zip(Flat.of(collections[name]).leaves,  # type: ignore[index]
                                       manifest["collections"][name], strict=True))
        if e["saved"]
    }
    if colls:
        items["collections"] = ocp.args.StandardSave(colls)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(os.path.abspath(directory), ocp.args.Composite(**items), force=force)
    return manifest


_SAVABLE = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


def _refuse_non_arrays(params: Any, opt_state: Any, collections: Collections,
                       where: str) -> None:
    """Orbax saves arrays and Python scalars: anything else (an Equinox module's activation
    function, a string) is a ``TypeError`` naming its paths, before anything is written."""
    trees = [("params", params), ("optimizer state", opt_state)]
    trees += [(f"collection {name!r}", tree) for name, tree in sorted(collections.items())]
    for what, tree in trees:
        bad = [f"{p!r} ({type(x).__name__})" for p, x in Flat.of(tree).entries
               if not isinstance(x, _SAVABLE)]
        if bad:
            shown = ", ".join(bad[:_SHOWN]) + (f" and {len(bad) - _SHOWN} more"
                                               if len(bad) > _SHOWN else "")
            raise TypeError(
                f"{where}: the {what} holds leaves that are not arrays, at {shown}; a "
                "checkpoint holds arrays and Python scalars. Save the arrays only (for an "
                "Equinox model, eqx.filter(model, eqx.is_array), and the same filter on the "
                "template when restoring); keep the rest in your code."
            )


def _value_of(template: Any, value: Any) -> Any:
    """A value read back, as the template's type (a Python scalar stays one, a typed
    PRNG key is wrapped again from its data)."""
    if _is_key(template):
        impl = (jax.random.key_impl(template) if isinstance(template, jax.Array)
                else template.dtype._impl)  # a ShapeDtypeStruct of keys (jax.eval_shape)
        return jax.random.wrap_key_data(value, impl=impl)
    return value if is_array(template) else type(template)(value.item())


@dataclasses.dataclass
class _Part:
    """One tree to restore: its leaves, the on-disk key of each saved path, and the
    manifest entry of each stack saved by its trainable layers."""

    item: str
    flat: Flat
    keys: dict[str, str]
    stacks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def wanted(self) -> dict[str, Any]:
        out = {}
        for p, x in self.flat.entries:
            if p in self.stacks:
                e = self.stacks[p]
                out[self.keys[p]] = _abstract_layers(x, e["layers"]["axis"],
                                                     len(_trainable_layers(e)))
            elif p in self.keys:
                out[self.keys[p]] = _abstract(x if is_array(x) else jnp.asarray(x))
        return out

    def value(self, p: str, x: Any, got: dict[str, Any]) -> Any:
        if p not in self.keys:
            return x
        read = got[self.item][self.keys[p]]
        return _put_layers(x, read, self.stacks[p]) if p in self.stacks else _value_of(x, read)

    def tree(self, got: dict[str, Any]) -> Any:
        return self.flat.unflatten([self.value(p, x, got) for p, x in self.flat.entries])


def _parts(manifest: dict, params: Any, opt_state: Any, collections: Collections | None,
           where: str) -> list[_Part]:
    """What to read (the on-disk keys p{i} / s{i} / c{c}_{i} are the positions of the
    manifest's entries: check_manifest made sure that the paths are the same and unique)."""
    saved_as = {e["path"]: f"p{i}" for i, e in enumerate(manifest["params"]) if e["saved"]}
    parts = [_Part("params", Flat.of(params), saved_as, _stacks(manifest["params"]))]
    _refuse_missing(parts[0], manifest, "", where)
    if opt_state is not None:
        state_as = {e["path"]: f"s{i}" for i, e in enumerate(manifest["opt_state"])}
        parts.append(_Part("opt_state", Flat.of(opt_state), state_as))
    for c, name in enumerate(manifest.get("collections", {})):
        if collections is None:
            break
        keys = {e["path"]: f"c{c}_{i}"
                for i, e in enumerate(manifest["collections"][name]) if e["saved"]}
        parts.append(_Part("collections", Flat.of(collections[name]), keys,
                           _stacks(manifest["collections"][name])))
        _refuse_missing(parts[-1], manifest, name, where)
    return parts


def _stacks(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["path"]: e for e in entries if "layers" in e}


def restore_trainable(
    directory: str | os.PathLike,
    params: Any,
    opt_state: Any = None,
    *,
    frozen: FrozenSpec,
    collections: Collections | None = None,
    collection_frozen: Mapping[str, FrozenSpec] | None = None,
    verify_frozen: bool = True,
) -> tuple[Any, ...]:
    """Restores a :func:`save_trainable` checkpoint into the current freeze.

    ``params`` gives the structure and holds the frozen leaves that were not
    saved (e.g. freshly loaded pretrained weights) and the stacks whose frozen
    layers were not (their trainable layers may hold anything: they are read
    into it, the result keeps that array's sharding; a frozen layer that
    differs from its fingerprint is a ``ValueError`` naming the path and the
    layer); the trainable and other partially
    frozen leaves may be ``jax.ShapeDtypeStruct`` (they are read, with the
    sharding given there; a shape without one, as ``jax.eval_shape`` outside
    ``jax.jit`` gives, is read onto the first device: give a sharded model's
    templates their shardings). ``opt_state`` is a template of the optimizer
    state (``tx.init(params)`` or ``jax.eval_shape`` of it). Leaves that are
    not arrays or Python scalars (an unfiltered Equinox model's functions, a
    string) cannot be saved: ``save_trainable`` refuses them, naming the path,
    before it writes; typed PRNG keys (``jax.random.key``) are saved as their
    data and come back as keys. ``collections`` are
    templates of the collections saved, by name, as ``params`` is (their frozen
    leaves given as arrays, the rest may be shapes); every collection in the
    checkpoint must be asked for, so none is dropped silently. Before anything
    is read, the manifest is checked against the current freeze
    (:func:`check_manifest`): a leaf frozen then and trainable now, another
    element mask, another optimizer state, a missing collection, other frozen
    weights or statistics, each is a ``ValueError`` naming the collection and
    the paths. Every leaf, of the params, the optimizer state and the
    collections, is read back by its path, never by its position: the same
    paths in another order (NamedTuple, dataclass or Equinox fields reordered)
    restore into the right leaves. A damaged manifest (truncated, edited, from
    a newer jfreeze) is a ``ValueError`` naming the checkpoint. Checkpoints
    written before collections existed (manifest version 1) or before stacks
    were saved by layers (version 2: such leaves were written whole) load as
    before. A run resumed this way continues bit for bit.

    Returns:
      ``(params, opt_state)``; ``opt_state`` is None if none was given. With
      ``collections=``, ``(params, opt_state, collections)``.
    """
    ocp = _ocp()
    path = os.path.abspath(directory)
    where = f"jf.restore_trainable({str(directory)!r})"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: no checkpoint at {path!r}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        manifest = _read_manifest(ocp, ckptr, path, where)
        try:
            check_manifest(manifest, params, frozen=frozen, opt_state=opt_state,
                           collections=collections, collection_frozen=collection_frozen,
                           verify_frozen=verify_frozen)
            if collections is None:
                _check_collections(manifest, {}, as_selector(frozen), None)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if opt_state is not None and manifest["opt_state"] is None:
            raise ValueError(f"{where}: the checkpoint holds no optimizer state")
        parts = _parts(manifest, params, opt_state, collections, where)
        target: dict[str, dict[str, Any]] = {}
        for part in parts:
            target.setdefault(part.item, {}).update(part.wanted())
        args = {k: ocp.args.StandardRestore(v) for k, v in target.items() if v}
        try:
            got = ckptr.restore(path, ocp.args.Composite(**args)) if args else {}
        except (KeyError, FileNotFoundError) as e:  # an item or an array file missing
            raise ValueError(
                f"{where}: the checkpoint is incomplete, its manifest lists saved leaves that "
                f"are not there ({e}); it was damaged or only partly copied."
            ) from None
    trees = [part.tree(got) for part in parts]
    out_params = trees.pop(0)
    out_state = trees.pop(0) if opt_state is not None else None
    if collections is None:
        return out_params, out_state
    names = list(manifest.get("collections", {}))
    return out_params, out_state, {name: trees[names.index(name)] for name in collections}


def _read_manifest(ocp: Any, ckptr: Any, path: str, where: str) -> Any:
    try:
        return ckptr.restore(path, ocp.args.Composite(manifest=ocp.args.JsonRestore())).manifest
    except (FileNotFoundError, KeyError):  # KeyError: orbax finds no 'manifest' item
        raise ValueError(f"{where}: not a jfreeze trainable-only checkpoint (it holds no "
                         "manifest)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: its manifest is not valid JSON ({e})") from None


def _refuse_missing(part: _Part, manifest: dict, collection: str, where: str) -> None:
    """Frozen leaves not saved, and stacks whose frozen layers were not, must be given
    as arrays in the template."""
    missing = [p for p, x in part.flat.entries
               if (p not in part.keys or p in part.stacks) and not _holds_values(x)]
    if not missing:
        return
    source = manifest.get("frozen_source")
    of = f" of the collection {collection!r}" if collection else ""
    given = f"collections={{{collection!r}: ...}}" if collection else "params"
    leaves = [p for p in missing if p not in part.stacks]
    stacks = [_named_layers(p, part.stacks[p], part.stacks[p]["layers"]["frozen"])
              for p in missing if p in part.stacks]
    what = [f"the frozen leaves{of} at {describe_paths(leaves)}"] if leaves else []
    what += [f"the frozen layers{of} at {', '.join(stacks[:_SHOWN])}"] if stacks else []
    raise ValueError(
        f"{where}: {' and '.join(what)} are not in the checkpoint"
        + (f" (saved by reference to {source!r})" if source else "")
        + f"; pass {given} that hold their values."
    )
