"""Trainable-only checkpoints with a freeze manifest, saved with orbax (an optional extra).

Orbax is imported inside the functions that use it, so ``import jfreeze`` does
not need it; install it with ``pip install "jfreeze[orbax]"``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfreeze.paths import describe_paths, path_str
from jfreeze.selectors import FrozenSpec, _Flat, as_selector

__all__ = ["freeze_manifest", "check_manifest", "save_trainable", "restore_trainable"]

FORMAT = "jfreeze.trainable_checkpoint"
VERSION = 1
_SHOWN = 8  # mismatches listed in an error


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "jfreeze checkpoints need orbax: pip install 'jfreeze[orbax]' (orbax-checkpoint)"
        ) from e
    return ocp


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _mask_hash(mask: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr(tuple(mask.shape)).encode())
    h.update(np.packbits(mask.astype(bool), axis=None).tobytes())
    return h.hexdigest()[:16]


def _leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@jax.jit
def _fingerprints(leaves: list) -> list:
    """A 64-bit position-weighted checksum of each leaf's bits, computed on device."""
    out = []
    for x in leaves:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        elif width is None:  # 8-byte dtypes (with jax_enable_x64): two words per element
            bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        else:
            bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
        bits = bits.ravel()
        idx = jax.lax.iota(jnp.uint32, bits.size)
        a = jnp.sum(bits * (idx * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)))
        b = jnp.sum((bits + idx) * jnp.uint32(0x85EBCA6B) ^ (bits >> 7))
        out.append(jnp.stack([a, b]))
    return out


def _fingerprint_all(leaves: Sequence[Any]) -> list[str]:
    if not leaves:
        return []
    return [f"{int(a):08x}{int(b):08x}" for a, b in jax.device_get(_fingerprints(list(leaves)))]


def freeze_manifest(
    params: Any,
    *,
    frozen: FrozenSpec,
    opt_state: Any = None,
    include_frozen: bool = False,
    frozen_source: str | None = None,
    fingerprint: bool = True,
) -> dict:
    """A JSON-able record of what is frozen in ``params``, and of the optimizer state.

    For each leaf: its path, shape, dtype and status (``"frozen"``,
    ``"trainable"`` or ``"partial"`` with the hash of its element mask), and,
    for frozen leaves, a fingerprint of their values (a 64-bit checksum computed
    on device, not a cryptographic hash) so that a resumed run can check that it
    was handed the same frozen weights. :func:`save_trainable` writes it;
    :func:`check_manifest` compares it with a current freeze. Use the two
    directly to add the manifest to your own ``orbax`` ``CheckpointManager``
    items (``ocp.args.JsonSave(manifest)``).

    >>> import jax.numpy as jnp
    >>> import jfreeze as jf
    >>> m = jf.freeze_manifest({"a": jnp.ones(2), "b": jnp.ones(3)}, frozen=jf.paths("a"))
    >>> [(leaf["path"], leaf["status"]) for leaf in m["params"]]
    [('a', 'frozen'), ('b', 'trainable')]
    >>> m["selector"]
    "paths('a')"
    """
    sel = as_selector(frozen)
    flat, masks = sel.masks(params)
    leaves = []
    for (path, x), m in zip(flat.entries, masks):
        entry: dict[str, Any] = {
            "path": path,
            "shape": list(getattr(x, "shape", ())),
            "dtype": str(np.dtype(x.dtype)) if _is_array(x) else type(x).__name__,
        }
        if m is True:
            entry["status"] = "frozen"
        elif m is False:
            entry["status"] = "trainable"
        else:
            entry.update(status="partial", mask_sha256=_mask_hash(m), frozen_elements=int(m.sum()))
        entry["saved"] = m is not True or include_frozen
        leaves.append(entry)
    if fingerprint:
        frozen_at = [
            i for i, (e, (_, x)) in enumerate(zip(leaves, flat.entries))
            if e["status"] == "frozen" and isinstance(x, jax.Array | np.ndarray)
        ]
        for i, fp in zip(frozen_at, _fingerprint_all([flat.entries[i][1] for i in frozen_at])):
            leaves[i]["fingerprint"] = fp
    state = None
    if opt_state is not None:
        state = [
            {"path": p, "shape": list(getattr(x, "shape", ())),
             "dtype": str(np.dtype(x.dtype)) if _is_array(x) else type(x).__name__}
            for p, x in _leaf_paths(opt_state)
        ]
    import jfreeze

    return {
        "format": FORMAT,
        "version": VERSION,
        "selector": repr(sel),
        "include_frozen": bool(include_frozen),
        "frozen_source": frozen_source,
        "params": leaves,
        "opt_state": state,
        "versions": {"jfreeze": jfreeze.__version__, "jax": jax.__version__},
    }


