"""The README's opening example runs and prints what the README shows."""

import contextlib
import io
import pathlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import property_settings

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_opening_example_runs_and_matches_printed_table():
    code = _blocks("python")[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    shown = _blocks("text")[0].strip()
    assert out.getvalue().strip() == shown


def test_flax_snippet_runs():
    code = next(b for b in _blocks("python") if "class Classifier" in b)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    import jax

    import jfreeze as jf

    flat = jax.tree_util.tree_flatten_with_path(scope["optimizer"].opt_state)[0]
    paths = [jf.path_str(p) for p, _ in flat]
    assert any("head" in p for p in paths)
    assert not any("backbone" in p for p in paths)  # optimizer state for the head only


def test_ci_runs_the_two_commands_as_written():
    # Each README command starts with its own install step, names an extra that exists, and
    # stands word for word in .ci/run (which runs it from a fresh virtual environment).
    import tomllib

    root = README.parent
    section = README.read_text().split("## Two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block is not None
    commands = [line.split("  #", 1)[0].strip()
                for line in block.group(1).splitlines() if line.strip()]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    ci_lines = (root / ".ci" / "run").read_text().splitlines()
    assert len(commands) == 2
    for cmd in commands:
        install, _, run = cmd.partition(" && ")
        extra = re.fullmatch(r'pip install -e "\.\[(\w+)\]"', install)
        assert extra and extra.group(1) in project["optional-dependencies"], cmd
        assert run in ("python examples/probe_population.py", "pytest"), cmd
        assert any(line.startswith(cmd) for line in ci_lines), f".ci/run does not run {cmd!r}"


def test_population_snippet_runs_on_a_device_per_core():
    # A fresh process: the snippet asks for one CPU device per core before JAX starts.
    import subprocess
    import sys

    code = next(b for b in _blocks("python") if "jf.vmap_models(apply" in b)
    check = """
import jfreeze as jf
assert jax.device_count() == len(os.sched_getaffinity(0)) >= 1
assert zoo["w1"].sharding.spec == jax.sharding.PartitionSpec("models")
jf.assert_frozen(jf.stack(models), jax.device_get(zoo), frozen=jf.everything)
print("LOSS", float(value))
"""
    out = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("LOSS")[1]) < 0.69  # below chance (log 2) after 20 steps


def test_layer_norm_recipe_matches_autodiff():
    import jax
    import jax.numpy as jnp
    import numpy as np

    scope: dict = {}
    exec(compile(next(b for b in _blocks("python") if "def _ln_bwd" in b), "README.md", "exec"),
         scope)

    def plain(x, scale, bias, eps=1e-5):
        xc = x - x.mean(-1, keepdims=True)
        return xc / jnp.sqrt((xc * xc).mean(-1, keepdims=True) + eps) * scale + bias

    rng = np.random.default_rng(0)
    x, s, b, w = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                  for shape in [(3, 5, 8), (8,), (8,), (3, 5, 8)])
    for ln in (scope["layer_norm"], jax.jit(scope["layer_norm"])):
        np.testing.assert_allclose(ln(x, s, b), plain(x, s, b), rtol=1e-5, atol=1e-5)
        got = jax.grad(lambda *a, ln=ln: (ln(*a) * w).sum(), argnums=(0, 1, 2))(x, s, b)
        want = jax.grad(lambda *a: (plain(*a) * w).sum(), argnums=(0, 1, 2))(x, s, b)
        for g, h in zip(got, want, strict=True):
            np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def _frozen_matmul():
    scope: dict = {}
    exec(compile(next(b for b in _blocks("python") if "def _fm_bwd" in b), "README.md", "exec"),
         scope)
    return scope["frozen_matmul"]


DTYPES = ["float32", "bfloat16", "float16", "complex64"]


@pytest.mark.filterwarnings("error:Casting from complex to real")  # jax will raise there
@property_settings(30, shrink=False)
@given(lead=st.lists(st.integers(1, 3), max_size=2), n_in=st.integers(1, 5),
       n_out=st.integers(1, 5), x_dtype=st.sampled_from(DTYPES),
       w_dtype=st.sampled_from(DTYPES), jit=st.booleans(), seed=st.integers(0, 2**16))
def test_frozen_matmul_recipe_matches_autodiff(lead, n_in, n_out, x_dtype, w_dtype, jit, seed):
    """Values, both gradients (each in its input's dtype) and no gradient for the stored copy,
    for any leading dims (none: a vector), any real/complex/low-precision dtype pair."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    mm = jax.jit(_frozen_matmul()) if jit else _frozen_matmul()
    rng = np.random.default_rng(seed)

    def draw(shape, dtype):
        z = rng.normal(size=shape) + (1j * rng.normal(size=shape) if "complex" in dtype else 0)
        return jnp.asarray(z).astype(dtype)

    x, w = draw((*lead, n_in), x_dtype), draw((n_in, n_out), w_dtype)
    w_t = jnp.swapaxes(w, -1, -2)
    c = draw((*lead, n_out), "complex64")
    low = {"bfloat16", "float16"} & {x_dtype, w_dtype}
    tol = 3e-2 if low else 1e-5

    def close(a, b):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a.astype(jnp.complex64)),
                                   np.asarray(b.astype(jnp.complex64)), rtol=tol, atol=tol)

    close(mm(x, w, w_t), x @ w)
    got = jax.grad(lambda x, w: (mm(x, w, w_t) * c).sum().real, argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: ((x @ w) * c).sum().real, argnums=(0, 1))(x, w)
    for g, h in zip(got, want, strict=True):
        close(g, h)
    # The stored copy is not a second weight: no gradient reaches it.
    g_t = jax.grad(lambda w_t: (mm(x, w, w_t) * c).sum().real)(w_t)
    assert not np.any(np.asarray(g_t))
