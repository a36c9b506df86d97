"""The SFT loop end to end (the toy_base fixture: 120 steps of the tiny model on toy addition): the loss goes down,
Orbax keeps only the last checkpoints, and the trained model answers some problems."""
import json
import os

from exprl_jax.metrics import read_metrics


def test_sft_loss_goes_down_and_old_checkpoints_are_pruned(toy_base):
    rows = [r for r in read_metrics(os.path.join(toy_base, "metrics.jsonl")) if "loss/sft" in r]
    assert [r["step"] for r in rows] == list(range(1, 121))
    first = sum(r["loss/sft"] for r in rows[:5]) / 5
    last = sum(r["loss/sft"] for r in rows[-5:]) / 5
    assert last < 0.5 * first, (first, last)  # ~4.6 (uniform over the characters) falls well below half
    assert sorted(os.listdir(os.path.join(toy_base, "checkpoints")), key=int) == ["119", "120"]  # keep 2
    config = json.load(open(os.path.join(toy_base, "final_hf", "config.json")))
    assert config["architectures"] == ["Qwen3ForCausalLM"]
