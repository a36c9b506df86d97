"""Test-wide setup: 8 emulated CPU devices, set once before jax is imported anywhere."""
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "jax" in sys.modules:  # pragma: no cover - guards against a plugin importing jax first
    raise RuntimeError("jax was imported before tests/conftest.py could set XLA_FLAGS")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

# A persistent XLA compilation cache shared by the test processes and the subprocesses they start: the same
# tiny shapes are compiled once per machine instead of once per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/exprl_jax/xla-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("EXPRL_JAX_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])


def smoke_config(**overrides):
    """The smoke experiment config as a typed ExperimentConfig, with dotted-key overrides ("train.steps": 2)."""
    from exprl_jax.config import load_config

    return load_config(os.path.join(ROOT, "experiments/configs/smoke.py"), **overrides)


def random_params(cfg, seed=0, std=0.02):
    """Params with exactly init_params' tree, shapes and dtypes, drawn with numpy (compiling the jax initialiser
    costs seconds per config). Norm scales are 1 ± 0.1 and biases nonzero, so a dropped scale or bias shows."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from exprl_jax.models.transformer import init_params

    shapes = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def one(path, s):
        is_scale = path[-1].key == "scale"
        return jnp.asarray((1.0 if is_scale else 0.0) + (0.1 if is_scale else std) * rng.standard_normal(s.shape),
                           s.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    """A workdir whose final_hf is the tiny model taught the toy-addition format by SFT: its rollouts end with EOS
    and so reach the judge (a random model's are almost all truncated, which scores 0 without a judge call)."""
    from exprl_jax.experiment import Experiment

    workdir = str(tmp_path_factory.mktemp("toy_base"))
    Experiment(smoke_config(**{"method": "sft", "train.steps": 120, "optim.learning_rate": 3e-3,
                               "eval.at_start": False, "eval.at_end": False}), workdir).run()
    return workdir
