"""End to end through the one step loop: every method on the tiny model, outputs, exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, smoke_config
from exprl_jax.config import METHODS
from exprl_jax.data import step_indices
from exprl_jax.experiment import Experiment, ResumeRefused
from exprl_jax.metrics import read_metrics

COMMON_KEYS = {"loss/total", "grad/norm", "time/update_s"}
RL_KEYS = COMMON_KEYS | {"loss/policy", "kl/ref", "clip/frac_low", "clip/frac_high", "clip/frac_dual",
                         "reward/mean", "reward/unscored_frac", "reward/sparse_acc", "reward/no_correct_frac",
                         "response/length_mean", "entropy/mean", "time/sample_s", "time/reward_s"}
EXPECTED_KEYS = {
    "sft": COMMON_KEYS | {"loss/sft"},
    "grpo": RL_KEYS,
    "stage2": RL_KEYS - {"kl/ref"},  # Stage II has no KL term, so no reference pass
    "exprl_outcome": RL_KEYS | {"judge/latency_p50_s", "judge/cache_hit_frac", "judge/unscored_frac"},
    "exprl_process": RL_KEYS | {"segments/mean", "segments/single_frac", "judge/calls_per_step"},
    "self_distill": COMMON_KEYS | {"loss/distill", "distill/reverse_kl", "reward/sparse_acc", "time/sample_s"},
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_through_the_same_loop(method, tmp_path):
    cfg = smoke_config(**{"method": method, "train.steps": 2, "eval.at_start": False})
    results = Experiment(cfg, str(tmp_path)).run()
    rows = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "loss/total" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        missing = EXPECTED_KEYS[method] - set(row)
        assert not missing, f"{method}: metrics missing {sorted(missing)}"
        assert np.isfinite(row["loss/total"])
    assert len(results["params_sha256"]) == 64
    assert "pass@1" in results["eval_end"]["metrics"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["params_sha256"] == results["params_sha256"]
    assert (tmp_path / "final_hf" / "config.json").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # smoke saves every step


def test_step_indices_is_a_deterministic_cursor():
    first = [step_indices(10, 4, s, seed=3) for s in range(5)]
    assert first == [step_indices(10, 4, s, seed=3) for s in range(5)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10))  # epoch 0 is a permutation: every record once
    assert flat[:10] != list(range(10))
    assert step_indices(10, 4, 0, seed=3, shuffle=False) == [0, 1, 2, 3]


def _run(workdir, *extra, wait=True):
    cmd = [sys.executable, "experiments/run.py", "--config=experiments/configs/smoke.py", f"--workdir={workdir}",
           "--config.train.steps=4", "--config.eval.at_start=false", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", ["false", "true"])
def test_resume_after_sigkill_is_bitwise_and_refuses_other_configs(tmp_path, overlap, toy_base):
    """SIGKILL in the middle of step 3, re-run the same command: the final params are bit-identical to an
    uninterrupted run's. With judge.overlap the rollouts of the next step are already sampled at each checkpoint:
    they are saved with it, so the resumed run trains on exactly the same samples. The judge is an HTTP server
    that takes 0.3 s a call, so each step lasts long enough to be interrupted inside it."""
    from judge_fault_server import FaultServer

    server = FaultServer(fault_rate=0.0, delay_s=0.3)
    url = server.start()
    extra = (f"--config.judge.overlap={overlap}", f"--config.model.init_checkpoint={toy_base}",
             "--config.judge.backend=openai", f"--config.judge.base_url={url}", "--config.judge.model=slow")
    try:
        _check_sigkill_resume(tmp_path, extra)
    finally:
        server.close()


def _check_sigkill_resume(tmp_path, extra):
    full = _run(tmp_path / "full", *extra)
    assert full.returncode == 0, full.stdout + full.stderr
    expected = json.loads((tmp_path / "full" / "results.json").read_text())["params_sha256"]

    killed_dir = tmp_path / "killed"
    proc = _run(killed_dir, *extra, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed_dir / "checkpoints" / "2").exists():
        time.sleep(0.05)
    time.sleep(0.15)  # inside step 3 (which waits >= 0.3 s on its judge calls)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "results.json").exists(), "the run finished before it could be killed"

    resumed = _run(killed_dir, *extra)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    got = json.loads((killed_dir / "results.json").read_text())["params_sha256"]
    assert got == expected
    steps = [r["step"] for r in read_metrics(str(killed_dir / "metrics.jsonl")) if "loss/total" in r]
    assert steps == [1, 2, 3, 4]  # rows of the interrupted step were dropped, none duplicated

    again = _run(killed_dir, *extra)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr

    other = _run(killed_dir, *extra, "--config.optim.learning_rate=0.5")
    assert other.returncode != 0
    assert "optim.learning_rate" in other.stdout + other.stderr


def test_resume_with_another_config_is_refused_in_process(tmp_path):
    Experiment(smoke_config(**{"train.steps": 1, "eval.at_start": False, "eval.at_end": False}),
               str(tmp_path))._check_config()
    with pytest.raises(ResumeRefused, match=r"rollout\.group_size"):
        Experiment(smoke_config(**{"train.steps": 1, "eval.at_start": False, "eval.at_end": False,
                                   "rollout.group_size": 2}), str(tmp_path))._check_config()


def test_stage2_starts_from_a_stage1_checkpoint(tmp_path):
    """Stage II loads the Stage-I run's final params (SPEC §2: only the starting checkpoint differs)."""
    from exprl_jax.build import build_model, params_sha256

    stage1 = smoke_config(**{"method": "sft", "train.steps": 2, "eval.at_start": False, "eval.at_end": False})
    first = Experiment(stage1, str(tmp_path / "stage1")).run()
    stage2 = smoke_config(**{"method": "stage2", "model.init_checkpoint": str(tmp_path / "stage1"),
                             "train.steps": 1, "eval.at_start": False, "eval.at_end": False})
    _, params, _ = build_model(stage2)
    assert params_sha256(params) == first["params_sha256"]
    resolved = Experiment(stage2, str(tmp_path / "stage2")).cfg.loss
    assert (resolved.kl_coef, resolved.entropy_coef, resolved.scale_by_std) == (0.0, 1e-4, "false")


