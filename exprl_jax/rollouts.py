"""Host side of one RL step: prompts -> sampled rollouts -> (rewards, advantages) -> update-batch arrays.

Everything here is numpy around two jitted calls (the sampler and a log-prob scorer). Rows are prompt-major:
rollout i belongs to prompt i // G.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from typing import Sequence

import jax
import numpy as np

from exprl_jax import distributed, storage
from exprl_jax import sharding as shd
from exprl_jax.data import QARecord, build_prompt
from exprl_jax.batching import batch_shards, chunks_of_rows
from exprl_jax.methods import response_logprobs
from exprl_jax.models.config import ModelConfig
from exprl_jax.sampling import generate, pad_prompts


@dataclasses.dataclass
class Rollouts:
    records: list[QARecord]  # [B] the step's problems
    group_size: int  # G
    prompt_tokens: np.ndarray  # [N, P] int32, left-padded
    prompt_mask: np.ndarray  # [N, P] int32
    tokens: np.ndarray  # [N, R] int32 generated tokens (pad after the end)
    logprobs: np.ndarray  # [N, R] float32 sampling log-probs (0 after the end)
    lengths: np.ndarray  # [N] int32
    truncated: np.ndarray  # [N] bool
    texts: list[str]  # [N] decoded responses (EOS stripped)
    logprob_gap_max: float | None = None  # max |sampler - trainer| log-prob, once `logprobs` were recomputed

    @property
    def response_mask(self) -> np.ndarray:  # [N, R] float32
        return (np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]).astype(np.float32)

    def row_records(self) -> list[QARecord]:  # [N]
        return [r for r in self.records for _ in range(self.group_size)]


def prompt_text(tokenizer, record: QARecord, template: str, chat: bool = False) -> str:
    """The policy's prompt: the problem in `template` (never the reference), as a user turn of the tokenizer's
    chat template when `chat` (instruction-tuned models, e.g. Qwen3-4B-Instruct)."""
    text = build_prompt(record, template)
    if not chat:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.chat_template=True but the tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def encode_prompts(tokenizer, records: Sequence[QARecord], template: str, chat: bool = False,
                   max_tokens: int = 0) -> list[list[int]]:
    prompts = [tokenizer.encode(prompt_text(tokenizer, r, template, chat), add_special_tokens=False)
               for r in records]
    for r, p in zip(records, prompts):
        if not p:
            raise ValueError(f"record {r.id}: the prompt encodes to zero tokens")
        if 0 < max_tokens < len(p):
            raise ValueError(f"record {r.id}: the prompt is {len(p)} tokens, over rollout.max_prompt_tokens="
                             f"{max_tokens}")
    return prompts


def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray, eos: Sequence[int]) -> list[str]:
    out = []
    for row, n in zip(tokens, lengths):
        ids = [int(t) for t in row[:n]]
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        out.append(tokenizer.decode(ids, skip_special_tokens=False))
    return out


def sample_rollouts(model_cfg: ModelConfig, params, tokenizer, records: Sequence[QARecord], rng, *, rollout_cfg,
                    template: str, eos: Sequence[int], pad: int, mesh=None, chat: bool = False) -> Rollouts:
    """`rollout_cfg.group_size` samples of each record's prompt at `rollout_cfg.temperature` (a RolloutSection)."""
    prompts = encode_prompts(tokenizer, records, template, chat, rollout_cfg.max_prompt_tokens)
    G = rollout_cfg.group_size
    out = generate(model_cfg, params, prompts, rng, max_new_tokens=rollout_cfg.max_new_tokens,
                   num_samples=G, temperature=rollout_cfg.temperature,
                   top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k, eos_ids=() if rollout_cfg.ignore_eos else eos,
                   pad_id=pad, mesh=mesh, max_concurrent_rows=rollout_cfg.max_concurrent_rows).to_numpy()
    prompt_tokens, prompt_mask = pad_prompts(prompts, pad)
    return Rollouts(records=list(records), group_size=G, prompt_tokens=np.repeat(prompt_tokens, G, axis=0),
                    prompt_mask=np.repeat(prompt_mask, G, axis=0), tokens=out.tokens, logprobs=out.logprobs,
                    lengths=out.lengths, truncated=out.truncated,
                    texts=decode_responses(tokenizer, out.tokens, out.lengths, eos))


def sequence_batch(prompt_tokens, prompt_mask, tokens, response_mask) -> dict[str, np.ndarray]:
    """Prompt + response as one [N, P+R] sequence with its attention mask."""
    return {
        "tokens": np.concatenate([prompt_tokens, tokens], axis=1).astype(np.int32),
        "attention_mask": np.concatenate([prompt_mask, response_mask.astype(np.int32)], axis=1),
        "response_mask": response_mask.astype(np.float32),
    }


@functools.partial(jax.jit, static_argnames=("model_cfg", "temperature", "mesh"))
def _score(params, batch, *, model_cfg, temperature, mesh):
    with shd.use_mesh(mesh):
        logprobs, _ = response_logprobs(model_cfg, params, batch, temperature)
        return logprobs * batch["response_mask"]


def score_responses(model_cfg: ModelConfig, params, batch: dict, temperature: float, mesh=None,
                    chunk: int = 0) -> np.ndarray:
    """Teacher-forced log-probs [N, R] of the response tokens (reference policy, a teacher, or the policy itself),
    0 off the mask. Rows go `chunk` at a time (0 = all; the micro-batch size bounds activation memory), each chunk
    padded to a multiple of the mesh's batch shards, so any N runs on any mesh with one compiled program."""
    outs = []
    for _, rows, part in chunks_of_rows(batch, chunk, batch_shards(mesh)):
        part = shd.shard_batch(part, mesh) if mesh is not None else part
        scored = _score(params, part, model_cfg=model_cfg, temperature=float(temperature), mesh=mesh)
        outs.append(distributed.to_host(scored)[:rows])
    return np.concatenate(outs, axis=0)


_ARRAY_FIELDS = ("prompt_tokens", "prompt_mask", "tokens", "logprobs", "lengths", "truncated")


def save_rollouts(path, r: Rollouts) -> None:
    """Writes a step's sampled-but-not-yet-trained rollouts (overlap mode) atomically, for exact resume."""
    gap = np.nan if r.logprob_gap_max is None else r.logprob_gap_max
    buffer = io.BytesIO()
    np.savez(buffer, group_size=r.group_size, record_ids=np.array([x.id for x in r.records]), logprob_gap_max=gap,
             **{k: getattr(r, k) for k in _ARRAY_FIELDS})
    storage.write_bytes_atomic(path, buffer.getvalue())


def load_rollouts(path, records: Sequence[QARecord], tokenizer, eos: Sequence[int]) -> Rollouts:
    with np.load(io.BytesIO(storage.as_path(path).read_bytes())) as f:
        ids = [str(x) for x in f["record_ids"]]
        if ids != [x.id for x in records]:
            raise ValueError(f"{path}: saved rollouts belong to records {ids[:3]}..., not this step's")
        arrays = {k: f[k] for k in _ARRAY_FIELDS}
        group_size = int(f["group_size"])
        gap = float(f["logprob_gap_max"]) if "logprob_gap_max" in f else np.nan
    return Rollouts(records=list(records), group_size=group_size, **arrays,
                    texts=decode_responses(tokenizer, arrays["tokens"], arrays["lengths"], eos),
                    logprob_gap_max=None if np.isnan(gap) else gap)
