"""The `openai` judge backend against the local fault server: retries, limits, secrecy; and the judge statistics."""
import asyncio
import gc
import math
import pickle
import time
import warnings
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import pytest

from exprl_jax.judge.backend import Completion
from exprl_jax.judge.cache import JudgeCache
from exprl_jax.judge.client import JudgeClientConfig, OpenAIChatClient, TokenBucket, retry_after_s
from exprl_jax.judge.stats import JudgeStats
from judge_fault_server import (FAULTS, MISSING_SCORE_ANSWER, OUT_OF_RANGE_ANSWER, RETRYABLE_FAULTS, FaultServer,
                                default_answer)

MESSAGES = [{"role": "system", "content": "You grade reasoning. End with 'Score: N'."},
            {"role": "user", "content": "## Problem\n1+1?\n## Generated reasoning\n2\n## Reference solution\n2"}]
OK_TEXT = default_answer(MESSAGES)
SECRET = "sk-test-0123456789-do-not-leak"


def make_client(base_url, **overrides) -> OpenAIChatClient:
    fields = dict(base_url=base_url, model="judge-test", timeout_s=2.0, max_retries=4, backoff_base_s=0.001,
                  backoff_max_s=0.01)
    fields.update(overrides)
    return OpenAIChatClient(JudgeClientConfig(**fields))


def run_calls(client, n=1, messages=MESSAGES) -> list[Completion]:
    async def main():
        try:
            return await asyncio.gather(*[client.complete(messages) for _ in range(n)])
        finally:
            await client.aclose()
    return asyncio.run(main())


def test_success_carries_text_usage_latency_and_sends_model_and_decoding():
    server = FaultServer(fault_rate=0.0, answer_fn=lambda m: f"Reasoning: {len(m)} messages\nScore: 5")
    with server as url:
        client = make_client(url, max_tokens=64, extra_decoding={"top_p": 1.0, "seed": 7})
        [result] = run_calls(client)
    text = "Reasoning: 2 messages\nScore: 5"
    assert result.text == text and result.reason is None and result.retries == 0
    # The server reports prompt chars//4 + 1 and answer chars//4 + 1.
    assert result.prompt_tokens == sum(len(m["content"]) for m in MESSAGES) // 4 + 1
    assert result.completion_tokens == len(text) // 4 + 1
    assert 0.0 < result.latency_s < 2.0
    assert client.decoding == {"temperature": 0.0, "max_tokens": 64, "top_p": 1.0, "seed": 7}
    assert server.bodies == [{"model": "judge-test", "messages": MESSAGES, "temperature": 0.0, "max_tokens": 64,
                              "top_p": 1.0, "seed": 7}]


@pytest.mark.parametrize("fault", sorted(RETRYABLE_FAULTS))
def test_each_retryable_fault_is_retried_then_succeeds(fault):
    server = FaultServer(script=[fault, None], slow_s=2.0, retry_after_s=0.01)
    with server as url:
        [result] = run_calls(make_client(url, timeout_s=0.3))
    assert (result.text, result.reason, result.retries) == (OK_TEXT, None, 1)
    assert server.counts["requests"] == 2 and server.counts[fault] == 1


@pytest.mark.parametrize("fault, text", [("out_of_range_score", OUT_OF_RANGE_ANSWER),
                                         ("missing_score", MISSING_SCORE_ANSWER)])
def test_answer_faults_come_back_as_text_for_the_parser(fault, text):
    server = FaultServer(script=[fault])
    with server as url:
        [result] = run_calls(make_client(url))
    assert (result.text, result.retries, server.counts["requests"]) == (text, 0, 1)


def test_every_try_slow_ends_unscored_with_timeout():
    server = FaultServer(script=["slow"] * 3, slow_s=3.0)
    with server as url:
        [result] = run_calls(make_client(url, timeout_s=0.2, max_retries=2))
    assert (result.text, result.reason, result.retries) == (None, "timeout", 2)
    assert server.counts["requests"] == 3
    assert 0.6 <= result.latency_s < 2.5  # three 0.2 s deadlines, not three 3 s sleeps


