"""distributed.py: one process behaves as if alone (no collectives), start-up settings are read and checked, and
two real processes (2 CPU devices each, gloo) place, gather, broadcast, share errors and save / load a model."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import ROOT
from exprl_jax import distributed
from exprl_jax.sharding import make_mesh


def test_a_single_process_is_primary_and_shares_nothing():
    assert distributed.is_primary() and distributed.process_count() == 1
    obj = {"a": [1, 2]}
    assert distributed.broadcast(obj) is obj
    assert distributed.from_primary(lambda: 7) == 7
    with pytest.raises(KeyError, match="missing"):
        distributed.from_primary(lambda: {}["missing"])
    distributed.barrier("alone")


def test_to_host_and_global_array_on_a_sharded_mesh():
    mesh = make_mesh((2, 4, 1))
    host = np.arange(16 * 2, dtype=np.int32).reshape(16, 2)
    placed = distributed.global_array(host, NamedSharding(mesh, P(("data", "fsdp"))))
    assert len(placed.addressable_shards) == 8 and placed.addressable_shards[1].data.shape == (2, 2)
    np.testing.assert_array_equal(distributed.to_host(placed), host)
    np.testing.assert_array_equal(distributed.to_host(jax.numpy.ones(3)), np.ones(3))


def test_initialize_runs_alone_without_settings_and_names_what_is_missing(monkeypatch):
    for name in distributed.ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() == 1  # JAX_PLATFORMS=cpu: no cluster to look for
    assert distributed.initialize(num_processes=1) == 1
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.initialize(coordinator_address="127.0.0.1:1", num_processes=2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        distributed.initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"process_id=2 is outside \[0, num_processes=2\)"):
        distributed.initialize(coordinator_address="127.0.0.1:1", process_id=2)


@pytest.mark.slow
def test_two_processes_place_gather_broadcast_and_save(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "distributed_worker.py"),
                                       str(tmp_path / "model")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"ok {i}" in out, out[-3000:]
