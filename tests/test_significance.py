"""Paired bootstrap CIs over problems x seeds and the minimum detectable effect, against hand-derived values."""
import numpy as np
import pytest

from exprl_jax.significance import format_ci, mde, mde_resampled, paired_bootstrap, per_problem_pass_at_k


def test_per_problem_pass_at_k():
    # n = 4, c = 1: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; a cell with 1 sample has no pass@2
    got = per_problem_pass_at_k([[1, 0]], [[4, 1]], 2)
    assert got[0, 0] == pytest.approx(0.5) and np.isnan(got[0, 1])
    assert per_problem_pass_at_k([[1]], [[4]], 1)[0, 0] == pytest.approx(0.25)


def test_paired_bootstrap_constant_and_noisy_differences():
    b = np.random.default_rng(0).random((3, 50))
    same = paired_bootstrap(b, b)
    assert same["diff"] == 0.0 and same["low"] == same["high"] == 0.0 and not same["significant"]
    shifted = paired_bootstrap(b + 0.1, b)  # pairing removes the problems' spread entirely
    assert shifted["diff"] == pytest.approx(0.1) and shifted["low"] == pytest.approx(0.1)
    assert shifted["significant"]
    # iid differences with mean 0.2, sd 0.1 over 400 cells: SE 0.005, 95% CI about 0.2 +- 0.0098
    d = 0.2 + 0.1 * np.random.default_rng(1).standard_normal((1, 400))
    ci = paired_bootstrap(d, np.zeros_like(d), num_resamples=4000)
    assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * 0.1 / 20, rel=0.15)
    assert "n.s." not in format_ci(ci) and format_ci(paired_bootstrap(b, b)).endswith("n.s.")
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 3)))


def test_mde_matches_the_binomial_formula():
    # P = 100 problems at p = 0.5, n = 16, one seed: Var(mean difference) = 2 * 0.25 / 16 / 100 = 3.125e-4,
    # so MDE = (1.96 + 0.84) * sqrt(3.125e-4) = 2.8016 * 0.017678 = 0.0495; with 4 seeds half that
    rates = np.full(100, 0.5)
    assert mde(rates, samples=16, k=1, seeds=1, num_sims=2000) == pytest.approx(0.0495, rel=0.08)
    assert mde(rates, samples=16, k=1, seeds=4, num_sims=2000) == pytest.approx(0.0495 / 2, rel=0.08)
    assert mde(np.zeros(100), samples=16) == 0.0  # a base that never succeeds: no sampling noise at all
    # resampling 0/1 samples with 8 successes in 16 is the same binomial at p = 0.5
    per_sample = [np.array([1.0] * 8 + [0.0] * 8)] * 100
    assert mde_resampled(per_sample, seeds=1, num_sims=2000) == pytest.approx(0.0495, rel=0.08)


def test_minimum_detectable_effects_from_a_base_evaluation():
    import types

    from exprl_jax.report import format_mde, minimum_detectable_effects_of

    # k = 4 (late positions 3, 4): 8 of 16 samples reach every step, 8 none -> per-sample M is 1 or 0, a binomial
    # at p = 0.5 over 100 problems: MDE 0.0495 as above; pass@1 from 8 correct of 16 is the same binomial
    problem = {"reach": [8, 8, 8, 8], "correct": 8, "samples": 16}
    base = {"ladder": {"k4": {"per_problem": [problem] * 100, "pass_at_k": {"1": 0.5}}}}
    cfg = types.SimpleNamespace(testbed=types.SimpleNamespace(stage1_steps=(4,)),
                                eval=types.SimpleNamespace(num_samples=16, final_num_samples=0))
    m = minimum_detectable_effects_of(base, cfg, seeds=1)
    assert m["M_base"] == 0.5 and m["P1_base"] == 0.5 and m["rung"] == "k4"
    assert m["M"] == pytest.approx(0.0495, rel=0.12) and m["P1"] == pytest.approx(0.0495, rel=0.12)
    assert format_mde(m).startswith("Minimum detectable effects") and "M on k4" in format_mde(m)
