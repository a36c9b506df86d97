"""QA-with-reference records (SPEC §1–2): one record type, a strict JSONL reader/writer, the GSM8K / MATH file
loaders, and the prompt builder, which only ever sees the problem (never the reference).
Every bad row is an error naming file, line and field, or (on request) a counted skip, never a silent drop.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import string
from typing import Any, Callable, Sequence

ON_BAD_ROW = ("error", "skip")
QA_FIELDS = ("id", "problem", "reference", "answer", "domain", "checkpoints")
GSM8K_ANSWER_MARK = "#### "
_log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or record breaks the contract; the message names the file, line (or record) and field."""


@dataclasses.dataclass(frozen=True)
class QARecord:
    """One problem with its hidden reference solution and final answer (SPEC §1)."""

    id: str
    problem: str  # the only text the policy sees (through `build_prompt`)
    reference: str  # full reference solution, shown to the judge only
    answer: str  # final answer, for the sparse-reward metric (SPEC §4 "Sparse")
    domain: str | None = None  # e.g. "math", "science", "code" for mixed-domain runs
    checkpoints: tuple[str, ...] | None = None  # machine-checkable "name=value" results (programmatic judge)


class _RowError(Exception):
    """One bad row: `field` is None for row-level problems (bad JSON, not an object)."""

    def __init__(self, field: str | None, kind: str, detail: str = ""):
        super().__init__(f"field '{field}': {kind}{detail}" if field else f"{kind}{detail}")
        self.reason = f"{field}: {kind}" if field else kind  # the key in data/skipped_by_reason


def _text(row: dict, field: str) -> str:
    """row[field] as a non-blank string, kept verbatim."""
    if field not in row:
        raise _RowError(field, "missing")
    value = row[field]
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            hint = f"; convert it to a string, e.g. {json.dumps(str(value))}"
        raise _RowError(field, "not a string", f" (got {type(value).__name__} {value!r}{hint})")
    if not value.strip():
        raise _RowError(field, "empty")
    return value


def _qa_from_row(row: dict, line_no: int) -> QARecord:
    """The strict QARecord schema: exactly the QA_FIELDS, `domain` optional (null or non-blank string)."""
    for field in row:
        if field not in QA_FIELDS:
            raise _RowError(field, "unknown field", f" (expected only {', '.join(QA_FIELDS)})")
    domain = row.get("domain")
    if domain is not None:
        domain = _text(row, "domain")
    checkpoints = row.get("checkpoints")
    if checkpoints is not None:
        if not isinstance(checkpoints, (list, tuple)) or not all(isinstance(c, str) and c.strip()
                                                                 for c in checkpoints):
            raise _RowError("checkpoints", "not a list of non-empty strings")
        checkpoints = tuple(checkpoints)
    return QARecord(
        id=_text(row, "id"),
        problem=_text(row, "problem"),
        reference=_text(row, "reference"),
        answer=_text(row, "answer"),
        domain=domain,
        checkpoints=checkpoints,
    )


