"""Run logging: one JSON object per line in `<workdir>/metrics.jsonl`, TensorBoard scalars, a console line.
In a multi-process run only process 0 writes and prints; the others just return the rows."""
from __future__ import annotations

import json
import math
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
