"""Judge calibration (SPEC §7) and canaries (SPEC §9): the ProcessBench join on the real data, FPR / FNR /
misplacement on a hand-derived example with a scripted judge, the wrong-reference derangement, the written table,
the canary alarm, judge-vs-verifier agreement, and the calibrate_judge.py entry point end to end."""
import asyncio
import json
import logging
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA
from exprl_jax.data import QARecord
from exprl_jax.judge.backend import Completion
from exprl_jax.judge.calibration import (
    CANARY_RESPONSES, CalibrationItem, calibrate, judge_verifier_agreement, load_processbench, run_canaries,
    wrong_reference_indices, write_table)
from exprl_jax.judge.reward import JudgeReward

needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "processbench")),
                                reason=f"no ProcessBench copy under {SHARED_DATA}")
_FENCED = re.compile(r"^<<TRACE-(\w+)>>\n(.*?)^<<END-TRACE-\1>>$", re.M | re.S)


def fenced_trace(messages) -> str:
    return _FENCED.search(messages[-1]["content"]).group(2).rstrip("\n")


class ScriptedJudge:
    """Answers `script(trace, user_message)`: a str is the judge's text, a Completion is returned as is."""

    model, decoding = "scripted-judge", {"temperature": 0.0}

    def __init__(self, script):
        self.script = script

    async def complete(self, messages):
        answer = self.script(fenced_trace(messages), messages[-1]["content"])
        return answer if isinstance(answer, Completion) else Completion(text=answer)

    async def aclose(self):
        pass


# ---------------------------------------------------------------- join on the real data


@needs_data
def test_processbench_gsm8k_join_reports_unjoined():
    items, stats = load_processbench(SHARED_DATA, subsets=("gsm8k",))
    gsm8k = stats["gsm8k"]
    assert gsm8k["rows"] == 400 and gsm8k["joined"] + gsm8k["unjoined"] == 400
    assert gsm8k["joined"] >= 0.9 * 400 and len(items) == gsm8k["joined"]
    assert stats["total"]["unjoined"] == gsm8k["unjoined"]
    item = items[0]
    assert item.subset == "gsm8k" and item.reference_id.startswith("gsm8k/")
    assert "#### " in item.reference and item.answer in item.reference  # the worked solution, final after ####
    assert {i.correct for i in items} == {True, False}


@needs_data
def test_processbench_olympiadbench_counts_the_rows_that_do_not_join():
    # SOURCE.md: 986 of 1000 join by exact text (the other problems carry a "$\quad$" prefix in OlympiadBench).
    items, stats = load_processbench(SHARED_DATA, subsets=("olympiadbench",))
    assert (stats["olympiadbench"]["joined"], stats["olympiadbench"]["unjoined"]) == (986, 14)
    assert len(items) == 986 and stats["olympiadbench"]["first_unjoined"] is not None


# ---------------------------------------------------------------- FPR / FNR / misplacement by hand


def _items():
    # c* truly correct, i* truly incorrect; each its own problem and reference REF-<name>.
    return [CalibrationItem(id=name, subset="s" if name != "i3" else "t", problem=f"Problem {name}.",
                            trace=f"trace {name}", correct=name.startswith("c"), reference=f"REF-{name}",
                            answer="1", reference_id=f"ref/{name}") for name in ("c1", "c2", "c3", "i1", "i2", "i3")]


# correct_ref: c1 5, c2 4, c3 3 | i1 1, i2 4, i3 unparseable.
#   Scored: truly correct {c1, c2, c3}, truly incorrect {i1, i2}. N=4 is reward 0.75 = "correct", N=3 is not.
#   FN = {c3} → FNR = 1/3; FP = {i2} → FPR = 1/2; misplacement = (1/2 + 1/3) / 2 = 5/12.
#   (Counting the unscored i3 as a judged "incorrect" would give FPR = 1/3 and misplacement 1/3.)
# no_ref: every trace Score 5 → FPR 1, FNR 0, misplacement 1/2.
# wrong_ref: Score 2 everywhere, c1's call fails → scored 5; FPR 0, FNR 2/2 = 1, misplacement 1/2.
CORRECT_REF_SCORES = {"c1": 5, "c2": 4, "c3": 3, "i1": 1, "i2": 4}


