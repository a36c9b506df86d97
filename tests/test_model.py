"""The decoder: published preset shapes, config validation, and the invariances the trainer relies on (left padding,
causality, teacher-forced log-probs, dtypes, which parameters exist)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exprl_jax.models import ModelConfig, forward, init_params, token_logprobs
from exprl_jax.models.transformer import logprobs_of, positions_from_mask
from conftest import random_params

CFG = ModelConfig.tiny()
# Jitted once per config (a frozen, hashable dataclass); eager Flax dispatch is much slower on 2 shared cores.
_forward = jax.jit(forward, static_argnums=0)
_token_logprobs = jax.jit(token_logprobs, static_argnums=0, static_argnames="temperature")


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


def _tokens(seed, shape, vocab=CFG.vocab_size):
    return np.random.default_rng(seed).integers(1, vocab, size=shape).astype(np.int32)


def _log_softmax_np(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------- presets, as published in each config.json
@pytest.mark.parametrize(
    "preset, dims",
    [
        # (d_model, layers, heads, kv heads, head_dim, mlp, vocab, tied)
        ("qwen3_0_6b", (1024, 28, 16, 8, 128, 3072, 151936, True)),
        ("qwen3_1_7b", (2048, 28, 16, 8, 128, 6144, 151936, True)),
        ("qwen3_4b", (2560, 36, 32, 8, 128, 9728, 151936, True)),
        ("qwen3_8b", (4096, 36, 32, 8, 128, 12288, 151936, False)),
    ],
)
def test_preset_dimensions(preset, dims):
    c = getattr(ModelConfig, preset)()
    got = (c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size,
           c.tie_embeddings)
    assert got == dims
    assert (c.family, c.qk_norm, c.qkv_bias, c.o_bias) == ("qwen3", True, False, False)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (1_000_000.0, 1e-6, 40_960)


# Per layer: attention D·H·(2N + 2K) (q, k, v, o), MLP 3·D·F, norms 2·D + 2·H (q_norm, k_norm); plus the embedding
# V·D (twice when untied) and the final norm D.
#   0.6B: 1024·128·48 = 6,291,456 + 3·1024·3072 = 9,437,184 + 2,304 = 15,730,944 per layer; ×28 = 440,466,432;
#         + 151936·1024 = 155,582,464 + 1024 → 596,049,920.
#   1.7B: 2048·128·48 = 12,582,912 + 37,748,736 + 4,352 = 50,336,000; ×28 = 1,409,408,000; + 311,164,928 + 2048
#         → 1,720,574,976 (2.03B if the tied lm_head is counted a second time, as HF's safetensors listing does).
#   4B:   2560·128·80 = 26,214,400 + 74,711,040 + 5,376 = 100,930,816; ×36 = 3,633,509,376; + 388,956,160 + 2560
#         → 4,022,468,096.
#   8B:   4096·128·80 = 41,943,040 + 150,994,944 + 8,448 = 192,946,432; ×36 = 6,946,071,552; + 2·622,329,856 + 4096
#         → 8,190,735,360.
# Published (Qwen3 model cards): total 0.6B / 1.7B / 4.0B / 8.2B; non-embedding 0.44B / 1.4B / 3.6B / 6.95B.
@pytest.mark.parametrize(
    "preset, expected, published_total, published_non_embedding",
    [
        ("qwen3_0_6b", 596_049_920, 0.6e9, 0.44e9),
        ("qwen3_1_7b", 1_720_574_976, 1.7e9, 1.4e9),
        ("qwen3_4b", 4_022_468_096, 4.0e9, 3.6e9),
        ("qwen3_8b", 8_190_735_360, 8.2e9, 6.95e9),
    ],
)
def test_preset_num_params(preset, expected, published_total, published_non_embedding):
    c = getattr(ModelConfig, preset)()
    n = c.num_params()
    assert n == expected
    assert abs(n - published_total) <= 0.10 * published_total
    non_embedding = n - c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    assert abs(non_embedding - published_non_embedding) <= 0.02 * published_non_embedding


def _count(p):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"qk_norm": False}])
def test_num_params_counts_every_initialised_parameter(overrides):
    cfg = ModelConfig.tiny(**overrides)
    shapes = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
    assert _count(shapes) == cfg.num_params()


def test_num_params_counts_attention_biases():
    cfg = ModelConfig.tiny(qkv_bias=True, o_bias=True)
    shapes = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
    # tiny: 131,456 without biases; + 2 layers · ((8 + 2·4)·16 + 64) = 640 → 132,096.
    assert _count(shapes) == 132_096
    assert cfg.num_params() == 132_096


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"family": "gpt2"}, "family"),
        ({"num_heads": 8, "num_kv_heads": 3}, "num_kv_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"dtype": "float64"}, "dtype"),
        ({"param_dtype": "int8"}, "param_dtype"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.tiny(**overrides)


def test_config_rejects_zero_kv_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.tiny(num_kv_heads=0)


def test_hf_config_round_trip():
    cfg = ModelConfig.qwen3_8b()
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    hf = {**ModelConfig.tiny().to_hf_config(), "model_type": "qwen2"}
    qwen2 = ModelConfig.from_hf_config(hf)
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == (True, False, False)


# ---------------------------------------------------------------- forward
def test_forward_shape_and_dtype(params):
    logits = _forward(CFG, params, _tokens(0, (2, 6)))
    assert logits.shape == (2, 6, CFG.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_left_padding_does_not_change_real_logits(params):
    short, long = _tokens(1, (4,)), _tokens(2, (6,))
    alone = np.asarray(_forward(CFG, params, short[None]))[0]  # [4, V]
    pad = 9  # a real vocabulary id in the padding slots, so only the mask can hide it
    batch = np.stack([np.concatenate([np.full(2, pad, np.int32), short]), long])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], np.int32)
    padded = np.asarray(_forward(CFG, params, batch, attention_mask=mask))
    np.testing.assert_allclose(padded[0, 2:], alone, atol=1e-5, rtol=0)
    assert np.all(np.isfinite(padded))  # fully masked pad rows stay NaN-free
    # The check has teeth: without the mask the pad tokens leak into the real positions.
    unmasked = np.asarray(_forward(CFG, params, batch))
    assert np.max(np.abs(unmasked[0, 2:] - alone)) > 1e-3


def test_positions_from_left_padding_mask():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], np.int32)
    # position = real tokens before this one; pad slots get 0
    expected = [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    assert np.asarray(positions_from_mask(jnp.asarray(mask))).tolist() == expected


def test_explicit_positions_equal_default(params):
    tokens = _tokens(3, (2, 6))
    default = np.asarray(_forward(CFG, params, tokens))
    explicit = np.asarray(_forward(CFG, params, tokens, positions=np.tile(np.arange(6, dtype=np.int32), (2, 1))))
    np.testing.assert_allclose(explicit, default, atol=1e-6, rtol=0)
    stretched = np.asarray(_forward(CFG, params, tokens, positions=np.tile(np.arange(0, 12, 2, np.int32), (2, 1))))
    assert np.max(np.abs(stretched - default)) > 1e-3  # positions are actually used


def test_causal(params):
    tokens = _tokens(4, (2, 6))
    changed = tokens.copy()
    changed[:, 4] = (tokens[:, 4] + 1) % CFG.vocab_size
    a, b = np.asarray(_forward(CFG, params, tokens)), np.asarray(_forward(CFG, params, changed))
    np.testing.assert_allclose(b[:, :4], a[:, :4], atol=1e-6, rtol=0)
    assert np.max(np.abs(b[:, 4:] - a[:, 4:])) > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_token_logprobs_match_log_softmax_of_forward(params, temperature):
    tokens = _tokens(5, (2, 6))
    mask = np.array([[0, 1, 1, 1, 1, 1], [1] * 6], np.int32)
    logits = np.asarray(_forward(CFG, params, tokens, attention_mask=mask))
    logp = _log_softmax_np(logits[:, :-1] / temperature)
    expected = np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # entry t scores tokens[:, t+1]
    got = np.asarray(_token_logprobs(CFG, params, tokens, attention_mask=mask, temperature=temperature))
    assert got.shape == (2, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logprobs_of(logits[:, :-1], tokens[:, 1:], temperature)), expected,
                               atol=1e-5, rtol=0)
    at_t1 = np.take_along_axis(_log_softmax_np(logits[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
    if temperature != 1.0:  # the temperature must matter by far more than the tolerance
        assert np.max(np.abs(at_t1 - expected)) > 1e-3


# ---------------------------------------------------------------- dtypes
def test_bf16_compute_returns_fp32_logits_close_to_fp32(params):
    cfg16 = ModelConfig.tiny(dtype="bfloat16")
    tokens = _tokens(6, (2, 6))
    ref = np.asarray(_forward(CFG, params, tokens))
    got = _forward(cfg16, params, tokens)
    assert got.dtype == jnp.float32
    got = np.asarray(got)
    assert np.all(np.isfinite(got))
    # bf16 keeps ~3 significant digits; logits here are O(0.1-1)
    np.testing.assert_allclose(got, ref, atol=5e-2, rtol=0)
    assert np.mean(np.abs(got - ref)) < 1e-2
    assert np.max(np.abs(got - ref)) > 1e-4  # the activations really were computed in bf16


def test_bf16_params_are_stored_as_bf16():
    cfg16 = ModelConfig.tiny(param_dtype="bfloat16")
    shapes = jax.eval_shape(lambda r: init_params(cfg16, r), jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    p = random_params(cfg16)
    logits = _forward(cfg16, p, _tokens(0, (2, 6)))
    assert logits.dtype == jnp.float32


# ---------------------------------------------------------------- which parameters exist
def test_tied_embeddings_have_no_lm_head(params):
    assert "lm_head" in params and params["lm_head"].shape == (CFG.d_model, CFG.vocab_size)
    tied_cfg = ModelConfig.tiny(tie_embeddings=True)
    tied = random_params(tied_cfg)
    assert "lm_head" not in tied
    # Tied logits are the final hidden state times embed.T: changing the embedding of one id moves its logit.
    tokens = _tokens(7, (2, 6))
    bumped = {**tied, "embed": tied["embed"].at[3].add(1.0)}
    a, b = np.asarray(_forward(tied_cfg, tied, tokens)), np.asarray(_forward(tied_cfg, bumped, tokens))
    changed_vocab = np.nonzero(np.abs(b - a).max(axis=(0, 1)) > 1e-4)[0]
    assert 3 in changed_vocab


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("o_bias", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_optional_attention_parameters(qkv_bias, o_bias, qk_norm):
    cfg = ModelConfig.tiny(qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm)
    shapes = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
    for layer in range(cfg.num_layers):
        attn = shapes[f"layers_{layer}"]["attn"]
        expected = {"q_proj", "k_proj", "v_proj", "o_proj"}
        if qkv_bias:
            expected |= {"q_bias", "k_bias", "v_bias"}
        if o_bias:
            expected |= {"o_bias"}
        if qk_norm:
            expected |= {"q_norm", "k_norm"}
        assert set(attn) == expected
        if qkv_bias:
            assert (attn["q_bias"].shape, attn["k_bias"].shape, attn["v_bias"].shape) == ((8, 16), (4, 16), (4, 16))
        if o_bias:
            assert attn["o_bias"].shape == (64,)
        if qk_norm:
            assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (16,)


def test_attention_biases_are_used(params):
    cfg = ModelConfig.tiny(qkv_bias=True, o_bias=True)
    p = random_params(cfg)
    tokens = _tokens(8, (2, 6))
    base = np.asarray(_forward(cfg, p, tokens))
    for name in ("q_bias", "k_bias", "v_bias", "o_bias"):
        attn = dict(p["layers_0"]["attn"])
        attn[name] = attn[name] + 0.5 * jnp.arange(attn[name].size, dtype=jnp.float32).reshape(attn[name].shape) / \
            attn[name].size
        moved = {**p, "layers_0": {**p["layers_0"], "attn": attn}}
        assert np.max(np.abs(np.asarray(_forward(cfg, moved, tokens)) - base)) > 1e-4, name
