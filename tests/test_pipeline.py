"""Stage I -> Stage II under one workdir: the ladder evaluations, the cached base evaluation, the table and plot."""
import json

from conftest import smoke_config
from exprl_jax import pipeline
from exprl_jax.pipeline import run_pipeline, stage2_config


def test_pipeline_writes_table_plot_and_caches_the_base_evaluation(tmp_path, monkeypatch):
    cfg = smoke_config(**{"train.steps": 1, "stage2.steps": 1, "stage2.group_size": 2, "eval.final_num_samples": 8,
                          "eval.cache_dir": str(tmp_path / "cache")})
    seen = []
    summary = run_pipeline(cfg, str(tmp_path / "a"), on_base_eval=seen.append)
    assert seen and set(seen[0]) == {"ladder", "final"}
    table = (tmp_path / "a" / "summary.md").read_text()
    for row in ("| base |", "| after Stage I (exprl_outcome) |", "| after Stage II |", "paired bootstrap 95% CI"):
        assert row in table, table
    assert "| 8 |" in table  # pass@k up to the final sample count
    assert "Stage-I reward, mean ± SE over steps" in table and "share of groups with any reward signal" in table
    assert (tmp_path / "a" / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert set(saved) >= {"base", "base_final", "stage1", "stage2", "stage2_final"}
    assert saved["base_final"]["eval"]["per_problem"][0]["samples"] == 8
    s2 = json.loads((tmp_path / "a" / "stage2" / "config.json").read_text())
    assert s2["method"] == "stage2" and s2["model"]["init_checkpoint"].endswith("stage1")
    assert s2["loss"]["kl_coef"] == 0.0 and s2["loss"]["scale_by_std"] == "false" and s2["rollout"]["group_size"] == 2
    assert summary["stage2_results"]["params_sha256"] != summary["stage1_results"]["params_sha256"]
    assert len(list((tmp_path / "cache").glob("eval_*.json"))) == 2  # the ladder and the final pass
    # a second pipeline from the same base reads the base evaluation from the cache: no sampling at all
    monkeypatch.setattr(pipeline, "evaluate_sets", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    monkeypatch.setattr(pipeline.Experiment, "run", lambda self: {"params_sha256": "x"})
    cfg0 = smoke_config(**{"train.steps": 0, "stage2.steps": 0, "eval.final_num_samples": 8,
                           "eval.cache_dir": str(tmp_path / "cache")})
    again = run_pipeline(cfg0, str(tmp_path / "b"))
    assert again["base"] == saved["base"]


def test_stage2_config_resets_method_defaults():
    cfg = smoke_config(**{"loss.kl_coef": 0.01, "stage2.steps": 5, "stage2.learning_rate": 3e-5,
                          "stage2.prompts_per_step": 2, "judge.reference": "other", "judge.noise": 0.3})
    s2 = stage2_config(cfg, "/x/stage1")
    assert s2.method == "stage2" and s2.loss.kl_coef == -1.0 and s2.train.steps == 5
    assert s2.optim.learning_rate == 3e-5 and s2.stage2.steps == 0 and s2.model.init_checkpoint == "/x/stage1"
    assert s2.rollout.prompts_per_step == 2 and s2.judge.reference == "own" and s2.judge.noise == 0.0
    assert not s2.eval.at_end and not s2.eval.at_start  # the pipeline evaluates
