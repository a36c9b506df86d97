"""parse_score reads only the judge's last non-empty line (SPEC §3); rubric-builder JSON; (N − 1) / 4."""
import pytest

import exprl_jax.judge as judge
from exprl_jax.judge.parse import (format_rubric, parse_checkpoints, parse_score, parse_score_with_reason,
                                   score_to_reward)


@pytest.mark.parametrize("text, expected", [
    ("Reasoning: all checkpoints met.\nScore: 5", 5),
    ("Score: 1", 1),
    ("score: 3", 3),
    ("SCORE:4", 4),
    ("Reasoning: ok\n**Score:** 4", 4),
    ("Reasoning: ok\n**Score: 4**", 4),
    ("Reasoning: ok\nScore: **4**", 4),
    ("Reasoning: ok\n__Score__: 2", 2),
    ("Reasoning: ok\n### Score: 2", 2),
    ("Reasoning: ok\nScore: 4.", 4),
    ("Reasoning: ok\nScore: 4/5", 4),
    ("Reasoning: ok\nScore: 3 / 5", 3),
    ("Reasoning: ok\n  Score: 2  \n\n   \n", 2),  # trailing blank lines are not the last line
    ("Reasoning: ok\r\nScore: 2\r\n", 2),
    # A `Score:` quoted mid-reasoning is ignored; only the real last line counts.
    ("Reasoning: the trace says 'Score: 5' but that is not evidence.\nScore: 5 is what it asks for.\nScore: 2", 2),
])
def test_parse_score_accepts(text, expected):
    assert parse_score(text) == expected
    assert parse_score_with_reason(text) == (expected, None)


@pytest.mark.parametrize("text, reason", [
    (None, "empty_answer"),
    ("", "empty_answer"),
    ("  \n\t\n", "empty_answer"),
    ("Score: 5\nReasoning: on reflection the trace stops early.", "no_score_line"),  # not the last line
    ("Reasoning: fine.\nScore: 5\nActually, let me reconsider.", "no_score_line"),
    ("Reasoning: fine.", "no_score_line"),
    ("Final score: 4", "no_score_line"),
    ("[escaped] Score: 5", "no_score_line"),  # how a neutralised trace line would look if echoed
    ("Score = 4", "no_score_line"),
    ("Score: 0", "score_out_of_range"),
    ("Score: 6", "score_out_of_range"),
    ("Score: -1", "score_out_of_range"),
    ("Score: 6/5", "score_out_of_range"),
    ("Score: 4.5", "score_not_integer"),
    ("Score: 4.0", "score_not_integer"),
    ("Score: four", "score_malformed"),
    ("Score: 4/10", "score_malformed"),
    ("Score: 4 out of 5", "score_malformed"),
    ("Score:", "score_malformed"),
])
def test_parse_score_rejects_with_reason(text, reason):
    assert parse_score(text) is None
    assert parse_score_with_reason(text) == (None, reason)


def test_parse_score_is_exported_from_package():
    assert judge.parse_score is parse_score
    assert judge.parse_score("Reasoning: x\nScore: 3") == 3


@pytest.mark.parametrize("score, reward", [(1, 0.0), (2, 0.25), (3, 0.5), (4, 0.75), (5, 1.0)])
def test_score_to_reward(score, reward):
    assert score_to_reward(score) == reward


@pytest.mark.parametrize("score", [0, 6])
def test_score_to_reward_rejects_out_of_range(score):
    with pytest.raises(ValueError):
        score_to_reward(score)


@pytest.mark.parametrize("text, expected", [
    ('{"checkpoints": ["x = 3", "y = 5"]}', ["x = 3", "y = 5"]),
    ('Here they are:\n```json\n{"checkpoints": ["a {nested} brace", " b ", "c"]}\n```', ["a {nested} brace", "b", "c"]),
    ('{"checkpoints": ["only one"]}', None),  # fewer than 2
    ('{"checkpoints": ["1", "2", "3", "4", "5", "6", "7"]}', None),  # more than 6
    ('{"checkpoints": ["a", ""]}', None),
    ('{"checkpoints": "a, b"}', None),
    ('{"items": ["a", "b"]}', None),
    ("no json here", None),
    ("", None),
])
def test_parse_checkpoints(text, expected):
    assert parse_checkpoints(text) == expected


def test_format_rubric_numbers_checkpoints():
    assert format_rubric(["x = 3", "answer 5"]) == "1. x = 3\n2. answer 5"
