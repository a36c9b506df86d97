"""Keeps the problems the base model fails in all k samples (SPEC §2), for `data.filter_path`.

  python experiments/filter_hard.py --config=experiments/configs/gsm8k_exprl.py --k=64 --out_dir=filters \
      --config.model.hf_path=/path/to/base

The base model is the config's (model.init_checkpoint's final_hf, else model.hf_path); the problems are its
training records (before any filter); prompts, temperature (eval.temperature), answer check and generation length
(eval.max_new_tokens, else rollout.max_new_tokens) are the run's. The result, `<out_dir>/hard_filter_<digest>.json`,
holds the kept ids and every problem's pass count; its name is a digest of everything that determines it (the
weights' sha256 included), so a second call with the same inputs reuses it. Then train with
`--config.data.filter_path=<that file>`.
"""
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from exprl_jax.build import enable_compilation_cache, load_records, model_source  # noqa: E402
from exprl_jax.config import ExperimentConfig, from_dict  # noqa: E402
from exprl_jax.data import hard_filter  # noqa: E402



def filter_hard(cfg: ExperimentConfig, *, k: int, out_dir: str, seed: int = 0, chunk: int = 64) -> tuple[str, dict]:
    """(result path, result): computed, or read back when the same inputs were filtered before."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, filter_path=""))  # the unfiltered pool
    hf_dir = model_source(cfg)
    if not hf_dir:
        raise ValueError("the hard filter needs a base model with weights: set config.model.hf_path (or "
                         "model.init_checkpoint); a preset is randomly initialised")
    records, _, _ = load_records(cfg)
    records = list(records)
    key = {"pool": hard_filter.pool_sha256(records), "samples": k, "temperature": cfg.eval.temperature,
           "template": cfg.data.prompt_template, "chat_template": cfg.data.chat_template,
           "answer_style": cfg.data.answer_style,
           "max_new_tokens": cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, "seed": seed,
           "weights_sha256": hard_filter.weights_sha256(hf_dir)}
    path = os.path.join(out_dir, f"hard_filter_{hard_filter.key_digest(key)}.json")
    if os.path.isfile(path):
        print(f"{path}: already computed for this base model and these problems", flush=True)
        return path, hard_filter.read_result(path)
    counts = hard_filter.pass_counts(hf_dir, records, samples=k, temperature=key["temperature"],
                                     template=key["template"], max_new_tokens=key["max_new_tokens"], seed=seed,
                                     answer_style=key["answer_style"], chunk=chunk, chat=key["chat_template"])
    return path, hard_filter.write_result(path, key, records, counts)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    args = flags.FLAGS
    cfg = from_dict(ExperimentConfig, args.config.to_dict())
    path, result = filter_hard(cfg, k=args.k, out_dir=args.out_dir, seed=args.seed, chunk=args.chunk)
    counts = [c for c in result["pass_counts"].values() if c is not None]
    print(json.dumps({"problems": result["num_records"], "kept": result["num_kept"],
                      "no_verdict": len(result.get("no_verdict_ids", [])),
                      "mean_pass_rate": sum(counts) / (len(counts) * args.k) if counts else None}, indent=1))
    print(f"train on them with --config.data.filter_path={path}")


if __name__ == "__main__":
    # defined here, not at import: tests import filter_hard() next to other tools that define --config
    config_flags.DEFINE_config_file("config", None, "Run config (its model and data sections).", lock_config=True)
    flags.DEFINE_integer("k", 64, "Samples per problem (the paper: 64).")
    flags.DEFINE_string("out_dir", "filters", "Where the result file goes.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("chunk", 64, "Problems per sampling call.")
    app.run(main)
