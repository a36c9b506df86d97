"""The decoder (Qwen3 / Qwen2 / Llama): Flax Linen modules plus pure functions over a plain params pytree.

`forward` is the teacher-forced pass; `forward_with_cache` runs a chunk of tokens against a preallocated KV cache
(prefill and decode). Both return float32 logits. Every parameter carries logical axis names (see sharding.py).
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from exprl_jax.models.attention import attend
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.decode_attention import PagedSlotCache, SlotCache, decode_attention
from exprl_jax.models.head import head_matrix, logits_of, token_logprobs_entropy
from exprl_jax.models.matmul import project
from exprl_jax.sharding import active_mesh, constrain, logical_to_spec


class LayerCache(NamedTuple):
    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]


def _param(module: nn.Module, name: str, init, shape, axes, cfg: ModelConfig):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.jnp_param_dtype)


class RMSNorm(nn.Module):
    cfg: ModelConfig
    axis: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis,), self.cfg)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        # HF casts back to the input dtype before the scale; identical in fp32, matches bf16 rounding otherwise.
        return scale.astype(self.cfg.jnp_dtype) * normed.astype(self.cfg.jnp_dtype)


def rope_angles(positions, head_dim: int, theta: float):
    """(cos, sin) float32 [B, T, 1, H/2] of the rotary embedding at int positions [B, T]: traced once per forward
    and shared by every layer's q and k. XLA may still fuse them into each consumer: the compiled CPU train step
    evaluates them in every q and k rope fusion, forward and backward (sincosf: 2.5% of its CPU samples; an
    optimisation barrier does not stop it, XLA:CPU removes barriers before fusion)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / head_dim))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rope(x, rotary):
    """Rotary embedding, HF's rotate-half layout. x [B, T, N, H], rotary = rope_angles(positions, H, theta)."""
    cos, sin = rotary
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, rotary, key_valid, q_slots, cache: LayerCache | None, cache_index):
        cfg = self.cfg
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializers.normal(0.02)
        wq = _param(self, "q_proj", init, (D, N, H), ("embed", "q_heads", "head_dim"), cfg)
        wk = _param(self, "k_proj", init, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        wv = _param(self, "v_proj", init, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        wo = _param(self, "o_proj", init, (N, H, D), ("q_heads", "head_dim", "embed"), cfg)
        dt = cfg.jnp_dtype
        B, T = x.shape[:2]
        x_MD = x.reshape(B * T, D)  # 2-D projections: XLA:CPU's weight gradients are ~2x slower over (B, T)
        q = project(x_MD, wq.astype(dt)).reshape(B, T, N, H)
        k = project(x_MD, wk.astype(dt)).reshape(B, T, K, H)
        v = project(x_MD, wv.astype(dt)).reshape(B, T, K, H)
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", zeros, (N, H), ("q_heads", "head_dim"), cfg).astype(dt)
            k = k + _param(self, "k_bias", zeros, (K, H), ("kv_heads", "head_dim"), cfg).astype(dt)
            v = v + _param(self, "v_bias", zeros, (K, H), ("kv_heads", "head_dim"), cfg).astype(dt)
        if cfg.qk_norm:
            q = RMSNorm(cfg, axis="head_dim", name="q_norm")(q)
            k = RMSNorm(cfg, axis="head_dim", name="k_norm")(k)
        q = rope(q, rotary)
        k = rope(k, rotary)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))

        if isinstance(cache, (SlotCache, PagedSlotCache)):  # rollout engine: one token per slot at its own position
            cache = cache.write(k, v, positions[:, 0])
            out = decode_attention(q, cache, positions[:, 0] + 1)
            return self._output(out.reshape(B * T, N, H), wo, B, T), cache
        if cache is not None:  # write this chunk at [cache_index, cache_index + T), attend over the whole cache
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache_index, axis=1)
            cache = LayerCache(k, v)
        static_start = cache_index if isinstance(cache_index, (int, np.integer)) else None  # q_slots[0]
        out = attend(q, k, v, q_slots, key_valid, impl=cfg.attention_impl, block_q=cfg.attention_block_q,
                     block_kv=cfg.attention_block_kv, q_start=static_start).reshape(B * T, N, H)
        return self._output(out, wo, B, T), cache

    def _output(self, out_MNH, wo, B, T):
        cfg = self.cfg
        # a plain 2-D matmul over flattened heads: with the 3-D weight, XLA:CPU chose a layout that transposed
        # o_proj on every call (inside the decode loop: a full copy of it per layer per generated token)
        M, N, H = out_MNH.shape
        out = project(out_MNH.reshape(M, N * H), wo.astype(cfg.jnp_dtype).reshape(N * H, cfg.d_model)).reshape(
            B, T, cfg.d_model)
        if cfg.o_bias:
            out = out + _param(self, "o_bias", nn.initializers.zeros, (cfg.d_model,), ("embed",),
                               cfg).astype(cfg.jnp_dtype)
        return out


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        init = nn.initializers.normal(0.02)
        dt = cfg.jnp_dtype
        gate = _param(self, "gate_proj", init, (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), cfg)
        up = _param(self, "up_proj", init, (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), cfg)
        down = _param(self, "down_proj", init, (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), cfg)
        B, T, D = x.shape
        x_MD = x.reshape(B * T, D)  # 2-D matmuls: see Attention
        h = jax.nn.silu(project(x_MD, gate.astype(dt))) * project(x_MD, up.astype(dt))  # SwiGLU
        h = constrain(h, ("activation_batch", "activation_mlp"))
        return project(h, down.astype(dt)).reshape(B, T, D)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, rotary, key_valid, q_slots, cache=None, cache_index=0):
        attn_out, cache = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="input_norm")(x), positions, rotary, key_valid, q_slots, cache, cache_index)
        x = x + checkpoint_name(attn_out, "attn_out")
        x = x + checkpoint_name(MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attn_norm")(x)), "mlp_out")
        return constrain(x, ("activation_batch", "activation_length", "activation_embed")), cache


def _remat_policy(name: str):
    policies = jax.checkpoint_policies
    return {"full": policies.nothing_saveable, "dots": policies.checkpoint_dots,
            "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
            "proj": policies.save_only_these_names("attn_out", "mlp_out")}[name]


def _block_class(cfg: ModelConfig):
    if cfg.remat == "none":
        return Block
    # prevent_cse only matters outside scan (inside, the loop already keeps XLA from merging the recomputation)
    return nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, key_valid, q_slots, caches=None, cache_index=0, *, hidden_only=False):
        """Logits float32 [B, T, V] (or final-norm hidden states [B, T, D] with `hidden_only`), and the caches."""
        cfg = self.cfg
        embedding = _param(self, "embed", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model),
                           ("vocab", "embed"), cfg)
        x = embed_lookup(embedding.astype(cfg.jnp_dtype), tokens)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        block = _block_class(cfg)
        rotary = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        if cfg.scan_layers:
            if caches is not None:
                raise ValueError("scan_layers: the cache forward runs on unstacked layers (forward_with_cache)")
            scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * 4, length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, name="layers")(x, positions, rotary, key_valid, q_slots)
            new_caches = None
        else:
            new_caches = []
            for i in range(cfg.num_layers):
                layer = block(cfg, name=f"layers_{i}")
                if caches is None:  # cache_index stays a Python int: remat would trace it (and splash needs it)
                    x, _ = layer(x, positions, rotary, key_valid, q_slots)
                else:
                    x, layer_cache = layer(x, positions, rotary, key_valid, q_slots, caches[i], cache_index)
                    new_caches.append(layer_cache)
            new_caches = None if caches is None else tuple(new_caches)
        x = RMSNorm(cfg, name="final_norm")(x)
        if not cfg.tie_embeddings:
            head = _param(self, "lm_head", nn.initializers.normal(0.02), (cfg.d_model, cfg.vocab_size),
                          ("embed", "vocab"), cfg)
        if hidden_only:
            return x, new_caches
        return logits_of(cfg, x, embedding.T if cfg.tie_embeddings else head), new_caches


