"""Generation: the KV cache reproduces the full forward, reported log-probs are the ones the trainer recomputes,
greedy / top-k / top-p agree where they must, EOS bookkeeping, sharding-independence and argument checks."""
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from exprl_jax import sharding as shd
from exprl_jax.models import ModelConfig, forward, forward_with_cache, init_boxed, init_cache
from exprl_jax.models import token_logprobs
from exprl_jax.models.transformer import positions_from_mask
from exprl_jax.rollout.tokens import categorical, filter_logits as _filter_logits, sample_token
from exprl_jax.sampling import generate, pad_prompts
from conftest import random_params

CFG = ModelConfig.tiny()
PROMPTS = [[5, 17, 42, 9, 100], [7, 3], [200, 201, 202, 203, 204, 205, 206], [1]]
MULTIPLE = 8  # prompts pad to P = 8
P_LEN = 8
NEW = 5
PAD = 3  # a distinctive pad id, so "pad after EOS" cannot pass by accident with 0
SAMPLES = 2  # 4 prompts x 2 = 8 rows: divides data×fsdp on every 8-device mesh

_forward = jax.jit(forward, static_argnums=0)
_forward_with_cache = jax.jit(forward_with_cache, static_argnums=0)
_token_logprobs = jax.jit(token_logprobs, static_argnums=0, static_argnames="temperature")


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


def _gen(params, rng_seed=0, **kw):
    kw = {"max_new_tokens": NEW, "num_samples": SAMPLES, "pad_id": PAD, "prompt_multiple": MULTIPLE, **kw}
    return generate(CFG, params, PROMPTS, jax.random.PRNGKey(rng_seed), **kw).to_numpy()


def _rows_prompt(num_samples=SAMPLES):
    tokens, mask = pad_prompts(PROMPTS, PAD, MULTIPLE)
    return np.repeat(tokens, num_samples, axis=0), np.repeat(mask, num_samples, axis=0)


def _teacher_forced(params, out, temperature, num_samples=SAMPLES):
    """token_logprobs of each row's own prompt + generated tokens; entries P-1 ... score the generated tokens."""
    tokens, mask = _rows_prompt(num_samples)
    gen_mask = (np.arange(NEW)[None, :] < out.lengths[:, None]).astype(np.int32)
    seq = np.concatenate([tokens, out.tokens], axis=1)
    seq_mask = np.concatenate([mask, gen_mask], axis=1)
    lp = np.asarray(_token_logprobs(CFG, params, seq, attention_mask=seq_mask, temperature=temperature))
    return lp[:, P_LEN - 1:] * gen_mask


@pytest.fixture(scope="module")
def sampled(params):
    """Temperature-1 samples on one device, shared by the parity, grouping and mesh tests."""
    return _gen(params, rng_seed=1, temperature=1.0)


@pytest.fixture(scope="module")
def greedy(params):
    return _gen(params, rng_seed=0, temperature=0.0)


# ---------------------------------------------------------------- KV cache == full forward
@pytest.mark.parametrize("cfg", [CFG, ModelConfig.tiny(qkv_bias=True, o_bias=True, qk_norm=False,
                                                       tie_embeddings=True, num_kv_heads=2)],
                         ids=["tiny", "bias_tied_gqa4"])
def test_kv_cache_decoding_equals_full_forward(cfg):
    params = random_params(cfg, seed=3)
    steps = 3
    tokens, mask = pad_prompts([[11, 12, 13, 14], [21, 22, 23, 24, 25, 26]], pad_id=PAD, multiple=6)  # [2, 6]
    assert mask[0].tolist() == [0, 0, 1, 1, 1, 1]
    caches = init_cache(cfg, 2, 6 + steps)
    kv_valid = np.concatenate([mask, np.zeros((2, steps), np.int32)], axis=1)
    positions = positions_from_mask(jnp.asarray(mask))
    logits, caches = _forward_with_cache(cfg, params, tokens, positions, caches, 0, kv_valid)
    full = np.asarray(_forward(cfg, params, tokens, attention_mask=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], full[real], atol=1e-5, rtol=0)

    seq, seq_mask, next_pos = tokens, mask, np.asarray(positions)[:, -1] + 1
    assert next_pos.tolist() == [4, 6]
    new_tokens = np.array([[31, 32, 33], [41, 42, 43]], np.int32)
    for i in range(steps):
        tok = new_tokens[:, i:i + 1]
        seq = np.concatenate([seq, tok], axis=1)
        seq_mask = np.concatenate([seq_mask, np.ones((2, 1), np.int32)], axis=1)
        kv_valid[:, 6 + i] = 1
        step_logits, caches = _forward_with_cache(cfg, params, tok, next_pos[:, None], caches, 6 + i, kv_valid)
        ref = np.asarray(_forward(cfg, params, seq, attention_mask=seq_mask))[:, -1]
        np.testing.assert_allclose(np.asarray(step_logits)[:, 0], ref, atol=1e-5, rtol=0)
        next_pos = next_pos + 1
    # teeth: the last step depends on the cached context, not only on the one token fed
    other = np.asarray(_forward(cfg, params, seq[:, -1:]))[:, -1]
    assert np.max(np.abs(other - ref)) > 1e-3


