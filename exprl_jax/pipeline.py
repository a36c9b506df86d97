"""Stage I then Stage II (SPEC §2) as two runs under one workdir, each evaluated on the difficulty ladder.

`<workdir>/stage1` runs the configured method; `<workdir>/stage2` runs sparse GRPO from its final params. The
pipeline evaluates the base model (cached by its weights' sha256), the Stage-I and the Stage-II policies on every
ladder rung (testbed; else the one eval set), plus `eval.final_num_samples` samples per problem on the hardest rung
for the base and Stage II. Each evaluation is written to `<workdir>/eval_<stage>.json`, so the pipeline resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax

from exprl_jax import distributed, storage
from exprl_jax.build import build_model, load_records, params_sha256, resolve_path
from exprl_jax.config import ExperimentConfig
from exprl_jax.experiment import Experiment
from exprl_jax.report import (format_mde, format_table, minimum_detectable_effects_of, plot_pass_at_k,  # noqa: F401
                               plot_pass_at_k_curves)

FINAL_SALT = 1000  # the final pass draws other random streams than the ladder pass on the same rung
EVAL_VERSION = 3  # in the base-evaluation cache key: bump when the counting or the sampler's random streams change
MAX_EVAL_ROWS = 1024  # sampled rows per generate call (KV-cache memory)


def stage1_config(cfg: ExperimentConfig) -> ExperimentConfig:
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, at_start=False, at_end=False))


def stage2_config(cfg: ExperimentConfig, stage1_workdir: str) -> ExperimentConfig:
    s2 = cfg.stage2
    return dataclasses.replace(
        cfg, name=f"{cfg.name}_stage2", method="stage2", loss=dataclasses.replace(
            cfg.loss, clip_high=-1.0, kl_coef=-1.0, entropy_coef=-1.0, scale_by_std="auto"),
        model=dataclasses.replace(cfg.model, init_checkpoint=stage1_workdir, hf_path=""),
        optim=dataclasses.replace(cfg.optim, learning_rate=s2.learning_rate if s2.learning_rate > 0
                                  else cfg.optim.learning_rate),
        rollout=dataclasses.replace(cfg.rollout, group_size=s2.group_size or cfg.rollout.group_size,
                                    prompts_per_step=s2.prompts_per_step or cfg.rollout.prompts_per_step),
        judge=dataclasses.replace(cfg.judge, reference="own", noise=0.0, backend="programmatic"),
        train=dataclasses.replace(cfg.train, steps=s2.steps),
        eval=dataclasses.replace(cfg.eval, at_start=False, at_end=False),  # the pipeline evaluates
        stage2=dataclasses.replace(s2, steps=0))


def evaluation_sets(cfg: ExperimentConfig) -> dict[str, list]:
    """name -> held-out records, easiest first: the testbed's ladder rungs, else {"eval": the eval set}."""
    if cfg.data.source == "testbed" and cfg.testbed.ladder_steps:
        from exprl_jax.tasks.testbed import ladder_sets

        return ladder_sets(cfg)
    return {"eval": load_records(cfg)[1]}


def _max_new_tokens(cfg: ExperimentConfig, records) -> int:
    if cfg.data.source == "testbed":
        from exprl_jax.tasks.testbed import max_new_tokens

        return max(cfg.rollout.max_new_tokens, max_new_tokens([len(r.checkpoints) for r in records]))
    return cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens


