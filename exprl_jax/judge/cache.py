"""Content-addressed on-disk cache of judge answers, so a resumed or repeated run never pays twice for one call.

One append-only JSONL file ({"key", "text"} per line) is read into a dict at open; every put is flushed at once
(on an object store such as gs://, puts are uploaded in parts at most `REMOTE_FLUSH_S` apart; `storage.AppendLog`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading

from exprl_jax import storage

log = logging.getLogger(__name__)

CACHE_FILE = "judge_answers.jsonl"
REMOTE_FLUSH_S = 10.0  # object stores: a killed run may re-ask the answers of its last seconds, never lose older


class JudgeCache:
    """`key(**fields)` hashes whatever identifies a judge call: template id and version, judge model, decoding,
    problem, reference, trace or segment. Only successful answers belong here; the caller decides which.

    Safe for many coroutines (and threads) in one process; one process owns a directory at a time (in a
    multi-process run, process 0: the one that calls the judge).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = storage.as_path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / CACHE_FILE
        self.hits = 0
        self.misses = 0
        self._answers: dict[str, str] = {}
        self._lock = threading.Lock()
        self._file = storage.AppendLog(self.path, buffer_s=REMOTE_FLUSH_S)
        self._load()

    @staticmethod
    def key(**fields) -> str:
        """sha256 of the fields as canonical JSON (sorted keys, no whitespace); values must be JSON data."""
        if not fields:
            raise ValueError("a cache key needs at least one field")
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            text = self._answers.get(key)
            if text is None:
                self.misses += 1
            else:
                self.hits += 1
            return text

    def put(self, key: str, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"only judge answers (str) are cached, got {type(text).__name__}")
        line = (json.dumps({"key": key, "text": text}) + "\n").encode("ascii")  # ASCII JSON: one line always
        with self._lock:
            if self._answers.get(key) == text:
                return
            self._answers[key] = text
            self._file.append(line)  # flushed: a crash loses at most the line being written, never earlier ones

    def __len__(self) -> int:
        return len(self._answers)

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> "JudgeCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _load(self) -> None:
        if not self._file.exists():
            return
        data = self._file.read()
        *lines, tail = data.split(b"\n")  # tail is b"" unless the last write was torn
        bad = sum(not self._load_line(line) for line in lines if line.strip())
        if bad:
            log.warning("judge cache %s: skipped %d unreadable line(s)", self.path, bad)
        if tail:
            if self._load_line(tail):  # the record is whole; only its newline is missing
                self._file.rewrite(data + b"\n")
            else:  # cut the torn record off so the next put starts on a clean line
                self._file.rewrite(data[:len(data) - len(tail)])
                log.warning("judge cache %s: dropped a torn last line (%d bytes)", self.path, len(tail))

    def _load_line(self, line: bytes) -> bool:
        try:
            record = json.loads(line)
        except ValueError:  # UnicodeDecodeError is a ValueError too
            return False
        if not isinstance(record, dict) or not all(isinstance(record.get(f), str) for f in ("key", "text")):
            return False
        self._answers[record["key"]] = record["text"]
        return True