def test_http_400_is_not_retried():
    server = FaultServer(script=["http_400", None])
    with server as url:
        [result] = run_calls(make_client(url))
    assert (result.text, result.reason, result.retries) == (None, "http_400", 0)
    assert server.counts["requests"] == 1


def test_http_404_from_a_wrong_path_is_not_retried():
    server = FaultServer(fault_rate=0.0)
    with server as url:
        [result] = run_calls(make_client(url + "/wrong"))
    assert (result.text, result.reason, result.retries) == (None, "http_404", 0)


def test_retries_are_bounded_by_max_retries():
    server = FaultServer(script=["http_503"] * 10)
    with server as url:
        [result] = run_calls(make_client(url, max_retries=3))
    assert (result.text, result.reason, result.retries) == (None, "http_503", 3)
    assert server.counts["requests"] == 1 + 3


@pytest.mark.parametrize("fault, reason", [("malformed_json", "bad_response:malformed_json"),
                                           ("empty_choices", "bad_response:empty_choices"),
                                           ("drop_connection", "connection_error")])
def test_persistent_body_and_connection_faults_end_with_their_reason(fault, reason):
    server = FaultServer(script=[fault] * 3)
    with server as url:
        [result] = run_calls(make_client(url, max_retries=2))
    assert (result.text, result.reason, result.retries) == (None, reason, 2)
    assert server.counts["requests"] == 3


def test_empty_content_is_not_retried_when_greedy_but_is_when_sampling():
    greedy_server = FaultServer(fault_rate=0.0, answer_fn=lambda m: "")
    with greedy_server as url:
        [greedy] = run_calls(make_client(url))
    assert (greedy.text, greedy.reason, greedy.retries) == (None, "bad_response:empty_content", 0)
    sampling_server = FaultServer(fault_rate=0.0, answer_fn=lambda m: "   ")
    with sampling_server as url:
        [sampled] = run_calls(make_client(url, temperature=0.7, max_retries=2))
    assert (sampled.reason, sampled.retries, sampling_server.counts["requests"]) == ("bad_response:empty_content", 2, 3)


def test_retry_after_is_honoured():
    server = FaultServer(script=["http_429_retry_after", None], retry_after_s=0.3)
    with server as url:
        [result] = run_calls(make_client(url, backoff_max_s=0.1))  # cap 0.4 s, above the 0.3 s asked
    assert result.text == OK_TEXT and result.retries == 1
    first, second = server.arrivals_s
    assert second - first >= 0.3


def test_retry_after_is_capped_at_four_backoff_max():
    server = FaultServer(script=["http_429_retry_after", None], retry_after_s=30)
    with server as url:
        [result] = run_calls(make_client(url, backoff_max_s=0.05))  # cap 0.2 s
    first, second = server.arrivals_s
    assert result.text == OK_TEXT and 0.2 <= second - first < 2.0


def test_retry_after_parses_seconds_milliseconds_and_http_dates():
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": "0.3"}) == 0.3
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    in_three_s = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=3), usegmt=True)
    assert 1.0 <= retry_after_s({"retry-after": in_three_s}) <= 3.0  # the date has whole-second resolution
    past = format_datetime(datetime.now(timezone.utc) - timedelta(hours=1), usegmt=True)
    assert retry_after_s({"retry-after": past}) == 0.0
    assert retry_after_s({"retry-after": "-5"}) == 0.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({"retry-after": "nan"}) is None
    assert retry_after_s({}) is None


@pytest.mark.parametrize("limit", [3, 12])
def test_max_concurrency_is_reached_and_never_exceeded(limit):
    server = FaultServer(fault_rate=0.0, delay_s=0.1)
    with server as url:
        results = run_calls(make_client(url, max_concurrency=limit), n=4 * limit)
    assert all(r.text == OK_TEXT for r in results)
    assert server.max_in_flight == limit  # 12 spans two connection pools (8 + 4)


