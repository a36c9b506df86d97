"""The rollout engine's KV cache and its decode attention: one cache row ("slot") per sequence, every row at its own
length, so rows can finish and be refilled independently (continuous batching, exprl_jax/rollout/engine.py).

A slot holds its sequence from position 0 (the prompt left-aligned, then the generated tokens), so a token's cache
position is its RoPE position and the valid keys of a row are exactly [0, length). Two layouts, one per attention
implementation, both slot-major (one token's write is contiguous, so it stays in place inside the decode loop):

- `SlotCache` (the "jnp" blockwise attention, any backend): keys and values in head-major blocks [S, K, B, H] of
  B positions each: each (slot, kv head) is a contiguous [B, H] matrix, used by the attention einsums without a
  transpose, and a step reads only the blocks up to its longest row.
- `PagedSlotCache` (the Pallas TPU ragged paged-attention kernel): one array [S, L, 2K, H] with each kv head's key
  and value interleaved on the third axis; as pages of `PAGE_SIZE` positions this is the kernel's layout, whose
  block table is then just arange. Read by plain einsums, that layout costs strided copies and transposes every
  step (on XLA:CPU a decode step of the 4.2M bench model took ~2x as long), hence two layouts of the same bytes.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a masked score never makes a NaN
PAGE_SIZE = 128  # positions per page of the TPU kernel (its cache length is a multiple of it)
DECODE_IMPLS = ("auto", "jnp", "paged")


class SlotCache(NamedTuple):
    k: tuple[jax.Array, ...]  # blocks of [S, K, B, H]: block j holds positions [jB, (j+1)B) of every slot
    v: tuple[jax.Array, ...]
    # head-major: each (slot, kv head) of a block is a contiguous [B, H] matrix, which the attention einsums use as
    # is; one array per block, so a step reads the blocks its longest row reached, in place (a slice of one
    # [S, K, L, H] array would be a copy per step)
    AXES = ("activation_batch", "activation_kv_heads", "cache_length", None)

    @classmethod
    def zeros(cls, num_kv_heads: int, slots: int, length: int, head_dim: int, dtype, block: int) -> "SlotCache":
        if length % block:
            raise ValueError(f"SlotCache: cache length {length} is not a multiple of the block {block}")
        shape = (slots, num_kv_heads, block, head_dim)
        return cls(*(tuple(jnp.zeros(shape, dtype) for _ in range(length // block)) for _ in range(2)))

    @classmethod
    def from_arrays(cls, k_SKLH, v_SKLH, block: int) -> "SlotCache":
        """The blocks of whole [S, K, L, H] key and value arrays."""
        return cls(*(tuple(x[:, :, j:j + block] for j in range(0, x.shape[2], block)) for x in (k_SKLH, v_SKLH)))

    @property
    def block(self) -> int:
        return self.k[0].shape[2]

    def write(self, k_S1KH, v_S1KH, positions_S) -> "SlotCache":
        """Each slot's new key / value at its own position (one token per slot)."""
        slots = jnp.arange(k_S1KH.shape[0])
        B = self.block

        def put_token(blocks, new):
            out = []
            for j, x in enumerate(blocks):
                at = positions_S - j * B
                at = jnp.where((at >= 0) & (at < B), at, B)  # B: not in this block, dropped
                out.append(x.at[slots, :, at].set(new[:, 0].astype(x.dtype), mode="drop"))
            return tuple(out)

        return SlotCache(put_token(self.k, k_S1KH), put_token(self.v, v_S1KH))

    def put(self, slots_R, k_RPKH, v_RPKH) -> "SlotCache":
        """Prefilled rows' [R, P, K, H] keys / values at positions [0, P) of `slots_R` (an index >= S: dropped)."""
        P, B = k_RPKH.shape[1], self.block

        def put_prompt(blocks, new):
            new = new.transpose(0, 2, 1, 3)  # [R, K, P, H]
            return tuple(x if j * B >= P else x.at[slots_R, :, :min(P - j * B, B)].set(
                new[:, :, j * B:(j + 1) * B].astype(x.dtype), mode="drop") for j, x in enumerate(blocks))

        return SlotCache(put_prompt(self.k, k_RPKH), put_prompt(self.v, v_RPKH))


