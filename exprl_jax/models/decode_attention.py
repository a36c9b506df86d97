"""The rollout engine's KV cache and its decode attention: one cache row ("slot") per sequence, every row at its own
length, so rows can finish and be refilled independently (continuous batching, exprl_jax/rollout/engine.py).

A slot holds its sequence from position 0 (the prompt left-aligned, then the generated tokens), so a token's cache
position is its RoPE position and the valid keys of a row are exactly [0, length). Two layouts, one per attention
implementation, both slot-major (one token's write is contiguous, so it stays in place inside the decode loop):

- `SlotCache` (the "jnp" blockwise attention, any backend): keys and values in two head-major arrays [S, K, L, H]:
  each (slot, kv head) is a contiguous [L, H] matrix, used by the attention einsums without a transpose.
- `PagedSlotCache` (the Pallas TPU ragged paged-attention kernel): one array [S, L, 2K, H] with each kv head's key
  and value interleaved on the third axis; as pages of `PAGE_SIZE` positions this is the kernel's layout, whose
  block table is then just arange. Read by plain einsums, that layout costs strided copies and transposes every
  step (on XLA:CPU a decode step of the 4.2M bench model took ~2x as long), hence two layouts of the same bytes.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a masked score never makes a NaN
PAGE_SIZE = 128  # positions per page of the TPU kernel (its cache length is a multiple of it)
DECODE_IMPLS = ("auto", "jnp", "paged")


class SlotCache(NamedTuple):
    k: jax.Array  # [S, K, L, H]: slots, kv heads, positions, head dim
    v: jax.Array  # [S, K, L, H]
    # head-major: each (slot, kv head) is a contiguous [L, H] matrix, which the attention einsums use as is
    AXES = ("activation_batch", "activation_kv_heads", "cache_length", None)

    @classmethod
    def zeros(cls, num_kv_heads: int, slots: int, length: int, head_dim: int, dtype) -> "SlotCache":
        shape = (slots, num_kv_heads, length, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, k_S1KH, v_S1KH, positions_S) -> "SlotCache":
        """Each slot's new key / value at its own position (one token per slot)."""
        slots = jnp.arange(k_S1KH.shape[0])
        return SlotCache(*(x.at[slots, :, positions_S].set(new[:, 0].astype(x.dtype), mode="drop")
                           for x, new in ((self.k, k_S1KH), (self.v, v_S1KH))))

    def put(self, slots_R, k_RPKH, v_RPKH) -> "SlotCache":
        """Prefilled rows' [R, P, K, H] keys / values at positions [0, P) of `slots_R` (an index >= S: dropped)."""
        P = k_RPKH.shape[1]
        return SlotCache(*(x.at[slots_R, :, :P].set(new.transpose(0, 2, 1, 3).astype(x.dtype), mode="drop")
                           for x, new in ((self.k, k_RPKH), (self.v, v_RPKH))))


class PagedSlotCache(NamedTuple):
    kv: jax.Array  # [S, L, 2K, H]: slots, positions, (key, value) of each kv head, head dim
    AXES = ("activation_batch", "cache_length", "activation_kv_heads", None)

    @classmethod
    def zeros(cls, num_kv_heads: int, slots: int, length: int, head_dim: int, dtype) -> "PagedSlotCache":
        return cls(jnp.zeros((slots, length, 2 * num_kv_heads, head_dim), dtype))

    @staticmethod
    def interleave(k_BTKH, v_BTKH):
        """[B, T, K, H] keys and values -> [B, T, 2K, H] with head h's key at 2h and value at 2h + 1."""
        B, T, K, H = k_BTKH.shape
        return jnp.stack([k_BTKH, v_BTKH], axis=3).reshape(B, T, 2 * K, H)

    def write(self, k_S1KH, v_S1KH, positions_S) -> "PagedSlotCache":
        new = self.interleave(k_S1KH, v_S1KH)[:, 0].astype(self.kv.dtype)  # [S, 2K, H]
        return PagedSlotCache(self.kv.at[jnp.arange(new.shape[0]), positions_S].set(new, mode="drop"))

    def put(self, slots_R, k_RPKH, v_RPKH) -> "PagedSlotCache":
        P = k_RPKH.shape[1]
        new = self.interleave(k_RPKH, v_RPKH).astype(self.kv.dtype)
        return PagedSlotCache(self.kv.at[slots_R, :P].set(new, mode="drop"))


def resolve_impl(impl: str, head_dim: int, platform: str) -> str:
    """"auto" -> "paged" on TPU when the head dim is a multiple of 128 (the kernel tiles it by the 128-wide
    lanes), else "jnp"."""
    if impl not in DECODE_IMPLS:
        raise ValueError(f"decode attention impl {impl!r} is not one of {DECODE_IMPLS}")
    if impl == "auto":
        return "paged" if platform == "tpu" and head_dim % 128 == 0 else "jnp"
    return impl


def cache_type(impl: str):
    """The cache layout of a resolved implementation."""
    return PagedSlotCache if impl == "paged" else SlotCache


