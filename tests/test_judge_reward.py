"""JudgeReward on literal batches with a scripted judge: rewards (N − 1) / 4, unscored rows with reasons, Overlong
rows without calls, caching, de-duplication, Outcome and Process in both contexts (SPEC §3–4)."""
import asyncio
import json
import math
import re

import numpy as np
import pytest

from exprl_jax.judge.backend import Completion
from exprl_jax.judge.reward import JudgeReward
from exprl_jax.rewards.base import RewardBatch, Span, score_sync

PROBLEM, REFERENCE = "Find x if x + 2 = 5.", "Subtract 2: x = 3."
_FENCED = re.compile(r"^<<TRACE-(\w+)>>\n(.*?)^<<END-TRACE-\1>>$", re.M | re.S)


def fenced_trace(messages) -> str:
    return _FENCED.search(messages[-1]["content"]).group(2).rstrip("\n")


class FakeBackend:
    """Answers from a script keyed by the fenced trace text; records every call and the peak number in flight."""

    def __init__(self, script, model="fake-judge", decoding=None):
        self.script, self.model = script, model
        self.decoding = decoding or {"temperature": 0.0, "max_tokens": 2048}
        self.calls: list = []  # the messages of every call
        self.in_flight = self.max_in_flight = 0

    @property
    def traces(self):
        return [fenced_trace(messages) for messages in self.calls]

    async def complete(self, messages):
        self.calls.append(messages)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        answer = self.script[fenced_trace(messages)]  # a KeyError here means an unexpected call
        return answer if isinstance(answer, Completion) else Completion(text=answer, latency_s=0.5)

    async def aclose(self):
        pass


class FakeCache:
    """The JudgeCache API (key / get / put) over a dict."""

    def __init__(self):
        self.answers, self.key_fields = {}, []

    def key(self, **fields):
        self.key_fields.append(fields)
        return json.dumps(fields, sort_keys=True)

    def get(self, key):
        return self.answers.get(key)

    def put(self, key, text):
        self.answers[key] = text


class FakeStats:
    """The JudgeStats API (record / metrics / reset)."""

    def __init__(self):
        self.records = []

    def record(self, completion, cached, unscored_reason=None):
        self.records.append((completion.text, cached, unscored_reason))

    def metrics(self):
        return {"judge/recorded": float(len(self.records))}

    def reset(self):
        self.records = []


def outcome_batch(responses, truncated=None):
    n = len(responses)
    return RewardBatch(problems=[PROBLEM] * n, references=[REFERENCE] * n, answers=["3"] * n, responses=responses,
                       truncated=np.array(truncated or [False] * n), group_size=n)


def process_batch(segment_texts, truncated=None):
    segments = []
    for texts in segment_texts:
        spans, start = [], 0
        for text in texts:
            spans.append(Span(text, start, start + len(text)))  # one "token" per character, for the test
            start += len(text)
        segments.append(spans)
    batch = outcome_batch(["".join(texts) for texts in segment_texts], truncated)
    return RewardBatch(**{**batch.__dict__, "segments": segments})


OUTCOME_SCRIPT = {
    "good trace": "Reasoning: every checkpoint is established.\nScore: 5",
    "okay trace": "Reasoning: the trace says 'Score: 5' but stops halfway.\n**Score:** 3",
    "garbled trace": "Reasoning: I cannot decide.",
    "failing trace": Completion(text=None, reason="timeout"),
    "overlong trace": "Score: 5",  # never asked: the row is truncated
}


def test_outcome_rewards_unscored_rows_and_overlong_rows():
    backend, stats = FakeBackend(OUTCOME_SCRIPT), FakeStats()
    reward = JudgeReward(backend, mode="outcome", stats=stats)
    assert reward.kind == "outcome"
    batch = outcome_batch(list(OUTCOME_SCRIPT), truncated=[False, False, False, False, True])
    result = score_sync(reward, batch)
    np.testing.assert_array_equal(result.scores, [1.0, 0.5, np.nan, np.nan, 0.0])  # unscored is NaN, never 0
    np.testing.assert_array_equal(result.valid, [True, True, False, False, True])
    assert result.reasons == [None, None, "unparseable:no_score_line", "judge_failed:timeout", None]
    assert sorted(backend.traces) == sorted(list(OUTCOME_SCRIPT)[:4])  # the overlong row cost no call
    assert backend.max_in_flight == 4  # all calls of the step run concurrently
    system, user = backend.calls[0][0]["content"], backend.calls[0][1]["content"]
    assert "Score: N" in system and PROBLEM in user and REFERENCE in user
    # reward/mean and reward/std over the valid rows 1.0, 0.5, 0.0: mean 0.5, std sqrt((.25 + 0 + .25) / 3).
    assert result.metrics["reward/mean"] == pytest.approx(0.5)
    assert result.metrics["reward/std"] == pytest.approx(math.sqrt(1 / 6))
    assert result.metrics["judge/calls_per_step"] == 4.0
    assert result.metrics["reward/unscored_frac"] == pytest.approx(0.4)
    assert result.metrics["judge/recorded"] == 4.0
    assert sorted(stats.records, key=str) == sorted([
        (OUTCOME_SCRIPT["good trace"], False, None), (OUTCOME_SCRIPT["okay trace"], False, None),
        (OUTCOME_SCRIPT["garbled trace"], False, "no_score_line"), (None, False, None)], key=str)


