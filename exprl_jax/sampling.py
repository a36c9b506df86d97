"""Sampling's public face: `generate` (n samples per prompt, rows prompt-major) and its `SampleOutput`.

`generate` runs the continuous-batching engine of rollout/engine.py. `generate_fixed_batch` is the fixed-batch
sampler it replaced (one prefill over left-padded prompts, then a `lax.while_loop` of single-token steps over a
[P + max_new_tokens] cache per row), kept as a reference and a benchmark baseline; both draw the same random streams.
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
from exprl_jax.rollout.tokens import SamplingParams, row_keys, sample_token


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    tokens: jax.Array  # [N, max_new_tokens] int32, pad_id after the end
    logprobs: jax.Array  # [N, max_new_tokens] float32, log-prob under the sampling distribution, 0 after the end
    lengths: jax.Array  # [N] int32, generated tokens including a sampled EOS
    truncated: jax.Array  # [N] bool, max_new_tokens ran out before any EOS
    slot_utilisation: float = 1.0  # share of decode slot-steps spent on a live row (the rest is waste)

    def to_numpy(self) -> "SampleOutput":
        arrays = (np.asarray(jax.device_get(x)) for x in (self.tokens, self.logprobs, self.lengths, self.truncated))
        return SampleOutput(*arrays, slot_utilisation=self.slot_utilisation)


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


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_p", "top_k",
                                             "eos_ids", "pad_id", "mesh"))
def _generate_fixed_batch(params, prompt_NP, prompt_mask_NP, rng, *, config: ModelConfig, max_new_tokens: int,
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
                                             logits_at=-1)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    rows = jnp.arange(N, dtype=jnp.int32)

    def body(carry):
        i, caches, last_logits, kv_valid, next_pos, done, lengths, rng, out_tok, out_lp = carry
        token, logp = sample_token(row_keys(rng, rows, jnp.full((N,), i)), last_logits, temperature, top_p, top_k)
        token = jnp.where(done, pad_id, token)
        logp = jnp.where(done, 0.0, logp)
        out_tok = jax.lax.dynamic_update_slice_in_dim(out_tok, token[:, None], i, axis=1)
        out_lp = jax.lax.dynamic_update_slice_in_dim(out_lp, logp[:, None], i, axis=1)
        kv_valid = jax.lax.dynamic_update_slice_in_dim(kv_valid, (~done).astype(jnp.int32)[:, None], P + i, axis=1)
        logits, caches = forward_with_cache(config, params, token[:, None], next_pos[:, None], caches, P + i,
                                            kv_valid, logits_at=0)
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


def _check(config, max_new_tokens, num_samples, temperature, top_p, top_k, width):
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if num_samples < 1:
        raise ValueError(f"generate: num_samples={num_samples} must be >= 1")
    if not temperature >= 0 or not 0.0 < top_p <= 1.0 or top_k < 0 or top_k > config.vocab_size:
        raise ValueError(f"generate: bad sampling parameters temperature={temperature} top_p={top_p} top_k={top_k}")
    if width + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"generate: prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={config.max_position_embeddings}")


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], rng: jax.Array, *, max_new_tokens: int,
             num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_ids: Sequence[int] = (), pad_id: int = 0, mesh=None, prompt_multiple: int = PROMPT_MULTIPLE,
             max_concurrent_rows: int = 0) -> SampleOutput:
    """Samples `num_samples` continuations of each prompt (token-id lists of any lengths). Rows are prompt-major.

    Runs on the continuous-batching engine (rollout/engine.py): at most `max_concurrent_rows` rows hold cache
    slots at a time (0 = all rows at once); a finished row's slot is refilled with the next waiting row. A row's
    tokens and log-probs depend only on the params, its prompt, `rng` and its index, never on
    `max_concurrent_rows`, the schedule or the device count. With a mesh, slots are split over data×fsdp (any
    count: padding slots are never used) and params keep their shardings."""
    from exprl_jax.rollout.engine import Engine

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    width = -(-max(len(p) for p in prompts) // prompt_multiple) * prompt_multiple
    _check(config, max_new_tokens, num_samples, temperature, top_p, top_k, width)
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    sampling = SamplingParams(float(temperature), float(top_p), int(top_k), tuple(int(e) for e in eos_ids),
                              int(pad_id))
    engine = Engine(config, max_new_tokens=max_new_tokens, sampling=sampling,
                    slots=min(max_concurrent_rows or len(rows), len(rows)), mesh=mesh)
    tokens, logprobs, lengths, truncated, utilisation = engine.run(params, rows, rng, prompt_width=width)
    return SampleOutput(tokens, logprobs, lengths, truncated, slot_utilisation=utilisation)


def generate_fixed_batch(config: ModelConfig, params, prompts: Sequence[Sequence[int]], rng: jax.Array, *,
                         max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                         top_k: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0, mesh=None,
                         prompt_multiple: int = PROMPT_MULTIPLE) -> SampleOutput:
    """The fixed-batch sampler the engine replaced (kept as a reference and for benchmarks): every row holds a
    [P + max_new_tokens] cache until the longest row ends, and every step attends over the whole cache. Same
    contract and the same random streams as `generate`."""
    tokens, mask = pad_prompts(prompts, pad_id, prompt_multiple)
    _check(config, max_new_tokens, num_samples, temperature, top_p, top_k, tokens.shape[1])
    tokens, mask = np.repeat(tokens, num_samples, axis=0), np.repeat(mask, num_samples, axis=0)
    kwargs = dict(config=config, max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                  top_k=int(top_k), eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))
    if mesh is None:
        out = _generate_fixed_batch(params, jnp.asarray(tokens), jnp.asarray(mask), rng, mesh=None, **kwargs)
    else:  # rows padded (copies of the last one) to a multiple of data×fsdp, and sliced off the outputs
        rows = len(tokens)
        extra = round_up(rows, batch_shards(mesh)) - rows
        tokens, mask = (np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) for x in (tokens, mask))
        batch = shd.shard_batch({"tokens": tokens, "mask": mask}, mesh)
        out = [x[:rows] for x in _generate_fixed_batch(params, batch["tokens"], batch["mask"], rng, mesh=mesh,
                                                       **kwargs)]
    return SampleOutput(*out)
