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

from exprl_jax.models.attention import attend
from exprl_jax.models.config import ModelConfig
from exprl_jax.sharding import constrain


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


def rope(x, positions, theta: float):
    """Rotary embedding, HF's rotate-half layout. x [B, T, N, H], positions [B, T] int."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, key_valid, q_slots, cache: LayerCache | None, cache_index):
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
        q = jnp.einsum("MD,DNH->MNH", x_MD, wq.astype(dt)).reshape(B, T, N, H)
        k = jnp.einsum("MD,DKH->MKH", x_MD, wk.astype(dt)).reshape(B, T, K, H)
        v = jnp.einsum("MD,DKH->MKH", x_MD, wv.astype(dt)).reshape(B, T, K, H)
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", zeros, (N, H), ("q_heads", "head_dim"), cfg).astype(dt)
            k = k + _param(self, "k_bias", zeros, (K, H), ("kv_heads", "head_dim"), cfg).astype(dt)
            v = v + _param(self, "v_bias", zeros, (K, H), ("kv_heads", "head_dim"), cfg).astype(dt)
        if cfg.qk_norm:
            q = RMSNorm(cfg, axis="head_dim", name="q_norm")(q)
            k = RMSNorm(cfg, axis="head_dim", name="k_norm")(k)
        q = rope(q, positions, cfg.rope_theta)
        k = rope(k, positions, cfg.rope_theta)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))

        if cache is not None:  # write this chunk at [cache_index, cache_index + T), attend over the whole cache
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache_index, axis=1)
            cache = LayerCache(k, v)
        static_start = cache_index if isinstance(cache_index, (int, np.integer)) else None  # q_slots[0]
        out = attend(q, k, v, q_slots, key_valid, impl=cfg.attention_impl, block_q=cfg.attention_block_q,
                     block_kv=cfg.attention_block_kv, q_start=static_start).reshape(B * T, N, H)
        out = jnp.einsum("MNH,NHD->MD", out, wo.astype(dt)).reshape(B, T, D)
        if cfg.o_bias:
            out = out + _param(self, "o_bias", nn.initializers.zeros, (D,), ("embed",), cfg).astype(dt)
        return out, cache


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
        h = jax.nn.silu(x_MD @ gate.astype(dt)) * (x_MD @ up.astype(dt))  # SwiGLU
        h = constrain(h, ("activation_batch", "activation_mlp"))
        return (h @ down.astype(dt)).reshape(B, T, D)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, key_valid, q_slots, cache, cache_index):
        attn_out, cache = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="input_norm")(x), positions, key_valid, q_slots, cache, cache_index)
        x = x + attn_out
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attn_norm")(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed")), cache


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, key_valid, q_slots, caches=None, cache_index=0):
        cfg = self.cfg
        embedding = _param(self, "embed", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model),
                           ("vocab", "embed"), cfg)
        # gather from a replicated copy: a gather from a vocab/fsdp-sharded table forces XLA to rematerialise it
        x = jnp.take(constrain(embedding, (None, None)), tokens, axis=0).astype(cfg.jnp_dtype)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        new_caches = []
        for i in range(cfg.num_layers):
            x, layer_cache = Block(cfg, name=f"layers_{i}")(
                x, positions, key_valid, q_slots, None if caches is None else caches[i], cache_index)
            new_caches.append(layer_cache)
        x = RMSNorm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:
            head = embedding.T
        else:
            head = _param(self, "lm_head", nn.initializers.normal(0.02), (cfg.d_model, cfg.vocab_size),
                          ("embed", "vocab"), cfg)
        B, T, D = x.shape
        logits = jnp.einsum("MD,DV->MV", x.reshape(B * T, D), head.astype(cfg.jnp_dtype),
                            preferred_element_type=jnp.float32).reshape(B, T, cfg.vocab_size)
        logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits, (None if caches is None else tuple(new_caches))


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


def forward(config: ModelConfig, params, tokens, *, attention_mask=None, positions=None):
    """Teacher-forced logits, float32 [B, T, V]. tokens int32 [B, T]; attention_mask 1/0 [B, T] (left padding)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    logits, _ = Transformer(config).apply(
        {"params": params}, tokens, positions, attention_mask, jnp.arange(tokens.shape[1]))
    return logits


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> tuple[LayerCache, ...]:
    """Zeroed KV cache: per layer k, v [B, S, K, H] in the compute dtype (tuple of layers, see ENV_NOTES)."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.jnp_dtype
    return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


def forward_with_cache(config: ModelConfig, params, tokens, positions, caches, cache_index, kv_valid):
    """Runs tokens [B, T] at cache slots [cache_index, cache_index + T). `kv_valid` [B, S] marks real tokens in the
    cache *including* this chunk. Returns (float32 logits [B, T, V], updated caches)."""
    q_slots = cache_index + jnp.arange(tokens.shape[1])
    return Transformer(config).apply(
        {"params": params}, tokens, positions, kv_valid, q_slots, caches, cache_index)


def token_logprobs(config: ModelConfig, params, tokens, *, attention_mask=None, temperature: float = 1.0):
    """Teacher-forced log-prob of each next token, float32 [B, T-1]: entry t scores tokens[:, t+1].

    `temperature` scales the logits exactly as the sampler does, so new / old / reference log-probs all come from
    the distribution that was sampled (SPEC §5; a mismatch breaks the importance ratio)."""
    logits = forward(config, params, tokens, attention_mask=attention_mask)[:, :-1]
    return logprobs_of(logits, jnp.asarray(tokens, jnp.int32)[:, 1:], temperature)


def logprobs_of(logits_BTV, targets_BT, temperature: float = 1.0):
    """log softmax(logits / temperature) gathered at targets, float32."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
