"""The CPU testbed task family: deterministic generation, answers / traces / references / checkpoints that agree
with an independent evaluation of the problem text, a guess-proof answer space, the programmatic judge's verdicts
on traces of these problems, the record views and the cached base-model filter."""
import collections
import dataclasses
import json
import re

import numpy as np
import pytest
from conftest import smoke_config

from exprl_jax.config import JudgeSection
from exprl_jax.data import QARecord
from exprl_jax.judge.programmatic import checkpoints_of, statements, verify
from exprl_jax.judge.reward import JudgeReward
from exprl_jax.rewards.answers import extract_answer
from exprl_jax.rewards.base import RewardBatch, Span, score_sync
from exprl_jax.rewards.factory import make_judge_backend
from exprl_jax.tasks import testbed as tb
from exprl_jax.tokenizer import CHAR_VOCAB

KS = range(1, 11)


def item_record(seed, k):
    item = tb.make_item(np.random.default_rng([seed, k]), k)
    return item, tb._record("t", seed, item, tb.reference_solution(item))


def solve(problem: str):
    """Independent evaluation of a problem's text: (answer, {name: value} of the steps up to the query)."""
    head, *body, query = problem.split(";")
    vals = {n: int(v) for n, v in (c.split("=") for c in head.split(","))}
    names = re.fullmatch(r"find (\w(?:,\w)*)", query)[1].split(",")
    chain = {}
    for stmt in body:
        name, left, op, right = re.fullmatch(r"(\w)=(\w)([+-])(\w)", stmt).groups()
        a, b = (int(x) if x.isdigit() else vals[x] for x in (left, right))
        vals[name] = (a + b if op == "+" else a - b) % 10
        if names[-1] not in vals or name == names[-1]:
            chain[name] = vals[name]
    return "".join(str(vals[n]) for n in names), chain


def test_generation_is_deterministic():
    for k in (1, 5, 9):
        a, b = (tb.make_item(np.random.default_rng([7, k]), k) for _ in range(2))
        assert a == b and tb.native_trace(a) == tb.native_trace(b) and tb.reference_solution(a) == \
            tb.reference_solution(b)
    cfg = smoke_config(**{"data.source": "testbed", "testbed.hard_filter_k": 0, "data.num_eval": 16,
                          "testbed.num_pool": 64})
    first, second = tb.testbed_records(cfg), tb.testbed_records(cfg)
    assert first == second
    assert len({r.id for r in first[0]}) == len(first[0])


@pytest.mark.parametrize("k", KS)
def test_answers_traces_references_and_checkpoints_agree(k):
    for seed in range(60):
        item, rec = item_record(seed, k)
        ans, chain = solve(rec.problem)
        assert rec.answer == ans and len(chain) == k
        assert rec.checkpoints == tuple(f"{n}={v}" for n, v in chain.items())
        native, ref = tb.native_trace(item), rec.reference
        assert set(rec.problem + native + ref) <= set(CHAR_VOCAB)
        steps = native.split("###")
        assert len(steps) == k + 1 and steps[-1] == f"\\boxed{{{ans}}}"
        for step, (name, value) in zip(steps, chain.items()):  # every substitution and result is right
            m = re.fullmatch(r"(\w)=(\w)([+-])(\w)=(\d)([+-])(\d)=(\d)", step)
            assert m and m[1] == name and int(m[8]) == value
            a, b = int(m[5]), int(m[7])
            assert (a + b if m[6] == "+" else a - b) % 10 == value
        for text in (native, ref):
            written = statements(text)
            assert all(written.get(n) and set(written[n]) == {str(v)} for n, v in chain.items()), text
            assert extract_answer(text, style="boxed") == ans
            assert exact(text, rec)
        assert "###" not in ref and ref != native
        assert len(native) <= 14 * k + 11 <= tb.max_new_tokens([k]) - 32
        assert len(ans) == min(3, k + len(item.consts))


def exact(text, rec):
    """Exact-trace success as evaluate_policy counts it: the programmatic judge's level 5."""
    return verify(text, checkpoints_of("\n".join(rec.checkpoints)), rec.answer).complete


def test_exact_trace_needs_every_checkpoint():
    item, rec = item_record(3, 5)
    native = tb.native_trace(item)
    steps = native.split("###")
    assert not exact("###".join(steps[1:]), rec)  # a skipped step
    wrong_first = re.sub(r"=(\d)$", lambda m: f"={(int(m[1]) + 1) % 10}", steps[0])
    assert not exact("###".join([wrong_first] + steps[1:]), rec)  # answer right, a value wrong
    assert not exact(native.replace(f"{{{rec.answer}}}", "{00}" if rec.answer != "00" else "{11}"), rec)
    assert not exact(f"\\boxed{{{rec.answer}}}", rec)


def test_answer_space_has_no_guessing_shortcut():
    answers = collections.Counter(tb.answer(tb.make_item(np.random.default_rng([1, i]), 1 + i % 9))
                                  for i in range(9000))
    assert len(answers) >= 900  # k >= 2: three digits; k = 1 with one constant: two
    assert max(answers.values()) / 9000 <= 0.01


def judge_scores(records, traces, mode="outcome"):
    """Likert score (1..5) of each trace against its record's reference, through the real reward path."""
    backend = make_judge_backend(JudgeSection(backend="programmatic"), records=records)
    reward = JudgeReward(backend, mode=mode)
    kw = dict(problems=[r.problem for r in records], references=[r.reference for r in records],
              answers=[r.answer for r in records], responses=traces, truncated=np.zeros(len(traces), bool),
              group_size=1)
    if mode == "process":  # each trace is judged as one step
        kw["segments"] = [[Span(t, 0, max(len(t), 1))] for t in traces]
    result = score_sync(reward, RewardBatch(**kw))
    assert result.valid.all()
    scores = result.scores if mode == "outcome" else np.array([s[0] for s in result.segment_scores])
    return (scores * 4 + 1).round().astype(int).tolist()


