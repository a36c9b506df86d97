"""Final-answer extraction (`\\boxed{}`, GSM8K `####`) and math_verify equivalence checks with deadlines.

Checks run in a small persistent pool of worker processes: an expression that hangs sympy costs one deadline
and one worker restart, and its item is marked (reason "timeout"), never guessed.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing.connection
import os
import re
import subprocess
import sys
import threading
import time
from typing import Sequence

try:
    import resource
except ImportError:  # not POSIX: only the parent's deadline applies
    resource = None

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?")
_CHECKER_FAILURES = ("timeout", "worker_error", "gold_parse_error")
_STARTUP_TIMEOUT_S = 120.0  # a fresh worker imports sympy; generous because the 2 cores may be busy


def _braced(text: str, open_idx: int) -> str | None:
    """Content of the brace group opening at text[open_idx]; escaped braces (`\\{`) do not count."""
    depth, i = 0, open_idx
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None  # unbalanced


def _last_boxed(text: str) -> str | None:
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    i = j = matches[-1].end()
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        return _braced(text, j)
    if j > i:  # `\boxed 5`: one whitespace-free token, trailing sentence punctuation dropped
        token = re.match(r"[^\s$]+", text[j:])
        return token.group(0).rstrip(".,;") if token else None
    return None  # `\boxed` followed by something we cannot read (end of text, another command)


def _after_hashes(text: str) -> str | None:
    k = text.rfind("####")
    if k < 0:
        return None
    return _THOUSANDS_RE.sub("", text[k + 4 :].split("\n", 1)[0].strip())


def extract_answer(text: str, *, style: str = "auto") -> str | None:
    """The final answer in `text`, or None when there is none (or its braces are unbalanced).

    style "auto" (the default): boxed when a box marker is present, else gsm8k, so both a `\\boxed{}` and a
    GSM8K `####` answer are found; "boxed": content of the LAST `\\boxed{...}` / `\\fbox{...}` (nested braces
    kept; `\\boxed 5` gives "5"); "gsm8k": rest of the line after the last `####`, stripped, thousands commas
    removed.
    """
    if style == "boxed":
        return _last_boxed(text)
    if style == "gsm8k":
        return _after_hashes(text)
    if style == "auto":
        return _last_boxed(text) if _BOX_RE.search(text) else _after_hashes(text)
    raise ValueError(f"unknown answer style {style!r}; expected 'boxed', 'gsm8k' or 'auto'")


@dataclasses.dataclass(frozen=True)
class AnswerCheck:
    """Outcome of one check. reason is None when correct, else one of: "no_answer", "not_equivalent",
    "parse_error" (the prediction), "gold_parse_error", "timeout", "worker_error[: exception type]"."""

    correct: bool
    pred: str | None
    reason: str | None

    @property
    def checker_failed(self) -> bool:
        """The checker, not the answer, failed: the item has no verdict and must not be scored."""
        return self.reason is not None and self.reason.split(":")[0] in _CHECKER_FAILURES


# ---------------------------------------------------------------- worker side (runs in a child process)


def _compare(pred: str, gold: str) -> tuple[bool, str | None]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    def latex(s: str) -> list:
        return parse("\\boxed{" + s + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)

    gold_parsed = latex(gold)
    if _PLAIN_NUMBER_RE.fullmatch(gold) and any(ch.isdigit() for ch in gold):
        plain = _THOUSANDS_RE.sub("", gold)
        gold_parsed += parse(plain, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
    if not gold_parsed:
        return False, "gold_parse_error"
    pred_parsed = latex(pred)
    if not pred_parsed:
        return False, "parse_error"
    if verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return True, None
    return False, "not_equivalent"


def _limit_cpu(more_s: float) -> None:
    """Kernel-enforced backstop: SIGXCPU ends this process after `more_s` more CPU seconds, even in a C call."""
    if resource is None:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + more_s) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _worker_main(read_fd: int, write_fd: int) -> None:
    """Answers (pred, gold, timeout_s) requests until its pipe closes or it reads None.

    The parent enforces the wall-clock deadline; the per-job CPU limit only makes sure that a worker whose
    parent died mid-job stops computing.
    """
    if resource is not None:  # no core file when the CPU limit ends a job
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    logging.basicConfig(level=logging.ERROR)  # math_verify warns once that its own timeouts are off: intended
    inbox = multiprocessing.connection.Connection(read_fd, writable=False)
    outbox = multiprocessing.connection.Connection(write_fd, readable=False)
    _compare("1", "1")  # import and warm up sympy / the LaTeX parser before announcing readiness
    try:
        outbox.send("ready")
        for pred, gold, timeout_s in iter(inbox.recv, None):
            _limit_cpu(timeout_s + 1.0)
            try:
                result = _compare(pred, gold)
            except Exception as e:  # noqa: BLE001 - reported to the parent as a marked failure
                result = (False, f"worker_error: {type(e).__name__}")
            outbox.send(result)
    except (EOFError, BrokenPipeError):  # the parent is gone
        return


# ---------------------------------------------------------------- parent side


class _Worker:
    """A fresh interpreter running this file (no package import, no fork of a process that may run JAX)."""

    def __init__(self):
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        cmd = [sys.executable, "-P", os.path.abspath(__file__), str(job_r), str(res_w)]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(job_r, res_w), stdin=subprocess.DEVNULL)
        finally:
            os.close(job_r)
            os.close(res_w)
        self.to_worker = multiprocessing.connection.Connection(job_w, readable=False)
        self.from_worker = multiprocessing.connection.Connection(res_r, writable=False)
        self.ready = False
        self.job: int | None = None  # index of the unique job in flight
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.to_worker.close()
        self.from_worker.close()


class _CheckerPool:
    """Worker processes fed one job at a time, each job with its own deadline; a late worker is killed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._pid = os.getpid()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.to_worker.send(None)
                w.proc.wait(1.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
            w.kill()
        self._workers = []

    def run(self, jobs: list[tuple[str, str]], timeout_s: float, max_workers: int) -> list[tuple[bool, str | None]]:
        with self._lock:
            if os.getpid() != self._pid:  # inherited through a fork: those workers belong to the parent
                self._workers, self._pid = [], os.getpid()
            try:
                return self._run(jobs, timeout_s, max_workers)
            except BaseException:
                self.close()  # workers may still hold jobs of this batch; never let a later batch read them
                raise

    def _run(self, jobs, timeout_s, max_workers):
        results: list[tuple[bool, str | None] | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))[::-1]  # popped from the end
        while len(self._workers) < min(max_workers, len(jobs)):
            self._workers.append(_Worker())
        workers = self._workers[:max_workers]
        while pending or any(w.job is not None for w in workers):
            for k, w in enumerate(workers):
                if not (w.ready and w.job is None and pending):
                    continue
                try:
                    if w.proc.poll() is not None:
                        raise BrokenPipeError  # died while idle (e.g. OOM-killed): the job never started
                    w.to_worker.send((*jobs[pending[-1]], timeout_s))
                except OSError:
                    workers[k] = self._replace(w)
                    continue
                w.job, w.deadline = pending.pop(), time.monotonic() + timeout_s
            waiting = [w for w in workers if w.job is not None or not w.ready]
            wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready = set(multiprocessing.connection.wait([w.from_worker for w in waiting], timeout=wait_s))
            for k, w in enumerate(workers):
                if w not in waiting:
                    continue
                failure = None
                if w.from_worker in ready:
                    try:
                        msg = w.from_worker.recv()
                    except (EOFError, OSError):
                        failure = "worker_error"
                    else:
                        if msg == "ready":
                            w.ready = True
                        else:
                            results[w.job], w.job = msg, None
                elif time.monotonic() >= w.deadline:
                    failure = "timeout" if w.ready else "worker_error"
                if failure is not None:
                    if w.job is not None:
                        results[w.job] = (False, failure)
                    if not w.ready:
                        raise RuntimeError("an answer-check worker failed to start (math_verify import or warm-up)")
                    workers[k] = self._replace(w)
        return results  # type: ignore[return-value]

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        self._workers[self._workers.index(w)] = fresh = _Worker()
        return fresh


