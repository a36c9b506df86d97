"""The step loop shared by every method: steps [start, steps) of one run, with exact resume.

Step s uses the key fold_in(key(seed + 1), s): sampling fold_in(k, 0), updates fold_in(k, 1). With judge.overlap the
rollouts of step s+1 are sampled (with the params before update s) while the judge scores step s; they are saved
with each checkpoint, so a resume replays them exactly. Every process runs the loop; process 0 writes the files.
"""
from __future__ import annotations

import logging
import time

import jax
import numpy as np

from exprl_jax import distributed
from exprl_jax.metrics import StepProgress
from exprl_jax.rollouts import load_rollouts, save_rollouts

log = logging.getLogger(__name__)


def step_key(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed + 1), step)


class JudgeWatch:
    """Stops the run after `limit` consecutive steps in which every judge call failed (0 = never)."""

    def __init__(self, limit: int):
        self.limit, self.streak = limit, 0

    def failure(self, metrics: dict) -> str | None:
        """Counts this step; returns the error to stop with once the streak reaches the limit."""
        dead = metrics.get("judge/calls", 0) > 0 and metrics.get("judge/unscored_frac") == 1.0
        self.streak = self.streak + 1 if dead else 0
        if self.streak < self.limit or self.limit <= 0:
            return None
        reasons = {k: v for k, v in metrics.items() if k.startswith("judge/unscored/")}
        return (f"{self.streak} consecutive steps in which every judge call failed ({reasons}): the judge looks "
                "unavailable. The last checkpoint is kept; fix the judge and re-run the same command.")


def train_loop(exp, state, start: int, runner, ckpt, logger):
    """Runs steps [start, cfg.train.steps) of `exp` (an Experiment) and returns the final state."""
    cfg, spec = exp.cfg, exp.spec
    overlap = cfg.judge.overlap and spec.samples
    watch = JudgeWatch(cfg.judge.max_unscored_steps)

    def pending_path(s):
        return ckpt.directory / f"pending_rollouts_{s}.npz"

    def sample_step(params, s):
        return runner.sample(params, exp.records_at(s), jax.random.fold_in(step_key(cfg.seed, s), 0))

    pending = None
    if overlap and start > 0 and distributed.from_primary(pending_path(start).exists):
        pending = load_rollouts(pending_path(start), exp.records_at(start), exp.tokenizer, exp.eos)
    progress = StepProgress(start, cfg.train.steps, cfg.train.log_every, cfg.method)
    for step in progress:
        step_start = time.time()
        update_key = jax.random.fold_in(step_key(cfg.seed, step), 1)
        if not spec.samples:
            state, metrics = runner.sft_step(state, exp.records_at(step), update_key)
        else:
            sample_s = 0.0
            if pending is None:
                pending, sample_s = sample_step(state.params, step)
            sample_next = (lambda params: sample_step(params, step + 1)) if (
                overlap and step + 1 < cfg.train.steps) else None
            state, metrics, pending = runner.rl_step(state, pending, update_key, sample_next=sample_next)
            metrics["time/sample_s"] += sample_s
        metrics["time/step_s"] = time.time() - step_start
        row = logger.log(step + 1, metrics, console=False)
        failure = watch.failure(metrics)
        if failure:  # logged, not checkpointed: a re-run repeats this step
            raise RuntimeError(failure)
        progress.update(step + 1, row)
        if pending is not None:  # before the checkpoint, so a checkpoint never lacks its pending rollouts
            distributed.from_primary(lambda: save_rollouts(pending_path(step + 1), pending))
        meta = {"iteration": step + 1, "seed": cfg.seed, "optimizer_step": int(state.step),
                "data_cursor": exp.cursor(step + 1),
                "rng_key_data": np.asarray(jax.random.key_data(step_key(cfg.seed, step + 1))).tolist(),
                "pending_rollouts": pending is not None}
        ckpt.save(step + 1, state, meta, force=step + 1 == cfg.train.steps)
        if distributed.is_primary():
            for old in range(max(0, step - cfg.train.keep_checkpoints * cfg.train.save_every), step + 1):
                if pending_path(old).exists() and old not in (ckpt.all_steps() or ()):
                    pending_path(old).unlink()
    return state