def test_reference_never_reaches_the_policy_tokens():
    """Rollout prompts are built from `problem` alone: a marker planted in every reference never appears."""
    from exprl_jax.data import QARecord
    from exprl_jax.rollouts import encode_prompts
    from exprl_jax.tokenizer import char_tokenizer

    tok = char_tokenizer()
    records = [QARecord(id=str(i), problem=f"{i}+{i}=?", reference=f"SECRET{i} {i}+{i}={2 * i}", answer=str(2 * i))
               for i in range(5)]
    for record, ids in zip(records, encode_prompts(tok, records, "{problem}\n")):
        text = tok.decode(ids)
        assert record.problem in text and "SECRET" not in text and record.reference not in text


def test_jsonl_data_with_skipped_rows_is_counted_in_metrics(tmp_path):
    from exprl_jax.data import QARecord, write_jsonl

    path = tmp_path / "train.jsonl"
    write_jsonl(path, [QARecord(id=str(i), problem=f"{i}+1=?", reference=f"{i}+1={i + 1}###\\boxed{{{i + 1}}}",
                                answer=str(i + 1)) for i in range(8)])
    with open(path, "a") as f:
        f.write('{"id": "bad", "problem": "1+1=?", "reference": "", "answer": "2"}\n')
    cfg = smoke_config(**{"method": "sft", "train.steps": 1, "eval.at_start": False, "eval.at_end": False,
                          "data.source": "jsonl", "data.train_path": str(path), "data.on_bad_row": "skip"})
    Experiment(cfg, str(tmp_path / "run")).run()
    row0 = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))[0]
    assert row0["step"] == 0 and row0["data/skipped"] == 1 and row0["data/skipped/reference: empty"] == 1


def test_first_update_is_on_policy_at_any_temperature(tmp_path):
    """Sampling, old, new and reference log-probs share one temperature-scaled distribution: before any update
    the importance ratio is 1 and the KL to the reference 0. (A trainer scoring at temperature 1 while sampling
    at 0.6 gives ratios far from 1.)"""
    cfg = smoke_config(**{"method": "grpo", "train.steps": 1, "eval.at_start": False, "eval.at_end": False,
                          "rollout.temperature": 0.6, "loss.ppo_mini_batch_size": 0})
    Experiment(cfg, str(tmp_path)).run()
    row = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "loss/total" in r][0]
    assert abs(row["ratio/max"] - 1.0) < 1e-4 and abs(row["ratio/mean"] - 1.0) < 1e-5
    assert abs(row["kl/ref"]) < 1e-6 and row["clip/frac_low"] == 0.0 and row["clip/frac_high"] == 0.0


def test_chat_template_prompts_wrap_only_the_problem():
    from exprl_jax.data import QARecord
    from exprl_jax.rollouts import prompt_text
    from exprl_jax.tokenizer import char_tokenizer

    tok = char_tokenizer()
    record = QARecord(id="a", problem="2+2=?", reference="SECRET 2+2=4", answer="4")
    with pytest.raises(ValueError, match="no chat template"):
        prompt_text(tok, record, "{problem}", chat=True)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert prompt_text(tok, record, "Q: {problem}", chat=True) == "<user>Q: 2+2=?<assistant>"
    assert prompt_text(tok, record, "Q: {problem}") == "Q: 2+2=?"
