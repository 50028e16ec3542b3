"""Property tests of jf.save_trainable / jf.restore_trainable / jf.check_manifest.

The classes of bug they cover: leaves restored by position instead of path
(records whose fields are declared in another order when restoring; params,
optimizer state and collections alike), frozen
leaves fingerprinted by value instead of bits (every dtype, odd bit patterns),
and damaged manifests reaching the user as raw ``KeyError``/``TypeError``/
``JSONDecodeError`` instead of a ``ValueError`` naming the checkpoint.
"""

import collections
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from strategies import bits, property_settings

import jfreeze as jf

pytest.importorskip("orbax.checkpoint")

# --------------------------------------------------------------------------
# Leaves of every dtype, with odd bit patterns.

# Bit patterns the promise "every bit" is about: -0.0, subnormals, signalling
# and payload-carrying NaNs, infinities (for the floats); all ones, sign bit.
SPECIAL = {
    16: [0x8000, 0x0001, 0x03FF, 0x7C01, 0x7E01, 0x7F81, 0x7FC1, 0xFFFF],
    32: [0x80000000, 0x00000001, 0x007FFFFF, 0x7F800001, 0xFFC12345, 0x7F800000, 0xFFFFFFFF],
    8: [0x80, 0x01, 0x7F, 0xFF],
}
DTYPES = [np.float32, jnp.bfloat16, np.float16, np.complex64, np.int32, np.int8, np.uint8,
          np.bool_, ml_dtypes.float8_e4m3fn]
SHAPES = [(), (2,), (2, 3)]


