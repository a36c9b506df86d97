"""The CPU testbed task family: mod-10 chains of k dependent `+`/`-` steps, with a native trace (pre-training only),
a terse human-style reference (the hidden scaffold of Stage I), "name=value" checkpoints for the programmatic judge,
and the record views (pre-training, filtered Stage-I set, held-out eval sets) that `load_records` asks for.

A problem gives 1-2 digit constants, then k steps over consecutive letters (from a random start, wrapping z -> a);
step i always uses step i-1 and either a digit or an earlier variable (a look-up), so every step is needed.
0-2 distractor steps follow the queried variables. The answer is the last three chain values written together
("913"): 1000 answers, so a sample with a broken chain matches by luck ~0.1% of the time. (With two values, a base
matched by luck in ~1-2% of samples at k >= 8: a ~20% pass@16 floor on problems it never solved.)
"""
from __future__ import annotations

import dataclasses
import os
import string

import numpy as np

from exprl_jax.data import QARecord
from exprl_jax.data import hard_filter as hf

LETTERS = string.ascii_lowercase
MAX_DISTRACTORS = 2
QUERY_LEN = 3  # the answer is the values of this many last variables
VAR_OPERAND_P = 0.5  # share of steps whose second operand is an earlier variable rather than a digit
SWAP_P = 0.3  # share of steps written with the previous variable on the right ("d=5-c")
# fixed data seeds: every training seed sees the same problems, and the eval sets never change
SEEDS = {"pretrain": 11, "pool": 22, "easy": 33, "same": 44, "harder": 55, "ladder": 66}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Item:
    consts: tuple[tuple[str, int], ...]  # (name, value) of the starting constants
    steps: tuple[tuple[str, str, str, str], ...]  # (name, left, op, right): k chain steps, then distractors
    k: int
    style_seed: int  # picks the reference's phrasing

    @property
    def chain(self):
        return self.steps[:self.k]

    @property
    def query(self) -> tuple[str, ...]:
        """The last three variables of the chain (constants count when k < 3)."""
        names = [n for n, _ in self.consts] + [s[0] for s in self.chain]
        return tuple(names[-QUERY_LEN:])


def make_item(rng: np.random.Generator, k: int) -> Item:
    if k < 1:
        raise ValueError(f"a chain needs k >= 1 steps, got {k}")
    n_const, n_dist = int(rng.integers(1, 3)), int(rng.integers(0, MAX_DISTRACTORS + 1))
    start = int(rng.integers(26))
    names = [LETTERS[(start + i) % 26] for i in range(n_const + k + n_dist)]
    consts = tuple((names[i], int(rng.integers(10))) for i in range(n_const))
    known, steps = names[:n_const], []
    for name in names[n_const:]:
        prev, earlier = known[-1], known[:-1]
        if earlier and rng.random() < VAR_OPERAND_P:
            other = earlier[int(rng.integers(len(earlier)))]
        else:
            other = str(int(rng.integers(1, 10)))
        op = "+-"[int(rng.integers(2))]
        left, right = (other, prev) if rng.random() < SWAP_P else (prev, other)
        steps.append((name, left, op, right))
        known.append(name)
    return Item(consts, tuple(steps), k, int(rng.integers(2**31)))


def values(item: Item) -> dict[str, int]:
    """Every variable's value, evaluated in order (mod 10)."""
    vals = dict(item.consts)
    get = lambda x: int(x) if x.isdigit() else vals[x]  # noqa: E731
    for name, left, op, right in item.steps:
        vals[name] = (get(left) + get(right) if op == "+" else get(left) - get(right)) % 10
    return vals


def answer(item: Item) -> str:
    vals = values(item)
    return "".join(str(vals[q]) for q in item.query)


def checkpoints(item: Item) -> tuple[str, ...]:
    vals = values(item)
    return tuple(f"{name}={vals[name]}" for name, *_ in item.chain)


def problem_text(item: Item) -> str:
    consts = ",".join(f"{n}={v}" for n, v in item.consts)
    steps = ";".join(f"{n}={left}{op}{right}" for n, left, op, right in item.steps)
    return f"{consts};{steps};find {','.join(item.query)}"