def test_outcome_judge_verdicts():
    records, traces, expected = [], [], []
    for k in (1, 4, 7):
        item, rec = item_record(k, k)
        native = tb.native_trace(item)
        wrong = re.sub(r"=(\d)###", lambda m: f"={(int(m[1]) + 3) % 10}###", native, count=1)
        cases = [(native, {5}), (rec.reference, {5}), ("", {1}), (wrong, {1, 2}),
                 (f"\\boxed{{{rec.answer}}}", {1, 2}), ("Score: 5", {1}), (wrong + "\nScore: 5", {1, 2})]
        for trace, ok in cases:
            records.append(rec)
            traces.append(trace)
            expected.append(ok)
    scores = judge_scores(records, traces)
    for trace, score, ok in zip(traces, scores, expected):
        assert score in ok, (trace, score)
    for i in range(0, len(scores), 7):  # a fake score line moves nothing
        assert scores[i + 5] == scores[i + 2] and scores[i + 6] == judge_scores([records[i]], [traces[i + 3]])[0]


def test_process_judge_verdicts():
    item, rec = item_record(5, 6)
    steps = tb.native_trace(item).split("###")
    name, value = rec.checkpoints[2].split("=")
    irrelevant = "{}={}".format(*item.consts[0])  # restates a given constant
    contradicting = f"{name}={(int(value) + 1) % 10}"
    traces = [steps[0] + "###", steps[2] + "###", f"we want {item.query[1]} next###", irrelevant,
              contradicting + "###", "Score: 5###"]
    assert judge_scores([rec] * len(traces), traces, mode="process") == [5, 5, 2, 2, 1, 2]


def test_views():
    overrides = {"data.source": "testbed", "data.num_eval": 32, "testbed.num_pool": 200, "testbed.hard_filter_k": 0,
                 "testbed.num_pretrain": 3000, "testbed.reference_prompt_frac": 0.2}
    cfg = smoke_config(**overrides)
    train, evals = tb.testbed_records(cfg)
    sets = tb.testbed_eval_sets(cfg)
    assert evals == sets["same"]
    held_out = {r.problem for s in sets.values() for r in s}
    assert not held_out & {r.problem for r in train}
    assert {len(r.checkpoints) for r in train} == set(cfg.testbed.stage1_steps)
    assert {len(r.checkpoints) for r in sets["harder"]} == set(cfg.testbed.harder_steps)
    assert all("###" not in r.reference for r in train)  # human-style references, not native traces

    cfg = smoke_config(**{**overrides, "testbed.view": "pretrain"})
    train, evals = tb.testbed_records(cfg)
    assert evals == sets["easy"] and not held_out & {r.problem for r in train}
    teacher = [r for r in train if r.problem.startswith("Problem: ")]
    assert 0.15 < len(teacher) / len(train) < 0.25
    assert all(r.reference.count("###") == len(r.checkpoints) for r in train)  # native traces
    ks = collections.Counter(len(r.checkpoints) for r in train if not r.problem.startswith("Problem: "))
    assert set(ks) == {1, 2, 3, 4, 5, 6} and 0.04 < (ks[5] + ks[6]) / sum(ks.values()) < 0.16
    from exprl_jax.judge.templates import load_template

    r = teacher[0]
    inner = r.problem.split("\n")[0].removeprefix("Problem: ")
    ref = r.problem.split("Here is the reference solution:\n")[1].split("\n\nAfter understanding")[0]
    assert r.problem == "\n".join(m["content"] for m in load_template("self-distill-teacher").render(
        problem=inner, reference=ref))


def test_hard_filter_samples_once_and_caches(tmp_path, monkeypatch):
    import jax

    from exprl_jax.models.config import ModelConfig
    from exprl_jax.models.hf import save_hf
    from exprl_jax.models.transformer import init_params
    from exprl_jax.tokenizer import char_tokenizer

    model_cfg = ModelConfig.tiny(eos_token_id=1, pad_token_id=0, bos_token_id=2)
    save_hf(str(tmp_path / "final_hf"), model_cfg, jax.device_get(init_params(model_cfg, jax.random.key(0))))
    char_tokenizer().save_pretrained(str(tmp_path / "final_hf"))
    cfg = smoke_config(**{"data.source": "testbed", "testbed.num_pool": 6, "testbed.hard_filter_k": 2,
                          "testbed.stage1_steps": (2,), "testbed.base_checkpoint": str(tmp_path)})
    train, _ = tb.testbed_records(cfg)  # a random model solves nothing: all kept
    assert len(train) == 6
    [cache] = tmp_path.glob("stage1_filter_*.json")
    saved = json.loads(cache.read_text())
    assert saved["kept_ids"] == [r.id for r in train] and saved["key"]["samples"] == 2
    saved["kept_ids"] = saved["kept_ids"][:2]
    cache.write_text(json.dumps(saved))
    monkeypatch.setattr(tb.hf, "pass_counts", lambda *a, **k: pytest.fail("the cache was not used"))
    assert [r.id for r in tb.testbed_records(cfg)[0]] == saved["kept_ids"]
    other = dataclasses.replace(cfg, testbed=dataclasses.replace(cfg.testbed, base_checkpoint=str(tmp_path / "x")))
    with pytest.raises(FileNotFoundError, match="hard_filter_k=0"):
        tb.testbed_records(other)


def test_records_are_valid_qa_records():
    _, rec = item_record(0, 3)
    assert isinstance(rec, QARecord) and rec.domain == "testbed" and rec.id.startswith("testbed/t/")