# ---------------------------------------------------------------- reported log-probs == teacher-forced ones
def test_sampled_logprobs_equal_teacher_forced_temperature_1(params, sampled):
    assert sampled.tokens.shape == sampled.logprobs.shape == (len(PROMPTS) * SAMPLES, NEW)
    assert sampled.tokens.dtype == np.int32 and sampled.logprobs.dtype == np.float32
    assert sampled.lengths.tolist() == [NEW] * 8
    assert sampled.truncated.all()  # no eos_ids: every row runs out
    # Scoring row r with prompt r // SAMPLES also checks the rows are prompt-major.
    np.testing.assert_allclose(sampled.logprobs, _teacher_forced(params, sampled, 1.0), atol=1e-5, rtol=0)


def test_sampled_logprobs_equal_teacher_forced_temperature_0_7(params):
    out = _gen(params, rng_seed=2, temperature=0.7)
    expected = _teacher_forced(params, out, 0.7)
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-5, rtol=0)
    # temperature-1 scoring of the same tokens differs by far more than the tolerance
    assert np.max(np.abs(_teacher_forced(params, out, 1.0) - expected)) > 1e-3


# ---------------------------------------------------------------- greedy, top-k, top-p
def test_greedy_is_deterministic_and_equals_argmax_decoding(params, greedy):
    again = _gen(params, rng_seed=123, temperature=0.0)
    np.testing.assert_array_equal(again.tokens, greedy.tokens)
    np.testing.assert_array_equal(again.logprobs, greedy.logprobs)

    # argmax by repeated full forward over a fixed buffer (causal: later slots cannot affect slot P-1+i)
    tokens, mask = _rows_prompt()
    buf = np.concatenate([tokens, np.full((len(tokens), NEW), PAD, np.int32)], axis=1)
    buf_mask = np.concatenate([mask, np.ones((len(tokens), NEW), np.int32)], axis=1)
    lps = []
    for i in range(NEW):
        logits = np.asarray(_forward(CFG, params, buf, attention_mask=buf_mask))[:, P_LEN - 1 + i]
        buf[:, P_LEN + i] = logits.argmax(-1)
        shifted = logits - logits.max(-1, keepdims=True)
        lps.append(shifted[np.arange(len(buf)), buf[:, P_LEN + i]] - np.log(np.exp(shifted).sum(-1)))
    np.testing.assert_array_equal(greedy.tokens, buf[:, P_LEN:])
    # greedy reports the temperature-1 log-prob of the argmax token
    np.testing.assert_allclose(greedy.logprobs, np.stack(lps, axis=1), atol=1e-5, rtol=0)
    assert greedy.truncated.all() and greedy.lengths.tolist() == [NEW] * 8


def test_num_samples_rows_are_prompt_major(greedy, sampled):
    g = greedy.tokens.reshape(len(PROMPTS), SAMPLES, NEW)
    assert all((g[i, 0] == g[i, 1]).all() for i in range(len(PROMPTS)))  # greedy samples of a prompt agree
    assert len({tuple(g[i, 0]) for i in range(len(PROMPTS))}) == len(PROMPTS)  # different prompts differ
    s = sampled.tokens.reshape(len(PROMPTS), SAMPLES, NEW)
    assert all((s[i, 0] != s[i, 1]).any() for i in range(len(PROMPTS)))  # sampled rows of a prompt differ


def test_top_k_1_equals_greedy(params, greedy):
    out = _gen(params, rng_seed=5, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-6, rtol=0)  # both unfiltered, T = 1


