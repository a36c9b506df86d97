"""The judge inside the training loop: overlap with sampling, a faulty judge server, cache hits on resume,
canaries at evaluation, stored rubrics."""
import asyncio
import json
import os
import shutil

import numpy as np
import pytest

from conftest import smoke_config
from exprl_jax.experiment import Experiment
from exprl_jax.metrics import read_metrics
from judge_fault_server import FaultServer


def _train_rows(workdir):
    return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss/total" in r]


def _score_answer(messages):
    # a deterministic judge: the score depends on the trace text only, so retried calls agree
    user = messages[-1]["content"]
    return f"Reasoning: checked.\nScore: {1 + sum(map(ord, user[-200:])) % 5}"


def test_outcome_run_against_a_faulty_judge_server_completes(tmp_path):
    """30% injected faults (5xx, 429 + Retry-After, timeouts, malformed JSON, empty choices, bad scores, dropped
    connections): the run completes, failed rows are unscored and masked out, and every count matches."""
    server = FaultServer(fault_rate=0.3, seed=1, answer_fn=_score_answer, slow_s=1.0, retry_after_s=0.05)
    with server as url:
        cfg = smoke_config(**{"train.steps": 3, "eval.at_start": False, "eval.at_end": False,
                              "judge.backend": "openai", "judge.base_url": url, "judge.model": "fault-judge",
                              "judge.timeout_s": 0.5, "judge.max_retries": 1, "judge.cache": False})
        Experiment(cfg, str(tmp_path)).run()
    rows = _train_rows(str(tmp_path))
    assert len(rows) == 3
    n = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    for row in rows:
        assert np.isfinite(row["loss/total"])
        assert row["reward/unscored_frac"] == pytest.approx(row["judge/unscored_frac"] * row["judge/calls"] / n)
    total_unscored = sum(row["reward/unscored_frac"] * n for row in rows)
    assert total_unscored > 0, "30% faults with one retry must leave some rows unscored"
    assert total_unscored < 3 * n, "most rows must still be scored"
    # every request the server saw is a first try or a retry that the client reported
    assert server.counts["requests"] == sum(row["judge/calls"] + row["judge/retries"] for row in rows)
    reasons = {k for row in rows for k in row if k.startswith("judge/unscored/")}
    assert reasons, "unscored rows must be counted by reason"


def test_unscored_rows_are_excluded_from_advantages():
    """A rollout the judge failed on gets mask 0 and advantage 0, and the group statistics ignore it."""
    from exprl_jax import advantages

    rewards = np.array([1.0, 0.0, np.nan, 0.5])
    valid = np.array([True, True, False, True])
    adv = advantages.grpo(rewards, 4, valid=valid)
    # valid mean 0.5, sample std 0.5: (1 - .5)/.5 = 1, (0 - .5)/.5 = -1, (.5 - .5) = 0; the unscored row gets 0
    np.testing.assert_allclose(adv, [1.0, -1.0, 0.0, 0.0], atol=1e-5)


@pytest.mark.parametrize("overlap", [False, True])
def test_judge_hidden_fraction_with_a_slow_judge(tmp_path, overlap, toy_base):
    """Overlap samples step t+1 while the judge scores step t: the judge's wall time hides behind device work.
    (From the toy base, whose rollouts end with EOS and so reach the judge.)"""
    with FaultServer(fault_rate=0.0, answer_fn=_score_answer, delay_s=0.3) as url:
        cfg = smoke_config(**{"train.steps": 3, "eval.at_start": False, "eval.at_end": False, "loss.kl_coef": 0.0,
                              "judge.backend": "openai", "judge.base_url": url, "judge.model": "slow-judge",
                              "judge.overlap": overlap, "judge.cache": False, "model.init_checkpoint": toy_base})
        Experiment(cfg, str(tmp_path)).run()
    rows = _train_rows(str(tmp_path))
    hidden = [r["time/judge_hidden_frac"] for r in rows[:-1]]  # the last step has no next step to sample
    assert all(r["time/reward_s"] >= 0.3 for r in rows)
    if overlap:
        assert np.mean(hidden) > 0.05 and all(r["time/device_while_judging_s"] > 0 for r in rows[:-1])
    else:
        assert np.mean(hidden) < 0.05