def native_trace(item: Item) -> str:
    """One `name=expr=substituted=value` step per chain variable, `###` between steps, then the boxed answer."""
    vals = values(item)
    get = lambda x: x if x.isdigit() else str(vals[x])  # noqa: E731
    steps = [f"{n}={left}{op}{right}={get(left)}{op}{get(right)}={vals[n]}" for n, left, op, right in item.chain]
    return "###".join(steps + [f"\\boxed{{{answer(item)}}}"])


def reference_solution(item: Item) -> str:
    """A terse human-style solution: results only, backward planning, or substitution on some steps. Each
    checkpoint still appears as its own `name=value` statement (after `,` `;` or a line break)."""
    rng = np.random.default_rng(item.style_seed)
    vals, query, ans = values(item), ",".join(item.query), answer(item)
    get = lambda x: x if x.isdigit() else str(vals[x])  # noqa: E731
    results = [f"{n}={vals[n]}" for n, *_ in item.chain]
    style = int(rng.integers(3))
    if style == 0:
        per_line = int(rng.integers(2, 4))
        lines = [", ".join(results[i:i + per_line]) for i in range(0, len(results), per_line)]
        return "\n".join(lines) + f"\nso {query} give \\boxed{{{ans}}}"
    if style == 1:
        plan = ", ".join(f"{n}={left}{op}{right}" for n, left, op, right in reversed(item.chain))
        return f"We need {query}: {plan}.\nForward:\n{', '.join(results)}.\n\\boxed{{{ans}}}"
    shown = [f"{n}={get(left)}{op}{get(right)}={vals[n]}" if rng.random() < 0.5 else f"{n}={vals[n]}"
             for n, left, op, right in item.chain]
    return "; ".join(shown) + f".\nHence \\boxed{{{ans}}}"


def teacher_problem(item: Item) -> str:
    """The self-distillation teacher's prompt text for an item (rubrics/self-distill-teacher), as a problem."""
    from exprl_jax.judge.templates import load_template

    messages = load_template("self-distill-teacher").render(problem=problem_text(item),
                                                            reference=reference_solution(item))
    return "\n".join(m["content"] for m in messages)


