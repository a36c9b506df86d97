"""Measures a testbed base model and writes the tables of its README (probes.json and probes.md in --out):

  python experiments/probe_base.py --base=assets/testbed_base --out=assets/testbed_base

per chain length k: sample accuracy (answer pass@1 / pass@16, exact pass@1, steps written, single-segment share),
late-step accuracy given a correct prefix of k-1 steps, and the teacher's view (the reference in the prompt:
pass@16 lift); on the chosen Stage-I pool: the student's initial reverse KL to its teacher and the judge's
validity check (the chance to finish correctly from a prefix at each outcome level). The pool is the shortest k
whose late-step accuracy lies in 15-40% and whose filtered pool (the problems the base failed in all of the
experiment config's filter samples, computed here and cached next to the base) the base solves in <= 1% of fresh
samples (`probes.choose_pool`). Per-k results already in --out/probes.json for the same weights are reused.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from exprl_jax.build import enable_compilation_cache  # noqa: E402
from exprl_jax.data.hard_filter import weights_sha256  # noqa: E402
from exprl_jax.tasks import probes  # noqa: E402

_BASE = flags.DEFINE_string("base", "assets/testbed_base", "The base checkpoint (HF directory or a workdir).")
_OUT = flags.DEFINE_string("out", None, "Where to write probes.json and probes.md (default: --base).")
_KS = flags.DEFINE_list("ks", ["4", "5", "6", "7", "8", "9"], "Chain lengths to measure.")
_PROBLEMS = flags.DEFINE_integer("problems", 128, "Held-out problems per k.")
_SAMPLES = flags.DEFINE_integer("samples", 16, "Samples per problem.")
_LATE = flags.DEFINE_integer("late_problems", 96, "Problems per k for late-step accuracy (16 continuations each).")
_POOL = flags.DEFINE_integer("pool_k", 0, "Measure the KL and validity at this k (0: the chosen pool).")
_CONFIG = flags.DEFINE_string("config", os.path.join(ROOT, "experiments", "configs", "default.py"),
                              "The experiment whose Stage-I pool filter is applied (its num_pool, hard_filter_k).")


def _table(rows, columns) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row) for _, fmt in columns) + " |")
    return lines


def main(argv):
    del argv
    enable_compilation_cache()
    base, key, t0 = probes.Base.load(_BASE.value), jax.random.key(123), time.time()
    ks = [int(k) for k in _KS.value]
    n, p = _SAMPLES.value, _PROBLEMS.value
    out = _OUT.value or probes.tb.resolve_base(_BASE.value)[0]
    settings = {"weights_sha256": weights_sha256(probes.tb.resolve_base(_BASE.value)[1]), "problems": p,
                "samples": n, "late_problems": _LATE.value}
    previous = probes.read_json(os.path.join(out, "probes.json")) or {}
    reuse = previous.get("settings") == settings
    stats, teacher, late = {}, {}, {}
    for k in ks:
        if reuse and str(k) in previous["stats"]:
            stats[k], teacher[k], late[k] = (previous[part][str(k)] for part in ("stats", "teacher", "late"))
            continue
        stats[k] = probes.sample_accuracy(base, k, p, n, jax.random.fold_in(key, k))
        teacher[k] = probes.sample_accuracy(base, k, p, n, jax.random.fold_in(key, 100 + k), teacher=True)
        late[k] = probes.late_step_accuracy(base, k, _LATE.value, 16, jax.random.fold_in(key, 200 + k))
        print(f"k={k}: {stats[k]} teacher {teacher[k]} late {late[k]} ({time.time() - t0:.0f}s)", flush=True)
    # the filtered pool of every chain length whose late step is in the band, shortest first
    pool_stats, pool_late = {}, {}
    for k in probes.pool_candidates(late):
        if reuse and str(k) in previous.get("pool_stats", {}):
            pool_stats[k], pool_late[k] = previous["pool_stats"][str(k)], previous["pool_late"][str(k)]
        else:
            pairs = probes.filtered_pool(_CONFIG.value, k)
            pool_stats[k] = {**probes.sample_accuracy(base, k, p, n, jax.random.fold_in(key, 500 + k), pairs=pairs),
                             "kept": len(pairs)}
            pool_late[k] = probes.late_step_accuracy(base, k, _LATE.value, 16, jax.random.fold_in(key, 600 + k),
                                                     pairs=pairs)
            print(f"filtered pool k={k}: {pool_stats[k]} late {pool_late[k]} ({time.time() - t0:.0f}s)", flush=True)
        if pool_stats[k]["pass@1"] <= probes.MAX_POOL_ACCURACY:
            break
    pool = _POOL.value or probes.choose_pool(late, {k: v["pass@1"] for k, v in pool_stats.items()})
    result = {"base": _BASE.value, "settings": settings, "stats": stats, "teacher": teacher, "late": late,
              "pool_stats": pool_stats, "pool_late": pool_late, "pool_k": pool}
    if pool:
        result["reverse_kl"] = probes.reverse_kl(base, pool, 64, 8, jax.random.fold_in(key, 300))
        result["validity"] = probes.prefix_validity(base, pool, 48, 4, 4, jax.random.fold_in(key, 400))
    result["seconds"] = time.time() - t0
    probes.write_json(os.path.join(out, "probes.json"), result)
    lines = [f"Per k: {p} held-out problems x {n} samples, T = 0.8; late step: {_LATE.value} problems x 16 "
             "continuations of the first k-1 native steps.", ""]
    lines += _table([k for k in ks], [
        ("k", str), ("answer pass@1", lambda k: f"{stats[k]['pass@1']:.3f}"),
        (f"answer pass@{n}", lambda k: f"{stats[k][f'pass@{n}']:.3f}"),
        ("exact pass@1", lambda k: f"{stats[k]['exact_pass@1']:.3f}"),
        ("steps written", lambda k: f"{stats[k]['steps_written']:.2f}"),
        ("single-segment share", lambda k: f"{stats[k]['single_segment_frac']:.3f}"),
        ("late step right given a correct prefix", lambda k: f"{late[k]['step']:.3f}"),
        ("answer right given a correct prefix", lambda k: f"{late[k]['answer']:.3f}"),
        (f"teacher pass@{n} (reference in prompt)", lambda k: f"{teacher[k][f'pass@{n}']:.3f}"),
        (f"teacher lift, pass@{n}", lambda k: f"{teacher[k][f'pass@{n}'] - stats[k][f'pass@{n}']:+.3f}")])
    lines += ["", f"Filtered pools (the problems of {os.path.relpath(_CONFIG.value, ROOT)}'s pool the base failed in "
                  "all filter samples; fresh samples):", ""]
    lines += _table(sorted(pool_stats), [
        ("k", str), ("kept problems", lambda k: str(pool_stats[k]["kept"])),
        ("answer pass@1", lambda k: f"{pool_stats[k]['pass@1']:.4f}"),
        (f"answer pass@{n}", lambda k: f"{pool_stats[k][f'pass@{n}']:.3f}"),
        ("late step right given a correct prefix", lambda k: f"{pool_late[k]['step']:.3f}")])
    lines += ["", f"Stage-I pool: k = {pool}"]
    if pool:
        kl = result["reverse_kl"]
        lines.append(f"Student's initial per-token reverse KL to the teacher at k = {pool} (64 problems x 8 samples): "
                     f"mean {kl['mean']:.3f}, median over problems {kl['median']:.3f} (IQR {kl['q25']:.3f}-"
                     f"{kl['q75']:.3f}); the paper: median 0.05, IQR 0.034-0.068.")
        lines += ["", f"Judge validity at k = {pool} (48 problems x 4 base samples, cut after every step, 4 "
                      "continuations per prefix):", ""]
        lines += _table(sorted(result["validity"]), [
            ("outcome level of the prefix", str), ("prefixes", lambda lv: str(result["validity"][lv]["prefixes"])),
            ("finish correctly", lambda lv: f"{result['validity'][lv]['finish']:.3f}")])
    with open(os.path.join(out, "probes.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{time.time() - t0:.0f}s; wrote {out}/probes.json and probes.md")


if __name__ == "__main__":
    app.run(main)
