"""Trainable-only checkpoints with a freeze manifest, saved with orbax (an optional extra).

Orbax is imported inside the functions that use it, so ``import jfreeze`` does
not need it; install it with ``pip install "jfreeze[orbax]"``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfreeze._tree import Flat, describe_paths, is_array, leaves_with_paths
from jfreeze.selectors import FrozenSpec, as_selector

__all__ = ["check_manifest", "freeze_manifest", "restore_trainable", "save_trainable"]

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


def _mask_hash(mask: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr(tuple(mask.shape)).encode())
    h.update(np.packbits(mask.astype(bool), axis=None).tobytes())
    return h.hexdigest()[:16]


def _record(path: str, x: Any) -> dict[str, Any]:
    """A leaf's manifest entry: its path, shape and dtype (a type name for non-arrays)."""
    return {"path": path, "shape": list(getattr(x, "shape", ())),
            "dtype": str(np.dtype(x.dtype)) if is_array(x) else type(x).__name__}


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
    words = [_as_words(x, np) if isinstance(x, np.ndarray) else x for x in leaves]
    return [f"{int(a):08x}{int(b):08x}" for a, b in jax.device_get(_fingerprints(words))]


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
    on device over the leaf's bits, every dtype, not a cryptographic hash) so
    that a resumed run can check that it was handed the same frozen weights.
    The optimizer state is recorded by path too. Leaves are matched by path,
    so two leaves that share a path string (a dict key ``"a/b"`` and a nested
    ``a`` → ``b``) are a ``ValueError``. :func:`save_trainable` writes it;
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
    flat = Flat.of(params)
    _refuse_shared_paths(flat.paths, "params")
    leaves = []
    for (path, x), m in zip(flat.entries, sel.evaluate(flat), strict=True):
        entry = _record(path, x)
        if m is True:
            entry["status"] = "frozen"
        elif m is False:
            entry["status"] = "trainable"
        else:
            entry.update(status="partial", mask_sha256=_mask_hash(m), frozen_elements=int(m.sum()))
        entry["saved"] = bool(m is not True or include_frozen)  # JSON true/false, never 1
        leaves.append(entry)
    if fingerprint:
        frozen_at = [
            i for i, (e, (_, x)) in enumerate(zip(leaves, flat.entries, strict=True))
            if e["status"] == "frozen" and isinstance(x, jax.Array | np.ndarray)
        ]
        prints = _fingerprint_all([flat.entries[i][1] for i in frozen_at])
        for i, fp in zip(frozen_at, prints, strict=True):
            leaves[i]["fingerprint"] = fp
    state = None
    if opt_state is not None:
        state = _state_entries(opt_state)
        _refuse_shared_paths([e["path"] for e in state], "optimizer state")
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
    return None


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
    now = freeze_manifest(params, frozen=frozen, fingerprint=False)
    was = {e["path"]: e for e in manifest["params"]}
    problems = _freeze_differences(was, {e["path"]: e for e in now["params"]})
    if problems:
        raise ValueError(
            "the checkpoint was saved under a different freeze (saved with frozen="
            f"{manifest['selector']}, now frozen={now['selector']}):\n" + _list(problems)
        )
    if opt_state is not None and manifest.get("opt_state") is not None:
        _check_state(manifest["opt_state"], _state_entries(opt_state))
    if verify_frozen:
        moved = _moved_frozen(was, params)
        if moved:
            source = manifest.get("frozen_source")
            raise ValueError(
                f"the frozen leaves at {describe_paths(moved)} differ from those the checkpoint "
                "was trained with"
                + (f" (saved by reference to {source!r})" if source else "")
                + ": load the same frozen weights, or pass verify_frozen=False."
            )


def _freeze_differences(was: dict[str, dict], cur: dict[str, dict]) -> list[str]:
    """Per path: leaves only in one, or saved with another shape, dtype, status or mask."""
    problems = [f"{p!r}: in the checkpoint, not in the params" for p in was if p not in cur]
    problems += [f"{p!r}: in the params, not in the checkpoint" for p in cur if p not in was]
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


