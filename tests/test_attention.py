"""Attention implementations against a naive numpy reference (GQA, left padding, cache offsets, odd lengths), their
gradients against "xla", fully masked rows, splash under shard_map and compiled for a TPU, chunked memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exprl_jax import sharding as shd
from exprl_jax.models import attention as attn
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.transformer import forward, forward_with_cache, init_cache
from conftest import random_params

H = 16
# name -> (T, S, first query slot): the training forward, a prefill/chunk into a partly filled cache, a decode step
LAYOUTS = {"train": (13, 13, 0), "cache": (5, 23, 9), "decode": (1, 40, 17)}
PADS = (0, 3, 7)  # left padding of each batch row


def _inputs(N, K, layout, seed=0):
    T, S, start = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(len(PADS), T, N, H)).astype(np.float32)
    k, v = (rng.normal(size=(len(PADS), S, K, H)).astype(np.float32) for _ in range(2))
    valid = np.ones((len(PADS), S), np.int32)
    pads = PADS if layout == "train" else PADS[:2] + (start + (T + 1) // 2,)  # row 2's first queries see no key
    for row, pad in enumerate(pads):
        valid[row, :pad] = 0
    valid[:, start + T:] = 0  # slots past this chunk are not written yet
    valid[2, start + T - 1] = 0  # a hole inside the filled part: an invalid key that is not padding
    slots = start + np.arange(T)
    return q, k, v, slots, valid


def _reference(q, k, v, slots, valid):
    """Naive float64 attention, one (row, head, query) at a time: head n reads kv head n // (N // K)."""
    B, T, N, _ = q.shape
    K = k.shape[2]
    out = np.zeros(q.shape)
    for b, n, t in np.ndindex(B, N, T):
        keys = [s for s in range(k.shape[1]) if s <= slots[t] and valid[b, s]]
        if not keys:
            continue
        scores = np.array([q[b, t, n] @ k[b, s, n // (N // K)] for s in keys], np.float64) / np.sqrt(H)
        probs = np.exp(scores - scores.max())
        out[b, t, n] = (probs / probs.sum()) @ np.array([v[b, s, n // (N // K)] for s in keys], np.float64)
    return out


def _query_has_key(slots, valid):  # [B, T]: rows whose output is defined (at least one visible key)
    return np.array([[valid[b, : slots[t] + 1].any() for t in range(len(slots))] for b in range(valid.shape[0])])


def _run(impl, q, k, v, slots, valid):
    """Each implementation the way the decoder calls it (static first slot), small blocks for chunked."""
    start = int(slots[0])
    if impl == "chunked":
        return attn.chunked_attention(q, k, v, jnp.asarray(slots), valid, block_q=4, block_kv=5)
    if impl == "splash":
        return attn.splash_attention(q, k, v, valid, q_start=start, block_q=128, block_kv=128, interpret=True)
    if impl == "xla_split":  # the materialised path cut at the causal frontier and split in two halves of queries
        return attn.xla_attention(q, k, v, jnp.asarray(slots), valid, q_start=start, split_min_rows=2)
    if impl == "cudnn_wrapper":  # the cudnn call's mask / GQA / scale plumbing, run by XLA
        return attn.cudnn_attention(q, k, v, jnp.asarray(slots), valid, q_start=start, implementation="xla")
    return attn.attend(q, k, v, jnp.asarray(slots), valid, impl=impl, q_start=start)


IMPLS = ("xla", "xla_split", "chunked", "splash", "cudnn_wrapper")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("N, K", [(8, 2), (8, 8)])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_naive_reference(impl, N, K, layout):
    q, k, v, slots, valid = _inputs(N, K, layout)
    out = np.asarray(jax.jit(functools.partial(_run, impl, slots=slots))(q, k, v, valid=valid))
    assert out.shape == q.shape and np.isfinite(out).all()  # rows without a visible key are finite too
    rows = _query_has_key(slots, valid)
    assert not rows.all(), "the inputs must contain a fully masked query"
    np.testing.assert_allclose(out[rows], _reference(q, k, v, slots, valid)[rows], atol=1e-5, rtol=0)


def _grads(fn, q, k, v, slots, valid, rows_only=True):
    weights = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
    if rows_only:  # a loss on the defined rows only, as the trainer's masked losses are
        weights *= _query_has_key(slots, valid)[:, :, None, None]
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, slots, valid) * weights)
    return [np.asarray(g) for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)]


@pytest.mark.parametrize("layout", ["train", "cache"])
@pytest.mark.parametrize("N, K", [(8, 2), (8, 8)])
@pytest.mark.parametrize("impl", ["xla_split", "chunked", "splash"])
def test_gradients_equal_xla(impl, N, K, layout):
    q, k, v, slots, valid = _inputs(N, K, layout, seed=2)
    expected = _grads(attn.xla_attention, q, k, v, slots, valid)
    got = _grads(functools.partial(_run, impl), q, k, v, slots, valid)
    for name, g, e in zip("qkv", got, expected):
        assert np.abs(e).max() > 1e-2, name  # the gradient is not trivially zero
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("impl", ["xla", "chunked", "splash"])
def test_fully_masked_rows_have_finite_values_and_gradients(impl):
    q, k, v, slots, valid = _inputs(8, 2, "train", seed=3)
    valid[1] = 0  # a batch row with no valid key at all (a padding row)
    out = np.asarray(_run(impl, q, k, v, slots, valid))
    assert np.isfinite(out).all()
    for g in _grads(functools.partial(_run, impl), q, k, v, slots, valid, rows_only=False):
        assert np.isfinite(g).all()


def test_chunked_never_reads_keys_past_the_causal_frontier():
    # Decode at slot 17 of a 40-slot cache with 8-slot key blocks: blocks 3 and 4 (slots 24..39) are past the
    # frontier. NaNs there reach the output (0 · NaN = NaN) only if those blocks are read, as "xla" does.
    q, k, v, slots, valid = _inputs(8, 2, "decode")
    k[:, 24:], v[:, 24:] = np.nan, np.nan
    chunked = functools.partial(attn.chunked_attention, block_q=4, block_kv=8)
    assert np.isfinite(np.asarray(chunked(q, k, v, slots, valid))).all()
    assert all(np.isfinite(g).all() for g in _grads(chunked, q, k, v, slots, valid))
    assert np.isnan(np.asarray(attn.xla_attention(q, k, v, slots, valid))).any()


def test_attend_falls_back_to_chunked_without_a_static_first_slot():
    q, k, v, slots, valid = _inputs(8, 2, "decode")
    expected = attn.chunked_attention(q, k, v, slots, valid)
    for impl in ("splash", "cudnn"):  # decode: the cache index is traced, so q_start is unknown
        got = jax.jit(lambda q, k, v, impl=impl: attn.attend(q, k, v, slots, valid, impl=impl, q_start=None))(q, k, v)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("scan,remat", [(False, "none"), (False, "full"), (True, "full")])
def test_the_decoder_runs_splash_in_the_training_forward_and_prefill(scan, remat):
    """The decoder hands attend its static first slot, so splash runs its kernel (not the chunked fallback), also
    under scan over layers and rematerialisation."""
    cfg = ModelConfig.tiny(attention_impl="splash", scan_layers=scan, remat=remat)
    params = random_params(cfg)
    tokens = np.ones((2, 6), np.int32)
    assert "pallas_call" in str(jax.make_jaxpr(functools.partial(forward, cfg))(params, tokens))
    caches, valid = init_cache(cfg, 2, 8), np.ones((2, 8), np.int32)
    prefill = functools.partial(forward_with_cache, cfg, params, tokens, tokens, caches, 0)
    assert "pallas_call" in str(jax.make_jaxpr(prefill)(valid))
    decode = functools.partial(forward_with_cache, cfg, params, tokens[:, :1], tokens[:, :1], caches)
    assert "pallas_call" not in str(jax.make_jaxpr(decode)(6, valid))  # traced cache index: chunked


def test_auto_rule_and_config_validation():
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert attn._auto_impl("tpu", f32, 1, 4096, 128, None) == "splash"  # splash itself falls back for decode
    assert attn._auto_impl("gpu", bf16, 4096, 4096, 128, 0) == "cudnn"
    assert attn._auto_impl("gpu", f32, 4096, 4096, 128, 0) == "chunked"  # cuDNN has no fp32 flash attention
    assert attn._auto_impl("gpu", bf16, 1, 4096, 128, None) == "chunked"
    assert attn._auto_impl("cpu", f32, 64, 64, 64, 0) == "xla"
    assert attn._auto_impl("cpu", f32, 4096, 4096, 64, 0) == "chunked"
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        ModelConfig.tiny(attention_impl="flash")
    with pytest.raises(ValueError, match="attention_block_kv=0"):
        ModelConfig.tiny(attention_block_kv=0)
    with pytest.raises(ValueError, match="needs a GPU"):
        q, k, v, slots, valid = _inputs(8, 2, "train")
        attn.attend(q, k, v, slots, valid, impl="cudnn", q_start=0)


# ---------------------------------------------------------------- splash under shard_map
@pytest.mark.parametrize("mesh_shape, N, K", [
    ((1, 2, 4), 8, 2),  # KV heads replicated (2 over tensor=4): each shard slices the one KV head it uses
    ((2, 1, 4), 8, 4),  # KV heads sharded with the query heads
    ((1, 1, 8), 24, 6),  # 3 query heads per shard, groups of 4: KV heads gathered per query head
])
def test_splash_under_shard_map_equals_xla(mesh_shape, N, K):
    q, k, v, slots, valid = _inputs(N, K, "train", seed=4)
    q, k, v, valid = q[:2], k[:2], v[:2], valid[:2]  # batch 2 over data×fsdp
    mesh = shd.make_mesh(mesh_shape)

    def sharded(q, k, v, slots, valid):
        with shd.use_mesh(mesh):
            return attn.attend(q, k, v, slots, valid, impl="splash", q_start=0)

    rows = _query_has_key(slots, valid)
    out = np.asarray(jax.jit(sharded)(q, k, v, slots, valid))
    np.testing.assert_allclose(out[rows], np.asarray(attn.xla_attention(q, k, v, slots, valid))[rows], atol=1e-5)
    if mesh_shape == (1, 2, 4):
        for g, e in zip(_grads(sharded, q, k, v, slots, valid), _grads(attn.xla_attention, q, k, v, slots, valid)):
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)


def test_decoder_with_splash_on_a_mesh_equals_xla():
    """The whole decoder on the 8-device mesh, 8 query heads over tensor=8 and 4 replicated KV heads."""
    mesh = shd.make_mesh((1, 1, 8))
    params = random_params(ModelConfig.tiny(), seed=5)
    tokens = np.random.default_rng(5).integers(1, 256, (2, 10)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :4] = 0

    def logits(impl):
        with shd.use_mesh(mesh):
            run = jax.jit(functools.partial(forward, ModelConfig.tiny(attention_impl=impl)))
            return np.asarray(run(params, tokens, attention_mask=mask))

    real = mask.astype(bool)
    np.testing.assert_allclose(logits("splash")[real], logits("xla")[real], atol=1e-5, rtol=0)


def test_splash_compiles_for_a_tpu_v5e_8_without_a_tpu(monkeypatch):
    """Deviceless AOT compile through libtpu: "auto" picks splash for a TPU mesh, and the Mosaic kernel lowers
    under shard_map (forward + backward, bf16, heads over tensor, T not a multiple of the block)."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu's lock file
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices
    mesh = shd.make_mesh((1, 2, 4), devices)
    B, T, N, K, Hd = 2, 1000, 8, 2, 128

    def grads(q, k, v, valid):
        with shd.use_mesh(mesh):
            loss = lambda q, k, v: attn.attend(q, k, v, jnp.arange(T), valid, impl="auto",
                                               q_start=0).astype(jnp.float32).sum()
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    def spec(shape, dtype, *axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))

    batch = ("data", "fsdp")
    lowered = jax.jit(grads).lower(spec((B, T, N, Hd), jnp.bfloat16, batch, None, "tensor", None),
                                   spec((B, T, K, Hd), jnp.bfloat16, batch, None, None, None),
                                   spec((B, T, K, Hd), jnp.bfloat16, batch, None, None, None),
                                   spec((B, T), jnp.int32, batch, None))
    assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, not an XLA fallback
    # A deviceless executable cannot be read back from the persistent cache (no client): don't write one there.
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        compiled = lowered.compile()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    assert compiled.memory_analysis().argument_size_in_bytes > 0
    assert jax.devices()[0].platform == "cpu" and jax.device_count() == 8  # the suite still runs on CPU


# ---------------------------------------------------------------- memory
def test_chunked_forward_backward_temporaries_stay_far_below_the_score_matrix():
    B, T, N, K, Hd = 1, 4096, 8, 2, 64
    scores_bytes = T * T * N * 4  # one fp32 [T, T] score matrix per head: 512 MiB

    def temp_bytes(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, jnp.arange(T), jnp.ones((B, T), jnp.int32)))
        shapes = [jax.ShapeDtypeStruct((B, T, n, Hd), jnp.float32) for n in (N, K, K)]
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(attn.chunked_attention)
    # measured 38 MB (7%): a few fp32 [B, N, 512, 512] tiles (8 MB each) plus T-sized dq/dk/dv accumulators
    assert chunked < scores_bytes / 10, chunked
    assert temp_bytes(attn.xla_attention) >= scores_bytes  # the reference does materialise it


def test_xla_with_a_static_first_slot_splits_queries_and_cuts_invisible_keys():
    q, k, v, slots, valid = _inputs(8, 2, "cache")  # T = 5 queries at slots 9..13 of a 23-slot cache

    def score_shapes(**kwargs):
        jaxpr = jax.make_jaxpr(lambda q, k, v: attn.xla_attention(q, k, v, jnp.asarray(slots), valid, **kwargs))(
            q, k, v)
        return [tuple(e.outvars[0].aval.shape) for e in jaxpr.jaxpr.eqns
                if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] != H]

    assert score_shapes() == [(3, 2, 4 * 5, 23)]  # [B, K, G*T, S]: every cache slot
    # halves of 2 and 3 queries over the 11 and 14 slots up to their last query
    assert score_shapes(q_start=9, split_min_rows=2) == [(3, 2, 4 * 2, 11), (3, 2, 4 * 3, 14)]
    assert score_shapes(q_start=9) == [(3, 2, 4 * 5, 14)]  # fewer queries than split_min_rows: one block
