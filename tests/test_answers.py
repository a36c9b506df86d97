"""Answer extraction and math_verify equivalence: literal cases, thread safety, deadlines, and agreement with
the reference answers of the real MATH-500 and GSM8K test sets (each with a negative control)."""
import json
import os
import threading
import time

import pytest
from conftest import SHARED_DATA

from exprl_jax.rewards import answers
from exprl_jax.rewards.answers import AnswerCheck, check_answers, extract_answer, is_equivalent

HANG = r"10^{10^{8}}"  # sympy computes this integer exactly: minutes of CPU at low memory


@pytest.mark.parametrize(
    "text, style, want",
    [
        (r"so $\boxed{\frac{1}{2}}$.", "boxed", r"\frac{1}{2}"),  # nested braces kept whole
        (r"first \boxed{1}, then \boxed{2}", "boxed", "2"),  # the LAST box
        (r"\boxed{}", "boxed", ""),
        ("the answer is 4", "boxed", None),
        (r"\boxed{\frac{1}{2}", "boxed", None),  # unbalanced: no guess, not even an earlier box
        (r"\boxed{1} and then \boxed{\frac{1}{2}", "boxed", None),
        (r"\boxed{\{1,2\}}", "boxed", r"\{1,2\}"),  # escaped braces do not count
        (r"$\boxed 5$.", "boxed", "5"),  # one-token form
        (r"so \boxed 12.", "boxed", "12"),
        (r"\boxed{3} or \fbox{7}", "boxed", "7"),
        (r"\fbox{\sqrt{2}}", "boxed", r"\sqrt{2}"),
        (r"\boxedx and \fboxsep", "boxed", None),  # other commands that start the same way
        (r"\boxed {9}", "boxed", "9"),
        ("...\n#### 1,234", "gsm8k", "1234"),
        ("#### 2\n#### 1,450,000\nextra words", "gsm8k", "1450000"),  # last marker, rest of its line
        ("#### -3 ", "gsm8k", "-3"),
        ("#### (1,2)", "gsm8k", "(1,2)"),  # only thousands separators are removed
        ("no marker", "gsm8k", None),
        (r"\boxed{5} #### 6", "auto", "5"),
        ("#### 6", "auto", "6"),
        (r"\boxed{5 #### 6", "auto", None),  # a box marker is present: its failure is not papered over
    ],
)
def test_extract_answer(text, style, want):
    assert extract_answer(text, style=style) == want


def test_extract_answer_default_finds_boxed_and_gsm8k_answers():
    assert extract_answer(r"so \boxed{5}.") == "5" and extract_answer("...\n#### 1,234") == "1234"
    assert extract_answer(r"\boxed{5} #### 6") == "5" and extract_answer("no answer") is None


def test_extract_answer_unknown_style():
    with pytest.raises(ValueError, match="unknown answer style"):
        extract_answer(r"\boxed{1}", style="last_number")


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        (r"\frac12", "0.5"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("(1,2)", "(1, 2)"),
        ("x=3", "3"),  # math_verify compares an assignment's right-hand side with a bare gold value ...
        ("3", "x=3"),  # ... and the other way round
        (r"\$18", "18"),  # currency and units are stripped
        (r"18 \text{ dollars}", "18"),
        ("50\\%", "50"),
        ("1,234", "1234"),
        (r"\{1,2\}", r"\{2,1\}"),  # sets are unordered
        ("x^2+2x+1", "(x+1)^2"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)"),
    ],
)
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\frac{1}{3}", "0.5"),
        ("(2,1)", "(1,2)"),  # tuples are ordered
        (r"2\sqrt{3}", r"\sqrt{8}"),
        ("x=4", "3"),
        ("y=3", "x=3"),
        ("-5", "5"),
        ("0.333", r"\frac{1}{3}"),  # rounding to 6 places does not make 0.333 a third
        ("[1,2]", "(1,2)"),  # closed vs open interval
        (r"\text{Bob}", r"\text{Evelyn}"),
    ],
)
def test_not_equivalent(pred, gold):
    (check,) = check_answers([pred], [gold])
    assert check == AnswerCheck(False, pred, "not_equivalent")
    assert not check.checker_failed


def test_reasons():
    checks = check_answers([None, "  ", "2", "1"], ["1", "1", "1", ""])
    assert [c.reason for c in checks] == ["no_answer", "no_answer", "not_equivalent", "gold_parse_error"]
    assert [c.checker_failed for c in checks] == [False, False, False, True]
    assert not any(c.correct for c in checks)
    assert is_equivalent(None, "1") is False


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 preds and 1 golds"):
        check_answers(["1", "2"], ["1"])
    with pytest.raises(TypeError, match=r"golds\[0\] is NoneType"):
        check_answers(["1"], [None])
    with pytest.raises(ValueError, match="timeout_s > 0"):
        check_answers(["1"], ["1"], timeout_s=0)
    assert check_answers([], []) == []


