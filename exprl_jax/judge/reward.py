"""`JudgeReward`: the ExpRL reward function (SPEC §3–4). It renders a judge template per trace (Outcome) or per
segment (Process), calls the judge backend once per distinct request, reads `Score: N` and returns (N − 1) / 4.
A failed call or an unparseable answer leaves its rollout unscored (valid=False, with a reason), never 0.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from typing import Mapping, Sequence

import numpy as np

from exprl_jax.judge.backend import ChatBackend, Completion
from exprl_jax.judge.parse import format_rubric, parse_score_with_reason, score_to_reward
from exprl_jax.judge.templates import Template, load_template
from exprl_jax.rewards.base import RewardBatch, RewardResult

MODES = ("outcome", "process")
PROCESS_CONTEXTS = ("segment", "prefix")  # the step alone (the authors' code) / y_≤t (the paper's equation)
# Template slot → template id. A slot is the mode, "process-<context>" for Process, plus "-noref" without reference.
TEMPLATE_SETS: dict[str, dict[str, str]] = {
    "math": {"outcome": "outcome", "process-segment": "process-segment", "process-prefix": "process-prefix",
             "outcome-noref": "outcome-noref", "process-segment-noref": "process-noref",
             "process-prefix-noref": "process-prefix-noref"},
    "science": {"outcome": "science-equivalence", "outcome-noref": "outcome-noref"},
    "code": {"outcome": "code-review"},
}
# Record domain → template set (SPEC §8's mixed-domain run); a record without a domain counts as DEFAULT_DOMAIN.
DOMAIN_TEMPLATE_SETS: dict[str, str] = {"math": "math", "testbed": "math", "science": "science", "code": "code"}
DEFAULT_DOMAIN = "math"


def select_template(template_set: str | Mapping[str, str | Template], mode: str, process_context: str,
                    use_reference: bool) -> Template:
    """The judge template for a mode: `template_set` names an entry of TEMPLATE_SETS or maps slots itself."""
    slot = mode if mode == "outcome" else f"process-{process_context}"
    slot += "" if use_reference else "-noref"
    slots = TEMPLATE_SETS[template_set] if isinstance(template_set, str) else template_set
    if slot not in slots:
        raise ValueError(f"template set {template_set!r} has no template for {slot!r} (has {sorted(slots)})")
    template = slots[slot]
    template = template if isinstance(template, Template) else load_template(template)
    if template.kind != "judge":
        raise ValueError(f"template {template.key} is a {template.kind!r} template, not a judge template")
    if use_reference != ("reference" in template.fields):
        raise ValueError(f"template {template.key} does not match use_reference={use_reference}")
    return template


@dataclasses.dataclass(frozen=True)
class _Verdict:
    score: int | None  # 1..5, None when unscored
    reason: str | None  # why unscored


class _StepCounter:
    def __init__(self):
        self.calls = 0  # backend calls made
        self.cache_hits = 0


class JudgeReward:
    """RewardFn backed by an LLM judge. `kind` is the mode: "outcome" (one call per rollout, full trace) or
    "process" (one call per segment; batch.segments must be set).

    `domain_templates` (domain → template set) picks each row's template by `batch.domains` (a row without a
    domain counts as "math"); without it every row uses `template_set`.
    `rubrics` maps a problem's text to a stored checkpoint list (from the rubric-builder template); a problem
    without an entry falls back to the checkpoints the judge pulls from the reference itself.
    `stats` is reset at the start of every `score` call, so its metrics describe that step.
    """

    def __init__(self, backend: ChatBackend, *, mode: str = "outcome", process_context: str = "segment",
                 template_set: str | Mapping[str, str | Template] = "math", cache=None, stats=None,
                 rubrics: Mapping[str, Sequence[str]] | None = None, use_reference: bool = True,
                 judge_overlong: bool = False,
                 domain_templates: Mapping[str, str | Mapping[str, str | Template]] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if process_context not in PROCESS_CONTEXTS:
            raise ValueError(f"process_context must be one of {PROCESS_CONTEXTS}, got {process_context!r}")
        self.kind, self.process_context, self.use_reference = mode, process_context, use_reference
        self._rubrics_given = rubrics is not None
        self.template = self._checked(template_set)
        self.domain_templates = dict(domain_templates) if domain_templates is not None else None
        self._domain_template: dict[str, Template] = {}
        self._template_of_key = {self.template.key: self.template}
        self.backend = backend
        self.cache, self.stats = cache, stats
        # the authors' code judges Overlong Process rollouts too: a failed segment leaves the rollout unscored,
        # and its last segment's score reaches EndNorm (`RewardResult.overlong_last_scores`)
        self.judge_overlong = judge_overlong and mode == "process"
        self.rubrics = {problem: format_rubric(list(items)) for problem, items in (rubrics or {}).items()}
        self._in_flight: dict[str, asyncio.Task] = {}  # request id → its running judge call

    def close(self) -> None:
        """Writes out the answer cache (on an object store its last puts are still buffered)."""
        if self.cache is not None:
            self.cache.close()

    def _checked(self, template_set) -> Template:
        template = select_template(template_set, self.kind, self.process_context, self.use_reference)
        if self._rubrics_given and "rubric" not in template.fields + template.optional:
            raise ValueError(f"template {template.key} takes no rubric (a stored rubric comes from the "
                             "reference, so no-reference templates cannot use one)")
        return template

    def template_for(self, domain: str | None) -> Template:
        """The judge template of a record's domain (ValueError for a domain no template set is given for)."""
        if self.domain_templates is None:
            return self.template
        domain = domain or DEFAULT_DOMAIN
        if domain not in self._domain_template:
            if domain not in self.domain_templates:
                raise ValueError(f"no judge template set for domain {domain!r} (sets for: "
                                 f"{', '.join(sorted(self.domain_templates))}); add it to config.judge.domain_templates")
            template = self._checked(self.domain_templates[domain])
            self._domain_template[domain] = template
            self._template_of_key[template.key] = template
        return self._domain_template[domain]

    async def score(self, batch: RewardBatch) -> RewardResult:
        """Judges every rollout (Outcome) or segment (Process) of the batch, concurrently; Overlong rollouts only
        with `judge_overlong` (Process)."""
        if self.kind == "process" and batch.segments is None:
            raise ValueError("Process rewards need batch.segments (see exprl_jax.judge.segment.segment_batch)")
        if self.stats is not None:
            self.stats.reset()
        n = len(batch.responses)
        requests: dict[str, dict[str, str]] = {}  # request id → its fields; identical requests are judged once
        row_requests: list[list[str]] = [[] for _ in range(n)]  # [N][1 or S_i] request ids
        for i in range(n):
            if batch.truncated[i] and not self.judge_overlong:
                continue  # SPEC §4 Overlong: reward 0 without a judge call
            template = self.template_for(batch.domains[i] if batch.domains is not None else None)
            for trace in self._traces(batch, i):
                fields = self._request_fields(template, batch.problems[i], batch.references[i], trace)
                request_id = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
                requests.setdefault(request_id, fields)
                row_requests[i].append(request_id)
        counter = _StepCounter()
        verdicts = await asyncio.gather(*(self._judge(rid, fields, counter) for rid, fields in requests.items()))
        verdict_of = dict(zip(requests, verdicts))
        assemble = self._outcome_result if self.kind == "outcome" else self._process_result
        row_verdicts = [[verdict_of[rid] for rid in ids] for ids in row_requests]
        result, row_rewards = assemble(batch, row_verdicts)
        if self.judge_overlong:
            result.overlong_last_scores = np.array([
                score_to_reward(v[-1].score) if batch.truncated[i] and result.valid[i] and v else np.nan
                for i, v in enumerate(row_verdicts)])
        result.metrics = self._metrics(counter, row_rewards, result.valid)
        return result

    @staticmethod
    def _outcome_result(batch: RewardBatch, row_verdicts: list[list[_Verdict]]) -> tuple[RewardResult, list[float]]:
        """One reward per rollout; NaN and a reason where unscored. Also returns the valid rows' rewards."""
        n = len(row_verdicts)
        valid, scores, reasons = np.zeros(n, dtype=bool), np.full(n, np.nan), [None] * n
        for i, verdicts in enumerate(row_verdicts):
            if batch.truncated[i]:
                valid[i], scores[i] = True, 0.0  # SPEC §4 Overlong
            elif verdicts[0].score is None:
                reasons[i] = verdicts[0].reason
            else:
                valid[i], scores[i] = True, score_to_reward(verdicts[0].score)
        result = RewardResult(valid=valid, scores=scores, reasons=reasons)
        return result, [float(s) for s in scores[valid]]

    @staticmethod
    def _process_result(batch: RewardBatch, row_verdicts: list[list[_Verdict]]) -> tuple[RewardResult, list[float]]:
        """One reward per segment; a rollout with any unscored segment is unscored as a whole (its first failing
        segment's reason). Also returns each valid rollout's mean segment reward."""
        n = len(row_verdicts)
        segment_scores: list[np.ndarray | None] = [None] * n
        reasons: list[str | None] = [None] * n
        for i, verdicts in enumerate(row_verdicts):
            failed = [v.reason for v in verdicts if v.score is None]
            if batch.truncated[i] and not failed:  # (judged only with judge_overlong)
                segment_scores[i] = np.zeros(len(batch.segments[i]))  # SPEC §4 Overlong: all-zero
            elif not verdicts:
                reasons[i] = "no_segments"  # an empty response: nothing to judge or to credit
            elif failed:
                reasons[i] = failed[0]
            else:
                segment_scores[i] = np.array([score_to_reward(v.score) for v in verdicts])
        valid = np.array([s is not None for s in segment_scores], dtype=bool)
        result = RewardResult(valid=valid, segment_scores=segment_scores, reasons=reasons)
        return result, [float(s.mean()) for s in segment_scores if s is not None and len(s)]

    def _traces(self, batch: RewardBatch, i: int) -> list[str]:
        """What the judge sees for row i: the full response, or per segment the step alone / the prefix y_≤t."""
        if self.kind == "outcome":
            return [batch.responses[i]]
        texts = [span.text for span in batch.segments[i]]
        if self.process_context == "segment":
            return texts
        return ["".join(texts[:t + 1]) for t in range(len(texts))]

    def _request_fields(self, template: Template, problem: str, reference: str, trace: str) -> dict[str, str]:
        """Everything that determines the judge's answer: the cache key is made of exactly these."""
        rubric = self.rubrics.get(problem, "")
        return {"template": template.key, "model": self.backend.model,
                "decoding": json.dumps(self.backend.decoding, sort_keys=True), "problem": problem,
                "reference": reference if self.use_reference else "", "trace": trace, "rubric": rubric}

    async def _judge(self, request_id: str, fields: dict[str, str], counter: _StepCounter) -> _Verdict:
        """Judges one request; a concurrent `score` call asking for the same request waits on the same call."""
        task = self._in_flight.get(request_id)
        if task is None:
            task = asyncio.ensure_future(self._judge_uncached(fields, counter))
            self._in_flight[request_id] = task
            task.add_done_callback(lambda _: self._in_flight.pop(request_id, None))
        # shield: a cancelled waiter must not cancel the call that other waiters share
        return await asyncio.shield(task)

    async def _judge_uncached(self, fields: dict[str, str], counter: _StepCounter) -> _Verdict:
        cache_key = self.cache.key(**fields) if self.cache is not None else None
        if cache_key is not None:
            cached_text = self.cache.get(cache_key)
            score = parse_score_with_reason(cached_text)[0] if cached_text is not None else None
            if score is not None:  # only parsed answers are ever stored, but a stored entry is re-checked
                counter.cache_hits += 1
                if self.stats is not None:
                    self.stats.record(Completion(text=cached_text), cached=True, unscored_reason=None)
                return _Verdict(score, None)
        values = {"problem": fields["problem"], "trace": fields["trace"]}
        if self.use_reference:
            values["reference"] = fields["reference"]
        if fields["rubric"]:
            values["rubric"] = fields["rubric"]
        template = self._template_of_key[fields["template"]]
        messages = template.render(**values)  # a fresh fence marker for every call
        counter.calls += 1
        if getattr(self.backend, "wants_fields", False):  # a programmatic judge grades the fields, not the prose
            completion = await self.backend.complete(messages, meta={"template": template.id, "fields": values})
        else:
            completion = await self.backend.complete(messages)
        parse_reason = None  # for a failed call JudgeStats falls back to completion.reason ("timeout", ...)
        if completion.text is None:
            score, reason = None, f"judge_failed:{completion.reason or 'unknown'}"
        else:
            score, parse_reason = parse_score_with_reason(completion.text)
            reason = None if score is not None else f"unparseable:{parse_reason}"
        if self.stats is not None:
            self.stats.record(completion, cached=False, unscored_reason=parse_reason)
        if score is not None and cache_key is not None:
            self.cache.put(cache_key, completion.text)
        return _Verdict(score, reason)

    def _metrics(self, counter: _StepCounter, row_rewards: list[float], valid: np.ndarray) -> dict[str, float]:
        """JudgeStats' metrics for this step, plus calls and the reward over valid rows (Process: per-row mean)."""
        metrics = dict(self.stats.metrics()) if self.stats is not None else {}
        rewards = np.asarray(row_rewards, dtype=np.float64)
        metrics.update({
            "judge/calls_per_step": float(counter.calls),
            "judge/cache_hits_per_step": float(counter.cache_hits),
            "reward/mean": float(rewards.mean()) if rewards.size else float("nan"),
            "reward/std": float(rewards.std()) if rewards.size else float("nan"),
            "reward/unscored_frac": float(1.0 - valid.mean()) if valid.size else 0.0,
        })
        return metrics

    async def aclose(self) -> None:
        await self.backend.aclose()
