"""The `programmatic` judge backend: SPEC §3's rubrics applied by code to machine-checkable `name=value` checkpoints.

It verifies, never solves: a checkpoint is *established* when the trace writes `name=...=value` and never gives
`name` another value, *contradicted* when the trace gives `name` any other value (two different values included),
else *absent*. *Progress* is the number of established checkpoints before the first contradicted one, in the
reference's order. It answers with the `Reasoning: … / Score: N` text an LLM judge would write, so the whole
pipeline (cache, parser, unscored handling, metrics) runs unchanged. Rule table (examples: `programmatic_examples`):

| template | level | when |
|---|---|---|
| outcome | 5 | every checkpoint established, none contradicted, and the reference's final answer |
| outcome | 4 | the reference's answer, no contradiction, progress >= 3/4 of the checkpoints (trivial gaps) |
| outcome | 3 | otherwise progress >= 3/4 (a different or missing answer caps the level at 3) |
| outcome | 2 | progress >= 1/2 |
| outcome | 1 | progress < 1/2: stops far short, wrong early, a bare answer, listing values, empty |
| process-segment | 1 | the step contradicts a checkpoint or boxes a different final answer |
| process-segment | 5 | the step establishes a checkpoint or boxes the reference's final answer |
| process-segment | 2 | anything else: no checkpoint, no progress credit |
| process-prefix | 1 | the prefix contradicts a checkpoint anywhere or boxes a different answer; or establishes nothing |
| process-prefix | 4 | clean, with a gap (a checkpoint skipped before an established one) |
| process-prefix | 5 | clean and gap-free with at least one checkpoint |

In prefix context the score is the state of the prefix, so a step that adds no checkpoint (or only a boxed answer
without the derivation) leaves it unchanged: DeltaNorm gives it 0, no progress credit. `noise` > 0 replaces that
share of verdicts with a uniformly random level (deterministic per request), the judge-noise knob: an exact judge
with noise q has a misplacement rate (SPEC §7) of about q / 2.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Mapping, Sequence

from exprl_jax.judge.backend import Completion
from exprl_jax.rewards.answers import extract_answer

_STATEMENT_SPLIT = re.compile(r"###|\n|;|,|\.\s|\\boxed")
ESTABLISHED, CONTRADICTED, ABSENT = "established", "contradicted", "absent"


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
    states: tuple[str, ...]  # per checkpoint, in the reference's order: established / contradicted / absent
    answer_ok: bool  # the trace's last \boxed{} equals the reference's answer
    answer_given: bool  # the trace boxes some final answer

    @property
    def total(self) -> int:
        return len(self.states)

    @property
    def established(self) -> int:
        return self.states.count(ESTABLISHED)

    @property
    def contradicted(self) -> int:
        return self.states.count(CONTRADICTED)

    @property
    def _before_contradiction(self) -> tuple[str, ...]:
        return self.states[:self.states.index(CONTRADICTED)] if CONTRADICTED in self.states else self.states

    @property
    def progress(self) -> int:
        """Established checkpoints before the first contradicted one."""
        return self._before_contradiction.count(ESTABLISHED)

    @property
    def gap(self) -> bool:
        """An absent checkpoint before an established one (before the first contradiction)."""
        head = self._before_contradiction
        return ESTABLISHED in head and ABSENT in head[:len(head) - head[::-1].index(ESTABLISHED)]

    @property
    def wrong_answer(self) -> bool:
        return self.answer_given and not self.answer_ok

    @property
    def complete(self) -> bool:
        """Every checkpoint established and the reference's answer: the exact trace."""
        return self.answer_ok and self.established == self.total


def verify(trace: str, checkpoints: Sequence[tuple[str, str]], answer: str | None) -> Verdict:
    written = statements(trace)
    states = tuple(ABSENT if not written.get(n) else ESTABLISHED if set(written[n]) == {v} else CONTRADICTED
                   for n, v in checkpoints)
    boxed = extract_answer(trace, style="boxed")
    return Verdict(states, answer is not None and boxed == answer, boxed is not None)


