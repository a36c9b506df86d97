"""QA data contract: strict JSONL validation with file:line:field errors, skip counting, the real-data loaders,
and the prompt builder that never lets the reference reach the policy."""
import json
import os
import re

import pytest
from conftest import SHARED_DATA

from exprl_jax.data import (
    DataError,
    QARecord,
    build_prompt,
    load_gsm8k,
    load_math,
    read_jsonl,
    write_jsonl,
)

GOOD = {"id": "p1", "problem": "What is 2+3?", "reference": "2+3 = 5. The answer is 5.", "answer": "5"}


def row(**changes):
    """GOOD with fields replaced; a value of ... deletes the field."""
    out = dict(GOOD, **changes)
    return {k: v for k, v in out.items() if v is not ...}


def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_reads_valid_rows_and_ignores_blank_lines(tmp_path):
    path = write_lines(tmp_path, [GOOD, "", "   ", row(id="p2", domain="math")])
    records, stats = read_jsonl(path)
    assert records == [
        QARecord("p1", GOOD["problem"], GOOD["reference"], "5", None),
        QARecord("p2", GOOD["problem"], GOOD["reference"], "5", "math"),
    ]
    assert stats == {"data/rows": 2, "data/skipped": 0, "data/skipped_by_reason": {}}


# Each bad row goes on line 3 (after a good row and a blank line), so the message must say ":3:".
BAD_ROWS = [
    ("{not json", r"invalid JSON \(Expecting property name enclosed in double quotes at column 2\)", "invalid JSON"),
    ("[1, 2]", r"not a JSON object \(got list\)", "not a JSON object"),
    (row(reference=...), r"field 'reference': missing", "reference: missing"),
    (row(reference="  \n\t"), r"field 'reference': empty", "reference: empty"),
    (row(problem=""), r"field 'problem': empty", "problem: empty"),
    (row(answer=42), r"field 'answer': not a string \(got int 42; convert it to a string, e\.g\. \"42\"\)",
     "answer: not a string"),
    (row(answer=None), r"field 'answer': not a string \(got NoneType None\)", "answer: not a string"),
    (row(id=7), r"field 'id': not a string \(got int 7; convert", "id: not a string"),
    (row(domain=""), r"field 'domain': empty", "domain: empty"),
    (row(solution="x"), r"field 'solution': unknown field \(expected only id, problem, reference, answer, domain, checkpoints\)",
     "solution: unknown field"),
    (row(id="p0"), r"field 'id': duplicate 'p0' \(first on line 1\)", "id: duplicate"),
]


@pytest.mark.parametrize("bad, message, reason", BAD_ROWS)
def test_bad_row_error_names_file_line_and_field(tmp_path, bad, message, reason):
    path = write_lines(tmp_path, [row(id="p0"), "", bad, row(id="p9")])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + message):
        read_jsonl(path)


def test_error_message_exact_text(tmp_path):
    path = write_lines(tmp_path, [GOOD, row(id="p2", reference="")])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value) == f"{path}:2: field 'reference': empty"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad, message, reason", BAD_ROWS)
def test_skip_mode_counts_each_reason(tmp_path, bad, message, reason, caplog):
    path = write_lines(tmp_path, [row(id="p0"), "", bad, row(id="p9")])
    records, stats = read_jsonl(path, on_bad_row="skip")
    assert [r.id for r in records] == ["p0", "p9"]
    assert stats == {"data/rows": 3, "data/skipped": 1, "data/skipped_by_reason": {reason: 1}}
    assert f"{path}:3:" in caplog.text  # the skip is logged too, with the first bad row's location


def test_skip_mode_mixed_reasons(tmp_path):
    path = write_lines(
        tmp_path,
        [GOOD, row(id="p2", answer=1), row(id="p3", answer=2.5), "oops", row(id="p1"), row(id="p4")],
    )
    records, stats = read_jsonl(path, on_bad_row="skip")
    # 6 rows: p1 and p4 kept; two non-string answers, one bad JSON line, one duplicate "p1" skipped.
    assert [r.id for r in records] == ["p1", "p4"]
    assert stats["data/rows"] == 6
    assert stats["data/skipped"] == 4
    assert stats["data/skipped_by_reason"] == {"answer: not a string": 2, "invalid JSON": 1, "id: duplicate": 1}


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid UTF-8")):
        read_jsonl(path)


def test_bad_on_bad_row_and_empty_file(tmp_path):
    path = write_lines(tmp_path, [GOOD])
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        read_jsonl(path, on_bad_row="ignore")
    empty = write_lines(tmp_path, ["", " "], name="empty.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{empty}: no rows")):
        read_jsonl(empty)


def test_write_read_round_trip(tmp_path):
    records = [
        QARecord("a", "Solve $x^2=4$.", "x = ±2 — both roots.\nSo $\\boxed{\\pm 2}$.", "\\pm 2", "math"),
        QARecord("b", "Ünïcode 问题?", "ref\twith tabs", "42"),
    ]
    path = tmp_path / "out.jsonl"
    write_jsonl(path, records)
    got, stats = read_jsonl(path)
    assert got == records
    assert stats["data/rows"] == 2
    assert "问题" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    assert not os.path.exists(f"{path}.tmp")