def _list(problems: list[str]) -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:_SHOWN])
    more = len(problems) - _SHOWN
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def check_manifest(
    manifest: dict,
    params: Any,
    *,
    frozen: FrozenSpec,
    opt_state: Any = None,
    verify_frozen: bool = True,
) -> None:
    """Raises ``ValueError`` naming every path where ``manifest`` and the current freeze differ.

    Checked: the same leaf paths, shapes and dtypes; each leaf frozen,
    trainable or partially frozen as it was, with the same element mask; the
    optimizer state's paths, shapes and dtypes (if both are given); and, with
    ``verify_frozen``, the values of frozen leaves that were not saved (their
    fingerprint), since the resumed run will use the ones in ``params``.

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
    if manifest.get("format") != FORMAT:
        raise ValueError(f"not a jfreeze trainable-only checkpoint manifest: {manifest!r:.200}")
    if manifest.get("version", 0) > VERSION:
        raise ValueError(
            f"the manifest has version {manifest['version']}; this jfreeze reads up to {VERSION}"
        )
    now = freeze_manifest(params, frozen=frozen, fingerprint=False)
    was = {e["path"]: e for e in manifest["params"]}
    cur = {e["path"]: e for e in now["params"]}
    problems = []
    for p in was:
        if p not in cur:
            problems.append(f"{p!r}: in the checkpoint, not in the params")
    for p in cur:
        if p not in was:
            problems.append(f"{p!r}: in the params, not in the checkpoint")
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
    if problems:
        raise ValueError(
            "the checkpoint was saved under a different freeze (saved with frozen="
            f"{manifest['selector']}, now frozen={now['selector']}):\n" + _list(problems)
        )
    if opt_state is not None and manifest.get("opt_state") is not None:
        saved_state = manifest["opt_state"]
        cur_state = [
            {"path": p, "shape": list(getattr(x, "shape", ())),
             "dtype": str(np.dtype(x.dtype)) if _is_array(x) else type(x).__name__}
            for p, x in _leaf_paths(opt_state)
        ]
        if saved_state != cur_state:
            was_s = {e["path"]: f"{e['dtype']}{e['shape']}" for e in saved_state}
            now_s = {e["path"]: f"{e['dtype']}{e['shape']}" for e in cur_state}
            diff = [f"{p!r}: in the saved state only ({t})" for p, t in was_s.items()
                    if p not in now_s]
            diff += [f"{p!r}: in the current state only ({t})" for p, t in now_s.items()
                     if p not in was_s]
            diff += [f"{p!r}: saved {t}, now {now_s[p]}" for p, t in was_s.items()
                     if p in now_s and now_s[p] != t]
            raise ValueError(
                f"the optimizer state does not match the one saved ({len(saved_state)} leaves "
                f"saved, {len(cur_state)} now): another optimizer, or another freeze inside "
                "it:\n" + _list(diff or ["the leaves are the same but in another order"])
            )
    if verify_frozen:
        flat = _Flat.of(params)
        moved = []
        check = [
            (p, x) for p, x in flat.entries
            if "fingerprint" in was.get(p, {}) and not was[p]["saved"]
            and isinstance(x, jax.Array | np.ndarray)
        ]
        for (p, _), fp in zip(check, _fingerprint_all([x for _, x in check])):
            if fp != was[p]["fingerprint"]:
                moved.append(p)
        if moved:
            source = manifest.get("frozen_source")
            raise ValueError(
                f"the frozen leaves at {describe_paths(moved)} differ from those the checkpoint "
                "was trained with"
                + (f" (saved by reference to {source!r})" if source else "")
                + ": load the same frozen weights, or pass verify_frozen=False."
            )


def _abstract(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def save_trainable(
    directory: str | os.PathLike,
    params: Any,
    opt_state: Any = None,
    *,
    frozen: FrozenSpec,
    include_frozen: bool = False,
    frozen_source: str | None = None,
    fingerprint: bool = True,
    force: bool = False,
) -> dict:
    """Saves the trainable parameters and the optimizer state, with a freeze manifest.

    Whole frozen leaves are left out (``include_frozen=False``) and recorded by
    reference: ``frozen_source`` (e.g. the path of the pretrained checkpoint) and
    a fingerprint of their values go into the manifest. Partially frozen leaves
    are saved whole. The optimizer state under :func:`jfreeze.freeze` already
    holds nothing for frozen leaves. One orbax checkpoint with the items
    ``manifest`` (JSON), ``params`` and ``opt_state``.

    Args:
      directory: where to write (a new directory; ``force=True`` overwrites).
      params: the parameter tree.
      opt_state: the optimizer state, or None.
      frozen: what is frozen (anything ``frozen=`` takes).
      include_frozen: also save the frozen leaves.
      frozen_source: where the frozen weights come from, recorded as is.
      fingerprint: record a checksum of the frozen leaves' values.
      force: overwrite an existing checkpoint.

    Returns:
      The manifest written.

    >>> import tempfile, os, jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"backbone": jnp.ones(3), "head": jnp.zeros(2)}
    >>> tx = jf.freeze(optax.adam(1e-3), frozen=jf.paths("backbone"))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     d = os.path.join(tmp, "ckpt")
    ...     manifest = jf.save_trainable(d, params, tx.init(params), frozen=jf.paths("backbone"))
    ...     restored, state = jf.restore_trainable(d, params, tx.init(params),
    ...                                            frozen=jf.paths("backbone"))
    >>> restored["head"]
    Array([0., 0.], dtype=float32)
    """
    ocp = _ocp()
    manifest = freeze_manifest(
        params, frozen=frozen, opt_state=opt_state, include_frozen=include_frozen,
        frozen_source=frozen_source, fingerprint=fingerprint,
    )
    flat = _Flat.of(params)
    items = {"manifest": ocp.args.JsonSave(manifest)}
    saved = {f"p{i}": x for i, ((_, x), e) in enumerate(zip(flat.entries, manifest["params"]))
             if e["saved"]}
    if saved:
        items["params"] = ocp.args.StandardSave(saved)
    if opt_state is not None:
        state = {f"s{i}": x for i, (_, x) in enumerate(_leaf_paths(opt_state))}
        if state:
            items["opt_state"] = ocp.args.StandardSave(state)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(os.path.abspath(directory), ocp.args.Composite(**items), force=force)
    return manifest


def restore_trainable(
    directory: str | os.PathLike,
    params: Any,
    opt_state: Any = None,
    *,
    frozen: FrozenSpec,
    verify_frozen: bool = True,
) -> tuple[Any, Any]:
    """Restores a :func:`save_trainable` checkpoint into the current freeze.

    ``params`` gives the structure and holds the frozen leaves that were not
    saved (e.g. freshly loaded pretrained weights); the trainable and partially
    frozen leaves may be ``jax.ShapeDtypeStruct`` (they are read, with the
    sharding given there). ``opt_state`` is a template of the optimizer state
    (``tx.init(params)`` or ``jax.eval_shape`` of it). Before anything is read,
    the manifest is checked against the current freeze (:func:`check_manifest`):
    a leaf frozen then and trainable now, another element mask, another
    optimizer state, other frozen weights, each is a ``ValueError`` naming the
    paths. A run resumed this way continues bit for bit.

    Returns:
      ``(params, opt_state)``; ``opt_state`` is None if none was given.
    """
    ocp = _ocp()
    path = os.path.abspath(directory)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        manifest = ckptr.restore(path, ocp.args.Composite(manifest=ocp.args.JsonRestore())).manifest
        try:
            check_manifest(manifest, params, frozen=frozen, opt_state=opt_state,
                           verify_frozen=verify_frozen)
        except ValueError as e:
            raise ValueError(f"jf.restore_trainable({str(directory)!r}): {e}") from None
        if opt_state is not None and manifest["opt_state"] is None:
            raise ValueError(f"the checkpoint at {path!r} holds no optimizer state")
        flat = _Flat.of(params)
        entries = manifest["params"]
        missing = [
            p for (p, x), e in zip(flat.entries, entries)
            if not e["saved"] and not isinstance(x, jax.Array | np.ndarray)
        ]
        if missing:
            source = manifest.get("frozen_source")
            raise ValueError(
                f"the frozen leaves at {describe_paths(missing)} are not in the checkpoint"
                + (f" (saved by reference to {source!r})" if source else "")
                + "; pass params that hold their values."
            )
        target: dict[str, Any] = {}
        wanted = {f"p{i}": _abstract(x) for i, ((_, x), e) in enumerate(zip(flat.entries, entries))
                  if e["saved"]}
        if wanted:
            target["params"] = ocp.args.StandardRestore(wanted)
        state_leaves, state_def = [], None
        if opt_state is not None:
            state_leaves, state_def = jax.tree_util.tree_flatten(opt_state)
            if state_leaves:
                target["opt_state"] = ocp.args.StandardRestore(
                    {f"s{i}": _abstract(x if _is_array(x) else jnp.asarray(x))
                     for i, x in enumerate(state_leaves)}
                )
        got = ckptr.restore(path, ocp.args.Composite(**target)) if target else {}
    new_params = [
        got["params"][f"p{i}"] if e["saved"] else x
        for i, ((_, x), e) in enumerate(zip(flat.entries, entries))
    ]
    params = flat.unflatten(new_params)
    if opt_state is None:
        return params, None
    new_state = [
        got["opt_state"][f"s{i}"] if _is_array(x) else type(x)(got["opt_state"][f"s{i}"].item())
        for i, x in enumerate(state_leaves)
    ]
    return params, jax.tree_util.tree_unflatten(state_def, new_state)
