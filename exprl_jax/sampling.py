"""Jitted batched generation with a preallocated KV cache: left-padded prompts, n samples per prompt (groups).

One prefill over the padded prompts, then a `lax.while_loop` of single-token steps that stops early once every
row has emitted an EOS. Rows are prompt-major: all samples of prompt 0, then prompt 1, ...
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exprl_jax import sharding as shd
from exprl_jax.batching import batch_shards, round_up
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.transformer import forward_with_cache, init_cache, positions_from_mask


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    tokens: jax.Array  # [N, max_new_tokens] int32, pad_id after the end
    logprobs: jax.Array  # [N, max_new_tokens] float32, log-prob under the sampling distribution, 0 after the end
    lengths: jax.Array  # [N] int32, generated tokens including a sampled EOS
    truncated: jax.Array  # [N] bool, max_new_tokens ran out before any EOS

    def to_numpy(self) -> "SampleOutput":
        return SampleOutput(*(np.asarray(jax.device_get(x)) for x in dataclasses.astuple(self)))


PROMPT_MULTIPLE = 16  # prompt widths are rounded up to this (fewer recompiles)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int,
                multiple: int = PROMPT_MULTIPLE) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a common length rounded up to `multiple` (fewer recompiles).
    Returns tokens [B, P] int32 and mask [B, P] int32."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    return tokens, mask


def _filter_logits(logits_NV, top_p: float, top_k: int):
    """Top-k then top-p (nucleus) truncation; removed entries get -inf."""
    if top_k > 0:
        kth = jax.lax.top_k(logits_NV, top_k)[0][:, -1:]
        logits_NV = jnp.where(logits_NV < kth, -jnp.inf, logits_NV)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits_NV, axis=-1)[:, ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p: a token is dropped if the mass before it already does
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits_NV = jnp.where(logits_NV < cutoff, -jnp.inf, logits_NV)
    return logits_NV


def sample_token(rng, logits_NV, temperature: float, top_p: float, top_k: int):
    """Returns (token [N], logprob [N]). The log-prob is that of the temperature-scaled, *unfiltered* distribution,
    the one the trainer recomputes (with top_p=1, top_k=0 it is exactly the sampling distribution). Greedy
    (temperature 0) reports the log-prob at temperature 1."""
    if temperature == 0.0:
        token = jnp.argmax(logits_NV, axis=-1)
        scaled = logits_NV
    else:
        scaled = logits_NV / temperature
        token = jax.random.categorical(rng, _filter_logits(scaled, top_p, top_k), axis=-1)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_p", "top_k",
                                             "eos_ids", "pad_id", "mesh"))
def _generate(params, prompt_NP, prompt_mask_NP, rng, *, config: ModelConfig, max_new_tokens: int,
              temperature: float, top_p: float, top_k: int, eos_ids: tuple[int, ...], pad_id: int, mesh):
    with shd.use_mesh(mesh):  # mesh is static, so the trace cache never mixes sharded and unsharded traces
        return _generate_traced(params, prompt_NP, prompt_mask_NP, rng, config, max_new_tokens, temperature,
                                top_p, top_k, eos_ids, pad_id)


def _generate_traced(params, prompt_NP, prompt_mask_NP, rng, config, max_new_tokens, temperature, top_p, top_k,
                     eos_ids, pad_id):
    N, P = prompt_NP.shape
    S = P + max_new_tokens
    caches = init_cache(config, N, S)
    caches = jax.tree.map(lambda c: shd.constrain(c, ("activation_batch", "cache_length",
                                                       "activation_kv_heads", None)), caches)
    kv_valid = jnp.concatenate([prompt_mask_NP, jnp.zeros((N, max_new_tokens), jnp.int32)], axis=1)
    positions = positions_from_mask(prompt_mask_NP)
    last_logits, caches = forward_with_cache(config, params, prompt_NP, positions, caches, 0, kv_valid,
                                             last_only=True)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def body(carry):
        i, caches, last_logits, kv_valid, next_pos, done, lengths, rng, out_tok, out_lp = carry
        rng, step_rng = jax.random.split(rng)
        token, logp = sample_token(step_rng, last_logits, temperature, top_p, top_k)
        token = jnp.where(done, pad_id, token)
        logp = jnp.where(done, 0.0, logp)
        out_tok = jax.lax.dynamic_update_slice_in_dim(out_tok, token[:, None], i, axis=1)
        out_lp = jax.lax.dynamic_update_slice_in_dim(out_lp, logp[:, None], i, axis=1)
        kv_valid = jax.lax.dynamic_update_slice_in_dim(kv_valid, (~done).astype(jnp.int32)[:, None], P + i, axis=1)
        logits, caches = forward_with_cache(config, params, token[:, None], next_pos[:, None], caches, P + i,
                                            kv_valid, last_only=True)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos)
        return i + 1, caches, logits, kv_valid, next_pos + 1, done, lengths, rng, out_tok, out_lp

    def cond(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[5])

    init = (jnp.int32(0), caches, last_logits, kv_valid, positions[:, -1] + 1, jnp.zeros((N,), bool),
            jnp.zeros((N,), jnp.int32), rng, jnp.full((N, max_new_tokens), pad_id, jnp.int32),
            jnp.zeros((N, max_new_tokens), jnp.float32))
    _, _, _, _, _, done, lengths, _, out_tok, out_lp = jax.lax.while_loop(cond, body, init)
    return out_tok, out_lp, lengths, ~done


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], rng: jax.Array, *, max_new_tokens: int,
             num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_ids: Sequence[int] = (), pad_id: int = 0, mesh=None,
             prompt_multiple: int = PROMPT_MULTIPLE) -> SampleOutput:
    """Samples `num_samples` continuations of each prompt (token-id lists of any lengths). Rows are prompt-major.
    With a mesh, rows are split over data×fsdp (any count: padded rows are dropped) and params keep their
    shardings."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if num_samples < 1:
        raise ValueError(f"generate: num_samples={num_samples} must be >= 1")
    if not temperature >= 0 or not 0.0 < top_p <= 1.0 or top_k < 0 or top_k > config.vocab_size:
        raise ValueError(f"generate: bad sampling parameters temperature={temperature} top_p={top_p} top_k={top_k}")
    tokens, mask = pad_prompts(prompts, pad_id, prompt_multiple)
    tokens, mask = np.repeat(tokens, num_samples, axis=0), np.repeat(mask, num_samples, axis=0)
    if tokens.shape[1] + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"generate: prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={config.max_position_embeddings}")
    kwargs = dict(config=config, max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                  top_k=int(top_k), eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))
    if mesh is None:
        out = _generate(params, jnp.asarray(tokens), jnp.asarray(mask), rng, mesh=None, **kwargs)
    else:  # rows padded (copies of the last one) to a multiple of data×fsdp, and sliced off the outputs
        rows = len(tokens)
        extra = round_up(rows, batch_shards(mesh)) - rows
        tokens, mask = (np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) for x in (tokens, mask))
        batch = shd.shard_batch({"tokens": tokens, "mask": mask}, mesh)
        out = [x[:rows] for x in _generate(params, batch["tokens"], batch["mask"], rng, mesh=mesh, **kwargs)]
    return SampleOutput(*out)