def _moved_frozen(was: dict[str, dict], params: Any) -> list[str]:
    """Paths of frozen leaves, not saved, whose fingerprint differs from the manifest's."""
    check = [
        (p, x) for p, x in Flat.of(params).entries
        if "fingerprint" in was.get(p, {}) and not was[p]["saved"]
        and isinstance(x, jax.Array | np.ndarray)
    ]
    prints = _fingerprint_all([x for _, x in check])
    return [p for (p, _), fp in zip(check, prints, strict=True) if fp != was[p]["fingerprint"]]


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
    flat = Flat.of(params)
    items: dict[str, Any] = {"manifest": ocp.args.JsonSave(manifest)}
    pairs = zip(flat.leaves, manifest["params"], strict=True)
    saved = {f"p{i}": x for i, (x, e) in enumerate(pairs) if e["saved"]}
    if saved:
        items["params"] = ocp.args.StandardSave(saved)
    if opt_state is not None:
        state = {f"s{i}": x for i, (_, x) in enumerate(leaves_with_paths(opt_state)[0])}
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
    paths. Every leaf, of the params and of the optimizer state, is read back
    by its path, never by its position: the same paths in another order
    (NamedTuple, dataclass or Equinox fields reordered) restore into the right
    leaves. A damaged manifest (truncated, edited, from a newer jfreeze) is a
    ``ValueError`` naming the checkpoint. A run resumed this way continues bit
    for bit.

    Returns:
      ``(params, opt_state)``; ``opt_state`` is None if none was given.
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
                           verify_frozen=verify_frozen)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if opt_state is not None and manifest["opt_state"] is None:
            raise ValueError(f"{where}: the checkpoint holds no optimizer state")
        # Everything is matched by path (check_manifest made sure that the paths
        # are the same and unique); the on-disk keys p{i} / s{i} are the
        # positions of the manifest's entries.
        saved_as = {e["path"]: f"p{i}" for i, e in enumerate(manifest["params"]) if e["saved"]}
        flat = Flat.of(params)
        _refuse_missing(flat, saved_as, manifest, where)
        target: dict[str, Any] = {}
        wanted = {saved_as[p]: _abstract(x) for p, x in flat.entries if p in saved_as}
        if wanted:
            target["params"] = ocp.args.StandardRestore(wanted)
        state_flat, state_def = [], None
        if opt_state is not None:
            state_flat, state_def = leaves_with_paths(opt_state)
            state_as = {e["path"]: f"s{i}" for i, e in enumerate(manifest["opt_state"])}
            if state_flat:
                target["opt_state"] = ocp.args.StandardRestore(
                    {state_as[p]: _abstract(x if is_array(x) else jnp.asarray(x))
                     for p, x in state_flat}
                )
        got = ckptr.restore(path, ocp.args.Composite(**target)) if target else {}
    params = flat.unflatten(
        [got["params"][saved_as[p]] if p in saved_as else x for p, x in flat.entries]
    )
    if opt_state is None:
        return params, None
    new_state = []
    for p, x in state_flat:
        value = got["opt_state"][state_as[p]]
        new_state.append(value if is_array(x) else type(x)(value.item()))
    return params, jax.tree_util.tree_unflatten(state_def, new_state)


def _read_manifest(ocp: Any, ckptr: Any, path: str, where: str) -> Any:
    try:
        return ckptr.restore(path, ocp.args.Composite(manifest=ocp.args.JsonRestore())).manifest
    except FileNotFoundError:
        raise ValueError(f"{where}: not a jfreeze trainable-only checkpoint (it holds no "
                         "manifest)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: its manifest is not valid JSON ({e})") from None


def _refuse_missing(flat: Flat, saved_as: dict[str, str], manifest: dict, where: str) -> None:
    """Frozen leaves not saved must be given as arrays in ``params``."""
    missing = [p for p, x in flat.entries
               if p not in saved_as and not isinstance(x, jax.Array | np.ndarray)]
    if missing:
        source = manifest.get("frozen_source")
        raise ValueError(
            f"{where}: the frozen leaves at {describe_paths(missing)} are not in the "
            "checkpoint"
            + (f" (saved by reference to {source!r})" if source else "")
            + "; pass params that hold their values."
        )
