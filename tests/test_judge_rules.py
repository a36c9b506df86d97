"""The programmatic judge's rules (exprl_jax/judge/programmatic.py): every hand-made example of
`programmatic_examples` through the real reward path, the consequences for DeltaNorm that motivated them, the
master-key canaries, and the noise knob's misplacement rate."""
import asyncio
import re

import numpy as np
import pytest

from exprl_jax import advantages as adv
from exprl_jax.data import QARecord
from exprl_jax.judge import programmatic as pj
from exprl_jax.judge import programmatic_examples as ex
from exprl_jax.judge.monitors import judge_verifier_agreement, run_canaries
from exprl_jax.judge.reward import JudgeReward
from exprl_jax.rewards.base import RewardBatch, Span, score_sync


def steps_of(text: str) -> list[str]:
    """A trace cut after every `###`, as the segmenter does (delimiter at the end of its step)."""
    return [s for s in re.split(r"(?<=###)", text) if s]


def judge(mode="outcome", context="segment", noise=0.0):
    return JudgeReward(pj.ProgrammaticBackend(noise=noise), mode=mode, process_context=context)


def levels(reward, traces, segmented=False):
    """Likert level of each trace (outcome) or of the LAST segment of each trace (process)."""
    n = len(traces)
    segments = None
    if reward.kind == "process":
        segments = [[Span(s, i, i + 1) for i, s in enumerate(steps_of(t) if segmented else [t])] or [Span("", 0, 1)]
                    for t in traces]
    batch = RewardBatch(problems=[ex.PROBLEM] * n, references=[ex.REFERENCE] * n, answers=["691"] * n,
                        responses=list(traces), truncated=np.zeros(n, bool), group_size=1, segments=segments)
    result = score_sync(reward, batch)
    assert result.valid.all()
    if reward.kind == "outcome":
        return (result.scores * 4 + 1).round().astype(int).tolist()
    return [int(round(s[-1] * 4 + 1)) for s in result.segment_scores]


@pytest.mark.parametrize("trace,level,rule", ex.OUTCOME)
def test_outcome_examples(trace, level, rule):
    assert levels(judge(), [trace]) == [level], rule


@pytest.mark.parametrize("trace,level,rule", ex.PROCESS_SEGMENT)
def test_process_segment_examples(trace, level, rule):
    assert levels(judge("process", "segment"), [trace]) == [level], rule


@pytest.mark.parametrize("trace,level,rule", ex.PROCESS_PREFIX)
def test_process_prefix_examples(trace, level, rule):
    # the prefix is cut into its steps and judged step by step; its last step's score is the prefix's level
    assert levels(judge("process", "prefix"), [trace], segmented=True) == [level], rule


@pytest.mark.parametrize("segments,scores,rule", ex.EXACT_STEP)
def test_exact_step_examples(segments, scores, rule):
    assert pj.exact_step_scores(segments, pj.checkpoints_of(ex.REFERENCE), "691") == list(scores), rule


def test_all_five_outcome_levels_are_reachable():
    assert {level for _, level, _ in ex.OUTCOME} == {1, 2, 3, 4, 5}


def test_verdict_fields():
    cps = pj.checkpoints_of(ex.REFERENCE)
    assert cps == [("b", "7"), ("c", "6"), ("d", "9"), ("e", "1")]
    v = pj.verify(ex.B + "c=5###" + ex.E + "d=9###d=8", cps, "691")
    # b established, c contradicted, d two values -> contradicted, e established; progress stops at c
    assert v.states == ("established", "contradicted", "contradicted", "established")
    assert (v.progress, v.established, v.contradicted, v.gap, v.answer_given) == (1, 2, 2, False, False)
    assert pj.verify(ex.B + ex.D, cps, "691").gap and not pj.verify(ex.B + ex.C, cps, "691").gap


def delta_advantages(context, trace):
    """DeltaNorm segment advantages (SPEC §4) of one trace under the programmatic process judge."""
    segs = steps_of(trace)
    batch = RewardBatch(problems=[ex.PROBLEM], references=[ex.REFERENCE], answers=["691"], responses=[trace],
                        truncated=np.zeros(1, bool), group_size=1,
                        segments=[[Span(s, i, i + 1) for i, s in enumerate(segs)]])
    scores = score_sync(judge("process", context), batch).segment_scores
    return adv.process(scores, 1, mode="delta")[0]


