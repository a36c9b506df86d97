"""What each Stage-I / Stage-II method needs and its jit-side loss:
`loss_fn(params, batch, rng, denominators) -> (loss, metrics)`.

Update batches (all [M, ...], M rollouts of one mini-batch, prompt left-padded to P, response R tokens, L = P + R):
  tokens [M, L] int32, attention_mask [M, L], response_mask [M, R] (1 on generated tokens, 0 on pad / dropped rows),
  and per method: old_logprobs, advantages, ref_logprobs [M, R] (RL); teacher_logprobs [M, R] (self-distillation);
  loss_mask [M, L-1] (SFT, which trains on tokens [M, L] directly).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from exprl_jax import losses
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.head import head_matrix, token_logprobs_entropy
from exprl_jax.models.transformer import forward_hidden, token_logprobs


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    samples: bool  # draws rollouts from the policy each step
    reward: str | None  # "judge_outcome", "judge_process", "sparse" or None
    teacher: bool = False  # needs reference-conditioned teacher log-probs (self-distillation)


METHOD_SPECS = {
    "sft": MethodSpec(samples=False, reward=None),
    "grpo": MethodSpec(samples=True, reward="sparse"),
    "exprl_outcome": MethodSpec(samples=True, reward="judge_outcome"),
    "exprl_process": MethodSpec(samples=True, reward="judge_process"),
    "self_distill": MethodSpec(samples=True, reward=None, teacher=True),
    "stage2": MethodSpec(samples=True, reward="sparse"),
}


def response_logprobs(model_cfg: ModelConfig, params, batch: dict, temperature: float):
    """Temperature-scaled log-probs of the R response tokens and the entropies of those distributions, float32
    [M, R] each. Only the positions that predict response tokens reach the vocabulary projection, chunked by
    `model_cfg.logits_chunk` (models/head.py)."""
    R = batch["response_mask"].shape[1]
    hidden = forward_hidden(model_cfg, params, batch["tokens"], attention_mask=batch["attention_mask"])
    return token_logprobs_entropy(model_cfg, hidden[:, -R - 1:-1], head_matrix(model_cfg, params),
                                  batch["tokens"][:, -R:], temperature)


def make_ppo_loss(model_cfg: ModelConfig, loss_cfg, temperature: float):
    """PPO-clip (+ dual clip) on per-token advantages, optional k3 KL to the reference and entropy bonus (SPEC §5).
    Every term is normalised by the mini-batch's `denominators` (gradient accumulation, train_state.py)."""
    dual_clip = loss_cfg.dual_clip if loss_cfg.dual_clip > 0 else None

    def loss_fn(params, batch, rng, denominators):
        del rng
        logprobs, entropy_MR = response_logprobs(model_cfg, params, batch, temperature)
        mask = batch["response_mask"]
        loss, metrics = losses.policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask, clip_low=loss_cfg.clip_low,
            clip_high=loss_cfg.clip_high, dual_clip=dual_clip, agg=loss_cfg.agg, denominators=denominators)
        entropy = losses.aggregate(entropy_MR, mask, loss_cfg.agg, denominators)
        metrics["entropy/mean"] = entropy
        if loss_cfg.entropy_coef:
            loss = loss - loss_cfg.entropy_coef * entropy
        if loss_cfg.kl_coef:
            kl = losses.aggregate(losses.kl_penalty(logprobs, batch["ref_logprobs"], loss_cfg.kl_kind), mask,
                                  loss_cfg.agg, denominators)
            metrics["kl/ref"] = kl
            loss = loss + loss_cfg.kl_coef * kl
        metrics["tokens/count"] = jnp.sum(mask)
        return loss, metrics

    return loss_fn


def make_self_distill_loss(model_cfg: ModelConfig, loss_cfg, temperature: float):
    """On-policy self-distillation (SPEC §6): advantage = stop_grad(teacher − student), loss = −A·log π."""

    def loss_fn(params, batch, rng, denominators):
        del rng
        logprobs, entropy_MR = response_logprobs(model_cfg, params, batch, temperature)
        loss, metrics = losses.self_distill_loss(logprobs, batch["teacher_logprobs"], batch["response_mask"],
                                                 agg=loss_cfg.agg, denominators=denominators)
        metrics["entropy/mean"] = losses.aggregate(entropy_MR, batch["response_mask"], loss_cfg.agg, denominators)
        return loss, metrics

    return loss_fn


def make_sft_loss(model_cfg: ModelConfig, loss_cfg):
    """Next-token cross-entropy on reference tokens only (SPEC §6 SFT baseline)."""

    def loss_fn(params, batch, rng, denominators):
        del rng
        logprobs = token_logprobs(model_cfg, params, batch["tokens"], attention_mask=batch["attention_mask"])
        return losses.sft_loss(logprobs, batch["loss_mask"], agg=loss_cfg.agg, denominators=denominators)

    return loss_fn


def make_loss_fn(method: str, model_cfg: ModelConfig, loss_cfg, temperature: float):
    if method == "sft":
        return make_sft_loss(model_cfg, loss_cfg)
    if method == "self_distill":
        return make_self_distill_loss(model_cfg, loss_cfg, temperature)
    if method in METHOD_SPECS:
        return make_ppo_loss(model_cfg, loss_cfg, temperature)
    raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHOD_SPECS)}")


def loss_mask_key(method: str) -> str:
    """The batch field that marks the tokens a method's loss is over (its denominators are counted on it)."""
    return "loss_mask" if method == "sft" else "response_mask"


def batch_ndims(method: str) -> dict[str, int]:
    """Rank of every update-batch field, for the train step's input shardings."""
    if method == "sft":
        return {"tokens": 2, "attention_mask": 2, "loss_mask": 2}
    fields = {"tokens": 2, "attention_mask": 2, "response_mask": 2}
    if method == "self_distill":
        return {**fields, "teacher_logprobs": 2}
    return {**fields, "old_logprobs": 2, "advantages": 2, "ref_logprobs": 2}
