"""The output head: hidden states -> temperature-scaled log-probs of given tokens and entropies, in float32.

With `ModelConfig.logits_chunk` > 0 the vocabulary projection runs over chunks of sequence positions (each chunk
covers every row, so every data shard works on every chunk) under `jax.checkpoint`: the backward pass recomputes
one chunk's logits at a time, and [rows, positions, V] logits exist neither forward nor backward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from exprl_jax.models.config import ModelConfig
from exprl_jax.models.matmul import project
from exprl_jax.sharding import constrain


def head_matrix(config: ModelConfig, params) -> jax.Array:
    """The [D, V] output projection: the transposed embedding when tied, else `lm_head`."""
    return params["embed"].T if config.tie_embeddings else params["lm_head"]


def logits_of(config: ModelConfig, hidden_BTD, head_DV) -> jax.Array:
    """float32 logits [B, T, V] (2-D matmul: see transformer.Attention)."""
    B, T, D = hidden_BTD.shape
    logits = project(hidden_BTD.reshape(B * T, D), head_DV.astype(config.jnp_dtype),
                     preferred_element_type=jnp.float32).reshape(B, T, -1)
    return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))


def _logprobs_entropy(config, hidden_BTD, head_DV, targets_BT, temperature):
    logits = logits_of(config, hidden_BTD, head_DV) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
    # H = -sum p log p; log p is finite wherever p > 0 (logits are finite here), so no 0 * -inf
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return token_logp, entropy


def token_logprobs_entropy(config: ModelConfig, hidden_BTD, head_DV, targets_BT, temperature: float = 1.0):
    """(log softmax(logits / temperature) at targets, entropy of that distribution), both float32 [B, T].

    `hidden_BTD` are final-norm hidden states whose next tokens are `targets_BT`."""
    chunk = config.logits_chunk
    T = hidden_BTD.shape[1]
    if chunk <= 0 or chunk >= T:
        return _logprobs_entropy(config, hidden_BTD, head_DV, targets_BT, temperature)
    pad = -T % chunk  # pad positions to a whole number of chunks; their results are sliced off
    hidden = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    n = (T + pad) // chunk
    B, D = hidden.shape[0], hidden.shape[2]
    hidden_CBcD = jnp.moveaxis(hidden.reshape(B, n, chunk, D), 1, 0)  # [chunks, B, chunk, D]
    targets_CBc = jnp.moveaxis(targets.reshape(B, n, chunk), 1, 0)

    @jax.checkpoint
    def one_chunk(h, t):
        return _logprobs_entropy(config, h, head_DV, t, temperature)

    _, (logp, entropy) = jax.lax.scan(lambda c, xs: (c, one_chunk(*xs)), None, (hidden_CBcD, targets_CBc))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, n * chunk)[:, :T]  # noqa: E731
    return unchunk(logp), unchunk(entropy)
