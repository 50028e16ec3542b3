"""The headline example: its task, its cache, a --quick run, and 8-device sharding."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import sat_zoo as sz  # noqa: E402


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(EXAMPLES), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_task_labels_are_satisfiability():
    tokens, mask, label = sz.sample_batch(jax.random.key(0), 512, 12, 2, 12, 4)
    np.testing.assert_array_equal(sz.is_satisfiable(tokens, mask), np.asarray(label))
    assert 0.4 < float(np.mean(label)) < 0.6  # balanced classes at every length
    assert (np.asarray(tokens)[~np.asarray(mask)] == 8).all()  # PAD past the length


def test_zoo_cache_round_trip(tmp_path):
    cfg = sz.ZooConfig(models=3, d_model=8, n_heads=2, d_mlp=8, max_len=8, test_len=(6, 8))
    pos_kind = np.array([0, 1, 2])
    params = jax.vmap(lambda k, p: sz.init_model(k, cfg, p))(
        jax.random.split(jax.random.key(0), 3), pos_kind)
    zoo = {"params": jax.tree.map(np.asarray, params), "settings": sz.zoo_settings(cfg),
           "train_acc": np.ones(3), "test_acc": np.zeros(3), "train_seconds": 1.0}
    path = tmp_path / f"zoo-{cfg.key()}.npz"
    sz.save_zoo(path, zoo, cfg)
    loaded, cached = sz.load_or_train(cfg, tmp_path)  # found: nothing is trained
    assert cached
    jax.tree.map(np.testing.assert_array_equal, zoo["params"], loaded["params"])
    assert not np.asarray(loaded["params"]["pos"][0]).any()  # "none": an all-zero table
    # The key depends on the config.
    assert sz.ZooConfig(models=4).key() != sz.ZooConfig(models=3).key()


def test_quick_run(tmp_path):
    # --devices 2 without XLA_FLAGS: the example asks JAX for two CPU devices itself.
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "probe_population.py"), "--quick", "--devices", "2",
         "--cache-dir", str(tmp_path / "zoo"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compiled FLOPs per step" in out.stdout
    assert "weight stats" in out.stdout and "majority" in out.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["devices"] == 2
    # Frozen weight gradients are never computed: asking for them costs more.
    assert summary["flops"]["with_frozen_grads"] > 1.05 * summary["flops"]["probe_step"]
    assert set(summary["scores"]) == {"majority", "weight stats", "probe"}
    assert (tmp_path / "out" / "probe_population.png").stat().st_size > 10_000
    assert list((tmp_path / "zoo").glob("zoo-*.npz"))


SHARDED = textwrap.dedent("""
    import jax, numpy as np
    import probe_population as pp, sat_zoo as sz
    assert jax.device_count() == 8
    cfg = sz.ZooConfig(models=16, d_model=8, n_heads=2, d_mlp=8, n_layers=1, max_len=8)
    pc = pp.ProbeConfig(queries=4, query_len=8, min_query_len=4, d_noise=4, hidden=8,
                        steps=3, batch_models=8)
    params = jax.vmap(lambda k, p: sz.init_model(k, cfg, p))(
        jax.random.split(jax.random.key(0), 16), np.arange(16) % 3)
    labels = np.arange(16) % 2
    runs = [pp.train_probe(params, labels, cfg, pc, devices=d, verbose=False,
                           flops_check=False) for d in (1, 8)]
    for a, b in zip(jax.tree.leaves(runs[0]["probe"]), jax.tree.leaves(runs[1]["probe"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runs[0]["curves"]["loss"], runs[1]["curves"]["loss"], rtol=1e-5)
    hlo = runs[1]["hlo"]
    assert "all-reduce" in hlo and "all-gather" not in hlo, hlo.count("all-gather")
    print("sharded OK")
""")


def test_eight_devices_match_one():
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sharded OK" in out.stdout
