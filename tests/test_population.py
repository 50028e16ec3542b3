"""jf.stack / jf.unstack / jf.shard_stacked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfreeze as jf


def _model(i):
    return {"layers": [{"kernel": np.full((2, 3), i, np.float32)}], "bias": np.float32(i)}


def test_stack_unstack_round_trip():
    models = [_model(i) for i in range(4)]
    zoo = jf.stack(models)
    assert zoo["layers"][0]["kernel"].shape == (4, 2, 3)
    assert zoo["bias"].shape == (4,)
    back = jf.unstack(zoo)
    assert len(back) == 4
    for a, b in zip(models, back, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def test_stacked_models_vmap():
    zoo = jf.stack([_model(i) for i in range(3)])
    out = jax.vmap(lambda m: m["layers"][0]["kernel"].sum() + m["bias"])(zoo)
    np.testing.assert_allclose(out, [0.0, 7.0, 14.0])


def test_stack_keeps_bits():
    x = np.array([-0.0, np.nan], np.float32)
    zoo = jf.stack([{"w": x}, {"w": x}])
    np.testing.assert_array_equal(zoo["w"][0].view(np.uint32), x.view(np.uint32))


def test_stack_errors_name_the_path():
    with pytest.raises(ValueError, match=r"tree 1 .*'layers/0/kernel'"):
        jf.stack([_model(0), {**_model(1), "layers": [{"kernel": np.zeros((3, 3), np.float32)}]}])
    with pytest.raises(ValueError, match=r"int32.*'bias'"):
        jf.stack([_model(0), {**_model(1), "bias": np.int32(1)}])
    with pytest.raises(ValueError, match=r"structure.*'extra'"):
        jf.stack([_model(0), {**_model(1), "extra": np.zeros(1)}])
    with pytest.raises(ValueError, match="at least one"):
        jf.stack([])


def test_unstack_errors():
    with pytest.raises(ValueError, match="'b'"):
        jf.unstack({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))})
    assert jf.unstack({}) == []


def test_shard_stacked_one_device():
    mesh = jax.make_mesh((1,), ("models",))
    zoo = jf.shard_stacked(jf.stack([_model(i) for i in range(2)]), mesh)
    assert zoo["bias"].sharding.spec == jax.sharding.PartitionSpec("models")
    with pytest.raises(ValueError, match="'bias'"):
        jf.shard_stacked({"bias": jnp.float32(1.0)}, mesh)
    with pytest.raises(ValueError, match="'data'"):
        jf.shard_stacked({"w": np.zeros((2, 2))}, mesh, axis="data")


def test_unstack_error_names_two_different_paths():
    with pytest.raises(ValueError) as e:
        jf.unstack({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))})
    assert "'b'" in str(e.value) and "'a'" in str(e.value)
    with pytest.raises(ValueError) as e:  # the first leaf is the odd one
        jf.unstack({"a": np.zeros(()), "b": np.zeros((3, 1))})
    msg = str(e.value)
    assert "path 'a'" in msg and "scalar" in msg and msg.count("'a'") == 1


def _uint(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"uint{8 * x.dtype.itemsize}")) if x.dtype != bool else x


@pytest.mark.parametrize(
    "make",
    [
        lambda i: np.array([i, -(2**31), 2**31 - 1], np.int32),
        lambda i: np.array([i % 2 == 0, True, False]),
        lambda i: jnp.array([1e-40, -0.0, float("nan"), i], jnp.bfloat16),  # subnormal, -0, NaN
        lambda i: np.array([complex(-0.0, -0.0), complex(np.nan, 1e-45), i], np.complex64),
        lambda i: np.array([-0.0, 6e-8, i], np.float16),
        lambda i: np.uint8(i),
    ],
    ids=["int32", "bool", "bfloat16", "complex64", "float16", "uint8_scalar"],
)
def test_stack_and_unstack_keep_dtype_and_bits(make):
    models = [{"w": make(i), "nested": [make(i + 1)]} for i in range(3)]
    zoo = jf.stack(models)
    for leaf in jax.tree.leaves(zoo):
        assert leaf.dtype == np.asarray(make(0)).dtype and leaf.shape[0] == 3
    for model, back in zip(models, jf.unstack(zoo), strict=True):
        for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(back), strict=True):
            assert np.asarray(b).dtype == np.asarray(a).dtype
            np.testing.assert_array_equal(_uint(b), _uint(a))
