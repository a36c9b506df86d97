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