class PagedSlotCache(NamedTuple):
    kv: jax.Array  # [S, L, 2K, H]: slots, positions, (key, value) of each kv head, head dim
    AXES = ("activation_batch", "cache_length", "activation_kv_heads", None)

    @classmethod
    def zeros(cls, num_kv_heads: int, slots: int, length: int, head_dim: int, dtype,
              block: int = PAGE_SIZE) -> "PagedSlotCache":  # `block`: the kernel's pages are fixed (PAGE_SIZE)
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


MAX_CACHE_BLOCKS = 8  # the jnp layout's blocks per slot: each is one static branch of every decode step


def cache_block(length: int, block_kv: int) -> int:
    """Positions per block of a jnp-layout cache of `length` positions: the smallest multiple of 16 that divides
    `length`, is at least `block_kv` and leaves at most MAX_CACHE_BLOCKS blocks (`length` itself if none does)."""
    low = max(block_kv, -(-length // MAX_CACHE_BLOCKS))
    for block in range(-(-low // 16) * 16, length, 16):
        if length % block == 0:
            return block
    return length


def cache_length(impl: str, positions: int, block_kv: int = 16) -> int:
    """Positions per slot: whole pages for the TPU kernel; otherwise whole blocks of a multiple of 16 positions,
    at least `block_kv` and at most MAX_CACHE_BLOCKS of them."""
    if impl == "paged":
        return -(-positions // PAGE_SIZE) * PAGE_SIZE
    block = -(-max(block_kv, -(-positions // MAX_CACHE_BLOCKS)) // 16) * 16
    return -(-positions // block) * block


def decode_attention(q_S1NH, cache: SlotCache | PagedSlotCache, lengths_S):
    """One query per slot over its keys [0, lengths[s]) -> [S, 1, N, H]. Query head n uses kv head n // (N // K).

    The implementation follows the cache's layout. `SlotCache`: an online softmax over its blocks in plain jnp,
    skipping the blocks past the longest row's length (a fixed block grid, so a row's result does not depend on
    the other rows: a block of masked keys changes no running sum). `PagedSlotCache`: the Pallas TPU ragged
    paged-attention kernel, whose cost follows each row's own length."""
    if isinstance(cache, PagedSlotCache):
        return _paged(q_S1NH, cache, lengths_S)
    return _blockwise(q_S1NH, cache, lengths_S)


def _blockwise(q_S1NH, cache: SlotCache, lengths_S):
    S, _, N, H = q_S1NH.shape
    K, B = cache.k[0].shape[1], cache.block
    dt = q_S1NH.dtype
    q = q_S1NH[:, 0].reshape(S, K, N // K, H)  # [S, K, G, H]

    def block(j: int, state):
        m, l, acc = state
        mask = (j * B + jnp.arange(B))[None, :] < lengths_S[:, None]  # [S, B]
        s = jnp.einsum("SKGH,SKTH->SKGT", q, cache.k[j].astype(dt), preferred_element_type=jnp.float32) * H ** -0.5
        s = jnp.where(mask[:, None, None, :], s, _NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(jnp.where(mask[:, None, None, :], s - m_new[..., None], -jnp.inf))
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("SKGT,SKTH->SKGH", p.astype(dt), cache.v[j].astype(dt), preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    stats = jnp.full((S, K, N // K), _NEG_INF, jnp.float32)
    state = block(0, (stats, jnp.zeros_like(stats), jnp.zeros((S, K, N // K, H), jnp.float32)))
    longest = lengths_S.max()
    for j in range(1, len(cache.k)):  # blocks past the longest row are skipped, not read
        state = jax.lax.cond(j * B < longest, functools.partial(block, j), lambda st: st, state)
    m, l, acc = state
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