def test_safe_from_threads():
    from math_verify import parse

    def run(fn, out):
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001
            out.append(e)

    raw: list = []  # math_verify's own signal-based timeout fails off the main thread: why the pool exists
    t = threading.Thread(target=run, args=(lambda: parse(r"$\frac{1}{2}$"), raw))
    t.start()
    t.join()
    assert isinstance(raw[0], ValueError) and "thread" in str(raw[0])

    outs = [[] for _ in range(4)]
    threads = [
        threading.Thread(target=run, args=(lambda k=k: is_equivalent(f"{k}/2", f"{k / 2}"), outs[k]))
        for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outs == [[True]] * 4


def test_pathological_input_is_bounded():
    is_equivalent("1", "1")  # warm pool
    start = time.monotonic()
    checks = check_answers([HANG, "2", r"\sqrt{4}"], ["1", "2", "2"], timeout_s=1.0, max_workers=2)
    elapsed = time.monotonic() - start
    assert checks[0] == AnswerCheck(False, HANG, "timeout") and checks[0].checker_failed
    assert [c.correct for c in checks[1:]] == [True, True]  # the other worker kept going
    assert elapsed < 8.0, f"took {elapsed:.1f}s with a 1s deadline"
    assert is_equivalent("2", r"\sqrt{4}", timeout_s=5.0)  # the killed worker was replaced


def test_worker_dying_idle_is_replaced_without_cost():
    is_equivalent("1", "1")
    for w in answers._POOL._workers:
        w.proc.kill()
        w.proc.wait()
    checks = check_answers(["1", "2"], ["1", "3"])
    assert checks == [AnswerCheck(True, "1", None), AnswerCheck(False, "2", "not_equivalent")]


def test_worker_dying_mid_check_is_marked():
    is_equivalent("1", "1", timeout_s=5.0)
    victim = answers._POOL._workers[0]
    killer = threading.Timer(0.5, victim.proc.kill)  # kills it while it is stuck on HANG
    killer.start()
    start = time.monotonic()
    (check,) = check_answers([HANG], ["1"], timeout_s=60.0, max_workers=1)
    killer.join()
    assert check == AnswerCheck(False, HANG, "worker_error") and check.checker_failed
    assert time.monotonic() - start < 30.0  # ended by the crash, not by the 60 s deadline
    assert is_equivalent("1", "1")


def _read_jsonl(path):
    if not os.path.exists(path):
        pytest.skip(f"shared data missing: {path}")
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_math500_reference_answers_agree():
    """The boxed answer of every reference solution must be equivalent to the row's `answer` field."""
    rows = _read_jsonl(os.path.join(SHARED_DATA, "math500", "test.jsonl"))
    assert len(rows) == 500
    preds = [extract_answer(r["solution"]) for r in rows]
    golds = [r["answer"] for r in rows]
    start = time.monotonic()
    checks = check_answers(preds, golds, timeout_s=10.0, max_workers=2)
    elapsed = time.monotonic() - start
    misses = [(r["unique_id"], p, g, c.reason) for r, p, g, c in zip(rows, preds, golds, checks) if not c.correct]
    rate = 1 - len(misses) / len(rows)
    print(f"MATH-500 agreement {rate:.4f} ({len(rows) - len(misses)}/{len(rows)}) in {elapsed:.1f}s; misses:")
    for miss in misses:
        print("  ", miss)
    assert rate >= 0.99, misses
    # Negative control: each solution against the NEXT row's answer mostly disagrees (a few answers coincide).
    rotated = check_answers(preds, golds[1:] + golds[:1], timeout_s=10.0, max_workers=2)
    false_rate = sum(c.correct for c in rotated) / len(rows)
    print(f"MATH-500 rotated-answer agreement {false_rate:.4f}")
    assert false_rate < 0.05


def test_gsm8k_reference_answers_agree():
    rows = _read_jsonl(os.path.join(SHARED_DATA, "gsm8k", "test.jsonl"))
    assert len(rows) == 1319
    raw = [r["answer"].split("#### ")[-1].strip() for r in rows]  # e.g. "1,450,000"
    numbers = [str(int(v.replace(",", ""))) for v in raw]  # every GSM8K test answer is an integer
    extracted = [extract_answer(r["answer"], style="gsm8k") for r in rows]
    wrong_extraction = [(i, e, n) for i, (e, n) in enumerate(zip(extracted, numbers)) if e != n]
    assert not wrong_extraction, wrong_extraction
    as_number = check_answers(extracted, numbers, timeout_s=10.0)
    with_commas = check_answers(numbers, raw, timeout_s=10.0)  # gold in its raw, comma-grouped form
    cases = (("number", as_number, zip(extracted, numbers)), ("raw", with_commas, zip(numbers, raw)))
    for name, checks, pairs in cases:
        misses = [(i, p, g, c.reason) for i, ((p, g), c) in enumerate(zip(pairs, checks)) if not c.correct]
        print(f"GSM8K vs {name}: agreement {1 - len(misses) / len(rows):.4f}; misses: {misses}")
        assert len(misses) <= 0.01 * len(rows), misses
    off_by_one = check_answers(extracted, [str(int(n) + 1) for n in numbers], timeout_s=10.0)
    assert not any(c.correct for c in off_by_one)