@st.composite
def arrays(draw, dtype=None):
    """A NumPy array of a random dtype whose elements are drawn bit pattern by bit pattern."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)) if dtype is None else dtype)
    shape = draw(st.sampled_from(SHAPES))
    size = int(np.prod(shape, dtype=int))
    if dtype == np.bool_:
        return np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)),
                        bool).reshape(shape)
    width = 8 * dtype.itemsize // (2 if dtype.kind == "c" else 1)  # complex: two words each
    n = size * (2 if dtype.kind == "c" else 1)
    word = st.one_of(st.sampled_from(SPECIAL[width]), st.integers(0, 2**width - 1))
    words = np.array(draw(st.lists(word, min_size=n, max_size=n)), f"uint{width}")
    return words.view(dtype).reshape(shape)


# --------------------------------------------------------------------------
# Trees of records whose fields are declared in another order when restored.

FIELDS = ["q", "k", "v", "w", "b"]


@functools.cache
def _record_class(kind: str, fields: tuple[str, ...]) -> type:
    name = f"{kind}_{'_'.join(fields)}"
    if kind == "namedtuple":
        return collections.namedtuple(name, fields)
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    return jax.tree_util.register_dataclass(cls, data_fields=list(fields), meta_fields=[])


@dataclasses.dataclass
class Record:
    """A skeleton node: named children, saved in one field order, restored in another."""

    kind: str  # namedtuple | dataclass | dict
    children: dict  # field -> Record or NumPy array, in the saved declaration order
    restore_order: list  # the fields' declaration order when restoring


def records(leaf: st.SearchStrategy) -> st.SearchStrategy:
    @st.composite
    def node(draw, children):
        fields = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True))
        kind = draw(st.sampled_from(["namedtuple", "dataclass", "dict"]))
        kids = {f: draw(children) for f in fields}
        return Record(kind, kids, draw(st.permutations(fields)))

    return st.recursive(leaf, lambda children: node(children), max_leaves=6)


def build(skeleton, leaf_fn, *, restoring: bool):
    """The pytree of a skeleton, fields in saved or restore order; ``leaf_fn(path, x)``."""

    def go(node, path):
        if not isinstance(node, Record):
            return leaf_fn("/".join(path), node)
        order = node.restore_order if restoring else list(node.children)
        kids = {f: go(node.children[f], [*path, f]) for f in order}
        if node.kind == "dict":
            return kids
        return _record_class(node.kind, tuple(order))(**kids)

    return go(skeleton, [])


def by_path(tree) -> dict:
    return {jf.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_bits_by_path(got, want):
    got, want = by_path(got), by_path(want)
    assert got.keys() == want.keys()
    for p, w in want.items():
        g = np.asarray(got[p])
        assert g.dtype == np.asarray(w).dtype, p
        np.testing.assert_array_equal(bits(g), bits(w), err_msg=p)


@st.composite
def checkpoints(draw):
    """(skeleton, frozen paths): a record tree with a whole-leaf freeze of some leaves."""
    skeleton = draw(records(arrays()))
    paths = list(by_path(build(skeleton, lambda p, x: x, restoring=False)))
    frozen = [p for p in paths if draw(st.booleans())]
    return skeleton, frozen


@property_settings(15, shrink=False)
@given(case=checkpoints(), seed=st.integers(0, 2**16))
def test_restore_reads_every_leaf_back_by_path_with_every_bit(case, seed):
    skeleton, frozen_paths = case
    frozen = jf.paths(*frozen_paths) if frozen_paths else jf.nothing
    params = build(skeleton, lambda p, x: jnp.asarray(x), restoring=False)
    # An optimizer state of the same records (any pytree is one): a counter and a copy.
    rng = np.random.default_rng(seed)
    state = (jnp.int32(seed), build(skeleton, lambda p, x: jnp.asarray(
        rng.permutation(x.reshape(-1)).reshape(x.shape)), restoring=False))
    # A collection (batch_stats, say) on the same paths: frozen where the params are.
    stats = build(skeleton, lambda p, x: jnp.asarray(x[::-1] if x.ndim else x), restoring=False)
    with tempfile.TemporaryDirectory() as tmp:
        jf.save_trainable(os.path.join(tmp, "c"), params, state, frozen=frozen,
                          collections={"stats": stats, "step": seed})
        # Another process after a refactor: the same paths in another field order;
        # frozen leaves from their source, the rest only shapes.
        fresh = lambda p, x: jnp.asarray(x) if p in frozen_paths else jax.ShapeDtypeStruct(
            x.shape, x.dtype)
        template = build(skeleton, fresh, restoring=True)
        stats_template = build(skeleton, lambda p, x: fresh(p, x[::-1] if x.ndim else x),
                               restoring=True)
        state_template = (jnp.int32(0), build(skeleton, lambda p, x: jnp.zeros_like(x),
                                               restoring=True))
        got, got_state, colls = jf.restore_trainable(
            os.path.join(tmp, "c"), template, state_template, frozen=frozen,
            collections={"stats": stats_template, "step": 0})
    assert jax.tree.structure(got) == jax.tree.structure(build(
        skeleton, lambda p, x: 0, restoring=True))
    assert_same_bits_by_path(got, params)
    assert_same_bits_by_path(got_state, state)
    assert jax.tree.structure(colls["stats"]) == jax.tree.structure(got)
    assert_same_bits_by_path(colls["stats"], stats)
    assert colls["step"] == seed and type(colls["step"]) is int


# --------------------------------------------------------------------------
# Fingerprints: any change to any bit of a frozen leaf is seen (no orbax: fast).


@property_settings(60)
@given(x=arrays(), data=st.data())
def test_fingerprint_sees_every_bit_of_every_dtype(x, data):
    manifest = jf.freeze_manifest({"f": jnp.asarray(x)}, frozen=jf.everything)
    jf.check_manifest(manifest, {"f": jnp.asarray(x)}, frozen=jf.everything)
    jf.check_manifest(manifest, {"f": x}, frozen=jf.everything)  # NumPy: the same bits
    if x.size == 0:
        return
    flipped = x.copy().reshape(-1)
    i = data.draw(st.integers(0, x.size - 1), label="element")
    if x.dtype == np.bool_:
        flipped[i] = not flipped[i]
    else:
        words = flipped.view(f"uint{8 * x.dtype.itemsize}")
        words[i] ^= words.dtype.type(1) << words.dtype.type(
            data.draw(st.integers(0, 8 * x.dtype.itemsize - 1), label="bit"))
    flipped = flipped.reshape(x.shape)
    for leaf in (jnp.asarray(flipped), flipped):
        with pytest.raises(ValueError, match=r"'f' differ"):
            jf.check_manifest(manifest, {"f": leaf}, frozen=jf.everything)


def test_fingerprint_sees_every_bit_of_8_byte_dtypes_under_x64():
    code = """
