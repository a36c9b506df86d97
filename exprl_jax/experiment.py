"""The host shell of every run: setup, exact resume, the step loop (one loop for all methods), evaluation, results.

Per step s: the data cursor and the RNG stream are pure functions of (seed, s), and both are also written into
each checkpoint, so a run killed at any moment and restarted continues bit-for-bit. With several processes every
one runs this same code on one global mesh; decisions about files are made by process 0 and shared
(`distributed.from_primary`), and each file is written once.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time

import jax
import jax.numpy as jnp

from exprl_jax import config as config_lib
from exprl_jax import distributed, storage
from exprl_jax import sharding as shd
from exprl_jax.build import build_model, load_records, params_sha256
from exprl_jax.checkpoint import Checkpointer, abstract_like
from exprl_jax.data import QARecord, indices_at, records_at
from exprl_jax.loop import train_loop
from exprl_jax.metrics import MetricsLogger, truncate_metrics
from exprl_jax.methods import METHOD_SPECS, batch_ndims, loss_mask_key, make_loss_fn
from exprl_jax.tokenizer import eos_ids, pad_id
from exprl_jax.train_state import init_train_state, make_optimizer, make_train_step


log = logging.getLogger(__name__)


class ResumeRefused(RuntimeError):
    pass


class Experiment:
    def __init__(self, cfg: config_lib.ExperimentConfig, workdir):
        self.cfg, self.workdir = config_lib.resolve(cfg), storage.as_path(workdir)
        self.spec = METHOD_SPECS[cfg.method]

    # ---- bookkeeping (process 0) ----
    def _check_config(self):
        path = self.workdir / "config.json"
        current = config_lib.to_dict(self.cfg)
        if path.exists():
            changed = config_lib.diff(storage.read_json(path), json.loads(json.dumps(current)))
            if changed:
                raise ResumeRefused(f"{self.workdir} holds a run with a different config; differing keys:\n  "
                                    + "\n  ".join(changed) + "\nUse a new --workdir or the original config.")
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
            storage.write_json(path, current)

    def _finished_results(self) -> dict | None:
        """Checks the workdir against this config; the results of a finished run, or None."""
        self._check_config()
        path = self.workdir / "results.json"
        return storage.read_json(path) if path.exists() else None

    # ---- main ----
    def run(self) -> dict:
        cfg = self.cfg
        finished = distributed.from_primary(self._finished_results)
        if finished is not None:
            self._say(f"{self.workdir}: this run already finished ({cfg.train.steps} steps); nothing to do. "
                      f"Results: {self.workdir / 'results.json'}")
            return finished

        self.mesh = shd.make_mesh(cfg.mesh.shape)
        self.model_cfg, loaded_params, self.tokenizer = build_model(cfg, self.mesh)
        self.eos, self.pad = eos_ids(self.tokenizer), pad_id(self.tokenizer)
        self.train_records, self.eval_records, data_stats = load_records(cfg)
        optimizer = make_optimizer(cfg.optim)
        state, shardings = init_train_state(self.model_cfg, optimizer, jax.random.key(cfg.seed), self.mesh,
                                            params=loaded_params)
        # frozen initial policy: the KL reference and the self-distillation teacher (a separate buffer: the
        # training state is donated every step)
        needs_ref = self.spec.teacher or (self.spec.samples and cfg.loss.kl_coef > 0)
        self.ref_params = jax.tree.map(jnp.copy, state.params) if needs_ref else None
        ckpt = Checkpointer(self.workdir / "checkpoints", save_every=cfg.train.save_every,
                            max_to_keep=cfg.train.keep_checkpoints)
        start = 0
        latest = distributed.from_primary(ckpt.latest_step)
        if latest is not None:
            state, meta = ckpt.restore(latest, abstract_like(state, shardings))
            start = int(meta["iteration"])
            if meta["data_cursor"] != self.cursor(start):
                raise ResumeRefused(f"checkpoint {latest}: data cursor does not match the data on disk")
            self._say(f"resumed from {ckpt.directory} at step {start}")
        distributed.from_primary(lambda: truncate_metrics(self.workdir / "metrics.jsonl", start))

        from exprl_jax.steps import StepRunner

        self.runner = runner = StepRunner(self, make_train_step(
            make_loss_fn(cfg.method, self.model_cfg, cfg.loss, cfg.rollout.temperature), optimizer, shardings,
            self.mesh, batch_ndims(cfg.method), loss_mask_key(cfg.method)))
        logger = MetricsLogger(self.workdir, console_every=cfg.train.log_every)
        results: dict = {"method": cfg.method, "steps": cfg.train.steps, "data": data_stats}
        if data_stats and start == 0:  # skipped bad rows are counted, never silent
            flat = {k: v for k, v in data_stats.items() if not isinstance(v, dict)}
            flat.update({f"data/skipped/{r}": n for r, n in data_stats.get("data/skipped_by_reason", {}).items()})
            logger.log(0, flat, console=False)
        start_eval_path = self.workdir / "eval_start.json"
        if cfg.eval.at_start and self.eval_records:
            if start == 0 or not distributed.from_primary(start_eval_path.exists):
                results["eval_start"] = self.evaluate(state.params, logger, step=0, prefix="eval_start")
                self._write_once(start_eval_path, results["eval_start"], indent=None)
            else:  # resumed: the base evaluation was done before the interruption
                results["eval_start"] = distributed.from_primary(lambda: storage.read_json(start_eval_path))
        t0 = time.time()
        state = train_loop(self, state, start, runner, ckpt, logger)
        results["train_seconds"] = time.time() - t0
        if cfg.eval.at_end and self.eval_records:
            results["eval_end"] = self.evaluate(state.params, logger, step=cfg.train.steps, prefix="eval_end")
        runner.close()  # after the last canaries: closing writes out the judge cache
        self._save_final(state.params)
        results["params_sha256"] = params_sha256(state.params)
        ckpt.close()
        logger.close()
        self._write_once(self.workdir / "results.json", results)
        return results

    @staticmethod
    def _say(text: str) -> None:
        if distributed.is_primary():
            print(text, flush=True)

    @staticmethod
    def _write_once(path, obj, indent: int | None = 1) -> None:
        """Process 0 writes; the others wait for it, so a failed write stops every process."""
        distributed.from_primary(lambda: storage.write_json(path, obj, indent=indent))

    def records_at(self, step: int) -> list[QARecord]:
        """The records of step `step`: the data cursor is a pure function of (seed, step)."""
        return records_at(self.train_records, self._per_step(), step, self.cfg.seed, self.cfg.data.shuffle)

    def cursor(self, step: int) -> list[int]:
        """What a checkpoint records of the data cursor (the first record index of `step`), checked on resume."""
        return indices_at(self.train_records, self._per_step(), step, self.cfg.seed, self.cfg.data.shuffle)[:1]

    def _per_step(self) -> int:
        return self.cfg.train.batch_size if self.cfg.method == "sft" else self.cfg.rollout.prompts_per_step

    def _save_final(self, params):
        """final_hf/: every process takes part in gathering the params; process 0 writes."""
        from exprl_jax.models.hf import save_hf

        out = self.workdir / "final_hf"
        save_hf(out, self.model_cfg, params)

        def save_tokenizer():
            with tempfile.TemporaryDirectory() as tmp:  # transformers writes local files only
                self.tokenizer.save_pretrained(tmp)
                storage.copy_dir(tmp, out)

        distributed.from_primary(save_tokenizer)

    def evaluate(self, params, logger, *, step: int, prefix: str) -> dict:
        from exprl_jax.evaluate import evaluate_policy

        ev = self.cfg.eval
        report = evaluate_policy(
            self.runner.rollout_model_cfg, self.runner.rollout_params(params), self.tokenizer, self.eval_records,
            jax.random.key(self.cfg.seed + 7), max_concurrent_rows=self.cfg.rollout.max_concurrent_rows,
            num_samples=ev.num_samples, temperature=ev.temperature,
            max_new_tokens=ev.max_new_tokens or self.cfg.rollout.max_new_tokens, template=self.cfg.data.prompt_template,
            answer_style=self.cfg.data.answer_style, eos=self.eos, pad=self.pad, mesh=self.mesh,
            delimiter=self.cfg.process.delimiter, chat=self.cfg.data.chat_template, progress=prefix)
        reward_fn = getattr(getattr(self, "runner", None), "reward_fn", None)
        if reward_fn is not None and self.spec.reward != "sparse":  # SPEC §9: master-key canaries per evaluation
            import asyncio

            from exprl_jax.judge.monitors import run_canaries

            report["metrics"].update(asyncio.run(run_canaries(reward_fn, self.eval_records)))
        logger.log(step, {f"{prefix}/{k}": v for k, v in report["metrics"].items()}, console=True)
        return report
