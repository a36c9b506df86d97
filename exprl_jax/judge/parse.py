"""Reading the judge's answer: only its last non-empty line counts, and it must be `Score: N` with N in 1..5 (SPEC §3).

Also reads the rubric-builder's JSON checkpoint list. A parse failure is a reason string, never a score of 0.
"""
from __future__ import annotations

import json
import re

MIN_SCORE, MAX_SCORE = 1, 5
MIN_CHECKPOINTS, MAX_CHECKPOINTS = 2, 6

# Reasons returned by parse_score_with_reason when there is no score.
EMPTY_ANSWER = "empty_answer"  # no text, or only whitespace
NO_SCORE_LINE = "no_score_line"  # the last non-empty line is not a `Score:` line
SCORE_NOT_INTEGER = "score_not_integer"  # a number, but not a whole one (4.5, 4.0)
SCORE_OUT_OF_RANGE = "score_out_of_range"  # a whole number outside 1..5
SCORE_MALFORMED = "score_malformed"  # `Score:` followed by something that is not a number ("four", "4 of 5")

_EMPHASIS = re.compile(r"[*_`]")
_SCORE_LINE = re.compile(r"score\s*:(.*)", re.I)
_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(\d+\.\d*|\.\d+)")
_OUT_OF_FIVE = re.compile(r"\s*/\s*5$")


def parse_score_with_reason(text: str | None) -> tuple[int | None, str | None]:
    """Returns (N, None) when the judge's last non-empty line is a valid score line, else (None, reason).

    Accepted, case-insensitive: `Score: 4`, Markdown emphasis anywhere on the line (`**Score:** 4`, `**Score: 4**`,
    `Score: **4**`, `_Score_: 4`), a heading or quote marker before it (`### Score: 4`), one trailing period
    (`Score: 4.`) and an explicit out-of-5 (`Score: 4/5`, which is how judges often restate the scale; any other
    denominator is malformed). Not accepted: a `Score:` line followed by any further non-empty line (the contract
    says it is the last line, and a quoted score inside the reasoning must never count), other wording
    (`Final score: 4`), decimals (`4.0`, `4.5`) and words.
    """
    if text is None or not text.strip():
        return None, EMPTY_ANSWER
    last_line = [line for line in text.splitlines() if line.strip()][-1]
    line = _EMPHASIS.sub("", last_line).strip().lstrip("#>").strip()
    match = _SCORE_LINE.fullmatch(line)
    if match is None:
        return None, NO_SCORE_LINE
    value = match.group(1).strip()
    if value.endswith("."):
        value = value[:-1].rstrip()
    value = _OUT_OF_FIVE.sub("", value)
    if _INTEGER.fullmatch(value):
        score = int(value)
        return (score, None) if MIN_SCORE <= score <= MAX_SCORE else (None, SCORE_OUT_OF_RANGE)
    if _DECIMAL.fullmatch(value):
        return None, SCORE_NOT_INTEGER
    return None, SCORE_MALFORMED


def parse_score(text: str | None) -> int | None:
    """The judge's score N in 1..5, or None when its answer does not end with a valid `Score: N` line."""
    return parse_score_with_reason(text)[0]


def score_to_reward(score: int) -> float:
    """SPEC §3: s = (N − 1) / 4, so 1 → 0.0, 3 → 0.5, 5 → 1.0."""
    if not MIN_SCORE <= score <= MAX_SCORE:
        raise ValueError(f"judge score {score} is outside {MIN_SCORE}..{MAX_SCORE}")
    return (score - MIN_SCORE) / (MAX_SCORE - MIN_SCORE)


def parse_checkpoints(text: str | None) -> list[str] | None:
    """The rubric-builder's answer `{"checkpoints": [...]}` as a list of 2–6 non-empty strings, else None.

    The object may sit inside a ```json fence or after some prose; the last `{` … `}` span that parses is used.
    """
    if not text:
        return None
    end = text.rfind("}")
    start = text.rfind("{", 0, end)
    while start != -1 and end != -1:
        try:
            obj = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            start = text.rfind("{", 0, start)  # widen: the object may contain nested braces
            continue
        checkpoints = obj.get("checkpoints") if isinstance(obj, dict) else None
        if (isinstance(checkpoints, list) and MIN_CHECKPOINTS <= len(checkpoints) <= MAX_CHECKPOINTS
                and all(isinstance(c, str) and c.strip() for c in checkpoints)):
            return [c.strip() for c in checkpoints]
        return None
    return None


def format_rubric(checkpoints: list[str]) -> str:
    """A stored rubric as the numbered list that judge templates take in their `rubric` field."""
    return "\n".join(f"{i}. {checkpoint}" for i, checkpoint in enumerate(checkpoints, 1))
