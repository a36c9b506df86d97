"""`python -m exprl_jax.plan`: deviceless TPU compilation of every program of a step, one config that fits and one
made not to (the compiler's own verdict)."""
import subprocess
import sys

import pytest

from conftest import ROOT, smoke_config
from exprl_jax import plan

TINY_ON_V5E_16 = {"rollout.max_prompt_tokens": 32, "mesh.shape": (1, -1, 2), "train.micro_batch_size": 4,
                  "rollout.max_concurrent_rows": 8}


@pytest.mark.slow
def test_plan_compiles_every_program_of_a_step_and_finds_the_largest_slot_count():
    text, fits = plan.plan(smoke_config(**TINY_ON_V5E_16), "v5e-16")
    assert fits
    lines = text.splitlines()
    names = [line.split("  ")[0].strip() for line in lines]
    for program in ("update", "reference/recompute log-probs", "rollout prefill", "rollout insert (refill)",
                    "rollout decode"):
        assert program in names, text
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 2}" in lines[0]
    assert any(line.startswith("rollout: 16 rows through 8 slots; KV cache") for line in lines), text
    # 16 rows of the smoke step: every count up to all of them fits
    assert "largest rollout.max_concurrent_rows that fits on v5e-16: 16" in text
    assert lines[-1].startswith("fits on v5e-16: yes (peak ")


@pytest.mark.slow
def test_plan_exits_1_naming_the_program_that_does_not_fit():
    # 1024 rows of 65k tokens in one micro-batch: the update's temporaries are ~200 GiB per chip
    command = [sys.executable, "-m", "exprl_jax.plan", "--config=experiments/configs/smoke.py", "--topology=v5e-16",
               "--search_slots=false", "--config.rollout.max_prompt_tokens=32", "--config.mesh.shape=(1,-1,2)",
               "--config.rollout.max_new_tokens=65536", "--config.rollout.prompts_per_step=64",
               "--config.rollout.group_size=16", "--config.loss.ppo_mini_batch_size=0"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("fits on v5e-16: no (update: RESOURCE_EXHAUSTED"), out.stdout


def test_unknown_topology_is_named():
    with pytest.raises(ValueError, match="unknown topology 'v9-1'; known: .*v5p-32"):
        plan.topology_devices("v9-1")