def test_resumed_step_hits_the_judge_cache(tmp_path):
    cfg = smoke_config(**{"train.steps": 2, "eval.at_start": False, "eval.at_end": False})
    Experiment(cfg, str(tmp_path)).run()
    first = _train_rows(str(tmp_path))[-1]
    assert first["judge/cache_hit_frac"] < 1.0
    # forget step 2 as if the process had died right before its checkpoint: it is recomputed identically
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    os.remove(tmp_path / "results.json")
    Experiment(cfg, str(tmp_path)).run()
    again = _train_rows(str(tmp_path))[-1]
    assert again["step"] == 2 and again["judge/cache_hit_frac"] == 1.0  # nothing paid twice
    assert again["loss/total"] == first["loss/total"]


def test_canaries_are_scored_at_every_evaluation(tmp_path):
    cfg = smoke_config(**{"train.steps": 1})
    results = Experiment(cfg, str(tmp_path)).run()
    for key in ("eval_start", "eval_end"):
        metrics = results[key]["metrics"]
        assert 0.0 <= metrics["canary/reward_mean"] <= 0.25, metrics  # the programmatic judge is not fooled
        assert metrics["canary/alarm"] == 0.0
        assert "canary/bare_answer_mean" in metrics


def test_rubrics_built_once_stored_and_used(tmp_path):
    from exprl_jax.data import QARecord
    from exprl_jax.judge.backend import Completion
    from exprl_jax.judge.reward import JudgeReward
    from exprl_jax.judge.rubric import build_rubrics, load_rubrics, save_rubrics
    from exprl_jax.rewards.base import RewardBatch

    class Backend:
        model, decoding = "fake", {}

        def __init__(self):
            self.seen = []

        async def complete(self, messages):
            self.seen.append(messages)
            if "checkpoints" in messages[0]["content"] and "JSON" in messages[0]["content"]:
                return Completion(text='{"checkpoints": ["x = 5", "the answer is 10"]}')
            return Completion(text="Reasoning: ok\nScore: 5")

        async def aclose(self):
            pass

    records = [QARecord(id="a", problem="P1", reference="x=5 so 10", answer="10"),
               QARecord(id="b", problem="P2", reference="y=1", answer="1")]
    backend = Backend()
    rubrics, failures = asyncio.run(build_rubrics(backend, records))
    assert rubrics == {"P1": ["x = 5", "the answer is 10"], "P2": ["x = 5", "the answer is 10"]} and not failures
    path = str(tmp_path / "rubrics.json")
    save_rubrics(path, rubrics, template_key="rubric-builder.v1", judge_model="fake")
    assert load_rubrics(path) == rubrics
    again, _ = asyncio.run(build_rubrics(backend, records, existing=load_rubrics(path)))
    assert len(backend.seen) == 2  # nothing re-asked
    judge = JudgeReward(backend, rubrics=load_rubrics(path))
    batch = RewardBatch(problems=["P1"], references=["x=5 so 10"], answers=["10"], responses=["x=5"],
                        truncated=np.zeros(1, bool), group_size=1)
    asyncio.run(judge.score(batch))
    assert "the answer is 10" in backend.seen[-1][0]["content"] + backend.seen[-1][1]["content"]
    with open(path, "w") as f:
        json.dump({"format": "exprl-rubrics-v1", "rubrics": [{"problem": "P", "checkpoints": []}]}, f)
    with pytest.raises(ValueError, match=r"rubrics\[0\]: field 'checkpoints'"):
        load_rubrics(path)


def test_a_dead_judge_skips_updates_then_stops_the_run(tmp_path, toy_base):
    """Every judge call fails: those rollouts are unscored (never 0) and after judge.max_unscored_steps such
    steps the run stops with a clear error, keeping its last checkpoint; a step with no scored rollout at all
    takes no update (AdamW would still decay the weights)."""
    with FaultServer(fault_rate=1.0, faults=("http_503",), retry_after_s=0.01) as url:
        cfg = smoke_config(**{"train.steps": 5, "eval.at_start": False, "eval.at_end": False,
                              "judge.backend": "openai", "judge.base_url": url, "judge.model": "down",
                              "judge.max_retries": 0, "judge.max_unscored_steps": 2, "judge.cache": False,
                              "model.init_checkpoint": toy_base})
        with pytest.raises(RuntimeError, match="judge looks unavailable"):
            Experiment(cfg, str(tmp_path)).run()
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["judge/unscored_frac"] == 1.0 and r["judge/unscored/http_503"] == r["judge/calls"] for r in rows)
    for r in rows:  # unscored rows are masked out; a step where only those remain is skipped
        assert (r.get("update/skipped") == 1.0) == (r["reward/unscored_frac"] == 1.0)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
