"""The output head: chunked log-probs and entropies equal the unchunked ones, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from exprl_jax.methods import response_logprobs
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.head import head_matrix, logits_of, token_logprobs_entropy
from exprl_jax.models.transformer import forward_hidden

CFG = ModelConfig.tiny()


def _batch(rows=3, prompt=5, response=11, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (rows, prompt + response)).astype(np.int32)
    attention = np.ones_like(tokens)
    attention[0, :2] = 0  # left padding
    response_mask = np.ones((rows, response), np.float32)
    response_mask[1, 7:] = 0  # a short response
    attention[1, prompt + 7:] = 0
    return {"tokens": tokens, "attention_mask": attention, "response_mask": response_mask}


def test_head_matches_a_numpy_log_softmax():
    params = random_params(CFG, std=0.3)
    batch = _batch()
    hidden = forward_hidden(CFG, params, batch["tokens"], attention_mask=batch["attention_mask"])
    logits = np.asarray(logits_of(CFG, hidden, head_matrix(CFG, params)), np.float64) / 0.7
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets = batch["tokens"]
    want_lp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    want_entropy = -(np.exp(logp) * logp).sum(-1)
    lp, entropy = token_logprobs_entropy(CFG, hidden, head_matrix(CFG, params), targets, 0.7)
    np.testing.assert_allclose(np.asarray(lp), want_lp, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), want_entropy, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 32])  # 4 and 5 do not divide R = 11; 32 > R is unchunked
def test_chunked_head_equals_unchunked_values_and_gradients(chunk):
    params = random_params(CFG, std=0.3)
    batch = _batch()

    def loss(p, config):
        lp, entropy = response_logprobs(config, p, batch, 0.8)
        mask = batch["response_mask"]
        return jnp.sum(lp * mask) + 0.3 * jnp.sum(entropy * mask), (lp, entropy)

    (ref_loss, (ref_lp, ref_ent)), ref_grad = jax.jit(jax.value_and_grad(
        lambda p: loss(p, CFG), has_aux=True))(params)
    chunked = CFG.replace(logits_chunk=chunk)
    (got_loss, (lp, ent)), grad = jax.jit(jax.value_and_grad(lambda p: loss(p, chunked), has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ref_ent), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_chunked_head_never_materialises_all_logits():
    # V = 65536 over 2 x 128 positions: all logits are 64 MiB in fp32 (and the backward keeps more of that size);
    # a 16-position chunk is 8 MiB. The compiled temporaries must drop by more than one full set of logits.
    vocab = 65536
    params = jax.eval_shape(lambda: random_params(CFG.replace(vocab_size=vocab)))
    tokens = jax.ShapeDtypeStruct((2, 129), jnp.int32)
    batch = {"tokens": tokens, "attention_mask": tokens, "response_mask": jax.ShapeDtypeStruct((2, 128), jnp.float32)}

    def temp_bytes(config):
        grad_fn = jax.grad(lambda q, b: jnp.sum(response_logprobs(config, q, b, 1.0)[0]))
        return jax.jit(grad_fn).lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    full_bytes = 2 * 128 * vocab * 4
    unchunked = temp_bytes(CFG.replace(vocab_size=vocab))
    chunked = temp_bytes(CFG.replace(vocab_size=vocab, logits_chunk=16))
    assert unchunked > full_bytes
    assert chunked < unchunked - full_bytes
