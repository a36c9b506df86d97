"""Loaders for the QA datasets with references under ../shared/data (one per dataset, per split), as QARecords with
`problem`, `reference`, `answer` and `domain`. The TFDS builder `exprl_qa` is made of these; a bad row is a
DataError naming the dataset, the file, the record (line or list index) and the field.

Where the data is: `shared_data_dir()`: an explicit path, else $EXPRL_SHARED_DATA, else `../shared/data` next to
the repository checkout (where CI and a fresh clone find it).
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
from typing import Callable

from exprl_jax.data.records import (DataError, QARecord, _gsm8k_from_row, _math_from_row, _read_rows, _RowError,
                                    _text)

SHARED_DATA_ENV = "EXPRL_SHARED_DATA"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
SCIENCE_COURSE_EXCEPT = ("Differential Equations",)  # the one Minerva OCW course that is mathematics


def shared_data_dir(override: str | None = None) -> str:
    """The folder holding gsm8k/, math500/, ...: `override`, else $EXPRL_SHARED_DATA, else ../shared/data next to
    the repository. FileNotFoundError names what was tried."""
    tried = [("argument", override), (f"${SHARED_DATA_ENV}", os.environ.get(SHARED_DATA_ENV)),
             ("next to the repository", DEFAULT_SHARED_DATA)]
    for origin, path in tried:
        if path:
            if os.path.isdir(path):
                return os.path.abspath(path)
            if origin != "next to the repository":
                raise FileNotFoundError(f"shared data folder {path!r} (from the {origin}) does not exist")
    raise FileNotFoundError(f"no shared data folder: pass one, set ${SHARED_DATA_ENV}, or put it at "
                            f"{DEFAULT_SHARED_DATA}")


def _boxed(solution: str) -> str | None:
    from exprl_jax.rewards.answers import extract_answer

    return extract_answer(solution, style="boxed")


def _json_list(path: str, dataset: str, convert: Callable[[dict, int], QARecord], *, key=None) -> list[QARecord]:
    """QARecords from a JSON list (or `rows[key]`), errors naming the dataset, the file, the list index, the field."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = json.load(f)
    rows = rows[key] if key is not None else rows
    rows = list(rows.values()) if isinstance(rows, dict) else rows
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{dataset}: {path}: expected a non-empty JSON list of records")
    out, seen = [], {}
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _RowError(None, "not a JSON object", f" (got {type(row).__name__})")
            record = convert(row, i)
            if record.id in seen:
                raise _RowError("id", "duplicate", f" {record.id!r} (first as record {seen[record.id]})")
        except _RowError as err:
            raise DataError(f"{dataset}: {path}: record {i}: {err}") from None
        seen[record.id] = i
        out.append(record)
    return out


def _jsonl(path: str, dataset: str, convert: Callable[[dict, int], QARecord]) -> list[QARecord]:
    """QARecords from JSONL through `convert`; errors name the dataset, the file, the line and the field."""
    try:
        return _read_rows(path, convert, "error")[0]
    except DataError as err:
        raise DataError(f"{dataset}: {err}") from None


# ---------------------------------------------------------------- one converter per dataset


def _math(row, i, *, prefix):
    return _math_from_row(row, i, id_prefix=prefix, extract_answer=_boxed)


def _minerva(row, i):
    record = _math_from_row(row, i, id_prefix="minerva_math", extract_answer=_boxed)
    course = _text(row, "type")
    domain = "math" if course.startswith(SCIENCE_COURSE_EXCEPT) else "science"
    return dataclasses.replace(record, domain=domain)


def _aime(row, i):
    local = "/".join(str(row.get(k, "")) for k in ("year", "aime_number", "problem_number"))
    return QARecord(id=f"aime/{local}", problem=_text(row, "problem"), reference=_text(row, "solution"),
                    answer=_text(row, "answer"), domain="math")


def _olympiadbench(row, i):
    for field in ("solution", "final_answer"):
        value = row.get(field)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise _RowError(field, "not a non-empty list of non-empty strings")
    return QARecord(id=f"olympiadbench/{row.get('id', i)}", problem=_text(row, "question"),
                    reference="\n\n".join(row["solution"]), answer=row["final_answer"][0], domain="math")


def _champ(row, i):
    steps = row.get("solution", {}).get("steps") if isinstance(row.get("solution"), dict) else None
    if not isinstance(steps, list) or not steps:
        raise _RowError("solution.steps", "missing or empty")
    texts = [s.get("_text") if isinstance(s, dict) else None for s in steps]
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise _RowError("solution.steps[]._text", "not a non-empty string")
    return QARecord(id=f"champ/{_text(row, 'identifier')}", problem=_text(row, "_text"), reference="\n".join(texts),
                    answer=_text(row, "_answer"), domain="math")


def _strategyqa(row, i):
    target, scores = _text(row, "target"), row.get("target_scores")
    if not isinstance(scores, dict) or sorted(scores.values()) != [0, 1]:
        raise _RowError("target_scores", "not one 1 and one 0", f" (got {scores!r})")
    answer = max(scores, key=scores.get)
    return QARecord(id=f"strategyqa/{i}", problem=_text(row, "input"), reference=target, answer=answer,
                    domain="commonsense")


