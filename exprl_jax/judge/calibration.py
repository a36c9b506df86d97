"""Judge calibration (SPEC §7, the paper's Tables 5–6): ProcessBench traces of known correctness, joined to reference
solutions, scored under a correct, no and a wrong reference; FPR, FNR and misplacement. The per-run monitors
(canaries, judge-vs-verifier agreement) live in `monitors.py`.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from exprl_jax.config import JudgeSection
from exprl_jax.data import DataError, QARecord, load_gsm8k, load_math
from exprl_jax.judge.monitors import CORRECT_REWARD, rates
from exprl_jax.judge.reward import JudgeReward
from exprl_jax.rewards.answers import extract_answer
from exprl_jax.rewards.base import RewardBatch

log = logging.getLogger(__name__)

SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")  # ProcessBench file names (processbench/<subset>.json)
CONDITIONS = ("correct_ref", "no_ref", "wrong_ref")
STEP_SEPARATOR = "\n\n"  # ProcessBench steps are paragraphs; the trace is them joined as the model wrote them


@dataclasses.dataclass(frozen=True)
class CalibrationItem:
    """One ProcessBench solution with the reference solution of its problem."""

    id: str  # ProcessBench id, e.g. "gsm8k-0"
    subset: str
    problem: str
    trace: str  # the steps joined by STEP_SEPARATOR
    correct: bool  # ProcessBench `final_answer_correct`: the known correctness the judge is measured against
    reference: str
    answer: str
    reference_id: str  # the QARecord the problem joined to, e.g. "gsm8k/test/12"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """A calibration config file (experiments/configs/calibrate.py), converted with exprl_jax.config.from_dict."""

    judge: JudgeSection = JudgeSection()  # judge.use_reference is ignored: each condition sets it
    data_dir: str = ""  # holds processbench/ and the reference datasets
    subsets: tuple[str, ...] = SUBSETS
    limit_per_subset: int = 0  # > 0: n rows of each subset (quick checks); 0 = all
    seed: int = 0  # fixes the wrong-reference derangement
    mode: str = "outcome"  # correctness is known per trace, so only Outcome judging is calibrated
    source: str = "processbench"  # or "testbed": the testbed base's own samples (known correctness by answer)
    testbed_base: str = "assets/testbed_base"
    testbed_steps: tuple[int, ...] = (4, 5, 6, 7)  # chain lengths sampled (both classes need to occur)
    testbed_problems: int = 64  # per chain length
    testbed_samples: int = 2  # per problem
    noise_grid: tuple[float, ...] = ()  # programmatic judge: calibrate every judge.noise value listed here

    def __post_init__(self):
        if self.source not in ("processbench", "testbed"):
            raise ValueError(f"config.source={self.source!r}: expected 'processbench' or 'testbed'")
        if self.mode != "outcome":
            raise ValueError(f"config.mode={self.mode!r}: calibration needs 'outcome' (correctness is per trace)")
        if self.source == "processbench" and (not self.subsets or set(self.subsets) - set(SUBSETS)):
            raise ValueError(f"config.subsets={self.subsets!r}: expected a non-empty subset of {SUBSETS}")
        if self.limit_per_subset < 0:
            raise ValueError(f"config.limit_per_subset={self.limit_per_subset}: expected >= 0")


# ---------------------------------------------------------------- ProcessBench ⋈ reference solutions


def _load_olympiadbench(path: str) -> list[QARecord]:
    """OlympiadBench JSONL: `question`; `solution` a list of solutions (joined); answer `final_answer[0]`."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno})") from None
            for field, kind in (("question", str), ("solution", list), ("final_answer", list)):
                if not isinstance(row.get(field), kind) or not row[field]:
                    raise DataError(f"{path}:{line_no}: field '{field}': missing, empty or not a {kind.__name__}")
            if not all(isinstance(s, str) for s in row["solution"]) or not isinstance(row["final_answer"][0], str):
                raise DataError(f"{path}:{line_no}: field 'solution'/'final_answer': entries must be strings")
            records.append(QARecord(id=f"olympiadbench/{row.get('id', line_no)}", problem=row["question"],
                                    reference="\n\n".join(row["solution"]), answer=row["final_answer"][0],
                                    domain="math"))
    return records


def _load_references(data_dir: str, subset: str) -> list[QARecord]:
    """The reference solutions a ProcessBench subset joins to (shared/data README, processbench/SOURCE.md)."""
    path = lambda *parts: os.path.join(data_dir, *parts)  # noqa: E731
    if subset == "gsm8k":  # ProcessBench's GSM8K problems are test problems; train is searched too, at no cost
        return load_gsm8k(path("gsm8k", "test.jsonl")) + load_gsm8k(path("gsm8k", "train.jsonl"))
    if subset == "math":
        return load_math(path("math_full_test", "test.jsonl"),
                         extract_answer=lambda solution: extract_answer(solution, style="boxed"))
    if subset == "olympiadbench":
        return _load_olympiadbench(path("olympiadbench", "test.jsonl"))
    if subset == "omnimath":
        return load_math(path("omni_math_rule", "omni_math_rule.jsonl"), id_prefix="omni_math_rule")
    raise ValueError(f"unknown ProcessBench subset {subset!r}; expected one of {SUBSETS}")