def test_requests_per_minute_spaces_calls():
    # 1200/min = 20/s with a burst of 20: 30 calls need at least (30 - 20) / 20 = 0.5 s after the bucket starts.
    # Arrivals are timed at the server, whose first arrival already lags the bucket's start by the connection
    # set-up, so the span between first and last arrival is checked against 0.4 s (unlimited: ~0.05 s).
    server = FaultServer(fault_rate=0.0)
    with server as url:
        results = run_calls(make_client(url, requests_per_minute=1200), n=30)
    assert all(r.text == OK_TEXT for r in results)
    arrivals = sorted(server.arrivals_s)
    assert arrivals[-1] - arrivals[0] >= 0.4


def test_token_bucket_arithmetic():
    now = [0.0]
    bucket = TokenBucket(rate_per_s=10.0, burst=10.0, clock=lambda: now[0])
    assert bucket.reserve(10) == 0.0  # the burst is free
    assert bucket.reserve(5) == 0.5  # 5 tokens of debt at 10/s
    now[0] = 1.0  # +10 tokens: level -5 -> 5
    assert bucket.reserve(5) == 0.0 and bucket.level == 0.0
    bucket.refund(100)
    assert bucket.level == 10.0  # refunds never exceed the burst
    bucket.refund(-30)  # usage above the estimate is charged
    assert bucket.reserve(0) == 2.0


def test_tokens_per_minute_charges_usage_not_the_estimate():
    # Each call reserves ~chars/4 + 200 tokens against 200/s; the server reports ~30 used. Charged the estimate,
    # five sequential calls would wait ~1 s each; with the usage refund they barely wait.
    server = FaultServer(fault_rate=0.0)
    client = make_client(server.start(), max_tokens=200, tokens_per_minute=12_000)
    try:
        async def sequential():
            started = time.monotonic()
            for _ in range(5):
                assert (await client.complete(MESSAGES)).text == OK_TEXT
            await client.aclose()
            return time.monotonic() - started
        assert asyncio.run(sequential()) < 2.0
        assert client._tokens_bucket.level > 100
    finally:
        server.close()


