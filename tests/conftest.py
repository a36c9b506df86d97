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