def _read_processbench(path: str, limit: int | None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        for field, kind in (("id", str), ("problem", str), ("steps", list), ("final_answer_correct", bool)):
            if not isinstance(row.get(field), kind):
                raise DataError(f"{path}: record {i}: field '{field}': missing or not a {kind.__name__}")
        if not all(isinstance(step, str) for step in row["steps"]):
            raise DataError(f"{path}: record {i} ({row['id']}): field 'steps': entries must be strings")
    if limit:  # alternate the classes (files list them in blocks), so even a small slice has both
        by_class = [[row for row in rows if row["final_answer_correct"] is c] for c in (True, False)]
        rows = [row for pair in itertools.zip_longest(*by_class) for row in pair if row is not None][:limit]
    return rows


def load_processbench(data_dir: str, subsets: Sequence[str] = SUBSETS,
                      limit_per_subset: int | None = None) -> tuple[list[CalibrationItem], dict[str, Any]]:
    """ProcessBench rows joined to their reference solutions by EXACT problem text (no normalisation: a near match
    could pair a trace with another problem's reference, which is the wrong-reference condition, not this one).

    `limit_per_subset` keeps n rows of each subset before the join: the first truly correct and incorrect rows
    in file order, alternating. Returns (items, stats); stats has
    per subset rows / joined / unjoined / unjoined_problems / first_unjoined, plus "total". A row that does not
    join is counted, logged and left out of the items, never silently.
    """
    items: list[CalibrationItem] = []
    stats: dict[str, Any] = {}
    for subset in subsets:
        rows = _read_processbench(os.path.join(data_dir, "processbench", f"{subset}.json"), limit_per_subset)
        by_problem: dict[str, QARecord] = {}
        for record in _load_references(data_dir, subset):
            first = by_problem.setdefault(record.problem, record)
            if first.reference != record.reference:  # the same problem twice with different solutions: ambiguous
                raise DataError(f"{record.id}: problem text also in {first.id} with a different reference")
        unjoined = [row for row in rows if row["problem"] not in by_problem]
        for row in rows:
            record = by_problem.get(row["problem"])
            if record is not None:
                items.append(CalibrationItem(
                    id=row["id"], subset=subset, problem=row["problem"], trace=STEP_SEPARATOR.join(row["steps"]),
                    correct=row["final_answer_correct"], reference=record.reference, answer=record.answer,
                    reference_id=record.id))
        stats[subset] = {"rows": len(rows), "joined": len(rows) - len(unjoined), "unjoined": len(unjoined),
                         "unjoined_problems": len({row["problem"] for row in unjoined}),
                         "first_unjoined": unjoined[0]["id"] if unjoined else None}
        if unjoined:
            log.warning("processbench/%s: %d of %d rows (%d distinct problems) have no reference with the exact "
                        "problem text and are left out; first: %s", subset, len(unjoined), len(rows),
                        stats[subset]["unjoined_problems"], unjoined[0]["id"])
    stats["total"] = {key: sum(stats[s][key] for s in subsets) for key in ("rows", "joined", "unjoined")}
    return items, stats


# ---------------------------------------------------------------- scoring under three reference conditions


def wrong_reference_indices(problems: Sequence[str], seed: int) -> np.ndarray:
    """A derangement `perm` with problems[perm[i]] != problems[i] for every i (so never i itself), fixed by seed.

    Items are laid out in a random order with each problem's items contiguous, then every item takes the item m
    places further round the circle, m = the largest group: a group spans at most m places, so the item m away is
    in another group whenever m <= n - m. Each reference is used exactly once.
    """
    n = len(problems)
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, problem in enumerate(problems):
        groups[problem].append(i)
    largest = max((len(g) for g in groups.values()), default=0)
    if n and 2 * largest > n:
        raise ValueError(f"cannot give each of {n} items another problem's reference: {largest} share one problem")
    rng = np.random.default_rng(seed)
    keys = list(groups)
    order = [i for g in rng.permutation(len(keys)) for i in rng.permutation(groups[keys[g]])]
    perm = np.empty(n, dtype=np.int64)
    for k, i in enumerate(order):
        perm[i] = order[(k + largest) % n]
    return perm


def _summary(rewards: np.ndarray, valid: np.ndarray, truly_correct: np.ndarray, reasons) -> dict[str, Any]:
    # Unscored rows are left out of the rates and reported (SPEC §3), never counted as a verdict of "incorrect".
    summary = rates(np.nan_to_num(rewards, nan=0.0) >= CORRECT_REWARD, truly_correct, valid)
    summary["unscored"] = int((~valid).sum())
    summary["unscored_reasons"] = dict(collections.Counter(r for r, ok in zip(reasons, valid) if not ok))
    summary["reward_mean"] = float(rewards[valid].mean()) if valid.any() else math.nan
    return summary


async def acalibrate(items: Sequence[CalibrationItem], make_judge: Callable[[bool], JudgeReward],
                     conditions: Sequence[str] = CONDITIONS, seed: int = 0) -> dict[str, Any]:
    """Scores every item's trace under each condition; `make_judge(use_reference)` builds the judge."""
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise ValueError(f"unknown calibration condition(s) {unknown}; expected some of {CONDITIONS}")
    truly_correct = np.array([item.correct for item in items], dtype=bool)
    subset_of = np.array([item.subset for item in items], dtype=object)
    wrong = wrong_reference_indices([item.problem for item in items], seed) if "wrong_ref" in conditions else None
    result: dict[str, Any] = {"items": len(items), "seed": seed, "threshold_reward": CORRECT_REWARD,
                              "conditions": {}, "by_subset": {}, "judge_metrics": {},
                              "rows": [{"id": item.id, "subset": item.subset, "correct": item.correct}
                                       for item in items]}
    for condition in conditions:
        judge = make_judge(condition != "no_ref")
        if judge.kind != "outcome":
            raise ValueError("calibration judges whole traces: make_judge must build an Outcome JudgeReward")
        result["judge_model"] = judge.backend.model
        source = [items[j] for j in wrong] if condition == "wrong_ref" else list(items)
        batch = RewardBatch(problems=[item.problem for item in items], references=[s.reference for s in source],
                            answers=[s.answer for s in source], responses=[item.trace for item in items],
                            truncated=np.zeros(len(items), dtype=bool), group_size=1)
        scored = await judge.score(batch)
        rewards = np.asarray(scored.scores, dtype=np.float64)
        result["conditions"][condition] = _summary(rewards, scored.valid, truly_correct, scored.reasons)
        result["by_subset"][condition] = {}
        for subset in dict.fromkeys(subset_of):
            mask = subset_of == subset
            result["by_subset"][condition][subset] = _summary(
                rewards[mask], scored.valid[mask], truly_correct[mask], np.asarray(scored.reasons, object)[mask])
        result["judge_metrics"][condition] = scored.metrics
        for row, reward, reason, wrong_source in zip(result["rows"], rewards, scored.reasons, source):
            row[condition] = None if math.isnan(reward) else float(reward)
            if reason is not None:
                row[f"{condition}_unscored"] = reason
            if condition == "wrong_ref":
                row["wrong_reference_id"] = wrong_source.reference_id
        log.info("calibration %s: %s", condition, {k: v for k, v in result["conditions"][condition].items()
                                                   if k in ("n", "fpr", "fnr", "misplacement", "unscored")})
    return result


def calibrate(items: Sequence[CalibrationItem], make_judge: Callable[[bool], JudgeReward],
              conditions: Sequence[str] = CONDITIONS, seed: int = 0) -> dict[str, Any]:
    """`acalibrate` from synchronous code."""
    return asyncio.run(acalibrate(items, make_judge, conditions, seed))


def _percent(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def format_table(result: Mapping[str, Any]) -> str:
    """A Markdown table like the paper's Table 5: one row per reference condition."""
    lines = [f"Judge `{result.get('judge_model', '?')}` on {result['items']} {result.get('source', 'ProcessBench')} "
             f"traces; \"correct\" means "
             f"reward >= {result['threshold_reward']} (N >= 4). Rates over scored rows only.", "",
             "| condition | n | truly correct / incorrect | FPR | FNR | misplacement | unscored |",
             "|---|---|---|---|---|---|---|"]
    for condition, s in result["conditions"].items():
        lines.append(f"| {condition} | {s['n']} | {s['n_correct']} / {s['n_incorrect']} | {_percent(s['fpr'])} | "
                     f"{_percent(s['fnr'])} | {_percent(s['misplacement'])} | {s['unscored']} |")
    return "\n".join(lines) + "\n"


def _json_safe(value):
    """NaN → null: JSON has no NaN, and strict readers reject it."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def write_table(result: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
    """Writes `calibration.md` (format_table) and `calibration.json` (the whole result) into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    md_path, json_path = os.path.join(out_dir, "calibration.md"), os.path.join(out_dir, "calibration.json")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(format_table(result))
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(result), f, indent=1, allow_nan=False)
    return md_path, json_path


from exprl_jax.judge.monitors import (  # noqa: E402,F401  (re-exported: the public names live here too)
    CANARY_RESPONSES, judge_verifier_agreement, run_canaries)
