"""Does `judge.overlap` hide the judge? Step time against max(device, judge) and device + judge, with the judge's
latency swept from 0.25x to 4x the device time of a step, overlap off and on (alternated).

  python benchmarks/overlap.py [--factors 0.25,0.5,1,2,4] [--steps 7] [--out overlap.json]

The run is the embedded default (experiments/configs/default.py: ExpRL-Outcome on the CPU testbed from the shipped
base, whose rollouts end with EOS and so all reach the judge), with a smaller step (--prompts x --group) and an
OpenAI-compatible judge server on this machine that answers every request after a fixed delay. "device" is the
step's device work measured without any judge delay (sampling + reference log-probs + update); "judge" is the
scoring wall time per step (all requests in flight at once, plus the answer check). The claim under test: with
overlap, a step takes at most 1.1 x max(device, judge).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from judge import start_server  # noqa: E402  (benchmarks/judge.py)

DEFAULT = os.path.join(ROOT, "experiments", "configs", "default.py")
KEYS = ("time/step_s", "time/reward_s", "time/sample_s", "time/device_while_judging_s", "time/update_s",
        "time/judge_hidden_frac")


def run(url: str, overlap: bool, args) -> dict:
    """Medians over the timed steps of one run: not the first (compilation), nor, with overlap, the last (which
    samples nothing ahead)."""
    from exprl_jax.config import load_config
    from exprl_jax.experiment import Experiment
    from exprl_jax.metrics import read_metrics

    cfg = load_config(DEFAULT, **{
        "train.steps": args.steps, "train.save_every": 10 ** 9, "eval.at_start": False, "eval.at_end": False,
        "stage2.steps": 0, "rollout.prompts_per_step": args.prompts, "rollout.group_size": args.group,
        "loss.ppo_mini_batch_size": 0, "judge.backend": "openai", "judge.base_url": url, "judge.model": "bench",
        "judge.overlap": overlap, "judge.cache": False})
    with tempfile.TemporaryDirectory() as workdir:
        Experiment(cfg, workdir).run()
        rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss/total" in r]
    timed = rows[1:-1]
    out = {k: float(np.median([r[k] for r in timed])) for k in KEYS}
    # the device work inside the step: sampling (with overlap, the next step's, inside device_while_judging),
    # the reference log-probs, the update
    out["device_s"] = float(np.median([r["time/device_while_judging_s"] + r["time/update_s"]
                                       + (0.0 if overlap else r["time/sample_s"]) for r in timed]))
    out["judge_calls"] = float(np.median([r.get("judge/calls", 0) for r in timed]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", default="0.25,0.5,1,2,4", help="judge delay / device time")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--out", default="overlap.json")
    args = parser.parse_args()
    from exprl_jax.build import enable_compilation_cache

    enable_compilation_cache()
    proc, url = start_server(0.0)
    try:
        base = run(url, False, args)
    finally:
        proc.kill()
    device = base["device_s"]
    print(f"device work per step (no judge delay): {device:.2f} s (sampling {base['time/sample_s']:.2f}, reference "
          f"{base['time/device_while_judging_s']:.2f}, update {base['time/update_s']:.2f}); judge "
          f"{base['time/reward_s']:.2f} s", flush=True)
    rows = []
    print(f"{'delay/device':>12} {'overlap':>7} {'judge s':>8} {'step s':>7} {'max(d,j)':>8} {'d+j':>6} "
          f"{'step/max':>8} {'hidden':>6}", flush=True)
    for factor in (float(x) for x in args.factors.split(",")):
        proc, url = start_server(factor * device)
        try:
            for overlap in (False, True):
                r = run(url, overlap, args)
                judge = r["time/reward_s"]
                row = {"factor": factor, "delay_s": factor * device, "overlap": overlap, "device_s": device,
                       "judge_s": judge, "step_s": r["time/step_s"], "max_s": max(device, judge),
                       "sum_s": device + judge, "step_over_max": r["time/step_s"] / max(device, judge), **r}
                rows.append(row)
                print(f"{factor:>12.2f} {str(overlap):>7} {judge:>8.2f} {row['step_s']:>7.2f} {row['max_s']:>8.2f} "
                      f"{row['sum_s']:>6.2f} {row['step_over_max']:>8.2f} {r['time/judge_hidden_frac']:>6.2f}",
                      flush=True)
        finally:
            proc.kill()
    worst = max(r["step_over_max"] for r in rows if r["overlap"])
    verdict = "holds" if worst <= 1.1 else "does not hold"
    print(f"with overlap, the worst step / max(device, judge) is {worst:.2f}: the 1.1x claim {verdict}")
    with open(args.out, "w") as f:
        json.dump({"device": base, "rows": rows, "worst_overlap_step_over_max": worst, "args": vars(args),
                   "loadavg": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
