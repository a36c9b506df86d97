"""Mesh construction, the logical-axis rule table (golden specs), sharded params, and that sharding never changes
the numbers: the forward on every mesh equals the single-device forward."""
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from exprl_jax import sharding as shd
from exprl_jax.models import ModelConfig, forward, init_boxed
from exprl_jax.train_state import init_train_state
from conftest import random_params

CFG = ModelConfig.tiny()
_forward = jax.jit(forward, static_argnums=0)


def _boxed_shapes(cfg):
    return jax.eval_shape(lambda r: init_boxed(cfg, r), jax.random.PRNGKey(0))


def _flat_specs(specs):
    leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    return {"/".join(k.key for k in path): spec for path, spec in leaves}


# ---------------------------------------------------------------- make_mesh
@pytest.mark.parametrize(
    "shape, expected",
    [((8, 1, 1), (8, 1, 1)), ((2, 4, 1), (2, 4, 1)), ((1, 2, 4), (1, 2, 4)), ((2, 2, 2), (2, 2, 2)),
     ((-1, 2, 1), (4, 2, 1)), ((1, -1, 2), (1, 4, 2)), ((2, 2, -1), (2, 2, 2))],
)
def test_make_mesh_shapes(shape, expected):
    mesh = shd.make_mesh(shape)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape[a] for a in mesh.axis_names) == expected
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))  # every device exactly once


@pytest.mark.parametrize(
    "shape, match",
    [((-1, -1, 1), "at most one axis"), ((2, 2, 1), "needs 4 devices, 8 available"),
     ((4, 4, 1), "needs 16 devices"), ((-1, 3, 1), "not divisible by 3"), ((8, 1), "3 entries"),
     ((8, 1, 1, 1), "3 entries"), ((0, 8, 1), "sizes must be >= 1")],
)
def test_make_mesh_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        shd.make_mesh(shape)


def test_make_mesh_zero_axis_with_fill_is_a_value_error():
    with pytest.raises(ValueError):
        shd.make_mesh((-1, 0, 1))


# ---------------------------------------------------------------- rule table
def test_logical_to_spec_rules():
    mesh = shd.make_mesh((2, 2, 2))
    assert shd.logical_to_spec(("activation_batch", "activation_length", "activation_vocab"), (8, 5, 256), mesh) \
        == P(("data", "fsdp"), None, "tensor")
    # size-1 mesh axes drop out; a batch split over fsdp alone is written as the bare axis name
    assert shd.logical_to_spec(("activation_batch", None), (8, 5), shd.make_mesh((1, 8, 1))) == P("fsdp", None)
    # 6 rows cannot split 4 ways: replicated rather than an invalid sharding
    assert shd.logical_to_spec(("activation_batch", None), (6, 5), mesh) == P(None, None)
    # without a mesh the raw rule applies, and a mesh axis is used by at most one dimension
    assert shd.logical_to_spec(("vocab", "mlp")) == P("tensor", None)
    with pytest.raises(KeyError, match="no_such_axis"):
        shd.logical_to_spec(("no_such_axis",))


def _specs(shardings):
    return jax.tree.map(lambda s: s.spec, shardings)


def test_golden_param_specs_tiny_on_2x2x2():
    # From LOGICAL_RULES: vocab→tensor, embed→fsdp, mlp→tensor, q_heads→tensor, kv_heads→tensor, head_dim→None,
    # norm→None; every tiny dim (V 256, D 64, N 8, K 4, F 128) divides 2, so nothing is dropped.
    layer = {
        "input_norm/scale": P(None),
        "attn/q_proj": P("fsdp", "tensor", None),
        "attn/k_proj": P("fsdp", "tensor", None),
        "attn/v_proj": P("fsdp", "tensor", None),
        "attn/o_proj": P("tensor", None, "fsdp"),
        "attn/q_norm/scale": P(None),
        "attn/k_norm/scale": P(None),
        "post_attn_norm/scale": P(None),
        "mlp/gate_proj": P("fsdp", "tensor"),
        "mlp/up_proj": P("fsdp", "tensor"),
        "mlp/down_proj": P("tensor", "fsdp"),
    }
    expected = {
        "embed": P("tensor", "fsdp"),
        "final_norm/scale": P(None),
        "lm_head": P("fsdp", "tensor"),
        **{f"layers_0/{k}": v for k, v in layer.items()},
        **{f"layers_1/{k}": v for k, v in layer.items()},
    }
    got = _flat_specs(_specs(shd.param_shardings(_boxed_shapes(CFG), shd.make_mesh((2, 2, 2)))))
    assert got == expected
    assert {k: tuple(v) for k, v in got.items()} == {k: tuple(v) for k, v in expected.items()}