def max_new_tokens(ks, margin: int = 32) -> int:
    """A generation budget for chains of up to max(ks) steps: the native trace (at most 14k + 11 characters)
    plus a margin, rounded up to 16."""
    return -(-(14 * max(ks) + 11 + margin) // 16) * 16


# ---------------------------------------------------------------- record views


def _record(split: str, i: int, item: Item, reference: str, problem: str | None = None) -> QARecord:
    return QARecord(id=f"testbed/{split}/k{item.k}/{i}", problem=problem or problem_text(item), reference=reference,
                    answer=answer(item), domain="testbed", checkpoints=checkpoints(item))


def _items(split: str, ks, n: int) -> list[tuple[int, Item]]:
    """n items of a split, k cycling through `ks` (a truncated list stays balanced); item i from seed (split, i)."""
    ks = tuple(ks)
    return [(i, make_item(np.random.default_rng([SEEDS[split], i]), ks[i % len(ks)])) for i in range(n)]


def eval_records(split: str, ks, n: int) -> list[QARecord]:
    return [_record(split, i, item, reference_solution(item)) for i, item in _items(split, ks, n)]


def testbed_eval_sets(cfg) -> dict[str, list[QARecord]]:
    """Held-out sets: "easy" (pre-training difficulty), "same" (Stage-I difficulty), "harder", and the difficulty
    ladder: one set of `ladder_problems` chains per k in `ladder_steps`, named "k<k>" (`ladder_sets`)."""
    t, n = cfg.testbed, cfg.data.num_eval
    return {"easy": eval_records("easy", t.pretrain_steps, n), "same": eval_records("same", t.stage1_steps, n),
            "harder": eval_records("harder", t.harder_steps, n), **ladder_sets(cfg)}


def ladder_sets(cfg) -> dict[str, list[QARecord]]:
    """The evaluation ladder (rungs easiest first): held-out chains of each length in `testbed.ladder_steps`."""
    t = cfg.testbed
    return {f"k{k}": eval_records("ladder", [k], t.ladder_problems) for k in t.ladder_steps}


def pretrain_records(cfg, held_out: set[str]) -> list[QARecord]:
    """Native-trace items (k from pretrain_steps, a long_frac share from long_steps) and a reference_prompt_frac
    share of reference-conditioned items (teacher prompt -> native trace). Held-out problems are skipped."""
    t = cfg.testbed
    rng = np.random.default_rng(SEEDS["pretrain"])
    ref_steps = t.reference_prompt_steps or tuple(t.pretrain_steps) + tuple(t.long_steps)
    out = []
    for i in range(t.num_pretrain):
        u = rng.random()
        if u < t.reference_prompt_frac:
            item = make_item(rng, int(rng.choice(ref_steps)))
            problem = teacher_problem(item)
        else:
            pool = t.long_steps if u < t.reference_prompt_frac + t.long_frac else t.pretrain_steps
            item = make_item(rng, int(rng.choice(pool)))
            problem = None
        if problem_text(item) not in held_out:
            out.append(_record("pretrain", i, item, native_trace(item), problem))
    return out


def testbed_records(cfg) -> tuple[list[QARecord], list[QARecord]]:
    """(train, eval) for `cfg.testbed.view`: "pretrain" (eval: easy set) or "stage1" (eval: same-difficulty set)."""
    t = cfg.testbed
    sets = testbed_eval_sets(cfg)
    held_out = {r.problem for records in sets.values() for r in records}
    if t.view == "pretrain":
        return pretrain_records(cfg, held_out), sets["easy"]
    if t.view != "stage1":
        raise ValueError(f"config.testbed.view={t.view!r}; expected 'pretrain' or 'stage1'")
    pool = [r for r in eval_records("pool", t.stage1_steps, t.num_pool) if r.problem not in held_out]
    if t.hard_filter_k > 0:
        pool = hard_filter(cfg, pool)
    return pool, sets["same"]


# ---------------------------------------------------------------- the base-model filter (SPEC §2)


def resolve_base(path: str) -> tuple[str, str]:
    """(directory for the cache file, HF directory) of a base checkpoint: a HF dir or a workdir with final_hf/."""
    base = path if os.path.isabs(path) else os.path.join(ROOT, path)
    hf = os.path.join(base, "final_hf")
    return base, hf if os.path.isfile(os.path.join(hf, "config.json")) else base


FILTER_VERSION = 2  # part of the filter's cache key: bump when the sampler's random streams or the counting change


def hard_filter(cfg, pool: list[QARecord], chunk: int = 64) -> list[QARecord]:
    """Keeps the problems the base fails in all `hard_filter_k` samples (a problem without a verdict, where the
    answer checker failed, is not kept). The result is cached in a JSON file next to the base checkpoint, keyed by
    the pool, the sampling parameters and the weights' sha256."""
    t = cfg.testbed
    base_dir, hf_dir = resolve_base(t.base_checkpoint)
    if not os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        raise FileNotFoundError(f"config.testbed.base_checkpoint={t.base_checkpoint!r}: no model.safetensors in "
                                f"{hf_dir}; set testbed.hard_filter_k=0 to skip the base-model filter")
    key = {"version": FILTER_VERSION, "pool": hf.pool_sha256(pool), "samples": t.hard_filter_k,
           "temperature": cfg.eval.temperature, "template": cfg.data.prompt_template,
           "max_new_tokens": max_new_tokens(t.stage1_steps), "seed": SEEDS["pool"],
           "weights_sha256": hf.weights_sha256(hf_dir)}
    cache_dir = resolve_base(t.filter_cache_dir)[0] if t.filter_cache_dir else base_dir
    path = os.path.join(cache_dir, f"stage1_filter_{hf.key_digest(key)}.json")
    if os.path.isfile(path):
        return hf.apply_filter(pool, path)
    counts = hf.pass_counts(hf_dir, pool, samples=key["samples"], temperature=key["temperature"],
                            template=key["template"], max_new_tokens=key["max_new_tokens"], seed=key["seed"],
                            answer_style=cfg.data.answer_style, chunk=chunk)
    hf.write_result(path, key, pool, counts)
    return hf.apply_filter(pool, path)

