"""Model definitions: config, Flax decoder, Hugging Face checkpoint I/O."""
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.transformer import (
    forward, forward_with_cache, init_boxed, init_cache, init_params, logprobs_of, token_logprobs)

__all__ = ["ModelConfig", "forward", "forward_with_cache", "init_boxed", "init_cache", "init_params", "logprobs_of",
           "token_logprobs"]