def _cose_rows(path: str, dataset: str) -> list[QARecord]:
    """CommonsenseQA questions joined by id to their CoS-E explanation; reference = explanation + the choice."""
    with open(os.path.join(path, "cose_dev_v1.0.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    explanations = {row.get("id"): (row.get("explanation") or {}).get("open-ended") for row in rows}

    def convert(row, line_no):
        question = row.get("question")
        if not isinstance(question, dict):
            raise _RowError("question", "not an object")
        choices = question.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _RowError("question.choices", "missing or empty")
        labels = {c.get("label"): c.get("text") for c in choices if isinstance(c, dict)}
        key = _text(row, "answerKey")
        if not isinstance(labels.get(key), str):
            raise _RowError("answerKey", "names no choice", f" ({key!r}; choices {sorted(labels)})")
        explanation = explanations.get(row.get("id"))
        if not isinstance(explanation, str) or not explanation.strip():
            raise _RowError("id", "has no CoS-E explanation", f" ({row.get('id')!r})")
        stem = _text(question, "stem")
        problem = stem + "\n" + "\n".join(f"({label}) {text}" for label, text in labels.items())
        return QARecord(id=f"cose_cqa/{_text(row, 'id')}", problem=problem,
                        reference=f"{explanation.strip()}\nSo the answer is ({key}) {labels[key]}.",
                        answer=labels[key], domain="commonsense")

    return _jsonl(os.path.join(path, "dev_rand_split.jsonl"), dataset, convert)


def _math_train(root: str, dataset: str) -> list[QARecord]:
    """The full MATH test set minus MATH-500 (matched by problem text): 4,500 problems with references."""
    held_out = {r.problem for r in _jsonl(os.path.join(root, "math500", "test.jsonl"), dataset,
                                          functools.partial(_math, prefix="math500"))}
    full = _jsonl(os.path.join(root, "math_full_test", "test.jsonl"), dataset,
                  functools.partial(_math, prefix="math_full_test"))
    return [r for r in full if r.problem not in held_out]


def _gsm8k(split):
    return functools.partial(_gsm8k_from_row, split=split)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One dataset: a description and, per split, a loader taking the shared data folder."""

    description: str
    splits: dict[str, Callable[[str, str], list[QARecord]]]  # split -> loader(shared data folder, dataset name)


def _file(rel: str, convert, reader=_jsonl):
    return lambda root, name: reader(os.path.join(root, rel), name, convert)


DATASETS: dict[str, Dataset] = {
    "gsm8k": Dataset("GSM8K grade-school math; reference = the worked solution, answer after '#### '.",
                     {split: _file(f"gsm8k/{split}.jsonl", _gsm8k(split)) for split in ("train", "test")}),
    "math": Dataset("MATH: train = the full test set minus MATH-500 (4,500), test = MATH-500; answer = last \\boxed{}.",
                    {"train": _math_train,
                     "test": _file("math500/test.jsonl", functools.partial(_math, prefix="math500"))}),
    "math500": Dataset("MATH-500 (PRM800K test split).",
                       {"test": _file("math500/test.jsonl", functools.partial(_math, prefix="math500"))}),
    "aime": Dataset("AIME 1983-2023 (train) and 2024 (test) with AoPS solutions.",
                    {"train": _file("aime/train/aime.json", _aime, _json_list),
                     "test": _file("aime/test/aime.json", _aime, _json_list)}),
    "omni_math": Dataset("Omni-MATH, rule-gradable subset (olympiad level).",
                         {"test": _file("omni_math_rule/omni_math_rule.jsonl",
                                        functools.partial(_math_from_row, id_prefix="omni_math_rule",
                                                          extract_answer=None))}),
    "olympiadbench": Dataset("OlympiadBench, English text-only math; reference = the solutions, answer = the first.",
                             {"test": _file("olympiadbench/test.jsonl", _olympiadbench)}),
    "minerva_math": Dataset("Minerva OCW STEM problems; domain science except Differential Equations (math).",
                            {"test": _file("minerva_math/test.jsonl", _minerva)}),
    "champ": Dataset("CHAMP competition problems with step-wise human solutions.",
                     {"test": lambda root, name: _json_list(os.path.join(root, "champ/v0.json.gz"), name, _champ,
                                                            key="problems")}),
    "strategyqa": Dataset("StrategyQA yes/no with short explanations (BIG-bench; evaluation data, domain "
                          "commonsense).", {"test": _file("strategyqa/task.json", _strategyqa,
                                                          functools.partial(_json_list, key="examples"))}),
    "cose_cqa": Dataset("CommonsenseQA dev with CoS-E explanations (crowd-written, noisy; domain commonsense).",
                        {"validation": lambda root, name: _cose_rows(os.path.join(root, "cose_cqa_v1.0_dev"), name)}),
}


def load_dataset(name: str, data_dir: str | None = None, splits=None) -> dict[str, list[QARecord]]:
    """{split: records} of dataset `name` (a key of DATASETS) read from the shared data folder."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    root = shared_data_dir(data_dir)
    wanted = DATASETS[name].splits if splits is None else {s: DATASETS[name].splits[s] for s in splits}
    return {split: load(root, f"exprl_qa/{name}") for split, load in wanted.items()}
