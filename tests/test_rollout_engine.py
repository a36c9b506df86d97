"""The continuous-batching engine: refills, scheduling invariance, the fixed-batch sampler it replaced, bounded
memory, and the decode attention it runs on."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from exprl_jax import sharding as shd
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.decode_attention import PagedSlotCache, SlotCache, decode_attention
from exprl_jax.rollout import engine as engine_lib
from exprl_jax.rollout.engine import Engine, EngineState, decode, init_state
from exprl_jax.rollout.tokens import SamplingParams
from exprl_jax.rollout.weights import untied_head
from exprl_jax.sampling import generate, generate_fixed_batch

CFG = ModelConfig.tiny()
FIELDS = ("tokens", "logprobs", "lengths", "truncated")


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, std=0.3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [list(rng.integers(4, CFG.vocab_size, rng.integers(1, 20))) for _ in range(7)]


# many EOS ids: rows end anywhere from the first token to the limit, so slots free up in a scrambled order
VARIABLE = dict(max_new_tokens=24, num_samples=3, temperature=1.0, eos_ids=(5, 9, 13, 17, 21, 33, 40, 41, 42, 43))


@pytest.fixture(scope="module")
def all_at_once(params, prompts):
    return generate(CFG, params, prompts, jax.random.key(1), **VARIABLE)


def _same(a, b, logprob_atol=0.0):
    for field in ("tokens", "lengths", "truncated"):
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), err_msg=field)
    # XLA:CPU orders a row-wise sum differently for small and large batches (e.g. a sum over 256 floats differs
    # between 1-15 rows and 300 rows), so a log-prob may move in its last bits with the batch size; tokens do not
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=logprob_atol, rtol=0)


@pytest.mark.parametrize("slots", [3, 5, 8])
def test_rows_do_not_depend_on_the_number_of_slots(params, prompts, all_at_once, slots):
    out = generate(CFG, params, prompts, jax.random.key(1), max_concurrent_rows=slots, **VARIABLE)
    _same(out, all_at_once, logprob_atol=2e-5)


def test_rows_do_not_depend_on_the_schedule_bitwise(params, prompts):
    # The same slot and refill batch sizes (so the same compiled programs), but rows entering in another order and
    # refilled at other times: every row lands in other slots beside other rows, and every bit agrees.
    # Compaction off: it changes the batch a row's last steps run in, which moves log-probs in their last bits
    # (see test_compaction_moves_live_rows_into_fewer_slots_and_changes_no_token)
    engine = Engine(CFG, max_new_tokens=VARIABLE["max_new_tokens"], slots=5, refill_rows=2,
                    sampling=SamplingParams(1.0, 1.0, 0, VARIABLE["eos_ids"], 0), compact_min_slots=0)
    rows = [p for p in prompts for _ in range(3)]
    in_order = engine.run(params, rows, jax.random.key(1), prompt_width=32)
    scrambled = engine.run(params, rows, jax.random.key(1), prompt_width=32,
                           order=np.random.default_rng(5).permutation(len(rows)))
    engine.max_steps_per_call = 3  # back to the host (and refills) every 3 steps
    interrupted = engine.run(params, rows, jax.random.key(1), prompt_width=32, order=range(len(rows))[::-1])
    for other in (scrambled, interrupted):
        for x, y, name in zip(in_order[:4], other[:4], FIELDS):
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_rows_do_not_depend_on_the_device_count(params, prompts, all_at_once, shape):
    out = generate(CFG, params, prompts, jax.random.key(1), max_concurrent_rows=5, mesh=shd.make_mesh(shape),
                   **VARIABLE)
    _same(out, all_at_once, logprob_atol=2e-5)


def test_compaction_moves_live_rows_into_fewer_slots_and_changes_no_token(params, prompts):
    # 35 rows in 35 slots, lengths 1..40: once no row waits, live rows move into 17, 8, then 4 slots
    rows = [p for p in prompts for _ in range(5)]
    sampling = SamplingParams(1.0, 1.0, 0, VARIABLE["eos_ids"], 0)
    runs = {}
    for floor in (0, 4):
        engine = Engine(CFG, max_new_tokens=40, slots=35, sampling=sampling, compact_min_slots=floor)
        runs[floor] = engine.run(params, rows, jax.random.key(1), prompt_width=32,
                                 order=np.random.default_rng(2).permutation(len(rows)))
    assert engine.slot_counts == [35, 17, 8, 4]
    assert Engine(CFG, max_new_tokens=40, slots=35, sampling=sampling, compact_min_slots=0).slot_counts == [35]
    assert Engine(CFG, max_new_tokens=40, slots=35, sampling=sampling,
                  mesh=shd.make_mesh((2, 2, 2))).slot_counts == [36, 20, 12, 8, 4]  # multiples of data x fsdp
    off, on = runs[0], runs[4]
    assert len(set(off[2].tolist())) > 10  # lengths spread, so slots empty one by one
    for x, y, name in zip(off[:4], on[:4], FIELDS):
        if name == "logprobs":
            np.testing.assert_allclose(x, y, atol=2e-5, rtol=0)  # fewer rows per step: another float order
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert on[4] > off[4] + 0.1  # slot utilisation: ended rows stop costing decode steps


def test_more_rows_than_slots_finish_in_a_scrambled_order_and_keep_the_contract(params, prompts, all_at_once):
    out = generate(CFG, params, prompts, jax.random.key(1), max_concurrent_rows=4, **VARIABLE)
    lengths, tokens, logprobs = out.lengths, out.tokens, out.logprobs
    assert len(set(lengths.tolist())) > 5 and not np.all(np.diff(lengths) >= 0)  # rows end out of order
    assert 0.0 < out.slot_utilisation <= 1.0
    eos = set(VARIABLE["eos_ids"])
    for row in range(len(lengths)):
        n = lengths[row]
        assert 1 <= n <= 24
        assert out.truncated[row] == (tokens[row, n - 1] not in eos)
        assert not eos & set(tokens[row, :n - 1].tolist())  # the first EOS ends the row
        assert np.all(tokens[row, n:] == 0) and np.all(logprobs[row, n:] == 0.0)  # pad after the end
        assert np.all(logprobs[row, :n] < 0.0)


def test_equal_to_the_fixed_batch_sampler_on_fixed_length_workloads(params, prompts):
    kwargs = dict(VARIABLE, eos_ids=())
    old = generate_fixed_batch(CFG, params, prompts, jax.random.key(1), **kwargs).to_numpy()
    for slots in (0, 4):
        new = generate(CFG, params, prompts, jax.random.key(1), max_concurrent_rows=slots, **kwargs)
        _same(new, old, logprob_atol=2e-5)  # left- vs right-padded prompts: the same math, other float order
    assert old.lengths.tolist() == [24] * 21


def test_decode_memory_does_not_grow_with_the_number_of_rows():
    # 4 slots of a 1024-token response: the compiled decode step's temporaries are the same for 8 and 512 rows
    # (rows only add their [N, R] outputs, never cache)
    config = CFG
    sampling = SamplingParams(1.0, 1.0, 0, (1,), 0)

    def temporaries(rows):
        state = jax.eval_shape(lambda: init_state(config=config, slots=4, cache_len=1024 + 128, rows=rows,
                                                  max_new_tokens=1024, pad_id=0, mesh=None))
        params = jax.eval_shape(lambda: random_params(config))
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        compiled = decode.lower(params, state, jax.random.key(0), scalar, scalar, scalar, config=config,
                                sampling=sampling, mesh=None).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(8) == temporaries(512)


def test_the_cpu_decode_program_leaves_ynnpack_out_and_samples_the_same_rows(params, prompts, all_at_once,
                                                                             monkeypatch):
    # On CPU the engine compiles decode with CPU_DECODE_COMPILER_OPTIONS (XLA's own dot emitter, not YNNPACK: faster
    # on the skinny decode matmuls). Check that the option reaches the compiler, and that the default program (the
    # one other backends get) samples the same rows
    assert Engine(CFG, max_new_tokens=4, slots=2, sampling=SamplingParams(1.0, 1.0, 0, (), 0)).decode is \
        engine_lib.decode_cpu
    assert engine_lib.decode_program("tpu") is decode and engine_lib.decode_program("gpu") is decode
    state = jax.eval_shape(lambda: init_state(config=CFG, slots=8, cache_len=64, rows=8, max_new_tokens=32,
                                              pad_id=0, mesh=None))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    texts = {f: f.lower(jax.eval_shape(lambda: params), state, jax.random.key(0), scalar, scalar, scalar, config=CFG,
                        sampling=SamplingParams(1.0, 1.0, 0, (1,), 0), mesh=None).compile().as_text()
             for f in (decode, engine_lib.decode_cpu)}
    assert "__ynn_fusion" in texts[decode] and "__ynn_fusion" not in texts[engine_lib.decode_cpu]
    monkeypatch.setattr(engine_lib, "decode_cpu", decode)
    _same(generate(CFG, params, prompts, jax.random.key(1), **VARIABLE), all_at_once, logprob_atol=2e-5)


def test_the_cpu_decode_program_pads_small_weights_once_outside_the_loop_and_samples_the_same_rows(prompts):
    # An MLP of 512 (2 KiB weight rows) gets the padded matmuls of models/matmul.py in the CPU decode program: the
    # pad of each loop-invariant weight is hoisted out of the decode loop, and the rows match the fixed-batch
    # sampler, which does not pad
    cfg = CFG.replace(mlp_dim=512)
    params = random_params(cfg, std=0.3)
    state = jax.eval_shape(lambda: init_state(config=cfg, slots=8, cache_len=64, rows=8, max_new_tokens=32,
                                              pad_id=0, mesh=None))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    text = engine_lib.decode_cpu.lower(jax.eval_shape(lambda: params), state, jax.random.key(0), scalar, scalar,
                                       scalar, config=cfg, sampling=SamplingParams(1.0, 1.0, 0, (1,), 0),
                                       mesh=None).compile().as_text()
    assert "f32[64,528]" in text  # gate and up, 512 + 16 columns
    body = re.search(r"body=(%[\w.-]+)", text).group(1)
    body_text = text[text.index(f"\n{body} ("):]
    body_text = body_text[:body_text.index("\n}")]
    assert "f32[64,528]" in body_text and "pad" not in body_text
    kwargs = dict(VARIABLE, eos_ids=())
    old = generate_fixed_batch(cfg, params, prompts, jax.random.key(1), **kwargs).to_numpy()
    _same(generate(cfg, params, prompts, jax.random.key(1), **kwargs), old, logprob_atol=2e-5)


def test_on_cpu_a_tied_head_is_sampled_from_an_untied_copy_with_the_same_rows(prompts):
    # XLA:CPU runs x times a transposed embedding far slower than times a [D, V] matrix, so the CPU engine samples
    # tied models with a materialised copy (rollout/weights.untied_head); rows equal the fixed-batch sampler's
    cfg = CFG.replace(tie_embeddings=True)
    params = random_params(cfg, std=0.3)
    assert "lm_head" not in params
    assert Engine(cfg, max_new_tokens=4, slots=2, sampling=SamplingParams(1.0, 1.0, 0, (), 0)).untie_head_on_cpu
    assert not Engine(CFG, max_new_tokens=4, slots=2, sampling=SamplingParams(1.0, 1.0, 0, (), 0)).untie_head_on_cpu
    untied_cfg, untied = untied_head(cfg, params)
    assert not untied_cfg.tie_embeddings and untied["lm_head"].shape == (cfg.d_model, cfg.vocab_size)
    np.testing.assert_array_equal(untied["lm_head"], np.asarray(params["embed"]).T)
    assert untied_head(CFG, untied) == (CFG, untied)  # untied models pass through
    kwargs = dict(VARIABLE, eos_ids=())
    old = generate_fixed_batch(cfg, params, prompts, jax.random.key(1), **kwargs).to_numpy()
    _same(generate(cfg, params, prompts, jax.random.key(1), **kwargs), old, logprob_atol=2e-5)


def test_on_cpu_rows_that_fit_in_the_slots_are_prefilled_by_one_call(params, prompts, monkeypatch):
    # each prefill call streams every weight once, so the CPU engine prefills all rows at once when they fit in
    # the slots; with more rows than slots it prefills refill_rows at a time, as on every other platform
    calls = []
    real_prefill = engine_lib.prefill

    def counted(params, prompts_RP, *args, **kwargs):
        calls.append(prompts_RP.shape[0])
        return real_prefill(params, prompts_RP, *args, **kwargs)

    monkeypatch.setattr(engine_lib, "prefill", counted)
    sampling = SamplingParams(1.0, 1.0, 0, VARIABLE["eos_ids"], 0)
    engine = Engine(CFG, max_new_tokens=VARIABLE["max_new_tokens"], slots=8, refill_rows=2, sampling=sampling)
    assert engine.prefill_all_on_cpu
    one_call = engine.run(params, prompts, jax.random.key(1), prompt_width=32)
    assert calls == [len(prompts)]  # 7 rows in 8 slots: one call of 7 rows
    calls.clear()
    engine.run(params, prompts + prompts[:2], jax.random.key(1), prompt_width=32)
    assert calls[0] == 2 and set(calls) == {2} and len(calls) >= 5  # 9 rows in 8 slots: calls of refill_rows
    calls.clear()
    engine.prefill_all_on_cpu = False  # what other platforms do
    chunked = engine.run(params, prompts, jax.random.key(1), prompt_width=32)
    assert calls == [2, 2, 2, 2]
    for x, y, name in zip(one_call[:4], chunked[:4], FIELDS):  # another batch size, the same rows
        if name == "logprobs":
            np.testing.assert_allclose(x, y, atol=2e-5, rtol=0)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_decode_attention_matches_a_numpy_reference():
    rng = np.random.default_rng(3)
    K, S, L, H, N = 2, 5, 40, 8, 6
    k, v = rng.normal(size=(2, S, L, K, H))
    # blocks of 8 positions: row 0 ends in the first, row 3 one past a block's end, row 4 fills every block
    cache = SlotCache.from_arrays(*(jnp.asarray(x.transpose(0, 2, 1, 3), jnp.float32) for x in (k, v)), block=8)
    q = jnp.asarray(rng.normal(size=(S, 1, N, H)), jnp.float32)
    lengths = np.array([1, 7, 16, 17, 40])
    out = np.asarray(decode_attention(q, cache, jnp.asarray(lengths)))
    short = np.asarray(decode_attention(q, cache, jnp.asarray(np.minimum(lengths, 9))))  # skips blocks 2..4
    np.testing.assert_array_equal(short[:2], out[:2])  # rows that end before: bitwise, whatever else is read
    qn = np.asarray(q, np.float64)
    for s in range(S):
        for n in range(N):
            head = n // (N // K)
            scores = k[s, :lengths[s], head] @ qn[s, 0, n] / np.sqrt(H)
            p = np.exp(scores - scores.max())
            np.testing.assert_allclose(out[s, 0, n], (p / p.sum()) @ v[s, :lengths[s], head], atol=1e-5)



@pytest.mark.parametrize("positions", [1, 16, 17, 144, 257, 1152, 4097, 18432])
@pytest.mark.parametrize("block_kv", [16, 100])
def test_cache_length_splits_into_at_most_max_blocks(positions, block_kv):
    from exprl_jax.models.decode_attention import MAX_CACHE_BLOCKS, cache_block, cache_length

    length = cache_length("jnp", positions, block_kv)
    block = cache_block(length, block_kv)
    assert positions <= length < positions + block  # whole blocks, less than one of them unused
    assert length % block == 0 and block % 16 == 0 and block >= min(block_kv, length)
    assert length // block <= MAX_CACHE_BLOCKS

def test_engine_state_shards_slots_over_the_batch_axes():
    mesh = shd.make_mesh((2, 2, 2))
    state = init_state(config=CFG, slots=8, cache_len=128, rows=3, max_new_tokens=4, pad_id=0, mesh=mesh)
    assert isinstance(state, EngineState)
    assert state.caches[0].k[0].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
    paged = init_state(config=CFG, slots=8, cache_len=128, rows=3, max_new_tokens=4, pad_id=0, mesh=mesh,
                       attention="paged")
    assert paged.caches[0].kv.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")


def test_the_tpu_paged_kernel_path_agrees_with_the_jnp_decode_attention():
    # The ragged paged-attention kernel has no CPU interpret mode, so its arguments (pages, block table, lengths,
    # scale) are checked through JAX's (eager) reference of the same kernel; that it lowers for a TPU, under
    # shard_map, is checked by `plan` on the paper config
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    from exprl_jax.models.decode_attention import _paged

    rng = np.random.default_rng(0)
    K, S, L, H, N = 2, 4, 256, 128, 8
    k, v = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, S, L, K, H)))
    cache = PagedSlotCache(PagedSlotCache.interleave(k, v))
    assert np.array_equal(np.asarray(cache.kv[:, :, 2]), np.asarray(k[:, :, 1]))  # head 1's key at 2, value at 3
    assert np.array_equal(np.asarray(cache.kv[:, :, 3]), np.asarray(v[:, :, 1]))
    q = jnp.asarray(rng.normal(size=(S, 1, N, H)), jnp.float32)
    lengths = jnp.asarray([1, 130, 256, 7])
    want = np.asarray(decode_attention(q, SlotCache.from_arrays(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                                                 block=64), lengths))
    got = np.asarray(_paged(q, cache, lengths, kernel=ref_ragged_paged_attention))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_both_cache_layouts_hold_the_same_keys_and_values_after_put_and_write():
    rng = np.random.default_rng(5)
    K, S, L, H, P = 2, 3, 16, 4, 5
    k_RPKH, v_RPKH = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, 2, P, K, H)))
    k_S1KH, v_S1KH = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, S, 1, K, H)))
    slots, positions = jnp.asarray([2, S]), jnp.asarray([5, 9, 15])  # row 1 goes to slot S: dropped
    split = SlotCache.zeros(K, S, L, H, jnp.float32, block=4).put(slots, k_RPKH, v_RPKH).write(k_S1KH, v_S1KH,
                                                                                            positions)
    split_k, split_v = (np.concatenate([np.asarray(b) for b in blocks], axis=2) for blocks in split)
    paged = PagedSlotCache.zeros(K, S, L, H, jnp.float32).put(slots, k_RPKH, v_RPKH).write(k_S1KH, v_S1KH,
                                                                                           positions)
    assert np.array_equal(np.asarray(paged.kv[:, :, 0::2]), split_k.transpose(0, 2, 1, 3))
    assert np.array_equal(np.asarray(paged.kv[:, :, 1::2]), split_v.transpose(0, 2, 1, 3))
    want_k = np.zeros((S, L, K, H), np.float32)  # position-major here, compared head-major below
    want_k[2, :P] = k_RPKH[0]
    want_k[np.arange(S), np.asarray(positions)] = np.asarray(k_S1KH[:, 0])
    assert np.array_equal(split_k, want_k.transpose(0, 2, 1, 3))
