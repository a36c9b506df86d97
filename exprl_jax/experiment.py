"""The host shell of every run: setup, exact resume, the step loop (one loop for all methods), evaluation, results.

Per step s: the data cursor and the RNG stream are pure functions of (seed, s), and both are also written into
each checkpoint, so a run killed at any moment and restarted continues bit-for-bit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from exprl_jax import config as config_lib
from exprl_jax import sharding as shd
from exprl_jax.checkpoint import Checkpointer, abstract_like
from exprl_jax.data import QARecord, load_gsm8k, load_math, read_jsonl
from exprl_jax.metrics import MetricsLogger, read_metrics
from exprl_jax.methods import METHOD_SPECS, batch_ndims, make_loss_fn
from exprl_jax.models.config import ModelConfig
from exprl_jax.rollouts import save_rollouts
from exprl_jax.tokenizer import eos_ids, load_tokenizer, pad_id
from exprl_jax.train_state import init_train_state, make_optimizer, make_train_step


log = logging.getLogger(__name__)


class ResumeRefused(RuntimeError):
    pass


def params_sha256(params) -> str:
    """Digest of every parameter's path, dtype, shape and bytes (host copy)."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda x: jax.tree_util.keystr(x[0])):
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path: str) -> str:
    """A relative path that does not exist from the working directory is taken relative to the repository root,
    so shipped assets (e.g. assets/testbed_base) are found from anywhere."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def build_model(cfg: config_lib.ExperimentConfig, mesh=None):
    """(model config, loaded params or None, tokenizer). Precedence: init_checkpoint > hf_path (loaded tensor by
    tensor onto `mesh`) > a preset, whose params `init_train_state` then initialises directly on the mesh."""
    m = cfg.model
    source = m.init_checkpoint and os.path.join(resolve_path(m.init_checkpoint), "final_hf") or resolve_path(m.hf_path)
    if source:
        from exprl_jax.models.hf import load_hf

        model_cfg, params = load_hf(source, dtype=m.dtype, mesh=mesh)
        tokenizer = load_tokenizer(source if os.path.isfile(os.path.join(source, "tokenizer.json")) else m.tokenizer)
        return model_cfg, params, tokenizer
    tokenizer = load_tokenizer(m.tokenizer)
    presets = {"tiny": ModelConfig.tiny, "qwen3_0_6b": ModelConfig.qwen3_0_6b, "qwen3_1_7b": ModelConfig.qwen3_1_7b,
               "qwen3_4b": ModelConfig.qwen3_4b, "qwen3_8b": ModelConfig.qwen3_8b}
    if m.preset not in presets:
        raise ValueError(f"config.model.preset={m.preset!r}; expected one of {tuple(presets)}")
    overrides = {k: getattr(m, k) for k in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                            "mlp_dim") if getattr(m, k) > 0}
    model_cfg = presets[m.preset](dtype=m.dtype, param_dtype=m.param_dtype, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=pad_id(tokenizer), bos_token_id=tokenizer.bos_token_id, **overrides)
    if model_cfg.vocab_size < len(tokenizer):
        raise ValueError(f"model vocab_size={model_cfg.vocab_size} < tokenizer size {len(tokenizer)}")
    return model_cfg, None, tokenizer  # None: init_train_state creates the params already sharded


def load_records(cfg: config_lib.ExperimentConfig) -> tuple[list[QARecord], list[QARecord], dict]:
    d = cfg.data
    stats: dict = {}
    if d.source == "toy_addition":
        from exprl_jax.tasks.toy import addition_records

        train, evals = addition_records(d.num_train or 256, seed=cfg.seed), addition_records(d.num_eval, seed=10_000)
    elif d.source in ("jsonl", "gsm8k", "math"):
        if not d.train_path:
            raise ValueError(f"config.data.train_path is required for data.source={d.source!r}")

        def load(path):
            if d.source == "gsm8k":
                return load_gsm8k(path), {}
            if d.source == "math":
                from exprl_jax.rewards.answers import extract_answer

                return load_math(path, extract_answer=extract_answer), {}
            return read_jsonl(path, on_bad_row=d.on_bad_row)

        train, stats = load(d.train_path)
        evals = load(d.eval_path)[0] if d.eval_path else []
    elif d.source == "testbed":
        from exprl_jax.tasks.testbed import testbed_records

        train, evals = testbed_records(cfg)
    else:
        raise ValueError(f"config.data.source={d.source!r} is not known")
    if d.num_train:
        train = train[:d.num_train]
    return train, evals[:d.num_eval], stats


def step_indices(num_records: int, per_step: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """The data cursor: record indices of step `step` in the endless sequence of per-epoch permutations."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(pos, num_records)
        order = np.random.default_rng([seed, epoch]).permutation(num_records) if shuffle else np.arange(num_records)
        out.append(int(order[offset]))
    return out


