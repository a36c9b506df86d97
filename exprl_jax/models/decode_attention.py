"""The rollout engine's KV cache and its decode attention: one cache row ("slot") per sequence, every row at its own
length, so rows can finish and be refilled independently (continuous batching, exprl_jax/rollout/engine.py).

A slot holds its sequence from slot position 0 (the prompt left-aligned, then the generated tokens), so a token's
cache position is its RoPE position and the valid keys of a row are exactly [0, length). Layout [K, slots, L, H]:
each slot is a run of pages of the TPU paged-attention kernel, whose block table is then just arange.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a masked score never makes a NaN


class SlotCache(NamedTuple):
    k: jax.Array  # [K, S, L, H]: kv heads, slots, positions, head dim
    v: jax.Array  # [K, S, L, H]

    @classmethod
    def zeros(cls, num_kv_heads: int, slots: int, length: int, head_dim: int, dtype) -> "SlotCache":
        shape = (num_kv_heads, slots, length, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, k_S1KH, v_S1KH, positions_S) -> "SlotCache":
        """Each slot's new key / value at its own position (one token per slot)."""
        slots = jnp.arange(k_S1KH.shape[0])
        def put(cache, new):  # cache [K, S, L, H] <- new [S, 1, K, H] at (·, s, positions[s], ·)
            return cache.at[:, slots, positions_S].set(new[:, 0].transpose(1, 0, 2).astype(cache.dtype),
                                                       mode="drop")
        return SlotCache(put(self.k, k_S1KH), put(self.v, v_S1KH))


def decode_attention(q_S1NH, cache: SlotCache, lengths_S, *, block_kv: int = 512, impl: str = "auto"):
    """One query per slot over its keys [0, lengths[s]) -> [S, 1, N, H]. Query head n uses kv head n // (N // K).

    "jnp" (any backend): blocks of `block_kv` positions, up to the longest row's length (a fixed block grid, so a
    row's result does not depend on the other rows: a block of masked keys changes no running sum). "paged": the
    Pallas TPU paged-attention kernel, whose cost follows each row's own length. "auto": paged on TPU when the head
    dim is a multiple of 128, else jnp."""
    if impl == "auto":  # the kernel tiles the head dim by the 128-wide TPU lanes
        from exprl_jax.models.attention import _platform

        impl = "paged" if _platform() == "tpu" and q_S1NH.shape[-1] % 128 == 0 else "jnp"
    if impl == "paged":
        return _paged(q_S1NH, cache, lengths_S)
    return _blockwise(q_S1NH, cache, lengths_S, block_kv)


def _blockwise(q_S1NH, cache: SlotCache, lengths_S, block_kv: int):
    S, _, N, H = q_S1NH.shape
    K, L = cache.k.shape[0], cache.k.shape[2]
    bk = min(block_kv, L)
    nk = -(-L // bk)
    dt = q_S1NH.dtype
    q = q_S1NH[:, 0].reshape(S, K, N // K, H)  # [S, K, G, H]

    def block(j, state):
        m, l, acc = state
        start = jnp.minimum(j * bk, L - bk)  # the last block is clamped to end at L; `fresh` drops its overlap
        k_blk = jax.lax.dynamic_slice_in_dim(cache.k, start, bk, 2).astype(dt)  # [K, S, bk, H]
        v_blk = jax.lax.dynamic_slice_in_dim(cache.v, start, bk, 2).astype(dt)
        pos = start + jnp.arange(bk)
        mask = (pos[None, :] < lengths_S[:, None]) & (pos >= j * bk)[None, :]  # [S, bk]
        s = jnp.einsum("SKGH,KSTH->SKGT", q, k_blk, preferred_element_type=jnp.float32) * H ** -0.5
        s = jnp.where(mask[:, None, None, :], s, _NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(jnp.where(mask[:, None, None, :], s - m_new[..., None], -jnp.inf))
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("SKGT,KSTH->SKGH", p.astype(dt), v_blk, preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    stats = jnp.full((S, K, N // K), _NEG_INF, jnp.float32)
    hi = jnp.clip(-(-lengths_S.max() // bk), 0, nk)  # blocks past the longest row are never visited
    m, l, acc = jax.lax.fori_loop(0, hi, block, (stats, jnp.zeros_like(stats), jnp.zeros((S, K, N // K, H),
                                                                                          jnp.float32)))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.astype(dt).reshape(S, 1, N, H)


PAGE_SIZE = 128  # positions per page of the TPU kernel (the cache length is a multiple of it)


def _paged(q_S1NH, cache: SlotCache, lengths_S):
    """The Pallas TPU paged-attention kernel: slot s owns pages [s·P, (s+1)·P) of its shard."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    from exprl_jax import sharding as shd

    def local(q, k, v, lengths):
        K, S, L, H = k.shape
        pages = L // PAGE_SIZE
        k_pages, v_pages = (x.reshape(K, S * pages, PAGE_SIZE, H) for x in (k, v))
        table = jnp.arange(S * pages, dtype=jnp.int32).reshape(S, pages)
        scaled = (q[:, 0].astype(jnp.float32) * H ** -0.5).astype(q.dtype)  # the kernel does not scale
        out = paged_attention(scaled, k_pages, v_pages, lengths.astype(jnp.int32), table,
                              pages_per_compute_block=min(pages, 4))
        return out[:, None]

    mesh = shd.active_mesh()
    if mesh is None:
        return local(q_S1NH, cache.k, cache.v, lengths_S)
    from jax.sharding import PartitionSpec as P

    rows = shd.logical_to_spec(("activation_batch",), (q_S1NH.shape[0],), mesh)[0]
    heads = shd.logical_to_spec(("activation_kv_heads",), (cache.k.shape[0],), mesh)[0]
    q_heads = shd.logical_to_spec(("activation_heads",), (q_S1NH.shape[2],), mesh)[0] if heads else None
    return jax.shard_map(local, mesh=mesh, in_specs=(P(rows, None, q_heads, None), P(heads, rows, None, None),
                                                     P(heads, rows, None, None), P(rows)),
                         out_specs=P(rows, None, q_heads, None), check_vma=False)(q_S1NH, cache.k, cache.v, lengths_S)
