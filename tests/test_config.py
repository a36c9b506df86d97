"""Strict config conversion: unknown keys, wrong types and bad values are errors that name the dotted key."""
import subprocess
import sys

import pytest

from conftest import ROOT
from exprl_jax import config as config_lib
from exprl_jax.config import ExperimentConfig, default_config_dict, from_dict


def test_defaults_round_trip():
    cfg = from_dict(ExperimentConfig, default_config_dict().to_dict())
    assert cfg == ExperimentConfig()
    assert cfg.loss.clip_low == 0.2 and cfg.loss.kl_kind == "k3" and cfg.loss.dual_clip == 3.0  # SPEC §5
    assert cfg.optim.learning_rate == 1e-6 and cfg.optim.weight_decay == 0.01 and cfg.optim.grad_clip_norm == 1.0


def test_unknown_key_names_it():
    values = default_config_dict().to_dict()
    values["rollout"]["tempreature"] = 0.7
    with pytest.raises(KeyError, match=r"rollout\.tempreature"):
        from_dict(ExperimentConfig, values)


def test_wrong_type_names_it():
    values = default_config_dict().to_dict()
    values["train"]["steps"] = "ten"
    with pytest.raises(TypeError, match=r"config\.train\.steps: expected int"):
        from_dict(ExperimentConfig, values)
    values = default_config_dict().to_dict()
    values["train"]["steps"] = True  # bool is not an int here
    with pytest.raises(TypeError, match=r"train\.steps"):
        from_dict(ExperimentConfig, values)


def test_int_promotes_to_float_and_lists_to_tuples():
    values = default_config_dict().to_dict()
    values["optim"]["learning_rate"] = 1
    values["mesh"]["shape"] = [2, -1, 1]
    cfg = from_dict(ExperimentConfig, values)
    assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.mesh.shape == (2, -1, 1)


def test_unknown_method():
    values = default_config_dict().to_dict()
    values["method"] = "ppo_magic"
    with pytest.raises(ValueError, match="ppo_magic"):
        from_dict(ExperimentConfig, values)


def test_diff_lists_changed_keys():
    a = config_lib.to_dict(ExperimentConfig())
    b = config_lib.to_dict(ExperimentConfig(seed=3))
    assert config_lib.diff(a, b) == ["seed: 0 -> 3"]
    assert config_lib.diff(a, a) == []


@pytest.mark.parametrize("override, message", [
    ("--config.rollout.tempreature=0.5", "tempreature"),
    ("--config.train.steps=abc", "steps"),
])
def test_command_line_override_errors(override, message):
    """ml_collections with lock_config=True refuses unknown keys and wrong types on the command line."""
    proc = subprocess.run([sys.executable, "experiments/run.py", "--config=experiments/configs/smoke.py", override,
                           "--workdir=/nonexistent/never"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_every_config_file_loads():
    import glob
    import importlib.util

    for path in sorted(glob.glob(f"{ROOT}/experiments/configs/*.py")):
        spec = importlib.util.spec_from_file_location("cfg", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        doc = (module.__doc__ or "").lstrip()
        assert doc.startswith("python experiments/"), f"{path}: docstring must start with its command"
        if doc.startswith("python experiments/calibrate_judge.py"):
            from exprl_jax.judge.calibration import CalibrationConfig

            from_dict(CalibrationConfig, module.get_config().to_dict())
        else:
            from_dict(ExperimentConfig, module.get_config().to_dict())


@pytest.mark.parametrize("method, clip_high, kl_coef, entropy_coef, scale_by_std", [
    ("exprl_outcome", 0.28, 0.001, 0.0, "true"),  # SPEC §5
    ("exprl_process", 0.26, 0.001, 0.0, "true"),
    ("grpo", 0.26, 0.001, 0.0, "true"),
    ("stage2", 0.26, 0.0, 1e-4, "false"),  # Stage II: Dr.GRPO advantage, entropy bonus, no KL
    ("self_distill", 0.28, 0.0, 0.0, "true"),  # SPEC §6: no KL term
])
def test_method_defaults_resolve(method, clip_high, kl_coef, entropy_coef, scale_by_std):
    cfg = config_lib.resolve(ExperimentConfig(method=method))
    assert (cfg.loss.clip_high, cfg.loss.kl_coef, cfg.loss.entropy_coef, cfg.loss.scale_by_std) == (
        clip_high, kl_coef, entropy_coef, scale_by_std)


def test_explicit_values_beat_method_defaults():
    values = default_config_dict().to_dict()
    values["method"], values["loss"]["kl_coef"], values["loss"]["scale_by_std"] = "stage2", 0.01, "true"
    cfg = config_lib.resolve(from_dict(ExperimentConfig, values))
    assert cfg.loss.kl_coef == 0.01 and cfg.loss.scale_by_std == "true" and cfg.loss.entropy_coef == 1e-4
    values["loss"]["scale_by_std"] = "maybe"
    with pytest.raises(ValueError, match="scale_by_std"):
        config_lib.resolve(from_dict(ExperimentConfig, values))