import jax, numpy as np, jax.numpy as jnp
import jfreeze as jf
for dt in (np.float64, np.complex128, np.int64, np.uint64):
    x = np.array([0, 1, 2, 3], np.uint64).astype(dt)
    x.view(np.uint64)[1] = 0x8000000000000000  # -0.0 as a float
    m = jf.freeze_manifest({"f": jnp.asarray(x)}, frozen=jf.everything)
    jf.check_manifest(m, {"f": x}, frozen=jf.everything)  # NumPy and JAX agree
    for word in range(x.view(np.uint64).size):
        for bit in (0, 31, 32, 63):
            y = x.copy()
            y.view(np.uint64)[word] ^= np.uint64(1) << np.uint64(bit)
            try:
                jf.check_manifest(m, {"f": jnp.asarray(y)}, frozen=jf.everything)
            except ValueError:
                continue
            raise SystemExit(f"{dt.__name__}: flipping bit {bit} of word {word} not seen")
"""
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


# --------------------------------------------------------------------------
# Damaged manifests: always a ValueError (naming the checkpoint), never a raw error.

JUNK = [None, True, False, 0, -1, 3, 2.5, "", "x", "2", [], {}, [1], {"a": 1}]


def _locations(node, at=()):
    """Every place in a JSON value: a tuple of keys / indices."""
    yield at
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else []
    for k, v in items:
        yield from _locations(v, (*at, k))


@st.composite
def damaged(draw, manifest: dict) -> str:
    """The manifest's JSON text with one random damage: truncated, a value deleted or replaced."""
    text = json.dumps(manifest)
    how = draw(st.sampled_from(["truncate", "delete", "replace"]))
    if how == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    m = json.loads(text)
    at = draw(st.sampled_from(list(_locations(m))[1:]))
    parent = functools.reduce(lambda node, k: node[k], at[:-1], m)
    if how == "delete":
        del parent[at[-1]]
    else:
        parent[at[-1]] = draw(st.sampled_from(JUNK))
    return json.dumps(m)


def _params():
    return {"emb": jnp.arange(6.0).reshape(2, 3), "head": {"w": jnp.full((3, 2), -0.0),
                                                           "b": jnp.ones(2, jnp.bfloat16)}}


FROZEN = jf.paths("emb") | jf.elements("head/w", np.s_[:, 0])


def _stats(params):
    """A collection on the params' paths: 'emb' frozen (by reference), 'head/w' partial."""
    return {"stats": jax.tree.map(lambda x: x * 2, params)}


def _state(params):
    return {"count": jnp.int32(7), "mu": jax.tree.map(lambda x: x + 1, params)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("damaged") / "c"
    params = _params()
    manifest = jf.save_trainable(directory, params, _state(params), frozen=FROZEN,
                                 collections=_stats(params))
    return directory, manifest


@property_settings(150)
@given(data=st.data())
def test_check_manifest_on_a_damaged_manifest_is_a_value_error(checkpoint, data):
    _, manifest = checkpoint
    text = data.draw(damaged(manifest))
    try:
        m = json.loads(text)
    except json.JSONDecodeError:
        return  # restore_trainable's business (next test)
    params = _params()
    with contextlib.suppress(ValueError):
        jf.check_manifest(m, params, frozen=FROZEN, opt_state=_state(params),
                          collections=_stats(params))


@property_settings(20, shrink=False)
@given(data=st.data())
def test_restore_from_a_damaged_manifest_names_the_checkpoint_or_restores_exactly(
        checkpoint, data):
    directory, manifest = checkpoint
    text = data.draw(damaged(manifest))
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "c")
        shutil.copytree(directory, copy)
        with open(os.path.join(copy, "manifest", "metadata"), "w") as f:
            f.write(text)
        params = _params()
        template = {**jax.tree.map(jnp.zeros_like, params), "emb": params["emb"]}
        state = _state(template)
        try:
            stats = {"stats": {**_stats(template)["stats"], "emb": _stats(params)["stats"]["emb"]}}
            got, got_state, colls = jf.restore_trainable(copy, template, state, frozen=FROZEN,
                                                         collections=stats)
        except ValueError as e:
            assert copy in str(e)
            return
    # A harmless damage (a free-text field, say): the values are still exactly those saved.
    assert_same_bits_by_path(got, params)
    assert_same_bits_by_path(got_state, _state(params))
    assert_same_bits_by_path(colls, _stats(params))