def test_a_new_event_loop_per_step_works_and_leaks_no_sockets():
    server = FaultServer(fault_rate=0.0)
    with server as url:
        client = make_client(url, max_concurrency=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            async def step():
                return await asyncio.gather(*[client.complete(MESSAGES) for _ in range(6)])
            for _ in range(3):  # no aclose: the loop's shutdown closes the connections
                results = asyncio.run(step())
                assert [r.text for r in results] == [OK_TEXT] * 6
            gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert server.counts["requests"] == 18


def test_the_api_key_reaches_the_server_and_nowhere_else(monkeypatch, caplog, capsys, tmp_path):
    monkeypatch.setenv("EXPRL_TEST_JUDGE_KEY", SECRET)
    caplog.set_level("DEBUG")
    server = FaultServer(script=["http_503", "drop_connection", "http_400", "malformed_json", "slow"], slow_s=2.0)
    with server as url:
        client = make_client(url, api_key_env="EXPRL_TEST_JUDGE_KEY", timeout_s=0.3, max_retries=1)
        results = run_calls(client, n=4)
    assert server.auth_headers and all(h == f"Bearer {SECRET}" for h in server.auth_headers)
    with JudgeCache(tmp_path / "cache") as cache:
        for i, result in enumerate(results):
            if result.text is not None:
                cache.put(cache.key(model=client.model, decoding=client.decoding, item=i), result.text)
    with pytest.raises(TypeError) as pickling:
        pickle.dumps(client)
    out, err = capsys.readouterr()
    seen = [caplog.text, out, err, repr(client), repr(client.config), repr(vars(client)), str(results),
            str(pickling.value)]
    assert caplog.text  # the retries above were logged, so the log was really searched
    assert not [s for s in seen if SECRET in s]
    for path in (tmp_path / "cache").rglob("*"):
        assert SECRET.encode() not in path.read_bytes()


def test_key_errors_name_the_variable_never_the_value(monkeypatch):
    monkeypatch.delenv("EXPRL_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="EXPRL_TEST_UNSET_KEY"):
        make_client("http://127.0.0.1:9/v1", api_key_env="EXPRL_TEST_UNSET_KEY")
    monkeypatch.setenv("EXPRL_TEST_BAD_KEY", "sk-has a-space")
    with pytest.raises(ValueError, match="EXPRL_TEST_BAD_KEY") as bad:
        make_client("http://127.0.0.1:9/v1", api_key_env="EXPRL_TEST_BAD_KEY")
    assert "a-space" not in str(bad.value)


def test_no_key_sends_no_authorization_header():
    server = FaultServer(fault_rate=0.0)
    with server as url:
        run_calls(make_client(url, api_key_env=""))
    assert server.auth_headers == [None]


def test_config_rejects_payload_fields_the_client_owns():
    with pytest.raises(ValueError, match="temperature"):
        JudgeClientConfig(base_url="http://x/v1", model="m", extra_decoding={"temperature": 1.0})
    with pytest.raises(ValueError, match="base_url"):
        JudgeClientConfig(base_url="127.0.0.1:8000/v1", model="m")


def test_fault_mix_every_call_ends_with_text_or_reason_and_matches_the_server_counts():
    server = FaultServer(fault_rate=0.3, seed=1, slow_s=3.0, retry_after_s=0.01)
    with server as url:
        results = run_calls(make_client(url, timeout_s=1.0, max_retries=4), n=200)
    counts = server.counts
    assert all((r.text is None) != (r.reason is None) for r in results)
    assert all(counts[f] >= 1 for f in FAULTS)  # seed 1 draws every kind in its first 200
    assert counts["requests"] == sum(1 + r.retries for r in results)
    texts = [r.text for r in results]
    assert texts.count(OK_TEXT) == counts["ok"]
    assert texts.count(OUT_OF_RANGE_ANSWER) == counts["out_of_range_score"]
    assert texts.count(MISSING_SCORE_ANSWER) == counts["missing_score"]
    reasons = [r.reason for r in results if r.reason is not None]
    assert reasons.count("http_400") == counts["http_400"]
    # Every retryable fault was followed by a retry, or was the last try of a call that gave up.
    gave_up = [reason for reason in reasons if reason != "http_400"]
    assert sum(r.retries for r in results) + len(gave_up) == sum(counts[f] for f in RETRYABLE_FAULTS)


# -- JudgeStats ---------------------------------------------------------------------------------------------------
def test_stats_metrics_over_a_step():
    stats = JudgeStats()
    stats.record(Completion("Score: 4", None, 100, 10, latency_s=1.0, retries=0), cached=False)
    stats.record(Completion("no score here", None, 200, 20, latency_s=3.0, retries=1), cached=False,
                 unscored_reason="no_score")
    stats.record(Completion(None, "timeout", latency_s=5.0, retries=4), cached=False)  # reason from the call
    stats.record(Completion("Score: 5", None, 999, 99, latency_s=0.0), cached=True)  # no latency, no tokens
    # Over the three timed calls [1, 3, 5]: p50 = 3; p95 = 3 + 0.9 * (5 - 3) = 4.8. Counting the cache hit's 0 s
    # would give p50 = 2.
    assert stats.metrics() == {
        "judge/latency_p50_s": 3.0, "judge/latency_p95_s": pytest.approx(4.8), "judge/retries": 5,
        "judge/unscored_frac": 0.5, "judge/unscored/no_score": 1, "judge/unscored/timeout": 1,
        "judge/cache_hit_frac": 0.25, "judge/prompt_tokens": 300, "judge/completion_tokens": 30, "judge/calls": 4}
    stats.reset()
    empty = stats.metrics()
    assert math.isnan(empty["judge/latency_p50_s"]) and math.isnan(empty["judge/latency_p95_s"])
    assert (empty["judge/calls"], empty["judge/unscored_frac"], empty["judge/retries"]) == (0, 0.0, 0)
    assert not [k for k in empty if k.startswith("judge/unscored/")]