def test_undivisible_dim_is_replicated():
    cfg = ModelConfig.tiny(num_kv_heads=2)  # 2 KV heads cannot split over tensor=4; 8 query heads can
    specs = _flat_specs(_specs(shd.param_shardings(_boxed_shapes(cfg), shd.make_mesh((1, 2, 4)))))
    assert specs["layers_0/attn/k_proj"] == P("fsdp", None, None)
    assert specs["layers_0/attn/v_proj"] == P("fsdp", None, None)
    assert specs["layers_0/attn/q_proj"] == P("fsdp", "tensor", None)
    assert specs["layers_0/attn/o_proj"] == P("tensor", None, "fsdp")


# ---------------------------------------------------------------- sharded params and batches
@pytest.fixture(scope="module")
def state_2x2x2():
    mesh = shd.make_mesh((2, 2, 2))
    state, shardings = init_train_state(CFG, optax.adam(1e-3), jax.random.PRNGKey(0), mesh)
    return mesh, state, shardings


def test_init_train_state_params_are_sharded(state_2x2x2):
    mesh, state, _ = state_2x2x2
    p = state.params
    q = p["layers_0"]["attn"]["q_proj"]  # [64, 8, 16] over (fsdp=2, tensor=2, -)
    assert q.shape == (64, 8, 16)
    assert len(q.addressable_shards) == 8
    assert {s.data.shape for s in q.addressable_shards} == {(32, 4, 16)}
    assert {s.data.shape for s in p["embed"].addressable_shards} == {(128, 32)}  # [256, 64] over (tensor, fsdp)
    assert {s.data.shape for s in p["lm_head"].addressable_shards} == {(32, 128)}
    assert {s.data.shape for s in p["layers_1"]["mlp"]["down_proj"].addressable_shards} == {(64, 32)}
    assert {s.data.shape for s in p["final_norm"]["scale"].addressable_shards} == {(64,)}  # replicated
    assert q.sharding == NamedSharding(mesh, P("fsdp", "tensor", None))
    # Adam moments follow their parameter
    mu = state.opt_state[0].mu["layers_0"]["attn"]["q_proj"]
    assert {s.data.shape for s in mu.addressable_shards} == {(32, 4, 16)}


def test_uneven_batch_names_the_batch_size_and_mesh():
    mesh = shd.make_mesh((2, 2, 2))
    with pytest.raises(ValueError, match=r"size 6 .*data×fsdp = 2×2 = 4.*'data': 2, 'fsdp': 2, 'tensor': 2"):
        shd.shard_batch({"tokens": np.zeros((6, 4), np.int32)}, mesh)


def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = shd.make_mesh((2, 2, 2))
    tokens = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    out = shd.shard_batch({"tokens": tokens}, mesh)["tokens"]
    assert out.sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in out.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(out), tokens)


# ---------------------------------------------------------------- the forward on every mesh
def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, size=(8, 6)).astype(np.int32)
    mask = np.ones((8, 6), np.int32)
    for row, pad in enumerate([0, 2, 1, 0, 5, 3, 0, 1]):  # left padding of varied lengths
        mask[row, :pad] = 0
    return {"tokens": tokens, "mask": mask}


@pytest.fixture(scope="module")
def single_device_logits():
    params = random_params(CFG)
    b = _batch()
    return params, np.asarray(_forward(CFG, params, b["tokens"], attention_mask=b["mask"]))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 2, 4), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_forward_equals_single_device(shape, single_device_logits, state_2x2x2):
    params, expected = single_device_logits
    if shape == (2, 2, 2):  # params born sharded by init_train_state; reference recomputed from the same values
        mesh, state, _ = state_2x2x2
        params = state.params
        b = _batch()
        host = jax.device_get(params)
        expected = np.asarray(_forward(CFG, host, b["tokens"], attention_mask=b["mask"]))
    else:
        mesh = shd.make_mesh(shape)
        params = jax.device_put(params, shd.param_shardings(_boxed_shapes(CFG), mesh))
    batch = shd.shard_batch(_batch(), mesh)
    with shd.use_mesh(mesh):
        logits = jax.jit(lambda p, b: forward(CFG, p, b["tokens"], attention_mask=b["mask"]))(params, batch)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)
    # the output constraint was applied (constraints are not skipped on CPU): batch over data×fsdp, vocab over tensor
    want = shd.logical_to_spec(("activation_batch", "activation_length", "activation_vocab"), logits.shape, mesh)
    assert logits.sharding.is_equivalent_to(NamedSharding(mesh, want), logits.ndim)