def embed_lookup(table_VD, tokens_BT):
    """Rows of the embedding table [V, D] for tokens [B, T]. With the vocabulary split over a mesh axis, each shard
    looks up the tokens in its own range and a sum over that axis assembles the rows, so the [V, D] table is never
    gathered whole (a plain gather from a vocab-split table makes XLA rebuild it on every chip)."""
    mesh = active_mesh()
    vocab_axis = None if mesh is None else logical_to_spec(("vocab", "embed"), table_VD.shape, mesh)[0]
    if vocab_axis is None:
        return jnp.take(constrain(table_VD, (None, None)), tokens_BT, axis=0)
    rows = logical_to_spec(("activation_batch", "activation_length"), tokens_BT.shape, mesh)

    def local(table, ids):
        n = table.shape[0]
        local_ids = ids - jax.lax.axis_index(vocab_axis) * n
        hit = (local_ids >= 0) & (local_ids < n)
        found = jnp.take(table, jnp.clip(local_ids, 0, n - 1), axis=0)
        return jax.lax.psum(jnp.where(hit[..., None], found, jnp.zeros_like(found)), vocab_axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(vocab_axis, None), rows), out_specs=P(*rows, None),
                         check_vma=False)(table_VD, tokens_BT)


# ---- pure functions over a plain params pytree ----
def _dummy_inputs(batch: int = 1, length: int = 1):
    tokens = jnp.zeros((batch, length), jnp.int32)
    return tokens, tokens, jnp.ones((batch, length), jnp.int32), jnp.arange(length)


def init_boxed(config: ModelConfig, rng: jax.Array):
    """Params with their logical axis names (`nn.LogicallyPartitioned` leaves); see `sharding.param_shardings`."""
    return Transformer(config).init(rng, *_dummy_inputs())["params"]