class Experiment:
    def __init__(self, cfg: config_lib.ExperimentConfig, workdir: str):
        self.cfg, self.workdir = config_lib.resolve(cfg), os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.spec = METHOD_SPECS[cfg.method]

    # ---- bookkeeping ----
    def _check_config(self):
        path = os.path.join(self.workdir, "config.json")
        current = config_lib.to_dict(self.cfg)
        if os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            changed = config_lib.diff(previous, json.loads(json.dumps(current)))
            if changed:
                raise ResumeRefused(f"{self.workdir} holds a run with a different config; differing keys:\n  "
                                    + "\n  ".join(changed) + "\nUse a new --workdir or the original config.")
        else:
            with open(path, "w") as f:
                json.dump(current, f, indent=1)

    def _truncate_metrics(self, step: int):
        """After a restore, drop logged rows of steps the restored state has not taken yet."""
        path = os.path.join(self.workdir, "metrics.jsonl")
        if os.path.exists(path):
            rows = [r for r in read_metrics(path) if r["step"] <= step]  # row k = state after k steps
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    # ---- main ----
    def run(self) -> dict:
        cfg = self.cfg
        results_path = os.path.join(self.workdir, "results.json")
        self._check_config()
        if os.path.exists(results_path):
            print(f"{self.workdir}: this run already finished ({cfg.train.steps} steps); nothing to do. "
                  f"Results: {results_path}", flush=True)
            with open(results_path) as f:
                return json.load(f)

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
        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), save_every=cfg.train.save_every,
                            max_to_keep=cfg.train.keep_checkpoints)
        start = 0
        latest = ckpt.latest_step()
        if latest is not None:
            state, meta = ckpt.restore(latest, abstract_like(state, shardings))
            start = int(meta["iteration"])
            if meta["data_cursor"] != step_indices(len(self.train_records), self._per_step(), start, cfg.seed,
                                                   cfg.data.shuffle)[:1]:
                raise ResumeRefused(f"checkpoint {latest}: data cursor does not match the data on disk")
            print(f"resumed from {ckpt.directory} at step {start}", flush=True)
        self._truncate_metrics(start)

        from exprl_jax.steps import StepRunner

        self.runner = runner = StepRunner(self, make_train_step(
            make_loss_fn(cfg.method, self.model_cfg, cfg.loss, cfg.rollout.temperature), optimizer, shardings,
            self.mesh, batch_ndims(cfg.method)))
        logger = MetricsLogger(self.workdir, console_every=cfg.train.log_every)
        results: dict = {"method": cfg.method, "steps": cfg.train.steps, "data": data_stats}
        if data_stats and start == 0:  # skipped bad rows are counted, never silent
            flat = {k: v for k, v in data_stats.items() if not isinstance(v, dict)}
            flat.update({f"data/skipped/{r}": n for r, n in data_stats.get("data/skipped_by_reason", {}).items()})
            logger.log(0, flat, console=False)
        start_eval_path = os.path.join(self.workdir, "eval_start.json")
        if cfg.eval.at_start and self.eval_records:
            if start == 0 or not os.path.exists(start_eval_path):
                results["eval_start"] = self.evaluate(state.params, logger, step=0, prefix="eval_start")
                with open(start_eval_path, "w") as f:
                    json.dump(results["eval_start"], f)
            else:  # resumed: the base evaluation was done before the interruption
                with open(start_eval_path) as f:
                    results["eval_start"] = json.load(f)
        t0 = time.time()
        state = self._train_loop(state, start, runner, ckpt, logger)
        runner.close()
        results["train_seconds"] = time.time() - t0
        if cfg.eval.at_end and self.eval_records:
            results["eval_end"] = self.evaluate(state.params, logger, step=cfg.train.steps, prefix="eval_end")
        self._save_final(state.params)
        results["params_sha256"] = params_sha256(state.params)
        ckpt.close()
        logger.close()
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
        return results

    def _records(self, step: int) -> list[QARecord]:
        cfg = self.cfg
        indices = step_indices(len(self.train_records), self._per_step(), step, cfg.seed, cfg.data.shuffle)
        return [self.train_records[i] for i in indices]

    def _train_loop(self, state, start: int, runner, ckpt, logger):
        """Steps [start, steps). Step s uses key fold_in(seed key, s): sampling fold_in(k, 0), updates fold_in(k, 1).
        With judge.overlap, the rollouts of step s+1 are sampled (with the params before update s) while the judge
        scores step s; they are saved with each checkpoint so a resume replays them exactly."""
        cfg = self.cfg
        base_key = jax.random.key(cfg.seed + 1)
        overlap = cfg.judge.overlap and self.spec.samples

        def pending_path(s):
            return os.path.join(ckpt.directory, f"pending_rollouts_{s}.npz")

        pending = None
        if overlap and start > 0 and os.path.exists(pending_path(start)):
            from exprl_jax.rollouts import load_rollouts

            pending = load_rollouts(pending_path(start), self._records(start), self.tokenizer, self.eos)
        from tqdm import tqdm

        unscored_streak = 0
        pool = ThreadPoolExecutor(max_workers=1)  # the judge runs beside the device, never inside jit
        progress = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc=cfg.method,
                        dynamic_ncols=True, disable=None)
        for step in progress:
            step_start = time.time()
            key = jax.random.fold_in(base_key, step)
            if not self.spec.samples:
                state, metrics = runner.sft_step(state, self._records(step), jax.random.fold_in(key, 1))
            else:
                sample_s = 0.0
                if pending is None:
                    pending, sample_s = runner.sample(state.params, self._records(step), jax.random.fold_in(key, 0))
                rollouts, pending = pending, None
                scoring = pool.submit(runner.score, rollouts)
                t_device = time.time()
                ref_logprobs = runner.reference_logprobs(rollouts)
                if overlap and step + 1 < cfg.train.steps:
                    next_key = jax.random.fold_in(jax.random.fold_in(base_key, step + 1), 0)
                    pending, next_sample_s = runner.sample(state.params, self._records(step + 1), next_key)
                    sample_s += next_sample_s
                device_done = time.time()
                scored = scoring.result()
                judge_s = scored[3]
                waited = max(0.0, time.time() - device_done)
                batch, metrics = runner.build_batch(rollouts, scored, ref_logprobs)
                t = time.time()
                if batch["response_mask"].any():
                    state, update_metrics = runner.update(state, batch, jax.random.fold_in(key, 1))
                    metrics.update(update_metrics)
                else:  # nothing scored: no update, so AdamW does not decay the weights on a zero gradient
                    metrics["update/skipped"] = 1.0
                    log.warning("step %d: no rollout could be scored; update skipped", step + 1)
                judge_dead = metrics.get("judge/calls", 0) > 0 and metrics.get("judge/unscored_frac") == 1.0
                unscored_streak = unscored_streak + 1 if judge_dead else 0
                if unscored_streak >= cfg.judge.max_unscored_steps > 0:
                    logger.log(step + 1, metrics, console=False)
                    raise RuntimeError(
                        f"{unscored_streak} consecutive steps in which every judge call failed "
                        f"({ {k: v for k, v in metrics.items() if k.startswith('judge/unscored/')} }): the judge "
                        "looks unavailable. The last checkpoint is kept; fix the judge and re-run the same command.")
                # judge_hidden_frac: the share of the judge's wall time spent while the device was busy
                metrics.update({"time/sample_s": sample_s, "time/reward_s": judge_s,
                                "time/update_s": time.time() - t,
                                "time/device_while_judging_s": device_done - t_device,
                                "time/judge_hidden_frac": 1.0 - waited / judge_s if judge_s > 0 else 1.0})
            metrics["time/step_s"] = time.time() - step_start
            row = logger.log(step + 1, metrics, console=False)
            progress.set_postfix({k.split("/")[-1]: f"{row[k]:.3g}" for k in ("loss/total", "reward/mean",
                                  "reward/sparse_acc") if isinstance(row.get(k), float)})
            if pending is not None:
                save_rollouts(pending_path(step + 1), pending)
            meta = {"iteration": step + 1, "seed": cfg.seed, "optimizer_step": int(state.step),
                    "data_cursor": step_indices(len(self.train_records), self._per_step(), step + 1, cfg.seed,
                                                cfg.data.shuffle)[:1],
                    "rng_key_data": np.asarray(jax.random.key_data(jax.random.fold_in(base_key, step + 1))).tolist(),
                    "pending_rollouts": pending is not None}
            ckpt.save(step + 1, state, meta, force=step + 1 == cfg.train.steps)
            for old in range(max(0, step - cfg.train.keep_checkpoints * cfg.train.save_every), step + 1):
                if os.path.exists(pending_path(old)) and old not in (ckpt.all_steps() or ()):
                    os.remove(pending_path(old))
        pool.shutdown()
        return state

    def _per_step(self) -> int:
        return self.cfg.train.batch_size if self.cfg.method == "sft" else self.cfg.rollout.prompts_per_step

    def _save_final(self, params):
        from exprl_jax.models.hf import save_hf

        out = os.path.join(self.workdir, "final_hf")
        save_hf(out, self.model_cfg, jax.device_get(params))
        self.tokenizer.save_pretrained(out)

    def evaluate(self, params, logger, *, step: int, prefix: str) -> dict:
        from exprl_jax.evaluate import evaluate_policy

        ev = self.cfg.eval
        report = evaluate_policy(
            self.model_cfg, params, self.tokenizer, self.eval_records, jax.random.key(self.cfg.seed + 7),
            num_samples=ev.num_samples, temperature=ev.temperature,
            max_new_tokens=ev.max_new_tokens or self.cfg.rollout.max_new_tokens, template=self.cfg.data.prompt_template,
            answer_style=self.cfg.data.answer_style, eos=self.eos, pad=self.pad, mesh=self.mesh,
            delimiter=self.cfg.process.delimiter, chat=self.cfg.data.chat_template)
        reward_fn = getattr(getattr(self, "runner", None), "reward_fn", None)
        if reward_fn is not None and self.spec.reward != "sparse":  # SPEC §9: master-key canaries per evaluation
            import asyncio

            from exprl_jax.judge.monitors import run_canaries

            report["metrics"].update(asyncio.run(run_canaries(reward_fn, self.eval_records)))
        logger.log(step, {f"{prefix}/{k}": v for k, v in report["metrics"].items()}, console=True)
        return report


def enable_compilation_cache(directory: str | None = None) -> str:
    """Persistent XLA compilation cache (halves a small run's wall time on CPU; a restart compiles nothing).
    Default: $EXPRL_JAX_CACHE or ~/.cache/exprl_jax/xla."""
    directory = directory or os.environ.get("EXPRL_JAX_CACHE") or os.path.expanduser("~/.cache/exprl_jax/xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