def _read_rows(
    path: str | os.PathLike, convert: Callable[[dict, int], QARecord], on_bad_row: str
) -> tuple[list[QARecord], dict[str, Any]]:
    """Reads JSONL rows through `convert`, checking ids are unique; bad rows raise or are counted."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    records: list[QARecord] = []
    first_line_of_id: dict[str, int] = {}
    skipped: collections.Counter[str] = collections.Counter()
    first_skip_message = None
    num_rows = 0
    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            if not raw_line.strip():
                continue  # blank lines are allowed
            num_rows += 1
            try:
                try:
                    row = json.loads(raw_line.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise _RowError(None, "invalid UTF-8", f" at byte {err.start}") from None
                except json.JSONDecodeError as err:
                    raise _RowError(None, "invalid JSON", f" ({err.msg} at column {err.colno})") from None
                if not isinstance(row, dict):
                    raise _RowError(None, "not a JSON object", f" (got {type(row).__name__})")
                record = convert(row, line_no)
                if record.id in first_line_of_id:
                    first_line = first_line_of_id[record.id]
                    raise _RowError("id", "duplicate", f" {record.id!r} (first on line {first_line})")
            except _RowError as err:
                message = f"{os.fspath(path)}:{line_no}: {err}"
                if on_bad_row == "error":
                    raise DataError(message) from None
                skipped[err.reason] += 1
                first_skip_message = first_skip_message or message
                continue
            first_line_of_id[record.id] = line_no
            records.append(record)
    if num_rows == 0:
        raise DataError(f"{os.fspath(path)}: no rows")
    if skipped:
        _log.warning("%s: skipped %d of %d rows; first: %s", os.fspath(path), sum(skipped.values()), num_rows,
                     first_skip_message)
    stats = {"data/rows": num_rows, "data/skipped": sum(skipped.values()), "data/skipped_by_reason": dict(skipped)}
    return records, stats


def read_jsonl(path: str | os.PathLike, *, on_bad_row: str = "error") -> tuple[list[QARecord], dict[str, Any]]:
    """Reads QARecords from JSONL, validating every row.

    A bad row (invalid JSON, not an object, a missing, unknown, non-string or blank field, a duplicate id) raises
    DataError("file:line: field 'x': what"), or with on_bad_row="skip" is left out and counted. Blank lines are
    ignored. stats: "data/rows" (non-blank rows read), "data/skipped", "data/skipped_by_reason" (reason → count);
    the records returned number rows − skipped.
    """
    return _read_rows(path, _qa_from_row, on_bad_row)


def write_jsonl(path: str | os.PathLike, records: Sequence[QARecord]) -> None:
    """Writes QARecords as JSONL (one object per line, UTF-8), validating them as `read_jsonl` would."""
    seen_ids: dict[str, int] = {}
    lines = []
    for i, record in enumerate(records):
        try:
            if not isinstance(record, QARecord):
                raise _RowError(None, "not a QARecord", f" (got {type(record).__name__})")
            row = dataclasses.asdict(record)
            _qa_from_row(row, i)
            if record.id in seen_ids:
                raise _RowError("id", "duplicate", f" {record.id!r} (first as record {seen_ids[record.id]})")
        except _RowError as err:
            raise DataError(f"{os.fspath(path)}: record {i}: {err}") from None
        seen_ids[record.id] = i
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    tmp_path = f"{os.fspath(path)}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp_path, path)  # readers never see a half-written file


# ---------------------------------------------------------------- loaders for shared/data


def _gsm8k_from_row(row: dict, line_no: int, *, split: str) -> QARecord:
    solution = _text(row, "answer")
    if GSM8K_ANSWER_MARK not in solution:
        raise _RowError("answer", f"no final answer after {GSM8K_ANSWER_MARK!r}")
    final = solution.rsplit(GSM8K_ANSWER_MARK, 1)[1].strip()
    if not final:
        raise _RowError("answer", f"empty final answer after {GSM8K_ANSWER_MARK!r}")
    return QARecord(id=f"gsm8k/{split}/{line_no}", problem=_text(row, "question"), reference=solution,
                    answer=final, domain="math")


def load_gsm8k(path: str | os.PathLike) -> list[QARecord]:
    """GSM8K JSONL (`question`, `answer`) → QARecords.

    reference = the full worked solution as written (calculator annotations and the `#### ` line included);
    answer = the text after the last `#### `, stripped, kept verbatim (e.g. "1,080": the answer checker
    normalises). ids are "gsm8k/<split>/<line>", split = the file name without extension.
    """
    split = os.path.splitext(os.path.basename(path))[0]
    return _read_rows(path, functools.partial(_gsm8k_from_row, split=split), "error")[0]


def _math_from_row(
    row: dict, line_no: int, *, id_prefix: str, extract_answer: Callable[[str], str | None] | None
) -> QARecord:
    problem, solution = _text(row, "problem"), _text(row, "solution")
    if "answer" in row:
        answer = _text(row, "answer")
    elif extract_answer is None:
        raise _RowError("answer", "missing", "; pass extract_answer= to take it from 'solution'")
    else:
        answer = extract_answer(solution)
        if not isinstance(answer, str) or not answer.strip():
            raise _RowError("answer", "not found", f" by extract_answer in 'solution' (got {answer!r})")
    local_id = row.get("unique_id", row.get("idx", line_no))
    if isinstance(local_id, bool) or not isinstance(local_id, (str, int)):
        raise _RowError("unique_id" if "unique_id" in row else "idx", "not a string or int", f" (got {local_id!r})")
    return QARecord(id=f"{id_prefix}/{local_id}", problem=problem, reference=solution, answer=answer, domain="math")


def load_math(
    path: str | os.PathLike,
    *,
    extract_answer: Callable[[str], str | None] | None = None,
    id_prefix: str | None = None,
) -> list[QARecord]:
    """MATH-style JSONL (`problem`, `solution`, optional `answer`) → QARecords: MATH-500, math_full_test.

    answer = the `answer` field when present, else `extract_answer(solution)` (e.g. the last \\boxed{}); with
    neither, the row is an error. ids are "<id_prefix>/<unique_id | idx | line>", id_prefix defaulting to the
    file's folder name (e.g. "math500/test/precalculus/807.json", "math_full_test/0").
    """
    if id_prefix is None:
        id_prefix = os.path.basename(os.path.dirname(os.path.abspath(path)))
    convert = functools.partial(_math_from_row, id_prefix=id_prefix, extract_answer=extract_answer)
    return _read_rows(path, convert, "error")[0]


# ---------------------------------------------------------------- prompts


def build_prompt(record: QARecord, template: str = "{problem}") -> str:
    """The policy's prompt text: `template` filled with `record.problem` only (SPEC §1).

    The template may use no placeholder but a plain {problem}: the reference and answer must never reach the
    policy, so {reference}, {answer}, positional, attribute or nested placeholders raise ValueError.
    """
    placeholders = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                    if name is not None]
    if not placeholders:
        raise ValueError(f"prompt template {template!r} has no {{problem}} placeholder")
    for name, spec, conversion in placeholders:
        if name != "problem" or spec or conversion:
            raise ValueError(
                f"prompt template {template!r} uses {{{name}}}: only a plain {{problem}} is allowed "
                "(the policy must never see the reference or answer)"
            )
    return template.format(problem=record.problem)
