"""The evaluation loop's counting: pass@k from equivalence checks, exact-trace success, behaviour statistics."""
import jax
import numpy as np
import pytest

from exprl_jax import rollouts as rollouts_lib
from exprl_jax.data import QARecord
from exprl_jax.evaluate import evaluate_policy


def test_counts_pass_at_k_exact_trace_and_segments(monkeypatch):
    records = [QARecord(id="p0", problem="x?", reference="x=5###y=10", answer="10", checkpoints=("x=5", "y=10")),
               QARecord(id="p1", problem="z?", reference="z=3", answer="3", checkpoints=("z=3",))]
    texts = ["x=5###y=10###\\boxed{10}", "x=5###\\boxed{10}", "", "\\boxed{3}"]

    def fake_sample(model_cfg, params, tokenizer, chunk, rng, *, rollout_cfg, **kw):
        n = len(chunk) * rollout_cfg.group_size
        return rollouts_lib.Rollouts(
            records=list(chunk), group_size=rollout_cfg.group_size, prompt_tokens=np.zeros((n, 1), np.int32),
            prompt_mask=np.ones((n, 1), np.int32), tokens=np.zeros((n, 4), np.int32),
            logprobs=np.zeros((n, 4), np.float32), lengths=np.array([20, 15, 1, 9]), truncated=np.zeros(n, bool),
            texts=texts)

    monkeypatch.setattr(rollouts_lib, "sample_rollouts", fake_sample)
    report = evaluate_policy(None, None, None, records, jax.random.key(0), num_samples=2, temperature=0.8, max_new_tokens=4,
                             template="{problem}", answer_style="boxed", eos=(1,), pad=0)
    m = report["metrics"]
    # p0: 2 of 2 correct, p1: 1 of 2 -> pass@1 = (1 + 0.5) / 2 = 0.75; pass@2 = (1 + 1) / 2 = 1
    assert m["pass@1"] == pytest.approx(0.75) and m["pass@2"] == pytest.approx(1.0)
    # exact trace: p0 only its first sample writes x=5 and y=10; p1's boxed 3 writes no z=3 -> 0.25 and 0.5
    assert m["exact_pass@1"] == pytest.approx(0.25) and m["exact_pass@2"] == pytest.approx(0.5)
    # checkpoint shares 1, 1/2, 0, 0 -> 0.375; segments 3, 2, 0, 1 -> 1.5; lengths mean 11.25
    assert m["checkpoint_frac"] == pytest.approx(0.375)
    assert m["segments_per_response"] == pytest.approx(1.5) and m["response_length"] == pytest.approx(11.25)
    assert m["never_solved_frac"] == 0.0 and [p["correct"] for p in report["per_problem"]] == [2, 1]
    # chain reach: progress 2, 1 (p0) and 0, 0 (p1); j = 1 over all four samples, j = 2 over p0's two
    assert report["chain_reach"] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert m["no_verdict"] == 0


def test_a_checker_timeout_is_no_verdict_not_wrong(monkeypatch):
    from exprl_jax.rewards import sparse

    records = [QARecord(id="p0", problem="x?", reference="\\boxed{1}", answer="1"),
               QARecord(id="p1", problem="y?", reference="\\boxed{2}", answer="2")]

    def fake_sample(model_cfg, params, tokenizer, chunk, rng, *, rollout_cfg, **kw):
        n = len(chunk) * rollout_cfg.group_size
        return rollouts_lib.Rollouts(
            records=list(chunk), group_size=rollout_cfg.group_size, prompt_tokens=np.zeros((n, 1), np.int32),
            prompt_mask=np.ones((n, 1), np.int32), tokens=np.zeros((n, 4), np.int32),
            logprobs=np.zeros((n, 4), np.float32), lengths=np.full(n, 3), truncated=np.zeros(n, bool),
            texts=["\\boxed{1}", "\\boxed{hang}", "\\boxed{2}", "\\boxed{3}"])

    def fake_check(preds, golds, **kw):  # the "hang" prediction times out
        from exprl_jax.rewards.answers import AnswerCheck

        return [AnswerCheck(False, p, "timeout") if p == "hang" else AnswerCheck(p == g, p, None if p == g else
                "not_equivalent") for p, g in zip(preds, golds)]

    monkeypatch.setattr(rollouts_lib, "sample_rollouts", fake_sample)
    monkeypatch.setattr(sparse, "check_answers", fake_check)
    report = evaluate_policy(None, None, None, records, jax.random.key(0), num_samples=2, temperature=0.8,
                             max_new_tokens=4, template="{problem}", answer_style="boxed", eos=(1,), pad=0)
    m = report["metrics"]
    # p0: 1 of 1 judged (the timeout is excluded, not wrong); p1: 1 of 2 -> pass@1 = (1 + 0.5) / 2
    assert m["no_verdict"] == 1 and m["pass@1"] == pytest.approx(0.75)
    assert [(p["correct"], p["samples"]) for p in report["per_problem"]] == [(1, 1), (1, 2)]
    assert m["pass@2"] == pytest.approx(1.0)  # only p1 has two verdicts: pass@2 over it alone
