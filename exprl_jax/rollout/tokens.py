"""Choosing the next token: temperature, top-k / top-p filtering, and per-row random streams.

The noise for token t of row i comes from fold_in(fold_in(rng, i), t), so a row samples the same tokens whatever
else shares its batch, in whichever order rows are scheduled and on however many devices.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from exprl_jax.rollout.threefry_cpu import unroll_threefry_on_cpu


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0


def filter_logits(logits_NV, top_p: float, top_k: int):
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


def sample_token(keys_N, logits_NV, temperature: float, top_p: float, top_k: int):
    """Returns (token [N], logprob [N]) with one key per row. The log-prob is that of the temperature-scaled,
    *unfiltered* distribution, the one the trainer recomputes (with top_p=1, top_k=0 it is exactly the sampling
    distribution). Greedy (temperature 0) reports the log-prob at temperature 1."""
    unroll_threefry_on_cpu()  # before this step is lowered: the same streams, ~2x faster noise on CPU
    if temperature == 0.0:
        token = jnp.argmax(logits_NV, axis=-1)
        scaled = logits_NV
    else:
        scaled = logits_NV / temperature
        filtered = filter_logits(scaled, top_p, top_k)
        token = categorical(keys_N, filtered)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def categorical(keys_N, logits_NV):
    """One draw per row, bitwise `jax.random.categorical(key, row)` (Gumbel-max: the first index of the largest
    logits + Gumbel noise), with the argmax as a max and a min over indices: XLA:CPU runs a (value, index) argmax
    as a scalar loop, ~2x this sampler's cost at the bench shape."""
    V = logits_NV.shape[-1]
    noisy = logits_NV + jax.vmap(lambda key: jax.random.gumbel(key, (V,), logits_NV.dtype))(keys_N)
    is_max = noisy == noisy.max(axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def row_keys(rng, rows_N, steps_N):
    """The key of token `steps[n]` of row `rows[n]`."""
    return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(rng, r), t))(rows_N, steps_N)


def sample_rows(rng, rows_N, steps_N, logits_NV, sampling: SamplingParams):
    """(token, logprob) [N] for rows `rows_N` at response indices `steps_N`."""
    return sample_token(row_keys(rng, rows_N, steps_N), logits_NV, sampling.temperature, sampling.top_p,
                        sampling.top_k)