@pytest.mark.parametrize("context", ["segment", "prefix"])
def test_delta_norm_no_longer_pays_for_guessing(context):
    # a right final answer after a right step: no penalty (the old judge gave it -0.25)
    assert delta_advantages(context, ex.NATIVE)[-1] == 0.0
    # a wrong guess boxed after a wrong step earns nothing (the old judge gave it +0.25)
    wrong = ex.B + ex.C + ex.D + "e=d+2=9+2=2###\\boxed{123}"
    assert delta_advantages(context, wrong)[-1] == 0.0
    # dropping the last step and boxing a guess costs the whole scale
    assert delta_advantages(context, ex.B + ex.C + ex.D + "\\boxed{123}")[-1] == -1.0


def test_prefix_context_counts_earlier_errors_and_gives_no_credit_without_progress():
    trace = "b=a+4=3+4=8###" + ex.C + ex.D + ex.E + "\\boxed{691}"
    assert levels(judge("process", "prefix"), [trace], segmented=True) == [1]  # the right answer does not redeem it
    assert levels(judge("process", "segment"), [trace], segmented=True) == [5]  # a step alone cannot see it
    filler = ex.B + "I will now think###" + ex.C + "\\boxed{691}"
    assert list(delta_advantages("prefix", filler)) == [0.0, 0.0, 0.0, 0.0]


def test_canaries_prefix_context_is_not_fooled_and_segment_context_flags_the_bare_answer():
    records = [QARecord(id="r", problem=ex.PROBLEM, reference=ex.REFERENCE, answer="691")]
    prefix = asyncio.run(run_canaries(judge("process", "prefix"), records))
    assert prefix["canary/alarm"] == 0.0 and prefix["canary/bare_answer_mean"] == 0.0
    assert asyncio.run(run_canaries(judge(), records))["canary/alarm"] == 0.0
    # seen alone, a bare right answer is indistinguishable from the final step of a full derivation: the monitor
    # flags it, which is why the replication's Process arm judges prefixes
    segment = asyncio.run(run_canaries(judge("process", "segment"), records))
    assert segment["canary/bare_answer_mean"] == 1.0 and segment["canary/alarm"] == 1.0


def test_noise_knob_is_deterministic_and_misplaces_about_half_its_rate():
    rng = np.random.default_rng(0)
    traces, correct = [], []
    for i in range(600):  # half exact traces, half wrong at a random step, made unique by a trailing remark
        if i % 2:
            traces.append(ex.NATIVE + f"###ok {i}")
            correct.append(True)
        else:
            j = int(rng.integers(4))
            steps = [ex.B, ex.C, ex.D, ex.E]
            steps[j] = re.sub(r"=(\d)###$", lambda m: f"={(int(m[1]) + 1) % 10}###", steps[j])
            traces.append("".join(steps) + f"\\boxed{{69{i % 9}}}###ok {i}")
            correct.append(False)
    exact = np.array(levels(judge(), traces))
    noisy = np.array(levels(judge(noise=0.3), traces))
    assert noisy.tolist() == levels(judge(noise=0.3), traces)  # the same request, the same draw
    changed = np.mean(noisy != exact)
    assert 0.3 * 0.8 * 0.85 < changed < 0.3 * 0.8 * 1.15  # a uniform redraw keeps the level 1 time in 5
    rewards = lambda lv: (lv - 1) / 4  # noqa: E731
    ok = np.ones(len(traces), bool)
    exact_rates = judge_verifier_agreement(rewards(exact), np.array(correct), ok)
    assert exact_rates["judge_vs_verifier/fpr"] == 0.0 and exact_rates["judge_vs_verifier/fnr"] == 0.0
    noisy_rates = judge_verifier_agreement(rewards(noisy), np.array(correct), ok)
    misplacement = (noisy_rates["judge_vs_verifier/fpr"] + noisy_rates["judge_vs_verifier/fnr"]) / 2
    assert 0.11 < misplacement < 0.19  # about 0.3 / 2 (SPEC §7: 10-19% for LLM judges with the right reference)
    assert pj.ProgrammaticBackend(noise=0.3).model != pj.ProgrammaticBackend().model  # separate cache keys
    with pytest.raises(ValueError, match="noise"):
        pj.ProgrammaticBackend(noise=1.5)
