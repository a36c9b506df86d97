"""The miniature of the paper, CI-sized: every arm through Stage I and Stage II on the shipped testbed base, one
seed, a few steps each, and the RESULTS report (pre-registered section kept, verdict applied) written from them."""
import functools
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

BASE = os.path.join(ROOT, "assets", "testbed_base", "model.safetensors")
FAST_ARMS = "base,exact_step,exprl_outcome,wrong_reference,grpo,exprl_process,self_distill,sft,noisy_judge"


def _module(name):
    path = os.path.join(ROOT, "experiments", f"{name}.py")
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _replicate():
    return _module("replicate")  # once per process: it defines absl flags


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(BASE), reason="the testbed base checkpoint is not shipped yet")
def test_quick_replication_runs_every_arm(tmp_path):
    report = tmp_path / "RESULTS.md"
    rr = _module("replication_report")
    report.write_text(f"# x\n{rr.PRE_START}\nThe rule.\n{rr.PRE_END}\n{rr.HAND_WRITTEN}\nReading.\n")
    archive = tmp_path / "archive"
    proc = subprocess.run([sys.executable, "experiments/replicate.py", f"--workdir={tmp_path}", "--seeds=0",
                           "--quick", f"--results={report}", f"--arms={FAST_ARMS}", f"--archive={archive}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    assert text.index("Minimum detectable effects") < text.index("## After Stage I")
    assert f"{rr.PRE_START}\nThe rule.\n{rr.PRE_END}" in text and text.endswith(f"{rr.HAND_WRITTEN}\nReading.\n")
    assert "The verdict the pre-registered rule gives" in text
    for arm in FAST_ARMS.split(","):
        assert f"| {arm} |" in text, arm
        assert (tmp_path / arm / "seed0" / "summary.json").exists()
    for stage in ("stage1", "stage2"):
        assert (tmp_path / "results" / f"pass_at_k_{stage}.png").stat().st_size > 1000
    n = len(FAST_ARMS.split(","))
    assert "not yet" not in text  # every planned run finished: the verdict is final
    # the archive alone (a fresh machine with an empty workdir) continues the replication: nothing runs again and
    # the report is the same
    for arm in FAST_ARMS.split(","):
        assert (archive / arm / "seed0" / "summary.json").exists() and (archive / arm / "seed0" / "stage2").exists()
        assert not (archive / arm / "seed0" / "stage2" / "checkpoints").exists()  # only what the report reads
        assert (archive / arm / "seed0" / "code.json").exists()
    assert f"Code the runs were made with: {_replicate().code_version()} ({n} runs)." in text
    fresh, again = tmp_path / "fresh", tmp_path / "AGAIN.md"
    again.write_text(report.read_text())
    shutil.copytree(tmp_path / "cache", fresh / "cache")  # the base's evaluation (for the MDE): not re-sampled
    proc = subprocess.run([sys.executable, "experiments/replicate.py", f"--workdir={fresh}", "--seeds=0", "--quick",
                           f"--results={again}", f"--arms={FAST_ARMS}", f"--archive={archive}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("archived in") == n and not any((fresh / arm).exists() for arm in FAST_ARMS.split(","))
    body = lambda t: t[t.index("## The verdict"):]  # noqa: E731  (the command line names the other workdir)
    assert body(again.read_text()) == body(text)
    # a second seed is planned but not run: --report_only rewrites the report from the finished runs, marked
    proc = subprocess.run([sys.executable, "experiments/replicate.py", f"--workdir={tmp_path}", "--seeds=0,1",
                           "--quick", f"--results={report}", f"--arms={FAST_ARMS}", "--report_only"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    partial = report.read_text()
    assert f"**not yet: {n} of {2 * n} runs have finished.**" in partial and not (tmp_path / "base" / "seed1").exists()
    assert f"{rr.PRE_START}\nThe rule.\n{rr.PRE_END}" in partial and partial.endswith(f"{rr.HAND_WRITTEN}\nReading.\n")


def _report(reach, correct, samples=4):
    return {"per_problem": [{"reach": r, "correct": c, "samples": samples} for r, c in zip(reach, correct)],
            "pass_at_k": {"1": float(np.mean(correct)) / samples, "8": 0.0}, "metrics": {"exact_pass@1": 0.0}}


def _results(tmp_path, m_gain):
    """Two-rung summaries (k3, k4) for base, exact_step, exprl_outcome and wrong_reference over two seeds."""
    results = {}
    for arm, gain in (("base", 0), ("exact_step", 2), ("exprl_outcome", m_gain), ("wrong_reference", 0)):
        results[arm] = {}
        for seed in (0, 1):
            reach = [[4, 4 - min(gain, 2) * (i % 2 == 0), 0 + gain, 0 + gain // 2] for i in range(40)]
            rep = _report(reach, [0] * 40)
            ladder = {"k3": rep, "k4": rep}
            results[arm][seed] = {"summary": {"base": ladder, "stage1": ladder if arm != "base" else None,
                                              "stage2": ladder, "stage2_final": {"k4": rep}},
                                  "workdir": str(tmp_path / arm / f"s{seed}")}
    return results


def test_late_reach_and_the_verdict_rule(tmp_path):
    rr = _module("replication_report")
    # k = 4: late positions j = 3, 4; reach counts [4, 4, 2, 1] of 4 samples -> (2/4 + 1/4) / 2 = 0.375
    assert rr.late_reach_P(_report([[4, 4, 2, 1]], [0]), 4).tolist() == [0.375]
    rep = rr.Replication(_results(tmp_path, m_gain=2), "k4", 8)
    verdict, lines = rep.verdict()  # M gains beyond base and wrong reference, but no reward logs: no judge trend
    assert verdict == "inconclusive" and any("exprl_outcome" in line for line in lines)
    for arm in ("exprl_outcome",):  # a judge reward that rises over Stage I
        for seed in (0, 1):
            os.makedirs(tmp_path / arm / f"s{seed}" / "stage1")
            with open(tmp_path / arm / f"s{seed}" / "stage1" / "metrics.jsonl", "w") as f:
                for step in range(1, 41):
                    f.write(f'{{"step": {step}, "reward/mean": {0.1 + 0.005 * step + 0.001 * (step % 3)}}}\n')
    assert rep.verdict()[0] == "ExpRL works, the testbed is too small"
    null = rr.Replication(_results(tmp_path, m_gain=0), "k4", 8)
    assert null.verdict()[0] == "ExpRL does not work here"  # the positive control moved M, ExpRL did not
    no_control = rr.Replication({k: v for k, v in _results(tmp_path, 0).items() if k != "exact_step"}, "k4", 8)
    assert no_control.verdict()[0] == "inconclusive"


def test_arm_configs_follow_spec_and_the_default_is_the_outcome_arm():
    import dataclasses

    replicate = _replicate()
    if not replicate.flags.FLAGS.is_parsed():
        replicate.flags.FLAGS(["replicate"])
    from exprl_jax.config import load_config

    default = load_config(os.path.join(ROOT, "experiments", "configs", "default.py"))
    assert replicate.arm_config("exprl_outcome", 0) == default  # `python experiments/run.py` is this arm's seed 0
    lr = default.optim.learning_rate
    process = replicate.arm_config("exprl_process", 1)
    assert process.loss.ppo_mini_batch_size == 0 and process.process.context == "prefix" and process.seed == 1
    assert replicate.arm_config("self_distill", 0).optim.learning_rate == pytest.approx(lr / 10)  # SPEC §6
    assert replicate.arm_config("self_distill_lr1x", 0).optim.learning_rate == lr
    control = replicate.arm_config("exact_step", 0)
    assert (control.judge.backend, control.process.mode, control.method) == ("exact_step", "group", "exprl_process")
    assert replicate.arm_config("wrong_reference", 0).judge.reference == "other"
    assert replicate.arm_config("noisy_judge", 0).judge.noise == replicate.JUDGE_NOISE
    base = replicate.arm_config("base", 2)
    assert base.train.steps == 0 and dataclasses.replace(base, train=default.train, seed=0, name="default") == default


def test_code_provenance_is_recorded_per_run_and_counted_in_the_report(tmp_path):
    rep = _replicate()
    version = rep.code_version()
    assert version == "unknown" or len(version.split()[0]) == 10
    run = tmp_path / "exprl_outcome" / "seed0"
    assert rep.run_code(str(run)) == ["unknown"]
    rep.record_code(str(run), "aaaaaaaaaa")
    rep.record_code(str(run), "aaaaaaaaaa")  # resumed with the same code: listed once
    rep.record_code(str(run), "bbbbbbbbbb +local changes")
    assert rep.run_code(str(run)) == ["aaaaaaaaaa", "bbbbbbbbbb +local changes"]
    rep.archive_run(str(run), str(tmp_path / "archive"))
    assert rep.run_code(str(tmp_path / "archive")) == rep.run_code(str(run))
    results = {"base": {0: {"code": ["aaaaaaaaaa"]}, 1: {"code": ["aaaaaaaaaa"]}},
               "exprl_outcome": {0: {"code": rep.run_code(str(run))}, 1: {}}}  # seed 1: made before code.json
    assert rep._code_counts(results) == ("aaaaaaaaaa (2 runs); aaaaaaaaaa then bbbbbbbbbb +local changes (1 run); "
                                      "unknown (1 run)")
