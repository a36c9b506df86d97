"""The judge answer cache: canonical keys, persistence across instances, crash tolerance, concurrent writers."""
import asyncio
import hashlib
import json
import logging
import threading

import pytest

from exprl_jax.judge.cache import CACHE_FILE, JudgeCache

FIELDS = dict(template_id="outcome", template_version=3, judge_model="qwen3-4b",
              decoding={"temperature": 0.0, "max_tokens": 2048}, problem="Find x.", reference="x = 2.",
              trace="Try x = 2.")


def test_key_is_sha256_of_sorted_compact_json():
    expected = hashlib.sha256(b'{"a":"x","b":[1,2],"c":{"d":null,"e":1.5}}').hexdigest()
    assert JudgeCache.key(c={"e": 1.5, "d": None}, b=[1, 2], a="x") == expected
    assert JudgeCache.key(**FIELDS) == JudgeCache.key(**dict(reversed(list(FIELDS.items()))))


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_key_changes_with_every_field(field):
    changed = dict(FIELDS)
    if field == "decoding":
        changed["decoding"] = {"temperature": 0.0, "max_tokens": 4096}
    elif isinstance(FIELDS[field], int):
        changed[field] = FIELDS[field] + 1
    else:
        changed[field] = FIELDS[field] + " "  # one trailing space is a different trace
    assert JudgeCache.key(**changed) != JudgeCache.key(**FIELDS)


def test_key_tells_types_and_extra_fields_apart():
    assert JudgeCache.key(version=1) != JudgeCache.key(version="1")
    assert JudgeCache.key(**FIELDS) != JudgeCache.key(**FIELDS, segment_index=0)
    # Field names and values do not run together: ("ab", "c") is not ("a", "bc").
    assert JudgeCache.key(problem="ab", trace="c") != JudgeCache.key(problem="a", trace="bc")


def test_key_rejects_what_has_no_canonical_json():
    with pytest.raises(ValueError):
        JudgeCache.key()
    with pytest.raises(ValueError):
        JudgeCache.key(temperature=float("nan"))
    with pytest.raises(TypeError):
        JudgeCache.key(problem=object())


def test_get_put_counts_hits_and_misses(tmp_path):
    with JudgeCache(tmp_path) as cache:
        key = cache.key(**FIELDS)
        assert cache.get(key) is None
        cache.put(key, "Reasoning: fine\nScore: 4")
        assert cache.get(key) == "Reasoning: fine\nScore: 4"
        assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
        with pytest.raises(TypeError):
            cache.put(key, None)  # a failed call is never cached


def test_a_new_instance_sees_earlier_answers_and_the_latest_put_wins(tmp_path):
    text = 'Line one\n"quoted" \u00e9\U0001F600 \ud800\nScore: 3'  # newlines, quotes, non-ASCII, a lone surrogate
    with JudgeCache(tmp_path) as first:
        first.put("k1", text)
        first.put("k2", "old")
        first.put("k2", "new")
        first.put("k2", "new")  # unchanged: not written again
    with JudgeCache(tmp_path) as resumed:
        assert (resumed.get("k1"), resumed.get("k2"), len(resumed)) == (text, "new", 2)
    assert len((tmp_path / CACHE_FILE).read_bytes().splitlines()) == 3


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    with JudgeCache(tmp_path) as cache:
        cache.put("k1", "a")
        cache.put("k2", "b")
    path = tmp_path / CACHE_FILE
    with open(path, "ab") as f:
        f.write(b'{"key": "k3", "te')  # the process died mid-write
    with caplog.at_level(logging.WARNING):
        with JudgeCache(tmp_path) as reopened:
            assert (reopened.get("k1"), reopened.get("k2"), reopened.get("k3")) == ("a", "b", None)
            reopened.put("k4", "d")  # must start on a clean line, not glue onto the torn one
    assert "torn" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with JudgeCache(tmp_path) as again:
            assert (len(again), again.get("k4")) == (3, "d")
    assert caplog.text == ""  # the torn bytes are gone, so no warning the second time


def test_a_whole_last_record_missing_its_newline_is_kept(tmp_path):
    path = tmp_path / CACHE_FILE
    path.write_bytes(b'{"key": "k1", "text": "a"}\n{"key": "k2", "text": "b"}')
    with JudgeCache(tmp_path) as cache:
        cache.put("k3", "c")
    with JudgeCache(tmp_path) as cache:
        assert [cache.get(k) for k in ("k1", "k2", "k3")] == ["a", "b", "c"]


def test_unreadable_middle_lines_are_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / CACHE_FILE
    path.write_bytes(b'{"key": "k1", "text": "a"}\nnot json\n{"key": "k2"}\n\xff\xfe\n{"key": "k3", "text": "c"}\n')
    with caplog.at_level(logging.WARNING):
        cache = JudgeCache(tmp_path)
    assert (len(cache), cache.get("k1"), cache.get("k3")) == (2, "a", "c")
    assert "skipped 3" in caplog.text
    cache.close()


def test_concurrent_coroutines_and_threads_write_whole_lines(tmp_path):
    cache = JudgeCache(tmp_path)

    async def writer(i):
        await asyncio.sleep(0)
        cache.put(f"c{i}", f"coroutine answer {i}\n" * (i % 7))

    async def all_writers():
        await asyncio.gather(*[writer(i) for i in range(200)])

    asyncio.run(all_writers())

    def thread_writer(t):
        for i in range(50):
            cache.put(f"t{t}-{i}", "x" * (i * 300))  # some lines exceed the file buffer

    threads = [threading.Thread(target=thread_writer, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.close()
    lines = (tmp_path / CACHE_FILE).read_bytes().splitlines()
    assert len(lines) == 200 + 4 * 50
    assert all(isinstance(json.loads(line)["text"], str) for line in lines)
    with JudgeCache(tmp_path) as reopened:
        assert len(reopened) == 400
        assert reopened.get("c13") == "coroutine answer 13\n" * 6
        assert reopened.get("t3-49") == "x" * (49 * 300)