def outcome_level(v: Verdict) -> int:
    """Outcome anchors (SPEC §3) graded by progress: 4-5 are "correct" (the reference's answer), 1-3 by how far
    the trace got before its first contradiction. Without checkpoints only the answer counts."""
    if not v.total:
        return 5 if v.answer_ok else 1
    clean_correct = v.answer_ok and not v.contradicted
    if clean_correct and v.complete:
        return 5
    if clean_correct and 4 * v.progress >= 3 * v.total:
        return 4
    if 4 * v.progress >= 3 * v.total:
        return 3
    return 2 if 2 * v.progress >= v.total else 1


def segment_level(v: Verdict) -> int:
    """Process anchors for one step seen alone: 1 contradicts / different answer, 5 a checkpoint or the answer,
    2 anything else (the judge cannot tell generic-but-correct from irrelevant without a checkpoint)."""
    if v.contradicted or v.wrong_answer:
        return 1
    return 5 if v.established or v.answer_ok else 2


def prefix_level(v: Verdict) -> int:
    """Process anchors for the prefix y_<=t as a whole ("an error in any step counts against it")."""
    if v.contradicted or v.wrong_answer or not v.established:
        return 1
    return 4 if v.gap else 5


def exact_step_scores(segments: Sequence[str], checkpoints: Sequence[tuple[str, str]],
                      answer: str | None) -> list[float]:
    """The positive control's exact per-step reward: 1 when the prefix through step t is clean and step t adds a
    checkpoint without a gap; the last step earns 1 only when the whole response is the exact trace."""
    out, before, prefix = [], 0, ""
    for t, segment in enumerate(segments):
        prefix += segment
        v = verify(prefix, checkpoints, answer)
        if t == len(segments) - 1:
            ok = v.complete
        else:
            ok = not (v.contradicted or v.wrong_answer or v.gap) and v.progress > before
        out.append(1.0 if ok else 0.0)
        before = v.progress
    return out


def _unit(*parts: str) -> float:
    """A deterministic number in [0, 1) from the parts (the noise draw of one request)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class ProgrammaticBackend:
    """ChatBackend grading from checkpoints. `checkpoints` maps a reference text to its (name, value) list; by
    default they are read from the reference itself (`checkpoints_of`). `noise` in [0, 1]: the share of verdicts
    replaced by a uniform draw from 1..5, keyed by `noise_seed` and the request."""

    decoding: dict = {}
    wants_fields = True  # JudgeReward passes the request's fields in `meta`

    def __init__(self, checkpoints: Mapping[str, Sequence[tuple[str, str]]] | None = None, *, noise: float = 0.0,
                 noise_seed: int = 0):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"judge noise must be in [0, 1], got {noise}")
        self.checkpoints = dict(checkpoints or {})
        self.noise, self.noise_seed = noise, noise_seed
        # the name is part of every cache key: a noisy judge never reads the exact judge's answers
        self.model = "programmatic-v2" + (f"-noise{noise:g}-seed{noise_seed}" if noise else "")
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
        v = verify(trace, cps, answer)
        if template.startswith("process-prefix"):
            score = prefix_level(v)
        elif template.startswith("process"):
            score = segment_level(v)
        else:
            score = outcome_level(v)
        note = ""
        if self.noise and _unit(str(self.noise_seed), template, fields.get("problem") or "", reference, trace) \
                < self.noise:
            exact, score = score, 1 + int(5 * _unit("level", str(self.noise_seed), template, reference, trace))
            note = f" (noise: the exact level {exact} was replaced)"
        text = (f"Reasoning: {v.established}/{v.total} checkpoints established, {v.contradicted} contradicted, "
                f"progress {v.progress}; final answer {'matches' if v.answer_ok else 'does not match'} the "
                f"reference.{note}\nScore: {score}")
        return Completion(text=text)

    async def aclose(self) -> None:
        return None
