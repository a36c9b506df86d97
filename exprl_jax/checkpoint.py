"""Orbax checkpoints of the TrainState plus a JSON sidecar (data cursor, RNG streams, config) for exact resume.
Local or object-store directories (gs://...); in a multi-process run every process calls save / restore with
its shards and Orbax writes each array once."""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from exprl_jax import storage


class Checkpointer:
    """Saves every `save_every` steps (and whenever `force=True`), keeps the last `max_to_keep`."""

    def __init__(self, directory, *, save_every: int = 1, max_to_keep: int = 3):
        self.directory = storage.as_path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                                 create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        saved = self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force)
        self._manager.wait_until_finished()
        return bool(saved)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """`abstract_state`: a pytree of `jax.ShapeDtypeStruct` with shardings (see `abstract_like`)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def restore_meta(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, so a restore lands directly on the mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
