"""Builds the reward function a config asks for: the sparse answer check, or a judge (Outcome / Process)
behind the configured backend (cache under the workdir, template chosen by each record's domain, checked at startup
to fit the training records: judge/fit.py); the exact per-step positive control; and the wrong-reference control
(every rollout judged against another training problem's reference)."""
from __future__ import annotations

import dataclasses
import os

from exprl_jax.methods import METHOD_SPECS
from exprl_jax.rewards.base import RewardBatch, RewardResult

REFERENCES = ("own", "other")


def make_judge_backend(judge_cfg, records=(), noise_seed: int = 0):
    if judge_cfg.backend == "programmatic":
        from exprl_jax.judge.programmatic import ProgrammaticBackend, checkpoints_of

        # records that carry their checkpoints are graded on them; others on the `name=value` lines of the reference
        table = {r.reference: checkpoints_of("\n".join(r.checkpoints)) for r in records if r.checkpoints}
        return ProgrammaticBackend(table, noise=judge_cfg.noise, noise_seed=noise_seed)
    if judge_cfg.noise:
        raise ValueError(f"config.judge.noise={judge_cfg.noise} needs judge.backend='programmatic'")
    if judge_cfg.backend == "openai":
        from exprl_jax.judge.client import JudgeClientConfig, OpenAIChatClient

        if not judge_cfg.base_url or not judge_cfg.model:
            raise ValueError("config.judge.base_url and config.judge.model are required for judge.backend='openai'")
        return OpenAIChatClient(JudgeClientConfig(
            base_url=judge_cfg.base_url, model=judge_cfg.model, api_key_env=judge_cfg.api_key_env or None,
            max_tokens=judge_cfg.max_tokens, max_concurrency=judge_cfg.max_concurrency,
            requests_per_minute=judge_cfg.requests_per_minute or None,
            tokens_per_minute=judge_cfg.tokens_per_minute or None, timeout_s=judge_cfg.timeout_s,
            max_retries=judge_cfg.max_retries))
    if judge_cfg.backend == "local":
        from exprl_jax.judge.local import LocalBackend

        return LocalBackend.from_hf(judge_cfg.model, max_tokens=judge_cfg.max_tokens)
    raise ValueError(f"config.judge.backend={judge_cfg.backend!r}; expected 'openai', 'local', 'programmatic' "
                     "or (exprl_process only) 'exact_step'")


class OtherReference:
    """Wraps a judge reward so that each training problem is judged against another one's reference (a fixed
    derangement, seeded): the wrong-reference condition of SPEC §7 as a training control for drift without
    information. References it does not know (held-out canaries) pass through unchanged."""

    def __init__(self, inner, records, seed: int):
        from exprl_jax.judge.calibration import wrong_reference_indices

        records = list(records)
        perm = wrong_reference_indices([r.problem for r in records], seed)
        self.inner, self.kind = inner, inner.kind
        self.swap = {r.reference: records[j].reference for r, j in zip(records, perm)}

    async def score(self, batch: RewardBatch) -> RewardResult:
        references = [self.swap.get(x, x) for x in batch.references]
        result = await self.inner.score(dataclasses.replace(batch, references=references))
        swapped = [a != b for a, b in zip(references, batch.references)]
        result.metrics["judge/other_reference_frac"] = float(sum(swapped) / len(swapped)) if swapped else 0.0
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


def make_reward_fn(cfg, workdir: str, records=()):
    kind = METHOD_SPECS[cfg.method].reward
    j = cfg.judge
    if j.reference not in REFERENCES:
        raise ValueError(f"config.judge.reference={j.reference!r}; expected one of {REFERENCES}")
    if kind == "sparse":
        from exprl_jax.rewards.sparse import SparseReward

        return SparseReward(style=cfg.data.answer_style)
    if j.backend == "exact_step":
        if kind != "judge_process":
            raise ValueError(f"config.judge.backend='exact_step' is a per-step reward: it needs method "
                             f"exprl_process, got {cfg.method!r}")
        from exprl_jax.rewards.exact_step import ExactStepReward

        reward = ExactStepReward(records)
    elif kind in ("judge_outcome", "judge_process"):
        from exprl_jax.judge import JudgeCache, JudgeStats
        from exprl_jax.judge.fit import check_judge_fits
        from exprl_jax.judge.reward import JudgeReward

        rubrics = None
        if j.rubric_path:
            from exprl_jax.judge.rubric import load_rubrics

            rubrics = load_rubrics(j.rubric_path)
        reward = JudgeReward(
            make_judge_backend(j, records, noise_seed=cfg.seed),
            mode="outcome" if kind == "judge_outcome" else "process", process_context=cfg.process.context,
            cache=JudgeCache(os.path.join(workdir, "judge_cache")) if j.cache else None, stats=JudgeStats(),
            rubrics=rubrics, use_reference=j.use_reference, judge_overlong=cfg.process.variant == "authors",
            domain_templates=domain_template_sets(j.domain_templates))
        check_judge_fits(reward, j.backend, records, describe_data(cfg.data))
    else:
        raise ValueError(f"method {cfg.method!r} has no reward function")
    return OtherReference(reward, records, cfg.seed) if j.reference == "other" else reward


def domain_template_sets(entries) -> dict[str, str]:
    """DOMAIN_TEMPLATE_SETS updated by config.judge.domain_templates entries "domain=template set"."""
    from exprl_jax.judge.reward import DOMAIN_TEMPLATE_SETS, TEMPLATE_SETS

    sets = dict(DOMAIN_TEMPLATE_SETS)
    for entry in entries:
        domain, sep, name = (part.strip() for part in entry.partition("="))
        if not sep or not domain or name not in TEMPLATE_SETS:
            raise ValueError(f"config.judge.domain_templates: bad entry {entry!r}; expected 'domain=set' with set "
                             f"one of {sorted(TEMPLATE_SETS)}")
        sets[domain] = name
    return sets


def describe_data(d) -> str:
    """The data a run trains on, as the config names it (for error messages)."""
    named = {"tfds": f"data.tfds_name={d.tfds_name!r}[{d.tfds_train_split}]",
             "mixture": f"data.mixture={tuple(d.mixture)!r}", "testbed": "the testbed",
             "toy_addition": "the toy addition task"}
    return named.get(d.source, f"data.source={d.source!r} data.train_path={d.train_path!r}") + (
        f" (filtered by {d.filter_path})" if d.filter_path else "")