def test_write_validates_records(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=re.escape(f"{path}: record 1: field 'reference': empty")):
        write_jsonl(path, [QARecord("a", "p", "r", "1"), QARecord("b", "p", " ", "1")])
    with pytest.raises(DataError, match=re.escape(f"{path}: record 1: field 'id': duplicate 'a'")):
        write_jsonl(path, [QARecord("a", "p", "r", "1"), QARecord("a", "p", "r", "1")])
    with pytest.raises(DataError, match=re.escape(f"{path}: record 0: not a QARecord (got dict)")):
        write_jsonl(path, [GOOD])
    assert not path.exists()  # nothing written on failure


# ---------------------------------------------------------------- prompts


def test_build_prompt_uses_only_the_problem():
    record = QARecord("a", "What is 2+3?", "REFERENCE TEXT 5", "5")
    assert build_prompt(record) == "What is 2+3?"
    assert build_prompt(record, "Problem: {problem}\nThink step by step. {{braces}}") == (
        "Problem: What is 2+3?\nThink step by step. {braces}"
    )


@pytest.mark.parametrize(
    "template",
    ["{problem}\n{reference}", "{answer}: {problem}", "{problem} {id}", "{}", "{problem.__class__}",
     "{problem:{reference}}", "no placeholder at all"],
)
def test_build_prompt_rejects_other_placeholders(template):
    with pytest.raises(ValueError, match="prompt template"):
        build_prompt(QARecord("a", "p", "r", "1"), template)


# ---------------------------------------------------------------- real data


def shared(*parts):
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared data file {path} is not present (SHARED_DATA={SHARED_DATA})")
    return path


def last_boxed(text):
    """Contents of the last \\boxed{...} with balanced braces (test helper, not a full answer extractor)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def test_load_gsm8k_train_all_rows():
    records = load_gsm8k(shared("gsm8k", "train.jsonl"))
    assert len(records) == 7473
    first = records[0]
    assert first.id == "gsm8k/train/1"
    assert first.problem.startswith("Natalia sold clips to 48 of her friends")
    assert first.answer == "72"
    assert first.reference.endswith("#### 72") and "<<48/2=24>>" in first.reference
    assert records[-1].id == "gsm8k/train/7473"
    assert all(r.domain == "math" and r.answer == r.answer.strip() and r.answer for r in records)


def test_load_math500_all_rows():
    records = load_math(shared("math500", "test.jsonl"))
    assert len(records) == 500
    assert records[0].id == "math500/test/precalculus/807.json"
    assert records[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}" in records[0].reference


def test_load_math_full_test_needs_an_extractor():
    path = shared("math_full_test", "test.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'answer': missing; pass extract_answer=")):
        load_math(path)
    records = load_math(path, extract_answer=last_boxed)
    assert len(records) == 5000
    assert (records[0].id, records[0].answer) == ("math_full_test/0", "2")


def test_loader_errors_name_file_line_and_field(tmp_path):
    gsm = write_lines(tmp_path, [{"question": "q", "answer": "a #### 1"}, {"question": "q", "answer": "no mark"}],
                      name="train.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{gsm}:2: field 'answer': no final answer after '#### '")):
        load_gsm8k(gsm)
    gsm_blank = write_lines(tmp_path, [{"question": " ", "answer": "a #### 1"}], name="test.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{gsm_blank}:1: field 'question': empty")):
        load_gsm8k(gsm_blank)
    math = write_lines(tmp_path, [{"problem": "p", "solution": "no box here", "idx": 0}], name="m.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{math}:1: field 'answer': not found by extract_answer")):
        load_math(math, extract_answer=last_boxed)
    dup = write_lines(tmp_path, [{"problem": "p", "solution": "s", "answer": "1", "idx": 3}] * 2, name="d.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{dup}:2: field 'id': duplicate '{tmp_path.name}/3'")):
        load_math(dup)


def test_reference_never_in_prompt_on_real_slice():
    records = load_gsm8k(shared("gsm8k", "test.jsonl"))[:200] + load_math(shared("math500", "test.jsonl"))[:200]
    assert len(records) == 400
    for template in ("{problem}", "Problem:\n{problem}\n\nPut the final answer in \\boxed{{}}."):
        for record in records:
            prompt = build_prompt(record, template)
            assert record.problem in prompt
            assert record.reference not in prompt, record.id


def test_checkpoints_field_round_trips_and_is_validated(tmp_path):
    from exprl_jax.data import QARecord, read_jsonl, write_jsonl

    path = tmp_path / "cp.jsonl"
    record = QARecord(id="a", problem="p", reference="r", answer="1", checkpoints=("x=1", "y=2"))
    write_jsonl(path, [record])
    assert read_jsonl(path)[0] == [record]
    path.write_text('{"id": "a", "problem": "p", "reference": "r", "answer": "1", "checkpoints": ["x=1", ""]}\n')
    with pytest.raises(DataError, match=r"cp.jsonl:1: field 'checkpoints'"):
        read_jsonl(path)
