"""Run logging: one JSON object per line in `<workdir>/metrics.jsonl`, TensorBoard scalars, a console line."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np


def _scalar(value):
    value = np.asarray(value)
    if value.size != 1:
        raise ValueError(f"metric value with shape {value.shape} is not a scalar")
    value = value.item()
    return float(value) if isinstance(value, (float, np.floating)) else value


class MetricsLogger:
    """`log(step, metrics)` appends to metrics.jsonl and TensorBoard. Keys use slashes (`loss/policy`)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, console_every: int = 1):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only runs that log pay for it

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        self.console_every = console_every
        self._start = time.time()

    def log(self, step: int, metrics: dict, *, console: bool | None = None) -> dict:
        row = {"step": int(step)}
        for key, value in sorted(metrics.items()):
            row[key] = _scalar(value)
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        self._file.flush()
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
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
