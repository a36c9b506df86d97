"""Run logging: one JSON object per line in `<workdir>/metrics.jsonl`, TensorBoard scalars, and console progress
that shows in any log (a tqdm bar on a terminal, plain lines when the output goes to a file or a pipe).
In a multi-process run only process 0 writes and prints; the others just return the rows."""
from __future__ import annotations

import json
import math
import sys
import time

import numpy as np

from exprl_jax import distributed, storage


def _scalar(value):
    value = np.asarray(value)
    if value.size != 1:
        raise ValueError(f"metric value with shape {value.shape} is not a scalar")
    value = value.item()
    return float(value) if isinstance(value, (float, np.floating)) else value


class MetricsLogger:
    """`log(step, metrics)` appends to metrics.jsonl and TensorBoard. Keys use slashes (`loss/policy`)."""

    def __init__(self, workdir, *, tensorboard: bool = True, console_every: int = 1):
        self.path = storage.as_path(workdir) / "metrics.jsonl"
        self.writer = distributed.is_primary()
        self._file = storage.AppendLog(self.path) if self.writer else None
        self._tb = None
        if tensorboard and self.writer:
            from tensorboardX import SummaryWriter  # imported lazily: only runs that log pay for it

            self._tb = SummaryWriter(storage.tensorboard_dir(storage.as_path(workdir) / "tb"))
        self.console_every = console_every
        self._start = time.time()

    def log(self, step: int, metrics: dict, *, console: bool | None = None) -> dict:
        row = {"step": int(step)}
        for key, value in sorted(metrics.items()):
            row[key] = _scalar(value)
        if not self.writer:
            return row
        self._file.append((json.dumps(row, allow_nan=True) + "\n").encode())
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key.replace("@", "_at_"), value, step)  # TensorBoard rejects '@'
        if console if console is not None else (self.console_every and step % self.console_every == 0):
            shown = {k: v for k, v in row.items() if k.split("/")[0] in ("loss", "reward", "kl")
                     or k.endswith(("pass@1", "canary/reward_mean", "response_length"))}
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            print(f"[{time.time() - self._start:7.1f}s] step {step}: {text}", flush=True)
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path) -> list[dict]:
    log = storage.AppendLog(path)
    if not log.exists():
        raise FileNotFoundError(f"{path}: no metrics logged")
    text = log.read().decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def truncate_metrics(path, step: int) -> None:
    """After a restore, drops the rows of steps the restored state has not taken yet (row k = state after k
    steps), so a resumed run logs each step once."""
    log = storage.AppendLog(path)
    if log.exists():
        rows = [r for r in read_metrics(path) if r["step"] <= step]
        log.rewrite("".join(json.dumps(r) + "\n" for r in rows).encode())


# (label, metric key) of a training progress line; a metric the step did not log shows as "-"
PROGRESS_FIELDS = (("loss", "loss/total"), ("reward", "reward/mean"), ("sparse_acc", "reward/sparse_acc"),
                   ("kl", "kl/ref"), ("unscored", "reward/unscored_frac"), ("judge_p50_s", "judge/latency_p50_s"))


def _short(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_line(step: int, total: int, seconds_per_step: float, row: dict) -> str:
    """`step 3/20 | 1.21 s/step | loss 0.012 | reward 0.41 | sparse_acc 0.25 | kl 0.0011 | unscored 0 | ...`"""
    fields = " | ".join(f"{label} {_short(row.get(key))}" for label, key in PROGRESS_FIELDS)
    return f"step {step}/{total} | {seconds_per_step:.3g} s/step | {fields}"


def report_progress(label: str, done: int, total: int, unit: str, started: float) -> None:
    """One line for a long host loop (evaluation, the base-model filter): `eval_end: 64/512 problems (12.3 s)`.
    Printed by process 0 only."""
    if distributed.is_primary():
        print(f"{label}: {done}/{total} {unit} ({time.time() - started:.1f} s)", flush=True)


class StepProgress:
    """Iterates steps [start, total): a tqdm bar when stderr is a terminal (metrics in its postfix), and one
    `progress_line` every `every` steps on stdout unless stdout is that same kind of terminal, so a log file always
    gets lines and a terminal never shows both."""

    def __init__(self, start: int, total: int, every: int, desc: str):
        from tqdm import tqdm

        self.total, self.every = total, max(1, every)
        primary = distributed.is_primary()  # in a multi-process run only process 0 shows progress
        self.bar = tqdm(range(start, total), initial=start, total=total, desc=desc, dynamic_ncols=True,
                        disable=None if primary else True)
        self.lines = primary and (self.bar.disable or not sys.stdout.isatty())
        self._last_step, self._last_time = start, time.time()

    def __iter__(self):
        return iter(self.bar)

    def update(self, step: int, row: dict) -> None:
        """After step `step` (1-based count of steps done) with its logged `row`."""
        self.bar.set_postfix({label: _short(row.get(key)) for label, key in PROGRESS_FIELDS[:3]
                              if row.get(key) is not None})
        if self.lines and (step % self.every == 0 or step == self.total):
            now = time.time()
            per_step = (now - self._last_time) / max(step - self._last_step, 1)
            print(progress_line(step, self.total, per_step, row), flush=True)
            self._last_step, self._last_time = step, now