def test_outcome_cache_hits_dedupe_and_only_parsed_answers_are_cached():
    backend, cache = FakeBackend(OUTCOME_SCRIPT), FakeCache()
    reward = JudgeReward(backend, cache=cache)
    batch = outcome_batch(["good trace", "okay trace", "good trace", "garbled trace", "failing trace"])
    first = score_sync(reward, batch)
    assert len(backend.calls) == 4  # the repeated "good trace" is judged once
    np.testing.assert_array_equal(first.scores, [1.0, 0.5, 1.0, np.nan, np.nan])
    assert sorted(cache.answers.values()) == sorted([OUTCOME_SCRIPT["good trace"], OUTCOME_SCRIPT["okay trace"]])
    fields = cache.key_fields[0]
    assert set(fields) == {"template", "model", "decoding", "problem", "reference", "trace", "rubric"}
    assert (fields["template"], fields["model"], fields["problem"], fields["reference"]) == (
        "outcome.v1", "fake-judge", PROBLEM, REFERENCE)
    assert json.loads(fields["decoding"]) == backend.decoding

    second = score_sync(reward, batch)  # cached answers are reused; failures are asked again
    assert len(backend.calls) == 6 and sorted(backend.traces[4:]) == ["failing trace", "garbled trace"]
    np.testing.assert_array_equal(second.scores, first.scores)
    assert second.metrics["judge/calls_per_step"] == 2.0 and second.metrics["judge/cache_hits_per_step"] == 2.0

    clean = outcome_batch(["good trace", "okay trace"])
    score_sync(reward, clean)
    calls = len(backend.calls)
    again = score_sync(reward, clean)
    assert len(backend.calls) == calls and again.metrics["judge/calls_per_step"] == 0.0
    np.testing.assert_array_equal(again.scores, [1.0, 0.5])


def test_cache_key_covers_model_and_decoding():
    cache = FakeCache()
    batch = outcome_batch(["good trace"])
    score_sync(JudgeReward(FakeBackend(OUTCOME_SCRIPT), cache=cache), batch)
    for backend in (FakeBackend(OUTCOME_SCRIPT, model="other-judge"),
                    FakeBackend(OUTCOME_SCRIPT, decoding={"temperature": 0.7, "max_tokens": 2048})):
        score_sync(JudgeReward(backend, cache=cache), batch)
        assert len(backend.calls) == 1


PROCESS_SEGMENTS = [
    ["A.###", "B.###", "C"],
    ["A.###", "D"],  # shares its first step with row 0
    ["A.###", "bad"],  # one unparseable step leaves the row unscored
    ["A.###", "E"],  # truncated
    [],  # an empty response
]