def _script(trace, user_message):
    name = trace.split()[-1]
    refs = re.findall(r"REF-(\w+)", user_message)
    if not refs:
        return "Reasoning: no reference given.\nScore: 5"
    if refs == [name]:
        return f"Reasoning: checked.\nScore: {CORRECT_REF_SCORES[name]}" if name != "i3" else "I cannot decide."
    if name == "c1":
        return Completion(text=None, reason="timeout")
    return "Reasoning: a different problem.\nScore: 2"


def test_calibrate_rates_by_hand():
    backend = ScriptedJudge(_script)
    result = calibrate(_items(), lambda use_reference: JudgeReward(backend, use_reference=use_reference), seed=3)
    correct_ref = result["conditions"]["correct_ref"]
    assert (correct_ref["n"], correct_ref["n_correct"], correct_ref["n_incorrect"]) == (5, 3, 2)
    assert (correct_ref["false_positives"], correct_ref["false_negatives"]) == (1, 1)
    assert correct_ref["fpr"] == pytest.approx(1 / 2) and correct_ref["fnr"] == pytest.approx(1 / 3)
    assert correct_ref["misplacement"] == pytest.approx(5 / 12)
    assert correct_ref["unscored"] == 1 and correct_ref["unscored_reasons"] == {"unparseable:no_score_line": 1}
    no_ref = result["conditions"]["no_ref"]
    assert (no_ref["fpr"], no_ref["fnr"], no_ref["misplacement"], no_ref["unscored"]) == (1.0, 0.0, 0.5, 0)
    wrong_ref = result["conditions"]["wrong_ref"]
    assert (wrong_ref["n"], wrong_ref["fpr"], wrong_ref["fnr"], wrong_ref["misplacement"]) == (5, 0.0, 1.0, 0.5)
    assert wrong_ref["unscored_reasons"] == {"judge_failed:timeout": 1}
    # per subset: "t" holds only i3, unscored under correct_ref, so both rates are NaN there
    only_i3 = result["by_subset"]["correct_ref"]["t"]
    assert only_i3["n"] == 0 and only_i3["unscored"] == 1 and math.isnan(only_i3["fpr"])
    rows = {row["id"]: row for row in result["rows"]}
    assert rows["i3"]["correct_ref"] is None and rows["i3"]["correct_ref_unscored"] == "unparseable:no_score_line"
    assert rows["c2"]["correct_ref"] == 0.75 and rows["c1"]["wrong_reference_id"] != "ref/c1"


def test_wrong_reference_derangement_has_no_fixed_points():
    problems = ["a"] * 3 + ["b"] * 2 + ["c"] * 4 + ["d", "e", "f"]
    perm = wrong_reference_indices(problems, seed=0)
    assert sorted(perm) == list(range(len(problems)))  # a permutation: every reference used once
    assert all(problems[j] != problems[i] for i, j in enumerate(perm))  # another problem's, so never i itself
    assert (perm == wrong_reference_indices(problems, seed=0)).all()  # fixed by the seed
    assert any((wrong_reference_indices(problems, seed=s) != perm).any() for s in range(1, 5))
    with pytest.raises(ValueError, match="share one problem"):
        wrong_reference_indices(["a", "a", "b"], seed=0)


def test_write_table(tmp_path):
    backend = ScriptedJudge(_script)
    result = calibrate(_items(), lambda use_reference: JudgeReward(backend, use_reference=use_reference))
    md_path, json_path = write_table(result, str(tmp_path / "out"))
    table = open(md_path).read()
    assert "| condition | n | truly correct / incorrect | FPR | FNR | misplacement | unscored |" in table
    assert "| correct_ref | 5 | 3 / 2 | 50.0% | 33.3% | 41.7% | 1 |" in table
    assert "| no_ref | 6 | 3 / 3 | 100.0% | 0.0% | 50.0% | 0 |" in table
    with open(json_path) as f:
        written = json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} written"))
    assert written["conditions"]["correct_ref"]["n"] == 5 and written["by_subset"]["correct_ref"]["t"]["fpr"] is None


# ---------------------------------------------------------------- canaries and judge-vs-verifier agreement

RECORDS = [QARecord(id="r1", problem="What is 2 + 3?", reference="2 + 3 = 5. \\boxed{5}", answer="5"),
           QARecord(id="r2", problem="What is 4 * 3?", reference="4 * 3 = 12. \\boxed{12}", answer="12")]


