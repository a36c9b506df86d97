"""The real-data configs: ExpRL-Outcome on GSM8K / MATH through TFDS, with the judge served by
`python -m exprl_jax.serve`. On the CPU: a tiny random policy and the tiny stand-in judge (assets/tiny_judge), run
end to end: the judge is called over HTTP, its answers are parsed, and its (varying) rewards reach the update."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SHARED_DATA

from exprl_jax.config import load_config

CONFIGS = os.path.join(ROOT, "experiments", "configs")
TINY_JUDGE = os.path.join(ROOT, "assets", "tiny_judge")


def config_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, tfds_name, answer_style", [("gsm8k_exprl", "exprl_qa/gsm8k", "auto"),
                                                            ("math_exprl", "exprl_qa/math", "boxed")])
def test_cpu_and_real_variants(name, tfds_name, answer_style):
    from exprl_jax.config import ExperimentConfig, from_dict

    cpu = load_config(os.path.join(CONFIGS, f"{name}.py"))
    assert (cpu.data.source, cpu.data.tfds_name, cpu.data.answer_style) == ("tfds", tfds_name, answer_style)
    assert cpu.model.preset == "tiny" and cpu.judge.backend == "openai" and cpu.judge.model == "tiny_judge"
    assert cpu.judge.base_url == "http://127.0.0.1:8000/v1" and cpu.method == "exprl_outcome"
    real = from_dict(ExperimentConfig, config_module(name).get_config("real").to_dict())
    assert (real.data.tfds_name, real.model.dtype, real.rollout.group_size, real.judge.api_key_env) == (
        tfds_name, "bfloat16", 10, "")
    assert real.data.chat_template and real.optim.learning_rate == 1e-6  # the paper's settings (SPEC §5)
    with open(os.path.join(CONFIGS, f"{name}.py")) as f:
        docstring = f.read()
    assert "python -m exprl_jax.serve --model assets/tiny_judge --port 8000" in docstring
    assert f"--config=experiments/configs/{name}.py:real" in docstring


def test_the_tiny_judge_answers_in_the_rubric_format():
    """References as traces get 5, empty traces 1, and every answer parses (assets/tiny_judge/README.md)."""
    import numpy as np

    from exprl_jax.judge.local import LocalBackend
    from exprl_jax.judge.reward import JudgeReward
    from exprl_jax.rewards.base import RewardBatch, score_sync

    backend = LocalBackend.from_hf(TINY_JUDGE, max_tokens=48, batch_size=8)
    references = ["Tom has 2 + 3 = <<2+3=5>>5 apples.\n#### 5", "She pays 4 * 3 = <<4*3=12>>12 dollars.\n#### 12"]
    traces = references + ["", "", "zq8#1", "Hence 12."]
    batch = RewardBatch(problems=["How many apples?", "How much?"] * 3, references=references * 3,
                        answers=["5", "12"] * 3, responses=traces, truncated=np.zeros(6, bool), group_size=1)
    result = score_sync(JudgeReward(backend), batch)
    assert result.valid.all()
    assert list(result.scores[:4]) == [1.0, 1.0, 0.0, 0.0] and set(result.scores[4:]) <= {0.25, 0.75}


def start_judge_server():
    """`python -m exprl_jax.serve` on a free port; returns (process, base URL)."""
    server = subprocess.Popen([sys.executable, "-m", "exprl_jax.serve", "--model", TINY_JUDGE, "--port", "0",
                               "--max-tokens", "64"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    deadline, lines = time.time() + 300, []
    while time.time() < deadline:
        line = server.stdout.readline()
        lines.append(line)
        found = re.search(r"serving \S+ on (http://\S+/v1)", line)
        if found:
            return server, found.group(1)
        if not line and server.poll() is not None:
            break
    server.kill()
    raise RuntimeError("the judge server did not start:\n" + "".join(lines[-20:]))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="needs ../shared/data")
def test_gsm8k_config_runs_end_to_end_with_a_served_tiny_judge(tmp_path):
    from exprl_jax.experiment import Experiment
    from exprl_jax.metrics import read_metrics

    server, base_url = start_judge_server()
    try:
        cfg = load_config(os.path.join(CONFIGS, "gsm8k_exprl.py"), **{
            "data.tfds_data_dir": str(tmp_path / "tfds"), "judge.base_url": base_url, "train.steps": 2})
        results = Experiment(cfg, str(tmp_path / "run")).run()
    finally:
        server.terminate()
        server.wait(timeout=60)
    steps = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert sum(r["judge/calls_per_step"] for r in steps) > 0  # rollouts that ended reached the judge
    for r in steps:  # the server answered every call; the tiny judge's own answer may lack a score line (its
        # greedy output on some of these random-policy prompts), which makes that rollout unscored, never 0
        reasons = {k: v for k, v in r.items() if k.startswith("judge/unscored/")}
        assert set(reasons) <= {"judge/unscored/no_score_line"}, reasons
        assert r["reward/unscored_frac"] * 16 == sum(reasons.values())  # 4 prompts x 4 rollouts, one call each
        assert r["reward/unscored_frac"] < 0.5
    assert all(math.isfinite(r["loss/total"]) and "update/skipped" not in r for r in steps)
    assert any(r["reward/std"] > 0 for r in steps)  # varying rewards: non-zero advantages in the update
    with open(tmp_path / "run" / "judge_cache" / os.listdir(tmp_path / "run" / "judge_cache")[0]) as f:
        cached = [json.loads(line) for line in f if line.strip()]
    assert cached and all(re.search(r"\nScore: [1-5]$", entry["text"]) for entry in cached)
    assert results["eval_end"]["metrics"]["canary/unscored_frac"] < 1.0  # the canaries were judged too