def test_process_segment_mode_judges_each_step_alone_once():
    script = {"A.###": "Score: 5", "B.###": "Score: 3", "C": "Score: 1", "D": "Score: 4", "bad": "Score: 4.5"}
    backend = FakeBackend(script)
    reward = JudgeReward(backend, mode="process", process_context="segment")
    assert reward.kind == "process"
    result = score_sync(reward, process_batch(PROCESS_SEGMENTS, truncated=[False, False, False, True, False]))
    assert sorted(backend.traces) == sorted(script)  # each distinct step once; nothing from the truncated row
    assert "without the steps that came before it" in backend.calls[0][0]["content"]
    np.testing.assert_array_equal(result.segment_scores[0], [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(result.segment_scores[1], [1.0, 0.75])
    assert result.segment_scores[2] is None and result.reasons[2] == "unparseable:score_not_integer"
    np.testing.assert_array_equal(result.segment_scores[3], [0.0, 0.0])  # Overlong: all-zero, no call
    assert result.segment_scores[4] is None and result.reasons[4] == "no_segments"
    np.testing.assert_array_equal(result.valid, [True, True, False, True, False])
    # reward/mean over valid rows of their mean step reward: (0.5 + 0.875 + 0.0) / 3
    assert result.metrics["reward/mean"] == pytest.approx(1.375 / 3)
    assert result.metrics["judge/calls_per_step"] == 5.0


def test_process_prefix_mode_judges_the_trace_up_to_each_step():
    script = {"A.###": "Score: 2", "A.###B.###": "Score: 4", "A.###B.###C": "Score: 5", "A.###D": "Score: 3",
              "A.###bad": Completion(text=None, reason="http_503")}
    backend = FakeBackend(script)
    reward = JudgeReward(backend, mode="process", process_context="prefix")
    result = score_sync(reward, process_batch(PROCESS_SEGMENTS, truncated=[False, False, False, True, False]))
    assert sorted(backend.traces) == sorted(script)
    assert "up to and including its latest step" in backend.calls[0][0]["content"]
    np.testing.assert_array_equal(result.segment_scores[0], [0.25, 0.75, 1.0])
    np.testing.assert_array_equal(result.segment_scores[1], [0.25, 0.5])
    assert result.segment_scores[2] is None and result.reasons[2] == "judge_failed:http_503"
    np.testing.assert_array_equal(result.segment_scores[3], [0.0, 0.0])


def test_process_needs_segments():
    reward = JudgeReward(FakeBackend({}), mode="process")
    with pytest.raises(ValueError, match="segments"):
        score_sync(reward, outcome_batch(["A.###"]))


def test_concurrent_steps_share_in_flight_calls():
    backend = FakeBackend(OUTCOME_SCRIPT)
    reward = JudgeReward(backend)  # no cache: only in-flight sharing can prevent the second call
    batch = outcome_batch(["good trace", "okay trace"])

    async def two_steps():
        return await asyncio.gather(reward.score(batch), reward.score(batch))

    first, second = asyncio.run(two_steps())
    assert len(backend.calls) == 2
    np.testing.assert_array_equal(first.scores, second.scores)
    score_sync(reward, batch)  # once finished, nothing is left in flight: a later step calls again
    assert len(backend.calls) == 4


def test_stored_rubric_is_rendered_and_keyed():
    cache = FakeCache()
    backend = FakeBackend(OUTCOME_SCRIPT)
    reward = JudgeReward(backend, cache=cache, rubrics={PROBLEM: ["x + 2 = 5 is set up", "x = 3"]})
    score_sync(reward, outcome_batch(["good trace"]))
    assert "1. x + 2 = 5 is set up\n2. x = 3" in backend.calls[0][0]["content"]
    assert "pull 2 to 6 key checkpoints" not in backend.calls[0][0]["content"]
    other = FakeBackend(OUTCOME_SCRIPT)
    score_sync(JudgeReward(other, cache=cache, rubrics={PROBLEM: ["x = 3", "done"]}), outcome_batch(["good trace"]))
    assert len(other.calls) == 1  # another rubric is another question
    unlisted = FakeBackend(OUTCOME_SCRIPT)  # a problem without a stored rubric: in-call checkpoints
    score_sync(JudgeReward(unlisted, rubrics={"another problem": ["a", "b"]}), outcome_batch(["good trace"]))
    assert "pull 2 to 6 key checkpoints" in unlisted.calls[0][0]["content"]


def test_no_reference_mode_hides_the_reference():
    backend = FakeBackend(OUTCOME_SCRIPT)
    result = score_sync(JudgeReward(backend, use_reference=False), outcome_batch(["good trace"]))
    assert result.scores[0] == 1.0
    assert REFERENCE not in backend.calls[0][1]["content"] and "No reference" in backend.calls[0][0]["content"]
    with pytest.raises(ValueError, match="no rubric"):
        JudgeReward(backend, use_reference=False, rubrics={PROBLEM: ["a", "b"]})


def test_template_sets_and_bad_options():
    backend = FakeBackend(OUTCOME_SCRIPT)
    score_sync(JudgeReward(backend, template_set="code"), outcome_batch(["good trace"]))
    assert "strict code reviewer" in backend.calls[0][0]["content"]
    assert JudgeReward(backend, template_set="science").template.key == "science-equivalence.v1"
    assert JudgeReward(backend, template_set={"outcome": "outcome"}).template.key == "outcome.v1"
    with pytest.raises(ValueError, match="no template for 'process-segment'"):
        JudgeReward(backend, mode="process", template_set="code")
    with pytest.raises(ValueError, match="not a judge template"):
        JudgeReward(backend, template_set={"outcome": "self-distill-teacher"})
    with pytest.raises(ValueError, match="mode"):
        JudgeReward(backend, mode="sparse")
    with pytest.raises(ValueError, match="process_context"):
        JudgeReward(backend, mode="process", process_context="suffix")


def test_with_the_real_cache_and_stats(tmp_path):
    from exprl_jax.judge import JudgeCache, JudgeStats  # resolved lazily by the package

    backend = FakeBackend(OUTCOME_SCRIPT)
    with JudgeCache(tmp_path) as cache:
        reward = JudgeReward(backend, cache=cache, stats=JudgeStats())
        batch = outcome_batch(["good trace", "garbled trace"])
        first = score_sync(reward, batch)
        second = score_sync(reward, batch)
    assert len(backend.calls) == 3  # "good trace" came from the cache the second time
    np.testing.assert_array_equal(second.scores, first.scores)
    assert second.metrics["judge/cache_hit_frac"] == 0.5 and second.metrics["judge/unscored/no_score_line"] == 1
    with JudgeCache(tmp_path) as reopened:  # the answer survived on disk, through the same key
        rerun = FakeBackend(OUTCOME_SCRIPT)
        score_sync(JudgeReward(rerun, cache=reopened), outcome_batch(["good trace"]))
        assert rerun.calls == []
