"""Runs one experiment from an ml_collections config file; with no --config, the embedded default.

  python experiments/run.py --config=experiments/configs/smoke.py --workdir=/tmp/smoke --config.method=grpo

One process per host: start the same command on every host, with --coordinator_address=HOST0:PORT,
--num_processes=N and --process_id=i (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); on a TPU
pod JAX finds these itself. The workdir (e.g. gs://bucket/run) must be visible to every host.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from exprl_jax import distributed  # noqa: E402
from exprl_jax.config import ExperimentConfig, from_dict  # noqa: E402
from exprl_jax.build import enable_compilation_cache, keep_freed_host_memory  # noqa: E402
from exprl_jax.experiment import Experiment  # noqa: E402
from exprl_jax.pipeline import run_pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "experiments", "configs", "default.py"), "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory, local or gs://... (default: workdir/<config name>).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (one per host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep the console to progress lines (Orbax logs every save at INFO)
    keep_freed_host_memory()  # before any device use: XLA:CPU's per-step buffers stay mapped (build.py)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)  # before any device use
    enable_compilation_cache()
    cfg = from_dict(ExperimentConfig, _CONFIG.value.to_dict())
    workdir = _WORKDIR.value or os.path.join(ROOT, "workdir", cfg.name)
    say = print if distributed.is_primary() else (lambda *a, **k: None)
    if cfg.stage2.steps > 0:  # Stage I -> Stage II -> table (SPEC §2)
        summary = run_pipeline(cfg, workdir)
        say(summary["table"])
        say(f"files: {workdir}/summary.md, {workdir}/pass_at_k.png, {workdir}/stage1/, {workdir}/stage2/ "
              "(metrics.jsonl, tb/, results.json, final_hf/)")
        return
    results = Experiment(cfg, workdir).run()
    summary = {k: v for k, v in results.items() if k in ("method", "steps", "params_sha256")}
    for key in ("eval_start", "eval_end"):
        if key in results:
            summary[key] = results[key]["metrics"]
    say(json.dumps(summary, indent=1))
    say(f"workdir: {workdir}")


if __name__ == "__main__":
    app.run(main)
