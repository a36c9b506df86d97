"""The miniature of the paper, CI-sized: every arm through Stage I and Stage II on the shipped testbed base, one
seed, a few steps each, and the RESULTS report written from their outputs."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

BASE = os.path.join(ROOT, "assets", "testbed_base", "model.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(BASE), reason="the testbed base checkpoint is not shipped yet")
def test_quick_replication_runs_every_arm(tmp_path):
    report = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "experiments/replicate.py", f"--workdir={tmp_path}", "--seeds=0",
                           "--quick", f"--results={report}"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    for arm in ("base", "sft", "grpo", "self_distill", "exprl_outcome", "exprl_process", "exprl_process_score"):
        assert f"| {arm} |" in text, arm
        assert (tmp_path / arm / "seed0" / "stage2" / "results.json").exists()
    assert "Segments per response" in text and "exprl_process, seed 0:" in text
    stage2_rows = text.split("## After Stage II")[1].split("##")[0]
    for arm in ("base", "exprl_outcome"):  # every arm's Stage II is evaluated, the base arm's too
        row = next(line for line in stage2_rows.splitlines() if line.startswith(f"| {arm} |"))
        assert row.split("|")[2].strip() != "n/a", row
    for stage in ("stage1", "stage2"):
        assert (tmp_path / "results" / f"pass_at_k_{stage}.png").stat().st_size > 1000


def _report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("replicate", os.path.join(ROOT, "experiments", "replicate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_tables_mean_std_and_kept_hand_written_section(tmp_path):
    replicate = _report_module()

    def report(p1, p16):
        return {"metrics": {"pass@1": p1, "pass@16": p16, "exact_pass@1": 0.0, "never_solved_frac": 1 - p16,
                            "response_length": 100.0}, "pass_at_k": {"1": p1, "16": p16}}

    results = {"base": {s: {"base": report(0.1 * (s + 1), 0.5), "stage2": report(0.2, 0.6),
                            "workdir": str(tmp_path / f"base{s}")} for s in (0, 1)}}
    path = tmp_path / "RESULTS.md"
    path.write_text("stale tables\n" + replicate.HAND_WRITTEN + "\nThe interpretation.\n")
    replicate.write_report(results, str(path), "python experiments/replicate.py", 120.0, [0, 1])
    text = path.read_text()
    assert "stale tables" not in text and text.endswith(replicate.HAND_WRITTEN + "\nThe interpretation.\n")
    assert "| base | 0.150 ± 0.050 | 0.500 ± 0.000 |" in text  # Stage I: the base arm's own evaluation
    assert "| base | 0.200 ± 0.000 | 0.600 ± 0.000 |" in text  # after Stage II
    assert "Wall time: 2.0 min" in text and (tmp_path / "results" / "pass_at_k_stage2.png").exists()
