"""Does `judge.overlap` hide the judge? Step time against max(device, judge) and device + judge, with the judge's
latency swept from 0.25x to 4x the device time of a step, overlap off and on (alternated).

  python benchmarks/overlap.py [--factors 0.25,0.5,1,2,4] [--steps 5] [--out overlap.json]

The run is the embedded default (experiments/configs/default.py: ExpRL-Outcome on the CPU testbed from the shipped
base, whose rollouts end with EOS and so all reach the judge), with a smaller step (--prompts x --group) and an
OpenAI-compatible judge server on this machine that answers every request after a fixed delay. "device" is the
step's device work as measured in the same run (sampling + reference log-probs + update; the no-delay baseline's
is printed too); "judge" is the scoring wall time per step (all requests in flight at once, plus the answer
check). The claim under test: with overlap, a step takes at most 1.1 x max(device, judge).
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


def table(base: dict, rows: list[dict]) -> tuple[str, float]:
    """The printed table and the worst overlap step / max(device, judge). "device" is each run's own device work
    per step (the machine is shared, so it drifts between runs); the no-delay baseline's is shown for reference."""
    lines = [f"device work per step without judge delay: {base['device_s']:.2f} s (sampling "
             f"{base['time/sample_s']:.2f}, reference {base['time/device_while_judging_s']:.2f}, update "
             f"{base['time/update_s']:.2f})",
             "| delay/device | overlap | device s | judge s | step s | max(d, j) | d + j | step / max | judge hidden |",
             "|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for r in rows:
        device, judge = r["device_s"], r["time/reward_s"]
        ratio = r["time/step_s"] / max(device, judge)
        if r["overlap"]:
            worst = max(worst, ratio)
        lines.append(f"| {r['factor']:g} | {'on' if r['overlap'] else 'off'} | {device:.2f} | {judge:.2f} | "
                     f"{r['time/step_s']:.2f} | {max(device, judge):.2f} | {device + judge:.2f} | {ratio:.2f} | "
                     f"{r['time/judge_hidden_frac']:.2f} |")
    verdict = "holds" if worst <= 1.1 else "does not hold"
    lines.append(f"with overlap, the worst step / max(device, judge) is {worst:.2f}: the 1.1x claim {verdict}")
    return "\n".join(lines), worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", default="0.25,0.5,1,2,4", help="judge delay / device time")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--out", default="overlap.json")
    parser.add_argument("--from-json", help="print the table of a saved run instead of running")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(table(saved["device"], saved["rows"])[0])
        return
    from exprl_jax.build import enable_compilation_cache

    enable_compilation_cache()
    proc, url = start_server(0.0)
    try:
        base = run(url, False, args)
    finally:
        proc.kill()
    rows = []
    for factor in (float(x) for x in args.factors.split(",")):
        proc, url = start_server(factor * base["device_s"])
        try:
            for overlap in (False, True):
                rows.append({"factor": factor, "delay_s": factor * base["device_s"], "overlap": overlap,
                             **run(url, overlap, args)})
                print(f"delay {factor:g}x, overlap {overlap}: step {rows[-1]['time/step_s']:.2f} s", flush=True)
        finally:
            proc.kill()
    text, worst = table(base, rows)
    print(text)
    with open(args.out, "w") as f:
        json.dump({"device": base, "rows": rows, "worst_overlap_step_over_max": worst, "args": vars(args),
                   "loadavg": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
