"""Mixed domains: the interleave that deals draw positions to domains (hand-derived and by its invariants), the
mixture's per-domain sampling (weights, per-epoch permutations, resumable), its config errors, a mixed run's
records, and the judge template chosen by each record's domain."""
import numpy as np
import pytest

from conftest import smoke_config

from exprl_jax.data import QARecord, indices_at, write_jsonl
from exprl_jax.data.mixture import Mixture, integer_proportions, interleave, parse_component, parse_weights


def records(domain, n, prefix=None):
    prefix = prefix or domain
    return [QARecord(id=f"{prefix}/{i}", problem=f"{prefix} problem {i}", reference=f"{prefix} reference {i}",
                     answer=str(i), domain=domain) for i in range(n)]


def test_interleave_hand_derived():
    # proportions 5:3:2, R = 10. Domain 0 owns ceil(5k/10) of the first k positions: 0,1,1,2,2,3,... so it takes
    # positions 0,2,4,6,8. The others (1,3,5,7,9) have ranks 0..4 among the rest, proportions 3:2 (R = 5):
    # domain 1 owns ceil(3j/5) = 0,1,2,2,3,3 of the first j, so ranks 0,1,3 (positions 1,3,7) are domain 1's
    # and ranks 2,4 (positions 5,9) domain 2's.
    assert [interleave(k, (5, 3, 2)) for k in range(10)] == [
        (0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (2, 0), (0, 3), (1, 2), (0, 4), (2, 1)]
    assert [interleave(k, (1,))[1] for k in range(5)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("proportions", [(5, 3, 2), (1, 1), (2, 7, 1, 3), (1, 99)])
def test_interleave_invariants(proportions):
    """Each domain owns exactly m·p of the first m·R positions, fewer than D away from k·p/R in between (one
    floor per nesting level), and its draws count up 0, 1, 2, ..."""
    total = sum(proportions)
    counts = [0] * len(proportions)
    for k in range(3 * total + 17):
        d, draw = interleave(k, proportions)
        assert draw == counts[d]
        counts[d] += 1
        for c, p in zip(counts, proportions):
            assert abs(c - (k + 1) * p / total) < len(proportions)
            if (k + 1) % total == 0:
                assert c == (k + 1) // total * p


def test_weights_and_components_parse():
    assert parse_weights(("math=0.6", " science = 0.4")) == {"math": 0.6, "science": 0.4}
    for bad in (("math",), ("math=0",), ("math=-1",), ("math=x",), ("math=1", "math=2"), ("=1",)):
        with pytest.raises(ValueError, match="domain_weights: bad entry"):
            parse_weights(bad)
    assert integer_proportions([0.5, 0.3, 0.2]) == (5, 3, 2) and integer_proportions([2, 4]) == (1, 2)
    assert parse_component("exprl_qa/minerva_math[test[:100]]") == ("tfds", "exprl_qa/minerva_math", "test[:100]")
    assert parse_component("exprl_qa/gsm8k") == ("tfds", "exprl_qa/gsm8k", None)
    assert parse_component("/data/code.jsonl") == ("jsonl", "/data/code.jsonl", None)
    with pytest.raises(ValueError, match="expected a .jsonl path or a TFDS name"):
        parse_component("gsm8k")


def test_mixture_draws_by_domain_weight_and_covers_each_domain_every_epoch():
    math, science = records("math", 7), records("science", 3)
    code = records("code", 5)
    mix = Mixture([math + science, code], {"math": 0.5, "science": 0.25, "code": 0.25}, names=["a", "b"])
    assert len(mix) == 15 and mix[7] == science[0] and mix[10] == code[0]
    steps = [mix.global_indices(8, s, seed=1) for s in range(6)]
    assert mix.global_indices(8, 4, seed=1) == steps[4]  # a pure function of (seed, step): resume is exact
    drawn = [mix[i] for step in steps for i in step]
    by_domain = {d: [r.id for r in drawn if r.domain == d] for d in ("math", "science", "code")}
    assert {d: len(v) for d, v in by_domain.items()} == {"math": 24, "science": 12, "code": 12}  # 2:1:1 exactly
    # within a domain, each epoch is a permutation of its records: science (3 records) drew 4 full epochs
    for e in range(4):
        assert sorted(by_domain["science"][3 * e:3 * e + 3]) == [r.id for r in science]
    assert mix.global_indices(8, 0, seed=2) != steps[0]
    unshuffled = [mix[i].id for i in mix.global_indices(4, 0, seed=1, shuffle=False)]
    assert unshuffled == ["math/0", "science/0", "math/1", "code/0"]
    assert indices_at(mix, 8, 3, 1, process_index=1, process_count=2) == steps[3][4:]


def test_mixture_config_errors_name_the_domain():
    with pytest.raises(ValueError, match=r"no weight for domain\(s\) \['code'\] \(records from b\)"):
        Mixture([records("math", 2), records("code", 2)], {"math": 1.0}, names=["a", "b"])
    with pytest.raises(ValueError, match=r"names domain\(s\) \['science'\] that no record"):
        Mixture([records("math", 2)], {"math": 1.0, "science": 1.0}, names=["a"])


def test_a_mixed_run_loads_jsonl_parts_and_keeps_the_weights(tmp_path):
    from exprl_jax.build import load_records

    write_jsonl(str(tmp_path / "math.jsonl"), records("math", 6))
    write_jsonl(str(tmp_path / "code.jsonl"), records("code", 4))
    cfg = smoke_config(**{"data.source": "mixture", "data.mixture": (str(tmp_path / "math.jsonl"),
                                                                     str(tmp_path / "code.jsonl")),
                          "data.eval_mixture": (str(tmp_path / "code.jsonl"),), "data.num_eval": 2,
                          "data.domain_weights": ("math=0.75", "code=0.25")})
    train, evals, stats = load_records(cfg)
    assert isinstance(train, Mixture) and stats == {"data/domain_records/math": 6, "data/domain_records/code": 4}
    assert [r.id for r in evals] == ["code/0", "code/1"]
    picked = [train[i].domain for i in indices_at(train, 4, 0, cfg.seed)]
    assert picked.count("math") == 3 and picked.count("code") == 1
    small, _, _ = load_records(smoke_config(**{
        "data.source": "mixture", "data.mixture": (str(tmp_path / "math.jsonl"), str(tmp_path / "code.jsonl")),
        "data.domain_weights": ("math=1", "code=1"), "data.num_train": 2}))
    assert [r.id for r in small] == ["math/0", "math/1", "code/0", "code/1"]  # num_train applies per part


class RecordingBackend:
    """A judge backend that answers `Score: 4` and keeps each request's system prompt."""

    model, decoding = "recording", {}

    def __init__(self):
        self.systems = []

    async def complete(self, messages):
        from exprl_jax.judge.backend import Completion

        self.systems.append(messages[0]["content"])
        return Completion(text="Reasoning: fine.\nScore: 4")

    async def aclose(self):
        pass


def test_the_judge_template_follows_each_records_domain():
    from exprl_jax.judge.reward import DOMAIN_TEMPLATE_SETS, JudgeReward
    from exprl_jax.rewards.base import RewardBatch, score_sync

    backend = RecordingBackend()
    judge = JudgeReward(backend, domain_templates=DOMAIN_TEMPLATE_SETS)
    domains = ["math", "code", "science", None]
    batch = RewardBatch(problems=[f"p{i}" for i in range(4)], references=["r"] * 4, answers=["1"] * 4,
                        responses=["t"] * 4, truncated=np.zeros(4, bool), group_size=1, domains=domains)
    result = score_sync(judge, batch)
    assert result.valid.all() and np.allclose(result.scores, 0.75)
    kinds = sorted("code reviewer" in s and "code" or "science problems" in s and "science" or "math"
                   for s in backend.systems)
    assert kinds == ["code", "math", "math", "science"]  # a record without a domain is judged as math
    with pytest.raises(ValueError, match="no judge template set for domain 'poetry'"):
        score_sync(judge, RewardBatch(problems=["p"], references=["r"], answers=["1"], responses=["t"],
                                      truncated=np.zeros(1, bool), group_size=1, domains=["poetry"]))
    plain = JudgeReward(RecordingBackend(), template_set="science")  # no domain map: one template for every row
    assert plain.template_for("code").key == "science-equivalence.v1"

