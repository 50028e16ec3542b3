"""Bring your own zoo (examples/probe/user_zoo.py): the layout, its errors, and the example
reading back a zoo it wrote."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from probe import transformer, user_zoo, zoo  # noqa: E402

CFG = zoo.ZooConfig(models=4, d_model=8, n_heads=2, d_mlp=8, n_layers=2, max_len=8)


def _stacked(n=4):
    return jax.tree.map(np.asarray, jax.vmap(lambda k, p: transformer.init_model(k, CFG, p))(
        jax.random.split(jax.random.key(0), n), np.arange(n) % 3))


def _bits(x):
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}") if x.dtype.kind == "f" else x


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(_bits(x), _bits(y))


def _write(tmp_path, n=4):
    params, names = _stacked(n), [f"m{i}" for i in range(n)]
    groups = {"pos": np.array(["none", "sin", "learned", "none"][:n])}
    user_zoo.save(tmp_path, params, np.arange(n) % 2, names, groups)
    return params, names


def test_round_trip_keeps_every_bit_and_the_tree(tmp_path):
    params, names = _write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{n}.npz" for n in names] + ["labels.csv"])
    keys = np.load(tmp_path / "m0.npz").files
    assert "layers/1/mlp_in/kernel" in keys and "pos" in keys  # jf.path_str's spelling
    loaded, labels, got_names, groups = user_zoo.load(tmp_path)
    _same(params, loaded)  # "layers" is a list again
    assert isinstance(loaded["layers"], list)
    assert got_names == names and labels.tolist() == [0, 1, 0, 1]
    assert groups["pos"].tolist() == ["none", "sin", "learned", "none"]


def test_orbax_checkpoints_mix_with_npz(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params, _ = _write(tmp_path)
    (tmp_path / "m2.npz").unlink()
    ocp.PyTreeCheckpointer().save((tmp_path / "m2").resolve(), jax.tree.map(
        lambda x: np.asarray(x[2]), params))  # a 0-d array: orbax keeps its dtype
    loaded, *_ = user_zoo.load(tmp_path)
    _same(params, loaded)


def _rewrite(tmp_path, name, change):
    arrays = dict(np.load(tmp_path / f"{name}.npz"))
    change(arrays)
    np.savez(tmp_path / f"{name}.npz", **arrays)


@pytest.mark.parametrize("change, words", [
    (lambda a: a.update(pos=np.zeros((9, 8), np.float32)), ["m2.npz", "'pos'", "[9, 8]"]),
    (lambda a: a.pop("layers/1/ln2/bias"), ["m2.npz", "missing", "'layers/1/ln2/bias'"]),
    (lambda a: a.update({"layers/2/out": np.zeros(3)}), ["m2.npz", "extra", "'layers/2/out'"]),
    (lambda a: a.update(embed=a["embed"].astype(np.float64)), ["m2.npz", "'embed'", "float64"]),
])
def test_models_that_do_not_stack_are_refused_by_file_and_path(tmp_path, change, words):
    _write(tmp_path)
    _rewrite(tmp_path, "m2", change)
    with pytest.raises(ValueError) as e:
        user_zoo.load(tmp_path)
    assert all(w in str(e.value) for w in words), str(e.value)


def _labels(tmp_path, rows):
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["model", "label"], *rows])


@pytest.mark.parametrize("rows, words", [
    ([["m0", 0], ["m1", 1], ["m2", 0]], ["'m3.npz'", "no row"]),  # a model without a label
    ([["m0", 0], ["m1", 1], ["m2", 0], ["m3", 1], ["m9", 0]], ["'m9'", "no checkpoint"]),
    ([["m0", 0], ["m1", 1], ["m2", 2], ["m3", 1]], ["'m2'", "not 0 or 1"]),
    ([["m0", 0], ["m1", 1], ["m2", 0], ["m3", 1], ["m1", 0]], ["'m1'", "two rows"]),
])
def test_labels_csv_must_match_the_checkpoints(tmp_path, rows, words):
    _write(tmp_path)
    _labels(tmp_path, rows)
    with pytest.raises(ValueError) as e:
        user_zoo.load(tmp_path)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_load_apply_names_module_and_function():
    assert user_zoo.load_apply("probe.transformer:apply") is transformer.apply
    for bad in ("probe.transformer", "probe.transformer:nope"):
        with pytest.raises(ValueError, match="--model"):
            user_zoo.load_apply(bad)


def _run(*args, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(EXAMPLES), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(EXAMPLES / "probe_population.py"), "--quick",
                          "--stack-folds", "0", *map(str, args)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("all claims checked")
    return out.stdout


def test_the_example_reads_back_the_zoo_it_wrote(tmp_path):
    saved, cache = tmp_path / "saved", tmp_path / "zoo"
    _run("--cache-dir", cache, "--out", tmp_path / "own", "--save-zoo", saved)
    # The same stacked params as the example's labelled zoo, bit for bit.
    cfg = zoo.ZooConfig(models=24, steps=80, n_layers=1, eval_batch=128)
    own, labels, kept, _ = zoo.labelled(zoo.load_zoo(zoo.cache_path(cfg, cache), cfg), 0.0)
    params, got, names, groups = user_zoo.load(saved)
    _same(own, params)
    assert got.tolist() == labels.tolist() and len(names) == kept.sum()
    assert set(groups) == {"pos_kind", "train_len", "lr", "wd"}
    # ... and the example, given that zoo and its own apply, scores it as it scored its own.
    stdout = _run("--zoo", saved, "--model", "probe.transformer:apply", "--vocab", 11,
                  "--query-tokens", 10, "--out", tmp_path / "theirs")
    assert f"zoo: {len(names)} models read from {saved}" in stdout
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("own", "theirs"))
    for method, sc in a["scores"].items():
        for m, v in sc.items():
            assert b["scores"][method][m] == pytest.approx(v, abs=1e-6), (method, m)
    assert a["within_groups"].keys() == b["within_groups"].keys()