def init_params(config: ModelConfig, rng: jax.Array):
    """A plain params pytree (nested dicts of arrays), randomly initialised."""
    return nn.unbox(init_boxed(config, rng))


def positions_from_mask(attention_mask):
    """Left padding: position = number of real tokens before this one (pad slots get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def _full_masks(tokens, attention_mask, positions):
    tokens = jnp.asarray(tokens, jnp.int32)
    attention_mask = jnp.ones(tokens.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask,
                                                                                                  jnp.int32)
    return tokens, attention_mask, positions_from_mask(attention_mask) if positions is None else positions


def forward(config: ModelConfig, params, tokens, *, attention_mask=None, positions=None):
    """Teacher-forced logits, float32 [B, T, V]. tokens int32 [B, T]; attention_mask 1/0 [B, T] (left padding)."""
    tokens, attention_mask, positions = _full_masks(tokens, attention_mask, positions)
    logits, _ = Transformer(config).apply(
        {"params": params}, tokens, positions, attention_mask, jnp.arange(tokens.shape[1]))
    return logits


def forward_hidden(config: ModelConfig, params, tokens, *, attention_mask=None, positions=None):
    """Final-norm hidden states [B, T, D] (compute dtype): `forward` without the vocabulary projection, for the
    chunked head (models/head.py)."""
    tokens, attention_mask, positions = _full_masks(tokens, attention_mask, positions)
    hidden, _ = Transformer(config).apply(
        {"params": params}, tokens, positions, attention_mask, jnp.arange(tokens.shape[1]), hidden_only=True)
    return hidden


# ---- layer layouts: "layers_{i}" subtrees (unrolled) <-> one "layers" subtree stacked on axis 0 (scan_layers) ----
def stack_layers(params, num_layers: int):
    """Unrolled params -> the scan_layers layout (a new tree; arrays are stacked)."""
    layers = [params[f"layers_{i}"] for i in range(num_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(params, num_layers: int):
    """scan_layers params -> the unrolled layout (slices of the stacked arrays)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out


def decode_layout(config: ModelConfig, params):
    """(config, params) for the cache forward: unrolled layers (per-layer caches stay in place in the decode
    loop's carry; see ENV_NOTES) and no rematerialisation (nothing is differentiated)."""
    if config.scan_layers:
        params = unstack_layers(params, config.num_layers)
    return config.replace(scan_layers=False, remat="none"), params


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> tuple[LayerCache, ...]:
    """Zeroed KV cache: per layer k, v [B, S, K, H] in the compute dtype (tuple of layers, see ENV_NOTES)."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.jnp_dtype
    return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


def forward_with_cache(config: ModelConfig, params, tokens, positions, caches, cache_index, kv_valid, *,
                       logits_at=None):
    """Runs tokens [B, T] against `caches`. With per-layer `LayerCache`s they sit at cache slots
    [cache_index, cache_index + T) and `kv_valid` [B, S] marks real tokens in the cache *including* this chunk;
    with `SlotCache`s or `PagedSlotCache`s (the rollout engine, T = 1) each row's token sits at its own position and `cache_index` /
    `kv_valid` are unused. Returns (float32 logits [B, T, V], or [B, V] at position `logits_at` (an int or one
    index per row) when given, and the updated caches)."""
    config, params = decode_layout(config, params)
    q_slots = cache_index + jnp.arange(tokens.shape[1])
    hidden, caches = Transformer(config).apply(
        {"params": params}, tokens, positions, kv_valid, q_slots, caches, cache_index, hidden_only=True)
    if logits_at is not None:
        index = jnp.broadcast_to(jnp.asarray(logits_at, jnp.int32) % tokens.shape[1], tokens.shape[:1])
        hidden = jnp.take_along_axis(hidden, index[:, None, None], axis=1)  # [B, 1, D]
    logits = logits_of(config, hidden, head_matrix(config, params))
    return (logits if logits_at is None else logits[:, 0]), caches


def token_logprobs(config: ModelConfig, params, tokens, *, attention_mask=None, temperature: float = 1.0):
    """Teacher-forced log-prob of each next token, float32 [B, T-1]: entry t scores tokens[:, t+1].

    `temperature` scales the logits exactly as the sampler does, so new / old / reference log-probs all come from
    the distribution that was sampled (SPEC §5; a mismatch breaks the importance ratio). Chunked over positions
    when `config.logits_chunk` > 0."""
    hidden = forward_hidden(config, params, tokens, attention_mask=attention_mask)[:, :-1]
    logp, _ = token_logprobs_entropy(config, hidden, head_matrix(config, params),
                                     jnp.asarray(tokens, jnp.int32)[:, 1:], temperature)
    return logp


def logprobs_of(logits_BTV, targets_BT, temperature: float = 1.0):
    """log softmax(logits / temperature) gathered at targets, float32."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
