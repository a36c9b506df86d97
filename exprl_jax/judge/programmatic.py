"""The `programmatic` judge backend: SPEC §3's Likert contract computed by code from machine-checkable checkpoints.

For references whose checkpoints are `name=value` statements (the toy and testbed tasks), it verifies, never
solves: a checkpoint counts only when the trace itself writes a statement for `name` ending in `value`. It answers
with the same `Reasoning: … / Score: N` text an LLM judge would, so the whole pipeline (cache, parser, unscored
handling, metrics) runs unchanged. It reads the request's fields from `meta` (JudgeReward passes them).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from exprl_jax.judge.backend import Completion
from exprl_jax.rewards.answers import extract_answer

_STATEMENT_SPLIT = re.compile(r"###|\n|;|,|\.\s|\\boxed")
_CHECKPOINT = re.compile(r"([A-Za-z0-9_+\-*/()]+)=(?:[^=#\n;,]*=)*\s*(-?\d+)")


def statements(text: str) -> dict[str, list[str]]:
    """name -> the values the text assigns to it (the last `=` value of each `name=...=value` statement)."""
    found: dict[str, list[str]] = {}
    for part in _STATEMENT_SPLIT.split(text.replace(" ", "")):
        m = re.fullmatch(r"([A-Za-z0-9_+\-*/()]+)=(.*)", part)
        if not m:
            continue
        value = re.fullmatch(r"(?:.*=)?(-?\d+)", m.group(2))
        if value:
            found.setdefault(m.group(1), []).append(value.group(1))
    return found


def checkpoints_of(reference: str) -> list[tuple[str, str]]:
    """(name, value) checkpoints written in a reference solution, in order."""
    return [(name, values[-1]) for name, values in statements(reference).items()]


@dataclasses.dataclass(frozen=True)
class Verdict:
    established: int
    contradicted: int
    total: int
    answer_ok: bool  # the trace's last \boxed{} equals the reference's
    answer_given: bool  # the trace boxes some final answer


def verify(trace: str, checkpoints: Sequence[tuple[str, str]], answer: str | None) -> Verdict:
    written = statements(trace)
    established = sum(1 for n, v in checkpoints if v in written.get(n, ()))
    contradicted = sum(1 for n, v in checkpoints if written.get(n) and v not in written[n])
    boxed = extract_answer(trace, style="boxed")
    return Verdict(established, contradicted, len(checkpoints), answer is not None and boxed == answer,
                   boxed is not None)


def outcome_score(v: Verdict) -> int:
    """Outcome anchors (SPEC §3): 5 complete and right; 4 right with a trivial gap; 3 on track but incomplete;
    2 significant gaps (some progress, or progress then a contradiction / different answer); 1 nothing
    established, or a contradiction / different answer without real progress."""
    half = v.established * 2 >= v.total and v.established > 0
    if v.contradicted or (v.answer_given and not v.answer_ok):
        return 2 if half else 1
    if v.answer_ok and v.established == v.total:
        return 5
    if v.answer_ok and v.established >= max(v.total - 1, 1):  # a bare answer with no work is not "trivial gaps"
        return 4
    if half:
        return 3
    return 2 if v.established else 1


def step_score(v: Verdict, new_established: int) -> int:
    """Process anchors (SPEC §3): 5 establishes a new checkpoint; 4 reaches the right answer; 3 restates an earlier
    checkpoint; 2 irrelevant; 1 contradicts the reference."""
    if v.contradicted:
        return 1
    if new_established:
        return 5
    if v.answer_ok:
        return 4
    return 3 if v.established else 2


def _split_last_step(prefix: str, delimiter: str) -> tuple[str, str]:
    """(text before the last step, the last step) of a prefix that ends with (or without) a delimiter."""
    body = prefix[:-len(delimiter)] if prefix.endswith(delimiter) else prefix
    cut = body.rfind(delimiter)
    return (prefix[:cut + len(delimiter)], prefix[cut + len(delimiter):]) if cut >= 0 else ("", prefix)


class ProgrammaticBackend:
    """ChatBackend grading from checkpoints. `checkpoints` maps a reference text to its (name, value) list; by
    default they are read from the reference itself (`checkpoints_of`)."""

    model = "programmatic-v1"
    decoding: dict = {}
    wants_fields = True  # JudgeReward passes the request's fields in `meta`

    def __init__(self, checkpoints: Mapping[str, Sequence[tuple[str, str]]] | None = None, delimiter: str = "###"):
        self.checkpoints = dict(checkpoints or {})
        self.delimiter = delimiter
        self.calls = 0

    async def complete(self, messages, *, meta: Mapping | None = None) -> Completion:
        self.calls += 1
        if meta is None or "fields" not in meta:
            return Completion(text=None, reason="programmatic_needs_fields")
        fields, template = meta["fields"], meta.get("template", "outcome")
        reference = fields.get("reference") or ""
        cps = self.checkpoints.get(reference) or checkpoints_of(reference)
        answer = extract_answer(reference, style="boxed")
        trace = fields.get("trace") or ""
        if template.startswith("process-prefix"):  # the trace is y_<=t: the step is its last delimited part
            before, step = _split_last_step(trace, self.delimiter)
            v = verify(step, cps, answer)
            new = verify(trace, cps, answer).established - verify(before, cps, answer).established
            score = step_score(v, max(new, 0))
        elif template.startswith("process"):  # the step alone: any checkpoint it establishes counts as new
            v = verify(trace, cps, answer)
            score = step_score(v, v.established)
        else:
            v = verify(trace, cps, answer)
            score = outcome_score(v)
        text = (f"Reasoning: {v.established}/{v.total} checkpoints established, {v.contradicted} contradicted, "
                f"final answer {'matches' if v.answer_ok else 'does not match'} the reference.\nScore: {score}")
        return Completion(text=text)

    async def aclose(self) -> None:
        return None
