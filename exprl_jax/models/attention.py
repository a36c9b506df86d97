"""Causal GQA attention over a (possibly left-padded, possibly cached) key sequence, behind one function `attend`.

Implementations: "xla" (materialised [T, S] scores, the reference), "chunked" (blockwise flash attention in plain
jnp with a custom VJP: no [T, S] buffer forward or backward, any backend, cost follows the filled cache length),
"splash" (the Pallas TPU kernel under shard_map), "cudnn" (`jax.nn.dot_product_attention` on GPU), "auto".
Splash and cudnn need the first query slot at trace time; decode steps (a traced cache index) use chunked.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from exprl_jax import sharding as shd

ATTENTION_IMPLS = ("auto", "xla", "chunked", "splash", "cudnn")
_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows (left padding) stay NaN-free
_LANES = 128  # splash needs its query and key blocks in multiples of the TPU lane width

# CPU rule of "auto", from `python benchmarks/attention.py` (fp32, B=2, N=8, K=2, H=64, blocks of 512, 2 shared
# cores; median of 7, the two implementations interleaved):
#   T = S              128    256    512    1024    2048
#   train xla ms       5.3     41    339    1927    9418     (forward + backward)
#   train chunked ms   5.6     58    365    1129    4422
#   chunked / xla     1.05   1.42   1.08    0.59    0.47     (three other runs: 0.8-1.5 up to 512, 0.4-0.6 above)
#   decode, S slots   0.82   1.01   0.79    1.09    0.60     (chunked / xla, one query at slot S/2)
# so chunked from T·S = 1024² on (it also keeps the memory O(T)), xla below. Measured before xla's head-major layout
# and split queries (1.3x, then another 1.15-1.25x at T = 256), which may move the crossover up: not remeasured.
_CPU_CHUNKED_MIN_TS = 1024 * 1024


def attend(q_BTNH, k_BSKH, v_BSKH, q_slots, kv_valid_BS, *, impl: str, block_q: int = 512, block_kv: int = 512,
           q_start: int | None = None):
    """Attention output [B, T, N, H] in q's dtype.

    Query t sits at cache slot q_slots[t] (int [T]); key slot s is visible to it iff s <= q_slots[t] and
    kv_valid[b, s]. Query head n uses kv head n // (N // K) (HF's repeat_kv order). Scores q·k·H^-0.5 and the
    softmax are fp32; probabilities are cast to q's dtype before the value product. A query with no visible key
    gets finite values (never NaN) and finite gradients. `q_start`, when known at trace time, must equal q_slots[0]
    with q_slots = q_start + arange(T) (the training forward and a prefill from slot 0); splash and cudnn need it and
    fall back to "chunked" without it (decode steps, whose cache index is traced).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {ATTENTION_IMPLS}")
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    if impl == "auto":
        impl = _auto_impl(shd.target_platform(), q_BTNH.dtype, T, S, q_BTNH.shape[-1], q_start)
    if impl in ("splash", "cudnn") and q_start is None:
        impl = "chunked"
    if impl == "xla":
        return xla_attention(q_BTNH, k_BSKH, v_BSKH, q_slots, kv_valid_BS, q_start=q_start)
    if impl == "chunked":
        return chunked_attention(q_BTNH, k_BSKH, v_BSKH, q_slots, kv_valid_BS, block_q=block_q, block_kv=block_kv)
    if impl == "splash":
        return splash_attention(q_BTNH, k_BSKH, v_BSKH, kv_valid_BS, q_start=q_start, block_q=block_q,
                                block_kv=block_kv)
    return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, q_slots, kv_valid_BS, q_start=q_start)


def _auto_impl(platform: str, dtype, T: int, S: int, H: int, q_start: int | None) -> str:
    if platform == "tpu":
        return "splash"
    if platform == "gpu":  # cuDNN flash attention: fp16/bf16 only, head dim a multiple of 8 up to 128, even lengths
        ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and H % 8 == 0 and H <= 128
        return "cudnn" if ok and q_start is not None and T % 2 == 0 and (q_start + T) % 2 == 0 else "chunked"
    return "chunked" if T * S >= _CPU_CHUNKED_MIN_TS else "xla"


def _visible(q_slots, kv_valid_BS, key_slots):
    """[B, T, S'] mask: key slot s visible to query t iff s <= q_slots[t] and the key is valid."""
    return (key_slots[None, :] <= q_slots[:, None])[None] & kv_valid_BS.astype(bool)[:, None, :]


