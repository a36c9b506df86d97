"""One process of a multi-process check (started by test_distributed.py with JAX_* variables and its own device
count): placement, gathering, broadcast, errors raised on every process, and save_hf / load_hf across processes.
Prints "ok <process>" at the end; any failed check exits non-zero."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exprl_jax import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from exprl_jax.models.config import ModelConfig  # noqa: E402
from exprl_jax.models.hf import load_hf, save_hf  # noqa: E402
from exprl_jax.models.transformer import init_boxed  # noqa: E402
from exprl_jax.sharding import make_mesh, param_shardings  # noqa: E402

me, out_dir = jax.process_index(), sys.argv[1]
assert jax.process_count() == 2 and jax.device_count() == 4 and len(jax.local_devices()) == 2
mesh = make_mesh((1, -1, 1))  # fsdp over both processes' devices

# rows placed from one host array: each process holds only its half, and gathering gives the whole back
host = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
rows = distributed.global_array(host, NamedSharding(mesh, P(("data", "fsdp"))))
assert not rows.is_fully_addressable
assert sorted(s.index[0].start for s in rows.addressable_shards) == ([0, 2] if me == 0 else [4, 6])
np.testing.assert_array_equal(distributed.to_host(rows), host)
np.testing.assert_array_equal(distributed.to_host(jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P()))(
    rows)), host * 2)  # replicated: read locally

# broadcast: process 0's object, whatever the others hold; payloads larger than the smallest bucket
got = distributed.broadcast({"from": me, "blob": "x" * (5000 * (me + 1))})
assert got == {"from": 0, "blob": "x" * 5000}, got["from"]
calls = []
assert distributed.from_primary(lambda: calls.append(me) or 41 + me) == 41
assert calls == ([0] if me == 0 else [])  # the function runs on process 0 only
try:
    distributed.from_primary(lambda: int("row 7"))
except ValueError as err:  # raised on every process, not only where it happened
    assert "row 7" in str(err), err
else:
    raise AssertionError("from_primary swallowed the error")

# save_hf gathers fsdp-sharded params (process 0 writes); load_hf places each process's shards
config = ModelConfig.tiny()
boxed = jax.eval_shape(lambda: init_boxed(config, jax.random.key(0)))
shardings = param_shardings(boxed, mesh)
rng = np.random.default_rng(0)
host_params = jax.tree.map(lambda s: rng.standard_normal(s.value.shape).astype(np.float32), boxed,
                           is_leaf=lambda x: hasattr(x, "names"))
params = jax.tree.map(distributed.global_array, host_params, shardings)
assert not params["embed"].is_fully_addressable
save_hf(out_dir, config, params)  # complete for every process when it returns
assert sorted(os.listdir(out_dir)) == ["config.json", "generation_config.json", "model.safetensors"]
_, loaded = load_hf(out_dir, mesh=mesh)
want_specs = {path: s.spec for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
for (path, leaf), (_, want) in zip(jax.tree_util.tree_leaves_with_path(loaded),
                                   jax.tree_util.tree_leaves_with_path(host_params)):
    assert leaf.sharding.spec == want_specs[path], path  # placed on the mesh as the run shards it
    np.testing.assert_array_equal(distributed.to_host(leaf), want)
assert not loaded["embed"].is_fully_addressable
distributed.barrier("done")
print(f"ok {me}", flush=True)