_POOL = _CheckerPool()
atexit.register(_POOL.close)


def check_answers(
    preds: Sequence[str | None],
    golds: Sequence[str],
    *,
    timeout_s: float = 5.0,
    max_workers: int = 2,
) -> list[AnswerCheck]:
    """Checks preds[i] against golds[i] with math_verify (gold first: verify is not symmetric).

    Safe from any thread (calls are serialised on one pool, which grows to the largest max_workers asked
    for). Each distinct (pred, gold) pair gets its own `timeout_s` deadline, counted from when a worker takes
    it, so a batch takes at most about ceil(unique / max_workers) * timeout_s. A None or blank pred is
    "no_answer" without a check. A pair that times out costs its worker, which is replaced (~1 s).
    """
    if len(preds) != len(golds):
        raise ValueError(f"check_answers got {len(preds)} preds and {len(golds)} golds")
    if not timeout_s > 0 or max_workers < 1:
        raise ValueError(f"need timeout_s > 0 and max_workers >= 1, got {timeout_s}, {max_workers}")
    for i, g in enumerate(golds):
        if not isinstance(g, str):
            raise TypeError(f"golds[{i}] is {type(g).__name__}, expected str")
    unique: dict[tuple[str, str], int] = {}
    for p, g in zip(preds, golds):
        if p is not None and p.strip():
            unique.setdefault((p.strip(), g.strip()), len(unique))
    jobs = list(unique)
    outcomes = _POOL.run(jobs, timeout_s, max_workers) if jobs else []
    checks = []
    for p, g in zip(preds, golds):
        if p is None or not p.strip():
            checks.append(AnswerCheck(False, p, "no_answer"))
        else:
            correct, reason = outcomes[unique[(p.strip(), g.strip())]]
            checks.append(AnswerCheck(correct, p, reason))
    return checks


def is_equivalent(pred: str | None, gold: str, *, timeout_s: float = 5.0) -> bool:
    """True when pred is mathematically equivalent to gold; False on a timeout or unparseable input."""
    return check_answers([pred], [gold], timeout_s=timeout_s, max_workers=1)[0].correct


if __name__ == "__main__":  # a checker worker, started by _Worker
    _worker_main(int(sys.argv[1]), int(sys.argv[2]))
