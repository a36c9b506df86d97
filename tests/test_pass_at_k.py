"""The unbiased pass@k estimator (SPEC §7) against hand-derived values and exact rational arithmetic."""
import math
from fractions import Fraction

import numpy as np
import pytest

from exprl_jax.evaluate import default_ks, pass_at_k, pass_at_k_table


def exact_pass_at_k(n, c, k):
    """1 − C(n−c, k)/C(n, k) in exact rationals (math.comb(m, k) is 0 when m < k)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize(
    "n, c, k, want",
    [
        (2, 1, 1, 0.5),  # 1 − C(1,1)/C(2,1) = 1 − 1/2
        (4, 1, 2, 0.5),  # 1 − C(3,2)/C(4,2) = 1 − 3/6
        (5, 2, 2, 0.7),  # 1 − C(3,2)/C(5,2) = 1 − 3/10
        (10, 3, 1, 0.3),  # pass@1 is c/n: 1 − C(7,1)/C(10,1) = 3/10
        (6, 1, 3, 0.5),  # 1 − C(5,3)/C(6,3) = 1 − 10/20
        (8, 0, 4, 0.0),  # no correct sample: C(8,4)/C(8,4) = 1 → 0
        (8, 8, 8, 1.0),  # all correct
        (5, 3, 3, 1.0),  # n − c = 2 < k = 3: every 3-subset holds a correct sample
        (1, 1, 1, 1.0),
    ],
)
def test_literal_values(n, c, k, want):
    # A plausible bug, 1 − (1 − c/n)^k (the biased estimator), gives 0.75 for (4, 1, 2) instead of 0.5.
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-15)


def test_matches_exact_fractions_for_all_small_cases():
    checked = 0
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-14), (n, c, k)
                checked += 1
    assert checked == sum(n * (n + 1) for n in range(1, 21))  # every (n, c, k) was visited


def test_large_n_is_stable_and_exact():
    # n = 1024: C(1024, 512) ≈ 4.5e306, so forming binomials as floats would overflow to inf (nan results).
    n = 1024
    for c in (0, 1, 2, 7, 64, 511, 900, 1017, 1024):
        values = [pass_at_k(n, c, k) for k in default_ks(n)]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), c
        assert values == sorted(values), f"pass@k not monotone in k for c={c}"
        for k, v in zip(default_ks(n), values):
            assert abs(v - float(exact_pass_at_k(n, c, k))) <= 1e-12, (c, k)
    for k in (1, 16, 128, 1024):
        by_c = [pass_at_k(n, c, k) for c in range(0, n + 1, 31)]
        assert by_c == sorted(by_c), f"pass@k not monotone in c for k={k}"
    # Hand check: pass@1 = c/n exactly, e.g. 1/1024; one correct sample at k=512: 1 − C(1023,512)/C(1024,512)
    # = 1 − (1024−512)/1024 = 0.5.
    assert pass_at_k(n, 1, 1) == pytest.approx(1 / 1024, rel=1e-12)
    assert pass_at_k(n, 1, 512) == pytest.approx(0.5, rel=1e-12)


def test_tiny_probabilities_keep_relative_precision():
    # One correct sample: 1 − C(n−1, k)/C(n, k) = 1 − (n−k)/n = k/n, here 3/1000. The result is a small
    # difference 1 − 0.997, so this checks the subtraction does not lose more than a few ulps of 1.0.
    assert pass_at_k(1000, 1, 3) == pytest.approx(0.003, rel=1e-12)


@pytest.mark.parametrize(
    "n, c, k, message",
    [
        (4, 1, 5, "k=5 needs at least k samples, got n=4"),
        (4, 5, 1, "c=5 correct samples out of n=4"),
        (4, -1, 1, "c >= 0"),
        (4, 1, 0, "k >= 1"),
        (0, 0, 1, "n >= 1"),
        (4.0, 1, 1, "n must be an int"),
        (4, True, 1, "c must be an int"),
    ],
)
def test_errors(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_numpy_ints_accepted():
    assert pass_at_k(np.int64(4), np.int32(1), np.int64(2)) == pytest.approx(0.5)


def test_table_is_mean_over_problems():
    # Problem A: n=4, c=1 → pass@1 = 1/4, pass@2 = 1 − C(3,2)/C(4,2) = 1/2, pass@4 = 1.
    # Problem B: n=4, c=0 → 0, 0, 0.  Problem C: n=4, c=4 → 1, 1, 1.
    # Means: pass@1 = (0.25 + 0 + 1)/3 = 5/12, pass@2 = (0.5 + 0 + 1)/3 = 0.5, pass@4 = (1 + 0 + 1)/3 = 2/3.
    got = pass_at_k_table([4, 4, 4], [1, 0, 4], [1, 2, 4])
    assert list(got) == [1, 2, 4]
    assert got[1] == pytest.approx(5 / 12)
    assert got[2] == pytest.approx(0.5)
    assert got[4] == pytest.approx(2 / 3)


def test_table_errors_name_the_problem():
    with pytest.raises(ValueError, match="problem 1: pass@k with k=4 needs at least k samples, got n=2"):
        pass_at_k_table([4, 2], [0, 0], [1, 4])
    with pytest.raises(ValueError, match="2 sample counts but 1 correct counts"):
        pass_at_k_table([4, 4], [1], [1])
    with pytest.raises(ValueError, match="zero problems"):
        pass_at_k_table([], [], [1])
    with pytest.raises(ValueError, match="no ks"):
        pass_at_k_table([4], [1], [])


@pytest.mark.parametrize(
    "n, want",
    [
        (1, [1]),
        (2, [1, 2]),
        (5, [1, 2, 4, 5]),
        (8, [1, 2, 4, 8]),
        (128, [1, 2, 4, 8, 16, 32, 64, 128]),
        (100, [1, 2, 4, 8, 16, 32, 64, 100]),
    ],
)
def test_default_ks(n, want):
    assert default_ks(n) == want


def test_default_ks_rejects_zero():
    with pytest.raises(ValueError, match="n >= 1"):
        default_ks(0)