def test_tiny_top_p_equals_greedy(params, greedy):
    out = _gen(params, rng_seed=6, temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- EOS
def test_eos_ends_a_row_and_is_kept_with_its_logprob(params, greedy):
    eos = int(greedy.tokens[0, 2])
    assert eos not in greedy.tokens[0, :2] and eos != PAD  # row 0 ends exactly at step 2
    hit = (greedy.tokens == eos).any(axis=1)
    assert not hit.all()  # at least one row never emits it and must run out
    out = _gen(params, temperature=0.0, eos_ids=(eos,))
    for r in range(len(out.tokens)):
        if hit[r]:
            end = int(np.argmax(greedy.tokens[r] == eos)) + 1  # length including the EOS
            np.testing.assert_array_equal(out.tokens[r, :end], greedy.tokens[r, :end])
            assert out.tokens[r, end - 1] == eos
            np.testing.assert_allclose(out.logprobs[r, :end], greedy.logprobs[r, :end], atol=1e-6, rtol=0)
            assert out.logprobs[r, end - 1] < 0  # the EOS carries its own log-prob
            assert (out.tokens[r, end:] == PAD).all() and (out.logprobs[r, end:] == 0).all()
            assert out.lengths[r] == end and not out.truncated[r]
        else:
            np.testing.assert_array_equal(out.tokens[r], greedy.tokens[r])
            assert out.lengths[r] == NEW and out.truncated[r]
    assert out.lengths[0] == 3


def test_generation_stops_when_every_row_has_ended(params, greedy):
    # Every row's step-1 token is an EOS: each row ends at step 0 or 1 and the loop exits early.
    eos = tuple(sorted({int(t) for t in greedy.tokens[:, 1]}))
    out = _gen(params, temperature=0.0, eos_ids=eos)
    ends = [int(np.argmax(np.isin(greedy.tokens[r], eos))) + 1 for r in range(len(out.tokens))]
    assert set(ends) <= {1, 2}
    assert out.lengths.tolist() == ends and not out.truncated.any()
    for r, end in enumerate(ends):
        np.testing.assert_array_equal(out.tokens[r, :end], greedy.tokens[r, :end])
        assert (out.tokens[r, end:] == PAD).all() and (out.logprobs[r, end:] == 0).all()


# ---------------------------------------------------------------- sharding does not change samples
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_same_seed_same_samples_on_every_mesh(params, sampled, shape):
    mesh = shd.make_mesh(shape)
    boxed = jax.eval_shape(lambda r: init_boxed(CFG, r), jax.random.PRNGKey(0))
    sharded = jax.device_put(params, shd.param_shardings(boxed, mesh))
    # pure data parallelism replicates the weights; (2, 2, 2) splits them over fsdp and tensor
    assert sharded["embed"].sharding.spec == (P(None, None) if shape == (8, 1, 1) else P("tensor", "fsdp"))
    out = _gen(sharded, rng_seed=1, temperature=1.0, mesh=mesh)
    np.testing.assert_array_equal(out.tokens, sampled.tokens)
    np.testing.assert_allclose(out.logprobs, sampled.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.lengths, sampled.lengths)


def test_any_row_count_on_any_mesh(params):
    # 3 prompts x 3 samples = 9 rows on data×fsdp = 4: padded to 12 on the mesh, the padding rows dropped; the real
    # rows are the ones a single device samples (a row's noise depends only on its index: partitionable threefry)
    mesh = shd.make_mesh((2, 2, 2))
    kwargs = dict(max_new_tokens=6, num_samples=3, temperature=1.0, eos_ids=(7, 11))
    single = generate(CFG, params, PROMPTS[:3], jax.random.PRNGKey(4), **kwargs).to_numpy()
    meshed = generate(CFG, params, PROMPTS[:3], jax.random.PRNGKey(4), mesh=mesh, **kwargs).to_numpy()
    assert meshed.tokens.shape == (9, 6)
    np.testing.assert_array_equal(meshed.tokens, single.tokens)
    np.testing.assert_array_equal(meshed.lengths, single.lengths)
    np.testing.assert_allclose(meshed.logprobs, single.logprobs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- filtering, by hand
def test_filter_logits_top_p_keeps_smallest_prefix_reaching_the_mass():
    # probs by id: [0.15, 0.5, 0.05, 0.3]; sorted 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2).
    # Mass *before* each sorted token: 0, 0.5, 0.8, 0.95. A token is kept while that mass is < top_p.
    #   top_p 0.75 → {1, 3} (0.5 + 0.3 = 0.8 ≥ 0.75). Keeping only tokens whose cumulative mass *including*
    #                itself is ≤ top_p (a common off-by-one) would give {1} alone.
    #   top_p 0.85 → {1, 3, 0}; top_p 0.4 → {1}; top_p 0.99 → all four.
    logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]], jnp.float32))
    for top_p, kept in [(0.75, {1, 3}), (0.85, {0, 1, 3}), (0.4, {1}), (0.99, {0, 1, 2, 3})]:
        out = np.asarray(_filter_logits(logits, top_p, 0))[0]
        assert set(np.nonzero(np.isfinite(out))[0]) == kept, top_p
        np.testing.assert_array_equal(out[list(kept)], np.asarray(logits)[0, list(kept)])  # kept ones untouched
        assert (out[np.isinf(out)] < 0).all()
    # top-k first, then top-p on the renormalised survivors: top_k 3 keeps 0.5, 0.3, 0.15 (sum 0.95), renormalised
    # 0.526, 0.316, 0.158. top_p 0.52 keeps {1} (0.526 ≥ 0.52); top-p on the raw probs would keep {1, 3} (0.5 < 0.52).
    out = np.asarray(_filter_logits(logits, 0.52, 3))[0]
    assert set(np.nonzero(np.isfinite(out))[0]) == {1}
    out = np.asarray(_filter_logits(logits, 1.0, 2))[0]
    assert set(np.nonzero(np.isfinite(out))[0]) == {1, 3}