# ---------------------------------------------------------------- xla: the materialised reference
def xla_attention(q_BTNH, k_BSKH, v_BSKH, q_slots, kv_valid_BS, *, q_start: int | None = None,
                  split_min_rows: int = 128):
    """Materialised attention. With a static `q_start` (q_slots = q_start + arange(T)) keys past the last query's
    slot are cut off (no query can see them), and from `split_min_rows` queries on the queries run as two halves,
    the first over the keys it can see: a causal training forward + backward at 16 x 256 tokens ran 1.15-1.25x
    faster on XLA:CPU. A query row with no visible key (padding) gets an arbitrary finite output either way."""
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    if q_start is None:
        return _dense_attention(q_BTNH, k_BSKH, v_BSKH, q_slots, kv_valid_BS)
    keys_seen = lambda last_query: min(S, q_start + last_query)  # noqa: E731
    halves = [(0, T // 2), (T // 2, T)] if T >= split_min_rows else [(0, T)]
    outs = [_dense_attention(q_BTNH[:, a:b], k_BSKH[:, :keys_seen(b)], v_BSKH[:, :keys_seen(b)], q_slots[a:b],
                             kv_valid_BS[:, :keys_seen(b)]) for a, b in halves]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _dense_attention(q_BTNH, k_BSKH, v_BSKH, q_slots, kv_valid_BS):
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K  # query heads per KV head
    dt = q_BTNH.dtype
    # Head-major operands, a KV head's G query heads stacked as G*T rows: both dots are then plain batched matmuls
    # over (B, K). Left to the einsum's own layouts, XLA:CPU transposed the scores and the output, and a training
    # forward + backward (16 x 256 tokens, 4 heads of 64) ran 1.3x slower.
    q = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    k = k_BSKH.astype(dt).transpose(0, 2, 1, 3)  # [B, K, S, H]
    v = v_BSKH.astype(dt).transpose(0, 2, 1, 3)
    scores = jnp.einsum("BKQH,BKSH->BKQS", q, k, preferred_element_type=jnp.float32) * (H ** -0.5)  # Q = G*T
    mask = jnp.tile(_visible(q_slots, kv_valid_BS, jnp.arange(S)), (1, G, 1))  # [B, G*T, S]
    scores = jnp.where(mask[:, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("BKQS,BKSH->BKQH", probs, v)  # [B, K, G*T, H]
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


# ---------------------------------------------------------------- chunked: flash attention in plain jnp
def chunked_attention(q_BTNH, k_BSKH, v_BSKH, q_slots, kv_valid_BS, *, block_q: int = 512, block_kv: int = 512):
    """Online-softmax attention over [block_q, block_kv] tiles. Key blocks past a query block's last slot are never
    visited (so a decode step costs the filled length, not S); the backward pass recomputes each tile (FA2)."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    bq, bk = min(block_q, T), min(block_kv, S)
    Tp = -(-T // bq) * bq  # queries are padded to whole blocks (cheap: T-sized); keys use a clamped last block
    dt = q_BTNH.dtype
    q = jnp.pad(q_BTNH.reshape(B, T, K, N // K, H), ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0)))
    slots = jnp.pad(jnp.asarray(q_slots, jnp.int32), (0, Tp - T), constant_values=-1)  # pad rows see nothing
    out = _flash(q, k_BSKH.astype(dt), v_BSKH.astype(dt), slots, kv_valid_BS.astype(jnp.int32), bq, bk)
    return out[:, :T].reshape(B, T, N, H)


def _kv_block(k, v, kv_valid, j, bk):
    """Key block j, clamped to end at S (the last block may overlap the one before; `fresh` marks its new keys)."""
    S = k.shape[1]
    start = jnp.minimum(j * bk, S - bk)
    key_slots = start + jnp.arange(bk)
    return (jax.lax.dynamic_slice_in_dim(k, start, bk, 1), jax.lax.dynamic_slice_in_dim(v, start, bk, 1),
            jax.lax.dynamic_slice_in_dim(kv_valid, start, bk, 1), key_slots, start, key_slots >= j * bk)


def _tile_mask(q_slots_blk, kv_valid_blk, key_slots, fresh):
    return (_visible(q_slots_blk, kv_valid_blk, key_slots) & fresh[None, None, :])[:, None, None]  # [B,1,1,bq,bk]


def _scores(q_blk, k_blk):  # [B, bq, K, G, H] x [B, bk, K, H] -> fp32 [B, K, G, bq, bk], scaled
    return jnp.einsum("BTKGH,BSKH->BKGTS", q_blk, k_blk, preferred_element_type=jnp.float32) * q_blk.shape[-1] ** -0.5


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, q_slots, kv_valid, bq, bk):
    return _flash_fwd(q, k, v, q_slots, kv_valid, bq, bk)[0]


def _flash_fwd(q, k, v, q_slots, kv_valid, bq, bk):
    B, Tp, K, G, H = q.shape
    nk = -(-k.shape[1] // bk)

    def q_block(i, carry):
        out, lse = carry
        q_blk = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, 1)
        slots = jax.lax.dynamic_slice_in_dim(q_slots, i * bq, bq)

        def kv_step(j, state):
            m, l, acc = state
            k_blk, v_blk, valid_blk, key_slots, _, fresh = _kv_block(k, v, kv_valid, j, bk)
            mask = _tile_mask(slots, valid_blk, key_slots, fresh)
            s = jnp.where(mask, _scores(q_blk, k_blk), _NEG_INF)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(jnp.where(mask, s - m_new[..., None], -jnp.inf))
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(q.dtype), v_blk, preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        stats = jnp.full((B, K, G, bq), _NEG_INF, jnp.float32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros((B, K, G, bq, H), jnp.float32))
        hi = jnp.clip(slots.max() // bk + 1, 0, nk)  # key blocks past the last visible slot are skipped
        m, l, acc = jax.lax.fori_loop(0, hi, kv_step, init)
        seen = l > 0  # a row with no visible key: output 0, lse 0 (finite; nothing valid reads it)
        o = (acc / jnp.where(seen, l, 1.0)[..., None]).astype(q.dtype).transpose(0, 3, 1, 2, 4)
        out = jax.lax.dynamic_update_slice_in_dim(out, o, i * bq, 1)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0),
                                                  i * bq, 3)
        return out, lse

    out, lse = jax.lax.fori_loop(0, Tp // bq, q_block,
                                 (jnp.zeros_like(q), jnp.zeros((B, K, G, Tp), jnp.float32)))
    return out, (q, k, v, q_slots, kv_valid, out, lse)


def _flash_bwd(bq, bk, res, dout):
    q, k, v, q_slots, kv_valid, out, lse = res
    B, Tp, K, _, H = q.shape
    S, nq = k.shape[1], Tp // bq
    nk = -(-S // bk)
    dt = q.dtype
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", dout.astype(jnp.float32), out.astype(jnp.float32))
    block_last_slot = q_slots.reshape(nq, bq).max(1)

    def kv_block(j, carry):  # outer loop over key blocks: dk, dv of block j; dq accumulated across blocks
        dq, dk, dv = carry
        k_blk, v_blk, valid_blk, key_slots, start, fresh = _kv_block(k, v, kv_valid, j, bk)

        def q_step(i, state):
            dq, dk_blk, dv_blk = state
            q_blk = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, 1)
            do_blk = jax.lax.dynamic_slice_in_dim(dout, i * bq, bq, 1).astype(dt)
            mask = _tile_mask(jax.lax.dynamic_slice_in_dim(q_slots, i * bq, bq), valid_blk, key_slots, fresh)
            lse_blk = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, 3)
            p = jnp.exp(jnp.where(mask, _scores(q_blk, k_blk) - lse_blk[..., None], -jnp.inf))
            dp = jnp.einsum("BTKGH,BSKH->BKGTS", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = (p * (dp - jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, 3)[..., None])) * H ** -0.5
            ds = ds.astype(dt)
            dv_blk = dv_blk + jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(dt), do_blk, preferred_element_type=jnp.float32)
            dk_blk = dk_blk + jnp.einsum("BKGTS,BTKGH->BSKH", ds, q_blk, preferred_element_type=jnp.float32)
            dq_blk = jnp.einsum("BKGTS,BSKH->BTKGH", ds, k_blk, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, 1) + dq_blk, i * bq, 1)
            return dq, dk_blk, dv_blk

        first = jnp.argmax(block_last_slot >= j * bk)  # query blocks wholly before this key block see none of it
        zeros = jnp.zeros((B, bk, K, H), jnp.float32)
        dq, dk_blk, dv_blk = jax.lax.fori_loop(first, nq, q_step, (dq, zeros, zeros))
        add = lambda acc, blk: jax.lax.dynamic_update_slice_in_dim(
            acc, jax.lax.dynamic_slice_in_dim(acc, start, bk, 1) + blk, start, 1)
        return dq, add(dk, dk_blk), add(dv, dv_blk)

    hi = jnp.clip(q_slots.max() // bk + 1, 0, nk)  # key blocks no query reaches get zero gradients
    zeros_kv = jnp.zeros(k.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, hi, kv_block, (jnp.zeros(q.shape, jnp.float32), zeros_kv, zeros_kv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------- splash: the Pallas TPU kernel
def splash_attention(q_BTNH, k_BSKH, v_BSKH, kv_valid_BS, *, q_start: int, block_q: int = 512,
                     block_kv: int = 512, interpret: bool | None = None):
    """Splash attention for queries at slots q_start + arange(T). Keys past q_start + T are cut off (never
    visible); both lengths are padded to whole blocks (multiples of 128), padded keys masked. Left padding and
    other invalid keys sit in segment 0, queries in segment 1, with a causal mask offset by q_start. Runs under
    shard_map on the active mesh (batch over data×fsdp, heads over tensor, as sharding.LOGICAL_RULES say); in
    Pallas interpret mode when compiling for CPU."""
    T, N, K = q_BTNH.shape[1], q_BTNH.shape[2], k_BSKH.shape[2]
    S = q_start + T
    if S > k_BSKH.shape[1]:
        raise ValueError(f"q_start={q_start} + T={T} exceeds the {k_BSKH.shape[1]} key slots")
    k, v, kv_valid = k_BSKH[:, :S], v_BSKH[:, :S], kv_valid_BS[:, :S].astype(jnp.int32)
    mesh = shd.active_mesh()
    interpret = shd.target_platform() == "cpu" if interpret is None else interpret
    bq = min(_round_up(block_q, _LANES), _round_up(T, _LANES))
    bk = min(_round_up(block_kv, _LANES), _round_up(S, _LANES))
    kernel_args = dict(q_start=q_start, group=N // K, bq=bq, bk=bk, interpret=interpret)
    if mesh is None:
        return _splash_local(q_BTNH, k, v, kv_valid, head_axes=None, **kernel_args)
    q_spec = shd.logical_to_spec(("activation_batch", None, "activation_heads", None), q_BTNH.shape, mesh)
    kv_spec = shd.logical_to_spec(("activation_batch", None, "activation_kv_heads", None), k.shape, mesh)
    # Query heads split over `tensor` while the KV heads are replicated (K not divisible): each shard picks the
    # KV heads its own query heads use.
    head_axes = q_spec[2] if q_spec[2] is not None and kv_spec[2] is None else None
    local = functools.partial(_splash_local, head_axes=head_axes, **kernel_args)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)),
                         out_specs=q_spec, check_vma=False)(q_BTNH, k, v, kv_valid)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _splash_local(q_BTNH, k_BSKH, v_BSKH, kv_valid_BS, *, head_axes, q_start, group, bq, bk, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, N, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    if head_axes is not None:  # this shard holds global query heads [first, first + N)
        first = jax.lax.axis_index(head_axes) * N
        if N % group == 0 or group % N == 0:  # its KV heads are contiguous
            count = -(-N // group)
            k_BSKH, v_BSKH = (jax.lax.dynamic_slice_in_dim(x, first // group, count, 2) for x in (k_BSKH, v_BSKH))
        else:  # one KV head per query head
            kv_heads = (first + jnp.arange(N)) // group
            k_BSKH, v_BSKH = (jnp.take(x, kv_heads, axis=2) for x in (k_BSKH, v_BSKH))
    Tp, Sp = _round_up(T, bq), _round_up(S, bk)
    dt = q_BTNH.dtype
    q = (q_BTNH.astype(jnp.float32) * H ** -0.5).astype(dt)  # the kernel does not scale
    q = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))  # [B, N, Tp, H]
    k, v = (jnp.pad(x.astype(dt).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
            for x in (k_BSKH, v_BSKH))  # [B, K, Sp, H]
    segments = sk.SegmentIds(q=jnp.ones((B, Tp), jnp.int32), kv=jnp.pad(kv_valid_BS, ((0, 0), (0, Sp - S))))
    mask = sm.MultiHeadMask([sm.CausalMask((Tp, Sp), offset=q_start)] * N)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    out = jax.vmap(kernel)(q, k, v, segment_ids=segments)  # [B, N, Tp, H]
    return out[:, :, :T].transpose(0, 2, 1, 3)


# ---------------------------------------------------------------- cudnn: jax.nn.dot_product_attention on GPU
def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, q_slots, kv_valid_BS, *, q_start: int, implementation="cudnn"):
    """cuDNN flash attention for queries at slots q_start + arange(T). Keys past q_start + T are cut off; left
    padding and causality go in as an explicit [B, 1, T, S] mask (cuDNN's own padding masks are right-padding
    only), which JAX turns into an additive bias: B·T·S elements per layer call, unlike the kernel itself.
    `implementation="xla"` runs the same call on any backend."""
    T, H = q_BTNH.shape[1], q_BTNH.shape[-1]
    S = q_start + T
    dt = q_BTNH.dtype
    platform = shd.target_platform()
    if implementation == "cudnn" and platform != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs a GPU; this program is compiled for {platform}")
    if implementation == "cudnn" and jnp.dtype(dt) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"attention_impl='cudnn' needs ModelConfig.dtype bfloat16 or float16, got {jnp.dtype(dt)}; "
                         "use 'chunked' or 'auto' for float32")
    mask = _visible(q_slots, kv_valid_BS[:, :S], jnp.arange(S))[:, None]  # [B, 1, T, S]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH[:, :S].astype(dt), v_BSKH[:, :S].astype(dt), mask=mask,
                                        scale=H ** -0.5, is_causal=q_start == 0, implementation=implementation)
