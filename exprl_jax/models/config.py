"""`ModelConfig`: the shape of a Qwen3 / Qwen2 / Llama decoder, with published presets and HF conversion."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from exprl_jax.models.attention import ATTENTION_IMPLS
from exprl_jax.models.decode_attention import DECODE_IMPLS

FAMILIES = ("qwen3", "qwen2", "llama")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# "full" saves nothing but each layer's input; "dots" saves matmul outputs; "dots_no_batch" only those without
# batch dims (weight-stationary); "proj" saves the q/k/v/o and MLP projections tagged in transformer.py.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "proj")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: str = "qwen3"  # one of FAMILIES; decides the HF `model_type` / architecture on save
    vocab_size: int  # V
    d_model: int  # D, HF `hidden_size`
    num_layers: int
    num_heads: int  # N query heads
    num_kv_heads: int  # K key/value heads (grouped-query attention when K < N)
    head_dim: int  # H
    mlp_dim: int  # F, HF `intermediate_size`
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False  # Llama/Qwen3 `attention_bias=True` also puts a bias on o_proj
    max_position_embeddings: int = 32768
    param_dtype: str = "float32"  # storage dtype of parameters
    dtype: str = "float32"  # compute dtype of activations; logits and log-probs are always float32
    # ---- memory layout of the compute (none of these changes the math) ----
    scan_layers: bool = False  # layer params stacked on a leading "layers" axis, one lax.scan over the layers
    remat: str = "none"  # per-layer rematerialisation: one of REMAT_POLICIES (transformer.py)
    logits_chunk: int = 0  # > 0: sequence positions per chunk of the vocabulary projection in log-prob / entropy
    #                        passes (chunks cover every row), so [rows, positions, V] logits are never materialised
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS; "auto": splash on TPU, cudnn on GPU, CPU by shape
    attention_block_q: int = 512  # query / key tile of "chunked" and "splash" (splash rounds up to 128)
    attention_block_kv: int = 512
    # positions per block of the rollout engine's jnp decode cache (one array per block): a decode step reads the
    # blocks up to its longest live row. Rounded up to 16, raised so a slot has at most 8 blocks (each is a
    # branch of the compiled step). On the 4.2M bench model (XLA:CPU, 5 blocks of 32) it beat one whole-cache block
    # by 20-29% new tokens/s in 4 of 5 alternated pairs (one -8%), both sides unpinned
    decode_block_kv: int = 16
    decode_attention_impl: str = "auto"  # rollout engine decode: "auto" (paged kernel on TPU), "jnp", "paged"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be >= 1")
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r}; supported: {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; supported: {tuple(_DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; supported: {REMAT_POLICIES}")
        if self.logits_chunk < 0:
            raise ValueError(f"ModelConfig.logits_chunk={self.logits_chunk} must be >= 0 (0 = unchunked)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r}; supported: {ATTENTION_IMPLS}")
        if self.decode_attention_impl not in DECODE_IMPLS:
            raise ValueError(f"ModelConfig.decode_attention_impl={self.decode_attention_impl!r}; "
                             f"supported: {DECODE_IMPLS}")
        for name in ("attention_block_q", "attention_block_kv", "decode_block_kv"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be >= 1")

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- presets: dimensions as published in each model's config.json ----
    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A Qwen3-shaped model small enough for unit tests (0.13M params); q heads, MLP and vocab divide 8."""
        base = dict(family="qwen3", vocab_size=256, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4,
                    head_dim=16, mlp_dim=128, rope_theta=10_000.0, qk_norm=True, tie_embeddings=False,
                    max_position_embeddings=2048)
        return cls(**{**base, **overrides})

    @classmethod
    def _qwen3(cls, **kw) -> "ModelConfig":
        base = dict(family="qwen3", vocab_size=151_936, head_dim=128, num_kv_heads=8, rope_theta=1_000_000.0,
                    rms_norm_eps=1e-6, qk_norm=True, max_position_embeddings=40_960, bos_token_id=151_643,
                    eos_token_id=151_645)
        return cls(**{**base, **kw})

    @classmethod
    def qwen3_0_6b(cls, **kw) -> "ModelConfig":
        return cls._qwen3(**{**dict(d_model=1024, num_layers=28, num_heads=16, mlp_dim=3072,
                                    tie_embeddings=True), **kw})

    @classmethod
    def qwen3_1_7b(cls, **kw) -> "ModelConfig":
        return cls._qwen3(**{**dict(d_model=2048, num_layers=28, num_heads=16, mlp_dim=6144,
                                    tie_embeddings=True), **kw})

    @classmethod
    def qwen3_4b(cls, **kw) -> "ModelConfig":
        """Qwen3-4B. The paper's Qwen3-4B-Instruct-2507 has the same shapes with rope_theta=5e6, 262144 positions."""
        return cls._qwen3(**{**dict(d_model=2560, num_layers=36, num_heads=32, mlp_dim=9728,
                                    tie_embeddings=True), **kw})

    @classmethod
    def qwen3_8b(cls, **kw) -> "ModelConfig":
        return cls._qwen3(**{**dict(d_model=4096, num_layers=36, num_heads=32, mlp_dim=12288,
                                    tie_embeddings=False), **kw})

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        """Reads a HF `config.json` dict (Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM)."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"config.json: model_type={model_type!r} is not supported; supported: {FAMILIES}")

        def need(key):
            if key not in hf:
                raise ValueError(f"config.json: required field {key!r} is missing (model_type={model_type})")
            return hf[key]

        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only 'default')")
        if hf.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        if hf.get("mlp_bias"):
            raise ValueError("config.json: mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
        num_heads = need("num_attention_heads")
        d_model = need("hidden_size")
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        fields = dict(
            family=model_type,
            vocab_size=need("vocab_size"),
            d_model=d_model,
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or d_model // num_heads,
            mlp_dim=need("intermediate_size"),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3",
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        return cls(**{**fields, **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        arch = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.family]
        if self.family == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ValueError("a qwen2 checkpoint needs qkv_bias=True and o_bias=False")
        if self.family != "qwen2" and self.qkv_bias != self.o_bias:
            raise ValueError(f"{self.family}: attention_bias covers q/k/v/o together; got qkv_bias != o_bias")
        if (self.family == "qwen3") != self.qk_norm:
            raise ValueError(f"{self.family}: qk_norm={self.qk_norm} cannot be written as a HF config")
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        hf = {
            "architectures": [arch], "model_type": self.family, "vocab_size": self.vocab_size,
            "hidden_size": self.d_model, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.mlp_dim, "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "torch_dtype": self.param_dtype, "dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.family != "qwen2":
            hf["attention_bias"] = self.qkv_bias
        if self.family in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = False
        return hf

    def num_params(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.o_bias:
            attn += self.d_model
        mlp = 3 * self.d_model * self.mlp_dim
        norms = 2 * self.d_model + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + embed + self.d_model
