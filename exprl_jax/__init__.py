"""exprl_jax: ExpRL (judge-scored RL mid-training of LLMs) in JAX/Flax. See WORKSPACE.md for the map."""
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.hf import load_hf, save_hf
from exprl_jax.models.transformer import forward, init_params, token_logprobs
from exprl_jax.sampling import SampleOutput, generate

__all__ = ["ModelConfig", "SampleOutput", "forward", "generate", "init_params", "load_hf", "save_hf",
           "token_logprobs"]
