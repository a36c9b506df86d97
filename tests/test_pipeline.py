"""Stage I -> Stage II under one workdir, with the comparison table and the pass@k plot."""
import json

from conftest import smoke_config
from exprl_jax.pipeline import run_pipeline, stage2_config


def test_pipeline_writes_table_and_plot(tmp_path):
    cfg = smoke_config(**{"train.steps": 1, "stage2.steps": 1, "stage2.group_size": 2})
    summary = run_pipeline(cfg, str(tmp_path))
    table = (tmp_path / "summary.md").read_text()
    for row in ("base", "after Stage I (exprl_outcome)", "after Stage II (sparse GRPO)"):
        assert row in table
    assert (tmp_path / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved) >= {"base", "stage1", "stage2"}
    s2 = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert s2["method"] == "stage2" and s2["model"]["init_checkpoint"].endswith("stage1")
    assert s2["loss"]["kl_coef"] == 0.0 and s2["loss"]["scale_by_std"] == "false" and s2["rollout"]["group_size"] == 2
    assert summary["stage2_results"]["params_sha256"] != summary["stage1_results"]["params_sha256"]


def test_stage2_config_resets_method_defaults():
    cfg = smoke_config(**{"loss.kl_coef": 0.01, "stage2.steps": 5, "stage2.learning_rate": 3e-5})
    s2 = stage2_config(cfg, "/x/stage1")
    assert s2.method == "stage2" and s2.loss.kl_coef == -1.0 and s2.train.steps == 5
    assert s2.optim.learning_rate == 3e-5 and s2.stage2.steps == 0 and s2.model.init_checkpoint == "/x/stage1"
    # Stage II is always evaluated at its end, even from an arm that skipped its own final evaluation
    no_eval = stage2_config(smoke_config(**{"eval.at_end": False, "eval.at_start": True}), "/x/stage1")
    assert no_eval.eval.at_end and not no_eval.eval.at_start