def cache_length(impl: str, positions: int) -> int:
    """Positions per slot: whole pages for the TPU kernel, a multiple of 16 otherwise."""
    multiple = PAGE_SIZE if impl == "paged" else 16
    return -(-positions // multiple) * multiple


def decode_attention(q_S1NH, cache: SlotCache | PagedSlotCache, lengths_S, *, block_kv: int = 512):
    """One query per slot over its keys [0, lengths[s]) -> [S, 1, N, H]. Query head n uses kv head n // (N // K).

    The implementation follows the cache's layout. `SlotCache`: blocks of `block_kv` positions in plain jnp, up to
    the longest row's length (a fixed block grid, so a row's result does not depend on the other rows: a block of
    masked keys changes no running sum). `PagedSlotCache`: the Pallas TPU ragged paged-attention kernel, whose cost
    follows each row's own length."""
    if isinstance(cache, PagedSlotCache):
        return _paged(q_S1NH, cache, lengths_S)
    return _blockwise(q_S1NH, cache, lengths_S, block_kv)


def _blockwise(q_S1NH, cache: SlotCache, lengths_S, block_kv: int):
    S, _, N, H = q_S1NH.shape
    K, L = cache.k.shape[1], cache.k.shape[2]
    bk = min(block_kv, L)
    nk = -(-L // bk)
    dt = q_S1NH.dtype
    q = q_S1NH[:, 0].reshape(S, K, N // K, H)  # [S, K, G, H]

    def block(j, state):
        m, l, acc = state
        start = jnp.minimum(j * bk, L - bk)  # the last block is clamped to end at L; `fresh` drops its overlap
        if nk == 1:  # the block is the whole cache: read it in place (a dynamic slice of it is a copy per step)
            k_blk, v_blk = cache.k.astype(dt), cache.v.astype(dt)
        else:
            k_blk = jax.lax.dynamic_slice_in_dim(cache.k, start, bk, 2).astype(dt)  # [S, K, bk, H]
            v_blk = jax.lax.dynamic_slice_in_dim(cache.v, start, bk, 2).astype(dt)
        pos = start + jnp.arange(bk)
        mask = (pos[None, :] < lengths_S[:, None]) & (pos >= j * bk)[None, :]  # [S, bk]
        s = jnp.einsum("SKGH,SKTH->SKGT", q, k_blk, preferred_element_type=jnp.float32) * H ** -0.5
        s = jnp.where(mask[:, None, None, :], s, _NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(jnp.where(mask[:, None, None, :], s - m_new[..., None], -jnp.inf))
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("SKGT,SKTH->SKGH", p.astype(dt), v_blk, preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    stats = jnp.full((S, K, N // K), _NEG_INF, jnp.float32)
    state = (stats, jnp.zeros_like(stats), jnp.zeros((S, K, N // K, H), jnp.float32))
    if nk == 1:  # one block, no loop: the same arithmetic (a block of masked keys changes no running sum)
        m, l, acc = block(0, state)
    else:
        hi = jnp.clip(-(-lengths_S.max() // bk), 0, nk)  # blocks past the longest row are never visited
        m, l, acc = jax.lax.fori_loop(0, hi, block, state)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.astype(dt).reshape(S, 1, N, H)


def _paged(q_S1NH, cache: PagedSlotCache, lengths_S, kernel=None):
    """The Pallas TPU ragged paged-attention kernel: slot s owns pages [s·P, (s+1)·P) of its shard, one query each.
    `kernel` replaces it (e.g. JAX's `ref_ragged_paged_attention`, to check these arguments off a TPU: the kernel
    has no CPU interpret mode)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    from exprl_jax import sharding as shd

    def local(q, kv, lengths):
        S, L, C, H = kv.shape
        pages = L // PAGE_SIZE
        table = np.arange(S * pages, dtype=np.int32).reshape(S, pages)  # static: slot s owns its own pages
        args = (q[:, 0], kv.reshape(S * pages, PAGE_SIZE, C, H), lengths.astype(jnp.int32), table,
                np.arange(S + 1, dtype=np.int32), np.full((1,), S, np.int32))
        if kernel is not None:
            out = kernel(*args, sm_scale=H ** -0.5)
        else:
            out = ragged_paged_attention(*args, sm_scale=H ** -0.5, num_kv_pages_per_block=min(pages, 8),
                                         num_queries_per_block=min(S, 8))
        return out[:, None].astype(q.dtype)

    mesh = shd.active_mesh()
    if mesh is None:
        return local(q_S1NH, cache.kv, lengths_S)
    from jax.sharding import PartitionSpec as P

    rows = shd.logical_to_spec(("activation_batch",), (q_S1NH.shape[0],), mesh)[0]
    heads = shd.logical_to_spec(("activation_kv_heads",), (cache.kv.shape[2] // 2,), mesh)[0]
    q_heads = shd.logical_to_spec(("activation_heads",), (q_S1NH.shape[2],), mesh)[0] if heads else None
    return jax.shard_map(local, mesh=mesh, in_specs=(P(rows, None, q_heads, None), P(rows, None, heads, None),
                                                     P(rows)),
                         out_specs=P(rows, None, q_heads, None), check_vma=False)(q_S1NH, cache.kv, lengths_S)