def evaluate_sets(cfg: ExperimentConfig, model_cfg, params, tokenizer, sets: dict, *, num_samples: int,
                  salt: int = 0) -> dict:
    """{name: evaluate_policy report} on every set; set i samples with fold_in(key(seed + 7), salt + i)."""
    from exprl_jax.evaluate import evaluate_policy
    from exprl_jax.tokenizer import eos_ids, pad_id

    ev, out = cfg.eval, {}
    for i, (name, records) in enumerate(sets.items()):
        report = evaluate_policy(
            model_cfg, params, tokenizer, records, jax.random.fold_in(jax.random.key(cfg.seed + 7), salt + i),
            num_samples=num_samples, temperature=ev.temperature, max_new_tokens=_max_new_tokens(cfg, records),
            template=cfg.data.prompt_template, answer_style=cfg.data.answer_style, eos=eos_ids(tokenizer),
            pad=pad_id(tokenizer), delimiter=cfg.process.delimiter, chat=cfg.data.chat_template,
            prompts_per_batch=max(1, MAX_EVAL_ROWS // num_samples),
            max_concurrent_rows=cfg.rollout.max_concurrent_rows, progress=f"eval {name}")
        examples = [p.pop("example") for p in report["per_problem"]][:4]
        out[name] = {**report, "examples": examples}
    return out


def _cache_dir(cfg: ExperimentConfig) -> str:
    if cfg.eval.cache_dir:
        return resolve_path(cfg.eval.cache_dir)
    base = resolve_path(cfg.model.hf_path) if cfg.model.hf_path and not cfg.model.init_checkpoint else ""
    if base and os.access(base, os.W_OK):
        return os.path.join(base, "eval_cache")
    return os.path.expanduser(os.path.join("~", ".cache", "exprl_jax", "eval"))


def cached_evaluation(cfg: ExperimentConfig, model_cfg, params, tokenizer, sets: dict, *, num_samples: int,
                      salt: int = 0) -> dict:
    """evaluate_sets, memoised on disk by the weights' sha256, the records and every sampling setting."""
    key = {"version": EVAL_VERSION, "params_sha256": params_sha256(params), "num_samples": num_samples,
           "salt": salt, "seed": cfg.seed, "temperature": cfg.eval.temperature,
           "template": cfg.data.prompt_template, "chat": cfg.data.chat_template, "answer_style": cfg.data.answer_style,
           "max_new_tokens": {name: _max_new_tokens(cfg, r) for name, r in sets.items()},
           "records": hashlib.sha256(json.dumps({n: [(r.id, r.problem, r.answer) for r in recs]
                                                 for n, recs in sets.items()}).encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(cfg), f"eval_{digest}.json")
    # process 0 decides hit or miss for every process (a miss samples on all of them: a collective) and writes
    cached = distributed.from_primary(lambda: _read_json(path))
    if cached is not None:
        return cached["reports"]
    reports = evaluate_sets(cfg, model_cfg, params, tokenizer, sets, num_samples=num_samples, salt=salt)
    distributed.from_primary(lambda: _write_json(path, {"key": key, "reports": reports}))
    return reports


def _read_json(path: str):
    p = storage.as_path(path)
    return storage.read_json(p) if p.exists() else None


def _write_json(path: str, obj) -> None:
    p = storage.as_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    storage.write_json(p, obj, indent=None)


def _load(cfg: ExperimentConfig, workdir: str | None):
    """(model config, params, tokenizer) of the base (workdir None) or of a finished stage's final_hf."""
    if workdir is None:
        model_cfg, params, tokenizer = build_model(cfg)
        if params is None:  # a preset: the same initial params Experiment creates from the seed
            from exprl_jax.models.transformer import init_params

            params = init_params(model_cfg, jax.random.key(cfg.seed))
        return model_cfg, params, tokenizer
    from exprl_jax.models.hf import load_hf
    from exprl_jax.tokenizer import load_tokenizer

    model_cfg, params = load_hf(os.path.join(workdir, "final_hf"), dtype=cfg.model.dtype)
    with storage.local_dir(os.path.join(workdir, "final_hf")) as local:  # local, or gs:// through a download
        return model_cfg, params, load_tokenizer(local)


def _stage_eval(path: str, compute) -> dict:
    """The evaluation stored at `path` (local or gs://), else `compute()` (on every process) stored there."""
    done = distributed.from_primary(lambda: _read_json(path))
    if done is not None:
        return done
    result = compute()
    distributed.from_primary(lambda: _write_json(path, result))
    return result


def ladder_and_final(cfg: ExperimentConfig, model: tuple, sets: dict, evaluate=evaluate_sets) -> dict:
    """{"ladder": every rung at eval.num_samples, "final": the hardest rung at eval.final_num_samples (if set)}.
    `model` is (model_cfg, params, tokenizer); `evaluate` is evaluate_sets or cached_evaluation."""
    out = {"ladder": evaluate(cfg, *model, sets, num_samples=cfg.eval.num_samples)}
    if cfg.eval.final_num_samples:
        hardest = dict([list(sets.items())[-1]])
        out["final"] = evaluate(cfg, *model, hardest, num_samples=cfg.eval.final_num_samples, salt=FINAL_SALT)
    return out


def base_evaluation(cfg: ExperimentConfig, sets: dict) -> dict:
    """The base model's ladder and final evaluation, cached by its weights' hash."""
    return ladder_and_final(cfg, _load(cfg, None), sets, cached_evaluation)


def run_pipeline(cfg: ExperimentConfig, workdir: str, *, on_base_eval=None) -> dict:
    """Base evaluation, Stage I (cfg.method; skipped when cfg.train.steps == 0), its evaluation, Stage II (if
    cfg.stage2.steps > 0) and its evaluation. `on_base_eval(reports)` runs after the base evaluation, before any
    training (the default run prints its minimum detectable effect there)."""
    distributed.from_primary(lambda: storage.as_path(workdir).mkdir(parents=True, exist_ok=True))
    sets = evaluation_sets(cfg)
    base = _stage_eval(os.path.join(workdir, "eval_base.json"), lambda: base_evaluation(cfg, sets))
    if cfg.data.source == "testbed" and distributed.is_primary():
        print(format_mde(minimum_detectable_effects_of(base, cfg, seeds=1)), flush=True)  # before any training
    if on_base_eval is not None:
        on_base_eval(base)
    summary: dict = {"base": base["ladder"], "base_final": base.get("final")}
    stage1_dir = os.path.join(workdir, "stage1")
    stage1 = Experiment(stage1_config(cfg), stage1_dir).run()
    summary["stage1_results"] = stage1
    if cfg.train.steps > 0:
        summary["stage1"] = _stage_eval(os.path.join(workdir, "eval_stage1.json"), lambda: _trained_eval(
            cfg, stage1_dir, sets))
    if cfg.stage2.steps > 0:
        stage2_dir = os.path.join(workdir, "stage2")
        summary["stage2_results"] = Experiment(stage2_config(cfg, stage1_dir), stage2_dir).run()

        s2 = _stage_eval(os.path.join(workdir, "eval_stage2.json"), lambda: ladder_and_final(
            cfg, _load(cfg, stage2_dir), sets, evaluate_sets))
        summary.update(stage2=s2["ladder"], stage2_final=s2.get("final"))
    table = format_table(summary, cfg, workdir)

    def write():  # once, by process 0
        out = storage.as_path(workdir)
        storage.write_json(out / "summary.json", {k: v for k, v in summary.items() if not k.endswith("_results")})
        (out / "summary.md").write_text(table + "\n")
        plot_pass_at_k(summary, out / "pass_at_k.png", title=f"{cfg.name}: {cfg.method}")

    distributed.from_primary(write)
    summary["table"] = table
    return summary


def _trained_eval(cfg: ExperimentConfig, stage_dir: str, sets: dict) -> dict:
    """The ladder evaluation of a Stage-I policy, plus the judge's master-key canaries (SPEC §9)."""
    model = _load(cfg, stage_dir)
    reports = evaluate_sets(cfg, *model, sets, num_samples=cfg.eval.num_samples)
    from exprl_jax.methods import METHOD_SPECS

    if METHOD_SPECS[cfg.method].reward not in (None, "sparse") and cfg.judge.backend != "exact_step":
        import asyncio

        from exprl_jax.judge.monitors import run_canaries
        from exprl_jax.rewards.factory import make_reward_fn

        reward_config = dataclasses.replace(cfg, judge=dataclasses.replace(cfg.judge, cache=False))
        rung = list(reports)[-1]
        # process 0 alone calls the judge; every process gets the canary metrics
        canaries = distributed.from_primary(lambda: asyncio.run(run_canaries(
            make_reward_fn(reward_config, stage_dir, load_records(cfg)[0]), sets[rung])))
        reports[rung]["metrics"].update(canaries)
    return reports
