"""Base-model probes (exprl_jax/tasks/probes.py): the Stage-I pool rule, and the judge's prefix-level validity
check on the shipped base: the chance to finish correctly from a prefix rises with its outcome level."""
import os

import jax
import pytest

from conftest import ROOT
from exprl_jax.tasks import probes

BASE = os.path.join(ROOT, "assets", "testbed_base")


def test_pool_rule_takes_the_shortest_k_in_the_band_whose_filtered_pool_is_almost_never_solved():
    late = {6: {"step": 0.5}, 7: {"step": 0.3}, 8: {"step": 0.2}, 9: {"step": 0.1}}
    assert probes.pool_candidates(late) == [7, 8]  # k = 6's last step is too reliable, k = 9's too unreliable
    assert probes.choose_pool(late, {7: 0.008, 8: 0.001}) == 7
    assert probes.choose_pool(late, {7: 0.02, 8: 0.001}) == 8  # k = 7's filtered pool is still solved too often
    assert probes.choose_pool(late, {7: 0.02}) is None  # k = 8 not measured: no choice
    assert probes.choose_pool({k: {"step": 0.9} for k in late}, {7: 0.0}) is None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(BASE, "model.safetensors")), reason="no shipped base")
def test_prefix_level_predicts_the_base_finishing_correctly():
    """On k = 6 chains (one rung below the pool: a small sample still has level-3 prefixes, which are ~1% of them at
    the pool's k = 7), and in the full measurement at the pool that the base's README reports (probes.json)."""
    import json

    with open(os.path.join(BASE, "probes.json")) as f:
        shipped = {int(level): v for level, v in json.load(f)["validity"].items()}
    validity = probes.prefix_validity(probes.Base.load(BASE), 6, problems=16, samples=2, continuations=4,
                                      key=jax.random.key(7))
    for measured in (validity, shipped):
        levels = sorted(measured)
        assert levels[0] == 1 and len(levels) >= 3, measured
        finish = [measured[level]["finish"] for level in levels]
        assert finish[0] <= 0.05 and finish[-1] > finish[0] + 0.2, measured  # a wrong or short prefix rarely finishes
        assert all(b >= a - 0.02 for a, b in zip(finish, finish[1:])), measured  # and the chance rises with the level
