"""benchmarks/compare.py at toy size: every side runs in its own process and the JSON report is written. Speeds are
not asserted (the machine is shared); what is asserted is that both sides did the same work: the same first loss
on the same weights and batch, the same token counts, exactly R new tokens in both RL steps."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None


def test_shared_inputs_are_deterministic_and_well_formed():
    spec = compare.WORKLOADS["toy"]
    a, b = compare.train_batch(spec["train"], 128), compare.train_batch(spec["train"], 128)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    R = spec["train"]["response_len"]
    assert a["tokens"].shape == (spec["train"]["rows"], spec["train"]["prompt_len"] + R)
    # the attention mask is the prompt plus the response mask; nothing is scored off the mask
    assert np.array_equal(a["attention_mask"][:, -R:], a["response_mask"])
    assert not a["old_logprobs"][a["response_mask"] == 0].any()
    eos = compare.variable_eos_ids(spec["sample"])
    assert len(eos) == spec["sample"]["var_eos"] and eos[0] == 1
    assert not np.isin(compare.sample_prompts(spec["sample"], 128), eos).any()  # no prompt token is an EOS id
    assert {len(p) for p in compare.rl_problems(spec["rl"], 6)} == {spec["rl"]["prompt_len"] - 1}


def test_length_stats_by_hand():
    s = compare.length_stats([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    # numpy's linear percentiles of 1..10: p10 = 1 + 0.9 = 1.9, p90 = 1 + 8.1 = 9.1
    assert (s["min"], s["max"], s["mean"]) == (1, 10, 5.5)
    assert s["p10"] == pytest.approx(1.9) and s["p90"] == pytest.approx(9.1)
    assert s["spread_max_over_min"] == 10.0


def test_tokenizer_of_size_decodes_every_id():
    tok = compare.tokenizer_of_size(300)
    assert len(tok) == 300
    assert all(tok.decode([i]) for i in range(4, 300))  # every non-special id is a character


def test_summarise_ratios():
    runs = {"jax:train": [{"step_s": [1.0, 2.0, 3.0], "tokens": 100}],
            "torch:train": [{"step_s": [4.0], "tokens": 100}],
            "jax:rl": [{"step_s": [0.5]}], "torch:rl": [{"step_s": [2.0]}]}
    rows = {r["pair"]: r for r in compare.summarise(runs)}
    assert rows["train"]["ours_speed"] == 50.0 and rows["train"]["ratio"] == 2.0  # median 2 s vs 4 s
    assert rows["rl"]["ratio"] == 4.0


def test_rl_parts_by_hand():
    # per part: the median over processes of each process's median; a side without a breakdown is left out
    runs = {"jax:rl": [{"breakdown_median_s": {"time/sample_s": 1.0, "time/reward_s": 0.0,
                                               "time/device_while_judging_s": 0.5, "time/update_s": 2.0}},
                       {"breakdown_median_s": {"time/sample_s": 2.0, "time/reward_s": 0.2,
                                               "time/device_while_judging_s": 1.5, "time/update_s": 3.0}}],
            "torch:rl": [{"step_s": [9.0]}]}
    parts = compare.rl_parts(runs)
    assert parts == {"exprl_jax Experiment": {"sample": 1.5, "reward": 0.1, "reference": 1.0, "update": 2.5}}
    assert compare.format_rl_parts(parts) == ("RL step parts (s, medians): exprl_jax Experiment sample 1.50, "
                                              "reward 0.10, reference 1.00, update 2.50")


def test_train_mfu_by_hand():
    # 1,000 tokens in a 1 s step, 1e6 parameters: 6e9 FLOP/s over a 1 TFLOP/s peak = 0.6%
    runs = {"jax:train": [{"step_s": [1.0], "tokens": 1000, "params": 10 ** 6}],
            "torch:train": [{"step_s": [2.0], "tokens": 1000, "params": 10 ** 6}]}
    mfu = compare.train_mfu(runs, 1.0)
    assert mfu == {"exprl_jax": pytest.approx(0.006), "PyTorch eager": pytest.approx(0.003)}
    assert compare.train_mfu(runs, 0.0) == {}  # no peak given: no MFU


@pytest.mark.slow
def test_compare_runs_at_toy_size_and_writes_json(tmp_path):
    pairs = "train,sample,rl" if HAS_TRL else "train,sample"
    out = tmp_path / "compare.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare.py"), "--preset", "toy", "--rounds",
                    "1", "--pairs", pairs, "--threads", "1", "--peak-tflops", "1", "--workdir", str(tmp_path / "w"),
                    "--out", str(out)],
                   check=True, timeout=900, cwd=ROOT)
    report = json.loads(out.read_text())
    assert {r["pair"] for r in report["table"]} == set(pairs.split(","))
    assert all(r["ratio"] > 0 for r in report["table"])
    assert set(report["train_mfu"]) == {"exprl_jax", "PyTorch eager"}
    assert "loadavg_1m" in report["cpu_during_run"] and "top_other_processes_cpu_s" in report["cpu_during_run"]
    runs = report["runs"]
    # --threads 1 pins every worker to one CPU: no side used more than one core
    for side, results in runs.items():
        assert results[0]["process"]["cpus"] == compare.worker_cpus(1) and len(compare.worker_cpus(1)) == 1
        assert 0 < results[0]["process"]["cores_used"] <= 1.05, side
    assert "cores used" in report["table_text"]
    # the same loss on the same weights and batch, step after step (AdamW and clipping agree too)
    ours, torch_ = runs["jax:train"][0], runs["torch:train"][0]
    np.testing.assert_allclose(ours["losses"], torch_["losses"], rtol=1e-5)
    assert ours["tokens"] == torch_["tokens"]
    spec = report["workloads"]["sample"]
    for side in ("jax:sample", "torch:sample_static", "torch:sample_dynamic"):
        result = runs[side][0]
        assert result["fixed"]["new_tokens"] == [spec["prompts"] * spec["new_tokens"]] * spec["steps"]
        assert result["variable"]["lengths"]["max"] <= spec["var_new_tokens"]
    if HAS_TRL:
        rl = report["workloads"]["rl"]
        assert runs["jax:rl"][0]["response_length_mean"] == rl["new_tokens"]
        assert runs["torch:rl"][0]["completion_tokens"] == rl["new_tokens"]
        assert len(runs["torch:rl"][0]["step_s"]) == rl["steps"]
        # where each RL step goes: TRL's generation, its rewards + reference log-probs, the rest of its step
        trl = runs["torch:rl"][0]["breakdown_median_s"]
        assert set(trl) == {"generate", "reward_and_reference", "update"} and all(v > 0 for v in trl.values())
        assert all(v <= max(runs["torch:rl"][0]["step_s"]) for v in trl.values())
        assert set(report["rl_parts"]) == {"exprl_jax Experiment", "TRL GRPOTrainer"}
        assert "RL step parts" in report["table_text"]


def test_ignore_eos_samples_exactly_max_new_tokens():
    """rollout.ignore_eos (the knob behind "exactly R new tokens"): with every token an EOS id, rollouts stop after
    one token, unless EOS is ignored; then every row has max_new_tokens tokens and counts as truncated."""
    import jax
    from conftest import random_params

    from exprl_jax.config import RolloutSection
    from exprl_jax.data import QARecord
    from exprl_jax.models.config import ModelConfig
    from exprl_jax.rollouts import sample_rollouts

    cfg = ModelConfig.tiny()
    params, tokenizer = random_params(cfg), compare.tokenizer_of_size(cfg.vocab_size)
    records = [QARecord(id="a", problem="1+2", reference="3", answer="3")]
    every_token = tuple(range(cfg.vocab_size))
    for ignore, length in ((False, 1), (True, 6)):
        r = sample_rollouts(cfg, params, tokenizer, records, jax.random.key(0), template="{problem}\n",
                            rollout_cfg=RolloutSection(group_size=3, max_new_tokens=6, ignore_eos=ignore),
                            eos=every_token, pad=0)
        assert r.lengths.tolist() == [length] * 3
        assert r.truncated.tolist() == [ignore] * 3
