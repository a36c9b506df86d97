"""Rollout throughput on one Hugging Face checkpoint: the continuous-batching engine against HF `generate` (static
and dynamic KV cache) and the fixed-batch sampler the engine replaced, in one run:

  python benchmarks/rollout.py [--presets bench,qwen3_0_6b_shape] [--rounds 2] [--threads 1] [--out rollout.json]

Two workloads per preset (benchmarks/compare.py's `sample` specs, the same prompts and sampling settings on every
side): fixed length (no EOS: every row generates max_new_tokens) and variable length (several EOS ids, so lengths
spread over more than 10x). Reported: new tokens/s (generated tokens only, medians of all timed repeats), the ratio
of the engine to each other side, and the share of wasted decode compute: slot-steps spent on rows that already
ended (the engine counts them; a fixed batch, HF's or ours, computes every row until the longest one ends). Each
side runs in its own process and the sides alternate (A B C D A B C D ...), so a busy machine slows all of them.
Needs `pip install -r requirements-bench.txt`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compare  # noqa: E402  (the shared inputs, checkpoints, process runner and CPU watch)

SIDES = {"jax:sample": "exprl_jax engine (all rows in slots)",
         "jax:sample_quarter_slots": "exprl_jax engine (1/4 of rows in slots)",
         "jax:sample_fixed_batch": "exprl_jax fixed-batch sampler (before)",
         "torch:sample_static": "HF generate (static cache)",
         "torch:sample_dynamic": "HF generate (dynamic cache)"}
ENGINE = "jax:sample"


def waste_of(side: str, result: dict, workload: str) -> float:
    """Median share of decode compute spent on ended rows."""
    w = result[workload]
    if "waste" in w:
        return float(np.median(w["waste"]))
    lengths = w["lengths"]  # HF: a fixed batch until the longest row ends (its mean / max over the repeats)
    return 1.0 - lengths["mean"] / lengths["max"]


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for workload in ("fixed", "variable"):
        speed = {s: float(np.median([v for r in rs for v in compare.speed(s, r, workload)])) for s, rs in runs.items()}
        for side, results in runs.items():
            rows.append({"workload": workload, "side": SIDES[side], "new_tok_s": speed[side],
                         "waste": float(np.median([waste_of(side, r, workload) for r in results])),
                         "engine_ratio": speed[ENGINE] / speed[side],
                         "lengths": results[-1][workload]["lengths"]})
    return rows


def format_table(preset: str, spec: dict, rows: list[dict]) -> str:
    what = {"fixed": f"{spec['prompts']} x {spec['new_tokens']} new, no EOS",
            "variable": f"{spec['prompts']} x <={spec['var_new_tokens']} new, {spec['var_eos']} EOS ids"}
    lines = [f"{preset}:", f"| {'workload':<34} | {'sampler':<40} | {'new tok/s':>9} | {'waste':>6} | "
                           f"{'engine / this':>13} |", f"|{'-' * 36}|{'-' * 42}|{'-' * 11}|{'-' * 8}|{'-' * 15}|"]
    for r in rows:
        lines.append(f"| {what[r['workload']]:<34} | {r['side']:<40} | {r['new_tok_s']:>9,.0f} | {r['waste']:>6.1%} |"
                     f" {r['engine_ratio']:>12.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="bench,qwen3_0_6b_shape")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"subset of {','.join(SIDES)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="cores and intra-op threads of both stacks: each worker is pinned to the last N CPUs "
                             "(0: each stack's default, all cores)")
    parser.add_argument("--workdir")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", default="rollout.json")
    args = parser.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    if ENGINE not in sides or set(sides) - set(SIDES):
        parser.error(f"--sides must include {ENGINE} and be a subset of {list(SIDES)}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="exprl_rollout_")
    report = {"presets": {}, "rounds": args.rounds, "threads": args.threads or "default",
              "machine": compare.machine(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    tables = []
    with compare.CpuWatch() as watch:
        for preset in [p for p in args.presets.split(",") if p]:
            spec = compare.WORKLOADS[preset]["sample"]
            model_dir = compare.build_checkpoint(preset, os.path.join(workdir, f"hf_{preset}"))
            runs: dict[str, list[dict]] = {}
            for round_ in range(args.rounds):
                for side in sides:
                    t = time.time()
                    runs.setdefault(side, []).append(
                        compare.run_side(side, model_dir, spec, workdir, args.timeout, args.threads))
                    print(f"[{preset} round {round_ + 1}/{args.rounds}] {SIDES[side]}: {time.time() - t:.0f}s",
                          flush=True)
            rows = summarise(runs)
            tables.append(format_table(preset, spec, rows) + "\n" + compare.cores_used(runs, SIDES))
            report["presets"][preset] = {"spec": spec, "table": rows, "runs": runs}
    report["cpu_during_run"] = watch.report()
    report["table_text"] = "\n\n".join(tables)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(report["table_text"])
    load = report["cpu_during_run"]
    print(f"load average (1 min) during the run: {load['loadavg_1m']}; other processes used "
          f"{load['other_cores_mean']:.2f} cores on average")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