def test_sample_token_reports_unfiltered_logprob():
    # top_k 2 samples only ids 1 and 3, but reports log p under the full softmax: log 0.5 = -0.693 and
    # log 0.3 = -1.204, not the renormalised log(0.5/0.8) = -0.470 / log(0.3/0.8) = -0.981.
    logits = jnp.log(jnp.tile(jnp.array([[0.15, 0.5, 0.05, 0.3]], jnp.float32), (256, 1)))
    token, logp = sample_token(jax.random.split(jax.random.PRNGKey(0), logits.shape[0]), logits, 1.0, 1.0, 2)
    token, logp = np.asarray(token), np.asarray(logp)
    assert set(token.tolist()) == {1, 3}
    np.testing.assert_allclose(logp, np.where(token == 1, math.log(0.5), math.log(0.3)), atol=1e-6)
    assert 0.5 < np.mean(token == 1) < 0.75  # 0.5 / 0.8 = 0.625 of the draws



def test_categorical_is_bitwise_jax_random_categorical():
    # the sampler's Gumbel-max with a two-pass argmax draws exactly jax.random.categorical's tokens, including
    # rows with ties (first index wins), filtered (-inf) entries and one finite entry
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 37)).astype(np.float32) * 3
    logits[1] = 0.0  # every entry tied before the noise
    logits[2, :30] = -np.inf  # filtered
    logits[3, :] = -np.inf
    logits[3, 5] = 1.0  # only id 5 is possible
    keys = jax.random.split(jax.random.key(7), logits.shape[0])
    ours = np.asarray(jax.jit(categorical)(keys, jnp.asarray(logits)))
    reference = np.asarray(jax.vmap(jax.random.categorical)(keys, jnp.asarray(logits)))
    np.testing.assert_array_equal(ours, reference)
    assert ours[3] == 5 and (ours[2] >= 30)


@pytest.mark.parametrize("key, count, expected", [  # Random123's known-answer vectors for Threefry-2x32-20
    ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
])
def test_unrolled_threefry_matches_known_answers(key, count, expected):
    from exprl_jax.rollout.threefry_cpu import threefry2x32_unrolled, unroll_threefry_on_cpu

    u32 = lambda v: jnp.full((3,), v, jnp.uint32)  # noqa: E731
    direct = jax.jit(threefry2x32_unrolled)(*(u32(v) for v in (*key, *count)))
    unroll_threefry_on_cpu()  # and JAX's own primitive, now lowered by it on CPU
    lowered = jax.jit(jax.extend.random.threefry_2x32)(jnp.array(key, jnp.uint32), jnp.array(count, jnp.uint32))
    assert [int(x[0]) for x in direct] == list(expected)
    assert np.asarray(lowered).tolist() == list(expected)

# ---------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[1, 2]], {"temperature": -0.5}, "temperature"),
        ([[1, 2]], {"top_p": 0.0}, "top_p"),
        ([[1, 2]], {"top_p": 1.5}, "top_p"),
        ([[1, 2]], {"top_k": -1}, "top_k"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([], {}, "at least one token"),
        ([[1, 2], []], {}, "at least one token"),
        ([[1] * 2040], {"max_new_tokens": 16}, "max_position_embeddings"),
    ],
)
def test_bad_arguments_raise(params, prompts, kwargs, match):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(CFG, params, prompts, jax.random.PRNGKey(0), **kwargs)


def test_zero_num_samples_raises(params):
    with pytest.raises(ValueError, match="num_samples"):
        generate(CFG, params, [[1, 2]], jax.random.PRNGKey(0), max_new_tokens=2, num_samples=0)


def test_nan_temperature_raises(params):
    with pytest.raises(ValueError, match="temperature"):
        generate(CFG, params, [[1, 2]], jax.random.PRNGKey(0), max_new_tokens=2, temperature=float("nan"))
