"""Bring your own zoo: labelled checkpoints of one architecture, and the function that runs them.

The layout ``--zoo DIR`` reads (and ``--save-zoo DIR`` writes)::

    DIR/labels.csv         header ``model,label[,more columns]``; one row per model
    DIR/<model>.npz        one model's parameters: a flat dict, key path -> array
    DIR/<model>/           ... or an orbax ``PyTreeCheckpointer`` directory instead

* ``model`` is the checkpoint's name without ``.npz``; ``label`` is 1 (a generaliser,
  the positive class) or 0. Every checkpoint needs a row and every row a checkpoint.
* Extra columns (say ``pos_encoding``, ``train_len``) are setup variables: the report
  scores every method within each of their groups, and says how well weight
  statistics read each one off the weights.
* A ``.npz`` key is the ``/``-joined key path of a leaf, as ``jf.path_str`` spells it
  (``layers/0/mlp/kernel``). The tree is rebuilt from the paths: nested dicts, and a
  level whose keys are exactly ``0 .. n-1`` becomes a list. An orbax checkpoint is
  flattened to the same paths, so both kinds mix in one zoo.
* All models must stack: the same key paths, shapes and dtypes (NumPy dtypes in an
  ``.npz``: bfloat16 needs orbax). Otherwise a ``ValueError`` names the model's file
  and the key path.

``--model package.module:function`` names the model's apply function (imported with
importlib; the working directory is on the import path). The probe calls it as::

    apply(params, x, mask) -> logit

``params`` is one model's tree; ``x`` is ``(L, V)`` float *soft tokens*: each row a
probability distribution over the ``V = --vocab`` token ids (a one-hot row is a real
token), with mass only on ids below ``--query-tokens``; ``mask`` is ``(L,)`` bool,
True at real positions (queries are ``--min-query-len`` to ``--query-len`` long). It
returns one float: the model's answer (a logit). It is ``vmap``-ed, ``jit``-ed and
differentiated with respect to ``x`` (never the weights), so it must be pure JAX and
embed tokens as ``x @ embedding`` (equal to ``embedding[ids]`` for one-hot rows).
"""

from __future__ import annotations

import csv
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

import jfreeze as jf

LABELS = "labels.csv"


def flat(tree) -> dict[str, np.ndarray]:
    """``{key path: array}`` in ``jf.path_str``'s spelling."""
    return {jf.path_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(arrays: dict[str, np.ndarray]):
    """Inverse of :func:`flat`: nested dicts, levels keyed ``0 .. n-1`` as lists."""
    root: dict = {}
    for path, x in arrays.items():
        *parents, last = path.split("/")
        node = root
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = x

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and sorted(node) == sorted(map(str, range(len(node)))):
            return [node[str(i)] for i in range(len(node))]
        return node

    return listify(root)


def save(directory: Path, params, labels, names: list[str], groups: dict | None = None) -> None:
    """Writes stacked ``params`` as one ``.npz`` per model, and ``labels.csv``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    groups = groups or {}
    for name, model in zip(names, jf.unstack(params), strict=True):
        np.savez(directory / f"{name}.npz", **flat(model))
    with open(directory / LABELS, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "label", *groups])
        for i, name in enumerate(names):
            w.writerow([name, int(labels[i]), *(groups[g][i] for g in groups)])


def _read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    import orbax.checkpoint as ocp  # only for zoos of orbax directories

    return flat(ocp.PyTreeCheckpointer().restore(path.resolve()))


def _read_labels(directory: Path):
    path = directory / LABELS
    if not path.exists():
        raise ValueError(f"{directory}: no {LABELS} (header 'model,label', one row per model)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or {"model", "label"} - set(rows[0]):
        raise ValueError(f"{path}: needs a header with columns 'model' and 'label'")
    seen: dict[str, dict] = {}
    for row in rows:
        name = row["model"].strip()
        if name in seen:
            raise ValueError(f"{path}: model {name!r} has two rows")
        if row["label"].strip() not in ("0", "1"):
            raise ValueError(f"{path}: model {name!r} has label {row['label']!r}, not 0 or 1")
        seen[name] = row
    return seen


def load(directory: Path):
    """Reads a zoo: ``(stacked params, labels, names, groups)``, in ``labels.csv``'s order.

    ``groups`` maps each extra column of ``labels.csv`` to one string per model.
    """
    directory = Path(directory)
    rows = _read_labels(directory)
    found = {p.stem: p for p in directory.glob("*.npz")}
    found.update({p.name: p for p in directory.iterdir() if p.is_dir()})
    unlabelled = sorted(set(found) - set(rows))
    if unlabelled:
        raise ValueError(f"{directory}: model {found[unlabelled[0]].name!r} has no row in "
                         f"{LABELS} ({len(unlabelled)} unlabelled: {unlabelled[:5]})")
    names = list(rows)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{directory / LABELS}: model {missing[0]!r} has no checkpoint "
                         f"({missing[0]}.npz or an orbax directory {missing[0]}/)")
    models = [_read_checkpoint(found[n]) for n in names]
    ref, ref_file = models[0], found[names[0]].name
    for name, model in zip(names[1:], models[1:], strict=True):
        file = found[name].name
        if gone := sorted(set(ref) - set(model)):
            raise ValueError(f"{file}: missing leaf {gone[0]!r} (in {ref_file})")
        if extra := sorted(set(model) - set(ref)):
            raise ValueError(f"{file}: extra leaf {extra[0]!r} (not in {ref_file})")
        for path, x in model.items():
            x0 = ref[path]
            if x.shape != x0.shape or x.dtype != x0.dtype:
                raise ValueError(f"{file}: leaf {path!r} is {x.dtype}{list(x.shape)}, "
                                 f"{ref_file} has {x0.dtype}{list(x0.shape)}; models must stack")
    params = unflatten({p: np.stack([m[p] for m in models]) for p in ref})
    labels = np.array([int(rows[n]["label"]) for n in names], np.int32)
    extra = [c for c in next(iter(rows.values())) if c not in ("model", "label")]
    groups = {c: np.array([rows[n][c] for n in names]) for c in extra}
    return params, labels, names, groups


def load_apply(spec: str) -> Callable:
    """``'package.module:function'`` -> the function (the working directory importable)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--model {spec!r}: expected 'package.module:function'")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--model {spec!r}: {module} has no function {name!r}")
    return fn


def describe(directory: Path, labels, names: list[str], groups: dict) -> str:
    n_gen = int(np.sum(labels))
    return (f"zoo: {len(names)} models read from {directory}; {n_gen} label 1 / "
            f"{len(names) - n_gen} label 0; setup columns: {list(groups) or 'none'}")
