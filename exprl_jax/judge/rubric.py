"""Rubrics built once per problem (an extension of SPEC §3): the judge model lists 2–6 checkpoints from the
reference a single time, they are stored as JSON next to the data (inspectable, editable), and the outcome /
process templates then grade against the stored list instead of re-deriving it in every call.
"""
from __future__ import annotations

import asyncio
import json
import os
from typing import Sequence

from exprl_jax.data import QARecord
from exprl_jax.judge.parse import parse_checkpoints
from exprl_jax.judge.templates import load_template

RUBRIC_FORMAT = "exprl-rubrics-v1"


async def build_rubrics(backend, records: Sequence[QARecord], *, existing: dict | None = None) -> tuple[dict, dict]:
    """Asks `backend` for the checkpoints of every record not in `existing`. Returns (rubrics by problem text,
    failures by record id with the reason). A failed or unparseable answer is reported, never stored as empty."""
    template = load_template("rubric-builder")
    rubrics = dict(existing or {})
    todo = [r for r in records if r.problem not in rubrics]

    async def one(record: QARecord):
        completion = await backend.complete(template.render(problem=record.problem, reference=record.reference))
        if completion.text is None:
            return record, None, f"judge_failed:{completion.reason}"
        checkpoints = parse_checkpoints(completion.text)
        return record, checkpoints, None if checkpoints else "unparseable_checkpoints"

    failures = {}
    for record, checkpoints, reason in await asyncio.gather(*(one(r) for r in todo)):
        if checkpoints:
            rubrics[record.problem] = checkpoints
        else:
            failures[record.id] = reason
    return rubrics, failures


def save_rubrics(path: str, rubrics: dict, *, template_key: str, judge_model: str) -> None:
    payload = {"format": RUBRIC_FORMAT, "template": template_key, "judge_model": judge_model,
               "rubrics": [{"problem": p, "checkpoints": list(c)} for p, c in rubrics.items()]}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def load_rubrics(path: str) -> dict[str, list[str]]:
    """{problem text: checkpoints}; every entry is validated, with errors naming the file and entry."""
    with open(path, encoding="utf-8") as f:
        try:
            payload = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(payload, dict) or payload.get("format") != RUBRIC_FORMAT:
        raise ValueError(f"{path}: field 'format' must be {RUBRIC_FORMAT!r}")
    rubrics = {}
    for i, entry in enumerate(payload.get("rubrics", [])):
        problem, checkpoints = entry.get("problem"), entry.get("checkpoints")
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{path}: rubrics[{i}]: field 'problem' must be a non-empty string")
        if (not isinstance(checkpoints, list) or not 1 <= len(checkpoints) <= 6
                or not all(isinstance(c, str) and c.strip() for c in checkpoints)):
            raise ValueError(f"{path}: rubrics[{i}]: field 'checkpoints' must be 1-6 non-empty strings")
        rubrics[problem] = checkpoints
    return rubrics
