"""python -m exprl_jax.plan --config=<file> --topology=v5p-32 [--config.a.b=v ...]

Will a config fit? Compiles every program one step of the config runs, at its real shapes and mesh, for a Cloud TPU
slice that is not attached (deviceless ahead-of-time compilation through libtpu, as MaxText's train_compile does),
and prints the compiler's own per-chip memory figures and FLOPs. Nothing runs. The programs come from the same
factories the run uses (train_state.make_train_step, rollouts._score, ...): there is no second copy of any program.
Exits 1 when a program does not fit; the last line says which.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

# libtpu serves one process at a time unless told otherwise; the CPU stays the default backend
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

GiB = 2**30
# Cloud TPU name -> (topology for get_topology_desc, HBM per chip in bytes as the compiler budgets it)
TOPOLOGIES = {
    "v5e-16": ("v5e:4x4", 16 * GiB), "v5e-64": ("v5e:8x8", 16 * GiB), "v5e-256": ("v5e:16x16", 16 * GiB),
    "v5p-8": ("v5p:2x2x1", 95 * GiB), "v5p-32": ("v5p:2x2x4", 95 * GiB), "v5p-64": ("v5p:2x4x4", 95 * GiB),
    "v5p-128": ("v5p:4x4x4", 95 * GiB),
    "v6e-8": ("v6e:2x4", 32 * GiB), "v6e-16": ("v6e:4x4", 32 * GiB), "v6e-64": ("v6e:8x8", 32 * GiB),
    "v4-32": ("v4:2x2x4", 16 * GiB),  # listed per TensorCore (2 per chip, 32 GiB per chip)
}


def topology_devices(name: str):
    """The devices of a Cloud TPU slice by its Cloud name (e.g. "v5p-32"), without a TPU attached."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; known: {sorted(TOPOLOGIES)}")
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[name][0]).devices


@dataclasses.dataclass
class Program:
    """One compiled program's per-chip memory (bytes) and FLOPs, or why it did not compile."""
    name: str
    shapes: str
    arguments: int = 0
    outputs: int = 0
    temporaries: int = 0
    aliased: int = 0
    flops: float = 0.0
    error: str = ""

    @property
    def peak(self) -> int:  # donated arguments alias outputs and are counted once
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compile_program(name: str, shapes: str, lower: Callable) -> Program:
    """Lowers and compiles; RESOURCE_EXHAUSTED (or any compile error) is recorded, not raised."""
    try:
        compiled = lower().compile()
    except Exception as e:  # the compiler's refusal is the verdict; keep its words
        return Program(name, shapes, error=" ".join(str(e).split())[:400])
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Program(name, shapes, arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                   temporaries=memory.temp_size_in_bytes, aliased=memory.alias_size_in_bytes,
                   flops=float((cost or {}).get("flops", 0.0)))


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _batch_structs(mesh, fields: dict[str, tuple], leading_axes: int):
    from exprl_jax import sharding as shd

    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape), leading_axes))
            for k, (shape, dtype) in fields.items()}


def step_programs(cfg, mesh, *, prompt_tokens: int, teacher_prompt_tokens: int) -> list[Program]:
    """The update step and the log-prob passes of one step of `cfg` (a resolved ExperimentConfig) on `mesh`."""
    from exprl_jax.batching import batch_shards, micro_rows, round_up
    from exprl_jax.build import model_config
    from exprl_jax.methods import METHOD_SPECS, batch_ndims, loss_mask_key, make_loss_fn
    from exprl_jax.models.transformer import init_params
    from exprl_jax.rollouts import _score
    from exprl_jax.sampling import PROMPT_MULTIPLE
    from exprl_jax.train_state import TrainState, make_optimizer, make_train_step, state_shardings

    model_cfg = model_config(cfg)
    spec = METHOD_SPECS[cfg.method]
    optimizer = make_optimizer(cfg.optim)
    shardings = state_shardings(model_cfg, optimizer, mesh)
    params = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
    state = _abstract(TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                                 jax.eval_shape(optimizer.init, params)), shardings)
    shards = batch_shards(mesh)
    P, R = round_up(prompt_tokens, PROMPT_MULTIPLE), cfg.rollout.max_new_tokens
    if spec.samples:
        rows = cfg.loss.ppo_mini_batch_size or cfg.rollout.prompts_per_step * cfg.rollout.group_size
        length = P + R
    else:
        rows, length = cfg.train.batch_size, cfg.train.seq_len
    m = micro_rows(rows, cfg.train.micro_batch_size, shards)
    n = round_up(rows, m) // m
    ndims = batch_ndims(cfg.method)
    widths = {"tokens": length, "attention_mask": length, "loss_mask": length - 1}
    fields = {k: ((n, m, widths.get(k, R)), jnp.int32 if k in ("tokens", "attention_mask") else jnp.float32)
              for k in ndims}
    step = make_train_step(make_loss_fn(cfg.method, model_cfg, cfg.loss, cfg.rollout.temperature), optimizer,
                           shardings, mesh, ndims, loss_mask_key(cfg.method))
    rng = jax.ShapeDtypeStruct(jax.random.key(0).shape, jax.random.key(0).dtype)
    programs = [compile_program(
        "update", f"{n} micro x {m} rows x {length} tokens",
        lambda: step.lower(state, _batch_structs(mesh, fields, 1), rng))]
    passes = []
    if spec.samples and (cfg.loss.kl_coef > 0 or cfg.rollout.recompute_logprobs != "false"):
        passes.append(("reference/recompute log-probs", P))
    if spec.teacher:
        passes.append(("teacher log-probs", round_up(teacher_prompt_tokens, PROMPT_MULTIPLE)))
    for name, prompt in passes:
        batch = _batch_structs(mesh, {"tokens": ((m, prompt + R), jnp.int32),
                                      "attention_mask": ((m, prompt + R), jnp.int32),
                                      "response_mask": ((m, R), jnp.float32)}, 0)
        programs.append(compile_program(name, f"{m} rows x {prompt + R} tokens", lambda batch=batch: _score.lower(
            state.params, batch, model_cfg=model_cfg, temperature=float(cfg.rollout.temperature), mesh=mesh)))
    return programs


