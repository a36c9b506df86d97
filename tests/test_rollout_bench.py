"""benchmarks/rollout.py's table from hand-made worker results: speeds are medians of generated tokens / second over
every timed repeat, ratios are the engine's speed over each side's, waste is the engine's own count or, for a fixed
batch (HF), 1 - mean length / longest length."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import rollout  # noqa: E402


def _result(seconds, new_tokens, lengths, waste=None):
    workload = {"seconds": seconds, "new_tokens": new_tokens, "lengths": lengths}
    if waste is not None:
        workload["waste"] = waste
    return {"fixed": workload, "variable": workload}


def test_table_speeds_ratios_and_waste_by_hand():
    runs = {"jax:sample": [_result([1.0, 2.0], [400, 400], {"mean": 10, "max": 40}, waste=[0.1, 0.3]),
                           _result([4.0], [400], {"mean": 10, "max": 40}, waste=[0.2])],
            "torch:sample_static": [_result([2.0, 4.0, 8.0], [400, 400, 400], {"mean": 10.0, "max": 40})]}
    rows = {(r["workload"], r["side"]): r for r in rollout.summarise(runs)}
    engine = rows[("fixed", rollout.SIDES["jax:sample"])]
    hf = rows[("variable", rollout.SIDES["torch:sample_static"])]
    assert engine["new_tok_s"] == 200.0  # median of 400, 200, 100
    assert hf["new_tok_s"] == 100.0  # median of 200, 100, 50
    assert engine["engine_ratio"] == 1.0 and hf["engine_ratio"] == 2.0
    assert engine["waste"] == pytest.approx(0.2)  # median over runs of each run's median: 0.2, 0.2
    assert hf["waste"] == pytest.approx(0.75)  # 1 - 10 / 40
    text = rollout.format_table("toy", {"prompts": 4, "new_tokens": 8, "var_new_tokens": 16, "var_eos": 3}, list(
        rows.values()))
    assert "2.00x" in text and "75.0%" in text