def _canaries(script, caplog):
    with caplog.at_level(logging.WARNING, logger="exprl_jax.judge.calibration"):
        return asyncio.run(run_canaries(JudgeReward(ScriptedJudge(script)), RECORDS))


def test_canaries_alarm_when_everything_scores_5(caplog):
    metrics = _canaries(lambda trace, _: "Reasoning: fine.\nScore: 5", caplog)
    assert metrics["canary/alarm"] == 1.0 and metrics["canary/reward_mean"] == 1.0
    assert metrics["canary/reward_max"] == 1.0 and metrics["canary/unscored_frac"] == 0.0
    assert all(metrics[f"canary/{name}_mean"] == 1.0 for name in CANARY_RESPONSES)
    assert "canary alarm" in caplog.text and "'empty'" in caplog.text  # names the worst canary (first of the ties)


def test_canaries_quiet_when_everything_scores_1(caplog):
    metrics = _canaries(lambda trace, _: "Reasoning: no work.\nScore: 1", caplog)
    assert metrics["canary/alarm"] == 0.0 and metrics["canary/reward_mean"] == 0.0 and "alarm" not in caplog.text


def test_one_master_key_raises_the_alarm_and_unscored_canaries_are_counted(caplog):
    seen = []

    def script(trace, _):
        seen.append(trace)
        if trace == ":":
            return "Reasoning: matches.\nScore: 5"
        return "no verdict" if trace == "" else "Reasoning: no.\nScore: 1"

    metrics = _canaries(script, caplog)
    # ":" scores 1.0 on both records; the overall mean over the 10 scored rows is only 0.2 < 0.25
    assert metrics["canary/colon_mean"] == 1.0 and metrics["canary/reward_mean"] == pytest.approx(0.2)
    assert metrics["canary/alarm"] == 1.0 and "'colon'" in caplog.text
    assert math.isnan(metrics["canary/empty_mean"]) and metrics["canary/unscored_frac"] == pytest.approx(2 / 12)
    assert "\\boxed{5}" in seen and "\\boxed{12}" in seen  # the bare answer is each record's own


def test_judge_verifier_agreement_by_hand():
    rewards = [1.0, 0.75, 0.5, 0.0, 1.0, np.nan, 0.25]
    verifier = [True, True, True, False, False, True, False]
    valid = [True, True, True, True, True, False, False]
    # scored rows 0..4: judge says correct [T, T, F, F, T] (0.75 counts), verifier [T, T, T, F, F]
    # FNR = 1/3 (row 2), FPR = 1/2 (row 4), agreement = 3/5 (rows 0, 1, 3)
    metrics = judge_verifier_agreement(rewards, verifier, valid)
    assert metrics["judge_vs_verifier/fnr"] == pytest.approx(1 / 3)
    assert metrics["judge_vs_verifier/fpr"] == pytest.approx(1 / 2)
    assert metrics["judge_vs_verifier/agreement"] == pytest.approx(0.6) and metrics["judge_vs_verifier/n"] == 5
    only_correct = judge_verifier_agreement([1.0, 0.0], [True, True], [True, True])
    assert math.isnan(only_correct["judge_vs_verifier/fpr"]) and only_correct["judge_vs_verifier/fnr"] == 0.5


# ---------------------------------------------------------------- end to end


@needs_data
def test_calibrate_judge_script_end_to_end(tmp_path):
    out_dir = tmp_path / "calibration"
    command = [sys.executable, os.path.join(ROOT, "experiments", "calibrate_judge.py"),
               f"--config={os.path.join(ROOT, 'experiments', 'configs', 'calibrate.py')}", f"--out={out_dir}",
               f"--config.data_dir={SHARED_DATA}", "--config.subsets=('gsm8k',)", "--config.limit_per_subset=5",
               "--config.judge.backend=programmatic"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| correct_ref | 5 |" in done.stdout and "join: 5 of 5" in done.stdout
    with open(out_dir / "calibration.json") as f:
        result = json.load(f)
    assert result["items"] == 5 and result["join"]["gsm8k"]["unjoined"] == 0
    assert set(result["conditions"]) == {"correct_ref", "no_ref", "wrong_ref"}
    assert result["conditions"]["correct_ref"]["n_correct"] == 3  # the slice alternates the two classes
    assert (out_dir / "calibration.md").read_text().startswith("Judge `programmatic-v2` on 5 ProcessBench traces")