def report(programs: list[Program], topology: str, hbm: int) -> tuple[str, bool]:
    """The table and the verdict line."""
    def gib(x):
        return f"{x / GiB:7.2f}"

    lines = [f"{'program':<30} {'shapes':<34} {'args':>7} {'temps':>7} {'outs':>7} {'peak':>7} {'HBM':>5} "
             f"{'TFLOPs':>9}  (GiB per chip)"]
    failed = None
    for p in programs:
        if p.error:
            lines.append(f"{p.name:<30} {p.shapes:<34} does not compile: {p.error}")
            failed = failed or f"{p.name}: {p.error[:200]}"
            continue
        fits = p.peak <= hbm
        lines.append(f"{p.name:<30} {p.shapes:<34} {gib(p.arguments)} {gib(p.temporaries)} {gib(p.outputs)} "
                     f"{gib(p.peak)} {hbm / GiB:5.0f} {p.flops / 1e12:9.1f}{'' if fits else '  OVER'}")
        if not fits:
            failed = failed or f"{p.name}: peak {p.peak / GiB:.1f} GiB of {hbm / GiB:.0f} GiB per chip"
    peak = max((p.peak for p in programs if not p.error), default=0)
    verdict = (f"fits on {topology}: no ({failed})" if failed else
               f"fits on {topology}: yes (peak {peak / GiB:.1f} GiB of {hbm / GiB:.0f} GiB per chip)")
    return "\n".join(lines + [verdict]), failed is None


def plan(cfg, topology: str, *, prompt_tokens: int = 0, teacher_prompt_tokens: int = 0) -> tuple[str, bool]:
    """Compiles one step of `cfg` for `topology`; returns (printable report, fits)."""
    from exprl_jax import config as config_lib
    from exprl_jax import sharding as shd

    cfg = config_lib.resolve(cfg)
    # a deviceless TPU executable cannot be read back from the persistent cache, so none is written
    jax.config.update("jax_enable_compilation_cache", False)
    mesh = shd.make_mesh(cfg.mesh.shape, devices=topology_devices(topology))
    prompt_tokens = prompt_tokens or cfg.rollout.max_prompt_tokens
    if prompt_tokens < 1 and cfg.method != "sft":
        raise ValueError("plan: set rollout.max_prompt_tokens (or --prompt_tokens): the longest prompt decides memory")
    programs = step_programs(cfg, mesh, prompt_tokens=prompt_tokens,
                             teacher_prompt_tokens=teacher_prompt_tokens or 2 * prompt_tokens)
    header = (f"{cfg.name} ({cfg.method}) on {topology}: mesh {dict(mesh.shape)}, "
              f"attention={cfg.model.attention_impl}, scan_layers={cfg.model.scan_layers}, remat={cfg.model.remat}, "
              f"logits_chunk={cfg.model.logits_chunk}, micro_batch_size={cfg.train.micro_batch_size}")
    text, fits = report(programs, topology, TOPOLOGIES[topology][1])
    return header + "\n" + text, fits


def main(argv):
    from absl import flags

    from exprl_jax.config import ExperimentConfig, from_dict

    del argv
    cfg = from_dict(ExperimentConfig, flags.FLAGS.config.to_dict())
    text, fits = plan(cfg, flags.FLAGS.topology, prompt_tokens=flags.FLAGS.prompt_tokens,
                      teacher_prompt_tokens=flags.FLAGS.teacher_prompt_tokens)
    print(text, flush=True)
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_string("topology", None, f"Cloud TPU slice: {', '.join(sorted(TOPOLOGIES))}")
    flags.DEFINE_integer("prompt_tokens", 0, "longest prompt (default: the config's rollout.max_prompt_tokens)")
    flags.DEFINE_integer("teacher_prompt_tokens", 0, "longest self-distillation teacher prompt (default 2x)")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
